//! Errors at the crate boundary: what stops the stub from serving.

use std::net::SocketAddr;

/// Why the stub could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum SensorError {
    /// The gRPC port could not be bound.
    #[error("--listen {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// `--certs` could not be loaded.
    #[error("--certs: {0}")]
    Certs(#[from] aviary_certs::CertsError),
    /// The pacer thread could not be started.
    #[error("pacer thread: {0}")]
    Pacer(std::io::Error),
    /// Reflection could not be set up.
    #[error("reflection: {0}")]
    Reflection(String),
    /// The gRPC server failed.
    #[error("serving: {0}")]
    Serve(#[from] tonic::transport::Error),
}
