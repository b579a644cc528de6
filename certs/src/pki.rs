//! Minting the deployment CA and the certificates it signs, as PEM files in one directory.
//!
//! Layout (DESIGN.md): `ca.pem ca.key control-plane.pem control-plane.key admin.pem
//! admin.key release-signing.key release-signing.pub`, plus `edge-ID.*` and `admin-NAME.*`.
//! Keys are written 0600 through a temp file and a rename, so a crash never leaves half a
//! key behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};

use crate::files::write_file;
use crate::identity::{spiffe_uris, validate_name};
use crate::signing::generate_release_key;
use crate::{CertsError, Identity};

/// What `init` and the lab path (`aviary-certs edge`) issue for: ten years. Enrolled
/// nodes get the control plane's `--node-cert-ttl` instead, and renew it on the stream.
pub const LONG_LIVED: std::time::Duration = std::time::Duration::from_secs(3650 * 86_400);

/// Options of `aviary-certs init`.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// SPIFFE trust domain, e.g. `aviary.local`.
    pub trust_domain: String,
    /// DNS names or IP addresses the control plane answers on.
    pub sans: Vec<String>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            trust_domain: "aviary.local".to_owned(),
            sans: vec!["127.0.0.1".into(), "localhost".into(), "::1".into()],
        }
    }
}

/// A certificate and its key on disk.
#[derive(Clone, Debug)]
pub struct CertPaths {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM PKCS#8 private key (0600).
    pub key: PathBuf,
}

/// A PKI directory made by `init`.
#[derive(Clone, Debug)]
pub struct Pki {
    /// The directory holding every file.
    pub dir: PathBuf,
    /// Its trust domain.
    pub trust_domain: String,
}

impl Pki {
    /// Creates the CA, the control-plane and default admin certificates and the release
    /// key in `dir`. Refuses to overwrite an existing PKI.
    pub fn init(dir: &Path, opts: &InitOptions) -> Result<Pki, CertsError> {
        validate_trust_domain(&opts.trust_domain)?;
        std::fs::create_dir_all(dir).map_err(CertsError::io(dir))?;
        for name in ["ca.pem", "ca.key", "release-signing.key"] {
            let path = dir.join(name);
            if path.exists() {
                return Err(CertsError::Exists { path });
            }
        }
        let td = &opts.trust_domain;

        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name = dn(&format!("Aviary CA ({td})"));
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        // The CA names its trust domain so `edge`/`admin` can issue without being told it.
        ca.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into()?)];
        set_validity(&mut ca, LONG_LIVED);
        let ca_cert = ca.self_signed(&ca_key)?;
        write_file(&dir.join("ca.pem"), ca_cert.pem().as_bytes(), 0o644)?;
        write_file(
            &dir.join("ca.key"),
            ca_key.serialize_pem().as_bytes(),
            0o600,
        )?;
        let issuer = Issuer::new(ca, ca_key);

        let mut sans = Vec::new();
        for san in &opts.sans {
            sans.push(match san.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(san.as_str().try_into()?),
            });
        }
        issue(
            dir,
            "control-plane",
            &issuer,
            &Identity::ControlPlane,
            td,
            sans,
            &[ExtendedKeyUsagePurpose::ServerAuth],
        )?;
        issue(
            dir,
            "admin",
            &issuer,
            &Identity::Admin("admin".into()),
            td,
            Vec::new(),
            &[ExtendedKeyUsagePurpose::ClientAuth],
        )?;
        generate_release_key(dir)?;
        Ok(Pki {
            dir: dir.to_owned(),
            trust_domain: td.clone(),
        })
    }

    /// Opens an existing PKI directory (reads its trust domain from `ca.pem`).
    pub fn open(dir: &Path) -> Result<Pki, CertsError> {
        let trust_domain = crate::tls::trust_domain_of(&dir.join("ca.pem"))?;
        Ok(Pki {
            dir: dir.to_owned(),
            trust_domain,
        })
    }

    /// `ca.pem`.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The control plane's server certificate.
    pub fn control_plane(&self) -> CertPaths {
        paths(&self.dir, "control-plane")
    }

    /// The default admin certificate made by `init`.
    pub fn admin(&self) -> CertPaths {
        paths(&self.dir, "admin")
    }

    /// The certificate of edge node `id` (after `issue_edge`).
    pub fn edge(&self, id: &str) -> CertPaths {
        paths(&self.dir, &format!("edge-{id}"))
    }
}

