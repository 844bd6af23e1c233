//! The KServe v2 / Triton `inference.GRPCInferenceService`, on the same port as our own
//! API, so tritonclient, perf_analyzer and KServe's InferenceService work unchanged.
//! Requests go through the same preprocessing and the same per-model scheduler queue as
//! `resnet_serve.v1.Classifier`, so both APIs batch together.
//!
//! - [`views`]: how each model appears (one KServe model per input kind).
//! - [`tensors`]: input tensors to images, logits to output tensors, classification.
//! - [`describe`]: metadata, model configuration and statistics.
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
pub mod tensors;
pub mod views;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use prost::bytes::Bytes;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::api::admission::{Bounded, Counts, Held};
use crate::api::deadline::deadline_of;
use crate::api::error::ServeError;
use crate::api::state::{code_name, State};
use crate::api::stream::ordered_stream;
use crate::api::unary::{Segmented, WithSegments};
use crate::model::ModelName;
use crate::proto::inference::{
    self as pb, grpc_inference_service_server::GrpcInferenceService,
    model_repository_parameter::ParameterChoice as RepoParam,
};
use crate::scheduler::ModelFactory;
use crate::scheduler::{BatchPolicy, ModelHandle, Priority};

use views::View;

/// Run-time loading and unloading (KServe's model repository extension).
pub struct Repository {
    pub factory: ModelFactory,
    /// The policy of a model loaded without one of its own.
    pub policy: BatchPolicy,
    /// The policies of configured models that have their own (`[models.NAME]`), by
    /// served name: a reload keeps its own.
    pub policies: HashMap<String, BatchPolicy>,
    /// One load or unload at a time.
    busy: tokio::sync::Mutex<()>,
}

impl Repository {
    pub fn new(factory: ModelFactory, policy: BatchPolicy) -> Self {
        Repository {
            factory,
            policy,
            policies: HashMap::new(),
            busy: tokio::sync::Mutex::new(()),
        }
    }

    /// With the policies of the configured models that have their own.
    pub fn with_policies(mut self, policies: HashMap<String, BatchPolicy>) -> Self {
        self.policies = policies;
        self
    }
}

/// `ModelInferRequest`'s `raw_input_contents` field.
const RAW_INPUT_CONTENTS: u32 = 7;

/// A `ModelInfer` request with its `raw_input_contents` kept apart, as the slices of
/// the frames they arrived in (a batch of tensors is usually longer than one frame).
pub type InferRequest = WithSegments<pb::ModelInferRequest, RAW_INPUT_CONTENTS>;

impl Bounded for InferRequest {
    fn check_counts(frames: &crate::api::unary::Frames, counts: &Counts) -> Result<(), Status> {
        crate::api::admission::check_infer_request(frames, counts)
    }
}

impl From<pb::ModelInferRequest> for InferRequest {
    fn from(mut message: pb::ModelInferRequest) -> Self {
        let field = std::mem::take(&mut message.raw_input_contents)
            .into_iter()
            .map(Segmented::from)
            .collect();
        WithSegments { message, field }
    }
}

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

impl KServeService {
    /// The model behind a KServe name and version (only version 1, or none, exists).
    fn resolve(&self, name: &str, version: &str) -> Result<(ModelHandle, View), ServeError> {
        let (base, view) = View::split(name);
        if name.is_empty() {
            return Err(ServeError::InvalidArgument(
                "a model name is required".into(),
            ));
        }
        let handle = self.state.model(base)?;
        if !version.is_empty() && version != describe::VERSION {
            return Err(ServeError::UnknownModel {
                name: format!("{name} version {version}"),
                available: format!("{name} version {}", describe::VERSION),
            });
        }
        Ok((handle, view))
    }

    async fn infer(
        &self,
        req: InferRequest,
        deadline: Option<Instant>,
        request_id: &str,
    ) -> Result<(ModelHandle, pb::ModelInferResponse), ServeError> {
        if self.state.draining.load(Ordering::SeqCst) {
            return Err(ServeError::Draining);
        }
        let (handle, view) = self.resolve(&req.message.model_name, &req.message.model_version)?;
        let result = self
            .infer_on(&handle, view, req, deadline, request_id)
            .await;
        Ok((handle, result?))
    }

