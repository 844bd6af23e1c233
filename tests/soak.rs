//! The soak tool against the `resnet-serve` binary run as an operator runs it, SIGTERM
//! sent under ten times its capacity: the drain answers every request it took.

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use resnet_client::load::{LoadConfig, Mode, Transport};
use resnet_client::soak::{self, Sigterm, SoakConfig};
use resnet_client::{tensor, Client, ClientConfig, Output};
use resnet_serve::model::Architecture;

/// A port free on 127.0.0.1 now (the server binds it a moment later).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The server process; killed if the test ends without it having exited.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connects once the server answers a classification (its model loaded).
async fn ready(url: &str, log: &std::path::Path) -> Client {
    let give_up = Instant::now() + Duration::from_secs(120);
    let input = vec![0.25f32; 3 * 224 * 224];
    loop {
        assert!(
            Instant::now() < give_up,
            "the server never answered: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        if let Ok(client) = Client::connect(ClientConfig::new([url.to_string()])).await {
            if client
                .classify("", vec![tensor(&input)], Output::TopK(1))
                .await
                .is_ok()
            {
                return client;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn sigterm_under_ten_times_capacity_loses_no_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weights = dir.path().join("resnet18.safetensors");
    common::write_synthetic_checkpoint(Architecture::Resnet18, &weights);
    let (grpc, metrics) = (free_port(), free_port());
    let log = dir.path().join("server.log");
    let mut server = Served(
        Command::new(env!("CARGO_BIN_EXE_resnet-serve"))
            .args(["--listen", &format!("127.0.0.1:{grpc}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
            .arg("--model")
            .arg(format!("resnet18_swsl={}", weights.display()))
            .args(["--batch-sizes", "1,2,4,8", "--queue-capacity", "8"])
            .args(["--drain-timeout-s", "10"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("the server starts"),
    );
    let url = format!("http://127.0.0.1:{grpc}");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let report = rt.block_on(async {
        let first = ready(&url, &log).await;
        let mut clients = vec![first];
        let mut config = ClientConfig::new([url.clone()]);
        config.retries = 0;
        clients.push(Client::connect(config).await.expect("connect"));
        let cfg = SoakConfig {
            request: LoadConfig {
                mode: Mode::Closed { concurrency: 1 },
                transport: Transport::Unary,
                duration: None,
                requests: None,
                warmup: Duration::ZERO,
                model: String::new(),
                images_per_request: 1,
                inputs: (0..4)
                    .map(|k| tensor(&vec![0.1 * k as f32; 3 * 224 * 224]))
                    .collect(),
                output: Output::TopK(1),
            },
            calibrate: Duration::from_millis(1500),
            calibrate_concurrency: 4,
            capacity: None,
            overload: 10.0,
            duration: Duration::from_secs(5),
            max_outstanding: 20_000,
            sigterm: Some(Sigterm {
                pid: server.0.id() as i32,
                after: Duration::from_millis(2500),
            }),
            drain_wait: Duration::from_secs(20),
            metrics: Some(format!("http://127.0.0.1:{metrics}/metrics")),
            sample_every: Duration::from_millis(100),
        };
        soak::run(&clients, &cfg).await.expect("the soak runs")
    });
    let text = format!("{report}\n{}", serde_json_report(&report));
    // Shown with --nocapture.
    eprintln!("{report}");
    // The server drained and exited by itself, successfully.
    let give_up = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = server.0.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < give_up, "the server never exited: {text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let server_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "{status}: {server_log}\n{text}");

    let sigterm = report.sigterm.as_ref().expect("sigterm");
    assert!(sigterm.exited_after_s.is_some(), "{text}");
    assert!(sigterm.outstanding > 0, "SIGTERM came under load: {text}");
    assert_eq!(report.lost, 0, "{text}");
    let drain = report.drain.as_ref().expect("a drain phase");
    assert!(drain.sent > 0, "load went on after SIGTERM: {text}");
    // New calls during the drain are refused as UNAVAILABLE while the taken ones finish.
    assert!(
        drain.answered.get("UNAVAILABLE").copied().unwrap_or(0) > 0,
        "{text}"
    );
    let overload = &report.overload;
    assert!(overload.ok > 0 && overload.refused > 0, "{text}");
    assert_eq!(
        report.total.sent,
        report.total.answered.values().sum::<u64>()
            + report.total.not_taken.values().sum::<u64>()
            + report.total.lost,
        "{text}"
    );
    let rss = report.rss.as_ref().expect("rss");
    assert!(
        rss.before > 1 << 20 && rss.loaded > 1 << 20 && rss.peak > 1 << 20 && rss.after > 1 << 20,
        "{text}"
    );
}

fn serde_json_report(report: &soak::SoakReport) -> String {
    serde_json::to_string(report).unwrap_or_default()
}
