//! `resnet-serve` (serve): flags with environment fallbacks, an optional TOML file, and
//! turning them into a running server.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use resnet_serve::preprocess::Limits;
use resnet_serve::process::device::{self, DeviceSpec, Precision};
use resnet_serve::process::models::{self, ModelSettings};
use resnet_serve::process::placement::Placement;
use resnet_serve::process::server::{self, ModelLoader, ServeOptions};
use resnet_serve::scheduler::{Backend, BatchPolicy};
use resnet_serve::weights::download::Downloader;
use resnet_serve::weights::repository::ModelRepository;

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

impl ServeArgs {
    /// Fills what the command line and environment left unset from the TOML file.
    fn merged(mut self) -> anyhow::Result<ServeArgs> {
        if self.models.is_empty() {
            if let Ok(legacy) = std::env::var(LEGACY_MODELS_ENV) {
                self.models = legacy
                    .split(',')
                    .filter(|m| !m.trim().is_empty())
                    .map(str::to_string)
                    .collect();
            }
        }
        self.models_from_command_line = !self.models.is_empty();
        let Some(path) = &self.config else {
            return Ok(self);
        };
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file = parse_file(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(ServeArgs {
            config: self.config.clone(),
            listen: self.listen.or(file.listen),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            models: if self.models.is_empty() {
                file.models
            } else {
                self.models
            },
            default_model: self.default_model.or(file.default_model),
            device: self.device.or(file.device),
            dtype: self.dtype.or(file.dtype),
            workers_per_device: self.workers_per_device.or(file.workers_per_device),
            compute_threads: self.compute_threads.or(file.compute_threads),
            model_control: self.model_control || file.model_control,
            kserve_refuse_non_finite: self.kserve_refuse_non_finite
                || file.kserve_refuse_non_finite,
            model_repository: self.model_repository.or(file.model_repository),
            shared_memory: self.shared_memory.or(file.shared_memory),
            shared_memory_max_regions: self
                .shared_memory_max_regions
                .or(file.shared_memory_max_regions),
            shared_memory_max_mib: self.shared_memory_max_mib.or(file.shared_memory_max_mib),
            batch_sizes: if self.batch_sizes.is_empty() {
                file.batch_sizes
            } else {
                self.batch_sizes
            },
            max_queue_delay_ms: self.max_queue_delay_ms.or(file.max_queue_delay_ms),
            queue_capacity: self.queue_capacity.or(file.queue_capacity),
            max_message_mib: self.max_message_mib.or(file.max_message_mib),
            max_in_flight_mib: self.max_in_flight_mib.or(file.max_in_flight_mib),
            max_concurrent_streams: self.max_concurrent_streams.or(file.max_concurrent_streams),
            max_images_per_request: self.max_images_per_request.or(file.max_images_per_request),
            max_image_mib: self.max_image_mib.or(file.max_image_mib),
            max_image_megapixels: self.max_image_megapixels.or(file.max_image_megapixels),
            preprocess_threads: self.preprocess_threads.or(file.preprocess_threads),
            drain_timeout_s: self.drain_timeout_s.or(file.drain_timeout_s),
            cache_dir: self.cache_dir.or(file.cache_dir),
            auth_token_file: self.auth_token_file.or(file.auth_token_file),
            auth_open: if self.auth_open.is_empty() {
                file.auth_open
            } else {
                self.auth_open
            },
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            tls_client_ca: self.tls_client_ca.or(file.tls_client_ca),
            max_connection_age: self.max_connection_age.or(file.max_connection_age),
            log_format: self.log_format.or(file.log_format),
            otlp_endpoint: self.otlp_endpoint.or(file.otlp_endpoint),
            model_tables: file.model_tables,
            models_from_command_line: self.models_from_command_line,
        })
    }

    /// The log format, known before the rest is checked (logging starts first): the flag
    /// or environment, else the TOML file's, else text. A file that does not parse is
    /// reported once logging runs.
    pub fn log_format(&self) -> LogFormat {
        self.log_format
            .or_else(|| {
                let text = std::fs::read_to_string(self.config.as_ref()?).ok()?;
                parse_file(&text).ok()?.log_format
            })
            .unwrap_or_default()
    }

    /// Where traces are exported, known before the rest is checked (the exporter
    /// starts with logging): the flag or environment, else the TOML file's, else the
    /// standard `OTEL_` variables; `None` leaves tracing off.
    pub fn otlp_endpoint(&self) -> Option<String> {
        let configured = self.otlp_endpoint.clone().or_else(|| {
            let text = std::fs::read_to_string(self.config.as_ref()?).ok()?;
            parse_file(&text).ok()?.otlp_endpoint
        });
        resnet_serve::process::telemetry::endpoint(configured.as_deref(), |name| {
            std::env::var(name).ok()
        })
    }
}

/// The TOML file's settings. `model` (or `models`) is a list of `--model` specs, or a
/// table of per-model tables (`[models.NAME]`, see [`ModelSettings`]); every other key
/// is a flag's. Unknown keys, in a model's table too, are errors that name them.
fn parse_file(text: &str) -> anyhow::Result<ServeArgs> {
    let mut table: toml::Table = toml::from_str(text)?;
    let mut model_tables = BTreeMap::new();
    for key in ["model", "models"] {
        if !table.get(key).is_some_and(toml::Value::is_table) {
            continue;
        }
        let Some(models) = table.remove(key) else {
            continue;
        };
        let models: toml::Table = models
            .try_into()
            .map_err(|e| anyhow::anyhow!("[{key}]: {e}"))?;
        for (name, settings) in models {
            let settings: ModelSettings = settings
                .try_into()
                .map_err(|e| anyhow::anyhow!("[{key}.{name}]: {e}"))?;
            if model_tables.insert(name.clone(), settings).is_some() {
                anyhow::bail!("[model.{name}] and [models.{name}] both given");
            }
        }
    }
    let mut args: ServeArgs = if model_tables.is_empty() {
        // Parsed from the text, so errors carry their line.
        toml::from_str(text)?
    } else {
        toml::Value::Table(table).try_into()?
    };
    args.model_tables = model_tables;
    Ok(args)
}

/// The environment variable `--model` read before it was named by the rule
/// (`RESNET_SERVE_<FLAG>`); still read when `RESNET_SERVE_MODEL` is not set.
const LEGACY_MODELS_ENV: &str = "RESNET_SERVE_MODELS";

/// `--auth-open`: which calls stay open when tokens are required.
fn auth_open(names: &[String]) -> anyhow::Result<resnet_serve::api::auth::Open> {
    if names.is_empty() {
        return Ok(resnet_serve::api::auth::Open::default());
    }
    let mut open = resnet_serve::api::auth::Open {
        health: false,
        reflection: false,
    };
    for name in names {
        match name.trim() {
            "health" => open.health = true,
            "reflection" => open.reflection = true,
            "none" => {}
            other => anyhow::bail!("--auth-open takes health, reflection or none, not '{other}'"),
        }
    }
    Ok(open)
}

/// `--tls-cert`, `--tls-key`, `--tls-client-ca`, from whichever source each came (so the
/// pairs are checked here, not by clap).
fn tls_options(args: &ServeArgs) -> anyhow::Result<Option<resnet_serve::process::tls::TlsOptions>> {
    match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let mut options = resnet_serve::process::tls::TlsOptions::new(cert, key);
            options.client_ca = args.tls_client_ca.clone();
            Ok(Some(options))
        }
        (None, None) if args.tls_client_ca.is_none() => Ok(None),
        _ => anyhow::bail!(
            "TLS needs both --tls-cert and --tls-key (and --tls-client-ca needs them)"
        ),
    }
}

