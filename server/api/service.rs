//! The `resnet_serve.v1.Classifier` gRPC service: request validation, parallel
//! preprocessing, submission to the model's scheduler, and output formatting.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::api::admission::Held;
use crate::api::error::ServeError;
use crate::api::refusals::RefusalLog;
use crate::api::shm::SharedMemory;
use crate::labels;
use crate::model::{ModelInput, INPUT_SIZE, NUM_CLASSES};
use crate::preprocess::{Input, Preprocessor};
use crate::process::metrics::Metrics;
use crate::process::registry::Registry;
use crate::proto::{self, classifier_server::Classifier, image, stream_result, OutputKind};
use crate::scheduler::ModelHandle;

/// What one image needs before it is a model input.
enum Arrival {
    /// A tensor, its length checked.
    Ready(ModelInput),
    /// Pixels to decode and resize.
    Decode(Pixels),
}

/// An image that needs decoding, as received.
enum Pixels {
    Encoded(bytes::Bytes),
    Raw {
        width: u32,
        height: u32,
        rgb: bytes::Bytes,
    },
}

/// The caller's `x-request-id`, when it sent one.
pub(crate) fn request_id_header(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

/// The answer (or the status) of a call with its request id in `x-request-id`.
#[allow(clippy::result_large_err)]
pub(crate) fn with_request_id<T>(
    answer: Result<Response<T>, Status>,
    id: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
) -> Result<Response<T>, Status> {
    let Some(id) = id else {
        return answer;
    };
    match answer {
        Ok(mut response) => {
            response.metadata_mut().insert(REQUEST_ID, id);
            Ok(response)
        }
        Err(mut status) => {
            status.metadata_mut().insert(REQUEST_ID, id);
            Err(status)
        }
    }
}

/// The metadata key a request id travels in, both ways.
pub const REQUEST_ID: &str = "x-request-id";

/// The `model` label of requests for a model the server does not serve.
pub const UNKNOWN_MODEL_LABEL: &str = "(unknown)";

/// Counts requests in flight so a drain knows when it is done.
pub struct InFlight {
    count: AtomicUsize,
    idle: Notify,
    gauge: prometheus::IntGauge,
}

/// Held for the life of one request.
pub struct InFlightGuard(Arc<InFlight>);

impl InFlight {
    pub fn new(gauge: prometheus::IntGauge) -> Self {
        InFlight {
            count: AtomicUsize::new(0),
            idle: Notify::new(),
            gauge,
        }
    }

    pub fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.gauge.inc();
        InFlightGuard(self.clone())
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Resolves once nothing is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.gauge.dec();
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// What every handler shares.
pub struct State {
    pub registry: Registry,
    pub preprocessor: Preprocessor,
    pub metrics: Metrics,
    pub draining: AtomicBool,
    /// Models are loaded and the server is not draining (KServe's ServerReady).
    pub ready: AtomicBool,
    pub in_flight: Arc<InFlight>,
    /// Bounds how many images decode at once on the blocking pool.
    pub preprocess_slots: Semaphore,
    pub max_images_per_request: usize,
    /// Frames a stream may have in flight before the server stops reading it.
    pub stream_window: usize,
    /// The system shared-memory regions clients registered (both APIs read them).
    pub shared_memory: SharedMemory,
    /// The models the server was started with, named before they load (a request for
    /// one of them meanwhile is UNAVAILABLE, not NOT_FOUND); empty when not known.
    pub configured_models: Vec<String>,
    /// The start-up load has finished (unlike `ready`, stays set while draining).
    pub loaded: AtomicBool,
    /// Refusals, logged at most once per second per kind.
    pub refusal_log: RefusalLog,
    next_id: AtomicU64,
}

impl State {
    pub fn new(
        registry: Registry,
        preprocessor: Preprocessor,
        metrics: Metrics,
        preprocess_threads: usize,
        max_images_per_request: usize,
        shared_memory: SharedMemory,
    ) -> Self {
        let in_flight = Arc::new(InFlight::new(metrics.in_flight.clone()));
        State {
            in_flight,
            registry,
            preprocessor,
            metrics,
            draining: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            preprocess_slots: Semaphore::new(preprocess_threads.max(1)),
            max_images_per_request,
            stream_window: 64,
            shared_memory,
            configured_models: Vec::new(),
            loaded: AtomicBool::new(false),
            refusal_log: RefusalLog::default(),
            next_id: AtomicU64::new(1),
        }
    }

    pub(crate) fn model(&self, name: &str) -> Result<ModelHandle, ServeError> {
        if let Some(handle) = self.registry.get(name) {
            return Ok(handle);
        }
        let shown = || {
            if name.is_empty() {
                "(default)".to_string()
            } else {
                crate::api::error::excerpt(name, crate::api::error::NAME_CHARS)
            }
        };
        let loading = !self.loaded.load(Ordering::SeqCst)
            && (name.is_empty()
                || self.configured_models.is_empty()
                || self.configured_models.iter().any(|m| m == name));
        if loading {
            return Err(ServeError::Loading(shown()));
        }
        Err(ServeError::UnknownModel {
            name: shown(),
            available: self.registry.names().join(", "),
        })
    }

    /// Whether the server takes traffic now, and if not why: every configured model
    /// loaded, and not draining (the `/readyz` probe).
    pub fn readiness(&self) -> Result<(), String> {
        if self.draining.load(Ordering::SeqCst) {
            return Err("draining: finishing the requests in flight before it stops".into());
        }
        if !self.loaded.load(Ordering::SeqCst) {
            return Err("models are loading".into());
        }
        Ok(())
    }

    /// Whether a served model takes requests now: not while the server drains.
    pub(crate) fn model_ready(&self) -> bool {
        !self.draining.load(Ordering::SeqCst)
    }

    /// The `model` label a request is counted under: a served model's name, or one
    /// fixed label for every name the server does not serve (clients never choose a
    /// metric label).
    pub(crate) fn metric_label(&self, name: &str) -> String {
        self.registry
            .get(name)
            .map_or_else(|| UNKNOWN_MODEL_LABEL.to_string(), |h| h.name().to_string())
    }

    /// Logs a refused request (at most once per second per status) and counts it.
    pub(crate) fn refused(&self, code: tonic::Code, error: &ServeError) {
        self.metrics
            .refusals(crate::api::refusals::reason(code))
            .inc();
        self.refusal_log.log(code_name(code), &error.message());
    }

    /// The id a request is known by in logs, spans and its answer: the client's (its
    /// visible ASCII, at most 64 characters), else one made here.
    pub(crate) fn request_id(&self, given: &str) -> String {
        let kept: String = given
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(crate::api::error::NAME_CHARS)
            .collect();
        if kept.is_empty() {
            format!("req-{:x}", self.next_id.fetch_add(1, Ordering::Relaxed))
        } else {
            kept
        }
    }

    /// One image's model input: a tensor at once, pixels to decode on the blocking pool.
    async fn prepare(
        self: &Arc<Self>,
        index: usize,
        image: proto::Image,
    ) -> Result<ModelInput, ServeError> {
        match self.arrival(index, image)? {
            Arrival::Ready(input) => Ok(input),
            Arrival::Decode(pixels) => self.decode(index, pixels).await,
        }
    }

    /// Sorts an image by the work it needs. A ready tensor, sent or in a shared-memory
    /// region, is only length-checked (its values are checked where its batch is
    /// assembled), which is no work worth a thread.
    fn arrival(&self, index: usize, image: proto::Image) -> Result<Arrival, ServeError> {
        let tensor = match image.kind {
            Some(image::Kind::Tensor(t)) => t.data,
            Some(image::Kind::Shared(s)) => {
                let len = (crate::preprocess::INPUT_LEN * 4) as u64;
                self.shared_memory.bytes(&s.region, s.offset, len)?
            }
            Some(image::Kind::Encoded(e)) => return Ok(Arrival::Decode(Pixels::Encoded(e.data))),
            Some(image::Kind::Raw(r)) => {
                return Ok(Arrival::Decode(Pixels::Raw {
                    width: r.width,
                    height: r.height,
                    rgb: r.rgb,
                }))
            }
            None => {
                return Err(ServeError::InvalidArgument(format!(
                    "image {index}: no data (set encoded, raw, tensor or shared)"
                )))
            }
        };
        self.preprocessor
            .prepare(Input::Tensor(&tensor))
            .map(Arrival::Ready)
            .map_err(|source| ServeError::Image { index, source })
    }

    /// Decodes and resizes one image on the blocking pool, at most
    /// `preprocess_slots` at a time.
    async fn decode(
        self: &Arc<Self>,
        index: usize,
        pixels: Pixels,
    ) -> Result<ModelInput, ServeError> {
        let _slot = self
            .preprocess_slots
            .acquire()
            .await
            .map_err(|_| ServeError::Internal("preprocessing pool closed".into()))?;
        let state = self.clone();
        tokio::task::spawn_blocking(move || {
            let input = match &pixels {
                Pixels::Encoded(data) => Input::Encoded(data),
                Pixels::Raw { width, height, rgb } => Input::Raw {
                    width: *width,
                    height: *height,
                    rgb,
                },
            };
            state
                .preprocessor
                .prepare(input)
                .map_err(|source| ServeError::Image { index, source })
        })
        .await
        .map_err(|e| ServeError::Internal(format!("preprocessing task failed: {e}")))?
    }

    /// Preprocesses all images, those that need decoding in parallel, keeping their
    /// order. Tensors are taken as they are, without a task each (a 64-tensor request
    /// spawned 128 tasks before).
    pub(crate) async fn prepare_all(
        self: &Arc<Self>,
        images: Vec<proto::Image>,
    ) -> Result<Vec<ModelInput>, ServeError> {
        enum Pending {
            Ready(ModelInput),
            Decoding(tokio::task::JoinHandle<Result<ModelInput, ServeError>>),
        }
        let mut pending = Vec::with_capacity(images.len());
        for (i, img) in images.into_iter().enumerate() {
            pending.push(match self.arrival(i, img)? {
                Arrival::Ready(input) => Pending::Ready(input),
                Arrival::Decode(pixels) => {
                    let st = self.clone();
                    Pending::Decoding(tokio::spawn(async move { st.decode(i, pixels).await }))
                }
            });
        }
        let mut out = Vec::with_capacity(pending.len());
        for p in pending {
            out.push(match p {
                Pending::Ready(input) => input,
                Pending::Decoding(task) => task
                    .await
                    .map_err(|e| ServeError::Internal(e.to_string()))??,
            });
        }
        Ok(out)
    }

    async fn classify(
        self: &Arc<Self>,
        req: proto::ClassifyRequest,
        deadline: Option<Instant>,
    ) -> Result<proto::ClassifyResponse, ServeError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(ServeError::Draining);
        }
        let model = self.model(&req.model)?;
        if req.images.is_empty() {
            return Err(ServeError::InvalidArgument(
                "a request needs at least one image".into(),
            ));
        }
        if req.images.len() > self.max_images_per_request {
            return Err(ServeError::InvalidArgument(format!(
                "{} images in one request; the limit is {}",
                req.images.len(),
                self.max_images_per_request
            )));
        }
        let output = OutputFormat::from_spec(req.output.as_ref())?;
        let images = req.images.len() as i64;
        let inputs = self
            .prepare_all(req.images)
            .instrument(tracing::debug_span!("preprocess", images))
            .await?;
        let logits = model
            .classify_from(
                inputs,
                deadline,
                crate::scheduler::Priority::Normal,
                crate::scheduler::Origin::new(&req.request_id),
            )
            .await?;
        Ok(proto::ClassifyResponse {
            model: model.name().to_string(),
            request_id: req.request_id,
            results: logits.into_iter().map(|l| output.format(l)).collect(),
        })
    }

    async fn classify_frame(
        self: Arc<Self>,
        model: String,
        frame: proto::StreamFrame,
    ) -> proto::StreamResult {
        let frame_id = frame.frame_id;
        let started = Instant::now();
        let outcome = async {
            let handle = self.model(&model)?;
            let output = OutputFormat::from_spec(frame.output.as_ref())?;
            let image = frame
                .image
                .ok_or_else(|| ServeError::InvalidArgument("frame has no image".into()))?;
            let input = self.prepare(0, image).await?;
            let mut logits = handle.classify(vec![input], None).await?;
            Ok::<_, ServeError>((handle.name().to_string(), output.format(logits.remove(0))))
        }
        .await;
        let (label, code) = match &outcome {
            Ok((name, _)) => (name.clone(), tonic::Code::Ok),
            Err(e) => {
                self.refused(e.code(), e);
                (self.metric_label(&model), e.code())
            }
        };
        self.metrics
            .observe_request(&label, "ClassifyStream", code_name(code), started.elapsed());
        proto::StreamResult {
            frame_id,
            outcome: Some(match outcome {
                Ok((_, c)) => stream_result::Outcome::Result(c),
                Err(e) => stream_result::Outcome::Error(proto::FrameError {
                    code: e.code() as i32,
                    message: e.message(),
                }),
            }),
        }
    }
}

