//! What the control plane records about each node, and how manual weight rules turn into
//! a node's effective weights.
//!
//! A node's desired weights are not stored: they are a function of the (durable) weight
//! rules and the node's labels. Its revision is the highest `seq` among the rules that
//! match it, or its `label_revision` if that is higher; rule seqs and label revisions come
//! from one persisted counter. So a SetWeight writes one rule however many nodes it moves,
//! and still:
//!
//! Invariant: a node's revision only ever grows, and a revision number names exactly one
//! weight map for that node, including across restarts. (Weights change only when a rule
//! that matches is added or replaced — with a new, higher seq — or when the labels change,
//! which bumps `label_revision`.)

use std::collections::BTreeMap;

pub(crate) use crate::inventory::{Inventory, ModuleRecord};
use crate::rollout::Rollout;
use crate::selector::Selector;

/// Upper bound of a weight (a percentage-like relative weight, as Envoy endpoint weights).
pub(crate) const MAX_WEIGHT: u32 = 100;

/// The weights a node should have, at a revision.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub(crate) struct DesiredWeights {
    /// Revision of this weight map for this node; 0 means nothing was ever assigned.
    pub revision: u64,
    /// module -> 0..=100.
    pub weights: BTreeMap<String, u32>,
}

/// A NACKed revision, parked until the desired state changes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct NackRecord {
    /// The refused revision.
    pub revision: u64,
    /// The edge's reason.
    pub error: String,
}

/// One node of the fleet as persisted.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct NodeRecord {
    /// The node id from its certificate.
    pub node_id: String,
    /// Selector labels: the control plane's (from enrollment or an admin; for a node
    /// with a certificate made offline, its first Hello's), never the node's own claim.
    pub labels: BTreeMap<String, String>,
    /// What its last Hello claimed, when that differs from `labels` (ignored).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub claimed_labels: BTreeMap<String, String>,
    /// How it enrolled, when its certificate came from this control plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrolled: Option<crate::enrollment::Enrolled>,
    /// CPU architecture from its last Hello.
    pub arch: String,
    /// Daemon version from its last Hello.
    pub daemon_version: String,
    /// Modules from its last Hello.
    pub modules: Vec<ModuleRecord>,
    /// Revision handed out when its labels last changed (or when it reappeared with
    /// history we cannot vouch for); 0 if never.
    pub label_revision: u64,
    /// Revoked nodes are refused and cut off.
    pub revoked: bool,
}

/// What the node told us back, persisted apart from `NodeRecord` and in batches: it
/// changes with every ACK, and losing the last second of it only costs a resend.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct NodeStatus {
    /// Last revision the node acknowledged.
    pub acked_revision: u64,
    /// Last NACK, if the node refused the current or an earlier revision.
    pub nacked: Option<NackRecord>,
    /// Unix milliseconds of the last Hello or disconnect.
    pub last_seen_ms: u64,
    /// Per module: what the node acknowledged, refused, and is receiving.
    #[serde(default)]
    pub modules: BTreeMap<String, ModuleProgress>,
    /// Per module: the runtime config revision acknowledged or refused.
    #[serde(default)]
    pub configs: BTreeMap<String, ConfigProgress>,
    /// What the node runs now.
    #[serde(default)]
    pub inventory: Inventory,
    /// Unix ms of its last health report (or Hello): updated in memory, written only
    /// with another change.
    #[serde(default)]
    pub last_heartbeat_ms: u64,
}

/// A node's answers about one module's runtime config.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ConfigProgress {
    /// Last config revision acknowledged (applied and running).
    pub acked_revision: u64,
    /// Last refusal, parked until the config changes.
    pub nacked: Option<NackRecord>,
}

/// A node's answers about one module.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ModuleProgress {
    /// Last module revision acknowledged (installed, or rolled back).
    pub acked_revision: u64,
    /// Last refusal, parked until the desired module state changes.
    pub nacked: Option<NackRecord>,
    /// Version being received, bytes so far and payload size.
    pub transfer: Option<TransferProgress>,
    /// The latest health report, as received (the rollout engine reads windows of them).
    #[serde(default)]
    pub health: Option<HealthRecord>,
}

