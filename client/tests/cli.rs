//! `resnet-client` against a real server on 127.0.0.1 serving the synthetic resnet18.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use resnet_serve::model::Classifier;
use resnet_serve::preprocess::{Input, Preprocessor};
use resnet_serve::process::server::ServeOptions;
use testkit::backends::Gated;
use testkit::binary::{run_failing, run_ok};
use testkit::metrics::{scrape_blocking, sum};
use testkit::testca;
use testkit::BlockingServer;

fn fixture(name: &str) -> PathBuf {
    testkit::fixture(&format!("images/{name}"))
}

fn model() -> Arc<Classifier> {
    testkit::resnet18()
}

/// The servers' options here: a model queue of `queue_capacity` images, and shared
/// memory on (`load --shared-memory` registers a region).
fn options(queue_capacity: usize) -> ServeOptions {
    ServeOptions {
        shared_memory: true,
        ..testkit::server::options(&[1, 2, 4, 8], 2, queue_capacity)
    }
}

/// The options of a server that requires the bearer tokens of the file `tokens`.
fn with_tokens(tokens: &Path, options: ServeOptions) -> ServeOptions {
    ServeOptions {
        auth_tokens: Some(Arc::new(
            resnet_serve::api::auth::Tokens::load(tokens).expect("tokens"),
        )),
        ..options
    }
}

/// A server of the seeded resnet18 as the tests here start most of them.
fn serve() -> BlockingServer {
    BlockingServer::start(options(256), model())
}

/// The CLI under test, pointed at a server.
trait Cli {
    fn client(&self) -> Command;
}

impl Cli for BlockingServer {
    fn client(&self) -> Command {
        self.command(env!("CARGO_BIN_EXE_resnet-client"))
    }
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn classify_prints_what_predict_computes() {
    let model = model();
    let server = serve();
    let files = [
        fixture("rocket.jpg"),
        fixture("coffee.png"),
        fixture("camera_gray.png"),
    ];
    let out = server
        .client()
        .args(["classify", "--output", "logits", "--json"])
        .args(&files)
        .output()
        .expect("runs");
    let json = json_of(&out);
    // What `resnet-serve predict` computes: each file preprocessed as torchvision does, one
    // forward pass over the batch.
    let pre = Preprocessor::default();
    let mut pixels = Vec::new();
    for file in &files {
        let bytes = std::fs::read(file).expect("fixture");
        let input = pre.prepare(Input::Encoded(&bytes)).expect("preprocess");
        input
            .view()
            .for_each_run(|run| pixels.extend_from_slice(run));
    }
    let offline = model.classify(&pixels, files.len()).expect("forward");
    for (i, want) in offline.iter().enumerate() {
        let got: Vec<f32> = json[i]["logits"]
            .as_array()
            .expect("array")
            .iter()
            .map(|v| v.as_f64().expect("number") as f32)
            .collect();
        let err = testkit::relative_error(&got, want);
        assert!(err <= 1e-5, "{}: {err}", files[i].display());
    }
    // Text top-k names labels.
    let out = server
        .client()
        .args(["classify", "--top-k", "2"])
        .arg(&files[0])
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1. ") && text.contains("2. "),
        "{text}"
    );
}

fn ffmpeg_video(dir: &Path, frames: u32) -> PathBuf {
    let path = dir.join("clip.mp4");
    let status = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i"])
        .arg(format!(
            "testsrc=size=320x240:rate=10:duration={}",
            f64::from(frames) / 10.0
        ))
        .args(["-pix_fmt", "yuv420p"])
        .arg(&path)
        .status()
        .expect("ffmpeg is needed for this test (.ci/run installs it)");
    assert!(status.success(), "ffmpeg could not make the test video");
    path
}

