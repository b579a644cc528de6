//! The ed25519 release-signing key pair. The control plane never holds the private half:
//! whoever cuts releases keeps it, and edges trust the public half.

use std::path::{Path, PathBuf};

use ring::signature::{Ed25519KeyPair, KeyPair};

use crate::files::write_file;
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

/// The private release key, loaded to sign manifests (`aviary release sign|upload`).
pub struct ReleaseSigner {
    pair: Ed25519KeyPair,
}

impl ReleaseSigner {
    /// Loads a PKCS#8 PEM ed25519 key (`release-signing.key`).
    pub fn load(path: &Path) -> Result<ReleaseSigner, CertsError> {
        let text = std::fs::read(path).map_err(CertsError::io(path))?;
        let bad = |reason: &str| CertsError::Pem {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        let block = pem::parse(&text).map_err(|_| bad("not a PEM file"))?;
        if block.tag() != "PRIVATE KEY" {
            return Err(bad("not a PKCS#8 PRIVATE KEY"));
        }
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(block.contents())
            .map_err(|_| bad("not an ed25519 key"))?;
        Ok(ReleaseSigner { pair })
    }

    /// The 64-byte ed25519 signature of `message`.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        let mut key = [0u8; 32];
        key.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(key)
    }
}

/// An ed25519 release public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

impl PublicKey {
    /// Reads one SubjectPublicKeyInfo PEM (`release-signing.pub`).
    pub fn load(path: &Path) -> Result<PublicKey, CertsError> {
        let text = std::fs::read(path).map_err(CertsError::io(path))?;
        let bad = |reason: &str| CertsError::Pem {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        let block = pem::parse(&text).map_err(|_| bad("not a PEM file"))?;
        let der = block.contents();
        if block.tag() != "PUBLIC KEY"
            || der.len() != ED25519_SPKI_PREFIX.len() + 32
            || der[..ED25519_SPKI_PREFIX.len()] != ED25519_SPKI_PREFIX
        {
            return Err(bad("not an ed25519 PUBLIC KEY"));
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&der[ED25519_SPKI_PREFIX.len()..]);
        Ok(PublicKey(key))
    }
}

/// The release keys a party trusts; a manifest must be signed by one of them.
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys {
    keys: Vec<PublicKey>,
}

/// A signature no trusted key made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("signature is not by a trusted release key ({0} trusted)")]
pub struct UntrustedSignature(pub usize);

impl TrustedKeys {
    /// Trusts exactly `keys`.
    pub fn new(keys: Vec<PublicKey>) -> TrustedKeys {
        TrustedKeys { keys }
    }

    /// Loads `DIR/release-signing.pub` and every `*.pub` in `DIR/trusted-release-keys/`.
    pub fn load(dir: &Path) -> Result<TrustedKeys, CertsError> {
        let mut keys = Vec::new();
        let main = dir.join("release-signing.pub");
        if main.exists() {
            keys.push(PublicKey::load(&main)?);
        }
        let extra = dir.join("trusted-release-keys");
        if extra.is_dir() {
            let mut paths: Vec<PathBuf> = std::fs::read_dir(&extra)
                .map_err(CertsError::io(&extra))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "pub"))
                .collect();
            paths.sort();
            for p in paths {
                keys.push(PublicKey::load(&p)?);
            }
        }
        Ok(TrustedKeys { keys })
    }

    /// How many keys are trusted.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no key is trusted (every signature fails).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key that signed `message`, if a trusted one did.
    pub fn verify(
        &self,
        message: &[u8],
        signature: &[u8],
    ) -> Result<PublicKey, UntrustedSignature> {
        self.keys
            .iter()
            .find(|k| {
                ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &k.0)
                    .verify(message, signature)
                    .is_ok()
            })
            .copied()
            .ok_or(UntrustedSignature(self.keys.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_trusted_keys_verify_and_any_change_breaks_the_signature() -> Result<(), CertsError> {
        let a = tempfile::tempdir().map_err(CertsError::io("tempdir"))?;
        let b = tempfile::tempdir().map_err(CertsError::io("tempdir"))?;
        let pa = generate_release_key(a.path())?;
        let pb = generate_release_key(b.path())?;
        let signer = ReleaseSigner::load(&pa.private_key)?;
        let other = ReleaseSigner::load(&pb.private_key)?;
        let trusted = TrustedKeys::load(a.path())?;
        assert_eq!(trusted.len(), 1);
        assert_eq!(signer.public_key(), PublicKey::load(&pa.public_key)?);

        let msg = b"{\"module\":\"m\"}";
        let sig = signer.sign(msg);
        assert_eq!(trusted.verify(msg, &sig), Ok(signer.public_key()));
        assert!(trusted.verify(b"{\"module\":\"n\"}", &sig).is_err());
        assert!(trusted.verify(msg, &other.sign(msg)).is_err());
        assert!(trusted.verify(msg, &sig[..63]).is_err());
        assert!(TrustedKeys::default().verify(msg, &sig).is_err());

        // A second trusted key, e.g. during key rotation.
        std::fs::create_dir(a.path().join("trusted-release-keys"))
            .map_err(CertsError::io("mkdir"))?;
        std::fs::copy(
            &pb.public_key,
            a.path().join("trusted-release-keys/next.pub"),
        )
        .map_err(CertsError::io("copy"))?;
        let both = TrustedKeys::load(a.path())?;
        assert_eq!(both.verify(msg, &other.sign(msg)), Ok(other.public_key()));
        // A certificate or private key is not a public key.
        assert!(PublicKey::load(&pa.private_key).is_err());
        Ok(())
    }
}
