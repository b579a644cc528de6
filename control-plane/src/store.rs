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
            db,
        })
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
        for kv in self.nodes.iter() {
            let (k, v) = kv?;
            snap.nodes.push(decode(&k, &v)?);
        }
        for kv in self.statuses.iter() {
            let (k, v) = kv?;
            let status: NodeStatus = decode(&k, &v)?;
            snap.statuses
                .push((String::from_utf8_lossy(&k).into_owned(), status));
        }
        for kv in self.rules.iter() {
            let (k, v) = kv?;
            snap.rules.push(decode(&k, &v)?);
        }
        snap.rules.sort_by_key(|r| r.seq);
        for kv in self.rollouts.iter() {
            let (k, v) = kv?;
            snap.deployments.push(decode(&k, &v)?);
        }
        snap.deployments.sort_by_key(|d| d.seq);
        for kv in self.configs.iter() {
            let (k, v) = kv?;
            snap.configs.push(decode(&k, &v)?);
        }
        sort(&mut snap.configs);
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
}
