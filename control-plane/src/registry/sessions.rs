//! Live sessions: a node's stream attaching after its Hello, detaching, being superseded
//! or cut by a revocation.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use aviary_certs::Identity;
use aviary_proto::resource::Resource;
use tokio::sync::{oneshot, watch};

use super::views::weights_of;
use super::{Desired, Entry, Registry, Session};
use crate::audit::{now_ms, NewEvent};
use crate::auth::Revocations;
use crate::error::ControlPlaneError;
use crate::layers::{desired_configs, DesiredConfigs, Encoded};
use crate::node::{desired, DesiredWeights, ModuleRecord, NodeRecord, NodeStatus};
use crate::requests::{Answered, RequestNote};
use crate::rollout::{desired_modules, DesiredModules};
use crate::store::Change;

/// What a Hello tells the registry.
#[derive(Clone, Debug, Default)]
pub(crate) struct HelloInfo {
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// CPU architecture.
    pub arch: String,
    /// Daemon version.
    pub daemon_version: String,
    /// Installed modules.
    pub modules: Vec<ModuleRecord>,
    /// The revision of each resource the node says it has applied (its state dir is the
    /// truth: an ACK whose status flush a crash lost is recovered from here).
    pub applied: BTreeMap<Resource, u64>,
}

/// A session's link to the registry, returned by `attach`.
#[derive(Debug)]
pub(crate) struct Attachment {
    /// Identifies the session for `detach`.
    pub session_id: u64,
    /// The node's desired weights; changes when an admin changes them.
    pub desired: watch::Receiver<Arc<Desired>>,
    /// Fires (or is dropped) when the session must end: revoked or superseded.
    pub cut: oneshot::Receiver<tonic::Status>,
    /// Per resource, the revision the node NACKed last: parked until the desired state
    /// of the resource moves on.
    pub parked: BTreeMap<Resource, u64>,
    /// The node's desired modules; changes with rollouts and aborts.
    pub modules: watch::Receiver<Arc<DesiredModules>>,
    /// The node's merged runtime configs; change with the config layers.
    pub configs: watch::Receiver<Arc<DesiredConfigs>>,
}

