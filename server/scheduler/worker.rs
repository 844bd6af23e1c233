//! The device worker: owns a model on its own OS thread (compute never runs on tokio's
//! workers), pads each batch to its allowed size, and splits the logits back to the
//! jobs. A panic fails that batch's jobs and the thread is replaced by a fresh one.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::batcher::Batch;
use super::{BatchPolicy, ScheduleError};
use crate::metrics::ModelMetrics;
use crate::model::{Classifier, ModelError};
use crate::preprocess::INPUT_LEN;

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
}

impl Backend for Classifier {
    fn forward(&self, pixels: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ModelError> {
        self.classify(pixels, n)
    }

    fn info(&self) -> BackendInfo {
        BackendInfo {
            architecture: self.architecture().to_string(),
            device: match self.device() {
                candle_core::Device::Cpu => "cpu".to_string(),
                other => format!("{:?}", other.location()),
            },
            dtype: format!("{:?}", self.dtype()).to_lowercase(),
        }
    }
}

/// Runs the worker under a supervisor thread that starts a fresh worker whenever one
/// dies of a panic.
pub fn spawn(
    name: &str,
    backend: Arc<dyn Backend>,
    policy: BatchPolicy,
    rx: mpsc::Receiver<Batch>,
    metrics: Arc<ModelMetrics>,
) {
    let name = name.to_string();
    let supervisor = std::thread::Builder::new()
        .name(format!("supervise-{name}"))
        .spawn(move || {
            let mut rx = rx;
            loop {
                let (backend, policy, worker_metrics, thread_name) = (
                    backend.clone(),
                    policy.clone(),
                    metrics.clone(),
                    name.clone(),
                );
                let worker = std::thread::Builder::new()
                    .name(format!("worker-{name}"))
                    .spawn(move || {
                        worker_loop(&thread_name, backend.as_ref(), &policy, rx, &worker_metrics)
                    });
                match worker.map(|h| h.join()) {
                    // The worker handed its queue back after a panic: restart it.
                    Ok(Ok(Some(back))) => {
                        metrics.worker_restarts.inc();
                        tracing::warn!(model = %name, "worker restarted after a panic");
                        rx = back;
                    }
                    Ok(Ok(None)) => return, // queue closed: shutting down
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

/// Serves batches until the queue closes (`None`) or a forward pass panics (returns the
/// queue so a fresh thread can take over).
fn worker_loop(
    name: &str,
    backend: &dyn Backend,
    policy: &BatchPolicy,
    mut rx: mpsc::Receiver<Batch>,
    metrics: &ModelMetrics,
) -> Option<mpsc::Receiver<Batch>> {
    while let Some(batch) = rx.blocking_recv() {
        let now = tokio::time::Instant::now();
        let jobs: Vec<_> = batch.jobs.into_iter().filter(|j| !j.is_dead(now)).collect();
        if jobs.is_empty() {
            continue;
        }
        let size = policy.batch_size_for(jobs.len()).max(jobs.len());
        metrics.record_batch(jobs.len(), size);
        let mut pixels = vec![0f32; size * INPUT_LEN];
        for (slot, job) in pixels.chunks_exact_mut(INPUT_LEN).zip(&jobs) {
            slot.copy_from_slice(&job.input);
        }
        let started = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| backend.forward(&pixels, size)));
        metrics.observe_compute(size, started.elapsed().as_secs_f64());
        let fail = |message: String| ScheduleError::Compute {
            model: name.to_string(),
            message,
        };
        match result {
            Ok(Ok(rows)) if rows.len() == size => {
                for (job, row) in jobs.into_iter().zip(rows) {
                    let _ = job.respond.send(Ok(row));
                }
            }
            Ok(Ok(rows)) => {
                let e = fail(format!(
                    "backend returned {} rows for a batch of {size}",
                    rows.len()
                ));
                jobs.into_iter()
                    .for_each(|j| drop(j.respond.send(Err(e.clone()))));
            }
            Ok(Err(e)) => {
                let e = fail(e.to_string());
                jobs.into_iter()
                    .for_each(|j| drop(j.respond.send(Err(e.clone()))));
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(model = %name, panic = %what, "forward pass panicked");
                let e = fail(format!(
                    "internal error in the model worker ({what}); the worker was restarted"
                ));
                jobs.into_iter()
                    .for_each(|j| drop(j.respond.send(Err(e.clone()))));
                return Some(rx);
            }
        }
    }
    None
}