#[test]
fn stream_a_video_in_order_with_a_summary() {
    let server = serve();
    let dir = tempfile::tempdir().expect("tempdir");
    let video = ffmpeg_video(dir.path(), 12);
    let out = run_ok(server.client().args(["stream", "--json"]).arg(&video));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let (summary, frames) = lines.split_last().expect("lines");
    assert_eq!(frames.len(), 12);
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f["index"], i as u64, "in order");
        assert!(f["label"].is_string(), "{f}");
        assert!((f["timestamp"].as_f64().expect("t") - i as f64 / 10.0).abs() < 1e-9);
    }
    assert_eq!(summary["frames"], 12);
    assert_eq!(summary["errors"], 0);
    let p50 = summary["latency_ms_p50"].as_f64().expect("p50");
    let max = summary["latency_ms_max"].as_f64().expect("max");
    let slowest = frames
        .iter()
        .map(|f| f["latency_ms"].as_f64().expect("latency"))
        .fold(0.0, f64::max);
    assert!(p50 > 0.0 && p50 <= max, "p50 {p50}, max {max}");
    assert!(
        (max - slowest).abs() <= slowest * 0.01 + 0.01,
        "summary max {max} vs slowest frame {slowest}"
    );
}

#[test]
fn stream_a_directory_reports_a_bad_frame_and_goes_on() {
    let server = serve();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(fixture("rocket.jpg"), dir.path().join("000.jpg")).expect("copy");
    std::fs::write(dir.path().join("001.jpg"), b"not a jpeg").expect("write");
    std::fs::copy(fixture("coffee.png"), dir.path().join("002.png")).expect("copy");
    let out = run_ok(server.client().args(["stream"]).arg(dir.path()));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("frame      0") && !lines[0].contains("error"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("frame      1") && lines[1].contains("error: InvalidArgument"),
        "{text}"
    );
    assert!(
        lines[2].starts_with("frame      2") && !lines[2].contains("error"),
        "{text}"
    );
    assert!(
        lines[3].starts_with("3 frames") && lines[3].contains("1 errors"),
        "{text}"
    );
}

#[test]
fn a_missing_ffmpeg_is_a_clear_error() {
    let server = serve();
    let err = run_failing(
        server
            .client()
            .env("PATH", "/nonexistent")
            .args(["stream", "clip.mp4"]),
    );
    assert!(
        err.contains("not found on PATH") && err.contains("FFmpeg"),
        "{err}"
    );
}

#[test]
fn the_library_balances_endpoints() {
    use resnet_client::{tensor, Client, ClientConfig, Output};
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let input = vec![0.25f32; 3 * 224 * 224];
    let (a, b) = (serve(), serve());
    rt.block_on(async {
        let client = Client::connect(ClientConfig::new([a.grpc.clone(), b.grpc.clone()]))
            .await
            .expect("connect");
        for _ in 0..24 {
            client
                .classify("", vec![tensor(&input)], Output::TopK(1))
                .await
                .expect("classify");
        }
    });
    let na = sum(&scrape_blocking(&a.metrics), "resnet_serve_requests_total{");
    let nb = sum(&scrape_blocking(&b.metrics), "resnet_serve_requests_total{");
    assert_eq!(na + nb, 24.0);
    assert!(na > 0.0 && nb > 0.0, "both endpoints used: {na} and {nb}");
}

