//! Canary analysis: the judgement of an `analysis` step over the health reports of its
//! window, canaries against the stable nodes of the same rollout. A pure function of its
//! inputs, so a judgement can be explained (the audit event carries `Figures`) and tested.

use serde::{Deserialize, Serialize};

/// Thresholds of an `analysis` step (`Rollouts` proto `Analysis`); 0 disables a check.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct AnalysisSpec {
    /// Length of a measurement.
    pub window_seconds: u32,
    /// Canary probe failures ÷ probes, 0..1.
    #[serde(with = "crate::finite")]
    pub max_error_rate: f64,
    /// Worst canary probe p99 latency.
    #[serde(with = "crate::finite")]
    pub max_p99_latency_ms: f64,
    /// Canary log-pattern matches in the window.
    pub max_log_matches: u64,
    /// Share of canaries healthy at the end of the window, 0..100.
    #[serde(with = "crate::finite")]
    pub min_healthy_percent: f64,
    /// Canary error rate minus stable error rate, 0..1.
    #[serde(with = "crate::finite")]
    pub max_error_rate_vs_baseline: f64,
    /// Canary health reports needed before judging.
    pub min_reports: u32,
    /// Failed measurements before the rollout is aborted (at least 1).
    pub failure_limit: u32,
}

/// Health of a group of nodes over a window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct GroupHealth {
    /// Nodes in the group.
    pub nodes: u32,
    /// Health reports received from them in the window.
    pub reports: u32,
    /// Probes passed.
    pub successes: u64,
    /// Probes failed.
    pub failures: u64,
    /// Worst p99 probe latency reported, ms.
    #[serde(with = "crate::finite")]
    pub p99_ms: f64,
    /// Log-pattern matches in the window.
    pub log_matches: u64,
    /// Restarts in the window.
    pub restarts: u64,
    /// Nodes whose last report says running with no probe failure.
    pub healthy: u32,
}

impl GroupHealth {
    /// Probe failures ÷ probes (0 without probes).
    pub(crate) fn error_rate(&self) -> f64 {
        let total = self.successes + self.failures;
        if total == 0 {
            0.0
        } else {
            self.failures as f64 / total as f64
        }
    }
}

/// What a judgement was based on (kept in the audit log).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Figures {
    /// The canaries.
    pub canary: GroupHealth,
    /// The stable nodes of the same rollout.
    pub baseline: GroupHealth,
    /// Canaries that refused the release.
    pub nacks: u32,
}

impl std::fmt::Display for GroupHealth {
    /// "3 nodes, 12 reports, 0.5% probe errors, p99 12 ms, 0 log matches, 0 restarts, 3 healthy"
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} node(s), {} report(s), {:.1}% probe errors, p99 {:.0} ms, {} log match(es), {} restart(s), {} healthy",
            self.nodes,
            self.reports,
            self.error_rate() * 100.0,
            self.p99_ms,
            self.log_matches,
            self.restarts,
            self.healthy
        )
    }
}

impl std::fmt::Display for Figures {
    /// The figures in words, canaries then stable nodes (the audit event keeps the JSON).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "canaries: {}; stable: {}", self.canary, self.baseline)?;
        if self.nacks > 0 {
            write!(f, "; {} canary NACK(s)", self.nacks)?;
        }
        Ok(())
    }
}

/// The outcome of one measurement.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Judgement {
    /// Every check passed.
    Successful,
    /// Checks failed; the reasons name them with their numbers.
    Failed(Vec<String>),
    /// Too few reports to judge.
    Inconclusive(String),
}

