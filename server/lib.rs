//! resnet-serve: a gRPC inference server for the twelve semi-supervised (`_ssl`) and
//! semi-weakly supervised (`_swsl`) ImageNet ResNet / ResNeXt classifiers of Yalniz et
//! al. 2019 (arXiv 1905.00546), on Candle.
//!
//! # Layout
//! The repository root is this package: `server/` holds its sources, `build.rs` compiles
//! `proto/`, `benches/` measures it, `client/` is a separate workspace member (client
//! stubs and CLI, no Candle), `deploy/` holds the Kubernetes manifests.
//!
//! Modules, in the order data flows through them:
//! - [`weights`]: checkpoint files in every format a user holds (legacy `torch.save`,
//!   zip `.pth`, safetensors), read without executing pickles; torch.hub names, hash
//!   checks, the download cache and conversion to safetensors.
//! - [`device`]: `--device` / `--dtype`: which CPUs or GPUs models run on, and how.
//! - [`model`]: the six architectures behind the twelve hub names, built strictly from a
//!   state dict with batch-norm folded into the convolutions; [`model::layers`] is the
//!   single seam where layer compute happens.
//! - [`models`]: what is served: `--model` specs (a served name and its weights), the
//!   TOML file's per-model tables, the checkpoint in a model directory.
//! - [`placement`]: loading a model onto its devices (start-up and run-time loads).
//! - [`preprocess`]: encoded images, raw RGB8 frames and float tensors to the normalised
//!   3x224x224 input, matching PIL + torchvision.
//! - [`labels`]: the ImageNet-1k class names, and logits to probabilities / top-k.
//! - [`scheduler`]: per-model bounded queue, batcher task and device worker thread;
//!   [`scheduler::policy`] holds the batching policy.
//! - [`registry`]: the served models by name.
//! - [`service`]: the `resnet_serve.v1.Classifier` gRPC service.
//! - [`kserve`]: the KServe v2 / Triton `inference.GRPCInferenceService`, on the same
//!   port and the same queues.
//! - [`shm`]: system shared-memory regions that same-host clients register and point
//!   inputs (and KServe outputs) at, instead of sending the bytes.
//! - [`unary`]: the tensor-carrying unary methods (`Classify`, `ModelInfer`) decoded
//!   from their HTTP/2 frames as received, without tonic's copy into one buffer.
//! - [`admission`]: what a call may cost before it is decoded: the server's budget for
//!   request bytes in flight and the counts of repeated fields, checked from the wire.
//! - [`auth`]: bearer tokens (and their scopes) every call but health must carry, when
//!   the operator names a token file.
//! - [`tls`]: TLS and mutual TLS on the gRPC port, certificates re-read when they change;
//!   [`accept`]: accepting its connections without spinning when out of descriptors.
//! - [`error`]: request errors and their single mapping to gRPC statuses;
//!   [`refusals`]: refusals counted by a fixed reason and logged at most once a second.
//! - [`metrics`]: Prometheus metrics and their endpoint; [`stats`]: the cumulative
//!   per-model totals KServe's `ModelStatistics` reports.
//! - [`telemetry`]: OpenTelemetry traces over OTLP (off unless an endpoint is set): a
//!   call's span joins its caller's trace; batch spans link to the calls they served.
//! - [`server`]: health, reflection, model loading, serving and graceful drain;
//!   [`local`]: one on ephemeral loopback ports in the background (tests, benchmarks).
//! - [`predict`]: the offline `predict` command (the model card's example as a tool).
//! - [`proto`]: the generated `resnet_serve.v1` gRPC types.
//! - [`allocator`]: how the binaries' allocator keeps freed activation memory.

pub mod accept;
pub mod admission;
pub mod allocator;
pub mod auth;
pub mod device;
pub mod error;
pub mod kserve;
pub mod labels;
pub mod local;
pub mod metrics;
pub mod model;
pub mod models;
pub mod placement;
pub mod predict;
pub mod preprocess;
pub mod refusals;
pub mod registry;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod shm;
pub mod stats;
pub mod telemetry;
pub mod tls;
pub mod unary;
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
