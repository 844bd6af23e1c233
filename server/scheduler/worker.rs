//! The device workers: each owns a model replica on its own OS thread (compute never
//! runs on tokio's workers), says it is free, takes the next formed batch from the
//! model's shared batch queue, pads it to its allowed size, and splits the logits back to the jobs. A panic
//! fails that batch's jobs and the thread is replaced by a fresh one. Each batch runs in a
//! `batch` span linked to its requests' spans; its log lines name its requests' ids.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;

use super::batcher::{Batch, FreeWorkers};
use super::{BatchPolicy, Job, ScheduleError};
use crate::model::{Classifier, InputView, Logits, ModelError};
use crate::process::metrics::ModelMetrics;

/// What a model reports about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendInfo {
    pub architecture: String,
    pub device: String,
    pub dtype: String,
}

/// Something that turns a padded batch into logits: the seam between scheduling and
/// compute.
pub trait Backend: Send + Sync + 'static {
    /// `pixels` holds `n` contiguous `3 x 224 x 224` inputs; returns `n` logit rows.
    fn forward(&self, pixels: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ModelError>;
    fn info(&self) -> BackendInfo;

    /// The kernels that run the model, for `GetModel`/KServe's model configuration
    /// (`avx2-direct=53`: the CPU convolutions by implementation); empty when unknown.
    fn implementation(&self) -> String {
        String::new()
    }

    /// Logits for `images` padded with zero images to `size` rows, with the time spent
    /// getting the input ready. By default the images are gathered into one buffer for
    /// [`Backend::forward`]; a backend with staging of its own (pinned memory for a GPU)
    /// takes them one by one instead.
    fn forward_images(&self, images: &[InputView<'_>], size: usize) -> Result<Logits, ModelError> {
        let started = Instant::now();
        let crate::model::Gathered { pixels, rejected } = crate::model::padded_batch(images, size)?;
        let input_time = started.elapsed();
        Ok(Logits {
            rows: self.forward(&pixels, size)?,
            input_time,
            rejected,
        })
    }
}

impl Backend for Classifier {
    fn forward(&self, pixels: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ModelError> {
        self.classify(pixels, n)
    }

    fn forward_images(&self, images: &[InputView<'_>], size: usize) -> Result<Logits, ModelError> {
        self.classify_batch(images, size)
    }

    fn info(&self) -> BackendInfo {
        BackendInfo {
            architecture: self.architecture().to_string(),
            device: crate::process::device::describe(self.device()),
            dtype: format!("{:?}", self.dtype()).to_lowercase(),
        }
    }

    fn implementation(&self) -> String {
        Classifier::implementation(self)
    }
}

/// The batches of one model, shared by its replicas: whichever worker is free takes the
/// next one.
pub type SharedBatches = Arc<Mutex<mpsc::Receiver<Batch>>>;

/// Runs one replica's worker under a supervisor thread that starts a fresh worker
/// whenever one dies of a panic.
pub fn spawn(
    name: &str,
    replica: usize,
    backend: Arc<dyn Backend>,
    policy: BatchPolicy,
    rx: SharedBatches,
    free: FreeWorkers,
    metrics: Arc<ModelMetrics>,
) {
    let name = name.to_string();
    let supervisor = std::thread::Builder::new()
        .name(format!("supervise-{name}-{replica}"))
        .spawn(move || {
            loop {
                let (rx, free) = (rx.clone(), free.clone());
                let (backend, policy, worker_metrics, thread_name) = (
                    backend.clone(),
                    policy.clone(),
                    metrics.clone(),
                    name.clone(),
                );
                let worker = std::thread::Builder::new()
                    .name(format!("worker-{name}-{replica}"))
                    .spawn(move || {
                        worker_loop(
                            &thread_name,
                            backend.as_ref(),
                            &policy,
                            &rx,
                            &free,
                            &worker_metrics,
                        )
                    });
                match worker.map(|h| h.join()) {
                    // The forward pass panicked: restart the worker.
                    Ok(Ok(Exit::Panicked)) => {
                        metrics.worker_restarts.inc();
                        tracing::warn!(model = %name, replica, "worker restarted after a panic");
                    }
                    Ok(Ok(Exit::Closed)) => return, // queue closed: shutting down
                    Ok(Err(_)) | Err(_) => {
                        tracing::error!(model = %name, "worker thread could not run; model stops");
                        return;
                    }
                }
            }
        });
    if let Err(e) = supervisor {
        tracing::error!("cannot start a worker thread: {e}");
    }
}

enum Exit {
    Closed,
    Panicked,
}

/// The next batch for whichever replica asks first; `None` once the queue is closed.
fn next_batch(rx: &SharedBatches) -> Option<Batch> {
    // A poisoned lock only means another replica panicked while waiting; the receiver
    // itself is still sound.
    let mut guard = rx.lock().unwrap_or_else(|p| p.into_inner());
    guard.blocking_recv()
}

/// The distinct request ids of a batch's jobs, comma-separated, for its log lines
/// (formatted only when a line is written).
struct RequestIds<'a>(&'a [Job]);

impl std::fmt::Display for RequestIds<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut written: Vec<&str> = Vec::new();
        for job in self.0 {
            let id = &*job.origin.request_id;
            if id.is_empty() || written.contains(&id) {
                continue;
            }
            if !written.is_empty() {
                f.write_str(",")?;
            }
            f.write_str(id)?;
            written.push(id);
        }
        Ok(())
    }
}