    async fn infer_on(
        &self,
        handle: &ModelHandle,
        view: View,
        InferRequest {
            message: mut req,
            field: raw,
        }: InferRequest,
        deadline: Option<Instant>,
        request_id: &str,
    ) -> Result<pb::ModelInferResponse, ServeError> {
        let priority = match tensors::integer(&req.parameters, "priority")? {
            None | Some(0) | Some(2) => Priority::Normal,
            Some(1) => Priority::High,
            Some(p) => {
                return Err(ServeError::InvalidArgument(format!(
                    "priority {p} does not exist: 1 is high, 2 (the default) normal"
                )))
            }
        };
        let deadline = match tensors::integer(&req.parameters, "timeout")? {
            None | Some(0) => deadline,
            Some(us) if us > 0 => {
                let us = u64::try_from(us).unwrap_or(u64::MAX);
                // A timeout past what the clock can add sets no deadline of its own.
                match Instant::now().checked_add(Duration::from_micros(us)) {
                    Some(own) => Some(deadline.map_or(own, |d| d.min(own))),
                    None => deadline,
                }
            }
            Some(us) => {
                return Err(ServeError::InvalidArgument(format!(
                    "timeout {us} must be a positive number of microseconds"
                )))
            }
        };
        let shared_memory = &self.state.shared_memory;
        let outputs = tensors::requested(&req.outputs, shared_memory)?;
        let images = tensors::images(
            view,
            &req,
            raw,
            shared_memory,
            self.state.max_images_per_request,
        )?;
        for o in &outputs {
            o.check_fits(images.len())?;
        }
        let count = images.len() as i64;
        let inputs = self
            .state
            .prepare_all(images)
            .instrument(tracing::debug_span!("preprocess", images = count))
            .await?;
        let origin = crate::scheduler::Origin {
            compute_non_finite: !self.refuse_non_finite,
            ..crate::scheduler::Origin::new(request_id)
        };
        let logits = handle
            .classify_from(inputs, deadline, priority, origin)
            .await?;
        let mut tensors = Vec::with_capacity(outputs.len());
        let mut raw = Vec::with_capacity(outputs.len());
        for o in &outputs {
            let (mut tensor, contents) = tensors::encode(o, &logits);
            match &o.shared {
                // An empty entry keeps raw_output_contents in step with outputs.
                Some(window) => {
                    window.place(&mut tensor, &contents)?;
                    raw.push(Bytes::new());
                }
                None => raw.push(contents),
            }
            tensors.push(tensor);
        }
        Ok(pb::ModelInferResponse {
            model_name: req.model_name.clone(),
            model_version: describe::VERSION.into(),
            id: std::mem::take(&mut req.id),
            parameters: HashMap::new(),
            outputs: tensors,
            raw_output_contents: raw,
        })
    }

    /// `ModelStreamInfer` over `requests`, as tonic decodes them or as decoded from the
    /// call's HTTP/2 frames (server/api/unary.rs): responses in the requests' order, an
    /// error in its response's `error_message` without ending the stream.
    pub fn stream_infer(
        &self,
        requests: impl tokio_stream::Stream<Item = Result<Held<InferRequest>, Status>>
            + Send
            + Unpin
            + 'static,
    ) -> Result<Response<ReceiverStream<Result<pb::ModelStreamInferResponse, Status>>>, Status>
    {
        if self.state.draining.load(Ordering::SeqCst) {
            return Err(ServeError::Draining.into());
        }
        let guard = self.state.in_flight.enter();
        let service = self.clone();
        let answers = ordered_stream(
            requests,
            self.state.stream_window,
            guard,
            move |Held {
                      message: req,
                      reservation,
                  }: Held<InferRequest>| {
                let s = service.clone();
                async move {
                    let _reservation = reservation;
                    // Errors travel in the response, so the stream goes on.
                    Ok(
                        match s.infer_recorded(req, None, "ModelStreamInfer", "").await {
                            Ok(response) => pb::ModelStreamInferResponse {
                                error_message: String::new(),
                                infer_response: Some(response),
                            },
                            Err(e) => pb::ModelStreamInferResponse {
                                error_message: e.message(),
                                infer_response: None,
                            },
                        },
                    )
                }
            },
            |e| {
                Ok(pb::ModelStreamInferResponse {
                    error_message: format!("internal error: request task failed: {e}"),
                    infer_response: None,
                })
            },
        );
        Ok(Response::new(answers))
    }

