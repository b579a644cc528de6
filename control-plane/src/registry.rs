//! The fleet registry: every node's record, desired weights and live session, in memory,
//! backed by the `Store`.
//!
//! Invariants:
//! * Mutations are serialised by `writer` and go compute → persist → publish: nothing is
//!   sent to a node, or acknowledged to an admin, before it is durable.
//! * A desired weight map is encoded once (`Desired::message`) and the same `Bytes` are
//!   shared by every stream that sends it.
//! * At most one live session per node; a newer stream supersedes the older one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use aviary_certs::Identity;
use aviary_proto::v1 as pb;
use bytes::Bytes;
use prost::Message;
use tokio::sync::{broadcast, oneshot, watch};

use crate::audit::{now_ms, timestamp, Event, EventFilter, NewEvent};
use crate::error::ControlPlaneError;
use crate::node::{
    desired, DesiredWeights, ModuleRecord, NackRecord, NodeRecord, NodeStatus, WeightRule,
    MAX_WEIGHT,
};
use crate::selector::Selector;
use crate::store::{Change, Store};

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
    fn new(desired: &DesiredWeights, ttl_seconds: u32, committed_at: Instant) -> Desired {
        let message = pb::ControlMessage {
            nonce: String::new(),
            kind: Some(pb::control_message::Kind::Weights(pb::WeightAssignment {
                revision: desired.revision,
                weights: desired
                    .weights
                    .iter()
                    .map(|(k, v)| (k.clone(), *v))
                    .collect(),
                ttl_seconds,
            })),
        }
        .encode_to_vec();
        Desired {
            revision: desired.revision,
            message: Bytes::from(message),
            committed_at,
        }
    }
}

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
    /// The weights revision the node says it has applied.
    pub applied_weights: u64,
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
    /// The revision the node NACKed last, parked until the desired state moves on.
    pub parked: Option<u64>,
}

struct Session {
    id: u64,
    cut: oneshot::Sender<tonic::Status>,
}

struct Entry {
    record: NodeRecord,
    status: NodeStatus,
    /// `node::desired(rules, record)`, kept current by every mutation.
    current: DesiredWeights,
    desired: watch::Sender<Arc<Desired>>,
    session: Option<Session>,
}

struct State {
    nodes: HashMap<String, Entry>,
    rules: Vec<WeightRule>,
    revision: u64,
    dirty: HashSet<String>,
}

/// The fleet registry (see the module docs).
pub(crate) struct Registry {
    store: Arc<dyn Store>,
    state: Mutex<State>,
    writer: tokio::sync::Mutex<()>,
    events: broadcast::Sender<Event>,
    weights: broadcast::Sender<pb::NodeWeights>,
    ttl_seconds: u32,
    next_session: AtomicU64,
}

