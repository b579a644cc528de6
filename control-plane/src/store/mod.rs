//! Durable metadata: nodes, weight rules, config layers, releases, rollouts, counters and
//! the audit log.
//!
//! `Store` is the seam for a replicated backend later; `SledStore` is the embedded default.
//! Invariants:
//! * `commit` is atomic across everything it touches and durable when it returns with
//!   `durable` set, so an acknowledged admin request survives `kill -9`.
//! * The store never serves what it cannot vouch for: damage found at start refuses the
//!   start (`StoreError::Behind`, `StoreError::Inconsistent`) or quarantines the one
//!   record; after an I/O error nothing is served from memory the disk may not hold.
//! * Audit sequence numbers are never handed out twice, whatever fails.

pub(crate) mod error;
pub mod maintenance;
mod sled_store;
mod trees;
mod watermark;

pub(crate) use error::StoreError;
pub(crate) use sled_store::SledStore;

use crate::audit::{Event, EventFilter, NewEvent};
use crate::enrollment::{EnrollmentRecord, TokenRecord};
use crate::layers::ConfigLayer;
use crate::node::{NodeRecord, NodeStatus, WeightRule};
use crate::release::ReleaseRecord;
use crate::requests::RequestRecord;
use crate::rollout::Rollout;

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
    /// Rollouts, sorted by `seq`.
    pub rollouts: Vec<Rollout>,
    /// Runtime config layers (tombstones included), in merge order.
    pub configs: Vec<ConfigLayer>,
    /// Enrollment requests, by node id.
    pub enrollments: Vec<EnrollmentRecord>,
    /// Bootstrap tokens (hashed).
    pub tokens: Vec<TokenRecord>,
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
    /// Rollouts to insert or replace (by seq).
    pub rollouts: Vec<Rollout>,
    /// Config layers to insert or replace (by key).
    pub configs: Vec<ConfigLayer>,
    /// Enrollment requests to insert or replace (by node id).
    pub enrollments: Vec<EnrollmentRecord>,
    /// Enrollment requests to delete (by node id).
    pub forget_enrollments: Vec<String>,
    /// Tokens to insert or replace (by id).
    pub tokens: Vec<TokenRecord>,
    /// New highest revision, if it moved.
    pub revision: Option<u64>,
    /// Audit events to append.
    pub events: Vec<NewEvent>,
    /// Flush to disk before returning (every acknowledged admin request).
    pub durable: bool,
    /// The request id this change answers (its `event_seq` is set as it commits).
    pub request: Option<RequestRecord>,
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
    /// Deletes the oldest audit events: those more than `keep` behind the newest, and
    /// those older than `before_ms` (Unix ms); at most `limit` per call. Returns how many.
    fn prune_events(&self, keep: u64, before_ms: u64, limit: usize) -> Result<usize, StoreError>;
    /// The request id `key` (`caller\0id`), if a committed mutation carried it.
    fn request(&self, key: &str) -> Result<Option<RequestRecord>, StoreError>;
    /// Forgets request ids committed before `before_ms` (Unix ms). Returns how many.
    fn prune_requests(&self, before_ms: u64) -> Result<usize, StoreError>;
    /// False from an I/O error until a write succeeds again.
    fn healthy(&self) -> bool;
    /// Tries a small durable write (reopening first if needed); `Ok` means writes work.
    fn probe(&self) -> Result<(), StoreError>;
    /// The 32-byte secret `name`, made once (randomly, durably) by whichever writer asks
    /// first and the same for every reader after: keys that must outlive a restart and be
    /// shared by replicas (page tokens).
    fn secret(&self, name: &str) -> Result<Vec<u8>, StoreError>;
}

/// Reads a record written by `encode`.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    key: &[u8],
    value: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|source| StoreError::Codec {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

/// Writes a record (refusing what `decode` could not read back: see `crate::finite`).
pub(crate) fn encode<T: serde::Serialize>(key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Codec {
        key: key.to_owned(),
        source,
    })
}
