//! The ed25519 release-signing key pair. The control plane never holds the private half:
//! whoever cuts releases keeps it, and edges trust the public half.

use std::path::{Path, PathBuf};

use ring::signature::{Ed25519KeyPair, KeyPair};

use crate::pki::write_file;
use crate::CertsError;

/// DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410); the 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Where `generate_release_key` wrote the pair.
#[derive(Clone, Debug)]
pub struct ReleaseKeyPaths {
    /// PKCS#8 PEM private key (0600).
    pub private_key: PathBuf,
    /// SubjectPublicKeyInfo PEM public key.
    pub public_key: PathBuf,
}

/// Writes `release-signing.key` and `release-signing.pub` into `dir`.
pub fn generate_release_key(dir: &Path) -> Result<ReleaseKeyPaths, CertsError> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| CertsError::KeyGen)?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| CertsError::KeyGen)?;
    let mut spki = ED25519_SPKI_PREFIX.to_vec();
    spki.extend_from_slice(pair.public_key().as_ref());
    let paths = ReleaseKeyPaths {
        private_key: dir.join("release-signing.key"),
        public_key: dir.join("release-signing.pub"),
    };
    let private = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec()));
    let public = pem::encode(&pem::Pem::new("PUBLIC KEY", spki));
    write_file(&paths.private_key, private.as_bytes(), 0o600)?;
    write_file(&paths.public_key, public.as_bytes(), 0o644)?;
    Ok(paths)
}
