//! Enrollment's two halves of X.509: the gateway makes its own key and a certificate
//! signing request (`NodeKey`), and the control plane signs what it decided, not what
//! the request asked for (`NodeIssuer`).
//!
//! Invariants:
//! * A node's private key is made where it is used, written 0600 and never serialised
//!   anywhere else; only the CSR (public key plus a proof of possession) travels.
//! * An issued certificate names the identity the *control plane* chose: a CSR's subject,
//!   SANs and extensions are ignored, only its verified public key is used.

use std::path::Path;
use std::time::Duration;

use rcgen::{
    CertificateSigningRequestParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, PublicKeyData,
    SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::CertificateSigningRequestDer;

use crate::ca::hex;
use crate::files::write_file;
use crate::identity::validate_name;
use crate::pki::leaf_params;
use crate::{CertsError, Identity};

/// A CSR larger than this is not one of ours (a P-256 CSR is about 300 bytes).
pub const MAX_CSR_BYTES: usize = 4096;

/// `sha256:<hex>` of a raw public key: how operators compare a pending request with the
/// key on the gateway's screen.
pub fn key_fingerprint(public_key_raw: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, public_key_raw);
    format!("sha256:{}", hex(digest.as_ref()))
}

/// A gateway's own private key.
pub struct NodeKey {
    key: KeyPair,
}

impl NodeKey {
    /// Loads the key at `path`, or makes one there (0600, written whole or not at all).
    /// The flag says whether it was made now.
    pub fn load_or_create(path: &Path) -> Result<(NodeKey, bool), CertsError> {
        match std::fs::read_to_string(path) {
            Ok(pem) => {
                let key = KeyPair::from_pem(&pem).map_err(|e| CertsError::Pem {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })?;
                Ok((NodeKey { key }, false))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
                write_file(path, key.serialize_pem().as_bytes(), 0o600)?;
                Ok((NodeKey { key }, true))
            }
            Err(source) => Err(CertsError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// A key in memory only: for simulators and benchmarks of many gateways.
    pub fn generate() -> Result<NodeKey, CertsError> {
        Ok(NodeKey {
            key: KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?,
        })
    }

    /// The key for a TLS client configuration of this process (it never leaves it).
    pub fn tls_key(&self) -> rustls::pki_types::PrivateKeyDer<'static> {
        rustls::pki_types::PrivateKeyDer::Pkcs8(self.key.serialize_der().into())
    }

    /// The fingerprint of this key's public half (`key_fingerprint`).
    pub fn fingerprint(&self) -> String {
        key_fingerprint(self.key.public_key_raw())
    }

    /// A DER CSR for `node_id`, signed by this key (which proves the node holds it).
    pub fn csr(&self, node_id: &str, trust_domain: &str) -> Result<Vec<u8>, CertsError> {
        validate_name("node id", node_id)?;
        // What the node asks for, for an operator to read; the issuer decides anyway.
        let identity = Identity::Edge(node_id.to_owned());
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = crate::pki::dn(&identity.to_string());
        params.subject_alt_names = vec![rcgen::SanType::URI(
            identity.spiffe_uri(trust_domain).try_into()?,
        )];
        Ok(params.serialize_request(&self.key)?.der().to_vec())
    }
}

impl NodeKey {
    /// Checks that `pem` (an issued certificate) names `node_id` in `trust_domain` and
    /// certifies this key, before anything is written: a certificate for another key
    /// would lock the gateway out at its next handshake.
    pub fn check_certificate(
        &self,
        pem: &str,
        node_id: &str,
        trust_domain: &str,
    ) -> Result<(), CertsError> {
        let bad = |reason: String| CertsError::Csr(format!("issued certificate: {reason}"));
        let parsed = pem::parse(pem).map_err(|e| bad(e.to_string()))?;
        if parsed.tag() != "CERTIFICATE" {
            return Err(bad(format!("a {} block, not a CERTIFICATE", parsed.tag())));
        }
        let identity = Identity::from_cert_der(parsed.contents(), trust_domain)?;
        if identity != Identity::Edge(node_id.to_owned()) {
            return Err(bad(format!("it names {identity}, not edge/{node_id}")));
        }
        use x509_parser::prelude::FromDer;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(parsed.contents())
            .map_err(|e| bad(e.to_string()))?;
        if cert.public_key().subject_public_key.data.as_ref() != self.key.public_key_raw() {
            return Err(bad("it certifies another key".into()));
        }
        Ok(())
    }
}

/// A certificate signing request whose signature checked out.
#[derive(Clone, Debug)]
pub struct CheckedCsr {
    csr: CertificateSigningRequestParams,
    /// `key_fingerprint` of the requested key.
    pub fingerprint: String,
}

impl CheckedCsr {
    /// Parses a DER CSR and checks its proof of possession. Only ECDSA P-256 keys are
    /// taken: the key type every Aviary tool makes and every verifier here accepts.
    pub fn parse(der: &[u8]) -> Result<CheckedCsr, CertsError> {
        if der.len() > MAX_CSR_BYTES {
            return Err(CertsError::Csr(format!(
                "{} bytes; at most {MAX_CSR_BYTES}",
                der.len()
            )));
        }
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(der))
                .map_err(|e| CertsError::Csr(e.to_string()))?;
        if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(CertsError::Csr("the key must be ECDSA P-256".into()));
        }
        let fingerprint = key_fingerprint(csr.public_key.der_bytes());
        Ok(CheckedCsr { csr, fingerprint })
    }
}

