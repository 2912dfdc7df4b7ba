//! Compiles `proto/fleetscan/v1/*.proto` with protox (pure Rust; no system `protoc`).

use std::path::PathBuf;

use prost::Message;

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
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
