//! Aviary's private PKI: one CA per deployment, mTLS identities carried as SPIFFE URI SANs
//! (`spiffe://<trust-domain>/edge/<node-id>`, `.../admin/<name>`), the TLS 1.3 configs
//! every binary uses, the mTLS channel built on them (`Link`), and the ed25519
//! release-signing key pair.
//!
//! Architecture invariant: only this crate turns certificates into identities; servers
//! trust the `Identity` it returns and nothing else about a peer.
#![forbid(unsafe_code)]

pub mod ca;
mod enroll;
mod error;
mod files;
pub use files::write_file;
mod identity;
mod link;
mod pki;
mod reload;
mod signing;
mod tls;

pub use ca::{ca_fingerprint, SignedBundle};
pub use enroll::{key_fingerprint, CheckedCsr, Issued, NodeIssuer, NodeKey, MAX_CSR_BYTES};
pub use error::CertsError;
pub use identity::{validate_name, Identity};
pub use link::{Link, LinkError};
pub use pki::{
    issue_admin, issue_edge, reissue_server, CertPaths, EdgeMinter, InitOptions, Pki, LONG_LIVED,
};
pub use reload::{reloading_client_config, validity_ms, ClientIdentity};
pub use signing::{
    generate_release_key, PublicKey, ReleaseKeyPaths, ReleaseSigner, TrustedKeys,
    UntrustedSignature,
};
pub use tls::{
    anonymous_client_config, ca_roots, client_config, client_config_with, server_config,
    server_config_refusing, trust_domain_of, Refuse, TlsFiles,
};
