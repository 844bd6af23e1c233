//! Compiles `proto/` into the server's gRPC types (server and client stubs, plus the
//! file descriptor set that server reflection publishes): our own `resnet_serve.v1` API
//! and the KServe v2 / Triton `inference` protocol.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // SAFETY: build scripts are single-threaded; nothing else reads the environment here.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // `bytes` fields as `Bytes`: slices of the received buffer, not copies of it (a
        // batch of float tensors is tens of MiB).
        .bytes(".")
        .file_descriptor_set_path(out.join("resnet_serve_descriptor.bin"))
        .compile_protos(
            &[
                "proto/resnet_serve/v1/classifier.proto",
                "proto/inference/grpc_service.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