/// A bidirectional stream's plumbing, shared by `ClassifyStream` and KServe's
/// `ModelStreamInfer`: each message is handled in its own task, at most `window` at once
/// (past that the reader stops reading and HTTP/2 flow control slows the producer), and
/// the answers go out in arrival order. `failed` answers for a task that died. The
/// in-flight `guard` is held until the last answer is sent.
pub(crate) fn ordered_stream<In, Out, F, Fut>(
    mut inbound: impl tokio_stream::Stream<Item = Result<In, Status>> + Send + Unpin + 'static,
    window: usize,
    guard: InFlightGuard,
    mut handle: F,
    failed: fn(tokio::task::JoinError) -> Result<Out, Status>,
) -> ReceiverStream<Result<Out, Status>>
where
    In: Send + 'static,
    Out: Send + 'static,
    F: FnMut(In) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Out, Status>> + Send + 'static,
{
    let (out_tx, out_rx) = mpsc::channel(16);
    let (pending_tx, mut pending_rx) =
        mpsc::channel::<tokio::task::JoinHandle<Result<Out, Status>>>(window.max(1));
    tokio::spawn(async move {
        use tokio_stream::StreamExt;
        loop {
            match inbound.next().await.transpose() {
                Ok(Some(message)) => {
                    if pending_tx
                        .send(tokio::spawn(handle(message)))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    // A malformed, oversize or refused message ends the stream with its
                    // status once the messages before it are answered (never OK, and
                    // never a silent end that leaves the client waiting).
                    tracing::debug!("stream ended: {status}");
                    let _ = pending_tx
                        .send(tokio::spawn(async move { Err(status) }))
                        .await;
                    break;
                }
            }
        }
    });
    tokio::spawn(async move {
        let _guard = guard;
        while let Some(task) = pending_rx.recv().await {
            let answer = task.await.unwrap_or_else(failed);
            if out_tx.send(answer).await.is_err() {
                break; // the client went away
            }
        }
    });
    ReceiverStream::new(out_rx)
}

