//! The edge daemon's error type.

use std::path::PathBuf;

/// What can stop the edge daemon or one of its operations.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// Certificates could not be loaded.
    #[error("certificates: {0}")]
    Certs(#[from] aviary_certs::CertsError),
    /// The control-plane URL is unusable.
    #[error("--control-plane {url}: {reason}")]
    ControlPlaneUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A state file could not be read or written.
    #[error("{path}: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A state file exists but is not valid JSON of the expected shape.
    #[error("{path}: corrupt state file: {source}")]
    CorruptState {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// A socket could not be bound.
    #[error("{context}: {source}")]
    Bind {
        /// Which flag.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A weight assignment was refused (it is NACKed; the old weights stay).
    #[error("invalid weight assignment: {0}")]
    InvalidAssignment(String),
    /// The control plane refused to enroll this gateway (rejected, revoked, malformed).
    #[error("enrollment refused: {0}")]
    Enrollment(String),
    /// The connection to the control plane failed.
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
}

impl From<aviary_certs::LinkError> for EdgeError {
    fn from(e: aviary_certs::LinkError) -> EdgeError {
        match e {
            aviary_certs::LinkError::Url { url, reason } => {
                EdgeError::ControlPlaneUrl { url, reason }
            }
            aviary_certs::LinkError::Certs(e) => EdgeError::Certs(e),
            aviary_certs::LinkError::Connect(e) => EdgeError::Connect(e),
        }
    }
}
