//! `resnet-client`: classify files, stream a video, or load-test a resnet-serve server.
//!
//! This file parses the command line, connects, and hands over to the subcommand's
//! module in [`commands`].

mod commands;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use resnet_client::{Client, ClientConfig};

use commands::{classify, load, soak, stream};

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

#[derive(Subcommand)]
enum Command {
    /// Classify image files and print labels and scores per file.
    #[command(
        after_help = "Examples:\n  resnet-client classify cat.jpg dog.png\n  resnet-client classify --model resnext101_32x8d_swsl --top-k 3 --json photos/*.jpg"
    )]
    Classify(classify::Args),
    /// Stream a video file (decoded by ffmpeg), a directory of frames, or a video on stdin.
    #[command(
        after_help = "Examples:\n  resnet-client stream clip.mp4 --fps 30\n  resnet-client stream frames/\n  cat clip.mp4 | resnet-client stream - --size 640x360"
    )]
    Stream(stream::Args),
    /// Load-test: closed loop (--concurrency) or open loop (--rate), bounded in time and count.
    #[command(
        after_help = "Examples:\n  resnet-client load --concurrency 16 --duration 30 --input cat.jpg --metrics 127.0.0.1:9090\n  resnet-client load --rate 20 --duration 30 --synthetic --json\n  resnet-client load --concurrency 4 --stream --requests 1000 --csv"
    )]
    Load(load::Args),
    /// Soak: measure the server's capacity, offer it --overload times that for --duration,
    /// optionally SIGTERM it under load; report refusals, latencies, its RSS and requests
    /// lost (sent and never given a status).
    #[command(
        after_help = "Examples:\n  resnet-client soak --duration 60 --metrics-url http://127.0.0.1:9090/metrics\n  resnet-client soak --duration 60 --server-pid $(pidof resnet-serve) --sigterm-after 50 --json"
    )]
    Soak(soak::Args),
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
        Command::Classify(args) => classify::run(&client, args).await,
        Command::Stream(args) => stream::run(&client, args).await,
        Command::Load(args) => load::run(&client, args).await,
        Command::Soak(args) => soak::run(&client, args).await,
    }
}
