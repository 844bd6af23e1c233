//! The soak tool against the `resnet-serve` binary run as an operator runs it, SIGTERM
//! sent under ten times its capacity: the drain answers every request it took, over
//! plaintext and over TLS (where connections are handshaken before the server takes
//! them, so one made during the drain must not be dropped unserved).

use std::time::{Duration, Instant};

use resnet_client::load::{LoadConfig, Mode, Transport};
use resnet_client::soak::{self, Sigterm, SoakConfig};
use resnet_client::{tensor, Client, ClientConfig, Output, TlsFiles};
use resnet_serve::model::Architecture;
use testkit::binary::Served;

#[test]
fn sigterm_under_ten_times_capacity_loses_no_request() {
    sigterm_under_load(false);
}

#[test]
fn sigterm_under_ten_times_capacity_loses_no_request_over_tls() {
    sigterm_under_load(true);
}

/// A client once the server answers a classification over `config` (TLS or not).
async fn ready(server: &Served, config: &ClientConfig) -> Client {
    let give_up = Instant::now() + Duration::from_secs(120);
    let input = vec![0.25f32; 3 * 224 * 224];
    loop {
        assert!(
            Instant::now() < give_up,
            "the server never answered: {}",
            server.log()
        );
        if let Ok(client) = Client::connect(config.clone()).await {
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

/// The soak with SIGTERM 2.5 s into its overload, over plaintext or TLS (a certificate
/// of a CA made here); asserts that nothing is lost and the server exits by itself.
fn sigterm_under_load(tls: bool) {
    // One at a time: each calibrates against the machine's capacity.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let weights = dir.path().join("resnet18.safetensors");
    testkit::write_synthetic_checkpoint(Architecture::Resnet18, &weights);
    let log = dir.path().join("server.log");
    let pki = tls.then(|| {
        let ca = testkit::testca::TestCa::new("soak test CA");
        let (cert, key) = ca.issue("server", 1).write(dir.path(), "server");
        (ca.write(dir.path(), "ca.crt"), cert, key)
    });
    let mut server = Served::start(env!("CARGO_BIN_EXE_resnet-serve"), &log, |c| {
        c.arg("--model")
            .arg(format!("resnet18_swsl={}", weights.display()))
            .args(["--batch-sizes", "1,2,4,8", "--queue-capacity", "8"])
            .args(["--drain-timeout-s", "10"]);
        if let Some((_, cert, key)) = &pki {
            c.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
    });
    let mut config = ClientConfig::new([server.url.clone()]);
    if let Some((ca, _, _)) = &pki {
        // The certificate names localhost; Served's URL is http://127.0.0.1:PORT.
        let port = server.url.rsplit(':').next().expect("a port");
        config = ClientConfig::new([format!("https://localhost:{port}")]);
        config.tls = TlsFiles {
            ca: Some(ca.clone()),
            ..TlsFiles::default()
        }
        .config()
        .expect("client TLS");
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let report = rt.block_on(async {
        let first = ready(&server, &config).await;
        let mut clients = vec![first];
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