#[test]
fn a_load_spreads_its_requests_over_its_connections() {
    use resnet_client::load::{self, LoadConfig, Mode, Transport};
    use resnet_client::{tensor, Client, ClientConfig, Output};
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // Two servers, one connection to each: each server counts what its connection carried.
    let (a, b) = (serve(), serve());
    let report = rt.block_on(async {
        let mut clients = Vec::new();
        for url in [&a.grpc, &b.grpc] {
            clients.push(
                Client::connect(ClientConfig::new([url.clone()]))
                    .await
                    .expect("connect"),
            );
        }
        let cfg = LoadConfig {
            mode: Mode::Closed { concurrency: 4 },
            transport: Transport::Unary,
            duration: None,
            requests: Some(12),
            warmup: Duration::ZERO,
            model: String::new(),
            images_per_request: 1,
            inputs: vec![tensor(&vec![0.25f32; 3 * 224 * 224])],
            output: Output::TopK(1),
        };
        load::run(&clients, &cfg, None, indicatif::ProgressBar::hidden()).await
    });
    assert_eq!((report.ok, report.connections), (12, 2));
    let na = sum(&scrape_blocking(&a.metrics), "resnet_serve_requests_total{");
    let nb = sum(&scrape_blocking(&b.metrics), "resnet_serve_requests_total{");
    // Workers 0 and 2 use the first connection, 1 and 3 the second; each worker sends at
    // least its first request before any budget runs out.
    assert_eq!(na + nb, 12.0);
    assert!(
        na >= 2.0 && nb >= 2.0,
        "both connections used: {na} and {nb}"
    );
}

#[test]
fn the_library_retries_unavailable_only() {
    use resnet_client::{tensor, Client, ClientConfig, Output};
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let input = vec![0.25f32; 3 * 224 * 224];
    let gate = Gated::new(model());
    let mut server = BlockingServer::start(options(256), gate.clone());
    rt.block_on(async {
        let mut config = ClientConfig::new([server.grpc.clone()]);
        config.retries = 2;
        config.backoff = Duration::from_millis(10);
        let client = Client::connect(config).await.expect("connect");
        let busy = client.clone();
        let held_input = input.clone();
        let held = tokio::spawn(async move {
            busy.classify("", vec![tensor(&held_input)], Output::TopK(1))
                .await
        });
        let give_up = std::time::Instant::now() + Duration::from_secs(30);
        while !gate.has_entered() {
            assert!(
                std::time::Instant::now() < give_up,
                "the held request never reached the model"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // An invalid request is answered once, not retried.
        let bad = client
            .classify("", vec![tensor(&input[..10])], Output::TopK(1))
            .await
            .expect_err("invalid");
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        // Start the drain (the held request keeps it going): new calls are UNAVAILABLE.
        server.begin_stop();
        // Wait for the drain with a probe that does not retry (and gives up quickly
        // if it was queued before the drain began).
        let mut probe_config = ClientConfig::new([server.grpc.clone()]);
        probe_config.retries = 0;
        probe_config.timeout = Some(Duration::from_millis(300));
        let probe = Client::connect(probe_config).await.expect("connect");
        loop {
            assert!(
                std::time::Instant::now() < give_up,
                "the server never started draining"
            );
            let r = probe
                .classify("", vec![tensor(&input)], Output::TopK(1))
                .await;
            if r.as_ref().err().map(|e| e.code()) == Some(tonic::Code::Unavailable) {
                break;
            }
        }
        let before = sum(
            &scrape_blocking(&server.metrics),
            "resnet_serve_requests_total{code=\"UNAVAILABLE\"",
        );
        let err = client
            .classify("", vec![tensor(&input)], Output::TopK(1))
            .await
            .expect_err("draining");
        assert_eq!(err.code(), tonic::Code::Unavailable);
        let text = scrape_blocking(&server.metrics);
        assert_eq!(
            sum(
                &text,
                "resnet_serve_requests_total{code=\"INVALID_ARGUMENT\""
            ),
            1.0
        );
        let unavailable = sum(&text, "resnet_serve_requests_total{code=\"UNAVAILABLE\"") - before;
        assert_eq!(unavailable, 3.0, "one call, tried 1 + 2 retries times");
        gate.open();
        held.await
            .expect("task")
            .expect("the held request is answered during the drain");
    });
}

fn check_report(r: &serde_json::Value) {
    let requests = r["requests"].as_u64().expect("requests");
    let ok = r["ok"].as_u64().expect("ok");
    let errors: u64 = r["errors"]
        .as_object()
        .expect("errors")
        .values()
        .map(|v| v.as_u64().expect("n"))
        .sum();
    assert_eq!(requests, ok + errors, "counted = answered + errors: {r}");
    let l = &r["latency_ms"];
    let q: Vec<f64> = ["p50", "p90", "p99", "p999", "max"]
        .iter()
        .map(|k| l[*k].as_f64().expect("q"))
        .collect();
    assert!(
        q.windows(2).all(|w| w[0] <= w[1]),
        "percentiles monotone: {q:?}"
    );
    assert!(q[0] > 0.0);
}

#[test]
fn closed_loop_load_counts_every_request() {
    let server = serve();
    for extra in [
        vec![],
        vec!["--stream"],
        vec!["--kserve", "--model", "resnet18_swsl"],
        vec!["--shared-memory"],
        vec!["--shared-memory", "--stream"],
        vec!["--shared-memory", "--kserve", "--model", "resnet18_swsl"],
    ] {
        let out = server
            .client()
            .args([
                "load",
                "--concurrency",
                "3",
                "--requests",
                "18",
                "--warmup",
                "0",
                "--synthetic",
                "--json",
            ])
            .args(["--metrics", &server.metrics])
            .args(&extra)
            .output()
            .expect("runs");
        let r = json_of(&out);
        check_report(&r);
        assert_eq!(r["requests"], 18, "{r}");
        assert_eq!(r["ok"], 18, "{r}");
        let batches = r["server"]["batches"].as_f64().expect("server stats");
        assert!((1.0..=18.0).contains(&batches), "{r}");
    }
    // The shared-memory runs removed their objects (and unregistered them, or the
    // second run's registration of the same name would have failed).
    let left: Vec<_> = std::fs::read_dir("/dev/shm")
        .expect("/dev/shm")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("resnet-client-") && n.ends_with("-resnet-client-load"))
        .collect();
    assert!(left.is_empty(), "left in /dev/shm: {left:?}");
}

#[test]
fn open_loop_load_keeps_its_schedule_and_counts() {
    let server = serve();
    let out = server
        .client()
        .args([
            "load",
            "--rate",
            "10",
            "--duration",
            "2",
            "--warmup",
            "0",
            "--synthetic",
            "--json",
        ])
        .output()
        .expect("runs");
    let r = json_of(&out);
    check_report(&r);
    let n = r["requests"].as_u64().expect("n");
    assert!((19..=21).contains(&n), "10 req/s for 2 s sent {n}");
    // CSV: a header and one row with the same count.
    let out = server
        .client()
        .args([
            "load",
            "--rate",
            "10",
            "--requests",
            "5",
            "--warmup",
            "0",
            "--synthetic",
            "--csv",
        ])
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("loop,offered,transport,duration_s,requests"),
        "{text}"
    );
    let row: Vec<&str> = lines[1].split(',').collect();
    assert_eq!((row[0], row[1], row[4]), ("open", "10", "5"), "{text}");
}

