//! The weights download against a real HTTP server on 127.0.0.1: verified, resumable,
//! corrupt files refused, offline reported clearly.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::Ordering;

use resnet_serve::model::ModelName;
use resnet_serve::weights::download::{DownloadError, Downloader};
use resnet_serve::weights::hub::sha256_hex;
use testkit::hub::{serve, Mode};

fn payload() -> Vec<u8> {
    (0..300_000u32)
        .flat_map(|i| (i.wrapping_mul(2_654_435_761)).to_le_bytes())
        .collect()
}

fn named(body: &[u8]) -> String {
    let sha = sha256_hex(body).expect("hash");
    format!("test_weights-{}.pth", &sha[..8])
}

fn downloader(url: &str, cache: &Path) -> Downloader {
    Downloader {
        base_url: url.to_string(),
        cache_dir: cache.to_path_buf(),
        progress: false,
    }
}

#[test]
fn downloads_verifies_and_caches() {
    let body = payload();
    let (url, hits) = serve(body.clone(), Mode::Serve);
    let cache = tempfile::tempdir().expect("tempdir");
    let d = downloader(&url, cache.path());
    let path = d.fetch_file(&named(&body)).expect("downloads");
    assert_eq!(std::fs::read(&path).expect("cached"), body);
    // A second fetch is served from the cache.
    assert_eq!(d.fetch_file(&named(&body)).expect("cached"), path);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[test]
fn an_interrupted_download_resumes_with_a_range_request() {
    let body = payload();
    let (url, hits) = serve(body.clone(), Mode::DropFirstAfter(400_000));
    let cache = tempfile::tempdir().expect("tempdir");
    let d = downloader(&url, cache.path());
    let name = named(&body);
    let first = d.fetch_file(&name).expect_err("connection dropped");
    assert!(first.to_string().contains("run again to resume"), "{first}");
    assert!(
        !cache.path().join(&name).exists(),
        "no partial file under the final name"
    );
    let path = d.fetch_file(&name).expect("resumes");
    assert_eq!(std::fs::read(path).expect("cached"), body);
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[test]
fn a_corrupt_download_is_refused_and_not_cached() {
    // The server's bytes do not hash to resnet18_ssl's published prefix.
    let (url, _) = serve(payload(), Mode::Serve);
    let cache = tempfile::tempdir().expect("tempdir");
    let model: ModelName = "resnet18_ssl".parse().expect("name");
    match downloader(&url, cache.path()).fetch(model) {
        Err(DownloadError::HashMismatch { expected, .. }) => assert_eq!(expected, "d92f0530"),
        other => panic!("expected a hash mismatch, got {other:?}"),
    }
    let left: Vec<_> = std::fs::read_dir(cache.path()).expect("ls").collect();
    assert!(left.is_empty(), "nothing may stay in the cache: {left:?}");
}

#[test]
fn offline_and_http_errors_are_clear() {
    // A port nobody listens on.
    let port = testkit::binary::free_port();
    let cache = tempfile::tempdir().expect("tempdir");
    let err = downloader(&format!("http://127.0.0.1:{port}"), cache.path())
        .fetch_file("x-0123abcd.pth")
        .expect_err("offline");
    let text = err.to_string();
    assert!(matches!(err, DownloadError::Unreachable { .. }), "{text}");
    assert!(
        text.contains("offline") && text.contains("x-0123abcd.pth"),
        "{text}"
    );

    let (url, _) = serve(Vec::new(), Mode::Serve);
    let err = downloader(&url, cache.path())
        .fetch_file("missing-0123abcd.pth")
        .expect_err("404");
    assert!(
        matches!(err, DownloadError::Http { status: 404, .. }),
        "{err}"
    );
}

#[test]
fn the_cli_reports_a_corrupt_download() {
    let (url, _) = serve(payload(), Mode::Serve);
    let cache = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_resnet-serve"))
        .args([
            "weights",
            "download",
            "resnet50_swsl",
            "--base-url",
            &url,
            "--cache-dir",
        ])
        .arg(cache.path())
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let mut stderr = String::new();
    out.stderr
        .as_slice()
        .read_to_string(&mut stderr)
        .expect("utf8");
    assert!(stderr.contains("does not start with 16a12f1b"), "{stderr}");
}
