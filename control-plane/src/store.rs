//! Durable metadata: nodes, weight rules, config layers, releases, rollouts, counters and
//! the audit log.
//!
//! `Store` is the seam for a replicated backend later; `SledStore` is the embedded default.
//! Invariant: `commit` is atomic across everything it touches and durable when it returns
//! with `durable` set, so an acknowledged admin request survives `kill -9`.

use std::path::Path;

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use crate::audit::{Event, EventFilter, NewEvent};
use crate::deploy::Deployment;
use crate::layers::{sort, ConfigLayer};
use crate::node::{NodeRecord, NodeStatus, WeightRule};
use crate::release::{release_key, ReleaseRecord};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled reported an error (I/O, corruption).
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// A record could not be encoded or decoded.
    #[error("record {key}: {source}")]
    Codec {
        /// The key of the record.
        key: String,
        /// The cause.
        source: serde_json::Error,
    },
}

/// Everything loaded at start-up.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    /// Every node ever seen.
    pub nodes: Vec<NodeRecord>,
    /// Last known status per node id.
    pub statuses: Vec<(String, NodeStatus)>,
    /// Weight rules, sorted by `seq`.
    pub rules: Vec<WeightRule>,
    /// The highest revision handed out.
    pub revision: u64,
    /// Deployments, sorted by `seq`.
    pub deployments: Vec<Deployment>,
    /// Runtime config layers (tombstones included), in merge order.
    pub configs: Vec<ConfigLayer>,
    /// Records that could not be read and were moved to the quarantine tree.
    pub quarantined: Vec<Quarantined>,
}

/// A record set aside at start because it could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Quarantined {
    /// The tree it was in (`nodes`, `rollouts`, ...).
    pub tree: &'static str,
    /// Its key, as text.
    pub key: String,
    /// Why it could not be read.
    pub error: String,
}

/// One atomic change.
#[derive(Debug, Default)]
pub(crate) struct Change {
    /// Node records to write whole.
    pub nodes: Vec<NodeRecord>,
    /// Rules to insert or replace (by key).
    pub rules: Vec<WeightRule>,
    /// Releases to insert or replace (by module and version).
    pub releases: Vec<ReleaseRecord>,
    /// Deployments to insert or replace (by seq).
    pub deployments: Vec<Deployment>,
    /// Config layers to insert or replace (by key).
    pub configs: Vec<ConfigLayer>,
    /// New highest revision, if it moved.
    pub revision: Option<u64>,
    /// Audit events to append.
    pub events: Vec<NewEvent>,
    /// Flush to disk before returning (every acknowledged admin request).
    pub durable: bool,
}

/// The metadata store behind the registry.
pub(crate) trait Store: Send + Sync + 'static {
    /// Reads everything back after a start.
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Applies `change` atomically; returns the stored audit events.
    fn commit(&self, change: Change) -> Result<Vec<Event>, StoreError>;
    /// Writes node statuses (not flushed: sled's own flush interval is enough).
    fn save_statuses(&self, rows: &[(String, NodeStatus)]) -> Result<(), StoreError>;
    /// Audit events after `after_seq` that pass `filter`, at most `limit`.
    fn events(
        &self,
        after_seq: u64,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError>;
    /// One release.
    fn release(&self, module: &str, version: &str) -> Result<Option<ReleaseRecord>, StoreError>;
    /// Every release of `module` (all modules when `None`), in key order.
    fn releases(&self, module: Option<&str>) -> Result<Vec<ReleaseRecord>, StoreError>;
}

/// The embedded sled store under `--data-dir`.
pub(crate) struct SledStore {
    db: sled::Db,
    nodes: sled::Tree,
    statuses: sled::Tree,
    rules: sled::Tree,
    events: sled::Tree,
    meta: sled::Tree,
    releases: sled::Tree,
    rollouts: sled::Tree,
    configs: sled::Tree,
    /// Unreadable records, keyed `TREE\0KEY`, kept byte for byte for an operator.
    quarantine: sled::Tree,
}

const REVISION: &[u8] = b"revision";
const AUDIT_SEQ: &[u8] = b"audit_seq";

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub(crate) fn open(dir: &Path) -> Result<SledStore, StoreError> {
        let db = sled::Config::new()
            .path(dir.join("meta.sled"))
            // Small: the working set lives in the registry, sled is the log of record.
            .cache_capacity(64 << 20)
            .open()?;
        Ok(SledStore {
            nodes: db.open_tree("nodes")?,
            statuses: db.open_tree("statuses")?,
            rules: db.open_tree("rules")?,
            events: db.open_tree("events")?,
            meta: db.open_tree("meta")?,
            releases: db.open_tree("releases")?,
            rollouts: db.open_tree("rollouts")?,
            configs: db.open_tree("configs")?,
            quarantine: db.open_tree("quarantine")?,
            db,
        })
    }
}

