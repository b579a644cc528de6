//! Enrollment from the gateway's side: make a key here (0600, never sent), send only a
//! CSR, and write the certificate the control plane issues beside the key.
//!
//! With a bootstrap token the certificate comes at once. Without one (or once the
//! token is refused) the request waits for an admin's accept, asked again with backoff;
//! the key stays the same across restarts, so the request an admin sees stays valid.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aviary_certs::{Link, NodeKey};
use aviary_proto::v1 as pb;
use pb::enrollment_client::EnrollmentClient;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::EdgeError;

/// What enrolling needs.
#[derive(Clone, Debug)]
pub struct EnrollOptions {
    /// Control plane URL.
    pub control_plane: String,
    /// The certs directory: `ca.pem` in, `edge-ID.key` and `edge-ID.pem` out.
    pub certs: PathBuf,
    /// The node id to ask for.
    pub node_id: String,
    /// A bootstrap token, if the gateway was given one.
    pub token: Option<String>,
    /// Labels to show the approver (the control plane decides the real ones).
    pub labels: BTreeMap<String, String>,
}

/// The key and certificate paths of `node_id` in `certs`.
pub fn identity_paths(certs: &Path, node_id: &str) -> (PathBuf, PathBuf) {
    (
        certs.join(format!("edge-{node_id}.key")),
        certs.join(format!("edge-{node_id}.pem")),
    )
}

/// True when the daemon must enroll before it can connect: it has the CA to check the
/// control plane with, but no certificate and key of its own.
pub fn needs_enrollment(certs: &Path, node_id: &str) -> bool {
    let (key, cert) = identity_paths(certs, node_id);
    certs.join("ca.pem").exists() && !(key.exists() && cert.exists())
}

/// Enrolls until a certificate is written, the request is refused for good, or
/// `shutdown`. Returns whether a certificate was written.
pub async fn enroll(opts: &EnrollOptions, shutdown: &CancellationToken) -> Result<bool, EdgeError> {
    let (key_path, cert_path) = identity_paths(&opts.certs, &opts.node_id);
    let ca = opts.certs.join("ca.pem");
    let (key, created) = NodeKey::load_or_create(&key_path)?;
    let fingerprint = key.fingerprint();
    tracing::info!(node = %opts.node_id, key = %fingerprint, new_key = created, "enrolling");
    let trust_domain = aviary_certs::trust_domain_of(&ca)?;
    let csr = key.csr(&opts.node_id, &trust_domain)?;
    let config = aviary_certs::anonymous_client_config(aviary_certs::ca_roots(&ca)?)?;
    let link = Link::with_config(&opts.control_plane, config)?;
    let mut token = opts.token.clone();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let request = pb::EnrollRequest {
            node_id: opts.node_id.clone(),
            csr: csr.clone(),
            token: token.clone().unwrap_or_default(),
            labels: opts.labels.clone().into_iter().collect(),
        };
        let answer = match link.connect().await {
            Ok(channel) => EnrollmentClient::new(channel)
                .enroll(request)
                .await
                .map(tonic::Response::into_inner),
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        };
        let mut wait = backoff.next_delay();
        match answer {
            Ok(a) if a.state == pb::EnrollState::Issued as i32 => {
                key.check_certificate(&a.certificate_pem, &opts.node_id, &trust_domain)?;
                aviary_certs::write_file(&cert_path, a.certificate_pem.as_bytes(), 0o644)?;
                tracing::info!(node = %opts.node_id, cert = %cert_path.display(), "enrolled");
                return Ok(true);
            }
            Ok(a) => {
                tracing::info!(node = %opts.node_id, key = %fingerprint,
                    "enrollment pending: waiting for an admin to accept this key");
                backoff.reset();
                wait = wait.max(Duration::from_secs(u64::from(
                    a.retry_after_seconds.min(300),
                )));
            }
            Err(status) if status.code() == tonic::Code::PermissionDenied && token.is_some() => {
                // The token is spent, expired or revoked: wait for an admin instead.
                tracing::warn!(
                    reason = status.message(),
                    "enrollment token refused; asking for approval instead"
                );
                token = None;
                continue;
            }
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::PermissionDenied | tonic::Code::InvalidArgument
                ) =>
            {
                return Err(EdgeError::Enrollment(status.message().to_owned()));
            }
            Err(status) => {
                tracing::info!(code = ?status.code(), reason = status.message(),
                    "enrollment failed; retrying");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
