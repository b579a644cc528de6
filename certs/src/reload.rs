//! A client certificate that can change under a running client: the files are read
//! again after a renewal, new handshakes present the newest pair, and connections
//! already open keep the one they were made with (as Envoy SDS swaps certificates).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};
use x509_parser::prelude::FromDer;

use crate::CertsError;

/// A certificate and key on disk, loaded, and reloadable.
#[derive(Debug)]
pub struct ClientIdentity {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ClientIdentity {
    /// Loads `cert` and `key`.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<ClientIdentity>, CertsError> {
        Ok(Arc::new(ClientIdentity {
            current: RwLock::new(Arc::new(certified(cert, key)?)),
            cert: cert.to_owned(),
            key: key.to_owned(),
        }))
    }

    /// Reads the files again; the next handshake presents what they hold now. On an
    /// error the pair in use stays.
    pub fn reload(&self) -> Result<(), CertsError> {
        let fresh = Arc::new(certified(&self.cert, &self.key)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// The validity of the certificate in use, as Unix ms (not before, not after).
    pub fn validity(&self) -> Result<(u64, u64), CertsError> {
        let current = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let der = current
            .cert
            .first()
            .ok_or_else(|| CertsError::NoIdentity("empty certificate chain".into()))?;
        validity_ms(der.as_ref())
    }
}

/// Not before and not after of a DER certificate, as Unix ms (0 before 1970).
pub fn validity_ms(der: &[u8]) -> Result<(u64, u64), CertsError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| CertsError::NoIdentity(format!("unparsable certificate: {e}")))?;
    let ms = |t: x509_parser::time::ASN1Time| (t.timestamp().max(0) as u64).saturating_mul(1000);
    Ok((
        ms(cert.validity().not_before),
        ms(cert.validity().not_after),
    ))
}

fn certified(cert: &Path, key: &Path) -> Result<CertifiedKey, CertsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| CertsError::Pem {
            path: cert.to_owned(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(CertsError::Pem {
            path: cert.to_owned(),
            reason: "no certificate in file".into(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| CertsError::Pem {
        path: key.to_owned(),
        reason: e.to_string(),
    })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)?;
    let pair = CertifiedKey::new(chain, signing);
    // A certificate for another key would fail every handshake: refuse it here.
    pair.keys_match().map_err(|e| CertsError::Pem {
        path: cert.to_owned(),
        reason: format!("does not match {}: {e}", key.display()),
    })?;
    Ok(pair)
}

impl ResolvesClientCert for ClientIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Client side: TLS 1.3, trusts `roots`, presents whatever `identity` holds at each
/// handshake.
pub fn reloading_client_config(
    roots: Arc<RootCertStore>,
    identity: Arc<ClientIdentity>,
) -> Result<ClientConfig, CertsError> {
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_cert_resolver(identity);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
