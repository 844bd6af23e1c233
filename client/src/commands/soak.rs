//! `resnet-client soak`: the soak's flags checked and made into a [`SoakConfig`], and
//! its report printed (and written as JSON with `--json-out`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use resnet_client::load::{LoadConfig, Mode, Transport};
use resnet_client::soak::{self, Sigterm, SoakConfig};
use resnet_client::{Client, Output};

use super::{connections_like, read_images, synthetic_images};

#[derive(clap::Args)]
pub struct Args {
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
}

pub async fn run(client: &Client, args: Args) -> anyhow::Result<()> {
    let Args {
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
    } = args;
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
        synthetic_images()
    } else {
        read_images(&inputs)?
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
    let clients = connections_like(client, connections).await?;
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
    Ok(())
}
