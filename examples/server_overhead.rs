//! The serving path's own ceiling: the real gRPC server, batcher and workers, driven by
//! the real load client over loopback TCP, with a model whose forward pass costs a fixed
//! time per batch and computes nothing (what Triton's identity model is for). What a
//! GPU server reaches end to end can be put beside this ceiling: when the two are close,
//! the serving path (transport, decoding, batching), not the device, is the limit.
//!
//!     cargo run --release --example server_overhead -- [--batch-ms 2] [--workers 2] \
//!         [--batch-sizes 1,8,16,32,64] [--seconds 6] [--connections 16] [ROWS...]
//!
//! ROWS are CONCURRENCYxIMAGES (default 4x64 16x16 64x1); each prints one JSON line:
//! images/s of 3x224x224 float tensors and the latency percentiles. `--refused` names a
//! model the server lacks, so each request is received and decoded, then refused: the
//! transport alone. `--shared-memory` puts the tensor in a system shared-memory region
//! registered with the server and sends references to it (a client on the same host);
//! `--kserve` sends KServe `ModelInfer` calls instead of `Classify`, `--stream` one
//! `ClassifyStream` per client (one image per frame).
//!
//! `--one-device` makes the workers take turns holding the model's fixed cost, as two
//! workers take turns on one GPU (their staging still overlaps), and first measures the
//! same model in process: one thread calling it in a loop at the largest batch size on
//! the same 64 tensors, staging included. Each row then reports `vs_in_process`, the
//! ratio the GPU target is stated in (server end to end against in process at the same
//! batch size), for a device whose batch takes `--batch-ms`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use resnet_client::load::{self, LoadConfig, Mode, Transport};
use resnet_client::shm::SharedTensors;
use resnet_client::{tensor, Client, ClientConfig, Output};
use resnet_serve::model::{stage_batch, InputView, Logits, ModelError, NUM_CLASSES};
use resnet_serve::preprocess::INPUT_LEN;
use resnet_serve::process::local::LocalServer;
use resnet_serve::process::server::{self, ServeOptions};
use resnet_serve::scheduler::{Backend, BackendInfo, BatchPolicy};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A model that holds its worker for `per_batch` and answers zeros, after staging its
/// input with the GPU path's own `stage_batch` into an f16 batch buffer.
struct FixedCost {
    per_batch: Duration,
    /// Held while the fixed cost runs when the workers share one device.
    device: Option<Arc<std::sync::Mutex<()>>>,
}