/// The longest `--max-connection-age`: past a month it no longer balances anything, and
/// an unbounded value would overflow the server's +-10% jitter.
const MAX_CONNECTION_AGE_CEILING: u64 = 30 * 24 * 60 * 60;

/// `--max-connection-age`, from whichever source it came, within 1 s..=30 days.
fn max_connection_age(args: &ServeArgs) -> anyhow::Result<Option<Duration>> {
    match args.max_connection_age {
        Some(0) => anyhow::bail!("--max-connection-age must be at least 1 second"),
        Some(secs) if secs > MAX_CONNECTION_AGE_CEILING => anyhow::bail!(
            "--max-connection-age is {secs} seconds; at most {MAX_CONNECTION_AGE_CEILING} (30 days)"
        ),
        age => Ok(age.map(Duration::from_secs)),
    }
}

/// The models to serve (see [`models::plan`]): resnet50_swsl when nothing names any.
fn planned_models(args: &ServeArgs) -> anyhow::Result<Vec<models::Planned>> {
    let planned = models::plan(
        &args.models,
        args.models_from_command_line,
        &args.model_tables,
    )?;
    if !planned.is_empty() {
        return Ok(planned);
    }
    Ok(models::plan(
        &["resnet50_swsl".into()],
        true,
        &args.model_tables,
    )?)
}