impl Registry {
    /// Registers a node's stream after its Hello; supersedes an older stream of the node.
    pub(crate) async fn attach(
        &self,
        node_id: &str,
        hello: HelloInfo,
    ) -> Result<Attachment, ControlPlaneError> {
        let _writer = self.writer.lock().await;
        let applied = hello.applied.clone();
        let applied_weights = applied.get(&Resource::Weights).copied().unwrap_or(0);
        let (record, is_new, new_revision, claim_changed) = {
            let st = self.state();
            let existing = st.nodes.get(node_id);
            if existing.is_some_and(|e| e.record.revoked) {
                return Err(ControlPlaneError::PermissionDenied(format!(
                    "node {node_id} is revoked"
                )));
            }
            let mut record = existing
                .map(|e| e.record.clone())
                .unwrap_or_else(|| NodeRecord {
                    node_id: node_id.to_owned(),
                    ..Default::default()
                });
            let before = record.clone();
            // Labels are the control plane's. Only a node nobody registered (a
            // certificate made offline by `aviary-certs edge`, whose maker vouched for
            // it) is taken with its first Hello's; after that a Hello's labels are a
            // claim, recorded and reported, never applied.
            if existing.is_none() {
                record.labels = hello.labels;
            } else if record.labels == hello.labels {
                record.claimed_labels.clear();
            } else {
                record.claimed_labels = hello.labels;
            }
            let claim_changed =
                record.claimed_labels != before.claimed_labels && !record.claimed_labels.is_empty();
            record.arch = hello.arch;
            record.daemon_version = hello.daemon_version;
            record.modules = hello.modules;
            // A node we do not know that has applied a revision at or above what we would
            // send, or a known one that has applied more than we ever sent it, has a
            // history we cannot vouch for (its registration was lost in a crash, or the
            // store was restored from a backup): give it a fresh revision above anything it
            // has seen rather than reuse a number for another map, or send one it refuses
            // as older.
            let would_send = desired(&st.rules, &st.rollouts, &record).revision;
            let unknown_history = applied_weights > 0
                && if existing.is_none() {
                    applied_weights >= would_send
                } else {
                    applied_weights > would_send
                };
            let mut new_revision = None;
            if unknown_history {
                let revision = st.revision.max(applied_weights) + 1;
                record.label_revision = revision;
                new_revision = Some(revision);
            }
            let changed = existing.is_none() || record != before;
            (
                changed.then_some(record),
                existing.is_none(),
                new_revision,
                claim_changed,
            )
        };
        if let Some(record) = &record {
            let mut events = Vec::new();
            if is_new {
                events.push(NewEvent::new(
                    format!("edge/{node_id}"),
                    "node.registered",
                    format!("node/{node_id}"),
                    format!("labels {:?}", record.labels),
                ));
            }
            if claim_changed {
                events.push(NewEvent::new(
                    format!("edge/{node_id}"),
                    "node.label_claim_ignored",
                    format!("node/{node_id}"),
                    format!(
                        "Hello claims labels {:?}; the node's labels stay {:?}",
                        record.claimed_labels, record.labels
                    ),
                ));
            }
            // A new revision must be durable before it is sent: a revision number names
            // exactly one weight map, even across a crash. Other registration details
            // (arch, modules) ride on sled's background flush.
            self.commit(Change {
                nodes: vec![record.clone()],
                revision: new_revision,
                durable: new_revision.is_some(),
                events,
                ..Default::default()
            })
            .await?;
        }

        let session_id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (cut_tx, cut_rx) = oneshot::channel();
        let mut guard = self.state();
        let st = &mut *guard;
        if let Some(rev) = new_revision {
            st.revision = st.revision.max(rev);
        }
        let ttl = self.ttl_seconds;
        if let Some(record) = record {
            st.nodes
                .entry(node_id.to_owned())
                .or_insert_with(|| Entry::new(ttl))
                .record = record;
        }
        let entry = st
            .nodes
            .entry(node_id.to_owned())
            .or_insert_with(|| Entry::new(ttl));
        refresh(entry, &st.rules, &st.rollouts, &st.configs, ttl);
        if let Some(old) = entry.session.replace(Session {
            id: session_id,
            cut: cut_tx,
        }) {
            let _ = old.cut.send(tonic::Status::aborted(
                "superseded by a newer stream from the same node",
            ));
        }
        let now = now_ms();
        entry.status.last_seen_ms = now;
        entry.status.last_heartbeat_ms = now;
        entry.status.inventory.hello(&entry.record.modules, now);
        for (resource, revision) in &applied {
            let acked = match resource {
                Resource::Module(m) => {
                    &mut entry
                        .status
                        .modules
                        .entry(m.clone())
                        .or_default()
                        .acked_revision
                }
                Resource::Config(m) => {
                    &mut entry
                        .status
                        .configs
                        .entry(m.clone())
                        .or_default()
                        .acked_revision
                }
                // Only a revision this node was ever meant to have (see above).
                Resource::Weights => continue,
            };
            *acked = (*acked).max(*revision);
        }
        if applied_weights <= entry.current.revision {
            entry.status.acked_revision = entry.status.acked_revision.max(applied_weights);
        }
        let attachment = Attachment {
            session_id,
            desired: entry.desired.subscribe(),
            cut: cut_rx,
            parked: parked(&entry.status),
            modules: entry.modules.subscribe(),
            configs: entry.configs.subscribe(),
        };
        let update = weights_of(entry);
        st.dirty.insert(node_id.to_owned());
        metrics::gauge!("aviary_connected_nodes").increment(1.0);
        drop(guard);
        let _ = self.weights.send(update);
        Ok(attachment)
    }

    /// Ends a session (if it is still the node's current one).
    pub(crate) fn detach(&self, node_id: &str, session_id: u64) {
        let mut st = self.state();
        let Some(entry) = st.nodes.get_mut(node_id) else {
            return;
        };
        if entry.session.as_ref().is_some_and(|s| s.id == session_id) {
            entry.session = None;
        }
        entry.status.last_seen_ms = now_ms();
        let update = weights_of(entry);
        st.dirty.insert(node_id.to_owned());
        metrics::gauge!("aviary_connected_nodes").decrement(1.0);
        drop(st);
        let _ = self.weights.send(update);
    }

