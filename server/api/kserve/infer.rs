//! Inference on KServe: `ModelInfer` (decoded from its frames or by tonic) and
//! `ModelStreamInfer`, through the same preprocessing and per-model queues as our own API,
//! with Triton's request parameters (`priority`, `timeout`) and request ids.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prost::bytes::Bytes;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::api::admission::{Bounded, Counts, Held};
use crate::api::deadline::deadline_of;
use crate::api::error::ServeError;
use crate::api::state::code_name;
use crate::api::stream::ordered_stream;
use crate::api::unary::{Segmented, WithSegments};
use crate::proto::inference as pb;
use crate::scheduler::{ModelHandle, Priority};

use super::views::View;
use super::{describe, tensors, KServeService};

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

impl KServeService {
    /// The model behind a KServe name and version (only version 1, or none, exists).
    pub(super) fn resolve(
        &self,
        name: &str,
        version: &str,
    ) -> Result<(ModelHandle, View), ServeError> {
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

    pub(super) async fn infer(
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
    /// call's HTTP/2 frames (server/api/unary/): responses in the requests' order, an
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

    pub(super) async fn model_infer_segmented(
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
}
