//! Per-model scheduling: a bounded queue, a batcher task that forms fixed-size batches
//! ([`policy`] decides when and how big), and one device worker per model replica (one
//! per device, or several), each on its own OS thread.
//!
//! ```text
//! handler ── Job per image ──► mpsc (bounded) ──► batcher_task ──► mpsc(1) ──► worker threads
//!    ▲                                                                          │
//!    └───────────────────────── oneshot per job ◄────── split batch ◄───────────┘
//! ```
//! The next batch fills while the workers compute; a semaphore of free workers tells
//! the batcher when one can take it, and whichever replica is free does, through the
//! `mpsc(1)`. A job whose caller has gone (its oneshot closed: cancelled, timed out, or
//! the rest of its request refused) is skipped when batches form and again right before
//! compute.
//!
//! Each job carries its request's [`Origin`] (its id, and its span when traces are
//! exported): the worker names the batch's requests in its log lines, and the batch's
//! span links to each request's span (server/process/telemetry.rs).

pub mod batcher;
pub mod policy;
pub mod worker;

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

pub use crate::model::{Logits, ModelInput};
pub use batcher::Queues;
pub use policy::BatchPolicy;
pub use worker::{Backend, BackendInfo};

use crate::process::metrics::ModelMetrics;

/// Loads one model by hub name (from a file named in the model repository, or the
/// weights cache) at run time, one backend per replica: what KServe's
/// RepositoryModelLoad runs. Blocking. Errors go to the client as they are.
pub type LoadFn = dyn Fn(&str, Option<&str>) -> Result<Vec<Arc<dyn Backend>>, String> + Send + Sync;

/// Run-time model loading, when enabled (`--model-control`).
#[derive(Clone)]
pub struct ModelFactory(pub Arc<LoadFn>);

impl std::fmt::Debug for ModelFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ModelFactory")
    }
}

/// Why a scheduled image got no logits.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    #[error("model '{model}' is overloaded: its queue of {capacity} images is full; retry later")]
    QueueFull { model: String, capacity: usize },
    #[error("deadline exceeded while queued for model '{0}'")]
    DeadlineExceeded(String),
    #[error("model '{model}' failed on this batch: {message}")]
    Compute { model: String, message: String },
    /// More images than the model's whole queue holds: no retry can succeed.
    #[error("model '{model}' queues at most {capacity} images; this request has {images}: send fewer per request")]
    LargerThanQueue {
        model: String,
        images: usize,
        capacity: usize,
    },
    #[error("model '{0}' is shutting down")]
    Stopped(String),
    /// Found while its batch was assembled, where each value is read anyway.
    #[error("image {image}: float tensor holds a NaN or infinite value at element {element}")]
    NonFinite { image: usize, element: usize },
}

/// One image waiting for compute.
pub struct Job {
    pub input: ModelInput,
    /// Its position in its request (an error about it names it).
    pub index: usize,
    pub enqueued: Instant,
    pub deadline: Option<Instant>,
    pub respond: oneshot::Sender<Result<Vec<f32>, ScheduleError>>,
    /// The request it came from, for its batch's log lines and span.
    pub origin: Origin,
    /// The request's `queue` span: ends when the last of its images starts computing
    /// (disabled, and free, unless traces are exported).
    pub queued: tracing::Span,
}

/// Who asked for a job: what the worker names in its log lines and links its batch's
/// span to. Cheap to clone (one per image).
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// The request's id (`x-request-id`, or one made for it); empty when it has none.
    pub request_id: Arc<str>,
    /// The request's span, when traces are exported ([`crate::process::telemetry::link_to`]).
    pub span: Option<Arc<opentelemetry::trace::SpanContext>>,
    /// It takes the logits of an image holding NaN or infinite values, computed as
    /// given (KServe, as Triton does); otherwise such an image is refused
    /// ([`ScheduleError::NonFinite`]).
    pub compute_non_finite: bool,
}

impl Origin {
    /// A request known by `request_id`, called inside its span.
    pub fn new(request_id: &str) -> Self {
        Origin {
            request_id: Arc::from(request_id),
            span: crate::process::telemetry::current_link().map(Arc::new),
            compute_non_finite: false,
        }
    }
}

impl Job {
    /// Its caller is gone or its deadline has passed: computing it would be wasted.
    pub fn is_dead(&self, now: Instant) -> bool {
        self.respond.is_closed() || self.deadline.is_some_and(|d| d <= now)
    }
}

/// Where a request's images wait: high-priority images join batches before any normal
/// one that is waiting (KServe's `priority` request parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    High,
    #[default]
    Normal,
}

/// A cheap, cloneable handle on one model's queues.
#[derive(Clone)]
pub struct ModelHandle {
    name: Arc<str>,
    info: BackendInfo,
    /// [`Backend::implementation`] of the first replica.
    implementation: Arc<str>,
    policy: BatchPolicy,
    tx: mpsc::Sender<Job>,
    tx_high: mpsc::Sender<Job>,
    metrics: Arc<ModelMetrics>,
}