/// Judges `figures` against `spec`.
pub(crate) fn judge(spec: &AnalysisSpec, f: &Figures) -> Judgement {
    let c = &f.canary;
    if c.reports < spec.min_reports.max(1) {
        return Judgement::Inconclusive(format!(
            "{} canary health report(s), {} needed",
            c.reports,
            spec.min_reports.max(1)
        ));
    }
    let mut failed = Vec::new();
    if f.nacks > 0 {
        failed.push(format!("{} canary node(s) refused the release", f.nacks));
    }
    if spec.max_error_rate > 0.0 && c.error_rate() > spec.max_error_rate {
        failed.push(format!(
            "canary error rate {:.3} > {:.3} ({} of {} probes failed)",
            c.error_rate(),
            spec.max_error_rate,
            c.failures,
            c.successes + c.failures
        ));
    }
    if spec.max_p99_latency_ms > 0.0 && c.p99_ms > spec.max_p99_latency_ms {
        failed.push(format!(
            "canary p99 {:.1} ms > {:.1} ms",
            c.p99_ms, spec.max_p99_latency_ms
        ));
    }
    if c.log_matches > spec.max_log_matches {
        failed.push(format!(
            "{} canary log-pattern match(es) > {}",
            c.log_matches, spec.max_log_matches
        ));
    }
    if spec.min_healthy_percent > 0.0 && c.nodes > 0 {
        let share = f64::from(c.healthy) * 100.0 / f64::from(c.nodes);
        if share < spec.min_healthy_percent {
            failed.push(format!(
                "{share:.0}% of canaries healthy < {:.0}% ({} of {})",
                spec.min_healthy_percent, c.healthy, c.nodes
            ));
        }
    }
    if spec.max_error_rate_vs_baseline > 0.0 && f.baseline.reports > 0 {
        let delta = c.error_rate() - f.baseline.error_rate();
        if delta > spec.max_error_rate_vs_baseline {
            failed.push(format!(
                "canary error rate {:.3} exceeds the stable nodes' {:.3} by more than {:.3}",
                c.error_rate(),
                f.baseline.error_rate(),
                spec.max_error_rate_vs_baseline
            ));
        }
    }
    if failed.is_empty() {
        Judgement::Successful
    } else {
        Judgement::Failed(failed)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn figures_read_as_words() {
        let f = Figures {
            canary: GroupHealth {
                nodes: 1,
                reports: 3,
                successes: 9,
                failures: 1,
                p99_ms: 12.4,
                log_matches: 10,
                healthy: 0,
                ..Default::default()
            },
            baseline: GroupHealth {
                nodes: 4,
                reports: 12,
                successes: 40,
                healthy: 4,
                ..Default::default()
            },
            nacks: 1,
        };
        assert_eq!(
            f.to_string(),
            "canaries: 1 node(s), 3 report(s), 10.0% probe errors, p99 12 ms, 10 log match(es), \
             0 restart(s), 0 healthy; stable: 4 node(s), 12 report(s), 0.0% probe errors, p99 0 ms, \
             0 log match(es), 0 restart(s), 4 healthy; 1 canary NACK(s)"
        );
    }

    use super::*;

    fn healthy(nodes: u32) -> GroupHealth {
        GroupHealth {
            nodes,
            reports: nodes * 10,
            successes: u64::from(nodes) * 10,
            failures: 0,
            p99_ms: 3.0,
            log_matches: 0,
            restarts: 0,
            healthy: nodes,
        }
    }

    #[test]
    fn each_check_fails_on_its_own_numbers_and_too_little_data_is_inconclusive() {
        let spec = AnalysisSpec {
            window_seconds: 10,
            max_error_rate: 0.05,
            max_p99_latency_ms: 100.0,
            max_log_matches: 0,
            min_healthy_percent: 90.0,
            max_error_rate_vs_baseline: 0.02,
            min_reports: 5,
            failure_limit: 1,
        };
        let good = Figures {
            canary: healthy(2),
            baseline: healthy(8),
            nacks: 0,
        };
        assert_eq!(judge(&spec, &good), Judgement::Successful);

        let mut f = good.clone();
        f.canary.reports = 3;
        assert!(matches!(judge(&spec, &f), Judgement::Inconclusive(_)));

        type Change = Box<dyn Fn(&mut Figures)>;
        let cases: Vec<(&str, Change)> = vec![
            ("error rate", Box::new(|f| f.canary.failures = 5)),
            ("p99", Box::new(|f| f.canary.p99_ms = 250.0)),
            ("log-pattern", Box::new(|f| f.canary.log_matches = 3)),
            ("healthy", Box::new(|f| f.canary.healthy = 1)),
            ("refused", Box::new(|f| f.nacks = 1)),
        ];
        for (what, change) in cases {
            let mut f = good.clone();
            change(&mut f);
            match judge(&spec, &f) {
                Judgement::Failed(reasons) => {
                    assert!(
                        reasons.iter().any(|r| r.contains(what)),
                        "{what}: {reasons:?}"
                    )
                }
                other => panic!("{what}: {other:?}"),
            }
        }
        // Canaries worse than the stable nodes by more than allowed, though under the
        // absolute threshold.
        let mut f = good.clone();
        f.canary.failures = 1; // 1/21 ≈ 0.048 < 0.05
        assert!(matches!(judge(&spec, &f), Judgement::Failed(r) if r[0].contains("stable")));
    }
}
