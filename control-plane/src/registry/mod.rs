//! The fleet registry: every node's record, desired state and live session, in memory,
//! backed by the store through the journal. Split by what it holds, over one `State`:
//! `sessions.rs` (attach, detach, revoke), `weights.rs` (rules and each node's weight
//! map), `rollouts.rs` and `progress.rs` (rollouts and the fleet's answers to them),
//! `configs.rs` (config layers), `answers.rs` (ACKs, NACKs, transfers and health),
//! `views.rs` (domain snapshots for the API; `api/views.rs` turns them into proto).
//!
//! Invariants:
//! * Mutations are serialised by `writer` and go compute → persist → publish: nothing is
//!   sent to a node, or acknowledged to an admin, before the journal committed it.
//! * A desired weight map is encoded once (`Desired::message`) and the same `Bytes` are
//!   shared by every stream that sends it.
//! * At most one live session per node; a newer stream supersedes the older one.
//! * No proto type is named here (`scripts/check-layout` fails the build if one is).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::{broadcast, oneshot, watch};

use crate::audit::NewEvent;
use crate::error::ControlPlaneError;
use crate::health::History;
use crate::journal::{blocking, Journal};
use crate::layers::{desired_configs, ConfigLayer, DesiredConfigs, Encoded};
use crate::node::{desired, DesiredWeights, NodeRecord, NodeStatus, WeightRule};
use crate::rollout::{desired_modules, DesiredModules, Rollout};
use crate::store::{Change, Quarantined};

mod answers;
mod configs;
mod enroll;
mod identities;
mod progress;
mod renew;
mod rollouts;
mod sessions;
mod views;
mod weights;

pub(crate) use answers::Answer;
pub(crate) use enroll::{EnrollAttempt, EnrollOutcome};
pub(crate) use identities::Verdict;
pub(crate) use rollouts::NewRollout;
pub(crate) use sessions::{Attachment, HelloInfo};
pub(crate) use views::{NodeConfigView, NodeView, NodeWeights};
pub(crate) use weights::Desired;

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
    /// `deploy::desired_modules(rollouts, labels)`, kept current likewise.
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
    rollouts: Vec<Rollout>,
    /// Config layers in merge order (tombstones included).
    configs: Vec<ConfigLayer>,
    revision: u64,
    dirty: HashSet<String>,
    /// Nodes whose only change is a health report: written at the slower health cadence
    /// (a fleet reports every second; writing every node's status that often was most of
    /// the store's work).
    health_dirty: HashSet<String>,
    /// Enrollment requests and bootstrap tokens.
    enrollment: identities::Enrollments,
}

/// The fleet registry (see the module docs).
pub(crate) struct Registry {
    journal: Arc<Journal>,
    state: Mutex<State>,
    writer: tokio::sync::Mutex<()>,
    weights: broadcast::Sender<NodeWeights>,
    ttl_seconds: u32,
    next_session: AtomicU64,
}