#[test]
fn library_calls_answer_as_the_generated_stub_does() {
    use resnet_client::proto::{ClassifyRequest, ClassifyResponse};
    use resnet_client::{tensor, wire, Client, ClientConfig, Output};
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let server = serve();
    let images: Vec<_> = (0..3)
        .map(|i| tensor(&vec![0.1 * i as f32; 3 * 224 * 224]))
        .collect();
    let client = rt.block_on(async {
        let client = Client::connect(ClientConfig::new([server.grpc.clone()]))
            .await
            .expect("connect");
        let request = |model: &str, images: Vec<_>, output: Output| ClassifyRequest {
            model: model.into(),
            images,
            output: Some(output.spec()),
            request_id: "same".into(),
        };
        // The same answer, to the bit, as the stub's call with tonic's encoder.
        let asked = request("", images.clone(), Output::Logits);
        let spliced: ClassifyResponse = client
            .unary(wire::CLASSIFY, wire::Encoded::new(&asked), None)
            .await
            .expect("spliced");
        let stubbed = client
            .stub()
            .classify(asked)
            .await
            .expect("stub")
            .into_inner();
        assert_eq!(spliced, stubbed);
        assert_eq!(spliced.results.len(), 3);

        // The server's statuses and messages come through unchanged.
        let unknown = request("no-such-model", images[..1].to_vec(), Output::TopK(1));
        let spliced = client
            .unary::<ClassifyResponse>(wire::CLASSIFY, wire::Encoded::new(&unknown), None)
            .await
            .expect_err("unknown model");
        let stubbed = client.stub().classify(unknown).await.expect_err("unknown");
        assert_eq!(spliced.code(), tonic::Code::NotFound);
        assert_eq!(
            (spliced.code(), spliced.message()),
            (stubbed.code(), stubbed.message())
        );

        // Size limits are tonic's: a request over the limit is refused before it is sent,
        // a response over it when it arrives.
        let mut small = ClientConfig::new([server.grpc.clone()]);
        small.max_message_bytes = 3000;
        let small = Client::connect(small).await.expect("connect");
        let err = small
            .classify("", images[..1].to_vec(), Output::TopK(1))
            .await
            .expect_err("request too large");
        assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
        assert!(err.message().contains("the limit is: 3000 bytes"), "{err}");
        // An 8x8 frame asks for 4 KB of logits: the request fits in 1000 bytes, the reply
        // does not.
        let mut tight = ClientConfig::new([server.grpc.clone()]);
        tight.max_message_bytes = 1000;
        let tight = Client::connect(tight).await.expect("connect");
        let frame = resnet_client::raw(8, 8, vec![128; 8 * 8 * 3]);
        let err = tight
            .classify("", vec![frame.clone()], Output::Logits)
            .await
            .expect_err("response too large");
        let stubbed = tight
            .stub()
            .classify(request("", vec![frame], Output::Logits))
            .await
            .expect_err("response too large");
        // (The two replies differ by a byte: the server numbers the requests' ids.)
        for e in [&err, &stubbed] {
            assert_eq!(e.code(), tonic::Code::OutOfRange, "{e}");
            assert!(
                e.message()
                    .starts_with("Error, decoded message length too large")
                    && e.message().ends_with("the limit is: 1000 bytes"),
                "{e}"
            );
        }

        // A stream's frames (a bad one among them) are answered as through the stub.
        let frames: Vec<_> = (0..3u64)
            .map(|i| resnet_client::proto::StreamFrame {
                frame_id: i,
                model: if i == 1 { "no-such-model" } else { "" }.into(),
                image: Some(images[i as usize].clone()),
                output: Some(Output::Logits.spec()),
            })
            .collect();
        let collect = |mut s: tonic::Streaming<resnet_client::proto::StreamResult>| async move {
            let mut out = Vec::new();
            while let Some(r) = s.message().await.expect("stream") {
                out.push(r);
            }
            out
        };
        let spliced = collect(
            client
                .classify_stream(tokio_stream::iter(frames.clone()))
                .await
                .expect("stream"),
        )
        .await;
        let stubbed = collect(
            client
                .stub()
                .classify_stream(tokio_stream::iter(frames))
                .await
                .expect("stream")
                .into_inner(),
        )
        .await;
        assert_eq!(spliced.len(), 3);
        assert_eq!(spliced, stubbed);
        assert!(matches!(
            spliced[1].outcome,
            Some(resnet_client::proto::stream_result::Outcome::Error(_))
        ));
        client
    });
    // A server that is gone is UNAVAILABLE (retried, then reported), as through the stub.
    drop(server);
    rt.block_on(async {
        let err = client
            .classify("", images[..1].to_vec(), Output::TopK(1))
            .await
            .expect_err("server gone");
        let stubbed = client
            .stub()
            .classify(ClassifyRequest::default())
            .await
            .expect_err("server gone");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
        assert_eq!(stubbed.code(), tonic::Code::Unavailable, "{stubbed}");
    });
}

