//! Recent health reports of one node's module, for canary analysis, and the one-word
//! health a report says.
//!
//! Only the figures analysis reads are kept, and consecutive reports share their version
//! string: a report costs some 60 bytes instead of a whole `HealthRecord` with its four
//! strings (about 4× less at 600 reports × every node). Memory only: an analysis
//! interrupted by a restart waits for fresh reports.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::node::HealthRecord;

/// Reports kept per node and module (10 minutes at one a second).
pub(crate) const HISTORY: usize = 600;

/// One report, as analysis reads it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct HealthSample {
    /// Unix ms when it arrived.
    pub at_ms: u64,
    /// Probes passed.
    pub successes: u64,
    /// Probes failed.
    pub failures: u64,
    /// Probe latency p99, ms.
    pub p99_ms: f64,
    /// Log-pattern matches since the daemon started.
    pub log_matches: u64,
    /// Restarts since the daemon started.
    pub restarts: u32,
    /// The process was running (not starting, backing off or stopped).
    pub running: bool,
    /// Version running.
    pub version: Arc<str>,
}

/// The newest `HISTORY` reports, oldest first.
#[derive(Debug, Default)]
pub(crate) struct History {
    samples: VecDeque<HealthSample>,
}

impl History {
    /// Adds a report, forgetting the oldest past `HISTORY`.
    pub(crate) fn push(&mut self, h: &HealthRecord) {
        let version = match self.samples.back() {
            Some(last) if *last.version == *h.version => last.version.clone(),
            _ => Arc::from(h.version.as_str()),
        };
        if self.samples.len() >= HISTORY {
            self.samples.pop_front();
        }
        self.samples.push_back(HealthSample {
            at_ms: h.at_ms,
            successes: h.probe_successes,
            failures: h.probe_failures,
            p99_ms: h.latency_p99_ms,
            log_matches: h.log_matches,
            restarts: h.restarts,
            running: h.process_state == "running",
            version,
        });
    }

    /// Reports oldest first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &HealthSample> {
        self.samples.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_and_shares_versions() {
        let mut h = History::default();
        for i in 0..(HISTORY as u64 + 10) {
            h.push(&HealthRecord {
                at_ms: i,
                version: if i < 20 { "1.0.0" } else { "2.0.0" }.into(),
                process_state: "running".into(),
                ..Default::default()
            });
        }
        let all: Vec<&HealthSample> = h.iter().collect();
        assert_eq!(all.len(), HISTORY);
        assert_eq!(all[0].at_ms, 10);
        assert!(all.iter().all(|s| s.running));
        assert!(Arc::ptr_eq(&all[100].version, &all[HISTORY - 1].version));
        assert_eq!(&*all[0].version, "1.0.0");
    }
}

/// A module's health in one word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Health {
    /// Running, and every probe passed.
    Healthy,
    /// Starting, or some probes failed.
    Degraded,
    /// Not running, or every probe failed.
    Failing,
    /// No recent report.
    Unknown,
}

/// A report older than this says nothing about now (reports come every second).
pub(crate) const STALE_MS: u64 = 30_000;

impl Health {
    /// The word for a module whose latest report is `h`, at `now_ms` (`None`: the node is
    /// not connected, so whatever it last said is not now).
    pub(crate) fn of(h: Option<&HealthRecord>, now_ms: Option<u64>) -> Health {
        let (Some(h), Some(now)) = (h, now_ms) else {
            return Health::Unknown;
        };
        if now.saturating_sub(h.at_ms) > STALE_MS {
            return Health::Unknown;
        }
        Health::judge(h)
    }

    /// The word a report says, however old it is.
    pub(crate) fn judge(h: &HealthRecord) -> Health {
        match h.process_state.as_str() {
            "running" if h.probe_failures == 0 => Health::Healthy,
            "running" if h.probe_successes == 0 => Health::Failing,
            "running" | "starting" => Health::Degraded,
            _ => Health::Failing,
        }
    }

    /// The word as the CLI and filters spell it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Failing => "failing",
            Health::Unknown => "unknown",
        }
    }
}

#[cfg(test)]
mod word_tests {
    use super::*;

    #[test]
    fn health_in_one_word() {
        let fresh = |process: &str, ok: u64, failed: u64| {
            let h = HealthRecord {
                at_ms: 1_000,
                process_state: process.into(),
                probe_successes: ok,
                probe_failures: failed,
                ..Default::default()
            };
            Health::of(Some(&h), Some(2_000))
        };
        assert_eq!(fresh("running", 3, 0), Health::Healthy);
        assert_eq!(
            fresh("running", 0, 0),
            Health::Healthy,
            "no probes configured"
        );
        assert_eq!(fresh("running", 2, 1), Health::Degraded);
        assert_eq!(fresh("starting", 0, 0), Health::Degraded);
        assert_eq!(fresh("running", 0, 3), Health::Failing);
        assert_eq!(fresh("backoff", 0, 0), Health::Failing);
        let h = HealthRecord {
            at_ms: 1_000,
            process_state: "running".into(),
            ..Default::default()
        };
        assert_eq!(
            Health::of(Some(&h), Some(1_000 + STALE_MS + 1)),
            Health::Unknown
        );
        assert_eq!(Health::of(Some(&h), None), Health::Unknown, "disconnected");
        assert_eq!(Health::of(None, Some(1_000)), Health::Unknown);
    }
}
