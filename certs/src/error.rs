//! The one error type of the PKI crate.

use std::path::PathBuf;

/// What went wrong making, reading or using Aviary certificates and keys.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file exists that `init` would overwrite.
    #[error("{path} already exists: refusing to overwrite a PKI (use another --dir)")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rcgen could not build or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused a configuration.
    #[error("tls configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The client verifier could not be built (e.g. an empty CA file).
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// A node or admin name, or a trust domain, is not acceptable.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        /// "node id", "admin name", "trust domain".
        what: &'static str,
        /// The offending value.
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A certificate carries no Aviary identity.
    #[error("certificate has no aviary identity: {0}")]
    NoIdentity(String),
    /// A certificate signing request is malformed, forged or of a kind not taken.
    #[error("certificate signing request refused: {0}")]
    Csr(String),
    /// ring refused to make a key.
    #[error("key generation failed")]
    KeyGen,
}

impl CertsError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| CertsError::Io { path, source }
    }
}
