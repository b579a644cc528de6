//! The Aviary wire contract: generated prost messages and tonic services for
//! `aviary.v1` and `aviary.sensors.v1`, plus the encoded descriptor set for reflection.
//!
//! It also owns the formats both ends of the wire must agree on byte for byte: the release
//! manifest (with SemVer rules), payload deltas, and sha256 naming.
//!
//! Architecture invariant: only this crate knows how the .proto files become Rust; every
//! other crate converts these types to its own domain types where a request enters.
#![forbid(unsafe_code)]

pub mod arch;
pub mod bundle;
pub mod codec;
pub mod delta;
pub mod digest;
pub mod finite;
pub mod manifest;
pub mod overlay;
pub mod resource;
pub mod sandbox;

/// `aviary.v1`: fleet stream, nodes, audit, releases, rollouts.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod v1 {
    tonic::include_proto!("aviary.v1");
}

/// `aviary.sensors.v1`: the IMU sensor stub.
pub mod sensors {
    /// Version 1 of the sensor stub contract.
    #[allow(missing_docs, unreachable_pub, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("aviary.sensors.v1");
    }
}

/// Encoded `FileDescriptorSet` of every Aviary .proto file (with imports), for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/aviary_descriptor.bin"));