/// The deadline a request's `grpc-timeout` sets, stamped by [`stamp_deadline`].
#[derive(Debug, Clone, Copy)]
pub struct Deadline(pub Instant);

/// Interceptor: runs as the request's headers arrive (before its body is decoded), so
/// the deadline counts from the same instant as tonic's own timer. It is set ahead of
/// the client's by a tenth (at most 25 ms), so our DEADLINE_EXCEEDED reaches the client
/// before its own timer, or tonic's on this side, ends the call with CANCELLED.
#[allow(clippy::result_large_err)]
pub fn stamp_deadline(mut req: Request<()>) -> Result<Request<()>, Status> {
    if let Some(d) = grpc_timeout(&req) {
        let margin = (d / 10).min(Duration::from_millis(25));
        // A timeout past what the clock can add is no deadline at all.
        if let Some(at) = Instant::now().checked_add(d.saturating_sub(margin)) {
            req.extensions_mut().insert(Deadline(at));
        }
    }
    Ok(req)
}

pub(crate) fn deadline_of<T>(req: &Request<T>) -> Option<Instant> {
    req.extensions().get::<Deadline>().map(|d| d.0)
}

/// The `grpc-timeout` header as a duration.
fn grpc_timeout<T>(req: &Request<T>) -> Option<Duration> {
    parse_grpc_timeout(req.metadata().get("grpc-timeout")?.to_str().ok()?)
}