/// `aviary-certs edge`: a client certificate for node `node_id`, signed by the CA in `dir`.
pub fn issue_edge(dir: &Path, node_id: &str) -> Result<CertPaths, CertsError> {
    validate_name("node id", node_id)?;
    let (issuer, td) = load_issuer(dir)?;
    issue(
        dir,
        &format!("edge-{node_id}"),
        &issuer,
        &Identity::Edge(node_id.to_owned()),
        &td,
        Vec::new(),
        &[ExtendedKeyUsagePurpose::ClientAuth],
    )
}

/// Mints edge identities in memory from a loaded CA: for fleet simulators that need
/// thousands of them without thousands of files.
pub struct EdgeMinter {
    issuer: Issuer<'static, KeyPair>,
    trust_domain: String,
}

impl EdgeMinter {
    /// Loads `ca.pem` and `ca.key` from `dir`.
    pub fn open(dir: &Path) -> Result<EdgeMinter, CertsError> {
        let (issuer, trust_domain) = load_issuer(dir)?;
        Ok(EdgeMinter {
            issuer,
            trust_domain,
        })
    }

    /// A certificate (DER) and PKCS#8 key (DER) for node `node_id`.
    pub fn mint(&self, node_id: &str) -> Result<(Vec<u8>, Vec<u8>), CertsError> {
        validate_name("node id", node_id)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = leaf_params(
            &Identity::Edge(node_id.to_owned()),
            &self.trust_domain,
            Vec::new(),
            &[ExtendedKeyUsagePurpose::ClientAuth],
            LONG_LIVED,
        )?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.der().to_vec(), key.serialize_der()))
    }
}

impl EdgeMinter {
    /// Like `mint`, valid only from `not_before` to `not_after` (Unix seconds): for
    /// showing that expired and not-yet-valid certificates are refused.
    pub fn mint_valid(
        &self,
        node_id: &str,
        not_before: i64,
        not_after: i64,
    ) -> Result<(Vec<u8>, Vec<u8>), CertsError> {
        validate_name("node id", node_id)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = leaf_params(
            &Identity::Edge(node_id.to_owned()),
            &self.trust_domain,
            Vec::new(),
            &[ExtendedKeyUsagePurpose::ClientAuth],
            LONG_LIVED,
        )?;
        let at = |secs: i64| {
            time::OffsetDateTime::from_unix_timestamp(secs)
                .map_err(|e| CertsError::Csr(format!("validity {secs}: {e}")))
        };
        params.not_before = at(not_before)?;
        params.not_after = at(not_after)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.der().to_vec(), key.serialize_der()))
    }
}

/// `aviary-certs admin`: a client certificate for operator `name`, valid for `ttl`.
pub fn issue_admin(dir: &Path, name: &str, ttl: Duration) -> Result<CertPaths, CertsError> {
    validate_name("admin name", name)?;
    let (issuer, td) = load_issuer(dir)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let params = leaf_params(
        &Identity::Admin(name.to_owned()),
        &td,
        Vec::new(),
        &[ExtendedKeyUsagePurpose::ClientAuth],
        ttl,
    )?;
    write_leaf(
        dir,
        &format!("admin-{name}"),
        &params.signed_by(&key, &issuer)?,
        &key,
    )
}

pub(crate) fn load_issuer(dir: &Path) -> Result<(Issuer<'static, KeyPair>, String), CertsError> {
    let (issuer, _, td) = crate::ca::issuing(dir)?;
    Ok((issuer, td))
}

