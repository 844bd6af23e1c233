//! What the merged flags make of the server's [`ServeOptions`]: the batching policy (the
//! server's and each model's own), the request limits, tokens, TLS, connection age and
//! shared memory, each checked before anything listens.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::flags::ServeArgs;
use super::placement::planned_models;
use resnet_serve::preprocess::Limits;
use resnet_serve::process::models;
use resnet_serve::process::server::ServeOptions;
use resnet_serve::scheduler::BatchPolicy;

/// The server's options from the merged flags, and the models they name (each model's
/// own batching policy is among the options).
pub(super) fn serve_options(
    args: &ServeArgs,
) -> anyhow::Result<(ServeOptions, Vec<models::Planned>)> {
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
    let models = planned_models(args)?;
    let mut model_policies = std::collections::HashMap::new();
    for planned in &models {
        if let Some(own) = model_policy(planned, args, &policy)? {
            model_policies.insert(planned.name.clone(), own);
        }
    }
    let options = ServeOptions {
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
        tls: tls_options(args)?,
        max_connection_age: max_connection_age(args)?,
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
    Ok((options, models))
}

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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use clap::Parser;

    use super::super::flags::LogFormat;
    use super::*;
    use crate::commands::config::tests::{serve_toml, Cli};

    #[test]
    fn tls_files_come_in_pairs_from_any_source() {
        let (_dir, file) = serve_toml(
            "tls_key = \"/tls/key.pem\"\ntls_client_ca = \"/tls/ca.pem\"\nmax_connection_age = 300\n",
        );
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
        let (_dir, file) = serve_toml("max_connection_age = 18446744073709551615\n");
        let cli =
            Cli::try_parse_from(["x", "--config", file.to_str().expect("utf8")]).expect("parses");
        match cli.serve.merged() {
            Ok(args) => assert!(max_connection_age(&args).is_err(), "from the file"),
            // toml's integers are i64: the file cannot even say it.
            Err(e) => assert!(e.to_string().contains("serve.toml"), "{e}"),
        }
    }

    #[test]
    fn model_tables_in_the_file_give_each_model_its_settings() {
        let (_dir, file) = serve_toml(
            "batch_sizes = [1, 2]\nlog_format = \"json\"\n\
             [models.resnet50]\npath = \"/mnt/models\"\nbatch_sizes = [1, 8]\nmax_queue_delay_ms = 1\n\
             [models.small]\nhub = \"resnet18_ssl\"\n",
        );
        let config = file.to_str().expect("utf8");
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
}