/// A `grpc-timeout` value: at most 8 ASCII digits and a unit, as the gRPC spec writes it
/// (tonic ignores anything else, and so do we).
pub fn parse_grpc_timeout(raw: &str) -> Option<Duration> {
    let (digits, unit) = raw.split_at(raw.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Some(timeout)
}

pub(crate) fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        InvalidArgument => "INVALID_ARGUMENT",
        NotFound => "NOT_FOUND",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        Unavailable => "UNAVAILABLE",
        Internal => "INTERNAL",
        Cancelled => "CANCELLED",
        _ => "OTHER",
    }
}

/// What a request asked to get back per image.
#[derive(Debug, Clone, Copy)]
enum OutputFormat {
    Logits,
    Probabilities,
    TopK(usize),
}

impl OutputFormat {
    fn from_spec(spec: Option<&proto::OutputSpec>) -> Result<Self, ServeError> {
        let Some(spec) = spec else {
            return Ok(OutputFormat::TopK(5));
        };
        let kind = OutputKind::try_from(spec.kind).map_err(|_| {
            ServeError::InvalidArgument(format!("unknown output kind {}", spec.kind))
        })?;
        Ok(match kind {
            OutputKind::Logits => OutputFormat::Logits,
            OutputKind::Probabilities => OutputFormat::Probabilities,
            OutputKind::Unspecified | OutputKind::TopK => {
                let k = if spec.top_k == 0 {
                    5
                } else {
                    spec.top_k as usize
                };
                if k > NUM_CLASSES {
                    return Err(ServeError::InvalidArgument(format!(
                        "top_k {k} is more than the {NUM_CLASSES} classes"
                    )));
                }
                OutputFormat::TopK(k)
            }
        })
    }

