//! The node's certificate over its life: when to ask for the next one (two-thirds of
//! the way through, with jitter so a fleet enrolled together does not renew together),
//! what to do with the answer (check it, write it whole, present it at the next
//! handshake without dropping the stream), and what to do once it has expired (enroll
//! again, by the policy the node enrolled under).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aviary_certs::{ClientIdentity, NodeKey};
use aviary_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::enroll::{identity_paths, EnrollOptions};
use crate::EdgeError;

/// A renewal not answered within this long is asked for again.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The node's certificate and how to renew it.
pub(crate) struct Renewal {
    identity: Arc<ClientIdentity>,
    /// The key the certificate in use certifies.
    key: Mutex<Arc<NodeKey>>,
    /// With key rotation: the key of the renewal asked for (also in `edge-ID.key.next`).
    next: Mutex<Option<Arc<NodeKey>>>,
    rotate_key: bool,
    trust_domain: String,
    enroll: EnrollOptions,
    keepalive: Duration,
}

/// Where a rotating renewal keeps its new key until the certificate for it is written.
fn next_key_path(key: &Path) -> PathBuf {
    key.with_extension("key.next")
}

/// Finishes (or undoes) a key rotation a crash interrupted: a certificate already
/// written for the new key keeps it; otherwise the new key is dropped.
pub(crate) fn finish_rotation(cert: &Path, key: &Path) -> Result<(), EdgeError> {
    let next = next_key_path(key);
    if !next.exists() {
        return Ok(());
    }
    let io = |source| EdgeError::State {
        path: next.clone(),
        source,
    };
    if ClientIdentity::load(cert, &next).is_ok() {
        std::fs::rename(&next, key).map_err(io)?;
        tracing::info!("finished a key rotation a restart interrupted");
    } else {
        std::fs::remove_file(&next).map_err(io)?;
    }
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Renewal {
    /// For the certificate `identity` holds; `enroll` is how to get a new one once it
    /// has expired.
    pub(crate) fn new(
        identity: Arc<ClientIdentity>,
        enroll: EnrollOptions,
        keepalive: Duration,
        rotate_key: bool,
    ) -> Result<Renewal, EdgeError> {
        let (key_path, _) = identity_paths(&enroll.certs, &enroll.node_id);
        let (key, _) = NodeKey::load_or_create(&key_path)?;
        let trust_domain = aviary_certs::trust_domain_of(&enroll.certs.join("ca.pem"))?;
        Ok(Renewal {
            identity,
            key: Mutex::new(Arc::new(key)),
            next: Mutex::new(None),
            rotate_key,
            trust_domain,
            enroll,
            keepalive,
        })
    }

    /// How to reach the control plane now: the trust bundle as `ca.pem` holds it, and
    /// whatever certificate is current at each handshake.
    pub(crate) fn link(&self) -> Result<aviary_certs::Link, EdgeError> {
        let roots = aviary_certs::ca_roots(&self.enroll.certs.join("ca.pem"))?;
        let tls = aviary_certs::reloading_client_config(roots, self.identity.clone())?;
        Ok(
            aviary_certs::Link::with_config(&self.enroll.control_plane, tls)?
                .keepalive(self.keepalive),
        )
    }

    /// Takes a trust bundle sent on the stream: written to `ca.pem` (for the next
    /// handshake) if it is new and signed by a CA this node trusts now. True if taken.
    pub(crate) fn take_bundle(&self, bundle: &pb::TrustBundle) -> Result<bool, EdgeError> {
        let path = self.enroll.certs.join("ca.pem");
        let current = std::fs::read_to_string(&path).map_err(|source| EdgeError::State {
            path: path.clone(),
            source,
        })?;
        if current == bundle.bundle_pem {
            return Ok(false);
        }
        let signed = aviary_certs::SignedBundle {
            pem: bundle.bundle_pem.clone(),
            signatures: bundle.signatures.clone(),
        };
        let cas = signed.verify(&current, &self.trust_domain)?;
        aviary_certs::write_file(&path, signed.pem.as_bytes(), 0o644)?;
        tracing::info!(?cas, "trust bundle updated");
        metrics::counter!("aviary_edge_trust_bundles_total").increment(1);
        Ok(true)
    }

    /// How long until the certificate in use should be renewed: two-thirds of its
    /// lifetime, ±5 %.
    pub(crate) fn due_in(&self) -> Duration {
        let Ok((not_before, not_after)) = self.identity.validity() else {
            return Duration::ZERO;
        };
        let life = not_after.saturating_sub(not_before);
        let jitter = (fastrand::f64() - 0.5) * 0.1;
        let at = not_before + ((life as f64) * (2.0 / 3.0 + jitter)) as u64;
        Duration::from_millis(at.saturating_sub(now_ms()))
    }

    /// How long to wait for an answer before asking again.
    pub(crate) fn answer_timeout(&self) -> Duration {
        ANSWER_TIMEOUT
    }

    /// True once the certificate in use is past its end.
    pub(crate) fn expired(&self) -> bool {
        self.identity
            .validity()
            .is_ok_and(|(_, not_after)| now_ms() >= not_after)
    }

    /// The renewal request: a CSR for the key the node holds, or, rotating, for a new
    /// key made now (kept 0600 beside the old one until its certificate arrives).
    pub(crate) fn request(&self) -> Result<pb::CertificateRequest, EdgeError> {
        let key = if self.rotate_key {
            let (key_path, _) = identity_paths(&self.enroll.certs, &self.enroll.node_id);
            let (next, _) = NodeKey::load_or_create(&next_key_path(&key_path))?;
            let next = Arc::new(next);
            *self.next.lock().unwrap_or_else(|p| p.into_inner()) = Some(next.clone());
            next
        } else {
            self.key.lock().unwrap_or_else(|p| p.into_inner()).clone()
        };
        Ok(pb::CertificateRequest {
            csr: key.csr(&self.enroll.node_id, &self.trust_domain)?,
        })
    }

    /// Checks and installs an issued certificate: written whole, then presented from
    /// the next handshake on.
    pub(crate) fn install(&self, issued: &pb::IssuedCertificate) -> Result<(), EdgeError> {
        if !issued.refused.is_empty() {
            return Err(EdgeError::Enrollment(format!(
                "renewal refused: {}",
                issued.refused
            )));
        }
        let next = self.next.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let key = next
            .clone()
            .unwrap_or_else(|| self.key.lock().unwrap_or_else(|p| p.into_inner()).clone());
        key.check_certificate(
            &issued.certificate_pem,
            &self.enroll.node_id,
            &self.trust_domain,
        )?;
        let (key_path, cert_path) = identity_paths(&self.enroll.certs, &self.enroll.node_id);
        // Rotating: certificate first, then the key (`finish_rotation` completes a crash
        // in between).
        aviary_certs::write_file(&cert_path, issued.certificate_pem.as_bytes(), 0o644)?;
        if let Some(next) = next {
            std::fs::rename(next_key_path(&key_path), &key_path).map_err(|source| {
                EdgeError::State {
                    path: key_path.clone(),
                    source,
                }
            })?;
            *self.key.lock().unwrap_or_else(|p| p.into_inner()) = next;
            *self.next.lock().unwrap_or_else(|p| p.into_inner()) = None;
            tracing::info!(key = %key.fingerprint(), "key rotated");
        }
        self.identity.reload()?;
        metrics::counter!("aviary_edge_renewals_total").increment(1);
        tracing::info!(cert = %cert_path.display(), "certificate renewed");
        Ok(())
    }

    /// The certificate expired (the daemon was off, or cut off, past its end): enroll
    /// again with the same key, and present the new certificate. False on shutdown.
    pub(crate) async fn reenroll(&self, shutdown: &CancellationToken) -> Result<bool, EdgeError> {
        tracing::warn!("certificate expired; enrolling again");
        if !crate::enroll::enroll(&self.enroll, shutdown).await? {
            return Ok(false);
        }
        self.identity.reload()?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rotation cut between writing the certificate and moving the key is finished at
    /// start; one cut before the certificate was written is undone.
    #[test]
    fn an_interrupted_key_rotation_is_finished_or_undone() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        aviary_certs::Pki::init(dir.path(), &Default::default())?;
        let issuer = aviary_certs::NodeIssuer::open(dir.path())?;
        let (key_path, cert_path) = identity_paths(dir.path(), "gw-1");
        let issue = |key: &NodeKey| -> Result<(), Box<dyn std::error::Error>> {
            let csr = aviary_certs::CheckedCsr::parse(&key.csr("gw-1", "aviary.local")?)?;
            let pem = issuer.issue("gw-1", &csr, Duration::from_secs(60))?.pem;
            aviary_certs::write_file(&cert_path, pem.as_bytes(), 0o644)?;
            Ok(())
        };
        let (old, _) = NodeKey::load_or_create(&key_path)?;
        issue(&old)?;
        // Cut before the certificate: the new key goes.
        let (next, _) = NodeKey::load_or_create(&next_key_path(&key_path))?;
        finish_rotation(&cert_path, &key_path)?;
        assert!(!next_key_path(&key_path).exists());
        assert_eq!(
            NodeKey::load_or_create(&key_path)?.0.fingerprint(),
            old.fingerprint()
        );
        // Cut after it: the new key stays, under the key's name.
        let (next2, _) = NodeKey::load_or_create(&next_key_path(&key_path))?;
        assert_ne!(next2.fingerprint(), next.fingerprint());
        issue(&next2)?;
        finish_rotation(&cert_path, &key_path)?;
        assert_eq!(
            NodeKey::load_or_create(&key_path)?.0.fingerprint(),
            next2.fingerprint()
        );
        assert!(ClientIdentity::load(&cert_path, &key_path).is_ok());
        Ok(())
    }
}
