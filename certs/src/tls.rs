//! rustls configurations shared by every Aviary binary: TLS 1.3 only, ring provider,
//! client certificates required by servers, ALPN h2.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::pki::trust_domain_from_der;
use crate::CertsError;

/// The three files one side of an mTLS connection needs.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The deployment CA (`ca.pem`).
    pub ca: PathBuf,
    /// This side's certificate.
    pub cert: PathBuf,
    /// This side's private key.
    pub key: PathBuf,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(CertsError::Pem {
            path: path.to_owned(),
            reason: "no certificate in file".into(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_error(path, e))
}

fn pem_error(path: &Path, e: rustls::pki_types::pem::Error) -> CertsError {
    match e {
        rustls::pki_types::pem::Error::Io(source) => CertsError::Io {
            path: path.to_owned(),
            source,
        },
        other => CertsError::Pem {
            path: path.to_owned(),
            reason: other.to_string(),
        },
    }
}

fn roots(ca: &Path) -> Result<RootCertStore, CertsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// Says why a client certificate (DER, already verified against the CA) is refused,
/// or `None`: the server's own list of who is out (revoked nodes).
pub type Refuse = Arc<dyn Fn(&[u8]) -> Option<String> + Send + Sync>;

/// Server side: TLS 1.3; a client certificate, when one is shown, must chain to the
/// deployment CA. A peer may show none (a gateway that has not enrolled yet): the
/// server's authorisation layer then lets it enroll and nothing else.
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, CertsError> {
    server_config_refusing(files, Arc::new(|_: &[u8]| None))
}

/// Like `server_config`, also failing the handshake of a certificate `refuse` names:
/// a revoked node never gets as far as HTTP/2.
pub fn server_config_refusing(
    files: &TlsFiles,
    refuse: Refuse,
) -> Result<ServerConfig, CertsError> {
    let inner =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&files.ca)?), provider())
            .allow_unauthenticated()
            .build()?;
    let verifier = Arc::new(RefusingVerifier { inner, refuse });
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Client side: TLS 1.3, trusts only the deployment CA, presents `files.cert`.
pub fn client_config(files: &TlsFiles) -> Result<ClientConfig, CertsError> {
    client_config_with(
        Arc::new(roots(&files.ca)?),
        load_certs(&files.cert)?,
        load_key(&files.key)?,
    )
}

/// Client side without a certificate: TLS 1.3, trusts only `roots`. For enrollment, the
/// one call made before a gateway has a certificate.
pub fn anonymous_client_config(roots: Arc<RootCertStore>) -> Result<ClientConfig, CertsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The deployment CA as a root store (load once, share between many client configs).
pub fn ca_roots(ca: &Path) -> Result<Arc<RootCertStore>, CertsError> {
    Ok(Arc::new(roots(ca)?))
}

/// Client side from in-memory parts (e.g. an `EdgeMinter` identity).
pub fn client_config_with(
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ClientConfig, CertsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The trust domain of the deployment whose CA certificate is at `ca_pem`.
pub fn trust_domain_of(ca_pem: &Path) -> Result<String, CertsError> {
    let certs = load_certs(ca_pem)?;
    certs
        .iter()
        .find_map(|c| trust_domain_from_der(c.as_ref()))
        .ok_or_else(|| CertsError::Pem {
            path: ca_pem.to_owned(),
            reason: "CA certificate names no spiffe:// trust domain (made by aviary-certs?)".into(),
        })
}

/// A client verifier that adds the server's refusals to the CA's verdict.
struct RefusingVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    refuse: Refuse,
}

impl std::fmt::Debug for RefusingVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RefusingVerifier")
    }
}

impl rustls::server::danger::ClientCertVerifier for RefusingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        match (self.refuse)(end_entity.as_ref()) {
            Some(reason) => Err(rustls::Error::General(reason)),
            None => Ok(verified),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
