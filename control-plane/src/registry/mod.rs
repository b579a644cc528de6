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

use crate::analysis::Figures;
use crate::audit::{now_ms, timestamp, Event, EventFilter, NewEvent};
use crate::deploy::{
    desired_modules, DeployState, Deployment, DesiredModules, ScaleChange, Step, WeightChange,
};
use crate::error::ControlPlaneError;
use crate::health::{HealthSample, History};
use crate::layers::{desired_configs, ConfigLayer, DesiredConfigs, Encoded};
use crate::node::{
    desired, DesiredWeights, HealthRecord, ModuleRecord, NackRecord, NodeRecord, NodeStatus,
    TransferProgress, WeightRule, MAX_WEIGHT,
};
use crate::selector::Selector;
use crate::store::{Change, Quarantined, Store};

mod configs;
use configs::node_config;

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
    /// Module revisions the node says it has applied (its state dir is the truth: an ACK
    /// whose status flush a crash lost is recovered from here).
    pub applied_modules: BTreeMap<String, u64>,
    /// Config revisions the node says it has applied, per module.
    pub applied_configs: BTreeMap<String, u64>,
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
    /// The node's desired modules; changes with deployments and aborts.
    pub modules: watch::Receiver<Arc<DesiredModules>>,
    /// Per module, the revision the node NACKed last (parked likewise).
    pub modules_parked: BTreeMap<String, u64>,
    /// The node's merged runtime configs; change with the config layers.
    pub configs: watch::Receiver<Arc<DesiredConfigs>>,
    /// Per module, the config revision the node NACKed last (parked likewise).
    pub configs_parked: BTreeMap<String, u64>,
}

/// What `create_deployment` is asked for.
#[derive(Clone, Debug)]
pub(crate) struct NewDeployment {
    /// Module.
    pub module: String,
    /// Release version (uploaded).
    pub version: String,
    /// Which nodes.
    pub selector: Selector,
    /// Canary steps; none = everywhere at once.
    pub steps: Vec<Step>,
    /// Seconds a step may wait on nodes (0 = forever).
    pub progress_deadline_seconds: u32,
}

/// Node counts of a deployment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct DeployProgress {
    /// Nodes the selector matches.
    pub selected: u32,
    /// Of those, the nodes the canary scale covers so far.
    pub canaries: u32,
    /// Canaries with a live stream (a step waits only for these; the others catch up).
    pub connected_canaries: u32,
    /// Nodes that acknowledged this deployment's revision.
    pub installed: u32,
    /// Nodes that refused it.
    pub failed: u32,
    /// Nodes with no artifact for their architecture.
    pub skipped: u32,
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
    /// `deploy::desired_modules(deployments, labels)`, kept current likewise.
    modules: watch::Sender<Arc<DesiredModules>>,
    /// `layers::desired_configs(configs, record)`, kept current likewise.
    configs: watch::Sender<Arc<DesiredConfigs>>,
    /// Recent health reports per module (memory only), for rollout analysis.
    history: HashMap<String, History>,
    session: Option<Session>,
}

/// Prefix of the NACK record of a node whose architecture has no artifact.
pub(crate) const SKIPPED: &str = "skipped: ";

