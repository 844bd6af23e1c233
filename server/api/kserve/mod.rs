//! The KServe v2 / Triton `inference.GRPCInferenceService`, on the same port as our own
//! API, so tritonclient, perf_analyzer and KServe's InferenceService work unchanged.
//! Requests go through the same preprocessing and the same per-model scheduler queue as
//! `resnet_serve.v1.Classifier`, so both APIs batch together.
//!
//! - [`views`]: how each model appears (one KServe model per input kind).
//! - [`tensors`]: input tensors to images, logits to output tensors, classification.
//! - [`describe`]: metadata, model configuration and statistics.
//! - `infer`: `ModelInfer` and `ModelStreamInfer` on the shared queues.
//! - `repository`: models loaded and unloaded at run time (`--model-control`).
//!
//! Where Triton's behaviour and our own API's differ, Triton's is the contract here: FP32
//! inputs holding NaN or infinity are computed as given (counted in
//! `resnet_serve_kserve_nonfinite_inputs_total`) unless `--kserve-refuse-non-finite`.
//!
//! Extensions served: `classification`, `model_configuration`, `schedule_policy`
//! (request parameters `priority`: 1 high, 2 normal; `timeout`: microseconds, like the
//! gRPC deadline), `statistics`, `system_shared_memory` (unless `--shared-memory false`;
//! see [`crate::api::shm`]), and `model_repository` when `--model-control` allows it.

pub mod describe;
mod infer;
mod repository;
pub mod tensors;
pub mod views;

pub use infer::InferRequest;
pub use repository::Repository;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::api::admission::Held;
use crate::api::error::ServeError;
use crate::api::state::State;
use crate::proto::inference::{self as pb, grpc_inference_service_server::GrpcInferenceService};

/// The tonic service.
#[derive(Clone)]
pub struct KServeService {
    pub state: Arc<State>,
    pub repository: Option<Arc<Repository>>,
    /// FP32 inputs holding NaN or infinity are refused (`--kserve-refuse-non-finite`);
    /// by default they are computed as given, as Triton computes them (its clients'
    /// random data, perf_analyzer's among them, holds such bit patterns).
    pub refuse_non_finite: bool,
}

#[tonic::async_trait]
impl GrpcInferenceService for KServeService {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        let ready =
            self.state.ready.load(Ordering::SeqCst) && !self.state.draining.load(Ordering::SeqCst);
        Ok(Response::new(pb::ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = request.into_inner();
        let ready = !self.state.draining.load(Ordering::SeqCst)
            && self.resolve(&r.name, &r.version).is_ok();
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        let mut extensions: Vec<String> = [
            "classification",
            "model_configuration",
            "schedule_policy",
            "statistics",
        ]
        .map(String::from)
        .to_vec();
        if self.repository.is_some() {
            extensions.push("model_repository".into());
        }
        if self.state.shared_memory.enabled() {
            extensions.push("system_shared_memory".into());
        }
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "resnet-serve".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions,
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let r = request.into_inner();
        let (handle, view) = self.resolve(&r.name, &r.version)?;
        Ok(Response::new(describe::metadata(&handle, view)))
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        self.model_infer_call(request.map(InferRequest::from)).await
    }

    type ModelStreamInferStream = ReceiverStream<Result<pb::ModelStreamInferResponse, Status>>;

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<pb::ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        use tokio_stream::StreamExt;
        self.stream_infer(
            request
                .into_inner()
                .map(|r| r.map(|m| Held::unreserved(InferRequest::from(m)))),
        )
    }

    async fn model_config(
        &self,
        request: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let r = request.into_inner();
        let (handle, view) = self.resolve(&r.name, &r.version)?;
        Ok(Response::new(pb::ModelConfigResponse {
            config: Some(describe::config(
                &handle,
                view,
                self.state.max_images_per_request,
            )),
        }))
    }

    async fn model_statistics(
        &self,
        request: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        let r = request.into_inner();
        let model_stats = if r.name.is_empty() {
            self.state
                .registry
                .all()
                .iter()
                .map(|h| describe::statistics(h, h.name().to_string()))
                .collect()
        } else {
            let (handle, _) = self.resolve(&r.name, &r.version)?;
            vec![describe::statistics(&handle, r.name)]
        };
        Ok(Response::new(pb::ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        request: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        self.index(request).await
    }

    async fn repository_model_load(
        &self,
        request: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        self.load(request).await
    }

    async fn repository_model_unload(
        &self,
        request: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        self.unload(request).await
    }

    async fn system_shared_memory_status(
        &self,
        request: Request<pb::SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryStatusResponse>, Status> {
        let regions = self
            .state
            .shared_memory
            .status(&request.into_inner().name)
            .map_err(ServeError::from)?;
        Ok(Response::new(pb::SystemSharedMemoryStatusResponse {
            regions: regions
                .iter()
                .map(|r| {
                    let status = pb::system_shared_memory_status_response::RegionStatus {
                        name: r.name.clone(),
                        key: r.key.clone(),
                        offset: r.offset,
                        byte_size: r.byte_size,
                    };
                    (r.name.clone(), status)
                })
                .collect(),
        }))
    }

    async fn system_shared_memory_register(
        &self,
        request: Request<pb::SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryRegisterResponse>, Status> {
        let r = request.into_inner();
        self.state
            .shared_memory
            .register(&r.name, &r.key, r.offset, r.byte_size)
            .map_err(ServeError::from)?;
        tracing::info!(region = %r.name, key = %r.key, offset = r.offset, byte_size = r.byte_size,
            "system shared memory registered");
        Ok(Response::new(pb::SystemSharedMemoryRegisterResponse {}))
    }

    async fn system_shared_memory_unregister(
        &self,
        request: Request<pb::SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryUnregisterResponse>, Status> {
        let name = request.into_inner().name;
        self.state
            .shared_memory
            .unregister(&name)
            .map_err(ServeError::from)?;
        Ok(Response::new(pb::SystemSharedMemoryUnregisterResponse {}))
    }
}
