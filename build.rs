//! Generates the gRPC code for the SPIFFE Workload API at build time.
//! `protox` compiles the protos in pure Rust, so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/spiffe/workload/workload.proto",
        "proto/sigil/workload/v1/tasks.proto",
        "proto/sigil/admin/v1/admin.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Unimplemented RPCs (JWT, WIT) answer Unimplemented.
        .generate_default_stubs(true)
        // bytes::Bytes for `bytes` fields: one bundle or CRL buffer is shared
        // by every stream instead of copied into each message.
        .bytes(".")
        // An encoder that does not keep 8 KiB per open stream (see there).
        .codec_path("crate::workload_api::codec::Codec")
        .compile_fds(fds)?;
    Ok(())
}
