//! The load tester behind `resnet-client load`.
//!
//! Closed loop: `concurrency` workers each send back to back. Open loop: requests leave
//! on a fixed schedule (`rate` per second) whatever the server does, and each latency
//! is measured from the request's *intended* send time, so a stalled server shows up in
//! the percentiles instead of silently lowering the offered load (coordinated omission,
//! as wrk2 corrects it). Both stop by themselves at `duration` or `requests`.

mod report;
mod request;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::ProgressBar;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use crate::{proto, Client, Output};
use report::Recorder;
use request::{frame, outcome, unary};

pub(crate) use report::{code_name, latency_histogram};
pub use report::{Latency, LoadReport};
pub(crate) use request::call;

/// How requests are offered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Closed { concurrency: usize },
    Open { rate: f64, max_outstanding: usize },
}

/// Unary `Classify` calls, frames on `ClassifyStream`s, or unary KServe `ModelInfer`
/// calls with the same images (FP32 tensors to `MODEL`, encoded files to `MODEL_image`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Unary,
    Stream,
    KServe,
}

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub mode: Mode,
    pub transport: Transport,
    /// Measured time (after warm-up). At least one of this and `requests` is set.
    pub duration: Option<Duration>,
    /// Measured requests (after warm-up).
    pub requests: Option<u64>,
    pub warmup: Duration,
    pub model: String,
    /// Images per request (unary); streams send one image per frame.
    pub images_per_request: usize,
    /// Used round-robin.
    pub inputs: Vec<proto::Image>,
    pub output: Output,
}

/// Hands out request slots until the run's end, by time or count.
struct Budget {
    end: Option<Instant>,
    measure_from: Instant,
    limit: Option<u64>,
    issued: AtomicU64,
}

impl Budget {
    /// Whether one more request may start now.
    fn take(&self) -> bool {
        let now = Instant::now();
        if self.end.is_some_and(|e| now >= e) {
            return false;
        }
        if now < self.measure_from {
            return true; // warm-up requests are not counted
        }
        let n = self.issued.fetch_add(1, Ordering::SeqCst);
        self.limit.is_none_or(|l| n < l)
    }
}

/// Runs the load and reports it. `metrics_addr` (host:port of the server's metrics
/// endpoint) adds the server's batching statistics over the run.
/// `clients` are separate connections; requests are spread over them round-robin (one
/// HTTP/2 connection is read and written by one task on each side, which caps it near
/// one core's worth of bytes: a load of float tensors needs several).
pub async fn run(
    clients: &[Client],
    cfg: &LoadConfig,
    metrics_addr: Option<&str>,
    progress: ProgressBar,
) -> LoadReport {
    assert!(!cfg.inputs.is_empty(), "a load needs at least one input");
    assert!(!clients.is_empty(), "a load needs at least one connection");
    let before = match metrics_addr {
        Some(a) => crate::metrics::scrape(a).await.ok(),
        None => None,
    };
    let start = Instant::now();
    let measure_from = start + cfg.warmup;
    let end = cfg.duration.map(|d| measure_from + d);
    let budget = Arc::new(Budget {
        end,
        measure_from,
        limit: cfg.requests,
        issued: AtomicU64::new(0),
    });
    let recorder = Arc::new(Recorder {
        measure_from,
        histogram: Mutex::new(latency_histogram()),
        ok: AtomicU64::new(0),
        errors: Mutex::new(BTreeMap::new()),
        progress,
    });
    match cfg.mode {
        Mode::Closed { concurrency } => closed(clients, cfg, concurrency, &budget, &recorder).await,
        Mode::Open {
            rate,
            max_outstanding,
        } => open(clients, cfg, rate, max_outstanding, &budget, &recorder).await,
    }
    let elapsed = (Instant::now().max(measure_from) - measure_from)
        .as_secs_f64()
        .max(1e-9);
    recorder.progress.finish_and_clear();
    let after = match metrics_addr {
        Some(a) => crate::metrics::scrape(a).await.ok(),
        None => None,
    };
    let h = recorder
        .histogram
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|p| p.into_inner().clone());
    let ok = recorder.ok.load(Ordering::SeqCst);
    let errors = recorder
        .errors
        .lock()
        .map(|e| e.clone())
        .unwrap_or_default();
    let requests = ok + errors.values().sum::<u64>();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    LoadReport {
        connections: clients.len(),
        mode: match cfg.mode {
            Mode::Closed { concurrency } => format!("closed loop, concurrency {concurrency}"),
            Mode::Open { rate, .. } => format!("open loop, {rate} req/s"),
        },
        loop_kind: match cfg.mode {
            Mode::Closed { .. } => "closed".into(),
            Mode::Open { .. } => "open".into(),
        },
        offered: match cfg.mode {
            Mode::Closed { concurrency } => concurrency as f64,
            Mode::Open { rate, .. } => rate,
        },
        transport: match cfg.transport {
            Transport::Unary => "unary".into(),
            Transport::Stream => "stream".into(),
            Transport::KServe => "kserve".into(),
        },
        duration_s: elapsed,
        requests,
        ok,
        errors,
        throughput_rps: ok as f64 / elapsed,
        images_per_s: ok as f64 * cfg.images_per_request as f64 / elapsed,
        latency_ms: Latency {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
            mean: h.mean() / 1000.0,
        },
        server: match (before, after) {
            (Some(b), Some(a)) => Some(a.since(&b)),
            _ => None,
        },
    }
}

