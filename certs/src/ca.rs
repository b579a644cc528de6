//! CA rotation without an outage, in three file operations on the CA's directory (the
//! control plane's `--certs`), each picked up by a running control plane:
//!
//! 1. `rotate`: a new CA with a new key joins the trust bundle (`ca.pem` holds both);
//!    `ca.key` becomes the new key and the old one stays as `ca-previous.key`. The
//!    control plane issues renewals from the new CA, trusts both, and sends gateways
//!    the bundle signed by both keys.
//! 2. `server`: the control plane's own certificate is issued again by the new CA
//!    (gateways trust it by then).
//! 3. `retire`: once no node holds an old-CA certificate (`aviary ca status`), the old
//!    CA leaves the bundle and its key is deleted.
//!
//! Invariant: the issuing CA is the certificate in `ca.pem` whose key is `ca.key`; every
//! key in the directory signs the bundle, so a gateway verifies it with a CA it already
//! trusts.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use x509_parser::prelude::FromDer;

use crate::files::write_file;
use crate::pki::{dn, LONG_LIVED};
use crate::CertsError;

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `sha256:<hex>` of a CA certificate (DER): how rotation names CAs.
pub fn ca_fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    format!("sha256:{}", hex(digest.as_ref()))
}

fn read(path: &Path) -> Result<String, CertsError> {
    std::fs::read_to_string(path).map_err(CertsError::io(path))
}

fn key_of(path: &Path) -> Result<KeyPair, CertsError> {
    KeyPair::from_pem(&read(path)?).map_err(|e| CertsError::Pem {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// The CA certificates of a bundle, in file order.
pub fn bundle_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertsError::Csr(format!("trust bundle: {e}")))?;
    if certs.is_empty() {
        return Err(CertsError::Csr("trust bundle holds no certificate".into()));
    }
    Ok(certs)
}

/// The raw public key of a certificate.
pub(crate) fn public_key_of(der: &[u8]) -> Result<Vec<u8>, CertsError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| CertsError::NoIdentity(format!("unparsable certificate: {e}")))?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

/// The certificate of `bundle` whose public key is `key`'s.
pub(crate) fn cert_for_key<'a>(
    bundle: &'a [CertificateDer<'static>],
    key: &KeyPair,
) -> Option<&'a CertificateDer<'static>> {
    bundle
        .iter()
        .find(|c| public_key_of(c.as_ref()).is_ok_and(|pk| pk == key.public_key_raw()))
}

fn to_pem(certs: &[CertificateDer<'_>]) -> String {
    certs
        .iter()
        .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.as_ref().to_vec())))
        .collect()
}

/// Step 1: a new CA joins the bundle and becomes the issuer. Refused while a rotation is
/// under way (`ca-previous.key` exists).
pub fn rotate(dir: &Path) -> Result<String, CertsError> {
    let previous = dir.join("ca-previous.key");
    if previous.exists() {
        return Err(CertsError::Exists { path: previous });
    }
    let ca_pem = dir.join("ca.pem");
    let bundle = bundle_certs(&read(&ca_pem)?)?;
    let td = crate::tls::trust_domain_of(&ca_pem)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let now = time::OffsetDateTime::now_utc();
    params.distinguished_name = dn(&format!("Aviary CA ({td}) {}", now.unix_timestamp()));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into()?)];
    params.not_before = now - time::Duration::minutes(5);
    params.not_after =
        now + time::Duration::try_from(LONG_LIVED).unwrap_or(time::Duration::days(3650));
    let cert = params.self_signed(&key)?;
    // Old key aside first: a crash between the writes leaves both keys on disk.
    write_file(&previous, read(&dir.join("ca.key"))?.as_bytes(), 0o600)?;
    let mut all = bundle;
    all.push(cert.der().clone());
    write_file(&ca_pem, to_pem(&all).as_bytes(), 0o644)?;
    write_file(&dir.join("ca.key"), key.serialize_pem().as_bytes(), 0o600)?;
    Ok(ca_fingerprint(cert.der()))
}

/// Step 3: every CA but the issuing one leaves the bundle; `ca-previous.key` is deleted.
pub fn retire(dir: &Path) -> Result<Vec<String>, CertsError> {
    let ca_pem = dir.join("ca.pem");
    let bundle = bundle_certs(&read(&ca_pem)?)?;
    let key = key_of(&dir.join("ca.key"))?;
    let issuing = cert_for_key(&bundle, &key)
        .ok_or_else(|| CertsError::Csr("no certificate in ca.pem matches ca.key".into()))?
        .clone();
    let retired: Vec<String> = bundle
        .iter()
        .filter(|c| *c != &issuing)
        .map(|c| ca_fingerprint(c.as_ref()))
        .collect();
    write_file(&ca_pem, to_pem(&[issuing]).as_bytes(), 0o644)?;
    match std::fs::remove_file(dir.join("ca-previous.key")) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(CertsError::Io {
                path: dir.join("ca-previous.key"),
                source,
            })
        }
    }
    Ok(retired)
}

