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
//! transport alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use resnet_client::load::{self, LoadConfig, Mode, Transport};
use resnet_client::{tensor, Client, ClientConfig, Output};
use resnet_serve::model::{Logits, ModelError, NUM_CLASSES};
use resnet_serve::preprocess::INPUT_LEN;
use resnet_serve::scheduler::{Backend, BackendInfo, BatchPolicy};
use resnet_serve::server::{self, ServeOptions};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A model that holds its worker for `per_batch` and answers zeros.
struct FixedCost {
    per_batch: Duration,
}

impl Backend for FixedCost {
    fn forward(&self, pixels: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ModelError> {
        let images: Vec<&[f32]> = pixels.chunks(INPUT_LEN).collect();
        Ok(self.forward_images(&images, n)?.rows)
    }

    fn forward_images(&self, images: &[&[f32]], size: usize) -> Result<Logits, ModelError> {
        // Reads every image once, as staging them for a device would.
        let started = Instant::now();
        let checksum: f32 = images
            .iter()
            .map(|i| i.iter().step_by(64).sum::<f32>())
            .sum();
        std::hint::black_box(checksum);
        let input_time = started.elapsed();
        std::thread::sleep(self.per_batch);
        Ok(Logits {
            rows: vec![vec![0f32; NUM_CLASSES]; size],
            input_time,
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

struct Args {
    batch_ms: f64,
    workers: usize,
    sizes: Vec<usize>,
    seconds: f64,
    connections: usize,
    /// Requests name a model the server lacks: decoded in full, then refused (the
    /// transport alone).
    refused: bool,
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (url, metrics_addr) = (
        format!("http://{}", listener.local_addr()?),
        metrics.local_addr()?.to_string(),
    );
    let largest = args.sizes.iter().copied().max().unwrap_or(1);
    let options = ServeOptions {
        policy: BatchPolicy::new(&args.sizes, Duration::from_millis(2), 64 * largest)?,
        ..ServeOptions::default()
    };
    let backend: Arc<dyn Backend> = Arc::new(FixedCost {
        per_batch: Duration::from_secs_f64(args.batch_ms / 1000.0),
    });
    let replicas = vec![backend; args.workers.max(1)];
    let loader: server::ModelLoader = Box::new(move || {
        Ok(replicas
            .into_iter()
            .map(|b| ("fixed".to_string(), b))
            .collect())
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server::run(
        options,
        loader,
        listener,
        Some(metrics),
        async {
            let _ = stopped.await;
        },
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let input = tensor(&vec![0.5f32; 3 * 224 * 224]);
    for (concurrency, images) in args.rows {
        let mut clients = Vec::new();
        for _ in 0..args.connections.clamp(1, concurrency.max(1)) {
            clients.push(Client::connect(ClientConfig::new([url.clone()])).await?);
        }
        let cfg = LoadConfig {
            mode: Mode::Closed { concurrency },
            transport: Transport::Unary,
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
            inputs: vec![input.clone()],
            output: Output::TopK(1),
        };
        let report = load::run(
            &clients,
            &cfg,
            Some(&metrics_addr),
            indicatif::ProgressBar::hidden(),
        )
        .await;
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
                    report.requests as f64 * images as f64 / report.duration_s
                } else {
                    report.images_per_s
                },
                "refused": args.refused,
                "errors": report.errors,
                "latency_ms": report.latency_ms,
                "server": report.server,
            })
        );
    }
    let _ = stop.send(());
    serving.await??;
    Ok(())
}