    /// Runs one inference and records it under its model, whatever the outcome.
    async fn infer_recorded(
        &self,
        req: InferRequest,
        deadline: Option<Instant>,
        rpc: &str,
        request_id: &str,
    ) -> Result<pb::ModelInferResponse, ServeError> {
        let started = Instant::now();
        let label = self
            .state
            .metric_label(View::split(&req.message.model_name).0);
        let result = self.infer(req, deadline, request_id).await;
        let elapsed = started.elapsed();
        let code = result
            .as_ref()
            .map_or_else(ServeError::code, |_| tonic::Code::Ok);
        self.state
            .metrics
            .observe_request(&label, rpc, code_name(code), elapsed);
        match result {
            Ok((handle, response)) => {
                handle.metrics().stats.record_request(true, elapsed);
                Ok(response)
            }
            Err(e) => {
                if let Some(h) = self.state.registry.get(&label) {
                    h.metrics().stats.record_request(false, elapsed);
                }
                self.state.refused(code, &e);
                Err(e)
            }
        }
    }

    /// `ModelInfer`, from tonic's decoding or straight from the request's frames
    /// (`unary::FrameRoutes`): in its own span, inside the caller's trace, known by the
    /// caller's `x-request-id` (which comes back in the answer's metadata), else the
    /// request's `id` field (echoed in the response body, as KServe has it), else one
    /// made here.
    pub async fn model_infer_call(
        &self,
        request: Request<InferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let deadline = deadline_of(&request);
        let given = crate::api::state::request_id_header(request.metadata());
        let request_id = self
            .state
            .request_id(given.as_deref().unwrap_or(&request.get_ref().message.id));
        let echo =
            given.and_then(|_| tonic::metadata::MetadataValue::try_from(request_id.as_str()).ok());
        let model_label = self
            .state
            .metric_label(View::split(&request.get_ref().message.model_name).0);
        let span = tracing::info_span!(
            "model_infer",
            request_id = %request_id,
            model = %model_label,
            otel.name = tracing::field::Empty,
            otel.kind = tracing::field::Empty
        );
        crate::process::telemetry::join_caller(
            &span,
            request.metadata(),
            crate::process::telemetry::MODEL_INFER,
        );
        let result = self
            .model_infer_segmented(request.into_inner(), deadline, &request_id)
            .instrument(span.clone())
            .await;
        if crate::process::telemetry::enabled() {
            let (code, message) = match &result {
                Ok(_) => (tonic::Code::Ok, ""),
                Err(status) => (status.code(), status.message()),
            };
            crate::process::telemetry::record_status(&span, code, message);
        }
        crate::api::state::with_request_id(result, echo)
    }

