//! The `--config` TOML file: parsed (flags' keys and `[models.NAME]` tables) and merged
//! under the flags and environment, and the two settings read before the rest (the log
//! format and the OTLP endpoint, which start with logging).

use std::collections::BTreeMap;

use anyhow::Context;

use super::flags::{LogFormat, ServeArgs};
use resnet_serve::process::models::ModelSettings;

impl ServeArgs {
    /// Fills what the command line and environment left unset from the TOML file.
    pub(super) fn merged(mut self) -> anyhow::Result<ServeArgs> {
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
            models: or_file(self.models, file.models),
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
            batch_sizes: or_file(self.batch_sizes, file.batch_sizes),
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
            auth_open: or_file(self.auth_open, file.auth_open),
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

/// A list flag's values when the command line or environment gave any, else the file's.
fn or_file<T>(flag: Vec<T>, file: Vec<T>) -> Vec<T> {
    if flag.is_empty() {
        file
    } else {
        flag
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::commands::config::tests::{serve_toml, Cli};

    #[test]
    fn flags_win_over_the_toml_file_which_fills_the_rest() {
        let (_dir, file) = serve_toml(
            "models = [\"resnet18_ssl=/m/r18.pth\"]\nbatch_sizes = [1, 4]\nmax_queue_delay_ms = 9\nqueue_capacity = 64\n",
        );
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
    fn the_model_and_log_format_come_from_any_source() {
        let (_dir, file) = serve_toml("model = [\"resnet18_ssl\"]\nlog_format = \"json\"\n");
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
}
