//! Why the store failed: the one error type of `store/`, apart so that the crate's
//! error can wrap it without importing the store.

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
    /// The store holds less than it had acknowledged: sled dropped part of its log (a
    /// damaged file, or an older copy put in its place).
    #[error("the store is behind what it acknowledged: it holds {found}, but {expected} was committed (watermark.json). Its files were damaged or replaced by an older copy; it will not start and serve a fleet that silently lost data. Restore a backup (aviary-control-plane restore), or accept the loss with aviary-control-plane check --accept-loss")]
    Behind {
        /// Counters in the store.
        found: String,
        /// Counters acknowledged before.
        expected: String,
    },
    /// Records contradict the counters that number them.
    #[error("the store is inconsistent: {0}")]
    Inconsistent(String),
    /// The store is closed after an I/O error and could not be reopened yet.
    #[error("store unavailable after an I/O error: {0}")]
    Unavailable(String),
    /// A watermark, backup or other store file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl StoreError {
    /// True for errors of the disk or of sled itself (as opposed to a bad record):
    /// sled keeps failing after one of those until it is reopened.
    pub(crate) fn is_io(&self) -> bool {
        matches!(
            self,
            StoreError::Sled(
                sled::Error::Io(_) | sled::Error::Corruption { .. } | sled::Error::ReportableBug(_)
            ) | StoreError::Unavailable(_)
        )
    }
}
