//! Weight rules and each node's desired weight map: set, recomputed, published.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use aviary_certs::Identity;
use bytes::Bytes;
use tokio::sync::broadcast;

use super::views::weights_of;
use super::{NodeWeights, Registry, State};
use crate::audit::{now_ms, NewEvent};
use crate::error::ControlPlaneError;
use crate::node::{desired, DesiredWeights, WeightRule, MAX_WEIGHT};
use crate::requests::{Answered, RequestNote};
use crate::rollout::{desired_modules, Step};
use crate::selector::Selector;
use crate::store::Change;

/// A node's desired weights, ready to send.
#[derive(Debug)]
pub(crate) struct Desired {
    /// The revision of this weight map for the node.
    pub revision: u64,
    /// `ControlMessage{weights}` without a nonce, encoded once and shared.
    pub message: Bytes,
    /// When the change was committed (for `aviary_propagation_seconds`).
    pub committed_at: Instant,
}

impl Desired {
    pub(super) fn new(
        desired: &DesiredWeights,
        ttl_seconds: u32,
        committed_at: Instant,
    ) -> Desired {
        Desired {
            revision: desired.revision,
            message: crate::wire::weights_message(desired.revision, &desired.weights, ttl_seconds),
            committed_at,
        }
    }
}

impl Registry {
    /// Sets `module`'s weight on every node `selector` matches, now and when they join.
    /// Returns the nodes matched now and the audit sequence number.
    pub(crate) async fn set_weight(
        &self,
        actor: &Identity,
        module: &str,
        weight: u32,
        selector: Selector,
        request: Option<RequestNote>,
    ) -> Result<(Vec<String>, u64), ControlPlaneError> {
        aviary_certs::validate_name("module", module).map_err(|e| ControlPlaneError::BadField {
            field: "module".into(),
            message: e.to_string(),
        })?;
        if weight > MAX_WEIGHT {
            return Err(ControlPlaneError::BadField {
                field: "weight".into(),
                message: format!("weight {weight} is out of range 0..={MAX_WEIGHT}"),
            });
        }
        let _writer = self.writer.lock().await;
        let started = Instant::now();
        let (rule, rules, changed, matched) = {
            let st = self.state();
            if let Some(owner) = st.rollouts.iter().find(|d| {
                d.module == module
                    && d.state.is_active()
                    && d.steps.iter().any(|s| matches!(s, Step::Weight(_)))
            }) {
                return Err(ControlPlaneError::Conflict {
                    reason: "ROLLOUT_OWNS_WEIGHTS",
                    message: format!(
                        "rollout {} owns the weights of {module} until it ends; abort or promote it first",
                        owner.id
                    ),
                    metadata: vec![("rollout_id", owner.id.clone()), ("module", module.to_owned())],
                });
            }
            let rule = WeightRule {
                seq: st.revision + 1,
                module: module.to_owned(),
                selector: selector.clone(),
                weight,
            };
            let mut rules = st.rules.clone();
            rules.retain(|r| r.key() != rule.key());
            rules.push(rule.clone());
            let mut changed = Vec::new();
            let mut matched = Vec::new();
            for entry in st.nodes.values() {
                if selector.matches(&entry.record.labels) {
                    matched.push(entry.record.node_id.clone());
                    // Only nodes the rule matches can change; their revision is the rule's.
                    let next = desired(&rules, &st.rollouts, &entry.record);
                    if next != entry.current {
                        changed.push((entry.record.node_id.clone(), next));
                    }
                }
            }
            matched.sort();
            (rule, rules, changed, matched)
        };
        let revision = rule.seq;
        let detail = format!(
            "weight={weight} selector={:?} matched={} changed={} revision={revision}",
            selector.to_string(),
            matched.len(),
            changed.len(),
        );
        let request = request.map(|n| {
            let node_ids = matched.clone();
            n.answered(Answered::Weight { node_ids }, now_ms())
        });
        // One rule, the counter and the audit event: the same cost for 1 node or 100,000.
        let stored = self
            .commit(Change {
                rules: vec![rule],
                request,
                revision: Some(revision),
                events: vec![NewEvent::new(
                    actor.to_string(),
                    "nodes.set_weight",
                    format!("module/{module}"),
                    detail,
                )],
                durable: true,
                ..Default::default()
            })
            .await?;

        let committed_at = Instant::now();
        let mut updates = Vec::with_capacity(changed.len());
        {
            let mut st = self.state();
            st.rules = rules;
            st.revision = revision;
            // Nodes that end up with the same map share one encoded message.
            let mut shared: HashMap<DesiredWeights, Arc<Desired>> = HashMap::new();
            for (node_id, next) in changed {
                let message = shared
                    .entry(next.clone())
                    .or_insert_with(|| {
                        Arc::new(Desired::new(&next, self.ttl_seconds, committed_at))
                    })
                    .clone();
                if let Some(entry) = st.nodes.get_mut(&node_id) {
                    entry.current = next;
                    entry.desired.send_replace(message);
                    updates.push(weights_of(entry));
                }
            }
        }
        tracing::info!(
            module,
            weight,
            revision,
            nodes = updates.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "weights committed and published"
        );
        for update in updates {
            let _ = self.weights.send(update);
        }
        Ok((matched, stored.first().map(|e| e.seq).unwrap_or(0)))
    }

    /// Every matching node's weights now.
    pub(crate) fn weights_snapshot(&self, selector: &Selector) -> Vec<NodeWeights> {
        let st = self.state();
        let mut out: Vec<_> = st
            .nodes
            .values()
            .filter(|e| selector.matches(&e.record.labels))
            .map(weights_of)
            .collect();
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        out
    }

    /// Weight changes as they happen.
    pub(crate) fn subscribe_weights(&self) -> broadcast::Receiver<NodeWeights> {
        self.weights.subscribe()
    }
}

/// Recomputes the desired modules and weights of the nodes `selector` matches and
/// publishes what changed; returns the weight updates for `WatchWeights`.
pub(super) fn republish(st: &mut State, selector: &Selector, ttl: u32) -> Vec<NodeWeights> {
    let rollouts = std::mem::take(&mut st.rollouts);
    let rules = std::mem::take(&mut st.rules);
    let now = Instant::now();
    let mut updates = Vec::new();
    for entry in st.nodes.values_mut() {
        if selector.matches(&entry.record.labels) {
            let next = desired_modules(&rollouts, &entry.record.node_id, &entry.record.labels);
            if **entry.modules.borrow() != next {
                entry.modules.send_replace(Arc::new(next));
            }
            // Canary weights ride on the same rollouts.
            let weights = desired(&rules, &rollouts, &entry.record);
            if weights != entry.current {
                entry
                    .desired
                    .send_replace(Arc::new(Desired::new(&weights, ttl, now)));
                entry.current = weights;
                updates.push(weights_of(entry));
            }
        }
    }
    st.rollouts = rollouts;
    st.rules = rules;
    updates
}