async fn closed(
    clients: &[Client],
    cfg: &LoadConfig,
    concurrency: usize,
    budget: &Arc<Budget>,
    recorder: &Arc<Recorder>,
) {
    let mut tasks = Vec::new();
    for w in 0..concurrency.max(1) {
        let (client, cfg, budget, recorder) = (
            clients[w % clients.len()].clone(),
            cfg.clone(),
            budget.clone(),
            recorder.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = w as u64;
            match cfg.transport {
                Transport::Unary | Transport::KServe => {
                    while budget.take() {
                        let sent = Instant::now();
                        recorder.record(sent, unary(&client, &cfg, i).await);
                        i += concurrency as u64;
                    }
                }
                Transport::Stream => {
                    let (tx, rx) = mpsc::channel(1);
                    let Ok(mut responses) = client.classify_stream(ReceiverStream::new(rx)).await
                    else {
                        recorder.record(Instant::now(), Err(tonic::Code::Unavailable));
                        return;
                    };
                    while budget.take() {
                        let sent = Instant::now();
                        if tx.send(frame(&cfg, i)).await.is_err() {
                            break;
                        }
                        match responses.message().await {
                            Ok(Some(r)) => recorder.record(sent, outcome(&r)),
                            Ok(None) => break,
                            Err(s) => {
                                recorder.record(sent, Err(s.code()));
                                break;
                            }
                        }
                        i += concurrency as u64;
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn open(
    clients: &[Client],
    cfg: &LoadConfig,
    rate: f64,
    max_outstanding: usize,
    budget: &Arc<Budget>,
    recorder: &Arc<Recorder>,
) {
    let interval = Duration::from_secs_f64(1.0 / rate.max(1e-6));
    let start = Instant::now();
    let slots = Arc::new(Semaphore::new(max_outstanding.max(1)));
    let mut tasks = Vec::new();
    // Streams: one stream; responses come back in order, matched to intended times.
    let stream = if cfg.transport == Transport::Stream {
        let (tx, rx) = mpsc::channel::<proto::StreamFrame>(max_outstanding.max(1));
        let intended: Arc<Mutex<VecDeque<Instant>>> = Arc::default();
        match clients[0].classify_stream(ReceiverStream::new(rx)).await {
            Ok(mut responses) => {
                let (intended2, recorder2) = (intended.clone(), recorder.clone());
                tasks.push(tokio::spawn(async move {
                    while let Ok(Some(r)) = responses.message().await {
                        let at = intended2.lock().ok().and_then(|mut q| q.pop_front());
                        if let Some(at) = at {
                            recorder2.record(at, outcome(&r));
                        }
                    }
                }));
                Some((tx, intended))
            }
            Err(s) => {
                recorder.record(Instant::now(), Err(s.code()));
                return;
            }
        }
    } else {
        None
    };
    let mut i = 0u64;
    loop {
        let intended = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(intended).await;
        if !budget.take() {
            break;
        }
        match &stream {
            Some((tx, queue)) => {
                if let Ok(mut q) = queue.lock() {
                    q.push_back(intended);
                }
                if tx.send(frame(cfg, i)).await.is_err() {
                    break;
                }
            }
            None => {
                // Waiting for a slot delays the send but not the clock latency counts from.
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    break;
                };
                let client = clients[(i % clients.len() as u64) as usize].clone();
                let (cfg, recorder) = (cfg.clone(), recorder.clone());
                tasks.push(tokio::spawn(async move {
                    let result = unary(&client, &cfg, i).await;
                    recorder.record(intended, result);
                    drop(permit);
                }));
            }
        }
        i += 1;
    }
    // Closing the request stream ends the response stream once every frame is answered.
    drop(stream);
    for t in tasks {
        let _ = t.await;
    }
}