impl SledStore {
    /// Moves unreadable records into the quarantine tree (copy first, then remove, so a
    /// crash in between only quarantines a record twice) and flushes.
    fn quarantine(&self, bad: Vec<BadRecord>) -> Result<Vec<Quarantined>, StoreError> {
        let mut out = Vec::with_capacity(bad.len());
        for b in bad {
            let tree = match b.tree {
                "nodes" => &self.nodes,
                "statuses" => &self.statuses,
                "rules" => &self.rules,
                "rollouts" => &self.rollouts,
                "configs" => &self.configs,
                _ => &self.releases,
            };
            let mut qkey = b.tree.as_bytes().to_vec();
            qkey.push(0);
            qkey.extend_from_slice(&b.key);
            self.quarantine.insert(qkey, b.value)?;
            tree.remove(&b.key)?;
            let key = match <[u8; 8]>::try_from(b.key.as_slice()) {
                Ok(seq) if b.tree == "rollouts" => format!("seq {}", u64::from_be_bytes(seq)),
                _ => String::from_utf8_lossy(&b.key).replace('\0', "/"),
            };
            out.push(Quarantined {
                tree: b.tree,
                key,
                error: b.error,
            });
        }
        if !out.is_empty() {
            self.db.flush()?;
        }
        Ok(out)
    }
}

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|source| StoreError::Codec {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

fn encode<T: serde::Serialize>(key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Codec {
        key: key.to_owned(),
        source,
    })
}

/// A record that could not be read, on its way to the `quarantine` tree.
struct BadRecord {
    tree: &'static str,
    key: Vec<u8>,
    value: Vec<u8>,
    error: String,
}

/// Every row of `tree`. A row sled itself cannot read is an error (the store is broken);
/// rows whose value Aviary cannot decode are the caller's to quarantine.
fn rows(tree: &sled::Tree) -> Result<Vec<(sled::IVec, sled::IVec)>, StoreError> {
    tree.iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(StoreError::from)
}

/// Pushes a decoded record, or sets an undecodable one aside with its reason.
fn keep<T>(
    into: &mut Vec<T>,
    decoded: Result<T, StoreError>,
    (tree, key, value): (&'static str, &[u8], &[u8]),
    bad: &mut Vec<BadRecord>,
) {
    match decoded {
        Ok(record) => into.push(record),
        Err(e) => bad.push(BadRecord {
            tree,
            key: key.to_vec(),
            value: value.to_vec(),
            error: e.to_string(),
        }),
    }
}

fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<u64, StoreError> {
    Ok(tree
        .get(key)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0))
}