/// One module's health over one report interval.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct HealthRecord {
    /// Unix ms when it arrived.
    pub at_ms: u64,
    /// Probes passed.
    pub probe_successes: u64,
    /// Probes failed.
    pub probe_failures: u64,
    /// Probe latency p50, ms.
    #[serde(with = "crate::finite")]
    pub latency_p50_ms: f64,
    /// Probe latency p99, ms.
    #[serde(with = "crate::finite")]
    pub latency_p99_ms: f64,
    /// "running", "starting", "backoff", "stopped".
    pub process_state: String,
    /// Restarts since the daemon started.
    pub restarts: u32,
    /// Log-pattern matches since the daemon started.
    pub log_matches: u64,
    /// Slot running.
    pub slot: String,
    /// Version running.
    pub version: String,
    /// Why the last failing probe failed.
    pub detail: String,
}

/// How far a module transfer has come.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct TransferProgress {
    /// Version being received.
    pub version: String,
    /// "full_zstd" or "bsdiff_zstd".
    pub encoding: String,
    /// Payload bytes the node holds.
    pub offset: u64,
    /// Payload size.
    pub size: u64,
}

/// A manual weight: `module` gets `weight` on the nodes `selector` matches. Later rules
/// (higher `seq`) win over earlier ones, so "drain region X" after "everyone 100" works.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct WeightRule {
    /// Order of the rule; a re-set of the same (module, selector) gets a new one.
    pub seq: u64,
    /// Module name.
    pub module: String,
    /// Which nodes.
    pub selector: Selector,
    /// 0..=100.
    pub weight: u32,
}

impl WeightRule {
    /// Rules with the same key replace each other.
    pub(crate) fn key(&self) -> String {
        format!("{}\u{0}{}", self.module, self.selector)
    }
}

/// The desired weights of `node` under `rules` (sorted by `seq`), with the canary
/// weights of the rollouts that cover it laid over them.
pub(crate) fn desired(
    rules: &[WeightRule],
    rollouts: &[Rollout],
    node: &NodeRecord,
) -> DesiredWeights {
    let newest_rule = rules
        .iter()
        .filter(|r| r.selector.matches(&node.labels))
        .map(|r| r.seq)
        .max()
        .unwrap_or(0);
    let mut revision = node.label_revision.max(newest_rule);
    let mut weights = effective_weights(rules, &node.labels);
    for d in rollouts.iter().filter(|d| d.selector.matches(&node.labels)) {
        if let Some((seq, weight)) = d.weight_for(&node.node_id) {
            revision = revision.max(seq);
            if let Some(w) = weight {
                weights.insert(d.module.clone(), w);
            }
        }
    }
    DesiredWeights { revision, weights }
}

/// The weights `rules` (sorted by `seq`) give a node with `labels`.
pub(crate) fn effective_weights(
    rules: &[WeightRule],
    labels: &BTreeMap<String, String>,
) -> BTreeMap<String, u32> {
    let mut weights = BTreeMap::new();
    for rule in rules.iter().filter(|r| r.selector.matches(labels)) {
        weights.insert(rule.module.clone(), rule.weight);
    }
    weights
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(seq: u64, module: &str, selector: &str, weight: u32) -> WeightRule {
        WeightRule {
            seq,
            module: module.into(),
            selector: Selector::parse(selector).expect("selector"),
            weight,
        }
    }

    #[test]
    fn later_rules_win_and_selectors_scope_them() {
        let rules = vec![
            rule(1, "gateway", "", 100),
            rule(2, "gateway", "region=eu", 0),
            rule(3, "cache", "tier=edge", 50),
        ];
        let eu: BTreeMap<_, _> = [("region".to_string(), "eu".to_string())].into();
        let us: BTreeMap<_, _> = [
            ("region".to_string(), "us".to_string()),
            ("tier".to_string(), "edge".to_string()),
        ]
        .into();
        assert_eq!(
            effective_weights(&rules, &eu),
            [("gateway".into(), 0)].into()
        );
        assert_eq!(
            effective_weights(&rules, &us),
            [("gateway".into(), 100), ("cache".into(), 50)].into()
        );
    }

    #[test]
    fn revisions_follow_matching_rules_and_label_changes() {
        let rules = vec![
            rule(4, "gateway", "", 100),
            rule(9, "gateway", "region=eu", 0),
        ];
        let mut node = NodeRecord {
            labels: [("region".to_string(), "us".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(
            desired(&rules, &[], &node).revision,
            4,
            "the eu rule does not touch us"
        );
        node.labels.insert("region".into(), "eu".into());
        assert_eq!(desired(&rules, &[], &node).revision, 9);
        node.label_revision = 12;
        assert_eq!(desired(&rules, &[], &node).revision, 12);
    }
}
