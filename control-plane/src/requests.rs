//! Request ids (AIP-155): a mutation that carries one is recorded with the mutation's
//! own store commit, with what it answered, so a retry with the same id and request
//! returns that answer and changes nothing, even across a crash or a restart.
//!
//! Ids are per caller (one admin cannot replay another's) and kept for `RETENTION`.

use serde::{Deserialize, Serialize};

use aviary_proto::digest::Sha256;

/// How long a request id is remembered.
pub(crate) const RETENTION_MS: u64 = 24 * 3600 * 1000;

/// Longest request id accepted (a UUID is 36).
pub(crate) const MAX_ID: usize = 128;

/// What a mutation answered, enough to answer a retry the same way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Answered {
    /// SetWeight: the nodes matched then.
    Weight {
        /// Node ids.
        node_ids: Vec<String>,
    },
    /// A rollout created or changed (answered with its state now).
    Rollout {
        /// Rollout id.
        id: String,
    },
    /// SetConfig or DeleteConfig.
    Config {
        /// Nodes the layer covered then.
        node_ids: Vec<String>,
        /// The layer's version.
        version: u32,
    },
    /// RevokeNode.
    Revoked {
        /// A live stream was cut.
        disconnected: bool,
    },
}

/// A request id being used for the first time, to be recorded with the mutation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RequestNote {
    /// `caller\0id`.
    pub key: String,
    /// sha256 of the method and the request without its id.
    pub digest: String,
}

impl RequestNote {
    /// The note for `caller`'s `id` of a `method` call whose request, with its id
    /// cleared, encodes to `body`.
    pub(crate) fn new(caller: &str, id: &str, method: &str, body: &[u8]) -> RequestNote {
        let mut bytes = Vec::with_capacity(method.len() + 1 + body.len());
        bytes.extend_from_slice(method.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(body);
        RequestNote {
            key: format!("{caller}\0{id}"),
            digest: Sha256::of(&bytes).hex(),
        }
    }

    /// The record of this request answered `answered`, at `at_ms`.
    pub(crate) fn answered(&self, answered: Answered, at_ms: u64) -> RequestRecord {
        RequestRecord {
            key: self.key.clone(),
            digest: self.digest.clone(),
            answered,
            event_seq: 0,
            at_ms,
        }
    }
}

/// A request id as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RequestRecord {
    /// `caller\0id`.
    pub key: String,
    /// sha256 of the method and the request without its id.
    pub digest: String,
    /// What it answered.
    pub answered: Answered,
    /// The audit number of the mutation's first event (set by the store as it commits).
    pub event_seq: u64,
    /// Unix ms when it was committed.
    pub at_ms: u64,
}

/// Checks a request id's form: printable ASCII, at most `MAX_ID` bytes.
pub(crate) fn check_id(id: &str) -> Result<(), String> {
    if id.len() > MAX_ID {
        return Err(format!("request_id longer than {MAX_ID} bytes"));
    }
    if !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("request_id must be printable ASCII without spaces (a UUID, say)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_binds_caller_method_and_request() {
        let a = RequestNote::new("admin/alice", "r1", "CreateRollout", b"x");
        assert_eq!(
            a,
            RequestNote::new("admin/alice", "r1", "CreateRollout", b"x")
        );
        assert_ne!(
            a.digest,
            RequestNote::new("admin/alice", "r1", "CreateRollout", b"y").digest
        );
        assert_ne!(
            a.digest,
            RequestNote::new("admin/alice", "r1", "AbortRollout", b"x").digest
        );
        assert_ne!(
            a.key,
            RequestNote::new("admin/bob", "r1", "CreateRollout", b"x").key
        );
        assert!(check_id("6f1c1e7a-6a0e-4b8e-9a59-1d2f0c3b4a5d").is_ok());
        assert!(check_id("two words").is_err());
        assert!(check_id(&"x".repeat(MAX_ID + 1)).is_err());
    }
}