    fn format(self, logits: Vec<f32>) -> proto::Classification {
        match self {
            OutputFormat::Logits => proto::Classification {
                values: logits,
                top: vec![],
            },
            OutputFormat::Probabilities => proto::Classification {
                values: labels::softmax(&logits),
                top: vec![],
            },
            OutputFormat::TopK(k) => proto::Classification {
                values: vec![],
                top: labels::top_k(&labels::softmax(&logits), k)
                    .into_iter()
                    .map(|s| proto::Class {
                        index: s.index as u32,
                        label: s.label.to_string(),
                        score: s.score,
                    })
                    .collect(),
            },
        }
    }
}

fn model_info(h: &ModelHandle, ready: bool) -> proto::ModelInfo {
    let info = h.info();
    proto::ModelInfo {
        name: h.name().to_string(),
        architecture: info.architecture.clone(),
        input_shape: vec![3, INPUT_SIZE as u32, INPUT_SIZE as u32],
        num_classes: NUM_CLASSES as u32,
        allowed_batch_sizes: h
            .policy()
            .allowed_sizes()
            .iter()
            .map(|&s| s as u32)
            .collect(),
        device: info.device.clone(),
        dtype: info.dtype.clone(),
        ready,
    }
}

/// The tonic service.
#[derive(Clone)]
pub struct ClassifierService {
    pub state: Arc<State>,
}

