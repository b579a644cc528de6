//! Desired state encoded for the fleet stream, once per change: the `ControlMessage`
//! bodies (without a nonce) that every stream sending them shares (`fleet/codec.rs`
//! prefixes each stream's nonce). With `api/views.rs`, one of the two places where domain
//! types become proto.

use std::collections::BTreeMap;

use aviary_proto::overlay::RunOverlay;
use aviary_proto::v1 as pb;
use bytes::Bytes;
use prost::Message;

/// `ControlMessage{weights}` for a weight map at `revision`.
pub(crate) fn weights_message(
    revision: u64,
    weights: &BTreeMap<String, u32>,
    ttl_seconds: u32,
) -> Bytes {
    control(pb::control_message::Kind::Weights(pb::WeightAssignment {
        revision,
        weights: weights.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        ttl_seconds,
    }))
}

/// `ControlMessage{config}` for `module`'s merged config at `revision`.
pub(crate) fn config_message(module: &str, revision: u64, overlay: &RunOverlay) -> Bytes {
    control(pb::control_message::Kind::Config(pb::ConfigUpdate {
        revision,
        module: module.to_owned(),
        overlay: Some(overlay.to_proto()),
    }))
}

fn control(kind: pb::control_message::Kind) -> Bytes {
    pb::ControlMessage {
        nonce: String::new(),
        kind: Some(kind),
    }
    .encode_to_vec()
    .into()
}
