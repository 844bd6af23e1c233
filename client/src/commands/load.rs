//! `resnet-client load`: the load tester's flags made into a [`LoadConfig`], its inputs
//! (files, synthetic tensors, or tensors in shared memory) prepared, and its report
//! printed as text, JSON or CSV.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use resnet_client::load::{self, LoadConfig, Mode, Transport};
use resnet_client::shm::SharedTensors;
use resnet_client::{Client, Output};

use super::{connections_like, progress, read_images, synthetic_images, synthetic_tensor};

#[derive(clap::Args)]
pub struct Args {
    /// Closed loop: this many workers sending back to back.
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Open loop: requests per second on a fixed schedule; latency counts from each
    /// request's intended send time.
    #[arg(long)]
    rate: Option<f64>,
    /// Open loop: most requests outstanding at once.
    #[arg(long, default_value_t = 1024)]
    max_outstanding: usize,
    /// Seconds to measure (after warm-up) [default: 30 unless --requests is given].
    #[arg(long)]
    duration: Option<f64>,
    /// Requests to measure (after warm-up).
    #[arg(long)]
    requests: Option<u64>,
    /// Seconds of unmeasured warm-up.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    #[arg(long, default_value_t = 1)]
    images_per_request: usize,
    /// Connections to spread the requests over (round-robin). One HTTP/2 connection
    /// carries roughly one core's worth of bytes; float tensors at GPU rates need
    /// several. Open-loop streams use the first.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Image files to send (round-robin).
    #[arg(long = "input")]
    inputs: Vec<PathBuf>,
    /// Send ready 3x224x224 float tensors instead of files (no server-side decode).
    #[arg(long)]
    synthetic: bool,
    /// With --synthetic: put the tensors in system shared memory registered with the
    /// server (which must run on this host) and send references to them instead of
    /// their bytes, as Triton's perf_analyzer --shared-memory=system does.
    /// With --kserve, each request's tensors are one window of the region.
    #[arg(long, requires = "synthetic")]
    shared_memory: bool,
    /// Use ClassifyStream frames instead of unary calls.
    #[arg(long)]
    stream: bool,
    /// Send the same images as KServe v2 `ModelInfer` calls (the server's Triton
    /// protocol) instead of `Classify`, to compare the two APIs.
    #[arg(long, conflicts_with = "stream")]
    kserve: bool,
    #[arg(long, default_value = "")]
    model: String,
    /// The server's metrics endpoint (host:port), to report its batching.
    #[arg(long)]
    metrics: Option<String>,
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    #[arg(long)]
    csv: bool,
}

pub async fn run(client: &Client, args: Args) -> anyhow::Result<()> {
    let Args {
        concurrency,
        rate,
        max_outstanding,
        duration,
        requests,
        warmup,
        images_per_request,
        connections,
        inputs,
        synthetic,
        shared_memory,
        stream,
        kserve,
        model,
        metrics,
        json,
        csv,
    } = args;
    let mode = match (concurrency, rate) {
        (_, Some(r)) if r > 0.0 => Mode::Open {
            rate: r,
            max_outstanding,
        },
        (_, Some(_)) => bail!("--rate must be positive"),
        (c, None) => Mode::Closed {
            concurrency: c.unwrap_or(1).max(1),
        },
    };
    let mut shared = None;
    let images: Vec<_> = if shared_memory {
        // 64 (38.5 MB): more than a host's caches hold, so the server reads each
        // tensor from memory as it would a fresh one. A whole number of requests'
        // worth, so that request k's tensors lie one after another (a KServe
        // batch is one window of the region).
        let per = images_per_request.max(1);
        let count = 64usize.div_ceil(per) * per;
        let tensors: Vec<_> = (0..count as u64).map(synthetic_tensor).collect();
        let region = SharedTensors::create(client, "resnet-client-load", &tensors)
            .await
            .context("--shared-memory")?;
        let images = region.images();
        shared = Some(region);
        images
    } else if synthetic || inputs.is_empty() {
        synthetic_images()
    } else {
        read_images(&inputs)?
    };
    if kserve && model.is_empty() {
        anyhow::bail!("--kserve needs --model (KServe requests always name their model)");
    }
    let duration = match (duration, requests) {
        (None, None) => Some(Duration::from_secs(30)),
        (d, _) => d.map(Duration::from_secs_f64),
    };
    let cfg = LoadConfig {
        mode,
        transport: if stream {
            Transport::Stream
        } else if kserve {
            Transport::KServe
        } else {
            Transport::Unary
        },
        duration,
        requests,
        warmup: Duration::from_secs_f64(warmup.max(0.0)),
        model,
        images_per_request: images_per_request.max(1),
        inputs: images,
        output: Output::TopK(1),
    };
    let bar = progress(requests, "requests");
    let clients = connections_like(client, connections).await?;
    let report = load::run(&clients, &cfg, metrics.as_deref(), bar).await;
    if let Some(region) = shared {
        region
            .release(client)
            .await
            .context("unregistering the shared memory")?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if csv {
        println!("{}", load::LoadReport::CSV_HEADER);
        println!("{}", report.csv_row());
    } else {
        print!("{report}");
    }
    Ok(())
}
