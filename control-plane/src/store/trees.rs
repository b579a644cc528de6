//! sled's trees and what is read from and written to them in one pass: the snapshot at
//! start (with quarantine of unreadable records and the counter checks), an atomic
//! commit, the audit log's pages and pruning. `SledStore` adds the reopen-after-error
//! discipline on top.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use super::watermark::Watermark;
use super::{decode, encode, Change, Quarantined, Snapshot, StoreError};
use crate::audit::{Event, EventFilter};
use crate::layers::sort;
use crate::node::NodeStatus;
use crate::release::ReleaseRecord;

pub(super) const TREES: [&str; 11] = [
    "nodes",
    "statuses",
    "rules",
    "events",
    "meta",
    "releases",
    "rollouts",
    "configs",
    "requests",
    "enrollment",
    "quarantine",
];

/// Key prefixes of the `enrollment` tree.
const REQUEST_PREFIX: &str = "request/";
const TOKEN_PREFIX: &str = "token/";

const REVISION: &[u8] = b"revision";
pub(super) const AUDIT_SEQ: &[u8] = b"audit_seq";
/// Written by `probe`: a write that proves the disk takes writes again.
pub(super) const PROBE: &[u8] = b"probe";

/// The open sled database and its trees.
pub(super) struct Trees {
    pub(super) db: sled::Db,
    pub(super) nodes: sled::Tree,
    pub(super) statuses: sled::Tree,
    pub(super) rules: sled::Tree,
    pub(super) events: sled::Tree,
    pub(super) meta: sled::Tree,
    pub(super) releases: sled::Tree,
    pub(super) rollouts: sled::Tree,
    pub(super) configs: sled::Tree,
    /// Request ids of mutations (`crate::requests`), by `caller\0id`.
    pub(super) requests: sled::Tree,
    /// Enrollment requests (`request/NODE`) and bootstrap tokens (`token/ID`).
    pub(super) enrollment: sled::Tree,
    /// Unreadable records, keyed `TREE\0KEY`, kept byte for byte for an operator.
    pub(super) quarantine: sled::Tree,
}

impl Trees {
    /// Opens (or creates) the sled database in `dir`.
    pub(super) fn open(dir: &Path) -> Result<Trees, StoreError> {
        let config = sled::Config::new()
            .path(dir.join("meta.sled"))
            // Small: the working set lives in the registry, sled is the log of record.
            .cache_capacity(64 << 20);
        // sled's background threads keep the file lock a moment after the last handle
        // of this process is dropped (a reopen after an I/O error, a restore): wait for
        // it, boundedly. Another process holding it still fails, a second later.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        let db = loop {
            match config.open() {
                Err(sled::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => break other?,
            }
        };
        Ok(Trees {
            nodes: db.open_tree("nodes")?,
            statuses: db.open_tree("statuses")?,
            rules: db.open_tree("rules")?,
            events: db.open_tree("events")?,
            meta: db.open_tree("meta")?,
            releases: db.open_tree("releases")?,
            rollouts: db.open_tree("rollouts")?,
            configs: db.open_tree("configs")?,
            requests: db.open_tree("requests")?,
            enrollment: db.open_tree("enrollment")?,
            quarantine: db.open_tree("quarantine")?,
            db,
        })
    }

    /// Every tree by name (the names `TREES` lists), for check and backup.
    pub(super) fn all(&self) -> [(&'static str, &sled::Tree); 11] {
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
            &self.requests,
            &self.enrollment,
            &self.quarantine,
        ];
        std::array::from_fn(|i| (TREES[i], trees[i]))
    }

