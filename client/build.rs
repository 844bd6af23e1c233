//! Generates client stubs only from the workspace's `proto/`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto");
    // SAFETY: build scripts are single-threaded; nothing else reads the environment here.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    tonic_prost_build::configure()
        .build_server(false)
        // `bytes::Bytes` fields: a load test re-sends the same images without copying them.
        .bytes(".")
        // Requests encoded into a buffer sized once (src/codec.rs).
        .codec_path("crate::codec::PresizedCodec")
        .compile_protos(
            &[
                "../proto/resnet_serve/v1/classifier.proto",
                "../proto/inference/grpc_service.proto",
            ],
            &["../proto"],
        )?;
    Ok(())
}