    /// Revokes `node_id`: refused from now on, its live stream cut. Returns whether a
    /// stream was cut.
    pub(crate) async fn revoke(
        &self,
        actor: &Identity,
        node_id: &str,
        reason: &str,
        request: Option<RequestNote>,
    ) -> Result<bool, ControlPlaneError> {
        let _writer = self.writer.lock().await;
        let (record, connected) = {
            let st = self.state();
            let entry = st
                .nodes
                .get(node_id)
                .ok_or_else(|| ControlPlaneError::NotFound(format!("node {node_id}")))?;
            let mut record = entry.record.clone();
            record.revoked = true;
            (record, entry.session.is_some())
        };
        let answered = Answered::Revoked {
            disconnected: connected,
        };
        self.commit(Change {
            nodes: vec![record],
            request: request.map(|n| n.answered(answered, now_ms())),
            events: vec![NewEvent::new(
                actor.to_string(),
                "nodes.revoke",
                format!("node/{node_id}"),
                reason.to_owned(),
            )],
            durable: true,
            ..Default::default()
        })
        .await?;
        let mut st = self.state();
        let Some(entry) = st.nodes.get_mut(node_id) else {
            return Ok(false);
        };
        entry.record.revoked = true;
        Ok(match entry.session.take() {
            Some(session) => {
                let _ = session.cut.send(tonic::Status::permission_denied(format!(
                    "node {node_id} was revoked"
                )));
                true
            }
            None => false,
        })
    }

    /// Labels of `node_id` (for filtering weight updates).
    pub(crate) fn labels(&self, node_id: &str) -> Option<BTreeMap<String, String>> {
        self.state()
            .nodes
            .get(node_id)
            .map(|e| e.record.labels.clone())
    }
}

impl Revocations for Registry {
    /// True when `node_id` is revoked.
    fn is_revoked(&self, node_id: &str) -> bool {
        self.state()
            .nodes
            .get(node_id)
            .is_some_and(|e| e.record.revoked)
    }
}

impl Entry {
    /// A node the registry has no record of yet.
    pub(super) fn new(ttl: u32) -> Entry {
        Entry {
            record: NodeRecord::default(),
            status: NodeStatus::default(),
            current: DesiredWeights::default(),
            desired: watch::Sender::new(Arc::new(Desired::new(
                &DesiredWeights::default(),
                ttl,
                Instant::now(),
            ))),
            modules: watch::Sender::new(Arc::new(DesiredModules::new())),
            configs: watch::Sender::new(Arc::new(DesiredConfigs::new())),
            history: HashMap::new(),
            session: None,
        }
    }
}

/// Recomputes what `entry` should have from its record (after its labels or the node
/// itself changed) and publishes what moved to its session.
pub(super) fn refresh(
    entry: &mut Entry,
    rules: &[crate::node::WeightRule],
    rollouts: &[crate::rollout::Rollout],
    configs: &[crate::layers::ConfigLayer],
    ttl: u32,
) {
    let current = desired(rules, rollouts, &entry.record);
    if entry.current != current {
        entry
            .desired
            .send_replace(Arc::new(Desired::new(&current, ttl, Instant::now())));
        entry.current = current;
    }
    let modules = desired_modules(rollouts, &entry.record.node_id, &entry.record.labels);
    if **entry.modules.borrow() != modules {
        entry.modules.send_replace(Arc::new(modules));
    }
    let configs = desired_configs(configs, &entry.record, &mut Encoded::default());
    if **entry.configs.borrow() != configs {
        entry.configs.send_replace(Arc::new(configs));
    }
}

/// Per resource, the revision `status` says the node refused last.
fn parked(status: &NodeStatus) -> BTreeMap<Resource, u64> {
    let weights = status
        .nacked
        .as_ref()
        .map(|n| (Resource::Weights, n.revision));
    let modules = status
        .modules
        .iter()
        .filter_map(|(m, p)| Some((Resource::Module(m.clone()), p.nacked.as_ref()?.revision)));
    let configs = status
        .configs
        .iter()
        .filter_map(|(m, p)| Some((Resource::Config(m.clone()), p.nacked.as_ref()?.revision)));
    weights.into_iter().chain(modules).chain(configs).collect()
}
