//! Peer identities as SPIFFE IDs in a certificate's URI SAN.
//!
//! Invariant: an `Identity` only exists for a well-formed name under the expected trust
//! domain, so code holding one never re-validates it.

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::CertsError;

/// Who is at the other end of an mTLS connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// An edge daemon; the node id is the one its certificate names.
    Edge(String),
    /// An operator or tool holding an admin certificate.
    Admin(String),
    /// The control plane itself (server certificate).
    ControlPlane,
}

impl Identity {
    /// The SPIFFE URI of this identity in `trust_domain`.
    pub fn spiffe_uri(&self, trust_domain: &str) -> String {
        match self {
            Identity::Edge(id) => format!("spiffe://{trust_domain}/edge/{id}"),
            Identity::Admin(name) => format!("spiffe://{trust_domain}/admin/{name}"),
            Identity::ControlPlane => format!("spiffe://{trust_domain}/control-plane"),
        }
    }

    /// Parses `spiffe://<trust_domain>/<kind>/<name>`; `None` for anything else.
    pub fn from_spiffe_uri(uri: &str, trust_domain: &str) -> Option<Identity> {
        let rest = uri.strip_prefix("spiffe://")?;
        let path = rest.strip_prefix(trust_domain)?.strip_prefix('/')?;
        if path == "control-plane" {
            return Some(Identity::ControlPlane);
        }
        let (kind, name) = path.split_once('/')?;
        validate_name("name", name).ok()?;
        match kind {
            "edge" => Some(Identity::Edge(name.to_owned())),
            "admin" => Some(Identity::Admin(name.to_owned())),
            _ => None,
        }
    }

    /// Reads the Aviary identity out of a DER certificate that TLS already verified.
    /// A certificate names exactly one identity: with two URI SANs (say an edge and an
    /// admin one) it would be whichever a reader looked at first, so it is refused, as the
    /// SPIFFE X.509-SVID rules require.
    pub fn from_cert_der(der: &[u8], trust_domain: &str) -> Result<Identity, CertsError> {
        let uris = spiffe_uris(der)?;
        let [uri] = uris.as_slice() else {
            return Err(CertsError::NoIdentity(format!(
                "a certificate must carry exactly one URI SAN (its SPIFFE ID); this one has {}",
                uris.len()
            )));
        };
        Identity::from_spiffe_uri(uri, trust_domain).ok_or_else(|| {
            CertsError::NoIdentity(format!("no spiffe://{trust_domain}/... URI SAN"))
        })
    }
}

impl fmt::Display for Identity {
    /// `edge/gw-1`, `admin/alice`: the form used as audit actor.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Edge(id) => write!(f, "edge/{id}"),
            Identity::Admin(name) => write!(f, "admin/{name}"),
            Identity::ControlPlane => f.write_str("control-plane"),
        }
    }
}

/// Every URI SAN of a DER certificate.
pub(crate) fn spiffe_uris(der: &[u8]) -> Result<Vec<String>, CertsError> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| CertsError::NoIdentity(format!("unparsable certificate: {e}")))?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                uris.push((*uri).to_owned());
            }
        }
    }
    Ok(uris)
}

/// Node ids and admin names: 1–128 of `[A-Za-z0-9._-]`, not starting with `.` or `-`, so
/// they are safe in paths, URIs, sled keys and label values alike.
pub fn validate_name(what: &'static str, value: &str) -> Result<(), CertsError> {
    let invalid = |reason| CertsError::InvalidName {
        what,
        value: value.to_owned(),
        reason,
    };
    if value.is_empty() || value.len() > 128 {
        return Err(invalid("must be 1 to 128 characters"));
    }
    if value.starts_with('.') || value.starts_with('-') {
        return Err(invalid("must not start with '.' or '-'"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(invalid(
            "only letters, digits, '.', '_' and '-' are allowed",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_uris_round_trip_and_refuse_other_domains() {
        for id in [
            Identity::Edge("gw-1".into()),
            Identity::Admin("alice".into()),
            Identity::ControlPlane,
        ] {
            let uri = id.spiffe_uri("aviary.local");
            assert_eq!(Identity::from_spiffe_uri(&uri, "aviary.local"), Some(id));
            assert_eq!(Identity::from_spiffe_uri(&uri, "other.local"), None);
        }
        assert_eq!(
            Identity::from_spiffe_uri("spiffe://aviary.local/edge/../x", "aviary.local"),
            None
        );
        assert_eq!(
            Identity::from_spiffe_uri("spiffe://aviary.localx/edge/a", "aviary.local"),
            None
        );
        assert_eq!(
            Identity::from_spiffe_uri("spiffe://aviary.local/robot/a", "aviary.local"),
            None
        );
    }

    #[test]
    fn names_are_path_safe() {
        assert!(validate_name("node id", "gw-01.site_a").is_ok());
        for bad in [
            "",
            "../x",
            "a/b",
            ".hidden",
            "-flag",
            "spa ce",
            &"x".repeat(129),
        ] {
            assert!(validate_name("node id", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_certificate_with_two_identities_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let cert = |uris: &[&str]| -> Result<Vec<u8>, Box<dyn std::error::Error>> {
            let mut params = rcgen::CertificateParams::default();
            for u in uris {
                params
                    .subject_alt_names
                    .push(rcgen::SanType::URI((*u).try_into()?));
            }
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            Ok(params.self_signed(&key)?.der().to_vec())
        };
        let edge = "spiffe://aviary.local/edge/gw-1";
        let admin = "spiffe://aviary.local/admin/root";
        assert_eq!(
            Identity::from_cert_der(&cert(&[edge])?, "aviary.local")?,
            Identity::Edge("gw-1".into())
        );
        for uris in [&[edge, admin][..], &[admin, edge][..], &[][..]] {
            let err = Identity::from_cert_der(&cert(uris)?, "aviary.local");
            assert!(err.is_err(), "{uris:?} accepted as {err:?}");
        }
        Ok(())
    }
}
