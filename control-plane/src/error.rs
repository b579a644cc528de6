//! The control plane's error type and its one mapping to gRPC status codes.

/// Everything a control-plane operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// The request is malformed; the message says which field and why.
    #[error("{0}")]
    InvalidArgument(String),
    /// A node, event or other named thing does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The caller's identity may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The named thing exists already with other content.
    #[error("{0}")]
    AlreadyExists(String),
    /// A size or space limit refuses the request.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The request conflicts with the current state (e.g. a rollout owns the module).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Overloaded or shutting down; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// The metadata store failed; nothing was acknowledged.
    #[error("store: {0}")]
    Store(#[from] crate::store::error::StoreError),
    /// TLS or PKI files could not be loaded.
    #[error("certificates: {0}")]
    Certs(#[from] aviary_certs::CertsError),
    /// A socket could not be bound or served.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl From<ControlPlaneError> for tonic::Status {
    fn from(e: ControlPlaneError) -> tonic::Status {
        use ControlPlaneError::*;
        match &e {
            InvalidArgument(m) => tonic::Status::invalid_argument(m.clone()),
            NotFound(_) => tonic::Status::not_found(e.to_string()),
            PermissionDenied(m) => tonic::Status::permission_denied(m.clone()),
            FailedPrecondition(m) => tonic::Status::failed_precondition(m.clone()),
            AlreadyExists(m) => tonic::Status::already_exists(m.clone()),
            ResourceExhausted(m) => tonic::Status::resource_exhausted(m.clone()),
            Unavailable(m) => tonic::Status::unavailable(m.clone()),
            // The disk failed: nothing was acknowledged, and a retry may succeed.
            Store(s) if s.is_io() => {
                tracing::error!(error = %e, "store unavailable");
                tonic::Status::unavailable(format!("{e}; nothing was changed, retry later"))
            }
            Store(_) | Certs(_) | Io { .. } | Transport(_) => {
                tracing::error!(error = %e, "internal error");
                tonic::Status::internal(e.to_string())
            }
        }
    }
}
