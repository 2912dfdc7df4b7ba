//! Compiles `proto/fleetscan/v1/*.proto` with protox (pure Rust; no system `protoc`).

use std::path::PathBuf;

use prost::Message;

/// The `bytes` fields that carry file content (kilobytes to megabytes per message).
const BYTES_FIELDS: [&str; 4] = [
    ".fleetscan.v1.JobChunk.data",
    ".fleetscan.v1.ContentChunk.data",
    ".fleetscan.v1.ScanBytesRequest.data",
    ".fleetscan.v1.ScanStreamRequest.data",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = ["common", "agent", "worker", "scan", "admin"]
        .map(|name| root.join(format!("fleetscan/v1/{name}.proto")));
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let compiled = protox::compile(&files, [&root])?;
    // Round-trip through bytes so protox's and prost-build's prost-types need not be one version.
    let bytes = compiled.encode_to_vec();
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("fleetscan_descriptor.bin"), &bytes)?;
    let fds = prost_types::FileDescriptorSet::decode(bytes.as_slice())?;
    let mut config = tonic_prost_build::configure();
    // Content fields decode as `bytes::Bytes`: a slice of the buffer the message arrived in,
    // not a copy, and a broker can send one content in chunks that are slices of it.
    for field in BYTES_FIELDS {
        config = config.bytes(field);
    }
    config
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
