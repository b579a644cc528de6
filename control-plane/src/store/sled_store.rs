//! The embedded sled store under `--data-dir` (see `store` for the promises).
//!
//! sled keeps failing after one I/O error (ENOSPC, EPERM) even once the disk is fine, and
//! keeps in memory what it could not flush, where reads would find it. So the first such
//! error closes the store (`broken`): the next call reopens it from disk, which drops
//! whatever was not durable, and audit sequence numbers continue above every number ever
//! handed out (`seq_floor`), so none is reused. Until a write succeeds again the store
//! says it is not healthy, and the server reports NOT_SERVING.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use super::watermark::{self, Watermark};
use super::{decode, encode, Change, Quarantined, Snapshot, Store, StoreError};
use crate::audit::{Event, EventFilter};
use crate::layers::sort;
use crate::node::NodeStatus;
use crate::release::{release_key, ReleaseRecord};

/// The trees of a store, by name.
pub(super) const TREES: [&str; 9] = [
    "nodes",
    "statuses",
    "rules",
    "events",
    "meta",
    "releases",
    "rollouts",
    "configs",
    "quarantine",
];

const REVISION: &[u8] = b"revision";
const AUDIT_SEQ: &[u8] = b"audit_seq";
/// Written by `probe`: a write that proves the disk takes writes again.
const PROBE: &[u8] = b"probe";