impl Registry {
    /// Loads the registry from `store`; `ttl_seconds` goes into every weight assignment.
    pub(crate) async fn open(
        store: Arc<dyn Store>,
        ttl_seconds: u32,
    ) -> Result<Registry, ControlPlaneError> {
        let loader = store.clone();
        let snap = tokio::task::spawn_blocking(move || loader.load())
            .await
            .map_err(|e| ControlPlaneError::Unavailable(format!("store load task: {e}")))??;
        let now = Instant::now();
        let mut statuses: HashMap<String, NodeStatus> = snap.statuses.into_iter().collect();
        let mut shared = HashMap::new();
        let nodes = snap
            .nodes
            .into_iter()
            .map(|record| {
                let current = desired(&snap.rules, &record);
                let message = shared
                    .entry(current.clone())
                    .or_insert_with(|| Arc::new(Desired::new(&current, ttl_seconds, now)))
                    .clone();
                let status = statuses.remove(&record.node_id).unwrap_or_default();
                let entry = Entry {
                    status,
                    current,
                    desired: watch::Sender::new(message),
                    session: None,
                    record,
                };
                (entry.record.node_id.clone(), entry)
            })
            .collect();
        Ok(Registry {
            store,
            state: Mutex::new(State {
                nodes,
                rules: snap.rules,
                revision: snap.revision,
                dirty: HashSet::new(),
            }),
            writer: tokio::sync::Mutex::new(()),
            events: broadcast::channel(1024).0,
            weights: broadcast::channel(4096).0,
            ttl_seconds,
            next_session: AtomicU64::new(1),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `change` atomically in the store and publishes its audit events.
    pub(crate) async fn commit(&self, change: Change) -> Result<Vec<Event>, ControlPlaneError> {
        let store = self.store.clone();
        let stored = tokio::task::spawn_blocking(move || store.commit(change))
            .await
            .map_err(|e| ControlPlaneError::Unavailable(format!("store task: {e}")))??;
        for event in &stored {
            let _ = self.events.send(event.clone());
        }
        Ok(stored)
    }

    /// Records an audit event; `durable` flushes before returning.
    pub(crate) async fn audit(
        &self,
        event: NewEvent,
        durable: bool,
    ) -> Result<u64, ControlPlaneError> {
        let stored = self
            .commit(Change {
                events: vec![event],
                durable,
                ..Default::default()
            })
            .await?;
        Ok(stored.first().map(|e| e.seq).unwrap_or(0))
    }

    /// True when `node_id` is revoked.
    pub(crate) fn is_revoked(&self, node_id: &str) -> bool {
        self.state()
            .nodes
            .get(node_id)
            .is_some_and(|e| e.record.revoked)
    }

    /// Registers a node's stream after its Hello; supersedes an older stream of the node.
    pub(crate) async fn attach(
        &self,
        node_id: &str,
        hello: HelloInfo,
    ) -> Result<Attachment, ControlPlaneError> {
        let _writer = self.writer.lock().await;
        let (record, is_new, new_revision) = {
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
            let labels_changed = existing.is_some() && record.labels != hello.labels;
            record.labels = hello.labels;
            record.arch = hello.arch;
            record.daemon_version = hello.daemon_version;
            record.modules = hello.modules;
            // A node we do not know that has applied a revision at or above what we would
            // send has a history we cannot vouch for (e.g. its registration was lost in a
            // crash): give it a fresh revision rather than reuse a number for another map.
            let unknown_history = existing.is_none()
                && hello.applied_weights > 0
                && hello.applied_weights >= desired(&st.rules, &record).revision;
            let mut new_revision = None;
            if labels_changed || unknown_history {
                let revision = st.revision + 1;
                record.label_revision = revision;
                new_revision = Some(revision);
            }
            let changed = existing.is_none() || record != before;
            (changed.then_some(record), existing.is_none(), new_revision)
        };
        if let Some(record) = &record {
            let events = if is_new {
                vec![NewEvent::new(
                    format!("edge/{node_id}"),
                    "node.registered",
                    format!("node/{node_id}"),
                    format!("labels {:?}", record.labels),
                )]
            } else {
                Vec::new()
            };
            // A new revision must be durable before it is sent: a revision number names
            // exactly one weight map, even across a crash. Other registration details
            // (arch, modules) ride on sled's background flush.
            self.commit(Change {
                nodes: vec![record.clone()],
                revision: new_revision,
                events,
                durable: new_revision.is_some(),
                ..Default::default()
            })
            .await?;
        }

        let session_id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (cut_tx, cut_rx) = oneshot::channel();
        let mut st = self.state();
        if let Some(rev) = new_revision {
            st.revision = st.revision.max(rev);
        }
        let ttl = self.ttl_seconds;
        let rules = std::mem::take(&mut st.rules);
        let entry = st.nodes.entry(node_id.to_owned()).or_insert_with(|| Entry {
            record: NodeRecord::default(),
            status: NodeStatus::default(),
            current: DesiredWeights::default(),
            desired: watch::Sender::new(Arc::new(Desired::new(
                &DesiredWeights::default(),
                ttl,
                Instant::now(),
            ))),
            session: None,
        });
        if let Some(record) = record {
            let current = desired(&rules, &record);
            if entry.current != current {
                entry
                    .desired
                    .send_replace(Arc::new(Desired::new(&current, ttl, Instant::now())));
                entry.current = current;
            }
            entry.record = record;
        }
        if let Some(old) = entry.session.replace(Session {
            id: session_id,
            cut: cut_tx,
        }) {
            let _ = old.cut.send(tonic::Status::aborted(
                "superseded by a newer stream from the same node",
            ));
        }
        entry.status.last_seen_ms = now_ms();
        let attachment = Attachment {
            session_id,
            desired: entry.desired.subscribe(),
            cut: cut_rx,
            parked: entry.status.nacked.as_ref().map(|n| n.revision),
        };
        let update = weights_update(entry);
        st.rules = rules;
        st.dirty.insert(node_id.to_owned());
        metrics::gauge!("aviary_connected_nodes").increment(1.0);
        drop(st);
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
        let update = weights_update(entry);
        st.dirty.insert(node_id.to_owned());
        metrics::gauge!("aviary_connected_nodes").decrement(1.0);
        drop(st);
        let _ = self.weights.send(update);
    }

    /// Records that `node_id` applied `revision`.
    pub(crate) fn record_ack(&self, node_id: &str, revision: u64) {
        let mut st = self.state();
        if let Some(entry) = st.nodes.get_mut(node_id) {
            entry.status.acked_revision = entry.status.acked_revision.max(revision);
            st.dirty.insert(node_id.to_owned());
        }
    }

    /// Records that `node_id` refused `revision`; it stays parked until the state moves on.
    pub(crate) fn record_nack(&self, node_id: &str, revision: u64, error: &str) {
        let mut st = self.state();
        if let Some(entry) = st.nodes.get_mut(node_id) {
            entry.status.nacked = Some(NackRecord {
                revision,
                error: error.to_owned(),
            });
            st.dirty.insert(node_id.to_owned());
        }
    }

    /// Writes statuses changed since the last call (ACKs, NACKs, last seen) in one batch.
    pub(crate) async fn flush_statuses(&self) -> Result<(), ControlPlaneError> {
        let rows: Vec<(String, NodeStatus)> = {
            let mut st = self.state();
            let dirty = std::mem::take(&mut st.dirty);
            dirty
                .into_iter()
                .filter_map(|id| {
                    let status = st.nodes.get(&id)?.status.clone();
                    Some((id, status))
                })
                .collect()
        };
        if rows.is_empty() {
            return Ok(());
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.save_statuses(&rows))
            .await
            .map_err(|e| ControlPlaneError::Unavailable(format!("store task: {e}")))??;
        Ok(())
    }

    /// Sets `module`'s weight on every node `selector` matches, now and when they join.
    /// Returns the nodes matched now and the audit sequence number.
    pub(crate) async fn set_weight(
        &self,
        actor: &Identity,
        module: &str,
        weight: u32,
        selector: Selector,
    ) -> Result<(Vec<String>, u64), ControlPlaneError> {
        aviary_certs::validate_name("module", module)
            .map_err(|e| ControlPlaneError::InvalidArgument(e.to_string()))?;
        if weight > MAX_WEIGHT {
            return Err(ControlPlaneError::InvalidArgument(format!(
                "weight {weight} is out of range 0..={MAX_WEIGHT}"
            )));
        }
        let _writer = self.writer.lock().await;
        let started = Instant::now();
        let (rule, rules, changed, matched) = {
            let st = self.state();
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
                    let next = desired(&rules, &entry.record);
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
        // One rule, the counter and the audit event: the same cost for 1 node or 100,000.
        let stored = self
            .commit(Change {
                rules: vec![rule],
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
                    updates.push(weights_update(entry));
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

    /// Revokes `node_id`: refused from now on, its live stream cut. Returns whether a
    /// stream was cut.
    pub(crate) async fn revoke(
        &self,
        actor: &Identity,
        node_id: &str,
        reason: &str,
    ) -> Result<bool, ControlPlaneError> {
        let _writer = self.writer.lock().await;
        let record = {
            let st = self.state();
            let entry = st
                .nodes
                .get(node_id)
                .ok_or_else(|| ControlPlaneError::NotFound(format!("node {node_id}")))?;
            let mut record = entry.record.clone();
            record.revoked = true;
            record
        };
        self.commit(Change {
            nodes: vec![record],
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

    /// Nodes matching `selector`, sorted by id.
    pub(crate) fn list(&self, selector: &Selector) -> Vec<pb::Node> {
        let st = self.state();
        let mut nodes: Vec<pb::Node> = st
            .nodes
            .values()
            .filter(|e| selector.matches(&e.record.labels))
            .map(node_view)
            .collect();
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        nodes
    }

    /// One node.
    pub(crate) fn get(&self, node_id: &str) -> Result<pb::Node, ControlPlaneError> {
        self.state()
            .nodes
            .get(node_id)
            .map(node_view)
            .ok_or_else(|| ControlPlaneError::NotFound(format!("node {node_id}")))
    }

    /// Every matching node's weights now.
    pub(crate) fn weights_snapshot(&self, selector: &Selector) -> Vec<pb::NodeWeights> {
        let st = self.state();
        let mut out: Vec<_> = st
            .nodes
            .values()
            .filter(|e| selector.matches(&e.record.labels))
            .map(weights_update)
            .collect();
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        out
    }

    /// Labels of `node_id` (for filtering weight updates).
    pub(crate) fn labels(&self, node_id: &str) -> Option<BTreeMap<String, String>> {
        self.state()
            .nodes
            .get(node_id)
            .map(|e| e.record.labels.clone())
    }

    /// Weight changes as they happen.
    pub(crate) fn subscribe_weights(&self) -> broadcast::Receiver<pb::NodeWeights> {
        self.weights.subscribe()
    }

    /// Audit events as they are stored.
    pub(crate) fn subscribe_events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Stored audit events after `after_seq` matching `filter`.
    pub(crate) async fn events(
        &self,
        after_seq: u64,
        filter: EventFilter,
        limit: usize,
    ) -> Result<Vec<Event>, ControlPlaneError> {
        let store = self.store.clone();
        Ok(
            tokio::task::spawn_blocking(move || store.events(after_seq, &filter, limit))
                .await
                .map_err(|e| ControlPlaneError::Unavailable(format!("store task: {e}")))??,
        )
    }
}

fn weights_update(entry: &Entry) -> pb::NodeWeights {
    pb::NodeWeights {
        node_id: entry.record.node_id.clone(),
        revision: entry.current.revision,
        weights: entry
            .current
            .weights
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        connected: entry.session.is_some(),
    }
}

fn node_view(entry: &Entry) -> pb::Node {
    let r = &entry.record;
    pb::Node {
        node_id: r.node_id.clone(),
        labels: r
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        connected: entry.session.is_some(),
        modules: r
            .modules
            .iter()
            .map(|m| pb::ModuleStatus {
                name: m.name.clone(),
                version: m.version.clone(),
                sha256: m.sha256.clone(),
                state: m.state,
                slot: m.slot.clone(),
            })
            .collect(),
        weights: entry
            .current
            .weights
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        arch: r.arch.clone(),
        daemon_version: r.daemon_version.clone(),
        desired_revision: entry.current.revision,
        acked_revision: entry.status.acked_revision,
        nacked_revision: entry.status.nacked.as_ref().map_or(0, |n| n.revision),
        nack_error: entry
            .status
            .nacked
            .as_ref()
            .map(|n| n.error.clone())
            .unwrap_or_default(),
        last_seen: (entry.status.last_seen_ms > 0).then(|| timestamp(entry.status.last_seen_ms)),
        revoked: r.revoked,
    }
}
