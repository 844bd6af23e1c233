//! resnet-serve: a gRPC inference server for the twelve semi-supervised (`_ssl`) and
//! semi-weakly supervised (`_swsl`) ImageNet ResNet / ResNeXt classifiers of Yalniz et
//! al. 2019 (arXiv 1905.00546), on Candle.
//!
//! # Layout
//! The repository root is this package: `server/` holds its sources, `build.rs` compiles
//! `proto/`, `benches/` measures it, `client/` is a separate workspace member (client
//! stubs and CLI, no Candle), `deploy/` holds the Kubernetes manifests.
//!
//! The folders follow a request: it arrives at [`api`], waits in the [`scheduler`], runs
//! through the [`model`]; [`weights`] and [`preprocess`] are the model's and the
//! request's inputs; [`process`] is everything around them.
//! - [`api`]: everything that speaks gRPC: our `resnet_serve.v1.Classifier`
//!   ([`api::service`]), KServe v2 / Triton ([`api::kserve`]), the tensor-carrying calls
//!   decoded from their HTTP/2 frames ([`api::unary`]), what a call may cost before it is
//!   decoded ([`api::admission`]), bearer tokens ([`api::auth`]), shared-memory regions
//!   ([`api::shm`]), and the one map from errors to gRPC statuses ([`api::error`]).
//! - [`preprocess`]: encoded images, raw RGB8 frames and float tensors to the normalised
//!   3x224x224 input, matching PIL + torchvision.
//! - [`scheduler`]: per-model bounded queue, batcher task and device worker thread;
//!   [`scheduler::policy`] is the whole batching policy.
//! - [`model`]: the six architectures behind the twelve hub names, built strictly from a
//!   state dict with batch-norm folded into the convolutions; [`model::layers`] is the
//!   single seam where layer compute happens, [`model::cpu`] the CPU kernels.
//! - [`labels`]: the ImageNet-1k class names, and logits to probabilities / top-k.
//! - [`weights`]: checkpoint files in every format a user holds (legacy `torch.save`,
//!   zip `.pth`, safetensors), read without executing pickles; torch.hub names, hash
//!   checks, the download cache and conversion to safetensors.
//! - [`process`]: what is served (`--model` specs, [`process::models`]), on which devices
//!   ([`process::device`], [`process::placement`]), the served models by name
//!   ([`process::registry`]), the listeners (plaintext and [`process::tls`]), start-up,
//!   health and graceful drain ([`process::server`]; [`process::local`] runs one on
//!   loopback ports), metrics, statistics and OTLP traces ([`process::telemetry`]).
//! - [`proto`]: the generated `resnet_serve.v1` and `inference` gRPC types.
//!
//! The binary (`server/main.rs`) adds its subcommands in `server/commands/`: `serve`'s
//! flags and TOML file, `predict` and `bench`.

pub mod api;
pub mod labels;
pub mod model;
pub mod preprocess;
pub mod process;
pub mod scheduler;
pub mod weights;

/// The generated `resnet_serve.v1` protocol types (server and client stubs).
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("resnet_serve.v1");

    /// Encoded file descriptor set (both protocols), for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("resnet_serve_descriptor");

    /// The generated KServe v2 / Triton `inference` protocol types.
    pub mod inference {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("inference");
    }
}