/// The open sled database and its trees.
pub(super) struct Trees {
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

impl Trees {
    /// Opens (or creates) the sled database in `dir`.
    pub(super) fn open(dir: &Path) -> Result<Trees, StoreError> {
        let db = sled::Config::new()
            .path(dir.join("meta.sled"))
            // Small: the working set lives in the registry, sled is the log of record.
            .cache_capacity(64 << 20)
            .open()?;
        Ok(Trees {
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

    /// Every tree by name (the names `TREES` lists), for check and backup.
    pub(super) fn all(&self) -> [(&'static str, &sled::Tree); 9] {
        // In the order of `TREES`.
        let trees = [
            &self.nodes,
            &self.statuses,
            &self.rules,
            &self.events,
            &self.meta,
            &self.releases,
            &self.rollouts,
            &self.configs,
            &self.quarantine,
        ];
        std::array::from_fn(|i| (TREES[i], trees[i]))
    }

    fn named(&self, name: &str) -> Option<&sled::Tree> {
        self.all()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| t)
    }

    /// Decodes one row of tree `name` as its record type (meta and quarantine rows are
    /// not records).
    pub(super) fn decode_row(&self, name: &str, k: &[u8], v: &[u8]) -> Result<(), StoreError> {
        match name {
            "nodes" => decode::<crate::node::NodeRecord>(k, v).map(drop),
            "statuses" => decode::<NodeStatus>(k, v).map(drop),
            "rules" => decode::<crate::node::WeightRule>(k, v).map(drop),
            "events" => decode::<Event>(k, v).map(drop),
            "releases" => decode::<ReleaseRecord>(k, v).map(drop),
            "rollouts" => decode::<crate::rollout::Rollout>(k, v).map(drop),
            "configs" => decode::<crate::layers::ConfigLayer>(k, v).map(drop),
            _ => Ok(()),
        }
    }

    /// Loads like a start would, without setting anything aside, and checks the
    /// counters against the records.
    pub(super) fn load_checked(&self) -> Result<(), StoreError> {
        let (snap, _) = self.read_all()?;
        check_counters(&snap)
    }

    /// Puts a row back (restore).
    pub(super) fn insert_row(&self, tree: &str, k: &[u8], v: &[u8]) -> Result<(), StoreError> {
        let tree = self
            .named(tree)
            .ok_or_else(|| StoreError::Inconsistent(format!("unknown tree {tree}")))?;
        tree.insert(k, v)?;
        Ok(())
    }

    /// Sets the counters (check --accept-loss) and flushes.
    pub(super) fn set_counters(&self, mark: Watermark) -> Result<(), StoreError> {
        self.meta.insert(REVISION, &mark.revision.to_be_bytes())?;
        self.meta.insert(AUDIT_SEQ, &mark.audit_seq.to_be_bytes())?;
        self.flush()
    }

    /// Makes everything written durable.
    pub(super) fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// The counters as stored, checked against the audit log they number.
    pub(super) fn counters(&self) -> Result<Watermark, StoreError> {
        let mark = Watermark {
            revision: read_u64(&self.meta, REVISION)?,
            audit_seq: read_u64(&self.meta, AUDIT_SEQ)?,
        };
        if let Some((last, _)) = self.events.last()? {
            let last = <[u8; 8]>::try_from(last.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| {
                    StoreError::Inconsistent("an audit event has a malformed key".into())
                })?;
            if last > mark.audit_seq {
                return Err(StoreError::Inconsistent(format!(
                    "audit event {last} exists but the counter says {}",
                    mark.audit_seq
                )));
            }
        }
        Ok(mark)
    }
}

/// Records numbered by the revision counter must not be ahead of it.
fn check_counters(snap: &Snapshot) -> Result<(), StoreError> {
    let ahead = |what: &str, seq: u64| {
        (seq > snap.revision).then(|| {
            StoreError::Inconsistent(format!(
                "{what} has revision {seq} but the counter says {}",
                snap.revision
            ))
        })
    };
    let found = snap
        .rules
        .iter()
        .map(|r| ahead("a weight rule", r.seq))
        .chain(
            snap.rollouts
                .iter()
                .map(|d| ahead(&format!("rollout {}", d.id), d.seq)),
        )
        .chain(snap.configs.iter().map(|c| ahead("a config layer", c.seq)))
        .chain(
            snap.nodes
                .iter()
                .map(|n| ahead(&format!("node {}", n.node_id), n.label_revision)),
        )
        .flatten()
        .next();
    match found {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The embedded sled store (see the module docs).
pub(crate) struct SledStore {
    dir: PathBuf,
    /// `None` while closed after an I/O error and not yet reopened.
    trees: RwLock<Option<Arc<Trees>>>,
    /// Set by an I/O error; the next call reopens.
    broken: AtomicBool,
    /// The highest audit sequence number ever handed out, committed or not.
    seq_floor: AtomicU64,
    /// The watermark last written.
    mark: Mutex<Watermark>,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`, refusing one that holds less than its
    /// watermark says was acknowledged, or whose counters contradict its records.
    pub(crate) fn open(dir: &Path) -> Result<SledStore, StoreError> {
        let trees = Trees::open(dir)?;
        let found = trees.counters()?;
        let expected = watermark::read(dir)?;
        if let Some(expected) = expected {
            if found.behind(&expected) {
                return Err(StoreError::Behind {
                    found: found.to_string(),
                    expected: expected.to_string(),
                });
            }
        }
        if expected.is_none() && found != Watermark::default() {
            // A store from before watermarks: protect it from now on.
            watermark::write(dir, &found)?;
        }
        Ok(SledStore {
            dir: dir.to_owned(),
            trees: RwLock::new(Some(Arc::new(trees))),
            broken: AtomicBool::new(false),
            seq_floor: AtomicU64::new(found.audit_seq),
            mark: Mutex::new(expected.unwrap_or_default().max(found)),
        })
    }

    fn trees(&self) -> Result<Arc<Trees>, StoreError> {
        if self.broken.load(Ordering::Acquire) {
            self.reopen()?;
        }
        self.trees
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| StoreError::Unavailable("closed".into()))
    }

    /// Drops the failed database and opens it again from disk.
    fn reopen(&self) -> Result<(), StoreError> {
        let mut slot = self.trees.write().unwrap_or_else(|p| p.into_inner());
        if !self.broken.load(Ordering::Acquire) && slot.is_some() {
            return Ok(());
        }
        // sled's file lock goes with the last handle; one still in use fails the open
        // below, and the next call tries again.
        drop(slot.take());
        let trees = Trees::open(&self.dir).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        *slot = Some(Arc::new(trees));
        self.broken.store(false, Ordering::Release);
        tracing::warn!("store reopened after an I/O error");
        Ok(())
    }

    /// Notes an I/O error: sled will not recover from it by itself.
    fn guard<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(e) = &result {
            if e.is_io() && !self.broken.swap(true, Ordering::AcqRel) {
                metrics::counter!("aviary_store_errors_total").increment(1);
                metrics::gauge!("aviary_store_healthy").set(0.0);
                tracing::error!(error = %e, "store write failed; nothing more is served from memory until it is reopened");
            }
        }
        result
    }

    /// Writes the watermark after a durable commit, if the counters moved. A failure is
    /// logged, not returned: the commit itself is durable.
    fn advance_watermark(&self, revision: Option<u64>, audit_seq: Option<u64>) {
        let mut mark = self.mark.lock().unwrap_or_else(|p| p.into_inner());
        let next = mark.max(Watermark {
            revision: revision.unwrap_or(0),
            audit_seq: audit_seq.unwrap_or(0),
        });
        if next == *mark {
            return;
        }
        match watermark::write(&self.dir, &next) {
            Ok(()) => *mark = next,
            Err(e) => {
                metrics::counter!("aviary_store_errors_total").increment(1);
                tracing::warn!(error = %e, "could not advance the watermark");
            }
        }
    }
}

/// Every row of `tree` whose key starts with `prefix`.
fn rows_with_prefix(
    tree: &sled::Tree,
    prefix: &[u8],
) -> Result<Vec<(sled::IVec, sled::IVec)>, StoreError> {
    tree.scan_prefix(prefix)
        .collect::<Result<Vec<_>, _>>()
        .map_err(StoreError::from)
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
        let t = self.trees()?;
        self.guard(t.load())
    }

    fn commit(&self, change: Change) -> Result<Vec<Event>, StoreError> {
        let t = self.trees()?;
        let stored = self.guard(t.commit(&change, &self.seq_floor))?;
        if change.durable {
            self.guard(t.db.flush().map_err(StoreError::from))?;
            self.advance_watermark(change.revision, stored.last().map(|e| e.seq));
        }
        Ok(stored)
    }

    fn save_statuses(&self, rows: &[(String, NodeStatus)]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (id, status) in rows {
            batch.insert(id.as_bytes(), encode(id, status)?);
        }
        let t = self.trees()?;
        self.guard(t.statuses.apply_batch(batch).map_err(StoreError::from))
    }

    fn events(
        &self,
        after_seq: u64,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let t = self.trees()?;
        self.guard(t.events(after_seq, filter, limit))
    }

    fn release(&self, module: &str, version: &str) -> Result<Option<ReleaseRecord>, StoreError> {
        let key = release_key(module, version);
        let t = self.trees()?;
        let row = self.guard(t.releases.get(&key).map_err(StoreError::from))?;
        row.map(|v| decode(&key, &v)).transpose()
    }

    fn releases(&self, module: Option<&str>) -> Result<Vec<ReleaseRecord>, StoreError> {
        let prefix = module.map(|m| release_key(m, "")).unwrap_or_default();
        let t = self.trees()?;
        let rows = self.guard(rows_with_prefix(&t.releases, &prefix))?;
        rows.iter().map(|(k, v)| decode(k, v)).collect()
    }

    fn prune_events(&self, keep: u64, before_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let t = self.trees()?;
        self.guard(t.prune_events(keep, before_ms, limit))
    }

    fn healthy(&self) -> bool {
        !self.broken.load(Ordering::Acquire)
    }

    fn probe(&self) -> Result<(), StoreError> {
        let t = self.trees()?;
        let now = crate::audit::now_ms().to_be_bytes();
        self.guard(t.meta.insert(PROBE, &now).map_err(StoreError::from))?;
        self.guard(t.db.flush().map_err(StoreError::from))?;
        Ok(())
    }
}

impl Trees {
    /// Everything, with unreadable records set aside.
    fn load(&self) -> Result<Snapshot, StoreError> {
        let (mut snap, bad) = self.read_all()?;
        check_counters(&snap)?;
        snap.quarantined = self.quarantine(bad)?;
        Ok(snap)
    }

    /// Every record that decodes, and the rows that do not.
    fn read_all(&self) -> Result<(Snapshot, Vec<BadRecord>), StoreError> {
        let t = self;
        let mut snap = Snapshot {
            revision: read_u64(&t.meta, REVISION)?,
            ..Default::default()
        };
        let mut bad = Vec::new();
        for (k, v) in rows(&t.nodes)? {
            keep(&mut snap.nodes, decode(&k, &v), ("nodes", &k, &v), &mut bad);
        }
        for (k, v) in rows(&t.statuses)? {
            let id = String::from_utf8_lossy(&k).into_owned();
            let status = decode(&k, &v).map(|s: NodeStatus| (id, s));
            keep(&mut snap.statuses, status, ("statuses", &k, &v), &mut bad);
        }
        for (k, v) in rows(&t.rules)? {
            keep(&mut snap.rules, decode(&k, &v), ("rules", &k, &v), &mut bad);
        }
        snap.rules.sort_by_key(|r| r.seq);
        for (k, v) in rows(&t.rollouts)? {
            keep(
                &mut snap.rollouts,
                decode(&k, &v),
                ("rollouts", &k, &v),
                &mut bad,
            );
        }
        snap.rollouts.sort_by_key(|d| d.seq);
        for (k, v) in rows(&t.configs)? {
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
        for (k, v) in rows(&t.releases)? {
            keep(
                &mut releases,
                decode(&k, &v),
                ("releases", &k, &v),
                &mut bad,
            );
        }
        Ok((snap, bad))
    }

    /// Applies `change` in one transaction (not flushed). Sequence numbers continue above
    /// `seq_floor`, which learns every number handed out.
    fn commit(&self, change: &Change, seq_floor: &AtomicU64) -> Result<Vec<Event>, StoreError> {
        let t = self;
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
        let mut deployment_rows = Vec::with_capacity(change.rollouts.len());
        for d in &change.rollouts {
            deployment_rows.push((d.seq.to_be_bytes(), encode(&d.id, d)?));
        }
        let mut config_rows = Vec::with_capacity(change.configs.len());
        for c in &change.configs {
            config_rows.push((c.key(), encode(&c.key(), c)?));
        }
        let trees = (
            &t.nodes,
            &t.rules,
            &t.events,
            &t.meta,
            &t.releases,
            &t.rollouts,
            &t.configs,
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
                        .unwrap_or(0)
                        .max(seq_floor.load(Ordering::Acquire));
                    for new in &change.events {
                        seq += 1;
                        let event = Event::stamp(seq, new.clone());
                        let row = serde_json::to_vec(&event)
                            .map_err(ConflictableTransactionError::Abort)?;
                        events.insert(&seq.to_be_bytes(), row)?;
                        stored.push(event);
                    }
                    meta.insert(AUDIT_SEQ, &seq.to_be_bytes())?;
                    // Visible in sled's memory from here on, committed or not.
                    seq_floor.fetch_max(seq, Ordering::AcqRel);
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
        Ok(stored)
    }

    /// See `Store::prune_events`. Events are in sequence order and stamped as they are
    /// numbered, so the oldest are at the front: stop at the first one kept.
    fn prune_events(&self, keep: u64, before_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let newest = read_u64(&self.meta, AUDIT_SEQ)?;
        let cutoff = newest.saturating_sub(keep);
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for row in self.events.iter() {
            let (k, v) = row?;
            let seq = <[u8; 8]>::try_from(k.as_ref()).map_or(0, u64::from_be_bytes);
            let stale =
                seq <= cutoff || decode::<Event>(&k, &v).map_or(true, |e| e.time_ms < before_ms);
            if !stale || n >= limit {
                break;
            }
            batch.remove(k);
            n += 1;
        }
        if n > 0 {
            self.events.apply_batch(batch)?;
        }
        Ok(n)
    }

    /// Audit events after `after_seq` that pass `filter`, at most `limit`.
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
}

impl Trees {
    /// Moves unreadable records into the quarantine tree (copy first, then remove, so a
    /// crash in between only quarantines a record twice) and flushes.
    fn quarantine(&self, bad: Vec<BadRecord>) -> Result<Vec<Quarantined>, StoreError> {
        let mut out = Vec::with_capacity(bad.len());
        for b in bad {
            let tree = self
                .named(b.tree)
                .ok_or_else(|| StoreError::Inconsistent(format!("unknown tree {}", b.tree)))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::NewEvent;
    use crate::layers::ConfigLayer;
    use crate::node::{HealthRecord, NodeRecord, WeightRule};
    use crate::rollout::Rollout;

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
        round_trips::<Rollout>("rollout");
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
        let mut rollout: Rollout = crate::arbitrary::Gen::new(1)
            .make()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        rollout.steps = vec![crate::rollout::Step::Analysis(
            crate::analysis::AnalysisSpec {
                max_p99_latency_ms: f64::INFINITY,
                ..Default::default()
            },
        )];
        let refused = store.commit(Change {
            rollouts: vec![rollout],
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
        assert!(snap.statuses.is_empty() && snap.rollouts.is_empty());
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
            let t = store.trees()?;
            t.statuses.insert(
                "gw-1",
                br#"{"acked_revision":1,"nacked":null,"last_seen_ms":0,"modules":{"m":{"acked_revision":1,"nacked":null,"transfer":null,"health":{"at_ms":1,"probe_successes":1,"probe_failures":0,"latency_p50_ms":null,"latency_p99_ms":null,"process_state":"running","restarts":0,"log_matches":0,"slot":"a","version":"1.0.0","detail":""}}}}"#.as_slice(),
            )?;
            t.nodes.insert("gw-2", b"{not json".as_slice())?;
            t.db.flush()?;
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
        assert!(store.trees()?.quarantine.get(b"nodes\0gw-2")?.is_some());
        drop(store);
        assert!(SledStore::open(dir.path())?.load()?.quarantined.is_empty());
        Ok(())
    }

    /// sled drops a damaged log entry and all after it, and opens cleanly: one flipped
    /// byte used to bring the control plane back older and empty without a word.
    #[test]
    fn a_store_damaged_anywhere_refuses_to_open_rather_than_come_back_older() -> anyhow::Result<()>
    {
        let base = tempfile::tempdir()?;
        {
            let store = SledStore::open(base.path())?;
            for i in 0..40u64 {
                store.commit(Change {
                    nodes: vec![NodeRecord {
                        node_id: format!("gw-{i}"),
                        ..Default::default()
                    }],
                    revision: Some(i + 1),
                    events: vec![NewEvent::new("admin/a", "nodes.set_weight", "module/m", "")],
                    durable: true,
                    ..Default::default()
                })?;
            }
        }
        let db = std::fs::read(base.path().join("meta.sled/db"))?;
        let (mut refused, mut intact) = (0, 0);
        for offset in (0..db.len()).step_by(db.len() / 40) {
            let dir = tempfile::tempdir()?;
            std::fs::create_dir(dir.path().join("meta.sled"))?;
            for f in ["conf", "db"] {
                std::fs::copy(
                    base.path().join("meta.sled").join(f),
                    dir.path().join("meta.sled").join(f),
                )?;
            }
            std::fs::copy(
                base.path().join("watermark.json"),
                dir.path().join("watermark.json"),
            )?;
            let mut bytes = db.clone();
            bytes[offset] ^= 0x01;
            std::fs::write(dir.path().join("meta.sled/db"), bytes)?;
            match SledStore::open(dir.path()).and_then(|s| s.load()) {
                Err(_) => refused += 1,
                Ok(snap) => {
                    // Only a flip in unused space may open, and then with everything.
                    assert_eq!(
                        (snap.nodes.len(), snap.revision),
                        (40, 40),
                        "flip at {offset}"
                    );
                    intact += 1;
                }
            }
        }
        assert!(refused > intact, "{refused} refused, {intact} intact");
        Ok(())
    }

    #[test]
    fn counters_behind_their_records_are_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let store = SledStore::open(dir.path())?;
            store.commit(Change {
                events: vec![NewEvent::new("a", "b", "c", "d"); 3],
                durable: true,
                ..Default::default()
            })?;
            let t = store.trees()?;
            t.meta.insert(AUDIT_SEQ, &1u64.to_be_bytes())?;
            t.db.flush()?;
        }
        std::fs::remove_file(dir.path().join("watermark.json"))?;
        let err = SledStore::open(dir.path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("audit event 3 exists but the counter says 1"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn the_audit_log_keeps_the_newest_by_count_and_age() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = SledStore::open(dir.path())?;
        store.commit(Change {
            events: vec![NewEvent::new("a", "b", "c", "d"); 10],
            durable: true,
            ..Default::default()
        })?;
        let seqs = |s: &SledStore| -> anyhow::Result<Vec<u64>> {
            Ok(s.events(0, &EventFilter::default(), 100)?
                .iter()
                .map(|e| e.seq)
                .collect())
        };
        assert_eq!(store.prune_events(7, 0, 2)?, 2);
        assert_eq!(seqs(&store)?, (3..=10).collect::<Vec<_>>());
        assert_eq!(store.prune_events(7, 0, 100)?, 1);
        assert_eq!(seqs(&store)?, (4..=10).collect::<Vec<_>>());
        assert_eq!(store.prune_events(100, u64::MAX, 100)?, 7);
        assert!(seqs(&store)?.is_empty());
        // Numbers go on; nothing is reused and the counters stay consistent.
        let next = store.commit(Change {
            events: vec![NewEvent::new("a", "b", "c", "d")],
            durable: true,
            ..Default::default()
        })?;
        assert_eq!(next[0].seq, 11);
        drop(store);
        SledStore::open(dir.path())?.load()?;
        Ok(())
    }
}
