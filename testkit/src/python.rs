//! The Python scripts under `tests/kserve/`, run with Triton's own client library
//! (tritonclient[grpc], which `.ci/run` installs) against a test's server.

use std::ffi::OsString;
use std::path::PathBuf;

/// The Python interpreter with tritonclient[grpc]: `$RESNET_SERVE_TEST_PYTHON`, or
/// `python3`.
pub fn python() -> String {
    std::env::var("RESNET_SERVE_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// How a script ended.
pub struct Ran {
    pub success: bool,
    /// Its stdout, then its stderr.
    pub text: String,
}

/// Runs `tests/kserve/<script>` to its end (off the runtime's threads) against the
/// server at `url` (`--url`, its scheme dropped: the scripts take `host:port`) for
/// `model` (`--model`), with `args` after those.
pub async fn run<A: Into<OsString>>(
    script: &str,
    url: &str,
    model: &str,
    args: impl IntoIterator<Item = A>,
) -> Ran {
    let script: PathBuf = crate::fixtures::repo_root()
        .join("tests/kserve")
        .join(script);
    let host_port = url
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    let mut all: Vec<OsString> = ["--url", host_port, "--model", model]
        .into_iter()
        .map(OsString::from)
        .collect();
    all.extend(args.into_iter().map(Into::into));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python())
            .arg(&script)
            .args(&all)
            .output()
    })
    .await
    .expect("join")
    .unwrap_or_else(|e| panic!("running {} (set RESNET_SERVE_TEST_PYTHON): {e}", python()));
    Ran {
        success: out.status.success(),
        text: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}
