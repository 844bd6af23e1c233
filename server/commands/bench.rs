//! `resnet-serve bench`: in-process measurements that scripts (benches/gpu/run.sh,
//! scripts/bench_compare.py) put beside PyTorch in one run. Weights are the seeded
//! synthetic ones the Python scripts regenerate bit for bit, unless `--weights` names a
//! checkpoint.
//!
//! - `bench forward`: images/s of the forward pass (eager, and replayed as a CUDA graph
//!   where one was captured), one JSON line per batch size.
//! - `bench logits`: raw little-endian f32 logits `[batch, 1000]` for the seeded input.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::{Device, Tensor};

use resnet_serve::model::synthetic::{self, SyntheticWeights};
use resnet_serve::model::{Architecture, Classifier, Kernels, INPUT_SIZE};
use resnet_serve::process::device::{self, DeviceSpec, Precision};
use resnet_serve::weights::Checkpoint;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelChoice {
    /// The fastest set for the device.
    Auto,
    /// Candle's stock ops (the reference path).
    Candle,
    /// Fused cuDNN convolutions (CUDA builds with the `cudnn` feature).
    Cudnn,
}

#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    /// Architecture: resnet18, resnet50, resnext50_32x4d, resnext101_32x{4,8,16}d.
    #[arg(long)]
    model: String,
    /// A checkpoint instead of the seeded synthetic weights.
    #[arg(long)]
    weights: Option<PathBuf>,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// One device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Precision,
    #[arg(long, value_enum, default_value = "auto")]
    kernels: KernelChoice,
}

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Forward-pass images/s with the input already on the device (as PyTorch is timed),
    /// and with the host-to-device copy and logits read-back included (as the server runs).
    Forward {
        #[command(flatten)]
        model: ModelArgs,
        /// Batch sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        batch: Vec<usize>,
        /// Seconds to measure each batch size.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Writes the logits of the seeded input as raw f32 (little-endian) to `--out`.
    Logits {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long)]
        out: PathBuf,
    },
}

