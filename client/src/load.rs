//! The load tester behind `resnet-client load`.
//!
//! Closed loop: `concurrency` workers each send back to back. Open loop: requests leave
//! on a fixed schedule (`rate` per second) whatever the server does, and each latency
//! is measured from the request's *intended* send time, so a stalled server shows up in
//! the percentiles instead of silently lowering the offered load (coordinated omission,
//! as wrk2 corrects it). Both stop by themselves at `duration` or `requests`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use crate::proto::inference::{infer_parameter::ParameterChoice, InferParameter};
use crate::proto::{self, ClassifyRequest};
use crate::shm::TENSOR_BYTES;
use crate::{wire, Client, Output};

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

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub mode: String,
    /// Connections the requests were spread over.
    pub connections: usize,
    /// `closed` or `open`.
    pub loop_kind: String,
    /// Concurrency (closed loop) or offered requests/s (open loop).
    pub offered: f64,
    pub transport: String,
    pub duration_s: f64,
    /// Requests counted: `ok + sum(errors)`.
    pub requests: u64,
    pub ok: u64,
    /// Failed requests by gRPC status code name.
    pub errors: BTreeMap<String, u64>,
    pub throughput_rps: f64,
    pub images_per_s: f64,
    pub latency_ms: Latency,
    /// Server-side batching during the run, when its metrics endpoint was given.
    pub server: Option<crate::metrics::BatchStats>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// Shared between workers: latencies (µs) and outcomes of measured requests.
struct Recorder {
    measure_from: Instant,
    histogram: Mutex<Histogram<u64>>,
    ok: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    progress: ProgressBar,
}

impl Recorder {
    fn record(&self, intended: Instant, result: Result<(), tonic::Code>) {
        if intended < self.measure_from {
            return; // warm-up
        }
        let micros = intended.elapsed().as_micros().max(1) as u64;
        if let Ok(mut h) = self.histogram.lock() {
            h.saturating_record(micros);
        }
        match result {
            Ok(()) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(code) => {
                if let Ok(mut e) = self.errors.lock() {
                    *e.entry(code_name(code)).or_insert(0) += 1;
                }
            }
        }
        self.progress.inc(1);
    }
}