impl ModelHandle {
    /// Starts the batcher task (on the current runtime) and one worker thread per
    /// replica. `replicas` must not be empty; they all serve the same model.
    pub fn spawn(
        name: &str,
        replicas: Vec<Arc<dyn Backend>>,
        policy: BatchPolicy,
        metrics: Arc<ModelMetrics>,
    ) -> Self {
        let (tx, normal) = mpsc::channel(policy.queue_capacity);
        let (tx_high, high) = mpsc::channel(policy.queue_capacity);
        let (batch_tx, batch_rx) = mpsc::channel(1);
        let mut info = replicas.first().map(|b| b.info()).unwrap_or(BackendInfo {
            architecture: String::new(),
            device: String::new(),
            dtype: String::new(),
        });
        let mut devices: Vec<String> = Vec::new();
        for b in &replicas {
            let d = b.info().device;
            if !devices.contains(&d) {
                devices.push(d);
            }
        }
        if !devices.is_empty() {
            info.device = devices.join(",");
        }
        let implementation: Arc<str> = replicas
            .first()
            .map(|b| b.implementation())
            .unwrap_or_default()
            .into();
        let shared = Arc::new(std::sync::Mutex::new(batch_rx));
        let free = Arc::new(tokio::sync::Semaphore::new(0));
        for (i, backend) in replicas.into_iter().enumerate() {
            worker::spawn(
                name,
                i,
                backend,
                policy.clone(),
                shared.clone(),
                free.clone(),
                metrics.clone(),
            );
        }
        tokio::spawn(batcher::batcher_task(
            batcher::Queues { high, normal },
            policy.clone(),
            free,
            batch_tx,
            metrics.clone(),
        ));
        ModelHandle {
            name: Arc::from(name),
            info,
            implementation,
            policy,
            tx,
            tx_high,
            metrics,
        }
    }

    /// The model's metrics and cumulative statistics.
    pub fn metrics(&self) -> &ModelMetrics {
        &self.metrics
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn info(&self) -> &BackendInfo {
        &self.info
    }

    /// The kernels that run the model ([`Backend::implementation`]).
    pub fn implementation(&self) -> &str {
        &self.implementation
    }

    pub fn policy(&self) -> &BatchPolicy {
        &self.policy
    }

    /// Images waiting in the queues now.
    pub fn queue_depth(&self) -> usize {
        (self.tx.max_capacity() - self.tx.capacity())
            + (self.tx_high.max_capacity() - self.tx_high.capacity())
    }

    /// Logits for each input, in order. Each image is its own job, so a request larger
    /// than the largest batch spreads over several batches. Refuses at once, without
    /// queueing anything, when the queue cannot take every image.
    pub async fn classify(
        &self,
        inputs: Vec<ModelInput>,
        deadline: Option<Instant>,
    ) -> Result<Vec<Vec<f32>>, ScheduleError> {
        self.classify_with_priority(inputs, deadline, Priority::Normal)
            .await
    }

    /// [`ModelHandle::classify`] at a given priority.
    pub async fn classify_with_priority(
        &self,
        inputs: Vec<ModelInput>,
        deadline: Option<Instant>,
        priority: Priority,
    ) -> Result<Vec<Vec<f32>>, ScheduleError> {
        self.classify_from(inputs, deadline, priority, Origin::default())
            .await
    }

    /// [`ModelHandle::classify_with_priority`] for a request the worker names in its
    /// logs and its batch's span links to. Its images' wait is the `queue` span, a child
    /// of the current one (the request's).
    pub async fn classify_from(
        &self,
        inputs: Vec<ModelInput>,
        deadline: Option<Instant>,
        priority: Priority,
        origin: Origin,
    ) -> Result<Vec<Vec<f32>>, ScheduleError> {
        let full = || ScheduleError::QueueFull {
            model: self.name.to_string(),
            capacity: self.policy.queue_capacity,
        };
        let tx = match priority {
            Priority::High => &self.tx_high,
            Priority::Normal => &self.tx,
        };
        if inputs.len() > self.policy.queue_capacity {
            return Err(ScheduleError::LargerThanQueue {
                model: self.name.to_string(),
                images: inputs.len(),
                capacity: self.policy.queue_capacity,
            });
        }
        // Reserve every slot first, so a request is queued whole or not at all.
        let permits = match tx.try_reserve_many(inputs.len()) {
            Ok(p) => p,
            Err(mpsc::error::TrySendError::Full(())) => return Err(full()),
            Err(mpsc::error::TrySendError::Closed(())) => {
                return Err(ScheduleError::Stopped(self.name.to_string()))
            }
        };
        let now = Instant::now();
        let mut receivers = Vec::with_capacity(inputs.len());
        // A debug span: only the exporting layer enables it.
        let queued = tracing::debug_span!("queue", images = inputs.len() as i64);
        for (index, (permit, input)) in permits.zip(inputs).enumerate() {
            let (respond, rx) = oneshot::channel();
            permit.send(Job {
                input,
                index,
                enqueued: now,
                deadline,
                respond,
                origin: origin.clone(),
                queued: queued.clone(),
            });
            receivers.push(rx);
        }
        // The jobs hold the span now: it ends as the last of them starts computing.
        drop(queued);
        self.metrics.images_queued.inc_by(receivers.len() as u64);
        self.metrics.queue_depth.set(self.queue_depth() as i64);
        let gather = async {
            let mut out = Vec::with_capacity(receivers.len());
            for rx in receivers {
                // A job dropped unanswered was skipped as dead (its deadline passed while
                // queued) or its model stopped.
                let answer = rx.await.map_err(|_| match deadline {
                    Some(d) if d <= Instant::now() => {
                        ScheduleError::DeadlineExceeded(self.name.to_string())
                    }
                    _ => ScheduleError::Stopped(self.name.to_string()),
                })?;
                out.push(answer?);
            }
            Ok(out)
        };
        match deadline {
            // A timer, not the running batch, decides: dropping the receivers here
            // marks the jobs dead so they are never computed.
            Some(d) => tokio::time::timeout_at(d, gather)
                .await
                .unwrap_or_else(|_| Err(ScheduleError::DeadlineExceeded(self.name.to_string()))),
            None => gather.await,
        }
    }
}
