//! Generates the protobuf and gRPC code from `proto/` with no system `protoc`:
//! `protox` parses the files into a descriptor set, `tonic-prost-build`
//! generates from it. The descriptor set is also written to `OUT_DIR` so the
//! backend can convert Connect JSON bodies with the same schema.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/uplink/v1/agent.proto",
        "proto/uplink/v1/admin.proto",
        "proto/uplink/v1/containers.proto",
        "proto/uplink/v1/metrics.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("uplink_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