thread_local! {
    /// Each worker's staging buffer (the GPU path's is pinned, one per captured pass).
    static STAGING: std::cell::RefCell<Vec<half::f16>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Backend for FixedCost {
    fn forward(&self, pixels: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ModelError> {
        let images: Vec<InputView<'_>> = pixels.chunks(INPUT_LEN).map(InputView::from).collect();
        Ok(self.forward_images(&images, n)?.rows)
    }

    fn forward_images(&self, images: &[InputView<'_>], size: usize) -> Result<Logits, ModelError> {
        use half::slice::HalfFloatSliceExt;
        let started = Instant::now();
        let rejected = STAGING.with_borrow_mut(|staging| {
            staging.resize(size * INPUT_LEN, half::f16::ZERO);
            let rejected = stage_batch(staging, images, half::f16::ZERO, |d, s| {
                d.convert_from_f32_slice(s)
            });
            std::hint::black_box(&staging[..]);
            rejected
        });
        let input_time = started.elapsed();
        let _turn = self
            .device
            .as_ref()
            .map(|d| d.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        std::thread::sleep(self.per_batch);
        Ok(Logits {
            rows: vec![vec![0f32; NUM_CLASSES]; size],
            input_time,
            rejected,
        })
    }

    fn info(&self) -> BackendInfo {
        BackendInfo {
            architecture: "fixed-cost".into(),
            device: "none".into(),
            dtype: "f32".into(),
        }
    }
}

/// Distinct input tensors the load cycles through.
const TENSORS: usize = 64;

struct Args {
    batch_ms: f64,
    workers: usize,
    sizes: Vec<usize>,
    seconds: f64,
    connections: usize,
    /// Requests name a model the server lacks: decoded in full, then refused (the
    /// transport alone).
    refused: bool,
    /// Tensors in a registered shared-memory region, sent as references.
    shared_memory: bool,
    /// KServe `ModelInfer` calls (a request's tensors as one FP32 input) instead of
    /// `Classify`.
    kserve: bool,
    /// One `ClassifyStream` per client instead of unary calls.
    stream: bool,
    /// The workers share one device; the in-process baseline is measured first.
    one_device: bool,
    rows: Vec<(usize, usize)>,
}

fn parse() -> anyhow::Result<Args> {
    let mut args = Args {
        batch_ms: 2.0,
        workers: 2,
        sizes: vec![1, 8, 16, 32, 64],
        seconds: 6.0,
        connections: 16,
        refused: false,
        shared_memory: false,
        kserve: false,
        stream: false,
        one_device: false,
        rows: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--batch-ms" => args.batch_ms = value()?.parse()?,
            "--workers" => args.workers = value()?.parse()?,
            "--seconds" => args.seconds = value()?.parse()?,
            "--connections" => args.connections = value()?.parse()?,
            "--refused" => args.refused = true,
            "--shared-memory" => args.shared_memory = true,
            "--kserve" => args.kserve = true,
            "--stream" => args.stream = true,
            "--one-device" => args.one_device = true,
            "--batch-sizes" => {
                args.sizes = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            row => {
                let (c, n) = row
                    .split_once('x')
                    .with_context(|| format!("'{row}': expected CONCURRENCYxIMAGES"))?;
                args.rows.push((c.parse()?, n.parse()?));
            }
        }
    }
    if args.rows.is_empty() {
        args.rows = vec![(4, 64), (16, 16), (64, 1)];
    }
    Ok(args)
}

/// CPU time (ns) the server's threads have used so far: its runtime's (named `serve`,
/// blocking pool included), its model workers' and the staging pool's. The load client runs on a runtime of
/// its own, so what the server costs per image can be told apart from what the client
/// costs, on a machine where the two share the cores.
fn server_cpu_ns() -> u64 {
    threads_cpu_ns(|comm| {
        comm.starts_with("serve") || comm.starts_with("worker-") || comm.starts_with("stage-")
    })
}

/// CPU time (ns) the load client's runtime has used so far.
fn client_cpu_ns() -> u64 {
    threads_cpu_ns(|comm| comm.starts_with("load-client"))
}

/// CPU time (ns) of this process's threads whose name passes `keep`.
fn threads_cpu_ns(keep: impl Fn(&str) -> bool) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            if !keep(&comm) {
                return None;
            }
            // schedstat: time on a CPU (ns), time waiting for one, timeslices.
            let stat = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            stat.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

fn main() -> anyhow::Result<()> {
    resnet_serve::process::allocator::keep_freed_memory();
    let args = parse()?;
    // Named, so the staging's CPU is counted as the server's whichever thread starts the
    // pool (unnamed, its threads would take the name of the thread that first used it).
    rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("stage-{i}"))
        .build_global()?;
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("serve")
        .enable_all()
        .build()?;
    let largest = args.sizes.iter().copied().max().unwrap_or(1);
    let options = ServeOptions {
        policy: BatchPolicy::new(&args.sizes, Duration::from_millis(2), 64 * largest)?,
        shared_memory: args.shared_memory,
        ..ServeOptions::default()
    };
    let model = Arc::new(FixedCost {
        per_batch: Duration::from_secs_f64(args.batch_ms / 1000.0),
        device: args.one_device.then(Default::default),
    });
    let values: Vec<Vec<f32>> = (0..TENSORS)
        .map(|i| vec![0.5 + i as f32 * 1e-3; 3 * 224 * 224])
        .collect();
    let in_process = if args.one_device {
        Some(in_process(&model, &values, largest, args.seconds)?)
    } else {
        None
    };
    let backend: Arc<dyn Backend> = model;
    let replicas = vec![backend; args.workers.max(1)];
    let loader: server::ModelLoader = Box::new(move || {
        Ok(replicas
            .into_iter()
            .map(|b| ("fixed".to_string(), b))
            .collect())
    });
    // Started inside the server's runtime, so it serves on that runtime's threads.
    let server = server_rt.block_on(async {
        let server = LocalServer::start(options, loader).await?;
        server.ready(Duration::from_secs(60)).await?;
        anyhow::Ok(server)
    })?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("load-client")
        .enable_all()
        .build()?;
    let metrics_addr = server.metrics_addr.to_string();
    client_rt.block_on(drive(
        &args,
        &values,
        in_process,
        &server.url,
        &metrics_addr,
    ))?;
    server_rt.block_on(server.stop())?;
    Ok(())
}

/// Images/s of the model called in process on one thread, `size` images a call (the
/// GPU bench's with-copies loop), after a second of warm-up; prints its JSON line.
fn in_process(
    model: &FixedCost,
    values: &[Vec<f32>],
    size: usize,
    seconds: f64,
) -> anyhow::Result<f64> {
    let views: Vec<InputView<'_>> = values.iter().map(|v| InputView::from(&v[..])).collect();
    let mut next = 0;
    let mut call = || {
        let batch: Vec<InputView<'_>> =
            (0..size).map(|i| views[(next + i) % views.len()]).collect();
        next = (next + size) % views.len();
        model.forward_images(&batch, size)
    };
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_secs(1) {
        call()?;
    }
    let started = Instant::now();
    let mut images = 0;
    while started.elapsed() < Duration::from_secs_f64(seconds) {
        call()?;
        images += size;
    }
    let images_per_s = images as f64 / started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "in_process": true,
            "batch": size,
            "batch_ms": model.per_batch.as_secs_f64() * 1e3,
            "images_per_s": images_per_s,
        })
    );
    Ok(images_per_s)
}