#[test]
fn a_soak_refuses_past_capacity_and_loses_nothing() {
    // A queue of 8 images: ten times the capacity must be refused, not queued.
    let server = BlockingServer::start(options(8), model());
    let metrics_url = format!("http://{}/metrics", server.metrics);
    let out = server
        .client()
        .args([
            "soak",
            "--calibrate",
            "2",
            "--calibrate-concurrency",
            "4",
            "--duration",
            "4",
            "--overload",
            "10",
            "--connections",
            "2",
            "--sample-ms",
            "100",
            "--drain-wait",
            "20",
            "--json",
            "--metrics-url",
            &metrics_url,
        ])
        .output()
        .expect("runs");
    let r = json_of(&out);
    let capacity = r["capacity_rps"].as_f64().expect("capacity");
    let offered = r["offered_rps"].as_f64().expect("offered");
    assert!(capacity > 0.0 && r["capacity_measured"] == true, "{r}");
    assert!((offered / capacity - 10.0).abs() < 1e-6, "{r}");
    assert!(r["drain"].is_null() && r["sigterm"].is_null(), "{r}");
    let total = &r["total"];
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("count: {r}"));
    let sum = |v: &serde_json::Value| -> u64 {
        v.as_object()
            .unwrap_or_else(|| panic!("counts: {r}"))
            .values()
            .map(n)
            .sum()
    };
    // Every request sent has exactly one outcome.
    assert_eq!(
        n(&total["sent"]),
        sum(&total["answered"]) + sum(&total["not_taken"]) + n(&total["lost"]),
        "{r}"
    );
    assert!(n(&total["sent"]) as f64 >= 0.5 * offered * 4.0, "{r}");
    assert_eq!(n(&r["lost"]), 0, "{r}");
    assert_eq!(sum(&total["not_taken"]), 0, "the server stayed up: {r}");
    assert!(n(&total["refused"]) > 0, "10x overload was refused: {r}");
    assert!(n(&total["ok"]) > 0, "{r}");
    for q in ["ok_ms", "refused_ms"] {
        let p50 = total[q]["p50"]
            .as_f64()
            .unwrap_or_else(|| panic!("{q}: {r}"));
        let p99 = total[q]["p99"]
            .as_f64()
            .unwrap_or_else(|| panic!("{q}: {r}"));
        assert!(0.0 < p50 && p50 <= p99, "{q}: {r}");
    }
    let rss = &r["rss"];
    for k in ["before", "loaded", "overloaded", "peak", "after"] {
        assert!(n(&rss[k]) > 1 << 20, "RSS {k}: {r}");
    }
    assert!(n(&rss["samples"]) >= 10, "{r}");
    assert!(
        n(&rss["peak"]) >= n(&rss["before"]).min(n(&rss["loaded"])),
        "{r}"
    );

    // The human summary says the same.
    let out = run_ok(server.client().args([
        "soak",
        "--capacity",
        "20",
        "--calibrate",
        "0.5",
        "--duration",
        "1",
        "--overload",
        "2",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("capacity 20.0 req/s (given), offered 40.0 req/s (2x)")
            && text.contains("requests lost (sent, never given a status): 0"),
        "{text}"
    );
}

#[test]
fn every_subcommand_sends_the_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "cli-secret\n").expect("write");
    let server = BlockingServer::start(with_tokens(&tokens, options(256)), model());
    let image = fixture("rocket.jpg");
    let image = image.to_str().expect("utf8");
    let said = run_failing(server.client().args(["classify", image]));
    assert!(said.contains("token"), "{said}");
    run_ok(
        server
            .client()
            .args(["--token", "cli-secret", "classify", "--json", image]),
    );
    // From the environment, on a load test's own connections, for each transport.
    for extra in [
        vec![],
        vec!["--stream"],
        vec!["--kserve", "--model", "resnet18_swsl"],
    ] {
        let load = server
            .client()
            .env("RESNET_CLIENT_TOKEN", "cli-secret")
            .args([
                "load",
                "--concurrency",
                "2",
                "--connections",
                "2",
                "--duration",
                "1",
                "--synthetic",
                "--json",
            ])
            .args(&extra)
            .output()
            .expect("runs");
        let report = json_of(&load);
        assert!(
            report["ok"].as_u64().unwrap_or(0) > 0,
            "{extra:?}: {report}"
        );
        assert_eq!(
            report["errors"].as_object().map(|e| e.len()),
            Some(0),
            "{extra:?}: {report}"
        );
    }
}

