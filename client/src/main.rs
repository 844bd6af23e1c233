//! `resnet-client`: classify files, stream a video, or load-test a resnet-serve server.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use resnet_client::load::{self, LoadConfig, Mode, Transport};
use resnet_client::shm::SharedTensors;
use resnet_client::soak::{self, Sigterm, SoakConfig};
use resnet_client::video::{self, Source};
use resnet_client::{Client, ClientConfig, Output};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "resnet-client",
    version,
    about = "Client for resnet-serve: classify, stream video, load-test"
)]
struct Cli {
    /// Server endpoint(s); several are balanced. Also RESNET_CLIENT_ENDPOINTS.
    #[arg(
        long = "endpoint",
        env = "RESNET_CLIENT_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    endpoints: Vec<String>,
    /// Per-call deadline in milliseconds (sent as grpc-timeout).
    #[arg(long, global = true)]
    timeout_ms: Option<u64>,
    /// Bearer token sent with every call (a server with --auth-token-file).
    #[arg(
        long,
        env = "RESNET_CLIENT_TOKEN",
        global = true,
        hide_env_values = true
    )]
    token: Option<String>,
    /// CA certificate(s) (PEM) to verify the server with; TLS needs https:// endpoints,
    /// which without this trust the public (webpki) roots.
    #[arg(long, env = "RESNET_CLIENT_TLS_CA", global = true)]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a server that requires one (mutual TLS); with --tls-key.
    #[arg(long, env = "RESNET_CLIENT_TLS_CERT", global = true)]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "RESNET_CLIENT_TLS_KEY", global = true)]
    tls_key: Option<PathBuf>,
    /// The name the server's certificate must carry, when not the endpoint's host.
    #[arg(long, env = "RESNET_CLIENT_TLS_DOMAIN", global = true)]
    tls_domain: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputArg {
    Logits,
    Probs,
    Topk,
}