/// A model's batching policy: its table's settings, the flags' for the rest. `None`
/// when it has no setting of its own (it follows the server's policy).
fn model_policy(
    planned: &models::Planned,
    args: &ServeArgs,
    policy: &BatchPolicy,
) -> anyhow::Result<Option<BatchPolicy>> {
    let s = &planned.settings;
    if s.batch_sizes.is_none() && s.max_queue_delay_ms.is_none() && s.queue_capacity.is_none() {
        return Ok(None);
    }
    let sizes = s.batch_sizes.as_deref().unwrap_or(policy.allowed_sizes());
    let capacity = s
        .queue_capacity
        .or(args.queue_capacity)
        .unwrap_or_else(|| resnet_serve::scheduler::policy::default_queue_capacity(sizes));
    let delay = s
        .max_queue_delay_ms
        .map_or(policy.max_queue_delay, Duration::from_millis);
    let own = BatchPolicy::new(sizes, delay, capacity)
        .with_context(|| format!("[models.{}]", planned.name))?;
    Ok(Some(own))
}

/// Where a model with settings of its own runs: its table's device, dtype, workers and
/// threads, the server's for the rest.
fn model_placement(
    planned: &models::Planned,
    server: &Placement,
    args: &ServeArgs,
    warm_sizes: &[usize],
) -> anyhow::Result<Placement> {
    let s = &planned.settings;
    let context = || format!("[models.{}]", planned.name);
    let precision = s.dtype.unwrap_or(server.precision);
    let devices = if s.device.is_none() && s.dtype.is_none() {
        server.devices.clone()
    } else {
        let spec: DeviceSpec = s
            .device
            .as_deref()
            .or(args.device.as_deref())
            .unwrap_or("auto")
            .parse()
            .with_context(context)?;
        device::resolve(&spec, precision).with_context(context)?
    };
    let on_gpu = devices.iter().any(|d| !d.is_cpu());
    let workers = s
        .workers_per_device
        .or(args.workers_per_device)
        .unwrap_or(if on_gpu { 2 } else { 1 });
    if workers == 0 {
        anyhow::bail!("{}: workers_per_device must be at least 1", context());
    }
    Ok(Placement {
        devices,
        precision,
        workers,
        warm_sizes: warm_sizes.to_vec(),
        cache: server.cache.clone(),
        compute_threads: s.compute_threads.or(server.compute_threads),
    })
}

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let args = args.merged()?;
    let defaults = ServeOptions::default();
    let sizes: &[usize] = if args.batch_sizes.is_empty() {
        &[1, 2, 4, 8, 16, 32]
    } else {
        &args.batch_sizes
    };
    let policy = BatchPolicy::new(
        sizes,
        Duration::from_millis(args.max_queue_delay_ms.unwrap_or(5)),
        args.queue_capacity
            .unwrap_or_else(|| resnet_serve::scheduler::policy::default_queue_capacity(sizes)),
    )?;
    let limits = Limits {
        max_encoded_bytes: args
            .max_image_mib
            .map_or(Limits::default().max_encoded_bytes, |m| m << 20),
        max_pixels: args
            .max_image_megapixels
            .map_or(Limits::default().max_pixels, |m| m * 1_000_000),
    };
    let models = planned_models(&args)?;
    let mut model_policies = std::collections::HashMap::new();
    for planned in &models {
        if let Some(own) = model_policy(planned, &args, &policy)? {
            model_policies.insert(planned.name.clone(), own);
        }
    }
    let mut options = ServeOptions {
        policy,
        limits,
        max_message_bytes: args
            .max_message_mib
            .map_or(defaults.max_message_bytes, |m| m << 20),
        max_images_per_request: args
            .max_images_per_request
            .unwrap_or(defaults.max_images_per_request),
        preprocess_threads: args
            .preprocess_threads
            .unwrap_or(defaults.preprocess_threads),
        drain_timeout: args
            .drain_timeout_s
            .map_or(defaults.drain_timeout, Duration::from_secs),
        default_model: args.default_model.clone(),
        model_factory: None,
        shared_memory: args.shared_memory.unwrap_or(defaults.shared_memory),
        max_in_flight_bytes: match args.max_in_flight_mib {
            None => defaults.max_in_flight_bytes,
            Some(mib) => mib
                .checked_mul(1 << 20)
                .context("--max-in-flight-mib is too large")?,
        },
        max_concurrent_streams: args
            .max_concurrent_streams
            .unwrap_or(defaults.max_concurrent_streams),
        configured_models: models.iter().map(|m| m.name.clone()).collect(),
        model_policies,
        kserve_refuse_non_finite: args.kserve_refuse_non_finite,
        auth_tokens: args
            .auth_token_file
            .as_ref()
            .map(|path| resnet_serve::api::auth::Tokens::load(path).map(Arc::new))
            .transpose()?,
        auth_open: auth_open(&args.auth_open)?,
        tls: tls_options(&args)?,
        max_connection_age: max_connection_age(&args)?,
        shared_memory_limits: resnet_serve::api::shm::Limits {
            max_regions: args
                .shared_memory_max_regions
                .unwrap_or(defaults.shared_memory_limits.max_regions),
            max_bytes: match args.shared_memory_max_mib {
                None => defaults.shared_memory_limits.max_bytes,
                Some(mib) => mib
                    .checked_mul(1 << 20)
                    .context("--shared-memory-max-mib is too large")?,
            },
        },
    };
    let device_spec: DeviceSpec = args.device.as_deref().unwrap_or("auto").parse()?;
    let precision = args.dtype.unwrap_or_default();
    // Checked before listening, so a bad --device fails at once rather than after bind.
    let devices = device::resolve(&device_spec, precision)?;
    let on_gpu = devices.iter().any(|d| !d.is_cpu());
    let workers = args
        .workers_per_device
        .unwrap_or(if on_gpu { 2 } else { 1 });
    if workers == 0 {
        anyhow::bail!("--workers-per-device must be at least 1");
    }
    let warm_sizes = options.policy.allowed_sizes().to_vec();
    let cache = Downloader::from_env(args.cache_dir.clone(), None);
    let place = Arc::new(Placement {
        devices,
        precision,
        workers,
        warm_sizes,
        cache,
        compute_threads: args.compute_threads,
    });
    let mut control = None;
    if args.model_control {
        let repository = match &args.model_repository {
            Some(dir) => {
                let repository = ModelRepository::new(dir)
                    .with_context(|| format!("--model-repository {}", dir.display()))?;
                Some(Arc::new(repository))
            }
            None => None,
        };
        // Made once the configured models' placements are known (below).
        control = Some(repository);
    } else if args.model_repository.is_some() {
        anyhow::bail!("--model-repository is read only by --model-control, which is off");
    }
    // Each model's placement, checked (devices resolved) before anything listens.
    let mut loads: Vec<(models::Planned, Arc<Placement>)> = Vec::new();
    for planned in models {
        let s = &planned.settings;
        let own_policy = options.model_policies.get(&planned.name);
        let placed = if own_policy.is_none()
            && s.device.is_none()
            && s.dtype.is_none()
            && s.workers_per_device.is_none()
            && s.compute_threads.is_none()
        {
            place.clone()
        } else {
            let warm = own_policy.unwrap_or(&options.policy).allowed_sizes();
            Arc::new(model_placement(&planned, &place, &args, warm)?)
        };
        loads.push((planned, placed));
    }
    // RepositoryModelLoad of a configured name reloads it as configured: its weights,
    // its placement and (through `model_policies`) its policy.
    if let Some(repository) = control {
        let configured = loads
            .iter()
            .map(|(planned, placement)| {
                let model = resnet_serve::process::placement::Configured {
                    weights: planned.weights.clone(),
                    placement: placement.clone(),
                };
                (planned.name.clone(), model)
            })
            .collect();
        options.model_factory = Some(place.factory_with(repository, configured));
    }
    let loader: ModelLoader = Box::new(move || {
        let mut out: Vec<(String, Arc<dyn Backend>)> = Vec::new();
        for (planned, place) in loads {
            let replicas = place
                .load_weights(&planned.name, &planned.weights)
                .map_err(|e| format!("model '{}': {e}", planned.name))?;
            for replica in replicas {
                out.push((planned.name.clone(), replica));
            }
        }
        Ok(out)
    });
    let listen = args
        .listen
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 50051)));
    let metrics_listen = args
        .metrics_listen
        .unwrap_or_else(resnet_serve::process::metrics::default_addr);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let metrics = tokio::net::TcpListener::bind(metrics_listen)
            .await
            .with_context(|| format!("binding metrics on {metrics_listen}"))?;
        tracing::info!(%listen, %metrics_listen, "listening; loading models");
        server::run(
            options,
            loader,
            listener,
            Some(metrics),
            server::shutdown_signal(),
        )
        .await?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn flags_win_over_the_toml_file_which_fills_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("serve.toml");
        std::fs::write(
            &file,
            "models = [\"resnet18_ssl=/m/r18.pth\"]\nbatch_sizes = [1, 4]\nmax_queue_delay_ms = 9\nqueue_capacity = 64\n",
        )
        .expect("write");
        let cli = Cli::try_parse_from([
            "x",
            "--config",
            file.to_str().expect("utf8"),
            "--max-queue-delay-ms",
            "2",
        ])
        .expect("parses");
        let merged = cli.serve.merged().expect("merges");
        assert_eq!(merged.models, vec!["resnet18_ssl=/m/r18.pth"]);
        assert_eq!(merged.batch_sizes, vec![1, 4]);
        assert_eq!(merged.max_queue_delay_ms, Some(2), "the flag wins");
        assert_eq!(merged.queue_capacity, Some(64));
    }

    #[test]
    fn unknown_toml_keys_and_bad_models_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("serve.toml");
        std::fs::write(&file, "batch_size = [1]\n").expect("write");
        let cli =
            Cli::try_parse_from(["x", "--config", file.to_str().expect("utf8")]).expect("parses");
        let err = cli.serve.merged().expect_err("unknown key").to_string();
        assert!(err.contains("serve.toml"), "{err}");
        let cli = Cli::try_parse_from(["x", "--model", "resnet18_ssl,resnet50_swsl=/x.pth"])
            .expect("parses");
        assert_eq!(cli.serve.models.len(), 2);
        let err = serve(ServeArgs {
            models: vec!["resnet34_ssl".into()],
            ..ServeArgs::default()
        })
        .expect_err("not a hub name");
        assert!(err.to_string().contains("resnet34_ssl"), "{err}");
        let err = serve(ServeArgs {
            models: vec!["Cats=/x.pth".into()],
            ..ServeArgs::default()
        })
        .expect_err("not a name");
        assert!(err.to_string().contains("lowercase"), "{err}");
    }

    #[test]
    fn model_tables_in_the_file_give_each_model_its_settings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("serve.toml");
        let config = file.to_str().expect("utf8");
        std::fs::write(
            &file,
            "batch_sizes = [1, 2]\nlog_format = \"json\"\n\
             [models.resnet50]\npath = \"/mnt/models\"\nbatch_sizes = [1, 8]\nmax_queue_delay_ms = 1\n\
             [models.small]\nhub = \"resnet18_ssl\"\n",
        )
        .expect("write");
        let cli = Cli::try_parse_from(["x", "--config", config]).expect("parses");
        assert_eq!(
            cli.serve.log_format(),
            LogFormat::Json,
            "read past the tables"
        );
        let merged = cli.serve.merged().expect("merges");
        assert_eq!(merged.batch_sizes, vec![1, 2]);
        let planned = planned_models(&merged).expect("plan");
        let names: Vec<&str> = planned.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["resnet50", "small"]);
        let server = BatchPolicy::new(&[1, 2], Duration::from_millis(5), 8).expect("policy");
        let own = model_policy(&planned[0], &merged, &server)
            .expect("valid")
            .expect("its own");
        assert_eq!(own.allowed_sizes(), &[1, 8]);
        assert_eq!(own.max_queue_delay, Duration::from_millis(1));
        assert_eq!(own.queue_capacity, 32, "four of its largest batches");
        assert_eq!(
            model_policy(&planned[1], &merged, &server).expect("valid"),
            None
        );

        // --model names what is served; the file's table lends its settings.
        let cli = Cli::try_parse_from(["x", "--config", config, "--model", "resnet50=/m.pth"])
            .expect("parses");
        let planned = planned_models(&cli.serve.merged().expect("merges")).expect("plan");
        assert_eq!(planned.len(), 1);
        assert_eq!(planned[0].settings.batch_sizes, Some(vec![1, 8]));

        // Unknown keys in a model's table and outside it are named.
        for (text, key) in [
            (
                "[models.resnet50]\npath = \"/m\"\nbatch_size = [1]\n",
                "batch_size",
            ),
            (
                "[models.a]\nhub = \"resnet18_ssl\"\n[other]\nx = 1\n",
                "other",
            ),
            (
                "[model.a]\nhub = \"resnet18_ssl\"\n[models.a]\nhub = \"resnet18_ssl\"\n",
                "both",
            ),
        ] {
            std::fs::write(&file, text).expect("write");
            let cli = Cli::try_parse_from(["x", "--config", config]).expect("parses");
            let err = format!("{:#}", cli.serve.merged().expect_err(text));
            assert!(
                err.contains(key) && err.contains("serve.toml"),
                "{text}: {err}"
            );
        }
        std::fs::write(
            &file,
            "[models.resnet50]\npath = \"/m\"\nbatch_size = [1]\n",
        )
        .expect("write");
        let cli = Cli::try_parse_from(["x", "--config", config]).expect("parses");
        let err = format!("{:#}", cli.serve.merged().expect_err("unknown"));
        assert!(err.contains("[models.resnet50]"), "names the model: {err}");
    }

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
    fn the_model_and_log_format_come_from_any_source() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("serve.toml");
        std::fs::write(&file, "model = [\"resnet18_ssl\"]\nlog_format = \"json\"\n")
            .expect("write");
        let cli =
            Cli::try_parse_from(["x", "--config", file.to_str().expect("utf8")]).expect("parses");
        assert_eq!(
            cli.serve.log_format(),
            LogFormat::Json,
            "known before merging"
        );
        let merged = cli.serve.merged().expect("merges");
        assert_eq!(merged.models, vec!["resnet18_ssl"]);
        assert_eq!(merged.log_format, Some(LogFormat::Json));
        std::fs::write(&file, "models = [\"resnet50_ssl\"]\n").expect("write");
        let cli =
            Cli::try_parse_from(["x", "--config", file.to_str().expect("utf8")]).expect("parses");
        assert_eq!(cli.serve.log_format(), LogFormat::Text);
        assert_eq!(
            cli.serve.merged().expect("merges").models,
            vec!["resnet50_ssl"]
        );
        let cli = Cli::try_parse_from(["x", "--log-format", "json"]).expect("parses");
        assert_eq!(cli.serve.log_format(), LogFormat::Json);
    }

    #[test]
    fn tls_files_come_in_pairs_from_any_source() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("serve.toml");
        std::fs::write(
            &file,
            "tls_key = \"/tls/key.pem\"\ntls_client_ca = \"/tls/ca.pem\"\nmax_connection_age = 300\n",
        )
        .expect("write");
        let config = file.to_str().expect("utf8");
        let cli = Cli::try_parse_from(["x", "--config", config, "--tls-cert", "/tls/cert.pem"])
            .expect("parses");
        let args = cli.serve.merged().expect("merges");
        let tls = tls_options(&args).expect("a pair").expect("on");
        assert_eq!(tls.cert, PathBuf::from("/tls/cert.pem"));
        assert_eq!(tls.key, PathBuf::from("/tls/key.pem"));
        assert_eq!(tls.client_ca, Some(PathBuf::from("/tls/ca.pem")));
        assert_eq!(args.max_connection_age, Some(300));
        assert_eq!(
            max_connection_age(&args).expect("in range"),
            Some(Duration::from_secs(300))
        );

        let lone = Cli::try_parse_from(["x", "--tls-cert", "/tls/cert.pem"]).expect("parses");
        let err = tls_options(&lone.serve).expect_err("no key").to_string();
        assert!(err.contains("--tls-key"), "{err}");
        let ca_only = Cli::try_parse_from(["x", "--tls-client-ca", "/ca.pem"]).expect("parses");
        assert!(tls_options(&ca_only.serve).is_err());
        let plain = Cli::try_parse_from(["x"]).expect("parses");
        assert!(tls_options(&plain.serve).expect("plaintext").is_none());
    }

    #[test]
    fn max_connection_age_is_refused_outside_one_second_to_thirty_days() {
        let age = |value: &str| {
            let cli = Cli::try_parse_from(["x", "--max-connection-age", value]).expect("parses");
            max_connection_age(&cli.serve)
        };
        let month = Duration::from_secs(30 * 24 * 60 * 60);
        assert_eq!(age("2592000").expect("30 days"), Some(month));
        for refused in ["0", "2592001", "18446744073709551615"] {
            let err = age(refused).expect_err(refused).to_string();
            assert!(err.contains("--max-connection-age"), "{err}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("serve.toml");
        std::fs::write(&file, "max_connection_age = 18446744073709551615\n").expect("write");
        let cli =
            Cli::try_parse_from(["x", "--config", file.to_str().expect("utf8")]).expect("parses");
        match cli.serve.merged() {
            Ok(args) => assert!(max_connection_age(&args).is_err(), "from the file"),
            // toml's integers are i64: the file cannot even say it.
            Err(e) => assert!(e.to_string().contains("serve.toml"), "{e}"),
        }
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

    #[test]
    fn the_model_repository_comes_from_the_flag_or_the_toml_file_and_needs_model_control() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("serve.toml");
        std::fs::write(
            &file,
            "model_control = true\nmodel_repository = \"/srv/models\"\n",
        )
        .expect("write");
        let config = file.to_str().expect("utf8");
        let merged = |extra: &[&str]| {
            let args = ["x", "--config", config]
                .into_iter()
                .chain(extra.iter().copied());
            Cli::try_parse_from(args)
                .expect("parses")
                .serve
                .merged()
                .expect("merges")
        };
        let from_file = merged(&[]);
        assert!(from_file.model_control);
        assert_eq!(
            from_file.model_repository,
            Some(PathBuf::from("/srv/models"))
        );
        assert_eq!(
            merged(&["--model-repository", "/other"]).model_repository,
            Some(PathBuf::from("/other")),
            "the flag wins"
        );
        // Refused before anything listens or loads.
        let err = serve(ServeArgs {
            model_repository: Some(dir.path().to_path_buf()),
            ..ServeArgs::default()
        })
        .expect_err("without --model-control");
        assert!(err.to_string().contains("--model-control"), "{err}");
        let err = serve(ServeArgs {
            model_control: true,
            model_repository: Some(dir.path().join("missing")),
            ..ServeArgs::default()
        })
        .expect_err("no such directory");
        assert!(format!("{err:#}").contains("--model-repository"), "{err:#}");
    }
}