#[test]
fn tls_and_mutual_tls_from_the_flags_and_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = testca::TestCa::new("cli test CA");
    let ca_file = ca.write(dir.path(), "ca.crt");
    let (cert, key) = ca.issue("server", 1).write(dir.path(), "server");
    let clients = testca::TestCa::new("cli client CA");
    let (client_cert, client_key) = clients.issue("cli", 2).write(dir.path(), "client");
    let mut tls = resnet_serve::process::tls::TlsOptions::new(cert, key);
    tls.client_ca = Some(clients.write(dir.path(), "clients.crt"));
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "cli-secret\n").expect("write");
    let server = BlockingServer::start(
        ServeOptions {
            tls: Some(tls),
            ..with_tokens(&tokens, options(256))
        },
        model(),
    );
    assert!(server.grpc.starts_with("https://"), "{}", server.grpc);
    let image = fixture("rocket.jpg");
    let image = image.to_str().expect("utf8");
    let path = |p: &Path| p.to_str().expect("utf8").to_string();

    let classified = server
        .client()
        .args(["--tls-ca", &path(&ca_file)])
        .args(["--tls-cert", &path(&client_cert)])
        .args(["--tls-key", &path(&client_key)])
        .args(["--tls-domain", "localhost", "--token", "cli-secret"])
        .args(["classify", "--json", image])
        .output()
        .expect("runs");
    let results = json_of(&classified);
    assert_eq!(results.as_array().map(Vec::len), Some(1), "{results}");

    // Without a client certificate, the handshake fails; the public roots do not know
    // the test CA; TLS flags with a plaintext endpoint are refused.
    for (args, says) in [
        (vec!["--tls-ca".to_string(), path(&ca_file)], ""),
        (vec![], ""),
        (
            vec![
                "--tls-ca".to_string(),
                path(&ca_file),
                "--endpoint".into(),
                server.grpc.replacen("https://", "http://", 1),
            ],
            "https://",
        ),
    ] {
        let refused = server
            .client()
            .args(&args)
            .args(["--token", "cli-secret", "classify", image])
            .output()
            .expect("runs");
        let said = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{args:?} succeeded");
        assert!(said.contains(says), "{args:?}: {said}");
    }

    // From the environment, on a load test's own connections, unary and streaming.
    for extra in [vec![], vec!["--stream"]] {
        let load = server
            .client()
            .env("RESNET_CLIENT_TLS_CA", &ca_file)
            .env("RESNET_CLIENT_TLS_CERT", &client_cert)
            .env("RESNET_CLIENT_TLS_KEY", &client_key)
            .env("RESNET_CLIENT_TLS_DOMAIN", "localhost")
            .env("RESNET_CLIENT_TOKEN", "cli-secret")
            .args([
                "load",
                "--concurrency",
                "2",
                "--connections",
                "2",
                "--requests",
                "8",
                "--warmup",
                "0",
                "--synthetic",
                "--json",
            ])
            .args(&extra)
            .output()
            .expect("runs");
        let report = json_of(&load);
        assert_eq!(report["ok"].as_u64(), Some(8), "{extra:?}: {report}");
        assert_eq!(
            report["errors"].as_object().map(|e| e.len()),
            Some(0),
            "{extra:?}: {report}"
        );
    }
}
