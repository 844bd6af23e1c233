//! The `resnet-serve` binary: the gRPC server (the default command) and offline tools
//! over the model core (`predict`, `weights`, `bench`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

mod commands;

// Keeps and reuses freed memory: each layer's output is a fresh multi-MiB buffer that
// glibc returns to the OS, paying page faults on every forward pass (resnet50 batch 8:
// 19.2 -> 20.7 img/s, BENCHMARKS.md); `allocator::keep_freed_memory` goes further.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use commands::predict::{self, OutputKind};
use commands::{bench, config};
use resnet_serve::model::ModelName;
use resnet_serve::process::device::{self, DeviceSpec, Precision};
use resnet_serve::weights::download::{Downloader, BASE_URL_ENV};
use resnet_serve::weights::{convert, inspect, Checkpoint};

#[derive(Parser)]
#[command(
    name = "resnet-serve",
    version,
    about = "Inference server and tools for the semi-supervised ImageNet ResNet/ResNeXt models",
    args_conflicts_with_subcommands = true,
    after_help = "With no command, serves gRPC. Examples:\n  resnet-serve --model resnet50_swsl=/models/semi_weakly_supervised_resnet50-16a12f1b.pth\n  resnet-serve --model resnet50=/mnt/models --model cats=resnext50_32x4d:/models/cats.safetensors\n  resnet-serve --model resnet18_ssl --model resnext101_32x8d_swsl --batch-sizes 1,4,16 --max-queue-delay-ms 2"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: config::ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Classify image files offline, as the model card's example does.
    #[command(
        after_help = "Examples:\n  resnet-serve predict --model resnet50_swsl --weights semi_weakly_supervised_resnet50-16a12f1b.pth cat.jpg\n  resnet-serve predict --model resnet18_ssl --output probs --json a.png b.webp"
    )]
    Predict {
        /// One of the twelve hub names, e.g. resnet50_swsl.
        #[arg(long, default_value = "resnet50_swsl")]
        model: ModelName,
        /// Checkpoint file (legacy or zip .pth, or safetensors). Default: the model's
        /// file in the weights cache, downloaded on first use.
        #[arg(long)]
        weights: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "topk")]
        output: OutputKind,
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=1000))]
        top_k: u16,
        /// Print JSON (one array, an object per image) instead of text.
        #[arg(long)]
        json: bool,
        /// Images per forward pass.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        #[arg(long, env = "RESNET_SERVE_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
        /// cpu, cuda:N, or auto (the first GPU of a CUDA build, else cpu).
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Precision,
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// In-process measurements for the benchmark scripts (forward images/s, raw logits).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Download, convert and inspect checkpoints.
    #[command(subcommand)]
    Weights(WeightsCommand),
}

#[derive(Subcommand)]
enum WeightsCommand {
    /// Download a published checkpoint into the cache, verifying its sha256 prefix.
    #[command(
        after_help = "Example:\n  resnet-serve weights download resnext101_32x8d_swsl --cache-dir /models"
    )]
    Download {
        model: ModelName,
        /// Default: $XDG_CACHE_HOME/resnet-serve (or ~/.cache/resnet-serve).
        #[arg(long, env = "RESNET_SERVE_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
        /// Where the files are served (a mirror).
        #[arg(long, env = BASE_URL_ENV)]
        base_url: Option<String>,
    },
    /// Rewrite any checkpoint as safetensors.
    #[command(
        after_help = "Example:\n  resnet-serve weights convert semi_supervised_resnet18-d92f0530.pth resnet18_ssl.safetensors"
    )]
    Convert { input: PathBuf, output: PathBuf },
    /// Show a checkpoint's format, tensors, parameters and architecture.
    Inspect {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    resnet_serve::process::allocator::keep_freed_memory();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if cli.command.is_none() {
            "info"
        } else {
            "warn"
        })
    });
    // Serving exports traces when an OTLP endpoint is configured (server/process/telemetry.rs).
    let telemetry = match cli.command {
        None => cli
            .serve
            .otlp_endpoint()
            .map(|endpoint| resnet_serve::process::telemetry::Telemetry::start(&endpoint))
            .transpose(),
        Some(_) => Ok(None),
    };
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::Layer;
        let logs = tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr);
        let logs = if cli.serve.log_format() == config::LogFormat::Json {
            logs.json().boxed()
        } else {
            logs.boxed()
        };
        // The log filter is the log layer's own: the exporting layer sees the spans it
        // exports whatever the logs show.
        let exporting = telemetry
            .as_ref()
            .ok()
            .and_then(Option::as_ref)
            .map(|t| t.layer());
        tracing_subscriber::registry()
            .with(logs.with_filter(filter))
            .with(exporting)
            .init();
    }
    let telemetry = match telemetry {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Each connection is a descriptor: serving takes all the hard limit allows.
    #[cfg(unix)]
    if cli.command.is_none() {
        match resnet_serve::process::accept::raise_open_files_limit() {
            Ok(open_files) => tracing::info!(open_files, "open files limit (RLIMIT_NOFILE)"),
            Err(e) => tracing::warn!("cannot raise the open files limit (RLIMIT_NOFILE): {e}"),
        }
    }
    let outcome = run(cli);
    // After the drain: the last calls' spans go out before the process ends.
    if let Some(t) = telemetry {
        t.shutdown();
    }
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Our error messages already carry their causes; print a cause only when it
            // adds something.
            let mut message = e.to_string();
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !message.contains(&cause) {
                    message = format!("{message}: {cause}");
                }
            }
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let Some(command) = cli.command else {
        return config::serve(cli.serve);
    };
    match command {
        Command::Predict {
            model,
            weights,
            output,
            top_k,
            json,
            batch_size,
            cache_dir,
            device,
            dtype,
            images,
        } => {
            let weights = match weights {
                Some(w) => w,
                None => Downloader::from_env(cache_dir, None).fetch(model)?,
            };
            let devices = device::resolve(&device.parse::<DeviceSpec>()?, dtype)?;
            let device = devices.first().context("no device resolved")?;
            let classifier = predict::load_model(model, &weights, device, dtype.dtype())?;
            let results =
                predict::predict(&classifier, &images, output, usize::from(top_k), batch_size)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&results)?);
            } else {
                print!("{}", predict::render_text(&results));
            }
        }
        Command::Bench(command) => bench::run(command)?,
        Command::Weights(WeightsCommand::Download {
            model,
            cache_dir,
            base_url,
        }) => {
            let path = Downloader::from_env(cache_dir, base_url).fetch(model)?;
            println!("{}", path.display());
        }
        Command::Weights(WeightsCommand::Convert { input, output }) => {
            let checkpoint = Checkpoint::open(&input)?;
            let n = convert::to_safetensors(&checkpoint, &output)
                .with_context(|| format!("converting {}", input.display()))?;
            println!("wrote {n} tensors to {}", output.display());
        }
        Command::Weights(WeightsCommand::Inspect { file, json }) => {
            let summary = inspect::summarize(&Checkpoint::open(&file)?);
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                println!("{summary}");
            }
        }
    }
    Ok(())
}