impl Registry {
    /// Loads the registry from the journal's store; `ttl_seconds` goes into every weight
    /// assignment.
    pub(crate) async fn open(
        journal: Arc<Journal>,
        ttl_seconds: u32,
    ) -> Result<Registry, ControlPlaneError> {
        let loader = journal.store().clone();
        let mut snap = blocking(move || loader.load()).await??;
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
                let current = desired(&snap.rules, &snap.rollouts, &record);
                let message = shared
                    .entry(current.clone())
                    .or_insert_with(|| Arc::new(Desired::new(&current, ttl_seconds, now)))
                    .clone();
                let mut status = statuses.remove(&record.node_id).unwrap_or_default();
                let modules = desired_modules(&snap.rollouts, &record.node_id, &record.labels);
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
            journal,
            state: Mutex::new(State {
                nodes,
                rules: snap.rules,
                rollouts: snap.rollouts,
                configs: snap.configs,
                revision: snap.revision,
                dirty: pruned,
                health_dirty: HashSet::new(),
                enrollment: identities::Enrollments {
                    requests: snap
                        .enrollments
                        .into_iter()
                        .map(|r| (r.node_id.clone(), r))
                        .collect(),
                    tokens: snap.tokens.into_iter().map(|t| (t.id.clone(), t)).collect(),
                },
            }),
            writer: tokio::sync::Mutex::new(()),
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

    /// Commits `change` through the journal (persist, audit, publish events).
    async fn commit(&self, change: Change) -> Result<Vec<crate::audit::Event>, ControlPlaneError> {
        self.journal.commit(change).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::ModuleProgress;
    use crate::node::{HealthRecord, ModuleRecord};
    use crate::store::{SledStore, Store};

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
        let registry = Registry::open(Arc::new(Journal::new(store.clone())), 300).await?;
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

    /// Installed counts the ACKs to the rollout's revision; healthy, of those, the nodes
    /// whose latest report shows its version running with every probe passing.
    #[tokio::test]
    async fn a_rollout_counts_installed_and_healthy_nodes_from_their_answers() -> anyhow::Result<()>
    {
        use aviary_proto::resource::Resource;

        use crate::rollout::RolloutProgress;
        use crate::selector::Selector;

        let dir = tempfile::tempdir()?;
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path())?);
        let registry = Registry::open(Arc::new(Journal::new(store)), 300).await?;
        let mut attached = Vec::new();
        for id in ["gw-1", "gw-2"] {
            attached.push(registry.attach(id, HelloInfo::default()).await?);
        }
        let admin = aviary_certs::Identity::Admin("alice".into());
        let plan = NewRollout {
            module: "gateway".into(),
            version: "1.1.0".into(),
            selector: Selector::default(),
            steps: Vec::new(),
            progress_deadline_seconds: 0,
        };
        let r = registry.create_rollout(&admin, plan, None).await?;
        let module = Resource::Module("gateway".into());
        for id in ["gw-1", "gw-2"] {
            registry.record_answer(id, &module, r.seq, &Answer::Ack);
        }
        let report = |failures| HealthRecord {
            probe_successes: 3,
            probe_failures: failures,
            process_state: "running".into(),
            version: "1.1.0".into(),
            ..Default::default()
        };
        registry.record_health("gw-1", vec![("gateway".into(), report(0))]);
        registry.record_health("gw-2", vec![("gateway".into(), report(2))]);
        let (_, p) = registry.rollout(&r.id)?;
        let want = RolloutProgress {
            selected: 2,
            canaries: 2,
            connected_canaries: 2,
            installed: 2,
            healthy: 1,
            failed: 0,
            skipped: 0,
        };
        assert_eq!(p, want);
        Ok(())
    }

    /// A page of rollouts is the newest `limit` before the cursor; only those are counted.
    #[tokio::test]
    async fn rollouts_come_newest_first_a_page_at_a_time() -> anyhow::Result<()> {
        use crate::selector::Selector;

        let dir = tempfile::tempdir()?;
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path())?);
        let registry = Registry::open(Arc::new(Journal::new(store)), 300).await?;
        let admin = aviary_certs::Identity::Admin("alice".into());
        let mut ids = Vec::new();
        for module in ["a", "b", "c"] {
            let plan = NewRollout {
                module: module.into(),
                version: "1.0.0".into(),
                selector: Selector::default(),
                steps: Vec::new(),
                progress_deadline_seconds: 0,
            };
            ids.push(registry.create_rollout(&admin, plan, None).await?);
        }
        let page = |before, limit| -> Vec<String> {
            registry
                .rollouts(None, before, limit)
                .into_iter()
                .map(|(r, _)| r.id)
                .collect()
        };
        assert_eq!(page(None, 2), [ids[2].id.clone(), ids[1].id.clone()]);
        assert_eq!(page(Some(ids[1].seq), 2), [ids[0].id.clone()]);
        let only_b: Vec<String> = registry
            .rollouts(Some("b"), None, 10)
            .into_iter()
            .map(|(r, _)| r.id)
            .collect();
        assert_eq!(only_b, [ids[1].id.clone()]);
        Ok(())
    }
}