/// `aviary-certs ca server`: the control plane's certificate issued again by the
/// issuing CA, with the DNS names and addresses of the one it replaces.
pub fn reissue_server(dir: &Path) -> Result<CertPaths, CertsError> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::FromDer;
    let old = paths(dir, "control-plane");
    let pem_text = std::fs::read_to_string(&old.cert).map_err(CertsError::io(&old.cert))?;
    let der = pem::parse(&pem_text).map_err(|e| CertsError::Pem {
        path: old.cert.clone(),
        reason: e.to_string(),
    })?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der.contents())
        .map_err(|e| CertsError::NoIdentity(format!("unparsable certificate: {e}")))?;
    let mut sans = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => sans.push(SanType::DnsName((*d).try_into()?)),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => sans.push(SanType::IpAddress(std::net::IpAddr::from(
                        <[u8; 4]>::try_from(*b).unwrap_or_default(),
                    ))),
                    16 => sans.push(SanType::IpAddress(std::net::IpAddr::from(
                        <[u8; 16]>::try_from(*b).unwrap_or_default(),
                    ))),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    let (issuer, td) = load_issuer(dir)?;
    issue(
        dir,
        "control-plane",
        &issuer,
        &Identity::ControlPlane,
        &td,
        sans,
        &[ExtendedKeyUsagePurpose::ServerAuth],
    )
}

fn issue(
    dir: &Path,
    stem: &str,
    issuer: &Issuer<'_, KeyPair>,
    identity: &Identity,
    trust_domain: &str,
    sans: Vec<SanType>,
    usages: &[ExtendedKeyUsagePurpose],
) -> Result<CertPaths, CertsError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let params = leaf_params(identity, trust_domain, sans, usages, LONG_LIVED)?;
    write_leaf(dir, stem, &params.signed_by(&key, issuer)?, &key)
}

fn write_leaf(
    dir: &Path,
    stem: &str,
    cert: &rcgen::Certificate,
    key: &KeyPair,
) -> Result<CertPaths, CertsError> {
    let out = paths(dir, stem);
    write_file(&out.cert, cert.pem().as_bytes(), 0o644)?;
    write_file(&out.key, key.serialize_pem().as_bytes(), 0o600)?;
    Ok(out)
}

/// The parameters of every leaf certificate: one SPIFFE URI SAN, the given usages,
/// valid for `ttl` from now.
pub(crate) fn leaf_params(
    identity: &Identity,
    trust_domain: &str,
    mut sans: Vec<SanType>,
    usages: &[ExtendedKeyUsagePurpose],
    ttl: Duration,
) -> Result<CertificateParams, CertsError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(&identity.to_string());
    sans.push(SanType::URI(identity.spiffe_uri(trust_domain).try_into()?));
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = usages.to_vec();
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, ttl);
    Ok(params)
}

fn paths(dir: &Path, stem: &str) -> CertPaths {
    CertPaths {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}.key")),
    }
}

pub(crate) fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Aviary");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, ttl: Duration) {
    let now = time::OffsetDateTime::now_utc();
    // Five minutes of slack for gateways whose clocks run a little behind.
    params.not_before = now - time::Duration::minutes(5);
    let ttl = time::Duration::try_from(ttl).unwrap_or(time::Duration::days(3650));
    params.not_after = now + ttl;
}

fn validate_trust_domain(td: &str) -> Result<(), CertsError> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CertsError::InvalidName {
            what: "trust domain",
            value: td.to_owned(),
            reason: "use lower-case letters, digits, '.' and '-'",
        })
    }
}

/// The trust domain named by a CA certificate's `spiffe://<td>` URI SAN.
pub(crate) fn trust_domain_from_der(der: &[u8]) -> Option<String> {
    spiffe_uris(der).ok()?.into_iter().find_map(|uri| {
        let rest = uri.strip_prefix("spiffe://")?;
        Some(rest.split('/').next()?.to_owned())
    })
}