    pub(super) fn named(&self, name: &str) -> Option<&sled::Tree> {
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
            "requests" => decode::<crate::requests::RequestRecord>(k, v).map(drop),
            "enrollment" if k.starts_with(TOKEN_PREFIX.as_bytes()) => {
                decode::<crate::enrollment::TokenRecord>(k, v).map(drop)
            }
            "enrollment" => decode::<crate::enrollment::EnrollmentRecord>(k, v).map(drop),
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
pub(super) fn check_counters(snap: &Snapshot) -> Result<(), StoreError> {
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

pub(super) fn rows_with_prefix(
    tree: &sled::Tree,
    prefix: &[u8],
) -> Result<Vec<(sled::IVec, sled::IVec)>, StoreError> {
    tree.scan_prefix(prefix)
        .collect::<Result<Vec<_>, _>>()
        .map_err(StoreError::from)
}

/// A record that could not be read, on its way to the `quarantine` tree.
pub(super) struct BadRecord {
    tree: &'static str,
    key: Vec<u8>,
    value: Vec<u8>,
    error: String,
}

/// Every row of `tree`. A row sled itself cannot read is an error (the store is broken);
/// rows whose value Aviary cannot decode are the caller's to quarantine.
pub(super) fn rows(tree: &sled::Tree) -> Result<Vec<(sled::IVec, sled::IVec)>, StoreError> {
    tree.iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(StoreError::from)
}

/// Pushes a decoded record, or sets an undecodable one aside with its reason.
pub(super) fn keep<T>(
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

pub(super) fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<u64, StoreError> {
    Ok(tree
        .get(key)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0))
}

impl Trees {
    /// Everything, with unreadable records set aside.
    pub(super) fn load(&self) -> Result<Snapshot, StoreError> {
        let (mut snap, bad) = self.read_all()?;
        check_counters(&snap)?;
        snap.quarantined = self.quarantine(bad)?;
        Ok(snap)
    }

    /// Every record that decodes, and the rows that do not.
    pub(super) fn read_all(&self) -> Result<(Snapshot, Vec<BadRecord>), StoreError> {
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
        for (k, v) in rows(&t.enrollment)? {
            let row = ("enrollment", &k[..], &v[..]);
            if k.starts_with(TOKEN_PREFIX.as_bytes()) {
                keep(&mut snap.tokens, decode(&k, &v), row, &mut bad);
            } else {
                keep(&mut snap.enrollments, decode(&k, &v), row, &mut bad);
            }
        }
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
    pub(super) fn commit(
        &self,
        change: &Change,
        seq_floor: &AtomicU64,
    ) -> Result<Vec<Event>, StoreError> {
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
        let mut enrollment_rows = Vec::new();
        for r in &change.enrollments {
            let key = format!("{REQUEST_PREFIX}{}", r.node_id);
            enrollment_rows.push((encode(&key, r)?, key));
        }
        for t in &change.tokens {
            let key = format!("{TOKEN_PREFIX}{}", t.id);
            enrollment_rows.push((encode(&key, t)?, key));
        }
        let forget: Vec<String> = change
            .forget_enrollments
            .iter()
            .map(|n| format!("{REQUEST_PREFIX}{n}"))
            .collect();
        let trees = (
            &t.nodes,
            &t.rules,
            &t.events,
            &t.meta,
            &t.releases,
            &t.rollouts,
            &t.configs,
            &t.requests,
            &t.enrollment,
        );
        let result = trees.transaction(
            |(nodes, rules, events, meta, releases, rollouts, configs, requests, enrollment)| {
                for key in &forget {
                    enrollment.remove(key.as_bytes())?;
                }
                for (v, k) in &enrollment_rows {
                    enrollment.insert(k.as_bytes(), v.as_slice())?;
                }
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
                if let Some(request) = &change.request {
                    let mut request = request.clone();
                    request.event_seq = stored.first().map_or(0, |e| e.seq);
                    let row = serde_json::to_vec(&request)
                        .map_err(ConflictableTransactionError::Abort)?;
                    requests.insert(request.key.as_bytes(), row)?;
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
    pub(super) fn prune_events(
        &self,
        keep: u64,
        before_ms: u64,
        limit: usize,
    ) -> Result<usize, StoreError> {
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

    /// See `Store::prune_requests`.
    pub(super) fn prune_requests(&self, before_ms: u64) -> Result<usize, StoreError> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for row in self.requests.iter() {
            let (k, v) = row?;
            let old = decode::<crate::requests::RequestRecord>(&k, &v)
                .map_or(true, |r| r.at_ms < before_ms);
            if old {
                batch.remove(k);
                n += 1;
            }
        }
        if n > 0 {
            self.requests.apply_batch(batch)?;
        }
        Ok(n)
    }

    /// Audit events after `after_seq` that pass `filter`, at most `limit`.
    pub(super) fn events(
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
    pub(super) fn quarantine(&self, bad: Vec<BadRecord>) -> Result<Vec<Quarantined>, StoreError> {
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