/// Runs each load row against the server and prints its JSON line.
async fn drive(
    args: &Args,
    values: &[Vec<f32>],
    in_process: Option<f64>,
    url: &str,
    metrics_addr: &str,
) -> anyhow::Result<()> {
    // Distinct tensors, 38.5 MB in all: more than the caches hold, so a tensor is read
    // from memory where it is staged, as a fresh one would be (one tensor sent over and
    // over would stay cached when it lies in shared memory).
    let first = Client::connect(ClientConfig::new([url.to_string()])).await?;
    let shared = if args.shared_memory {
        Some(SharedTensors::create(&first, "server-overhead", values).await?)
    } else {
        None
    };
    let inputs: Vec<_> = match &shared {
        Some(s) => s.images(),
        None => values.iter().map(|v| tensor(v)).collect(),
    };
    for &(concurrency, images) in &args.rows {
        let mut clients = vec![first.clone()];
        for _ in 1..args.connections.clamp(1, concurrency.max(1)) {
            clients.push(Client::connect(ClientConfig::new([url.to_string()])).await?);
        }
        let cfg = LoadConfig {
            mode: Mode::Closed { concurrency },
            transport: match (args.kserve, args.stream) {
                (true, _) => Transport::KServe,
                (false, true) => Transport::Stream,
                (false, false) => Transport::Unary,
            },
            duration: Some(Duration::from_secs_f64(args.seconds)),
            requests: None,
            warmup: Duration::from_secs(1),
            model: if args.refused {
                "no-such-model"
            } else {
                "fixed"
            }
            .into(),
            images_per_request: images,
            inputs: inputs.clone(),
            output: Output::TopK(1),
        };
        let cpu_before = server_cpu_ns();
        let client_before = client_cpu_ns();
        let report = load::run(
            &clients,
            &cfg,
            Some(metrics_addr),
            indicatif::ProgressBar::hidden(),
        )
        .await;
        // The warm-up's images are not in the report's count: its CPU is left out by
        // scaling to the measured span.
        let span = report.duration_s / (report.duration_s + cfg.warmup.as_secs_f64());
        let server_cpu_s = (server_cpu_ns() - cpu_before) as f64 * 1e-9 * span;
        let client_cpu_s = (client_cpu_ns() - client_before) as f64 * 1e-9 * span;
        let carried = report.requests as f64 * images as f64;
        println!(
            "{}",
            serde_json::json!({
                "concurrency": concurrency,
                "images_per_request": images,
                "connections": report.connections,
                "batch_ms": args.batch_ms,
                "workers": args.workers,
                // Refused requests count as carried: they crossed the wire in full.
                "images_per_s": if args.refused {
                    carried / report.duration_s
                } else {
                    report.images_per_s
                },
                "server_cpu_us_per_image": server_cpu_s * 1e6 / carried.max(1.0),
                "client_cpu_us_per_image": client_cpu_s * 1e6 / carried.max(1.0),
                "one_device": args.one_device,
                "vs_in_process": in_process.map(|base| report.images_per_s / base),
                "refused": args.refused,
                "shared_memory": args.shared_memory,
                "kserve": args.kserve,
                "stream": args.stream,
                "errors": report.errors,
                "latency_ms": report.latency_ms,
                "server": report.server,
            })
        );
    }
    if let Some(shared) = shared {
        shared.release(&first).await?;
    }
    Ok(())
}
