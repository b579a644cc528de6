//! Modules on the edge: verified installs into slots (`install`), payloads arriving over
//! the fleet stream (`receive`), the on-disk layout and its atomic switch (`slots`).

mod install;
mod receive;
mod slots;

use std::path::{Path, PathBuf};

pub use install::{Checked, Installer, Outcome, Verdict};
pub use receive::{partial_transfers, PartialRecord, Receiving};
pub use slots::{AppliedConfig, ModuleState, Modules, Slot};

/// Why a module update was refused. Its text is the NACK reason the control plane shows.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// No trusted release key signed this manifest (or it was changed after signing).
    #[error("manifest signature refused: {0}")]
    Signature(String),
    /// The manifest breaks a rule (bad module name, version, ...).
    #[error("manifest refused: {0}")]
    Manifest(aviary_proto::manifest::ManifestError),
    /// Built for another architecture than this node's.
    #[error("artifact is for {offered}, this node is {node}")]
    ForeignTarget {
        /// The manifest's target.
        offered: String,
        /// This node's.
        node: String,
    },
    /// Older than what runs (only an ordered rollback may go back).
    #[error("downgrade refused: {offered} is older than the installed {current}")]
    Downgrade {
        /// Installed version.
        current: String,
        /// Offered version.
        offered: String,
    },
    /// The same version with other bytes.
    #[error("version {version} is installed with sha256 {installed}; other bytes under the same version are refused")]
    VersionConflict {
        /// The version.
        version: String,
        /// sha256 of the installed artifact.
        installed: String,
    },
    /// More payload bytes than declared.
    #[error("payload is bigger than its declared {declared} bytes")]
    PayloadTooLarge {
        /// Declared size.
        declared: u64,
    },
    /// A payload declared larger than any payload of the signed artifact can be.
    #[error("payload of {declared} bytes refused: the signed artifact is {artifact} bytes, so its payload is at most {max}")]
    PayloadOverSigned {
        /// Declared payload size.
        declared: u64,
        /// Signed artifact size.
        artifact: u64,
        /// The most a payload of it may be.
        max: u64,
    },
    /// The payload is not the declared bytes.
    #[error("payload sha256 {found} ({size} bytes) is not the declared {declared}")]
    PayloadMismatch {
        /// Declared sha256.
        declared: String,
        /// Received sha256.
        found: String,
        /// Received size.
        size: u64,
    },
    /// A delta for a base this node does not run.
    #[error("delta needs base {base}, which is not the installed artifact")]
    BaseMissing {
        /// The base the delta names.
        base: String,
    },
    /// The payload could not be applied (corrupt patch, wrong base, ...).
    #[error("payload cannot be applied: {0}")]
    Payload(String),
    /// The result is not what the signed manifest says.
    #[error("result refused: {0}")]
    ResultMismatch(String),
    /// The new version was installed but never became ready; the previous one runs.
    #[error("new version not ready: {0}")]
    NotReady(String),
    /// The new version was installed, never became ready, and the node went back to the
    /// slot it kept (which runs again).
    #[error("new version not ready: {0}")]
    RolledBack(String),
    /// No previous slot (with the ordered version) to roll back to.
    #[error("module {0} has no previous slot with that version to roll back to")]
    NoPrevious(String),
    /// The state dir is full.
    #[error("no space left on the state dir ({path})")]
    NoSpace {
        /// Where the write failed.
        path: PathBuf,
    },
    /// A bundle file is damaged.
    #[error("bundle refused: {0}")]
    Bundle(String),
    /// A state file is damaged.
    #[error("{path}: corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Another I/O failure.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl InstallError {
    pub(crate) fn from_io(path: &Path, source: std::io::Error) -> InstallError {
        if source.raw_os_error() == Some(28) || source.kind() == std::io::ErrorKind::StorageFull {
            InstallError::NoSpace {
                path: path.to_owned(),
            }
        } else {
            InstallError::Io {
                path: path.to_owned(),
                source,
            }
        }
    }

    pub(crate) fn from_delta(path: &Path, e: aviary_proto::delta::DeltaError) -> InstallError {
        use aviary_proto::delta::DeltaError;
        match e {
            DeltaError::Io(source) => InstallError::from_io(path, source),
            DeltaError::ResultMismatch { .. } | DeltaError::HeaderMismatch { .. } => {
                InstallError::ResultMismatch(e.to_string())
            }
            other => InstallError::Payload(other.to_string()),
        }
    }
}
