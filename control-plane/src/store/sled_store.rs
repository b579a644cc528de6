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

use super::trees::{rows_with_prefix, Trees, PROBE};
use super::watermark::{self, Watermark};
use super::{decode, encode, Change, Snapshot, Store, StoreError};
use crate::audit::{Event, EventFilter};
use crate::node::NodeStatus;
use crate::release::{release_key, ReleaseRecord};
use crate::requests::RequestRecord;

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

    fn secret(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        let key = format!("secret/{name}");
        let t = self.trees()?;
        let mut fresh = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut fresh)
            .map_err(|_| StoreError::Unavailable("no randomness for a secret".into()))?;
        // Create-if-absent: a concurrent first caller's value wins, and both read it.
        let swapped = t
            .meta
            .compare_and_swap(key.as_bytes(), None::<&[u8]>, Some(&fresh[..]))
            .map_err(StoreError::from);
        let created = self.guard(swapped)?.is_ok();
        if created {
            self.guard(t.db.flush().map(drop).map_err(StoreError::from))?;
        }
        let stored = self.guard(t.meta.get(key.as_bytes()).map_err(StoreError::from))?;
        match stored {
            Some(v) if v.len() == 32 => Ok(v.to_vec()),
            _ => Err(StoreError::Inconsistent(format!(
                "meta {key} is not a 32-byte secret"
            ))),
        }
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

    fn request(&self, key: &str) -> Result<Option<RequestRecord>, StoreError> {
        let t = self.trees()?;
        let row = self.guard(t.requests.get(key.as_bytes()).map_err(StoreError::from))?;
        row.map(|v| decode(key.as_bytes(), &v)).transpose()
    }

    fn prune_requests(&self, before_ms: u64) -> Result<usize, StoreError> {
        let t = self.trees()?;
        self.guard(t.prune_requests(before_ms))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::NewEvent;
    use crate::layers::ConfigLayer;
    use crate::node::{HealthRecord, NodeRecord, WeightRule};
    use crate::rollout::Rollout;
    use crate::store::trees::AUDIT_SEQ;

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
        let mut rollout: Rollout = crate::rollout::sample(Vec::new());
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
