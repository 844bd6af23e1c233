//! The soak tool against the `resnet-serve` binary run as an operator runs it, SIGTERM
//! sent under ten times its capacity: the drain answers every request it took.

use std::time::Duration;

use resnet_client::load::{LoadConfig, Mode, Transport};
use resnet_client::soak::{self, Sigterm, SoakConfig};
use resnet_client::{tensor, Client, ClientConfig, Output};
use resnet_serve::model::Architecture;
use testkit::binary::Served;

#[test]
fn sigterm_under_ten_times_capacity_loses_no_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weights = dir.path().join("resnet18.safetensors");
    testkit::write_synthetic_checkpoint(Architecture::Resnet18, &weights);
    let log = dir.path().join("server.log");
    let mut server = Served::start(env!("CARGO_BIN_EXE_resnet-serve"), &log, |c| {
        c.arg("--model")
            .arg(format!("resnet18_swsl={}", weights.display()))
            .args(["--batch-sizes", "1,2,4,8", "--queue-capacity", "8"])
            .args(["--drain-timeout-s", "10"]);
    });
    let url = server.url.clone();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let report = rt.block_on(async {
        let first = server.ready("").await;
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
                pid: server.pid() as i32,
                after: Duration::from_millis(2500),
            }),
            drain_wait: Duration::from_secs(20),
            metrics: Some(format!("http://{}/metrics", server.metrics)),
            sample_every: Duration::from_millis(100),
        };
        soak::run(&clients, &cfg).await.expect("the soak runs")
    });
    let text = format!("{report}\n{}", serde_json_report(&report));
    // Shown with --nocapture.
    eprintln!("{report}");
    // The server drained and exited by itself, successfully.
    let status = server.wait_exit(Duration::from_secs(30), &text);
    assert!(status.success(), "{status}: {}\n{text}", server.log());

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
