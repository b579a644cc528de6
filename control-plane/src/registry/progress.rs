//! The fleet counted for a rollout: node counts, completion, canary cutoffs and the
//! health figures analysis judges.

use super::{Registry, State, SKIPPED};
use crate::analysis::Figures;
use crate::error::ControlPlaneError;
use crate::health::HealthSample;
use crate::node::HealthRecord;
use crate::rollout::RolloutProgress;
use crate::rollout::{Rollout, RolloutState};

impl Registry {
    /// The canary bucket bound for `percent` of the nodes `d` selects now.
    pub(crate) fn canary_cutoff(&self, d: &Rollout, percent: u32) -> u32 {
        let st = self.state();
        let buckets = st
            .nodes
            .values()
            .filter(|e| !e.record.revoked && d.selector.matches(&e.record.labels))
            .map(|e| crate::rollout::canary_bucket(&d.id, &e.record.node_id))
            .collect();
        let floor = d.scale.last().map_or(0, |s| s.cutoff);
        crate::rollout::cutoff_for(percent, buckets, floor)
    }

    /// Canary and stable health of rollout `d` since `since_ms` (for analysis).
    pub(crate) fn figures(&self, d: &Rollout, since_ms: u64) -> Figures {
        let st = self.state();
        let mut f = Figures::default();
        for entry in st.nodes.values() {
            if entry.record.revoked || !d.selector.matches(&entry.record.labels) {
                continue;
            }
            let canary = d.covers(&entry.record.node_id).is_some();
            if canary {
                let nacked = entry
                    .status
                    .modules
                    .get(&d.module)
                    .and_then(|p| p.nacked.as_ref())
                    .is_some_and(|n| n.revision >= d.seq && !n.error.starts_with(SKIPPED));
                if nacked {
                    f.nacks += 1;
                }
            }
            let group = if canary {
                &mut f.canary
            } else {
                &mut f.baseline
            };
            group.nodes += 1;
            let Some(history) = entry.history.get(&d.module) else {
                continue;
            };
            // Canaries count once they run the new version; stable nodes while they don't.
            let window: Vec<&HealthSample> = history
                .iter()
                .filter(|h| h.at_ms >= since_ms && (*h.version == *d.version) == canary)
                .collect();
            let mut previous: Option<&HealthSample> = None;
            for h in &window {
                group.reports += 1;
                group.successes += h.successes;
                group.failures += h.failures;
                group.p99_ms = group.p99_ms.max(h.p99_ms);
                // Totals since the daemon started: count increases (a restart resets them).
                if let Some(p) = previous {
                    group.log_matches += h.log_matches.saturating_sub(p.log_matches);
                    group.restarts += u64::from(h.restarts.saturating_sub(p.restarts));
                }
                previous = Some(h);
            }
            if window.last().is_some_and(|h| h.running && h.failures == 0) {
                group.healthy += 1;
            }
        }
        f
    }

    /// Progressing rollouts with their node counts (the engine's tick: finished ones are
    /// not counted).
    pub(crate) fn progressing(&self) -> Vec<(Rollout, RolloutProgress)> {
        let st = self.state();
        st.rollouts
            .iter()
            .filter(|d| d.state == RolloutState::Progressing)
            .map(|d| (d.clone(), progress(&st, d)))
            .collect()
    }

    /// At most `limit` rollouts (of `module`, or all), newest first, older than revision
    /// `before` if given, with their node counts (a page of `ListRollouts`: only those
    /// are counted, each count walks the fleet).
    pub(crate) fn rollouts(
        &self,
        module: Option<&str>,
        before: Option<u64>,
        limit: usize,
    ) -> Vec<(Rollout, RolloutProgress)> {
        let st = self.state();
        st.rollouts
            .iter()
            .rev()
            .filter(|d| module.is_none_or(|m| m == d.module))
            .filter(|d| before.is_none_or(|b| d.seq < b))
            .take(limit)
            .map(|d| (d.clone(), progress(&st, d)))
            .collect()
    }

    /// One rollout with its node counts.
    pub(crate) fn rollout(
        &self,
        id: &str,
    ) -> Result<(Rollout, RolloutProgress), ControlPlaneError> {
        let st = self.state();
        st.rollouts
            .iter()
            .find(|d| d.id == id)
            .map(|d| (d.clone(), progress(&st, d)))
            .ok_or_else(|| ControlPlaneError::NotFound(format!("rollout {id}")))
    }
}

/// Node counts of `d` from the nodes' answers.
/// Its latest report says the node runs `version`, and every probe of it passed.
fn healthy(h: &HealthRecord, version: &str) -> bool {
    h.version == version && h.process_state == "running" && h.probe_failures == 0
}

pub(super) fn progress(st: &State, d: &Rollout) -> RolloutProgress {
    let mut p = RolloutProgress::default();
    for entry in st.nodes.values() {
        if entry.record.revoked || !d.selector.matches(&entry.record.labels) {
            continue;
        }
        p.selected += 1;
        if d.covers(&entry.record.node_id).is_none() {
            continue;
        }
        p.canaries += 1;
        if entry.session.is_some() {
            p.connected_canaries += 1;
        }
        // Only answers to this rollout's desire count for it.
        let wanted = entry
            .modules
            .borrow()
            .get(&d.module)
            .filter(|m| m.rollout == d.id)
            .map(|m| m.revision);
        let Some(wanted) = wanted else { continue };
        let answers = entry.status.modules.get(&d.module);
        if answers.is_some_and(|a| a.acked_revision >= wanted) {
            p.installed += 1;
            if answers
                .and_then(|a| a.health.as_ref())
                .is_some_and(|h| healthy(h, &d.version))
            {
                p.healthy += 1;
            }
        } else if let Some(n) = answers
            .and_then(|a| a.nacked.as_ref())
            .filter(|n| n.revision == wanted)
        {
            if n.error.starts_with(SKIPPED) {
                p.skipped += 1;
            } else {
                p.failed += 1;
            }
        }
    }
    p
}

/// The rollout of `module` in progress, if every node it selects has answered for it.
pub(super) fn completed(st: &State, module: &str) -> Option<Rollout> {
    let d = st
        .rollouts
        .iter()
        .find(|d| d.module == module && d.state == RolloutState::Progressing)?;
    // Canary steps still to go: not finished, whatever the nodes say.
    if (d.current_step as usize) < d.steps.len() || d.percent() < 100 {
        return None;
    }
    let p = progress(st, d);
    (p.selected > 0 && p.installed + p.skipped + p.failed == p.selected).then(|| d.clone())
}
