//! The `resnet-serve` binary as a child process, run as an operator runs it, on loopback
//! ports picked free just before it binds them. The binary's path comes from the test
//! (`env!("CARGO_BIN_EXE_resnet-serve")`: cargo sets it for the package's own tests only).

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use resnet_client::{tensor, Client, ClientConfig, Output};

/// How long the binary may take to load its models before the test fails.
const READY_WITHIN: Duration = Duration::from_secs(120);

/// A port free on 127.0.0.1 now (the server binds it a moment later).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The server process; killed if the test ends without it having exited.
pub struct Served {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The metrics port, `127.0.0.1:PORT`.
    pub metrics: String,
    log: PathBuf,
}

impl Served {
    /// Runs `bin` with `--listen` and `--metrics-listen` on free loopback ports, its
    /// stdout discarded and its stderr written to `log`, after `configure` has added
    /// its arguments and environment.
    pub fn start(bin: &str, log: &Path, configure: impl FnOnce(&mut Command)) -> Served {
        let listen = format!("127.0.0.1:{}", free_port());
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut command = Command::new(bin);
        command
            .args(["--listen", &listen])
            .args(["--metrics-listen", &metrics])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log"));
        configure(&mut command);
        Served {
            child: command.spawn().expect("the server starts"),
            url: format!("http://{listen}"),
            metrics,
            log: log.to_path_buf(),
        }
    }

    /// What the server has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A client, once `model` (the default model when empty) answers a classification.
    pub async fn ready(&self, model: &str) -> Client {
        let input = vec![0.25f32; 3 * 224 * 224];
        self.ready_when(|client| {
            let input = input.clone();
            async move {
                client
                    .classify(model, vec![tensor(&input)], Output::TopK(1))
                    .await
                    .is_ok()
                    .then_some(client)
            }
        })
        .await
    }

    /// Connects until `probe` of a connected client says the server is ready, and
    /// returns what it said; fails the test, showing the server's log, after two
    /// minutes.
    pub async fn ready_when<T, F, Fut>(&self, mut probe: F) -> T
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let give_up = Instant::now() + READY_WITHIN;
        loop {
            assert!(
                Instant::now() < give_up,
                "the server never answered: {}",
                self.log()
            );
            if let Ok(client) = Client::connect(ClientConfig::new([self.url.clone()])).await {
                if let Some(ready) = probe(client).await {
                    return ready;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends SIGTERM (the drain begins).
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Waits at most `within` for the process to exit by itself; fails the test, with
    /// `context` and the log, if it does not.
    pub fn wait_exit(&mut self, within: Duration, context: &str) -> ExitStatus {
        let give_up = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(
                Instant::now() < give_up,
                "the server never exited: {context}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `command` to its end (it must succeed; its stderr is shown if not) and returns
/// its output.
pub fn run_ok(command: &mut Command) -> std::process::Output {
    let out = command.output().expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `command` to its end (it must fail) and returns what it printed on stderr.
pub fn run_failing(command: &mut Command) -> String {
    let out = command.output().expect("runs");
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "must fail: {text}");
    text
}

/// Runs `bin` with `args` on free loopback ports to its end (it must fail at start-up)
/// and returns what it printed on stderr.
pub fn failed_start(bin: &str, args: &[&str]) -> String {
    run_failing(
        Command::new(bin)
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())])
            .args(args),
    )
}
