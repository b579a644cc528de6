//! Module updates on one fleet stream.
//!
//! * `plan` turns a node's desired module into a `ModuleUpdate` and its payload: the
//!   release's artifact for the node's architecture (never a foreign one: no artifact is a
//!   skip), as a delta from what the node runs when one is smaller, else in full.
//! * `Transfer` streams the payload, edge-paced: the edge answers the update with
//!   `TransferProgress{offset}` (its resume point, 0 when new) and each chunk with the
//!   offset it reached; the next chunk goes out only then. So at most one chunk per
//!   stream is in flight, a control message (weights, an abort) is never queued behind
//!   more than one chunk, and an interrupted transfer resumes where the edge stopped.

use std::sync::Arc;

use aviary_proto::bundle::Encoding;
use aviary_proto::digest::Sha256;
use aviary_proto::v1 as pb;
use bytes::Bytes;
use prost::Message;

use super::codec::ControlFrame;
use super::Fleet;
use crate::deltas::Payload;
use crate::rollout::DesiredModule;

/// Payload bytes per chunk.
pub(super) const CHUNK_BYTES: u64 = 64 * 1024;

/// What to send for a desired module.
pub(super) enum Plan {
    /// A `ModuleUpdate` body (no nonce) and, unless a rollback, its payload.
    Send {
        /// Encoded `ControlMessage{module_update}`.
        body: Bytes,
        /// The transfer, if bytes follow.
        payload: Option<(String, Payload)>,
        /// The artifact the node runs once it acknowledges.
        to: Sha256,
    },
    /// The node cannot get this release (no artifact for its architecture).
    Skip(String),
}

/// Builds the update for `desired` on a node of `arch` running `installed` (sha256).
pub(super) async fn plan(
    fleet: &Arc<Fleet>,
    module: &str,
    desired: &DesiredModule,
    arch: &str,
    installed: Option<Sha256>,
) -> Result<Plan, String> {
    let release = fleet
        .catalog
        .get(module, &desired.version)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("release {module} {} is gone", desired.version))?;
    let Some(artifact) = release.artifacts.get(arch) else {
        return Ok(Plan::Skip(format!(
            "no artifact of {module} {} for {arch} (has: {})",
            desired.version,
            release
                .artifacts
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let to = Sha256::parse_hex(&artifact.sha256).ok_or("stored release has a bad sha256")?;
    let mut update = pb::ModuleUpdate {
        revision: desired.revision,
        module: module.to_owned(),
        to_version: desired.version.clone(),
        manifest: artifact.manifest.clone(),
        signature: artifact.signature.clone(),
        payload: None,
        transfer_id: String::new(),
        rollback: desired.rollback,
        resume_offset: 0,
    };
    let payload = if desired.rollback {
        None
    } else {
        let payload = fleet
            .deltas
            .payload(installed, to)
            .await
            .map_err(|e| e.to_string())?;
        let id = format!(
            "{module}-{}-{}",
            desired.revision,
            &payload.info.sha256[..16.min(payload.info.sha256.len())]
        );
        update.transfer_id = id.clone();
        update.payload = Some(pb::Payload {
            encoding: match payload.info.encoding {
                Encoding::FullZstd => pb::PayloadEncoding::FullZstd,
                Encoding::BsdiffZstd => pb::PayloadEncoding::BsdiffZstd,
            } as i32,
            base_sha256: payload.info.base_sha256.clone().unwrap_or_default(),
            size: payload.info.size,
            sha256: payload.info.sha256.clone(),
        });
        Some((id, payload))
    };
    let body = pb::ControlMessage {
        nonce: String::new(),
        kind: Some(pb::control_message::Kind::ModuleUpdate(update)),
    }
    .encode_to_vec();
    Ok(Plan::Send {
        body: Bytes::from(body),
        payload,
        to,
    })
}

/// A payload being streamed to one node.
pub(super) struct Transfer {
    /// The transfer id the edge echoes.
    pub id: String,
    /// The module.
    pub module: String,
    /// The module revision the update carries.
    pub revision: u64,
    /// Version being sent.
    pub version: String,
    /// The payload.
    pub payload: Payload,
    /// Payload bytes sent on this stream (for `aviary_transfer_bytes_total`).
    pub sent: u64,
}

impl Transfer {
    /// A transfer of `payload` for `module` at `revision`.
    pub(super) fn new(
        id: String,
        module: String,
        revision: u64,
        version: String,
        payload: Payload,
    ) -> Transfer {
        Transfer {
            id,
            module,
            revision,
            version,
            payload,
            sent: 0,
        }
    }

    /// Payload encoding as metrics and `GetNode` name it.
    pub(super) fn encoding(&self) -> &'static str {
        match self.payload.info.encoding {
            Encoding::FullZstd => "full_zstd",
            Encoding::BsdiffZstd => "bsdiff_zstd",
        }
    }

    /// The chunk starting at `offset` (where the edge says it stands), or `None` when the
    /// edge has everything.
    pub(super) async fn chunk_at(&mut self, offset: u64) -> std::io::Result<Option<ControlFrame>> {
        let size = self.payload.info.size;
        if offset >= size {
            return Ok(None);
        }
        let len = CHUNK_BYTES.min(size - offset) as usize;
        // Open, read, close per chunk: holding a descriptor per transfer would put a
        // fleet-wide rollout (one transfer per connected node) past the open-files limit.
        let path = self.payload.path.clone();
        let data = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            use std::os::unix::fs::FileExt;
            let mut data = vec![0u8; len];
            std::fs::File::open(&path)?.read_exact_at(&mut data, offset)?;
            Ok(data)
        })
        .await
        .map_err(std::io::Error::other)??;
        self.sent += len as u64;
        let body = pb::ControlMessage {
            nonce: String::new(),
            kind: Some(pb::control_message::Kind::Chunk(pb::Chunk {
                transfer_id: self.id.clone(),
                offset,
                data: data.into(),
            })),
        }
        .encode_to_vec();
        Ok(Some(ControlFrame {
            nonce: String::new(),
            body: Bytes::from(body),
        }))
    }
}