pub(crate) fn code_name(code: tonic::Code) -> String {
    format!("{code:?}").chars().fold(String::new(), |mut s, c| {
        if c.is_uppercase() && !s.is_empty() {
            s.push('_');
        }
        s.push(c.to_ascii_uppercase());
        s
    })
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

fn request_images(cfg: &LoadConfig, i: u64) -> Vec<proto::Image> {
    (0..cfg.images_per_request as u64)
        .map(|k| {
            cfg.inputs[((i * cfg.images_per_request as u64 + k) % cfg.inputs.len() as u64) as usize]
                .clone()
        })
        .collect()
}

/// The KServe input parameters that place a request's images in shared memory, when
/// they are shared tensors lying one after another in one region (KServe takes a batch
/// as one window); `None` for images sent as bytes.
fn shared_window(
    images: &[proto::Image],
) -> Result<Option<HashMap<String, InferParameter>>, tonic::Code> {
    let Some(proto::image::Kind::Shared(first)) = images.first().and_then(|i| i.kind.as_ref())
    else {
        return Ok(None);
    };
    let contiguous = images.iter().enumerate().all(|(k, img)| {
        matches!(&img.kind, Some(proto::image::Kind::Shared(s))
            if s.region == first.region && s.offset == first.offset + k as u64 * TENSOR_BYTES)
    });
    if !contiguous {
        return Err(tonic::Code::InvalidArgument);
    }
    let param = |choice| InferParameter {
        parameter_choice: Some(choice),
    };
    let bytes = images.len() as u64 * TENSOR_BYTES;
    Ok(Some(HashMap::from([
        (
            "shared_memory_region".to_string(),
            param(ParameterChoice::StringParam(first.region.clone())),
        ),
        (
            "shared_memory_byte_size".to_string(),
            param(ParameterChoice::Int64Param(bytes as i64)),
        ),
        (
            "shared_memory_offset".to_string(),
            param(ParameterChoice::Int64Param(first.offset as i64)),
        ),
    ])))
}

/// One KServe `ModelInfer` carrying the same images a `Classify` would.
async fn kserve(client: &Client, cfg: &LoadConfig, i: u64) -> Result<(), tonic::Status> {
    use proto::inference::{
        model_infer_request::InferInputTensor, ModelInferRequest, ModelInferResponse,
    };
    let images = request_images(cfg, i);
    let n = images.len() as i64;
    // Sent as the images' own buffers, one after another in the raw field.
    let tensors: Option<Vec<Bytes>> = images
        .iter()
        .map(|img| match &img.kind {
            Some(proto::image::Kind::Tensor(t)) => Some(t.data.clone()),
            _ => None,
        })
        .collect();
    let fp32 = |parameters| InferInputTensor {
        name: "input".into(),
        datatype: "FP32".into(),
        shape: vec![n, 3, 224, 224],
        parameters,
        ..Default::default()
    };
    let window = shared_window(&images)
        .map_err(|code| tonic::Status::new(code, "a batch in shared memory is one window"))?;
    let (model, input, raw) = match (window, tensors) {
        // One window of a shared-memory region holds the whole batch.
        (Some(parameters), _) => (cfg.model.clone(), fp32(parameters), Vec::new()),
        (None, Some(raw)) => (cfg.model.clone(), fp32(HashMap::new()), raw),
        (None, None) => {
            let mut raw = Vec::with_capacity(2 * images.len());
            for img in &images {
                let Some(proto::image::Kind::Encoded(e)) = &img.kind else {
                    return Err(tonic::Status::invalid_argument(
                        "KServe requests take tensors or encoded files, not raw frames",
                    ));
                };
                raw.push(Bytes::copy_from_slice(&(e.data.len() as u32).to_le_bytes()));
                raw.push(e.data.clone());
            }
            (
                format!("{}_image", cfg.model),
                InferInputTensor {
                    name: "image".into(),
                    datatype: "BYTES".into(),
                    shape: vec![n, 1],
                    ..Default::default()
                },
                raw,
            )
        }
    };
    let req = ModelInferRequest {
        model_name: model,
        inputs: vec![input],
        // Only the logits, as the Classify side asks for its configured output.
        outputs: vec![
            proto::inference::model_infer_request::InferRequestedOutputTensor {
                name: "logits".into(),
                parameters: Default::default(),
            },
        ],
        ..Default::default()
    };
    let mut encoded = wire::Encoded::new(&req);
    if !raw.is_empty() {
        encoded = encoded.with_bytes_field(RAW_INPUT_CONTENTS, &raw);
    }
    client
        .unary::<ModelInferResponse>(wire::MODEL_INFER, encoded, client.config().timeout)
        .await
        .map(|_| ())
}

/// `ModelInferRequest.raw_input_contents`' field number.
const RAW_INPUT_CONTENTS: u32 = 7;

async fn unary(client: &Client, cfg: &LoadConfig, i: u64) -> Result<(), tonic::Code> {
    call(client, cfg, i).await.map_err(|s| s.code())
}

/// Request `i` of a unary load (`Classify`, or `ModelInfer` for [`Transport::KServe`]),
/// sent once, with the whole status: the soak tool tells the server's answers from
/// transport failures by it.
pub(crate) async fn call(client: &Client, cfg: &LoadConfig, i: u64) -> Result<(), tonic::Status> {
    if cfg.transport == Transport::KServe {
        return kserve(client, cfg, i).await;
    }
    let req = ClassifyRequest {
        model: cfg.model.clone(),
        images: request_images(cfg, i),
        output: Some(cfg.output.spec()),
        request_id: String::new(),
    };
    // One attempt: a load tester reports what the server answered.
    client
        .unary::<proto::ClassifyResponse>(
            wire::CLASSIFY,
            wire::Encoded::new(&req),
            client.config().timeout,
        )
        .await
        .map(|_| ())
}

fn frame(cfg: &LoadConfig, i: u64) -> proto::StreamFrame {
    proto::StreamFrame {
        frame_id: i,
        model: cfg.model.clone(),
        image: Some(cfg.inputs[(i % cfg.inputs.len() as u64) as usize].clone()),
        output: Some(cfg.output.spec()),
    }
}

fn outcome(r: &proto::StreamResult) -> Result<(), tonic::Code> {
    match &r.outcome {
        Some(proto::stream_result::Outcome::Error(e)) => Err(tonic::Code::from_i32(e.code)),
        _ => Ok(()),
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
        histogram: Mutex::new(
            Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|e| panic!("histogram: {e}"))),
        ),
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

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} ({}, {} connection{}), {:.1} s",
            self.mode,
            self.transport,
            self.connections,
            if self.connections == 1 { "" } else { "s" },
            self.duration_s
        )?;
        writeln!(
            f,
            "requests: {} ({} ok, {} failed)   throughput: {:.2} req/s, {:.2} images/s",
            self.requests,
            self.ok,
            self.requests - self.ok,
            self.throughput_rps,
            self.images_per_s
        )?;
        let l = &self.latency_ms;
        writeln!(
            f,
            "latency ms: p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.1}",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        )?;
        for (code, n) in &self.errors {
            writeln!(f, "errors {code}: {n}")?;
        }
        if let Some(s) = &self.server {
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

impl LoadReport {
    pub const CSV_HEADER: &'static str =
        "loop,offered,transport,duration_s,requests,ok,failed,throughput_rps,images_per_s,p50_ms,p90_ms,p99_ms,p999_ms,max_ms,mean_ms,server_batches,server_mean_batch";

    pub fn csv_row(&self) -> String {
        let l = &self.latency_ms;
        format!(
            "{},{},{},{:.3},{},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{},{}",
            self.loop_kind,
            self.offered,
            self.transport,
            self.duration_s,
            self.requests,
            self.ok,
            self.requests - self.ok,
            self.throughput_rps,
            self.images_per_s,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            l.mean,
            self.server
                .as_ref()
                .map_or(String::new(), |s| format!("{:.0}", s.batches)),
            self.server
                .as_ref()
                .map_or(String::new(), |s| format!("{:.3}", s.mean_batch_size)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::shared_tensor;

    #[test]
    fn code_names_are_grpc_style() {
        assert_eq!(
            code_name(tonic::Code::ResourceExhausted),
            "RESOURCE_EXHAUSTED"
        );
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(
            code_name(tonic::Code::DeadlineExceeded),
            "DEADLINE_EXCEEDED"
        );
    }

    #[test]
    fn a_kserve_batch_in_shared_memory_is_one_window() {
        let images: Vec<_> = (2..5)
            .map(|k| shared_tensor("r", k * TENSOR_BYTES))
            .collect();
        let params = shared_window(&images).expect("contiguous").expect("shared");
        let int = |key: &str| match params[key].parameter_choice {
            Some(ParameterChoice::Int64Param(v)) => v,
            ref other => panic!("{key}: {other:?}"),
        };
        assert_eq!(int("shared_memory_offset"), 2 * TENSOR_BYTES as i64);
        assert_eq!(int("shared_memory_byte_size"), 3 * TENSOR_BYTES as i64);
        let gap = vec![shared_tensor("r", 0), shared_tensor("r", 2 * TENSOR_BYTES)];
        assert_eq!(shared_window(&gap), Err(tonic::Code::InvalidArgument));
        let two_regions = vec![shared_tensor("r", 0), shared_tensor("s", TENSOR_BYTES)];
        assert_eq!(
            shared_window(&two_regions),
            Err(tonic::Code::InvalidArgument)
        );
        let sent = vec![crate::tensor(&[0.0; 3 * 224 * 224])];
        assert_eq!(shared_window(&sent), Ok(None));
    }
}
