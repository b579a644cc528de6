//! Compiles `proto/` with protox (pure Rust), so no system protoc is needed.

use prost::Message;

const FILES: &[&str] = &[
    "aviary/v1/common.proto",
    "aviary/v1/fleet.proto",
    "aviary/v1/nodes.proto",
    "aviary/v1/audit.proto",
    "aviary/v1/releases.proto",
    "aviary/v1/rollouts.proto",
    "aviary/v1/configs.proto",
    "aviary/v1/identity.proto",
    "aviary/sensors/v1/sensors.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // The architecture a build names itself by (src/arch.rs) is the triple it targets.
    println!(
        "cargo:rustc-env=AVIARY_BUILD_TARGET={}",
        std::env::var("TARGET")?
    );
    let fds = protox::Compiler::new(["proto"])?
        .include_imports(true)
        .include_source_info(true)
        .open_files(FILES)?
        .file_descriptor_set();
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("aviary_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // `Fleet.Connect` (the contract) would clash with the generated `connect` constructor;
        // clients build their own Channel and call `::new`.
        .build_transport(false)
        // Malformed requests are INVALID_ARGUMENT, not INTERNAL (see src/codec.rs).
        .codec_path("crate::codec::ProstCodec")
        // Chunks are sliced out of shared buffers, never copied.
        .bytes(".aviary.v1.Chunk.data")
        .compile_fds(fds)?;
    Ok(())
}
