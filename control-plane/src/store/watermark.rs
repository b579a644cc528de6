//! `watermark.json` beside the sled files: the counters of the last durable commit.
//!
//! sled checks every log entry and, finding a damaged one, drops it and everything after
//! it, as it would a torn write: flip one byte and the store opens cleanly, older, with
//! its counters consistent with its records. Only a record kept outside sled can tell.
//! It is written after each durable commit (never ahead of what sled holds), so a store
//! whose counters are below it lost acknowledged data.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::StoreError;

/// File name in the data dir.
const FILE: &str = "watermark.json";

/// The store's counters: the desired-state revision and the last audit sequence number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Watermark {
    /// Highest revision handed out.
    pub(crate) revision: u64,
    /// Highest audit sequence number handed out.
    pub(crate) audit_seq: u64,
}

impl Watermark {
    /// True if `self` lacks anything `other` counted.
    pub(crate) fn behind(&self, other: &Watermark) -> bool {
        self.revision < other.revision || self.audit_seq < other.audit_seq
    }

    /// The larger of each counter.
    pub(crate) fn max(self, other: Watermark) -> Watermark {
        Watermark {
            revision: self.revision.max(other.revision),
            audit_seq: self.audit_seq.max(other.audit_seq),
        }
    }
}

impl std::fmt::Display for Watermark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "revision {} and audit event {}",
            self.revision, self.audit_seq
        )
    }
}

fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// The watermark of the store in `dir`; `None` if it never had one (a new store, or one
/// from before watermarks).
pub(super) fn read(dir: &Path) -> Result<Option<Watermark>, StoreError> {
    let path = path(dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StoreError::Codec {
                key: path.display().to_string(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::File { path, source }),
    }
}

/// Replaces the watermark atomically (temp file, fsync, rename, fsync dir).
pub(super) fn write(dir: &Path, mark: &Watermark) -> Result<(), StoreError> {
    let path = path(dir);
    let tmp = dir.join(format!("{FILE}.tmp"));
    let err = |source| StoreError::File {
        path: path.clone(),
        source,
    };
    let bytes = serde_json::to_vec(mark).map_err(|source| StoreError::Codec {
        key: FILE.into(),
        source,
    })?;
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}