impl Store for SledStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let mut snap = Snapshot {
            revision: read_u64(&self.meta, REVISION)?,
            ..Default::default()
        };
        let mut bad = Vec::new();
        for (k, v) in rows(&self.nodes)? {
            keep(&mut snap.nodes, decode(&k, &v), ("nodes", &k, &v), &mut bad);
        }
        for (k, v) in rows(&self.statuses)? {
            let id = String::from_utf8_lossy(&k).into_owned();
            let status = decode(&k, &v).map(|s: NodeStatus| (id, s));
            keep(&mut snap.statuses, status, ("statuses", &k, &v), &mut bad);
        }
        for (k, v) in rows(&self.rules)? {
            keep(&mut snap.rules, decode(&k, &v), ("rules", &k, &v), &mut bad);
        }
        snap.rules.sort_by_key(|r| r.seq);
        for (k, v) in rows(&self.rollouts)? {
            keep(
                &mut snap.deployments,
                decode(&k, &v),
                ("rollouts", &k, &v),
                &mut bad,
            );
        }
        snap.deployments.sort_by_key(|d| d.seq);
        for (k, v) in rows(&self.configs)? {
            keep(
                &mut snap.configs,
                decode(&k, &v),
                ("configs", &k, &v),
                &mut bad,
            );
        }
        sort(&mut snap.configs);
        // Releases are read on demand; an unreadable one is set aside now all the same.
        let mut releases: Vec<ReleaseRecord> = Vec::new();
        for (k, v) in rows(&self.releases)? {
            keep(
                &mut releases,
                decode(&k, &v),
                ("releases", &k, &v),
                &mut bad,
            );
        }
        snap.quarantined = self.quarantine(bad)?;
        Ok(snap)
    }

    fn commit(&self, change: Change) -> Result<Vec<Event>, StoreError> {
        // Encode outside the transaction: its closure may run more than once.
        let mut node_rows = Vec::with_capacity(change.nodes.len());
        for n in &change.nodes {
            node_rows.push((n.node_id.clone(), encode(&n.node_id, n)?));
        }
        let mut rule_rows = Vec::with_capacity(change.rules.len());
        for r in &change.rules {
            rule_rows.push((r.key(), encode(&r.key(), r)?));
        }
        let mut release_rows = Vec::with_capacity(change.releases.len());
        for r in &change.releases {
            release_rows.push((r.key(), encode(&r.module, r)?));
        }
        let mut deployment_rows = Vec::with_capacity(change.deployments.len());
        for d in &change.deployments {
            deployment_rows.push((d.seq.to_be_bytes(), encode(&d.id, d)?));
        }
        let mut config_rows = Vec::with_capacity(change.configs.len());
        for c in &change.configs {
            config_rows.push((c.key(), encode(&c.key(), c)?));
        }
        let trees = (
            &self.nodes,
            &self.rules,
            &self.events,
            &self.meta,
            &self.releases,
            &self.rollouts,
            &self.configs,
        );
        let result = trees.transaction(
            |(nodes, rules, events, meta, releases, rollouts, configs)| {
                for (k, v) in &config_rows {
                    configs.insert(k.as_bytes(), v.as_slice())?;
                }
                for (k, v) in &deployment_rows {
                    rollouts.insert(k, v.as_slice())?;
                }
                for (k, v) in &node_rows {
                    nodes.insert(k.as_bytes(), v.as_slice())?;
                }
                for (k, v) in &release_rows {
                    releases.insert(k.as_slice(), v.as_slice())?;
                }
                for (k, v) in &rule_rows {
                    rules.insert(k.as_bytes(), v.as_slice())?;
                }
                if let Some(rev) = change.revision {
                    meta.insert(REVISION, &rev.to_be_bytes())?;
                }
                let mut stored = Vec::with_capacity(change.events.len());
                if !change.events.is_empty() {
                    let mut seq = meta
                        .get(AUDIT_SEQ)?
                        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
                        .map(u64::from_be_bytes)
                        .unwrap_or(0);
                    for new in &change.events {
                        seq += 1;
                        let event = Event::stamp(seq, new.clone());
                        let row = serde_json::to_vec(&event)
                            .map_err(ConflictableTransactionError::Abort)?;
                        events.insert(&seq.to_be_bytes(), row)?;
                        stored.push(event);
                    }
                    meta.insert(AUDIT_SEQ, &seq.to_be_bytes())?;
                }
                Ok(stored)
            },
        );
        let stored = result.map_err(|e| match e {
            TransactionError::Abort(source) => StoreError::Codec {
                key: "event".into(),
                source,
            },
            TransactionError::Storage(e) => StoreError::Sled(e),
        })?;
        if change.durable {
            self.db.flush()?;
        }
        Ok(stored)
    }

    fn save_statuses(&self, rows: &[(String, NodeStatus)]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (id, status) in rows {
            batch.insert(id.as_bytes(), encode(id, status)?);
        }
        self.statuses.apply_batch(batch)?;
        Ok(())
    }

    fn events(
        &self,
        after_seq: u64,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let mut out = Vec::new();
        let start = after_seq.saturating_add(1).to_be_bytes();
        for kv in self.events.range(start..) {
            let (k, v) = kv?;
            let event: Event = decode(&k, &v)?;
            if filter.matches(&event) {
                out.push(event);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn release(&self, module: &str, version: &str) -> Result<Option<ReleaseRecord>, StoreError> {
        let key = release_key(module, version);
        self.releases
            .get(&key)?
            .map(|v| decode(&key, &v))
            .transpose()
    }

    fn releases(&self, module: Option<&str>) -> Result<Vec<ReleaseRecord>, StoreError> {
        let prefix = module.map(|m| release_key(m, "")).unwrap_or_default();
        let mut out = Vec::new();
        for kv in self.releases.scan_prefix(prefix) {
            let (k, v) = kv?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::HealthRecord;

    #[test]
    fn commits_survive_reopen_and_events_are_numbered() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let store = SledStore::open(dir.path())?;
            let node = NodeRecord {
                node_id: "gw-1".into(),
                ..Default::default()
            };
            let events = store.commit(Change {
                nodes: vec![node],
                revision: Some(7),
                events: vec![
                    NewEvent::new("admin/a", "nodes.set_weight", "module/m", "x"),
                    NewEvent::new("admin/a", "nodes.revoke", "node/gw-1", "y"),
                ],
                durable: true,
                ..Default::default()
            })?;
            assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
        }
        let store = SledStore::open(dir.path())?;
        let snap = store.load()?;
        assert_eq!(snap.revision, 7);
        assert_eq!(snap.nodes.len(), 1);
        let only_node = EventFilter {
            node_id: Some("gw-1".into()),
            ..Default::default()
        };
        let events = store.events(0, &only_node, 10)?;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].action, "nodes.revoke");
        Ok(())
    }

    /// Encoding then decoding gives the record back, for arbitrary records of every
    /// type the store holds; a value JSON cannot carry (NaN, infinity) fails the write.
    fn round_trips<T>(what: &str)
    where
        T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let (mut made, mut refused) = (0, 0);
        for seed in 0..3000 {
            let Ok(record) = crate::arbitrary::Gen::new(seed).make::<T>() else {
                continue;
            };
            made += 1;
            match encode(what, &record) {
                Err(_) => refused += 1,
                Ok(bytes) => {
                    let back: Result<T, _> = decode(b"k", &bytes);
                    assert_eq!(
                        back.as_ref().ok(),
                        Some(&record),
                        "{what} seed {seed}: {:?} from {}",
                        back.as_ref().err(),
                        String::from_utf8_lossy(&bytes)
                    );
                }
            }
        }
        assert!(made >= 300, "{what}: only {made} arbitrary records made");
        assert!(
            refused < made / 2,
            "{what}: {refused} of {made} writes refused"
        );
    }

    #[test]
    fn every_record_type_reads_back_what_it_wrote() {
        use crate::audit::Event;
        round_trips::<NodeRecord>("node");
        round_trips::<WeightRule>("rule");
        round_trips::<ReleaseRecord>("release");
        round_trips::<ConfigLayer>("config");
        round_trips::<Event>("event");
        // A float field without `crate::finite` would fail here: the generator puts NaN
        // and infinities in it, JSON writes them as null and the read fails.
        round_trips::<NodeStatus>("status");
        round_trips::<Deployment>("rollout");
    }

    #[test]
    fn a_non_finite_number_is_refused_at_the_write_and_nothing_changes() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = SledStore::open(dir.path())?;
        let mut status = NodeStatus::default();
        status.modules.entry("m".into()).or_default().health = Some(HealthRecord {
            latency_p99_ms: f64::NAN,
            ..Default::default()
        });
        assert!(store.save_statuses(&[("gw-1".into(), status)]).is_err());
        let mut rollout: Deployment = crate::arbitrary::Gen::new(1)
            .make()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        rollout.steps = vec![crate::deploy::Step::Analysis(
            crate::analysis::AnalysisSpec {
                max_p99_latency_ms: f64::INFINITY,
                ..Default::default()
            },
        )];
        let refused = store.commit(Change {
            deployments: vec![rollout],
            events: vec![NewEvent::new(
                "admin/a",
                "rollouts.create",
                "rollout/r-1",
                "",
            )],
            durable: true,
            ..Default::default()
        });
        assert!(refused.is_err());
        let snap = store.load()?;
        assert!(snap.statuses.is_empty() && snap.deployments.is_empty());
        assert!(store.events(0, &EventFilter::default(), 10)?.is_empty());
        Ok(())
    }

    #[test]
    fn an_unreadable_record_is_quarantined_and_the_rest_loads() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let store = SledStore::open(dir.path())?;
            let nodes = ["gw-1", "gw-2"].map(|id| NodeRecord {
                node_id: id.into(),
                ..Default::default()
            });
            store.commit(Change {
                nodes: nodes.to_vec(),
                durable: true,
                ..Default::default()
            })?;
            // What an older control plane wrote for a NaN latency.
            store.statuses.insert(
                "gw-1",
                br#"{"acked_revision":1,"nacked":null,"last_seen_ms":0,"modules":{"m":{"acked_revision":1,"nacked":null,"transfer":null,"health":{"at_ms":1,"probe_successes":1,"probe_failures":0,"latency_p50_ms":null,"latency_p99_ms":null,"process_state":"running","restarts":0,"log_matches":0,"slot":"a","version":"1.0.0","detail":""}}}}"#.as_slice(),
            )?;
            store.nodes.insert("gw-2", b"{not json".as_slice())?;
            store.db.flush()?;
        }
        let store = SledStore::open(dir.path())?;
        let snap = store.load()?;
        assert_eq!(snap.nodes.len(), 1);
        assert!(snap.statuses.is_empty());
        let mut set_aside: Vec<_> = snap
            .quarantined
            .iter()
            .map(|q| format!("{}/{}", q.tree, q.key))
            .collect();
        set_aside.sort();
        assert_eq!(set_aside, ["nodes/gw-2", "statuses/gw-1"]);
        assert!(snap.quarantined.iter().all(|q| !q.error.is_empty()));
        // Kept byte for byte, and not reported again at the next start.
        assert!(store.quarantine.get(b"nodes\0gw-2")?.is_some());
        drop(store);
        assert!(SledStore::open(dir.path())?.load()?.quarantined.is_empty());
        Ok(())
    }
}
