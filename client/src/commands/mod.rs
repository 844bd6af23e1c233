//! The subcommands of `resnet-client`, one module each (its flags and what it runs), and
//! what several of them share: the inputs they send, extra connections, a progress bar.

pub mod classify;
pub mod load;
pub mod soak;
pub mod stream;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use resnet_client::{proto, Client};

/// A progress bar on stderr, hidden when stderr is not a terminal.
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

/// The 16 synthetic tensors a load sends when given no files.
fn synthetic_images() -> Vec<proto::Image> {
    (0..16)
        .map(|s| resnet_client::tensor(&synthetic_tensor(s)))
        .collect()
}

/// The files, read, as encoded images.
fn read_images(files: &[PathBuf]) -> anyhow::Result<Vec<proto::Image>> {
    files
        .iter()
        .map(|f| {
            std::fs::read(f)
                .map(resnet_client::encoded)
                .with_context(|| format!("reading {}", f.display()))
        })
        .collect()
}

/// `client` and `count - 1` more connections made with its configuration (at least
/// `client`).
async fn connections_like(client: &Client, count: usize) -> anyhow::Result<Vec<Client>> {
    let mut clients = vec![client.clone()];
    for _ in 1..count.max(1) {
        clients.push(
            Client::connect(client.config().clone())
                .await
                .context("connecting")?,
        );
    }
    Ok(clients)
}