struct State {
    nodes: HashMap<String, Entry>,
    rules: Vec<WeightRule>,
    deployments: Vec<Deployment>,
    /// Config layers in merge order (tombstones included).
    configs: Vec<ConfigLayer>,
    revision: u64,
    dirty: HashSet<String>,
    /// Nodes whose only change is a health report: written at the slower health cadence
    /// (a fleet reports every second; writing every node's status that often was most of
    /// the store's work).
    health_dirty: HashSet<String>,
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
        let mut snap = tokio::task::spawn_blocking(move || loader.load())
            .await
            .map_err(|e| ControlPlaneError::Unavailable(format!("store load task: {e}")))??;
        let quarantined = std::mem::take(&mut snap.quarantined);
        let now = Instant::now();
        let mut statuses: HashMap<String, NodeStatus> = snap.statuses.into_iter().collect();
        let mut shared = HashMap::new();
        let mut encoded = Encoded::default();
        let mut pruned = HashSet::new();
        let nodes = snap
            .nodes
            .into_iter()
            .map(|record| {
                let current = desired(&snap.rules, &snap.deployments, &record);
                let message = shared
                    .entry(current.clone())
                    .or_insert_with(|| Arc::new(Desired::new(&current, ttl_seconds, now)))
                    .clone();
                let mut status = statuses.remove(&record.node_id).unwrap_or_default();
                let modules = desired_modules(&snap.deployments, &record.node_id, &record.labels);
                // Stores written before health was limited to the modules a node runs may
                // hold thousands of invented ones: keep what the node runs, is meant to
                // run, or answered the control plane about.
                let before = status.modules.len();
                status.modules.retain(|name, p| {
                    modules.contains_key(name)
                        || record.modules.iter().any(|m| &m.name == name)
                        || p.acked_revision > 0
                        || p.nacked.is_some()
                        || p.transfer.is_some()
                });
                if status.modules.len() != before {
                    pruned.insert(record.node_id.clone());
                }
                let configs = desired_configs(&snap.configs, &record, &mut encoded);
                let entry = Entry {
                    status,
                    current,
                    desired: watch::Sender::new(message),
                    modules: watch::Sender::new(Arc::new(modules)),
                    configs: watch::Sender::new(Arc::new(configs)),
                    history: HashMap::new(),
                    session: None,
                    record,
                };
                (entry.record.node_id.clone(), entry)
            })
            .collect();
        let registry = Registry {
            store,
            state: Mutex::new(State {
                nodes,
                rules: snap.rules,
                deployments: snap.deployments,
                configs: snap.configs,
                revision: snap.revision,
                dirty: pruned,
                health_dirty: HashSet::new(),
            }),
            writer: tokio::sync::Mutex::new(()),
            events: broadcast::channel(1024).0,
            weights: broadcast::channel(4096).0,
            ttl_seconds,
            next_session: AtomicU64::new(1),
        };
        registry.report_quarantined(quarantined).await?;
        Ok(registry)
    }

    /// Says loudly what the store set aside at start: in the log, a metric and the audit
    /// log, so an operator can look at it (`aviary-control-plane check`).
    async fn report_quarantined(&self, records: Vec<Quarantined>) -> Result<(), ControlPlaneError> {
        if records.is_empty() {
            return Ok(());
        }
        metrics::counter!("aviary_store_quarantined_total").increment(records.len() as u64);
        let events = records
            .into_iter()
            .map(|q| {
                tracing::error!(tree = q.tree, key = %q.key, error = %q.error,
                    "unreadable record moved to the quarantine tree");
                NewEvent::new(
                    "control-plane",
                    "store.quarantine",
                    format!("{}/{}", q.tree, q.key),
                    format!("unreadable record set aside: {}", q.error),
                )
            })
            .collect();
        self.commit(Change {
            events,
            durable: true,
            ..Default::default()
        })
        .await?;
        Ok(())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `change` atomically in the store and publishes its audit events.
    /// (Deployments and releases commit through here too.)
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
        let applied_modules = hello.applied_modules.clone();
        let applied_weights = hello.applied_weights;
        let applied_configs = hello.applied_configs.clone();
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
            // send, or a known one that has applied more than we ever sent it, has a
            // history we cannot vouch for (its registration was lost in a crash, or the
            // store was restored from a backup): give it a fresh revision above anything it
            // has seen rather than reuse a number for another map, or send one it refuses
            // as older.
            let would_send = desired(&st.rules, &st.deployments, &record).revision;
            let unknown_history = hello.applied_weights > 0
                && if existing.is_none() {
                    hello.applied_weights >= would_send
                } else {
                    hello.applied_weights > would_send
                };
            let mut new_revision = None;
            if labels_changed || unknown_history {
                let revision = st.revision.max(hello.applied_weights) + 1;
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
        let deployments = std::mem::take(&mut st.deployments);
        let config_layers = std::mem::take(&mut st.configs);
        let entry = st.nodes.entry(node_id.to_owned()).or_insert_with(|| Entry {
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
        });
        if let Some(record) = record {
            let current = desired(&rules, &deployments, &record);
            if entry.current != current {
                entry
                    .desired
                    .send_replace(Arc::new(Desired::new(&current, ttl, Instant::now())));
                entry.current = current;
            }
            entry.record = record;
        }
        let modules = desired_modules(&deployments, &entry.record.node_id, &entry.record.labels);
        if **entry.modules.borrow() != modules {
            entry.modules.send_replace(Arc::new(modules));
        }
        let configs = desired_configs(&config_layers, &entry.record, &mut Encoded::default());
        if **entry.configs.borrow() != configs {
            entry.configs.send_replace(Arc::new(configs));
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
        for (module, revision) in &applied_modules {
            let p = entry.status.modules.entry(module.clone()).or_default();
            p.acked_revision = p.acked_revision.max(*revision);
        }
        for (module, revision) in &applied_configs {
            let p = entry.status.configs.entry(module.clone()).or_default();
            p.acked_revision = p.acked_revision.max(*revision);
        }
        if applied_weights <= entry.current.revision {
            entry.status.acked_revision = entry.status.acked_revision.max(applied_weights);
        }
        let attachment = Attachment {
            session_id,
            desired: entry.desired.subscribe(),
            cut: cut_rx,
            parked: entry.status.nacked.as_ref().map(|n| n.revision),
            modules: entry.modules.subscribe(),
            modules_parked: entry
                .status
                .modules
                .iter()
                .filter_map(|(m, p)| Some((m.clone(), p.nacked.as_ref()?.revision)))
                .collect(),
            configs: entry.configs.subscribe(),
            configs_parked: entry
                .status
                .configs
                .iter()
                .filter_map(|(m, p)| Some((m.clone(), p.nacked.as_ref()?.revision)))
                .collect(),
        };
        let update = weights_update(entry);
        st.rules = rules;
        st.deployments = deployments;
        st.configs = config_layers;
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

    /// Writes statuses changed since the last call (ACKs, NACKs, last seen) in one batch;
    /// with `health`, also those whose only change is a health report.
    pub(crate) async fn flush_statuses(&self, health: bool) -> Result<(), ControlPlaneError> {
        let rows: Vec<(String, NodeStatus)> = {
            let mut st = self.state();
            let mut dirty = std::mem::take(&mut st.dirty);
            if health {
                dirty.extend(std::mem::take(&mut st.health_dirty));
            }
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
        let ids: Vec<String> = rows.iter().map(|(id, _)| id.clone()).collect();
        let saved = tokio::task::spawn_blocking(move || store.save_statuses(&rows))
            .await
            .map_err(|e| ControlPlaneError::Unavailable(format!("store task: {e}")))?;
        if let Err(e) = saved {
            // Not written: try again at the next flush.
            self.state().dirty.extend(ids);
            return Err(e.into());
        }
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
            if let Some(owner) = st.deployments.iter().find(|d| {
                d.module == module
                    && d.state.is_active()
                    && d.steps.iter().any(|s| matches!(s, Step::Weight(_)))
            }) {
                return Err(ControlPlaneError::FailedPrecondition(format!(
                    "rollout {} owns the weights of {module} until it ends; abort or promote it first",
                    owner.id
                )));
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
                    let next = desired(&rules, &st.deployments, &entry.record);
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

    /// Deploys `module` `version` to every node `selector` matches, now and when they
    /// join. At most one deployment of a module is in progress at a time.
    pub(crate) async fn create_deployment(
        &self,
        actor: &Identity,
        plan: NewDeployment,
    ) -> Result<Deployment, ControlPlaneError> {
        let NewDeployment {
            module,
            version,
            selector,
            steps,
            progress_deadline_seconds,
        } = plan;
        let (module, version) = (module.as_str(), version.as_str());
        let _writer = self.writer.lock().await;
        let deployment = {
            let st = self.state();
            if let Some(busy) = st
                .deployments
                .iter()
                .find(|d| d.module == module && d.state.is_active())
            {
                return Err(ControlPlaneError::FailedPrecondition(format!(
                    "rollout {} of {module} {} is in progress; abort it or wait for it",
                    busy.id, busy.version
                )));
            }
            let seq = st.revision + 1;
            let now = now_ms();
            Deployment {
                id: format!("r-{seq}"),
                seq,
                module: module.to_owned(),
                version: version.to_owned(),
                selector,
                state: DeployState::Progressing,
                abort_seq: 0,
                message: if steps.is_empty() {
                    "deploying to every selected node".into()
                } else {
                    format!("step 1 of {}", steps.len())
                },
                created_ms: now,
                updated_ms: now,
                // No steps: everywhere, from this revision on.
                scale: if steps.is_empty() {
                    vec![ScaleChange {
                        percent: 100,
                        seq,
                        cutoff: 10_000,
                    }]
                } else {
                    Vec::new()
                },
                steps,
                current_step: 0,
                step_started_ms: now,
                progress_deadline_seconds,
                weight: Vec::new(),
                analysis_failures: 0,
            }
        };
        // Persisted before any node hears of it.
        self.commit(Change {
            deployments: vec![deployment.clone()],
            revision: Some(deployment.seq),
            events: vec![NewEvent::new(
                actor.to_string(),
                "rollout.created",
                format!("rollout/{}", deployment.id),
                format!(
                    "{} {} to selector {:?}",
                    module,
                    version,
                    deployment.selector.to_string()
                ),
            )],
            durable: true,
            ..Default::default()
        })
        .await?;
        metrics::counter!("aviary_rollout_transitions_total", "to" => "progressing").increment(1);
        let mut st = self.state();
        st.revision = deployment.seq;
        st.deployments.push(deployment.clone());
        let updates = republish(&mut st, &deployment.selector, self.ttl_seconds);
        drop(st);
        for u in updates {
            let _ = self.weights.send(u);
        }
        Ok(deployment)
    }

    /// Aborts a deployment in progress: its nodes go back to their previous slot.
    pub(crate) async fn abort_deployment(
        &self,
        actor: &Identity,
        id: &str,
        reason: &str,
    ) -> Result<Deployment, ControlPlaneError> {
        let deployment = self
            .update_deployment(&actor.to_string(), id, "rollout.aborted", |d, seq| {
                if !d.state.is_active() {
                    return Err(ControlPlaneError::FailedPrecondition(format!(
                        "rollout {id} is {:?}, only a rollout in progress can be aborted",
                        d.state
                    )));
                }
                // The abort takes a revision of its own: canaries go back on it.
                d.state = DeployState::Aborted;
                d.abort_seq = seq;
                d.message = format!("aborted: {reason}");
                Ok(true)
            })
            .await?;
        metrics::counter!("aviary_rollout_transitions_total", "to" => "aborted").increment(1);
        Ok(deployment)
    }

    /// Changes deployment `id` (the engine's step transitions, promote, pause, resume):
    /// `change` gets the deployment and the next revision and says whether it moved the
    /// canary scale (which takes that revision). Persisted, with its audit event, before
    /// any node hears of it.
    pub(crate) async fn update_deployment(
        &self,
        actor: &str,
        id: &str,
        action: &str,
        change: impl FnOnce(&mut Deployment, u64) -> Result<bool, ControlPlaneError>,
    ) -> Result<Deployment, ControlPlaneError> {
        let _writer = self.writer.lock().await;
        let (deployment, scaled, next) = {
            let st = self.state();
            let mut d = st
                .deployments
                .iter()
                .find(|d| d.id == id)
                .cloned()
                .ok_or_else(|| ControlPlaneError::NotFound(format!("rollout {id}")))?;
            let next = st.revision + 1;
            let scaled = change(&mut d, next)?;
            d.updated_ms = now_ms();
            (d, scaled, next)
        };
        self.commit(Change {
            deployments: vec![deployment.clone()],
            revision: scaled.then_some(next),
            events: vec![NewEvent::new(
                actor.to_owned(),
                action,
                format!("rollout/{id}"),
                deployment.message.clone(),
            )],
            durable: true,
            ..Default::default()
        })
        .await?;
        let mut st = self.state();
        if scaled {
            st.revision = st.revision.max(next);
        }
        if let Some(d) = st.deployments.iter_mut().find(|d| d.id == id) {
            *d = deployment.clone();
        }
        let updates = if scaled {
            republish(&mut st, &deployment.selector, self.ttl_seconds)
        } else {
            Vec::new()
        };
        drop(st);
        for u in updates {
            let _ = self.weights.send(u);
        }
        Ok(deployment)
    }

    /// The canary bucket bound for `percent` of the nodes `d` selects now.
    pub(crate) fn canary_cutoff(&self, d: &Deployment, percent: u32) -> u32 {
        let st = self.state();
        let buckets = st
            .nodes
            .values()
            .filter(|e| !e.record.revoked && d.selector.matches(&e.record.labels))
            .map(|e| crate::deploy::canary_bucket(&d.id, &e.record.node_id))
            .collect();
        let floor = d.scale.last().map_or(0, |s| s.cutoff);
        crate::deploy::cutoff_for(percent, buckets, floor)
    }

    /// Canary and stable health of deployment `d` since `since_ms` (for analysis).
    pub(crate) fn figures(&self, d: &Deployment, since_ms: u64) -> Figures {
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

    /// Completes the active deployment of `module` if every node has answered.
    pub(crate) async fn check_complete(&self, module: &str) {
        let done = completed(&self.state(), module);
        if let Some(d) = done {
            self.finish_deployment(d).await;
        }
    }

    /// Progressing rollouts with their node counts (the engine's tick: finished ones are
    /// not counted).
    pub(crate) fn progressing(&self) -> Vec<(Deployment, DeployProgress)> {
        let st = self.state();
        st.deployments
            .iter()
            .filter(|d| d.state == DeployState::Progressing)
            .map(|d| (d.clone(), progress(&st, d)))
            .collect()
    }

    /// Deployments (of `module`, or all), oldest first, with their node counts.
    pub(crate) fn deployments(&self, module: Option<&str>) -> Vec<(Deployment, DeployProgress)> {
        let st = self.state();
        st.deployments
            .iter()
            .filter(|d| module.is_none_or(|m| m == d.module))
            .map(|d| (d.clone(), progress(&st, d)))
            .collect()
    }

    /// One deployment with its node counts.
    pub(crate) fn deployment(
        &self,
        id: &str,
    ) -> Result<(Deployment, DeployProgress), ControlPlaneError> {
        let st = self.state();
        st.deployments
            .iter()
            .find(|d| d.id == id)
            .map(|d| (d.clone(), progress(&st, d)))
            .ok_or_else(|| ControlPlaneError::NotFound(format!("rollout {id}")))
    }

    /// Records how far a node's module transfer has come (shown by `GetNode`).
    pub(crate) fn record_transfer(
        &self,
        node_id: &str,
        module: &str,
        transfer: Option<TransferProgress>,
    ) {
        let mut st = self.state();
        if let Some(entry) = st.nodes.get_mut(node_id) {
            entry
                .status
                .modules
                .entry(module.to_owned())
                .or_default()
                .transfer = transfer;
            st.dirty.insert(node_id.to_owned());
        }
    }

    /// Records health reports of the modules `node_id` runs or is meant to run; reports
    /// about any other module are dropped (a node must not grow its own record without
    /// bound). Returns how many were dropped.
    pub(crate) fn record_health(
        &self,
        node_id: &str,
        reports: Vec<(String, HealthRecord)>,
    ) -> usize {
        let mut st = self.state();
        let Some(entry) = st.nodes.get_mut(node_id) else {
            return reports.len();
        };
        let mut ignored = 0;
        for (module, health) in reports {
            let known = entry.record.modules.iter().any(|m| m.name == module)
                || entry.modules.borrow().contains_key(&module);
            if !known {
                ignored += 1;
                continue;
            }
            entry
                .history
                .entry(module.clone())
                .or_default()
                .push(&health);
            entry.status.modules.entry(module).or_default().health = Some(health);
        }
        st.health_dirty.insert(node_id.to_owned());
        ignored
    }

    /// Records a module ACK. (Completion is the rollout engine's tick: counting the fleet
    /// on every ACK would make a fleet-wide rollout quadratic.)
    pub(crate) fn record_module_ack(&self, node_id: &str, module: &str, revision: u64) {
        let mut st = self.state();
        let Some(entry) = st.nodes.get_mut(node_id) else {
            return;
        };
        let p = entry.status.modules.entry(module.to_owned()).or_default();
        p.acked_revision = p.acked_revision.max(revision);
        p.transfer = None;
        st.dirty.insert(node_id.to_owned());
    }

    /// Records a module NACK (or a skip), parked until the desired module state changes.
    pub(crate) fn record_module_nack(
        &self,
        node_id: &str,
        module: &str,
        revision: u64,
        error: &str,
    ) {
        let mut st = self.state();
        let Some(entry) = st.nodes.get_mut(node_id) else {
            return;
        };
        let p = entry.status.modules.entry(module.to_owned()).or_default();
        p.nacked = Some(NackRecord {
            revision,
            error: error.to_owned(),
        });
        p.transfer = None;
        st.dirty.insert(node_id.to_owned());
    }

    async fn finish_deployment(&self, mut d: Deployment) {
        let _writer = self.writer.lock().await;
        if !self
            .state()
            .deployments
            .iter()
            .any(|x| x.id == d.id && x.state.is_active())
        {
            return;
        }
        let p = progress(&self.state(), &d);
        d.updated_ms = now_ms();
        if p.failed == 0 {
            d.state = DeployState::Succeeded;
            d.message = "every selected node installed it (or was skipped)".into();
        } else {
            d.state = DeployState::Failed;
            d.message = format!(
                "{} of {} node(s) refused it; `aviary nodes get` shows why",
                p.failed, p.selected
            );
        }
        let (action, to) = match d.state {
            DeployState::Succeeded => ("rollout.succeeded", "succeeded"),
            _ => ("rollout.failed", "failed"),
        };
        // The canary weight ends with the rollout: back to the rules, at a new revision.
        let release = d.weight.last().is_some_and(|w| w.weight.is_some());
        let next = self.state().revision + 1;
        if release {
            d.weight.push(WeightChange {
                weight: None,
                seq: next,
            });
        }
        let result = self
            .commit(Change {
                deployments: vec![d.clone()],
                revision: release.then_some(next),
                events: vec![NewEvent::new(
                    "control-plane",
                    action,
                    format!("rollout/{}", d.id),
                    format!("{} {}: {}", d.module, d.version, d.message),
                )],
                durable: true,
                ..Default::default()
            })
            .await;
        match result {
            Ok(_) => {
                metrics::counter!("aviary_rollout_transitions_total", "to" => to).increment(1);
                let mut st = self.state();
                if release {
                    st.revision = st.revision.max(next);
                }
                let selector = d.selector.clone();
                if let Some(x) = st.deployments.iter_mut().find(|x| x.id == d.id) {
                    *x = d;
                }
                let updates = if release {
                    republish(&mut st, &selector, self.ttl_seconds)
                } else {
                    Vec::new()
                };
                drop(st);
                for u in updates {
                    let _ = self.weights.send(u);
                }
            }
            Err(e) => tracing::warn!(error = %e, rollout = %d.id, "could not record the outcome"),
        }
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

/// Recomputes the desired modules and weights of the nodes `selector` matches and
/// publishes what changed; returns the weight updates for `WatchWeights`.
fn republish(st: &mut State, selector: &Selector, ttl: u32) -> Vec<pb::NodeWeights> {
    let deployments = std::mem::take(&mut st.deployments);
    let rules = std::mem::take(&mut st.rules);
    let now = Instant::now();
    let mut updates = Vec::new();
    for entry in st.nodes.values_mut() {
        if selector.matches(&entry.record.labels) {
            let next = desired_modules(&deployments, &entry.record.node_id, &entry.record.labels);
            if **entry.modules.borrow() != next {
                entry.modules.send_replace(Arc::new(next));
            }
            // Canary weights ride on the same rollouts.
            let weights = desired(&rules, &deployments, &entry.record);
            if weights != entry.current {
                entry
                    .desired
                    .send_replace(Arc::new(Desired::new(&weights, ttl, now)));
                entry.current = weights;
                updates.push(weights_update(entry));
            }
        }
    }
    st.deployments = deployments;
    st.rules = rules;
    updates
}

/// Node counts of `d` from the nodes' answers.
fn progress(st: &State, d: &Deployment) -> DeployProgress {
    let mut p = DeployProgress::default();
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
        // Only answers to this deployment's desire count for it.
        let wanted = entry
            .modules
            .borrow()
            .get(&d.module)
            .filter(|m| m.deployment == d.id)
            .map(|m| m.revision);
        let Some(wanted) = wanted else { continue };
        let answers = entry.status.modules.get(&d.module);
        if answers.is_some_and(|a| a.acked_revision >= wanted) {
            p.installed += 1;
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

/// The deployment of `module` in progress, if every node it selects has answered for it.
fn completed(st: &State, module: &str) -> Option<Deployment> {
    let d = st
        .deployments
        .iter()
        .find(|d| d.module == module && d.state == DeployState::Progressing)?;
    // Canary steps still to go: not finished, whatever the nodes say.
    if (d.current_step as usize) < d.steps.len() || d.percent() < 100 {
        return None;
    }
    let p = progress(st, d);
    (p.selected > 0 && p.installed + p.skipped + p.failed == p.selected).then(|| d.clone())
}

fn module_rollouts(entry: &Entry) -> Vec<pb::ModuleRollout> {
    let desired = entry.modules.borrow().clone();
    let mut names: Vec<&String> = desired.keys().chain(entry.status.modules.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|m| {
            let d = desired.get(m);
            let p = entry.status.modules.get(m);
            pb::ModuleRollout {
                module: m.clone(),
                desired_version: d.map(|d| d.version.clone()).unwrap_or_default(),
                desired_revision: d.map_or(0, |d| d.revision),
                rollback: d.is_some_and(|d| d.rollback),
                acked_revision: p.map_or(0, |p| p.acked_revision),
                nacked_revision: p.and_then(|p| p.nacked.as_ref()).map_or(0, |n| n.revision),
                nack_error: p
                    .and_then(|p| p.nacked.as_ref())
                    .map(|n| n.error.clone())
                    .unwrap_or_default(),
                transfer: p
                    .and_then(|p| p.transfer.as_ref())
                    .map(|t| pb::TransferStatus {
                        version: t.version.clone(),
                        encoding: t.encoding.clone(),
                        offset: t.offset,
                        size: t.size,
                    }),
                health: p.and_then(|p| p.health.as_ref()).map(|h| pb::ModuleHealth {
                    module: m.clone(),
                    probe_successes: h.probe_successes,
                    probe_failures: h.probe_failures,
                    latency_p50_ms: h.latency_p50_ms,
                    latency_p99_ms: h.latency_p99_ms,
                    process_state: h.process_state.clone(),
                    restarts: h.restarts,
                    log_matches: h.log_matches,
                    slot: h.slot.clone(),
                    version: h.version.clone(),
                    detail: h.detail.clone(),
                }),
            }
        })
        .collect()
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
        module_rollouts: module_rollouts(entry),
        configs: entry
            .configs
            .borrow()
            .iter()
            .map(|(module, c)| node_config(entry, module, c))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::ModuleProgress;
    use crate::store::SledStore;

    /// Issue 11, item 4: a store poisoned before health was limited (thousands of invented
    /// modules in one node's status) is cleaned at start and written back.
    #[tokio::test]
    async fn invented_modules_in_a_stored_status_are_pruned_at_start() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path())?);
        let record = NodeRecord {
            node_id: "gw-1".into(),
            modules: vec![ModuleRecord {
                name: "gateway".into(),
                version: "1.0.0".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        store.commit(Change {
            nodes: vec![record],
            durable: true,
            ..Default::default()
        })?;
        let mut status = NodeStatus::default();
        for m in ["gateway".to_string()]
            .into_iter()
            .chain((0..300).map(|i| format!("m-{i}")))
        {
            status.modules.insert(
                m,
                ModuleProgress {
                    health: Some(HealthRecord {
                        detail: "x".repeat(200),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            );
        }
        store.save_statuses(&[("gw-1".into(), status)])?;
        let registry = Registry::open(store.clone(), 300).await?;
        let kept: Vec<String> = registry.state().nodes["gw-1"]
            .status
            .modules
            .keys()
            .cloned()
            .collect();
        assert_eq!(kept, ["gateway"]);
        registry.flush_statuses(false).await?;
        let stored = store.load()?.statuses;
        assert_eq!(stored[0].1.modules.len(), 1);
        Ok(())
    }
}