/// A certificate the control plane issued.
#[derive(Clone, Debug)]
pub struct Issued {
    /// PEM, as written to `edge-ID.pem`.
    pub pem: String,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// End of validity (Unix ms).
    pub not_after_ms: u64,
    /// `ca_fingerprint` of the CA that signed it.
    pub ca: String,
}

/// Signs node certificates with the deployment CA (held by the control plane, which
/// decides who gets one).
pub struct NodeIssuer {
    issuer: Issuer<'static, KeyPair>,
    trust_domain: String,
    fingerprint: String,
}

impl NodeIssuer {
    /// Loads `ca.pem` and `ca.key` from `dir`.
    pub fn open(dir: &Path) -> Result<NodeIssuer, CertsError> {
        let (issuer, fingerprint, trust_domain) = crate::ca::issuing(dir)?;
        Ok(NodeIssuer {
            issuer,
            trust_domain,
            fingerprint,
        })
    }

    /// `ca_fingerprint` of the CA it issues from.
    pub fn ca_fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The trust domain it issues in.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// A client certificate for `node_id` on the key of `csr`, valid for `ttl`.
    pub fn issue(
        &self,
        node_id: &str,
        csr: &CheckedCsr,
        ttl: Duration,
    ) -> Result<Issued, CertsError> {
        validate_name("node id", node_id)?;
        let mut params = leaf_params(
            &Identity::Edge(node_id.to_owned()),
            &self.trust_domain,
            Vec::new(),
            &[ExtendedKeyUsagePurpose::ClientAuth],
            ttl,
        )?;
        let mut serial = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
            .map_err(|_| CertsError::KeyGen)?;
        // Positive and non-zero, as RFC 5280 asks.
        serial[0] = (serial[0] & 0x7f) | 0x40;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let not_after_ms = params
            .not_after
            .unix_timestamp()
            .saturating_mul(1000)
            .max(0) as u64;
        let cert = params.signed_by(&csr.csr.public_key, &self.issuer)?;
        Ok(Issued {
            pem: cert.pem(),
            serial: hex(&serial),
            not_after_ms,
            ca: self.fingerprint.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issuer_signs_the_key_it_was_sent_for_the_identity_it_chose(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        crate::Pki::init(dir.path(), &crate::InitOptions::default())?;
        let issuer = NodeIssuer::open(dir.path())?;
        let key_path = dir.path().join("node.key");
        let (key, created) = NodeKey::load_or_create(&key_path)?;
        assert!(created);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key_path)?.permissions().mode() & 0o777,
            0o600
        );
        let (again, created) = NodeKey::load_or_create(&key_path)?;
        assert!(!created);
        assert_eq!(key.fingerprint(), again.fingerprint());

        // The CSR asks for gw-1; the control plane decided gw-2: gw-2 it is.
        let csr = CheckedCsr::parse(&key.csr("gw-1", "aviary.local")?)?;
        assert_eq!(csr.fingerprint, key.fingerprint());
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64;
        let issued = issuer.issue("gw-2", &csr, Duration::from_secs(30))?;
        let der = pem::parse(&issued.pem).map_err(|e| e.to_string())?;
        assert_eq!(
            Identity::from_cert_der(der.contents(), "aviary.local")?,
            Identity::Edge("gw-2".into())
        );
        assert!(issued.not_after_ms >= before + 29_000 && issued.not_after_ms <= before + 31_000);
        assert_eq!(issued.serial.len(), 32);
        Ok(())
    }

    #[test]
    fn a_tampered_or_oversized_csr_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let (key, _) = NodeKey::load_or_create(&dir.path().join("k"))?;
        let mut csr = key.csr("gw-1", "aviary.local")?;
        let at = csr.len() - 80;
        csr[at] ^= 1;
        assert!(CheckedCsr::parse(&csr).is_err());
        assert!(CheckedCsr::parse(&[0u8; 10]).is_err());
        assert!(CheckedCsr::parse(&vec![0u8; MAX_CSR_BYTES + 1]).is_err());
        Ok(())
    }
}