#[derive(Subcommand)]
enum Command {
    /// Classify image files and print labels and scores per file.
    #[command(
        after_help = "Examples:\n  resnet-client classify cat.jpg dog.png\n  resnet-client classify --model resnext101_32x8d_swsl --top-k 3 --json photos/*.jpg"
    )]
    Classify {
        /// Model name; empty uses the server's default.
        #[arg(long, default_value = "")]
        model: String,
        #[arg(long, default_value_t = 5)]
        top_k: u32,
        #[arg(long, value_enum, default_value = "topk")]
        output: OutputArg,
        #[arg(long)]
        json: bool,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Stream a video file (decoded by ffmpeg), a directory of frames, or a video on stdin.
    #[command(
        after_help = "Examples:\n  resnet-client stream clip.mp4 --fps 30\n  resnet-client stream frames/\n  cat clip.mp4 | resnet-client stream - --size 640x360"
    )]
    Stream {
        /// VIDEO, DIR or - (stdin).
        source: String,
        #[arg(long, default_value = "")]
        model: String,
        /// Target frames per second; default: as fast as the server takes them.
        #[arg(long)]
        fps: Option<f64>,
        /// WIDTHxHEIGHT of frames decoded from stdin.
        #[arg(long, value_parser = parse_size)]
        size: Option<(u32, u32)>,
        /// JSON lines (one per frame, then the summary) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Load-test: closed loop (--concurrency) or open loop (--rate), bounded in time and count.
    #[command(
        after_help = "Examples:\n  resnet-client load --concurrency 16 --duration 30 --input cat.jpg --metrics 127.0.0.1:9090\n  resnet-client load --rate 20 --duration 30 --synthetic --json\n  resnet-client load --concurrency 4 --stream --requests 1000 --csv"
    )]
    Load {
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
    },
    /// Soak: measure the server's capacity, offer it --overload times that for --duration,
    /// optionally SIGTERM it under load; report refusals, latencies, its RSS and requests
    /// lost (sent and never given a status).
    #[command(
        after_help = "Examples:\n  resnet-client soak --duration 60 --metrics-url http://127.0.0.1:9090/metrics\n  resnet-client soak --duration 60 --server-pid $(pidof resnet-serve) --sigterm-after 50 --json"
    )]
    Soak {
        /// Seconds of overload (the drain after SIGTERM included).
        #[arg(long, default_value_t = 60.0)]
        duration: f64,
        /// Offered load as a multiple of the capacity.
        #[arg(long, default_value_t = 10.0)]
        overload: f64,
        /// The server's capacity in requests/s; default: measured by --calibrate.
        #[arg(long)]
        capacity: Option<f64>,
        /// Seconds of the closed-loop calibration (its RSS is the loaded steady state).
        #[arg(long, default_value_t = 5.0)]
        calibrate: f64,
        /// Workers of the calibration's closed loop.
        #[arg(long, default_value_t = 8)]
        calibrate_concurrency: usize,
        /// Connections to spread the requests over (round-robin).
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Most requests outstanding at once; past it requests are skipped and counted.
        #[arg(long, default_value_t = 20_000)]
        max_outstanding: usize,
        /// The server's metrics, for its RSS (process_resident_memory_bytes).
        #[arg(long)]
        metrics_url: Option<String>,
        /// Milliseconds between RSS samples.
        #[arg(long, default_value_t = 200)]
        sample_ms: u64,
        /// The server's process, to send SIGTERM to (with --sigterm-after).
        #[arg(long, requires = "sigterm_after")]
        server_pid: Option<i32>,
        /// Seconds into the overload to send SIGTERM.
        #[arg(long, requires = "server_pid")]
        sigterm_after: Option<f64>,
        /// Seconds unanswered requests are waited for after the load stops before they
        /// count as lost; at least the server's drain timeout (30 s by default).
        #[arg(long, default_value_t = 35.0)]
        drain_wait: f64,
        #[arg(long, default_value_t = 1)]
        images_per_request: usize,
        /// Image files to send (round-robin); default: synthetic float tensors.
        #[arg(long = "input")]
        inputs: Vec<PathBuf>,
        /// Send KServe v2 `ModelInfer` calls instead of `Classify`.
        #[arg(long)]
        kserve: bool,
        #[arg(long, default_value = "")]
        model: String,
        #[arg(long)]
        json: bool,
        /// Also write the JSON report to this file (the text summary still prints).
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s.split_once('x').ok_or("expected WIDTHxHEIGHT")?;
    Ok((
        w.parse().map_err(|_| "bad width")?,
        h.parse().map_err(|_| "bad height")?,
    ))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn progress(len: Option<u64>, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match len {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} {pos}/{len} [{elapsed_precise}] {per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// 3x224x224 values in the normalised range, varied per index.
fn synthetic_tensor(seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..3 * 224 * 224)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect()
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = ClientConfig::new(cli.endpoints.clone());
    config.timeout = cli.timeout_ms.map(Duration::from_millis);
    config.token = cli.token.clone().map(resnet_client::Token);
    // Every connection of every subcommand (load's and soak's extra ones included) is
    // made from this config.
    config.tls = resnet_client::TlsFiles {
        ca: cli.tls_ca.clone(),
        cert: cli.tls_cert.clone(),
        key: cli.tls_key.clone(),
        domain: cli.tls_domain.clone(),
    }
    .config()?;
    let client = Client::connect(config).await.context("connecting")?;
    match cli.command {
        Command::Classify {
            model,
            top_k,
            output,
            json,
            files,
        } => {
            let output = match output {
                OutputArg::Logits => Output::Logits,
                OutputArg::Probs => Output::Probabilities,
                OutputArg::Topk => Output::TopK(top_k),
            };
            let mut images = Vec::with_capacity(files.len());
            for f in &files {
                images.push(resnet_client::encoded(
                    std::fs::read(f).with_context(|| format!("reading {}", f.display()))?,
                ));
            }
            let resp = client.classify(&model, images, output).await?;
            let mut out = Vec::new();
            for (file, r) in files.iter().zip(&resp.results) {
                if json {
                    let mut entry = serde_json::Map::new();
                    entry.insert("file".into(), file.display().to_string().into());
                    match output {
                        Output::Logits => entry.insert("logits".into(), r.values.clone().into()),
                        Output::Probabilities => entry.insert("probs".into(), r.values.clone().into()),
                        Output::TopK(_) => entry.insert(
                            "topk".into(),
                            r.top
                                .iter()
                                .map(|c| serde_json::json!({"index": c.index, "label": c.label, "score": c.score}))
                                .collect::<Vec<_>>()
                                .into(),
                        ),
                    };
                    out.push(serde_json::Value::Object(entry));
                } else {
                    println!("{}", file.display());
                    for (rank, c) in r.top.iter().enumerate() {
                        println!("  {}. {:.4}  {} ({})", rank + 1, c.score, c.label, c.index);
                    }
                    if !r.values.is_empty() {
                        let v: Vec<String> = r.values.iter().map(|x| format!("{x:.6}")).collect();
                        println!("  {}", v.join(" "));
                    }
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            }
        }
        Command::Stream {
            source,
            model,
            fps,
            size,
            json,
        } => {
            let source = Source::parse(&source, size)?;
            let bar = progress(None, "frames");
            let summary = video::stream(&client, &source, &model, fps, |f| {
                bar.inc(1);
                let line = if json {
                    serde_json::to_string(f).unwrap_or_default()
                } else {
                    match (&f.label, &f.error) {
                        (_, Some(e)) => {
                            format!("frame {:>6}  t={:>8.3}s  error: {e}", f.index, f.timestamp)
                        }
                        (Some(l), None) => format!(
                            "frame {:>6}  t={:>8.3}s  {} ({}) {:.3}  {:.1} ms",
                            f.index,
                            f.timestamp,
                            l,
                            f.class.unwrap_or(0),
                            f.score.unwrap_or(0.0),
                            f.latency_ms
                        ),
                        (None, None) => {
                            format!("frame {:>6}  t={:>8.3}s  (no result)", f.index, f.timestamp)
                        }
                    }
                };
                bar.suspend(|| println!("{line}"));
            })
            .await?;
            bar.finish_and_clear();
            if json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                println!(
                    "{} frames in {:.2} s: {:.2} fps; {} errors; latency ms p50 {:.1} p90 {:.1} p99 {:.1} max {:.1}",
                    summary.frames,
                    summary.seconds,
                    summary.fps,
                    summary.errors,
                    summary.latency_ms_p50,
                    summary.latency_ms_p90,
                    summary.latency_ms_p99,
                    summary.latency_ms_max
                );
            }
        }
        Command::Load {
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
        } => {
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
                let region = SharedTensors::create(&client, "resnet-client-load", &tensors)
                    .await
                    .context("--shared-memory")?;
                let images = region.images();
                shared = Some(region);
                images
            } else if synthetic || inputs.is_empty() {
                (0..16)
                    .map(|s| resnet_client::tensor(&synthetic_tensor(s)))
                    .collect()
            } else {
                inputs
                    .iter()
                    .map(|f| {
                        std::fs::read(f)
                            .map(resnet_client::encoded)
                            .with_context(|| format!("reading {}", f.display()))
                    })
                    .collect::<anyhow::Result<_>>()?
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
            let mut clients = vec![client.clone()];
            for _ in 1..connections.max(1) {
                clients.push(
                    Client::connect(client.config().clone())
                        .await
                        .context("connecting")?,
                );
            }
            let report = load::run(&clients, &cfg, metrics.as_deref(), bar).await;
            if let Some(region) = shared {
                region
                    .release(&client)
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
        }
        Command::Soak {
            duration,
            overload,
            capacity,
            calibrate,
            calibrate_concurrency,
            connections,
            max_outstanding,
            metrics_url,
            sample_ms,
            server_pid,
            sigterm_after,
            drain_wait,
            images_per_request,
            inputs,
            kserve,
            model,
            json,
            json_out,
        } => {
            let seconds = |name: &str, v: f64| {
                if v.is_finite() && v >= 0.0 {
                    Ok(Duration::from_secs_f64(v))
                } else {
                    Err(anyhow::anyhow!("--{name} must be a number of seconds >= 0"))
                }
            };
            if !(overload.is_finite() && overload > 0.0) {
                bail!("--overload must be positive");
            }
            if capacity.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
                bail!("--capacity must be positive");
            }
            let duration = seconds("duration", duration)?;
            let sigterm = match (server_pid, sigterm_after) {
                (Some(pid), Some(after)) => {
                    let after = seconds("sigterm-after", after)?;
                    if after >= duration {
                        bail!("--sigterm-after must fall within --duration (SIGTERM under load)");
                    }
                    if pid <= 0 {
                        bail!("--server-pid must be a process id");
                    }
                    Some(Sigterm { pid, after })
                }
                _ => None,
            };
            if kserve && model.is_empty() {
                bail!("--kserve needs --model (KServe requests always name their model)");
            }
            let images: Vec<_> = if inputs.is_empty() {
                (0..16)
                    .map(|s| resnet_client::tensor(&synthetic_tensor(s)))
                    .collect()
            } else {
                inputs
                    .iter()
                    .map(|f| {
                        std::fs::read(f)
                            .map(resnet_client::encoded)
                            .with_context(|| format!("reading {}", f.display()))
                    })
                    .collect::<anyhow::Result<_>>()?
            };
            let cfg = SoakConfig {
                request: LoadConfig {
                    mode: Mode::Closed { concurrency: 1 },
                    transport: if kserve {
                        Transport::KServe
                    } else {
                        Transport::Unary
                    },
                    duration: None,
                    requests: None,
                    warmup: Duration::ZERO,
                    model,
                    images_per_request: images_per_request.max(1),
                    inputs: images,
                    output: Output::TopK(1),
                },
                calibrate: seconds("calibrate", calibrate)?,
                calibrate_concurrency,
                capacity,
                overload,
                duration,
                max_outstanding,
                sigterm,
                drain_wait: seconds("drain-wait", drain_wait)?,
                metrics: metrics_url,
                sample_every: Duration::from_millis(sample_ms.max(10)),
            };
            let mut clients = vec![client.clone()];
            for _ in 1..connections.max(1) {
                clients.push(
                    Client::connect(client.config().clone())
                        .await
                        .context("connecting")?,
                );
            }
            let report = soak::run(&clients, &cfg).await?;
            if let Some(path) = json_out {
                std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
        }
    }
    Ok(())
}