    async fn model_infer_segmented(
        &self,
        request: InferRequest,
        deadline: Option<Instant>,
        request_id: &str,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let _guard = self.state.in_flight.enter();
        self.infer_recorded(request, deadline, "ModelInfer", request_id)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    fn repository(&self) -> Result<&Arc<Repository>, ServeError> {
        self.repository.as_ref().ok_or_else(|| {
            ServeError::FailedPrecondition(
                "model control is disabled; start the server with --model-control to load and unload models".into(),
            )
        })
    }
}

fn hub_name(name: &str, configured: &[String]) -> Result<ModelName, ServeError> {
    let base = View::split(name).0;
    base.parse::<ModelName>()
        .map_err(|_| ServeError::UnknownModel {
            name: crate::weights::clip(name),
            // The configured names and the twelve hub names (the parse error would repeat
            // the client's string).
            available: configured
                .iter()
                .cloned()
                .chain(ModelName::all().map(|m| m.to_string()))
                .collect::<Vec<_>>()
                .join(", "),
        })
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
        let only_ready = request.into_inner().ready;
        let mut models = Vec::new();
        let loaded = self.state.registry.names();
        for name in &loaded {
            for view in View::ALL {
                models.push(pb::repository_index_response::ModelIndex {
                    name: view.name(name),
                    version: describe::VERSION.into(),
                    state: "READY".into(),
                    reason: String::new(),
                });
            }
        }
        if self.repository.is_some() && !only_ready {
            // The hub names and the configured names, each once.
            let loadable: std::collections::BTreeSet<String> = ModelName::all()
                .map(|n| n.to_string())
                .chain(self.state.configured_models.iter().cloned())
                .collect();
            for name in loadable {
                if !loaded.contains(&name) {
                    models.push(pb::repository_index_response::ModelIndex {
                        name,
                        version: describe::VERSION.into(),
                        state: "UNAVAILABLE".into(),
                        reason: "unloaded".into(),
                    });
                }
            }
        }
        models.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        let repo = self.repository()?.clone();
        let r = request.into_inner();
        // A configured model (`--model`, `[models.NAME]`) by its served name, with what
        // it was configured with; any other hub name with the server's settings.
        let base = View::split(&r.model_name).0;
        let name = if self.state.configured_models.iter().any(|m| m == base) {
            base.to_string()
        } else {
            hub_name(&r.model_name, &self.state.configured_models)?.to_string()
        };
        // A file is named, never a path: the factory opens it in the operator's model
        // repository (`--model-repository`) or refuses it.
        let mut file = None;
        for (key, value) in &r.parameters {
            match (key.as_str(), value.parameter_choice.as_ref()) {
                ("file", Some(RepoParam::StringParam(f))) => file = Some(f.clone()),
                _ => {
                    return Err(ServeError::InvalidArgument(format!(
                        "unsupported load parameter '{}'; give 'file' (a file name in the server's model repository) or nothing (the weights cache)",
                        crate::weights::clip(key)
                    ))
                    .into())
                }
            }
        }
        let _busy = repo.busy.lock().await;
        let factory = repo.factory.clone();
        let model = name.clone();
        let started = std::time::Instant::now();
        let replicas = tokio::task::spawn_blocking(move || (factory.0)(&model, file.as_deref()))
            .await
            .map_err(|e| ServeError::Internal(format!("loading task failed: {e}")))?
            .map_err(|e| ServeError::InvalidArgument(format!("loading {name}: {e}")))?;
        if replicas.is_empty() {
            return Err(ServeError::Internal(format!("loading {name} gave no replicas")).into());
        }
        let key = name;
        let count = replicas.len();
        let policy = repo.policies.get(&key).unwrap_or(&repo.policy).clone();
        let handle = ModelHandle::spawn(&key, replicas, policy, self.state.metrics.for_model(&key));
        // Replacing an entry leaves requests already queued on the old copy to finish.
        self.state.registry.insert(handle);
        tracing::info!(model = %key, replicas = count, seconds = started.elapsed().as_secs_f64(), "loaded through the model repository API");
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        let repo = self.repository()?.clone();
        let r = request.into_inner();
        let base = View::split(&r.model_name).0.to_string();
        let _busy = repo.busy.lock().await;
        match self.state.registry.remove(&base) {
            // The handle drops here; the queue closes once in-flight requests let go, the
            // workers exit and the weights are freed.
            Some(_) => {
                tracing::info!(model = %base, "unloaded through the model repository API");
                Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
            }
            None => Err(ServeError::UnknownModel {
                name: crate::weights::clip(&r.model_name),
                available: self.state.registry.names().join(", "),
            }
            .into()),
        }
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
