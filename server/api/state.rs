//! What every call on either API shares: the served models, the preprocessor, metrics,
//! the drain and readiness flags, requests in flight, request ids, refusals.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{Notify, Semaphore};
use tonic::{Response, Status};

use crate::api::error::ServeError;
use crate::api::refusals::RefusalLog;
use crate::api::shm::SharedMemory;
use crate::preprocess::Preprocessor;
use crate::process::metrics::Metrics;
use crate::process::registry::Registry;
use crate::scheduler::ModelHandle;

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

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State::new(
            Registry::new(),
            Preprocessor::default(),
            Metrics::new(),
            2,
            8,
            SharedMemory::new(false),
        )
    }

    #[test]
    fn request_ids_keep_visible_ascii_and_are_made_when_missing() {
        let s = state();
        assert_eq!(s.request_id("abc-1"), "abc-1");
        assert_eq!(s.request_id("a b\nc\u{e9}"), "abc");
        assert_eq!(
            s.request_id(&"x".repeat(500)).len(),
            crate::api::error::NAME_CHARS
        );
        let (a, b) = (s.request_id(""), s.request_id(" \t"));
        assert!(
            a.starts_with("req-") && b.starts_with("req-") && a != b,
            "{a} {b}"
        );
    }

    #[test]
    fn unknown_models_are_loading_until_the_load_ends_then_not_found() {
        let mut s = state();
        s.configured_models = vec!["resnet18".into()];
        assert!(matches!(s.model("resnet18"), Err(ServeError::Loading(_))));
        assert!(matches!(
            s.model("other"),
            Err(ServeError::UnknownModel { .. })
        ));
        s.loaded.store(true, Ordering::SeqCst);
        assert!(matches!(
            s.model("resnet18"),
            Err(ServeError::UnknownModel { .. })
        ));
        assert_eq!(s.metric_label("resnet18"), UNKNOWN_MODEL_LABEL);
    }

    #[test]
    fn readiness_says_why_not() {
        let s = state();
        assert_eq!(s.readiness(), Err("models are loading".into()));
        s.loaded.store(true, Ordering::SeqCst);
        assert_eq!(s.readiness(), Ok(()));
        s.draining.store(true, Ordering::SeqCst);
        assert!(s.readiness().is_err_and(|why| why.starts_with("draining")));
        assert!(!s.model_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn wait_idle_returns_when_the_last_request_leaves() {
        let s = state();
        let (a, b) = (s.in_flight.enter(), s.in_flight.enter());
        assert_eq!(s.in_flight.count(), 2);
        let waiter = tokio::spawn({
            let in_flight = s.in_flight.clone();
            async move { in_flight.wait_idle().await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("idle")
            .expect("task");
        assert_eq!(s.metrics.in_flight.get(), 0);
    }

    #[test]
    fn request_ids_go_back_on_answers_and_statuses() {
        let id = tonic::metadata::MetadataValue::from_static("r-1");
        let ok = with_request_id(Ok(Response::new(())), Some(id.clone())).expect("ok");
        assert_eq!(ok.metadata().get(REQUEST_ID), Some(&id));
        let err = with_request_id::<()>(Err(Status::not_found("x")), Some(id.clone()))
            .expect_err("status");
        assert_eq!(err.metadata().get(REQUEST_ID), Some(&id));
        let mut metadata = tonic::metadata::MetadataMap::new();
        assert_eq!(request_id_header(&metadata), None);
        metadata.insert(REQUEST_ID, id);
        assert_eq!(request_id_header(&metadata).as_deref(), Some("r-1"));
    }
}
