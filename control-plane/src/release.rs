//! Stored release records: a (module, version) with one signed artifact per target and
//! its attachments. Bytes live in `Blobs`; these records are the metadata in sled.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// One release as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ReleaseRecord {
    /// Module name.
    pub module: String,
    /// SemVer version as uploaded.
    pub version: String,
    /// Artifacts by target.
    pub artifacts: BTreeMap<String, ArtifactRecord>,
    /// Attachments by name.
    #[serde(default)]
    pub attachments: BTreeMap<String, AttachmentRecord>,
    /// When the first artifact was stored.
    pub created_at: SystemTime,
}

/// The build for one target: the signed manifest and its signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ArtifactRecord {
    /// sha256 (hex) of the artifact, also its blob name.
    pub sha256: String,
    /// Artifact size.
    pub size: u64,
    /// The manifest bytes exactly as signed.
    pub manifest: Vec<u8>,
    /// The ed25519 signature over `manifest`.
    pub signature: Vec<u8>,
    /// Whether the manifest has a run spec.
    pub runnable: bool,
}

/// A file kept with the release (e.g. an SBOM).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AttachmentRecord {
    /// Media type, e.g. `application/spdx+json`.
    pub media_type: String,
    /// sha256 (hex) of the bytes, also the blob name.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

impl ReleaseRecord {
    /// The sled key: `module NUL version`.
    pub(crate) fn key(&self) -> Vec<u8> {
        release_key(&self.module, &self.version)
    }
}

/// The sled key of (module, version).
pub(crate) fn release_key(module: &str, version: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(module.len() + 1 + version.len());
    k.extend_from_slice(module.as_bytes());
    k.push(0);
    k.extend_from_slice(version.as_bytes());
    k
}