impl ClassifierService {
    /// `ClassifyStream` over `frames`, as tonic decodes them or as decoded from the
    /// call's HTTP/2 frames (server/api/unary.rs): results in the frames' order.
    pub fn classify_frames(
        &self,
        frames: impl tokio_stream::Stream<Item = Result<Held<proto::StreamFrame>, Status>>
            + Send
            + Unpin
            + 'static,
    ) -> Result<Response<ReceiverStream<Result<proto::StreamResult, Status>>>, Status> {
        if self.state.draining.load(Ordering::SeqCst) {
            return Err(ServeError::Draining.into());
        }
        let guard = self.state.in_flight.enter();
        let state = self.state.clone();
        let mut model = String::new();
        let answers = ordered_stream(
            frames,
            self.state.stream_window,
            guard,
            move |Held {
                      message: frame,
                      reservation,
                  }: Held<proto::StreamFrame>| {
                // A frame that names no model uses the stream's last named one.
                if !frame.model.is_empty() {
                    model.clone_from(&frame.model);
                }
                let (state, model) = (state.clone(), model.clone());
                async move {
                    let _reservation = reservation;
                    Ok(state.classify_frame(model, frame).await)
                }
            },
            |e| Err(Status::internal(format!("frame task failed: {e}"))),
        );
        Ok(Response::new(answers))
    }
}

#[tonic::async_trait]
impl Classifier for ClassifierService {
    async fn classify(
        &self,
        request: Request<proto::ClassifyRequest>,
    ) -> Result<Response<proto::ClassifyResponse>, Status> {
        let _guard = self.state.in_flight.enter();
        let deadline = deadline_of(&request);
        let header_id = request_id_header(request.metadata());
        let request_id = self.state.request_id(
            header_id
                .as_deref()
                .unwrap_or(&request.get_ref().request_id),
        );
        let model_label = self.state.metric_label(&request.get_ref().model);
        let span = tracing::info_span!(
            "classify",
            request_id = %request_id,
            model = %model_label,
            images = request.get_ref().images.len() as i64,
            otel.name = tracing::field::Empty,
            otel.kind = tracing::field::Empty
        );
        crate::process::telemetry::join_caller(
            &span,
            request.metadata(),
            crate::process::telemetry::CLASSIFY,
        );
        let mut req = request.into_inner();
        req.request_id = request_id;
        let id = tonic::metadata::MetadataValue::try_from(req.request_id.as_str()).ok();
        let started = Instant::now();
        let result = self
            .state
            .classify(req, deadline)
            .instrument(span.clone())
            .await;
        let code = result
            .as_ref()
            .map_or_else(ServeError::code, |_| tonic::Code::Ok);
        self.state.metrics.observe_request(
            &model_label,
            "Classify",
            code_name(code),
            started.elapsed(),
        );
        if let Some(h) = self.state.registry.get(&model_label) {
            h.metrics()
                .stats
                .record_request(result.is_ok(), started.elapsed());
        }
        span.in_scope(|| match &result {
            Ok(_) => tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, "ok"),
            Err(e) => self.state.refused(code, e),
        });
        if crate::process::telemetry::enabled() {
            let message = result.as_ref().err().map(ServeError::message);
            crate::process::telemetry::record_status(&span, code, message.as_deref().unwrap_or(""));
        }
        with_request_id(result.map(Response::new).map_err(Status::from), id)
    }

    type ClassifyStreamStream = ReceiverStream<Result<proto::StreamResult, Status>>;

    async fn classify_stream(
        &self,
        request: Request<Streaming<proto::StreamFrame>>,
    ) -> Result<Response<Self::ClassifyStreamStream>, Status> {
        use tokio_stream::StreamExt;
        self.classify_frames(request.into_inner().map(|r| r.map(Held::unreserved)))
    }

    async fn list_models(
        &self,
        _: Request<proto::ListModelsRequest>,
    ) -> Result<Response<proto::ListModelsResponse>, Status> {
        Ok(Response::new(proto::ListModelsResponse {
            models: self
                .state
                .registry
                .all()
                .iter()
                .map(|h| model_info(h, self.state.model_ready()))
                .collect(),
        }))
    }

    async fn get_model(
        &self,
        request: Request<proto::GetModelRequest>,
    ) -> Result<Response<proto::ModelInfo>, Status> {
        let h = self.state.model(&request.into_inner().name)?;
        Ok(Response::new(model_info(&h, self.state.model_ready())))
    }
}
