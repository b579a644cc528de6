//! The fleet stream's codec. Outgoing messages are `ControlFrame`s: a per-stream nonce
//! plus the rest of a `ControlMessage` already encoded, so one encoding of a desired state
//! is shared by every stream that sends it. Protobuf allows a message's fields to be
//! concatenated, so `nonce (field 1) ++ body` is a valid `ControlMessage`.

use aviary_proto::v1 as pb;
use bytes::{BufMut, Bytes};
use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// A `ControlMessage` as sent: nonce plus pre-encoded body (a `ControlMessage` whose nonce
/// is empty).
#[derive(Clone, Debug)]
pub(super) struct ControlFrame {
    /// The stream-local nonce; empty for messages that need no answer.
    pub nonce: String,
    /// Encoded `ControlMessage` fields other than the nonce.
    pub body: Bytes,
}

/// tonic starts every stream with 8 KiB buffers each way; fleet messages are tens of bytes
/// and there is one stream per node, so start small (buffers grow for larger messages).
fn stream_buffer() -> BufferSettings {
    BufferSettings::new(512, 32 * 1024)
}

/// Encodes `ControlFrame`s, decodes `EdgeMessage`s.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct FleetCodec;

impl Codec for FleetCodec {
    type Encode = ControlFrame;
    type Decode = pb::EdgeMessage;
    type Encoder = FrameEncoder;
    type Decoder = EdgeDecoder;

    fn encoder(&mut self) -> FrameEncoder {
        FrameEncoder
    }

    fn decoder(&mut self) -> EdgeDecoder {
        EdgeDecoder
    }
}

/// See `FleetCodec`.
#[derive(Debug, Default)]
pub(super) struct FrameEncoder;

impl Encoder for FrameEncoder {
    type Item = ControlFrame;
    type Error = Status;

    fn encode(&mut self, item: ControlFrame, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        if !item.nonce.is_empty() {
            prost::encoding::string::encode(1, &item.nonce, dst);
        }
        dst.put_slice(&item.body);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        stream_buffer()
    }
}

/// See `FleetCodec`.
#[derive(Debug, Default)]
pub(super) struct EdgeDecoder;

impl Decoder for EdgeDecoder {
    type Item = pb::EdgeMessage;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<pb::EdgeMessage>, Status> {
        pb::EdgeMessage::decode(buf)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("malformed EdgeMessage: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        stream_buffer()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_plus_shared_body_decodes_as_one_message() {
        let body = pb::ControlMessage {
            nonce: String::new(),
            kind: Some(pb::control_message::Kind::Weights(pb::WeightAssignment {
                revision: 7,
                weights: [("gateway".to_string(), 30)].into(),
                ttl_seconds: 60,
            })),
        }
        .encode_to_vec();
        let mut wire = Vec::new();
        prost::encoding::string::encode(1, &"42".to_string(), &mut wire);
        wire.extend_from_slice(&body);
        let decoded = pb::ControlMessage::decode(wire.as_slice()).expect("valid protobuf");
        assert_eq!(decoded.nonce, "42");
        match decoded.kind {
            Some(pb::control_message::Kind::Weights(w)) => {
                assert_eq!(w.revision, 7);
                assert_eq!(w.weights.get("gateway"), Some(&30));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
