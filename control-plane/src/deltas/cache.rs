//! The payloads on disk: `DIR/<name>.zst` with its `DIR/<name>.json` (a `PayloadInfo`),
//! indexed in memory as a least-recently-used set bounded in bytes.
//!
//! A payload handed out is pinned until its last `Payload` clone drops (a transfer holds
//! one), and eviction skips pinned entries, so a file is never deleted under a node that
//! is still receiving it. Entries found on disk at start are served only after their
//! bytes hashed to what their info says: a payload cached before a crash or on a failing
//! disk is rebuilt, never sent broken.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aviary_proto::bundle::PayloadInfo;

use super::Payload;
use crate::error::ControlPlaneError;

/// One cached payload.
struct Entry {
    payload: Payload,
    /// Logical time of the last use (higher is more recent).
    used: u64,
    /// Its bytes were written or checked by this process.
    verified: bool,
}

/// What the cache knows of a name.
pub(super) enum Lookup {
    /// Ready to send.
    Ready(Payload),
    /// On disk from an earlier run, not yet checked.
    Unverified(Payload),
    /// Not cached.
    Missing,
}

/// The payload files of one directory, bounded to `limit` bytes of unpinned payloads.
pub(super) struct Cache {
    dir: PathBuf,
    limit: u64,
    bytes: u64,
    clock: u64,
    entries: HashMap<String, Entry>,
}

impl Cache {
    /// Indexes the payloads already in `dir` (created if missing), oldest first by
    /// modification time, dropping leftovers of interrupted writes and entries whose
    /// file does not have the size its info names; then evicts down to `limit`.
    pub(super) fn load(dir: &Path, limit: u64) -> Result<Cache, ControlPlaneError> {
        std::fs::create_dir_all(dir).map_err(super::io(dir))?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(super::io(dir))? {
            let path = entry.map_err(super::io(dir))?.path();
            let Some(file) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if file.starts_with(".tmp") {
                remove(&path);
                continue;
            }
            let Some(name) = file.strip_suffix(".json") else {
                if let Some(name) = file.strip_suffix(".zst") {
                    if !dir.join(format!("{name}.json")).exists() {
                        remove(&path);
                    }
                }
                continue;
            };
            let data = dir.join(format!("{name}.zst"));
            let info = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<PayloadInfo>(&b).ok());
            let meta = std::fs::metadata(&data).ok();
            match (info, meta) {
                (Some(info), Some(meta)) if meta.len() == info.size => {
                    let age = meta.modified().ok();
                    found.push((age, name.to_owned(), info, data));
                }
                _ => {
                    tracing::warn!(
                        payload = name,
                        "dropping a cached payload whose files do not match"
                    );
                    remove(&path);
                    remove(&data);
                }
            }
        }
        found.sort_by_key(|f| f.0);
        let mut cache = Cache {
            dir: dir.to_owned(),
            limit,
            bytes: 0,
            clock: 0,
            entries: HashMap::new(),
        };
        for (_, name, info, path) in found {
            cache.add(name, Payload::new(info, path), false);
        }
        cache.evict();
        Ok(cache)
    }

    /// The paths a payload named `name` lives at (data, info).
    pub(super) fn paths(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{name}.zst")),
            self.dir.join(format!("{name}.json")),
        )
    }

    /// Looks `name` up, marking it used.
    pub(super) fn get(&mut self, name: &str) -> Lookup {
        self.clock += 1;
        match self.entries.get_mut(name) {
            Some(e) => {
                e.used = self.clock;
                if e.verified {
                    Lookup::Ready(e.payload.clone())
                } else {
                    Lookup::Unverified(e.payload.clone())
                }
            }
            None => Lookup::Missing,
        }
    }

    /// Records a payload whose files are written and checked, then evicts what the
    /// limit no longer holds.
    pub(super) fn insert(&mut self, name: String, payload: Payload) {
        if let Some(old) = self.entries.remove(&name) {
            self.bytes -= old.payload.info.size;
        }
        self.add(name, payload, true);
        self.evict();
    }

    /// Forgets `name` and deletes its files (a cached payload that failed its check), the
    /// info file first so an interrupted delete leaves an orphan the next start removes.
    pub(super) fn discard(&mut self, name: &str) {
        if let Some(e) = self.entries.remove(name) {
            self.bytes -= e.payload.info.size;
        }
        let (data, info) = self.paths(name);
        remove(&info);
        remove(&data);
    }

    /// Bytes of every payload indexed.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    fn add(&mut self, name: String, payload: Payload, verified: bool) {
        self.clock += 1;
        self.bytes += payload.info.size;
        self.entries.insert(
            name,
            Entry {
                payload,
                used: self.clock,
                verified,
            },
        );
    }

    /// Deletes least recently used, unpinned payloads until the rest fit the limit.
    fn evict(&mut self) {
        while self.bytes > self.limit {
            let victim = self
                .entries
                .iter()
                .filter(|(_, e)| Arc::strong_count(&e.payload.pin) == 1)
                .min_by_key(|(_, e)| e.used)
                .map(|(name, _)| name.clone());
            let Some(name) = victim else {
                tracing::debug!(
                    bytes = self.bytes,
                    limit = self.limit,
                    "payload cache over its limit: the rest are being sent"
                );
                return;
            };
            tracing::debug!(payload = %name, "evicting a cached payload");
            metrics::counter!("aviary_delta_cache_evictions_total").increment(1);
            self.discard(&name);
        }
    }
}

/// Deletes `path`; one already gone is not an error.
fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "could not delete a cached payload");
        }
    }
}