fn load(args: &ModelArgs) -> anyhow::Result<(Architecture, Classifier)> {
    let arch = Architecture::ALL
        .into_iter()
        .find(|a| a.as_str() == args.model)
        .with_context(|| format!("unknown architecture '{}'", args.model))?;
    let spec: DeviceSpec = args.device.parse()?;
    let devices = device::resolve(&spec, args.dtype)?;
    let [dev] = devices.as_slice() else {
        anyhow::bail!("bench runs on one device; got {}", devices.len());
    };
    let kernels = match args.kernels {
        KernelChoice::Auto => Kernels::default_for(dev),
        KernelChoice::Candle => Kernels::Candle,
        KernelChoice::Cudnn => Kernels::Cudnn,
    };
    let model = match &args.weights {
        Some(path) => Classifier::load_with(
            arch,
            &Checkpoint::open(path)?,
            dev,
            args.dtype.dtype(),
            kernels,
        )?,
        None => Classifier::load_with(
            arch,
            &SyntheticWeights::new(arch, args.seed),
            dev,
            args.dtype.dtype(),
            kernels,
        )?,
    };
    Ok((arch, model))
}

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Forward {
            model: args,
            batch,
            seconds,
        } => {
            let (arch, model) = load(&args)?;
            let dev = model.device().clone();
            for n in batch {
                let pixels = synthetic::input(args.seed, n, INPUT_SIZE);
                let x = Tensor::from_slice(&pixels, (n, 3, INPUT_SIZE, INPUT_SIZE), &dev)?;
                // Warm-up: kernel loading and algorithm selection for this shape.
                for _ in 0..3 {
                    model.forward(&x)?;
                }
                dev.synchronize()?;
                #[cfg(feature = "cudnn")]
                let _ = resnet_serve::model::cudnn::profile_report(); // warm-up calls out
                let eager = rate(
                    seconds,
                    n,
                    || {
                        model.forward(&x)?;
                        Ok(())
                    },
                    &dev,
                )?;
                #[cfg(feature = "cudnn")]
                if let Some(line) = resnet_serve::model::cudnn::profile_report() {
                    eprintln!("batch {n}: {line}");
                }
                // What the server runs: the pass captured as a CUDA graph, where the
                // kernels allow it.
                if !dev.is_cpu() {
                    model.warm_up(&[n], 1)?;
                }
                let graph = if model.graph_sizes().contains(&n) {
                    Some(rate(
                        seconds,
                        n,
                        || {
                            model.launch_resident(n)?;
                            Ok(())
                        },
                        &dev,
                    )?)
                } else {
                    None
                };
                let end_to_end = rate(
                    seconds,
                    n,
                    || {
                        model.classify(&pixels, n)?;
                        Ok(())
                    },
                    &Device::Cpu,
                )?;
                // As the server's two workers per GPU run it: one batch's staging and
                // copies overlap the other's replay (a second captured pass for it).
                let overlapped = if graph.is_some() {
                    model.warm_up(&[n], 1)?;
                    Some(threads_rate(seconds, n, 2, || {
                        model.classify(&pixels, n)?;
                        Ok(())
                    })?)
                } else {
                    None
                };
                println!(
                    "{}",
                    serde_json::json!({
                        "engine": "resnet-serve",
                        "kernels": model.kernels().name(),
                        "model": arch.as_str(),
                        "device": device::describe(&dev),
                        "dtype": args.dtype.to_string(),
                        "batch": n,
                        "images_per_s": graph.unwrap_or(eager),
                        "images_per_s_eager": eager,
                        "cuda_graph": graph.is_some(),
                        "images_per_s_with_copies": end_to_end,
                        "images_per_s_with_copies_2_threads": overlapped,
                    })
                );
                std::io::stdout().flush()?;
            }
        }
        BenchCommand::Logits {
            model: args,
            batch,
            out,
        } => {
            let (_, model) = load(&args)?;
            // The path the server runs: on a GPU, a captured pass where possible
            // (RESNET_SERVE_CUDA_GRAPHS=0 keeps it eager).
            if !model.device().is_cpu() {
                model.warm_up(&[batch], 1)?;
            }
            let pixels = synthetic::input(args.seed, batch, INPUT_SIZE);
            let logits = model.classify(&pixels, batch)?;
            let bytes: Vec<u8> = logits
                .iter()
                .flatten()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            std::fs::write(&out, bytes).with_context(|| format!("writing {}", out.display()))?;
        }
    }
    Ok(())
}

/// Images/s of `step` repeated by `threads` threads at once for about `seconds` (each at
/// least twice); `step` must finish its work before it returns.
fn threads_rate(
    seconds: f64,
    batch: usize,
    threads: usize,
    step: impl Fn() -> anyhow::Result<()> + Sync,
) -> anyhow::Result<f64> {
    let budget = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let runs = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut runs = 0u32;
                    while runs < 2 || start.elapsed() < budget {
                        step()?;
                        runs += 1;
                    }
                    anyhow::Ok(runs)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .map_err(|_| anyhow::anyhow!("a benchmark thread panicked"))?
            })
            .sum::<anyhow::Result<u32>>()
    })?;
    Ok(f64::from(runs) * batch as f64 / start.elapsed().as_secs_f64())
}

/// Images/s of `step` repeated for about `seconds` (at least twice); `sync` is waited
/// on before the clock stops, so queued GPU work is counted.
fn rate(
    seconds: f64,
    batch: usize,
    mut step: impl FnMut() -> anyhow::Result<()>,
    sync: &Device,
) -> anyhow::Result<f64> {
    let budget = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut runs = 0u32;
    while runs < 2 || start.elapsed() < budget {
        step()?;
        runs += 1;
        // Keep the launch queue from running far ahead of the clock check.
        if runs.is_multiple_of(8) {
            sync.synchronize()?;
        }
    }
    sync.synchronize()?;
    Ok(f64::from(runs) * batch as f64 / start.elapsed().as_secs_f64())
}
