//! Offline bundles for air-gapped sites (`aviary release bundle` writes them,
//! `aviary-edge apply` installs them with the same checks as a fleet update):
//!
//! ```text
//! "AVBUNDLE" | format 1 (u8)
//! | u32 LE length | manifest JSON, exactly as signed
//! | u32 LE length | ed25519 signature
//! | u32 LE length | payload info JSON (PayloadInfo)
//! | payload bytes (payload info `size` of them)
//! ```
//! Nothing in a bundle is trusted: the edge checks the signature, the payload's size and
//! sha256, and the installed result against the signed manifest.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use crate::digest::Sha256;
use crate::manifest::MAX_MANIFEST_BYTES;

const MAGIC: &[u8; 8] = b"AVBUNDLE";
const FORMAT: u8 = 1;

/// How a payload is encoded (the wire's `PayloadEncoding`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// The artifact, zstd-compressed.
    FullZstd,
    /// A bsdiff patch against `base_sha256`, zstd-compressed (see `delta`).
    BsdiffZstd,
}

/// What the payload bytes are: encoding, base, size and digest of the payload itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadInfo {
    /// Encoding.
    pub encoding: Encoding,
    /// For deltas: the sha256 of the artifact the patch applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_sha256: Option<String>,
    /// Payload size in bytes (what travels, not the artifact's size).
    pub size: u64,
    /// sha256 of the payload bytes.
    pub sha256: String,
}

impl PayloadInfo {
    /// Describes `payload` held in memory.
    pub fn of(encoding: Encoding, base: Option<Sha256>, payload: &[u8]) -> PayloadInfo {
        PayloadInfo {
            encoding,
            base_sha256: base.map(|b| b.hex()),
            size: payload.len() as u64,
            sha256: Sha256::of(payload).hex(),
        }
    }

    /// The payload digest, if well-formed.
    pub fn digest(&self) -> Option<Sha256> {
        Sha256::parse_hex(&self.sha256)
    }
}

/// Why a bundle cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Reading or writing failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// Not a bundle, or a damaged one.
    #[error("not a valid aviary bundle: {0}")]
    Format(String),
}

/// A bundle's header; the payload follows in the reader.
#[derive(Clone, Debug)]
pub struct BundleHeader {
    /// Manifest bytes as signed.
    pub manifest: Vec<u8>,
    /// Signature over `manifest`.
    pub signature: Vec<u8>,
    /// The payload that follows.
    pub payload: PayloadInfo,
}

fn section(r: &mut impl Read, what: &str, max: usize) -> Result<Vec<u8>, BundleError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)
        .map_err(|_| BundleError::Format(format!("truncated before the {what}")))?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(BundleError::Format(format!(
            "{what} of {len} bytes, at most {max}"
        )));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)
        .map_err(|_| BundleError::Format(format!("truncated {what}")))?;
    Ok(buf)
}

impl BundleHeader {
    /// Writes the header; the caller writes `payload.size` payload bytes after it.
    pub fn write(&self, w: &mut impl Write) -> Result<(), BundleError> {
        w.write_all(MAGIC)?;
        w.write_all(&[FORMAT])?;
        let info =
            serde_json::to_vec(&self.payload).map_err(|e| BundleError::Format(e.to_string()))?;
        for part in [&self.manifest, &self.signature, &info] {
            let len = u32::try_from(part.len())
                .map_err(|_| BundleError::Format("section over 4 GiB".into()))?;
            w.write_all(&len.to_le_bytes())?;
            w.write_all(part)?;
        }
        Ok(())
    }

    /// Reads and checks the header from the front of `r`.
    pub fn read(r: &mut impl Read) -> Result<BundleHeader, BundleError> {
        let mut magic = [0u8; 9];
        r.read_exact(&mut magic)
            .map_err(|_| BundleError::Format("too short".into()))?;
        if &magic[..8] != MAGIC {
            return Err(BundleError::Format("bad magic".into()));
        }
        if magic[8] != FORMAT {
            return Err(BundleError::Format(format!(
                "format {} (this build reads {FORMAT})",
                magic[8]
            )));
        }
        let manifest = section(r, "manifest", MAX_MANIFEST_BYTES)?;
        let signature = section(r, "signature", 1024)?;
        let info = section(r, "payload info", 4096)?;
        let payload: PayloadInfo = serde_json::from_slice(&info)
            .map_err(|e| BundleError::Format(format!("payload info: {e}")))?;
        Ok(BundleHeader {
            manifest,
            signature,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_round_trips_and_damage_is_an_error() -> Result<(), BundleError> {
        let h = BundleHeader {
            manifest: b"{\"module\":\"m\"}".to_vec(),
            signature: vec![1; 64],
            payload: PayloadInfo {
                encoding: Encoding::BsdiffZstd,
                base_sha256: Some(Sha256::of(b"a").hex()),
                size: 3,
                sha256: Sha256::of(b"xyz").hex(),
            },
        };
        let mut buf = Vec::new();
        h.write(&mut buf)?;
        buf.extend_from_slice(b"xyz");
        let mut r = buf.as_slice();
        let back = BundleHeader::read(&mut r)?;
        assert_eq!(back.payload, h.payload);
        assert_eq!(back.manifest, h.manifest);
        assert_eq!(r, b"xyz");
        for cut in [0, 5, 9, 12, 30, buf.len() - 10] {
            assert!(
                BundleHeader::read(&mut &buf[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut bad = buf.clone();
        bad[9] = 0xff; // manifest length far too large
        bad[12] = 0x7f;
        assert!(BundleHeader::read(&mut bad.as_slice()).is_err());
        Ok(())
    }
}