/// The issuing CA of `dir` as an rcgen issuer, its fingerprint, and the trust domain.
pub(crate) fn issuing(
    dir: &Path,
) -> Result<(Issuer<'static, KeyPair>, String, String), CertsError> {
    let ca_pem = dir.join("ca.pem");
    let bundle = bundle_certs(&read(&ca_pem)?)?;
    let key = key_of(&dir.join("ca.key"))?;
    let cert = cert_for_key(&bundle, &key)
        .ok_or_else(|| CertsError::Pem {
            path: ca_pem.clone(),
            reason: "no certificate in it matches ca.key".into(),
        })?
        .clone();
    let fingerprint = ca_fingerprint(cert.as_ref());
    let td = crate::tls::trust_domain_of(&ca_pem)?;
    let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(|e| CertsError::Pem {
        path: ca_pem,
        reason: e.to_string(),
    })?;
    Ok((issuer, fingerprint, td))
}

/// A trust bundle as sent to gateways: the PEM and a signature by each CA key the
/// control plane holds (ECDSA P-256, SHA-256, ASN.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedBundle {
    /// `ca.pem`.
    pub pem: String,
    /// One signature per CA key, over `pem`'s bytes.
    pub signatures: Vec<Vec<u8>>,
}

impl SignedBundle {
    /// Reads `ca.pem` and signs it with `ca.key` and, during a rotation,
    /// `ca-previous.key`.
    pub fn load(dir: &Path) -> Result<SignedBundle, CertsError> {
        let pem = read(&dir.join("ca.pem"))?;
        bundle_certs(&pem)?;
        let mut signatures = Vec::new();
        for name in ["ca.key", "ca-previous.key"] {
            let path = dir.join(name);
            if name == "ca-previous.key" && !path.exists() {
                continue;
            }
            let pkcs8 = key_of(&path)?.serialize_der();
            let rng = ring::rand::SystemRandom::new();
            let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
                &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                &pkcs8,
                &rng,
            )
            .map_err(|e| CertsError::Pem {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            let sig = pair
                .sign(&rng, pem.as_bytes())
                .map_err(|_| CertsError::KeyGen)?;
            signatures.push(sig.as_ref().to_vec());
        }
        Ok(SignedBundle { pem, signatures })
    }

    /// Checks that one signature verifies under a CA of `trusted` (the bundle the
    /// gateway holds now) and that the new bundle is one of CA certificates of the same
    /// trust domain. Returns the new bundle's CA fingerprints.
    pub fn verify(&self, trusted: &str, trust_domain: &str) -> Result<Vec<String>, CertsError> {
        let mut signed = false;
        for ca in bundle_certs(trusted)? {
            let pk = public_key_of(ca.as_ref())?;
            let key = ring::signature::UnparsedPublicKey::new(
                &ring::signature::ECDSA_P256_SHA256_ASN1,
                pk,
            );
            if self
                .signatures
                .iter()
                .any(|s| key.verify(self.pem.as_bytes(), s).is_ok())
            {
                signed = true;
                break;
            }
        }
        if !signed {
            return Err(CertsError::Csr(
                "trust bundle not signed by a CA this gateway trusts".into(),
            ));
        }
        let certs = bundle_certs(&self.pem)?;
        for c in &certs {
            let td = crate::pki::trust_domain_from_der(c.as_ref());
            if td.as_deref() != Some(trust_domain) {
                return Err(CertsError::Csr(format!(
                    "trust bundle holds a CA of another trust domain ({td:?})"
                )));
            }
        }
        Ok(certs.iter().map(|c| ca_fingerprint(c.as_ref())).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotation_adds_a_ca_issues_from_it_signs_with_both_and_retires_the_old(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        crate::Pki::init(dir.path(), &crate::InitOptions::default())?;
        let before = read(&dir.path().join("ca.pem"))?;
        let (_, old_fp, _) = issuing(dir.path())?;
        let new_fp = rotate(dir.path())?;
        assert!(
            rotate(dir.path()).is_err(),
            "a second rotation while one is under way"
        );
        let (_, issuing_fp, _) = issuing(dir.path())?;
        assert_eq!(issuing_fp, new_fp);
        let bundle = SignedBundle::load(dir.path())?;
        assert_eq!(bundle.signatures.len(), 2);
        // A gateway that trusts only the old CA takes it.
        assert_eq!(
            bundle.verify(&before, "aviary.local")?,
            [old_fp.clone(), new_fp.clone()]
        );
        let mut forged = bundle.clone();
        forged.pem.push('\n');
        assert!(forged.verify(&before, "aviary.local").is_err());
        assert!(bundle.verify(&before, "other.local").is_err());
        assert_eq!(retire(dir.path())?, [old_fp]);
        let after = SignedBundle::load(dir.path())?;
        assert_eq!(after.signatures.len(), 1);
        // A gateway already on the two-CA bundle takes the one-CA bundle.
        assert_eq!(after.verify(&bundle.pem, "aviary.local")?, [new_fp]);
        Ok(())
    }
}