/// Serves batches until the queue closes or a forward pass panics (a fresh thread then
/// takes over).
fn worker_loop(
    name: &str,
    backend: &dyn Backend,
    policy: &BatchPolicy,
    rx: &SharedBatches,
    free: &FreeWorkers,
    metrics: &ModelMetrics,
) -> Exit {
    loop {
        // Tell the batcher one more worker waits, so it may close the batch it fills.
        free.add_permits(1);
        let Some(batch) = next_batch(rx) else {
            break;
        };
        let now = tokio::time::Instant::now();
        let mut jobs: Vec<_> = batch.jobs.into_iter().filter(|j| !j.is_dead(now)).collect();
        if jobs.is_empty() {
            continue;
        }
        let size = policy.run_size(jobs.len());
        let live = jobs.len();
        metrics.record_batch(live, size);
        // A debug span, in a trace of its own: only the exporting layer (or debug logs)
        // enables it. It links to the span of each request it serves.
        let span = tracing::debug_span!(
            parent: None,
            "batch",
            model = name,
            // i64: the OpenTelemetry layer exports unsigned fields as strings.
            batch_size = live as i64,
            padded_size = size as i64
        );
        crate::process::telemetry::link_batch(
            &span,
            jobs.iter().filter_map(|j| j.origin.span.as_deref()),
        );
        for job in &mut jobs {
            // The image's wait is over.
            job.queued = tracing::Span::none();
        }
        let _in_batch = span.enter();
        tracing::debug!(requests = %RequestIds(&jobs), "batch of {live} padded to {size}");
        let images: Vec<InputView<'_>> = jobs.iter().map(|j| j.input.view()).collect();
        let started = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| backend.forward_images(&images, size)));
        let compute_time = started.elapsed();
        metrics.observe_compute(size, compute_time.as_secs_f64());
        let output_started = Instant::now();
        let fail = |message: String| ScheduleError::Compute {
            model: name.to_string(),
            message,
        };
        match result {
            Ok(Ok(Logits {
                rows,
                input_time,
                rejected,
            })) if rows.len() == size => {
                let mut refused = vec![None; live];
                for r in rejected.iter().filter(|r| r.image < live) {
                    refused[r.image] = Some(r.element);
                }
                let answers: Vec<_> = jobs
                    .into_iter()
                    .zip(rows)
                    .zip(refused)
                    .map(|((job, row), refused)| {
                        let answer = match refused {
                            None => Ok(row),
                            Some(_) if job.origin.compute_non_finite => {
                                metrics.nonfinite_inputs.inc();
                                Ok(row)
                            }
                            Some(element) => Err(ScheduleError::NonFinite {
                                image: job.index,
                                element,
                            }),
                        };
                        (job.respond, answer)
                    })
                    .collect();
                // Counted before anyone is answered: a client that asks for statistics
                // right after its reply must find its batch in them.
                metrics.stats.record_batch(
                    live,
                    size,
                    input_time,
                    compute_time.saturating_sub(input_time),
                    output_started.elapsed(),
                );
                for (respond, answer) in answers {
                    let _ = respond.send(answer);
                }
            }
            Ok(Ok(Logits { rows, .. })) => {
                let e = fail(format!(
                    "backend returned {} rows for a batch of {size}",
                    rows.len()
                ));
                tracing::error!(model = %name, requests = %RequestIds(&jobs), "{e}");
                jobs.into_iter()
                    .for_each(|j| drop(j.respond.send(Err(e.clone()))));
            }
            Ok(Err(e)) => {
                let e = fail(e.to_string());
                tracing::error!(model = %name, requests = %RequestIds(&jobs), "{e}");
                jobs.into_iter()
                    .for_each(|j| drop(j.respond.send(Err(e.clone()))));
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(
                    model = %name,
                    requests = %RequestIds(&jobs),
                    panic = %what,
                    "forward pass panicked"
                );
                let e = fail(format!(
                    "internal error in the model worker ({what}); the worker was restarted"
                ));
                jobs.into_iter()
                    .for_each(|j| drop(j.respond.send(Err(e.clone()))));
                return Exit::Panicked;
            }
        }
    }
    Exit::Closed
}
