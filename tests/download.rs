//! The weights download against a real HTTP server on 127.0.0.1: verified, resumable,
//! corrupt files refused, offline reported clearly.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use resnet_serve::model::ModelName;
use resnet_serve::weights::download::{DownloadError, Downloader};
use resnet_serve::weights::hub::sha256_hex;

/// How the test server misbehaves.
#[derive(Clone, Copy)]
enum Mode {
    Serve,
    /// The first response stops after this many body bytes; later ones honour `Range`.
    DropFirstAfter(usize),
}

/// Serves `body` for every path; counts requests. Stops with the test process.
fn serve(body: Vec<u8>, mode: Mode) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            handle(stream, &body, mode, n);
        }
    });
    (url, hits)
}

fn handle(mut stream: TcpStream, body: &[u8], mode: Mode, request_no: usize) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut start = 0usize;
    let mut path = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if line.starts_with("GET ") {
            path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
            start = v.trim().trim_end_matches('-').parse().unwrap_or(0);
        }
    }
    if path.contains("missing") {
        let _ = stream
            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        return;
    }
    let rest = &body[start.min(body.len())..];
    let status = if start > 0 {
        "206 Partial Content"
    } else {
        "200 OK"
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        rest.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let cut = match mode {
        Mode::DropFirstAfter(n) if request_no == 0 => n.min(rest.len()),
        _ => rest.len(),
    };
    let _ = stream.write_all(&rest[..cut]);
}

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
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
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
