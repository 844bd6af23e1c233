//! The `serve` flags: each with its `RESNET_SERVE_<NAME>` variable and its key in the
//! `--config` TOML file (merged in [`super::file`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use resnet_serve::process::device::Precision;
use resnet_serve::process::models::ModelSettings;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Serving flags. Each also reads `RESNET_SERVE_<NAME>` and, below that, the same key
/// in the `--config` TOML file (e.g. `batch_sizes = [1, 4, 16]`).
#[derive(Debug, Clone, clap::Args, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ServeArgs {
    /// TOML file with any of these settings (flags and environment win over it).
    #[arg(long, env = "RESNET_SERVE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// gRPC address [default: 0.0.0.0:50051].
    #[arg(long, env = "RESNET_SERVE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Prometheus /metrics address [default: 0.0.0.0:9090].
    #[arg(long, env = "RESNET_SERVE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// A model to serve (repeatable): a hub name (from the weights cache, downloaded on
    /// first use), HUBNAME=PATH, or under a name of your choosing NAME=PATH (architecture
    /// told from the checkpoint), NAME=ARCH:PATH or NAME=HUBNAME. PATH is a checkpoint or
    /// a directory holding one (KServe's /mnt/models). NAME: lowercase letters, digits,
    /// '-' and '_', at most 63 [default: resnet50_swsl]. (Also `RESNET_SERVE_MODELS`, the
    /// variable's earlier name, and `models` in the file, with `[models.NAME]` tables.)
    #[arg(long = "model", env = "RESNET_SERVE_MODEL", value_delimiter = ',')]
    #[serde(rename = "model", alias = "models")]
    pub models: Vec<String>,
    /// The model for requests that name none [default: the first --model].
    #[arg(long, env = "RESNET_SERVE_DEFAULT_MODEL")]
    pub default_model: Option<String>,
    /// Where models run: auto (every GPU of a CUDA build, else cpu), cpu, cuda (every
    /// GPU) or cuda:N[,cuda:M...]. Each device holds a copy of every model [default: auto].
    #[arg(long, env = "RESNET_SERVE_DEVICE")]
    pub device: Option<String>,
    /// Precision on the device; f16/bf16 need a GPU [default: f32].
    #[arg(long, env = "RESNET_SERVE_DTYPE", value_enum)]
    pub dtype: Option<Precision>,
    /// Threads for each model's CPU compute; the rest of the cores decode images
    /// [default: all cores].
    #[arg(long, env = "RESNET_SERVE_COMPUTE_THREADS")]
    pub compute_threads: Option<usize>,
    /// Worker threads (model replicas sharing weights) per device and model [default: 1
    /// on cpu, 2 on a GPU: one stages and copies the next batch while the other's runs].
    #[arg(long, env = "RESNET_SERVE_WORKERS_PER_DEVICE")]
    pub workers_per_device: Option<usize>,
    /// Let KServe clients load and unload models at run time (RepositoryModelLoad /
    /// RepositoryModelUnload) [default: off].
    #[arg(long, env = "RESNET_SERVE_MODEL_CONTROL")]
    #[serde(default)]
    pub model_control: bool,
    /// The directory RepositoryModelLoad may read checkpoints from, by file name (its
    /// `file` parameter); with --model-control and no repository, models load by hub
    /// name from the weights cache only.
    #[arg(long, env = "RESNET_SERVE_MODEL_REPOSITORY")]
    pub model_repository: Option<PathBuf>,
    /// Refuse KServe FP32 inputs holding NaN or infinity (INVALID_ARGUMENT), as our own
    /// Classify API does, instead of computing them as given, as Triton does (and
    /// counting them in resnet_serve_kserve_nonfinite_inputs_total) [default: off].
    #[arg(long, env = "RESNET_SERVE_KSERVE_REFUSE_NON_FINITE")]
    #[serde(default)]
    pub kserve_refuse_non_finite: bool,
    /// Let clients on this host register system shared-memory regions (KServe's
    /// SystemSharedMemoryRegister) and point inputs and outputs at them instead of
    /// sending the bytes; `--shared-memory` alone means true [default: false].
    #[arg(
        long,
        env = "RESNET_SERVE_SHARED_MEMORY",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub shared_memory: Option<bool>,
    /// Most shared-memory regions registered at once [default: 64].
    #[arg(long, env = "RESNET_SERVE_SHARED_MEMORY_MAX_REGIONS")]
    pub shared_memory_max_regions: Option<usize>,
    /// Most bytes of shared memory registered at once, in MiB; the copies of shared
    /// inputs held by requests in flight are bounded by the same amount [default: 4096,
    /// or a quarter of this machine's memory where that is less].
    #[arg(long, env = "RESNET_SERVE_SHARED_MEMORY_MAX_MIB")]
    pub shared_memory_max_mib: Option<u64>,
    /// Allowed fixed batch sizes [default: 1,2,4,8,16,32].
    #[arg(long, env = "RESNET_SERVE_BATCH_SIZES", value_delimiter = ',')]
    pub batch_sizes: Vec<usize>,
    /// How long the first queued image waits for others before its batch runs [default: 5].
    #[arg(long, env = "RESNET_SERVE_MAX_QUEUE_DELAY_MS")]
    pub max_queue_delay_ms: Option<u64>,
    /// Images that may wait per model before requests are refused (RESOURCE_EXHAUSTED)
    /// [default: 4 batches of the largest batch size, 128 with the default sizes].
    #[arg(long, env = "RESNET_SERVE_QUEUE_CAPACITY")]
    pub queue_capacity: Option<usize>,
    /// Bytes of request messages held at once (received and not yet answered), in MiB;
    /// past it new calls are refused with RESOURCE_EXHAUSTED [default: an eighth of the
    /// memory of the machine or of the container's cgroup limit, at least 256].
    #[arg(long, env = "RESNET_SERVE_MAX_IN_FLIGHT_MIB")]
    pub max_in_flight_mib: Option<usize>,
    /// Concurrent calls one HTTP/2 connection may have open [default: 128].
    #[arg(long, env = "RESNET_SERVE_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<u32>,
    /// Largest gRPC message, in MiB [default: 64].
    #[arg(long, env = "RESNET_SERVE_MAX_MESSAGE_MIB")]
    pub max_message_mib: Option<usize>,
    /// Most images in one request; a request larger than its model's queue is refused too
    /// [default: 128].
    #[arg(long, env = "RESNET_SERVE_MAX_IMAGES_PER_REQUEST")]
    pub max_images_per_request: Option<usize>,
    /// Largest encoded image, in MiB [default: 32].
    #[arg(long, env = "RESNET_SERVE_MAX_IMAGE_MIB")]
    pub max_image_mib: Option<usize>,
    /// Largest decoded image, in megapixels [default: 40].
    #[arg(long, env = "RESNET_SERVE_MAX_IMAGE_MEGAPIXELS")]
    pub max_image_megapixels: Option<u64>,
    /// Images decoded at once [default: the number of CPUs].
    #[arg(long, env = "RESNET_SERVE_PREPROCESS_THREADS")]
    pub preprocess_threads: Option<usize>,
    /// Seconds queued and in-flight requests get to finish after SIGTERM [default: 30].
    #[arg(long, env = "RESNET_SERVE_DRAIN_TIMEOUT_S")]
    pub drain_timeout_s: Option<u64>,
    /// Weights cache directory [default: $XDG_CACHE_HOME/resnet-serve].
    #[arg(long, env = "RESNET_SERVE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// File of bearer tokens every call must carry (`authorization: Bearer <token>`):
    /// one per line, or `sha256:<hex>` of it, then optionally its scope, `infer` or
    /// `admin` (the default). Re-read when it changes [default: none, the server is open].
    #[arg(long, env = "RESNET_SERVE_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// With a token file, the calls that stay open without a token: `health`,
    /// `reflection`, both, or `none` [default: health,reflection].
    #[arg(long, env = "RESNET_SERVE_AUTH_OPEN", value_delimiter = ',')]
    pub auth_open: Vec<String>,
    /// The gRPC port's TLS certificate chain (PEM, leaf first); with --tls-key, turns TLS
    /// on. Re-read when it changes and on SIGHUP [default: none, plaintext].
    #[arg(long, env = "RESNET_SERVE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "RESNET_SERVE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that clients' certificates must chain to: with it, every
    /// client must present one (mutual TLS) [default: none, no client certificate].
    #[arg(long, env = "RESNET_SERVE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Seconds after which (+-10%) a connection is sent GOAWAY, its calls in flight
    /// finishing, so clients reconnect and L4 balancing reaches new replicas
    /// [default: none].
    #[arg(long, env = "RESNET_SERVE_MAX_CONNECTION_AGE")]
    pub max_connection_age: Option<u64>,
    /// Log format [default: text].
    #[arg(long, env = "RESNET_SERVE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// OTLP/gRPC collector that traces are exported to, e.g. http://collector:4317
    /// [default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT;
    /// none: tracing off].
    #[arg(long, env = "RESNET_SERVE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// The file's `[models.NAME]` tables: each model's weights and own settings.
    #[arg(skip)]
    #[serde(skip)]
    pub model_tables: BTreeMap<String, ModelSettings>,
    /// `--model` came from the command line or the environment: those specs, not the
    /// file, say which models are served.
    #[arg(skip)]
    #[serde(skip)]
    pub models_from_command_line: bool,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::commands::config::tests::Cli;
    use resnet_serve::process::server::ServeOptions;

    #[test]
    fn every_flag_has_its_variable_by_one_rule_and_its_toml_key() {
        use clap::CommandFactory;
        let command = Cli::command();
        let mut seen = 0;
        for arg in command.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" {
                continue;
            }
            seen += 1;
            let want = format!("RESNET_SERVE_{}", long.to_uppercase().replace('-', "_"));
            let env = arg.get_env().and_then(|e| e.to_str()).unwrap_or("(none)");
            assert_eq!(env, want, "--{long}");
            if long == "config" {
                continue;
            }
            // The key is known to the file: any error is about the value, never the key.
            let key = long.replace('-', "_");
            let err = toml::from_str::<ServeArgs>(&format!("{key} = {{}}"))
                .expect_err("a table fits no setting")
                .to_string();
            assert!(!err.contains("unknown field"), "--{long}: {err}");
        }
        assert!(seen >= 25, "{seen} flags");
        let err = toml::from_str::<ServeArgs>("batch_size = [1]\nqueue_capcity = 3\n")
            .expect_err("unknown")
            .to_string();
        assert!(err.contains("batch_size"), "names the key: {err}");
    }

    #[test]
    fn shared_memory_is_off_unless_enabled() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
                .expect("parses")
                .serve
        };
        assert_eq!(parse(&[]).shared_memory, None);
        assert!(!ServeOptions::default().shared_memory);
        assert_eq!(parse(&["--shared-memory"]).shared_memory, Some(true));
        assert_eq!(
            parse(&["--shared-memory", "--model", "resnet18_ssl"]).shared_memory,
            Some(true)
        );
        assert_eq!(
            parse(&["--shared-memory", "false"]).shared_memory,
            Some(false)
        );
        let capped = parse(&[
            "--shared-memory=true",
            "--shared-memory-max-regions",
            "3",
            "--shared-memory-max-mib",
            "16",
        ]);
        assert_eq!(capped.shared_memory, Some(true));
        assert_eq!(capped.shared_memory_max_regions, Some(3));
        assert_eq!(capped.shared_memory_max_mib, Some(16));
    }
}
