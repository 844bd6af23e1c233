//! `resnet-serve` (serve): flags with environment fallbacks, an optional TOML file, and
//! turning them into a running server.
//!
//! [`flags`] declares the flags, [`file`] reads the TOML file under them, [`options`]
//! makes the server's options of the merged settings and [`placement`] the models'
//! devices and loader; [`serve`] puts them together, binds and runs.

mod file;
mod flags;
mod options;
mod placement;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

use resnet_serve::process::server;
use resnet_serve::weights::repository::ModelRepository;

pub use flags::{LogFormat, ServeArgs};

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let args = args.merged()?;
    let (mut options, models) = options::serve_options(&args)?;
    let place = placement::server_placement(&args, &options)?;
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
    let loads = placement::place_models(models, &place, &args, &options)?;
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
    let loader = placement::loader(loads);
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
    use std::path::PathBuf;

    use clap::Parser;

    use super::*;

    /// The serve flags alone, as every test of this module's parts parses them.
    #[derive(Parser)]
    pub(super) struct Cli {
        #[command(flatten)]
        pub(super) serve: ServeArgs,
    }

    /// A `serve.toml` holding `text`, in a temporary directory that lasts as long as the
    /// returned guard.
    pub(super) fn serve_toml(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("serve.toml");
        std::fs::write(&file, text).expect("write");
        (dir, file)
    }

    #[test]
    fn unknown_toml_keys_and_bad_models_are_errors() {
        let (_dir, file) = serve_toml("batch_size = [1]\n");
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
    fn the_model_repository_comes_from_the_flag_or_the_toml_file_and_needs_model_control() {
        let (dir, file) = serve_toml("model_control = true\nmodel_repository = \"/srv/models\"\n");
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
