//! Helpers shared by the integration tests: fixture paths and reading them.
#![allow(dead_code)]

pub mod testca;

use std::path::{Path, PathBuf};

use resnet_serve::model::synthetic::SyntheticWeights;
use resnet_serve::model::{Architecture, ParamSource};
use resnet_serve::weights::Checkpoint;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn fixture(rel: &str) -> PathBuf {
    fixtures().join(rel)
}

/// A fixture file of reference tensors (written by scripts/make_fixtures.py).
pub fn reference(rel: &str) -> Checkpoint {
    Checkpoint::open(fixture(rel)).unwrap_or_else(|e| panic!("fixture {rel}: {e}"))
}

/// max |a - b| / max |b|: the parity measure of the issue tracker.
pub fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

/// The seeded synthetic weights of the fixtures, saved as a user's safetensors checkpoint.
pub fn write_synthetic_checkpoint(arch: Architecture, path: &Path) {
    let source = SyntheticWeights::new(arch, 7);
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = source
        .names()
        .into_iter()
        .map(|n| {
            let shape = source.shape(&n).expect("shape");
            let data = source.read_f32(&n).expect("data");
            (
                n,
                shape,
                data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views = tensors.iter().map(|(n, shape, bytes)| {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .expect("view");
        (n.clone(), view)
    });
    safetensors::serialize_to_file(views, None, path).expect("write");
}

/// A zip bomb that is a real checkpoint: torch.save's `mixed_zip.pth` fixture with its
/// first storage member replaced by 1 GiB of zeros, deflated (~1 MiB on disk, ~2 s to
/// write). Returns the replaced member's name.
pub fn write_zip_bomb(path: &Path) -> String {
    use std::io::{Read, Write};
    let source = std::fs::File::open(fixture("checkpoints/mixed_zip.pth")).expect("fixture");
    let mut source = zip::ZipArchive::new(source).expect("zip");
    let mut out = zip::ZipWriter::new(std::fs::File::create(path).expect("create"));
    let mut replaced = None;
    for i in 0..source.len() {
        let mut member = source.by_index(i).expect("member");
        let name = member.name().expect("name").to_string();
        if replaced.is_none() && name.contains("/data/") {
            let deflated = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated)
                .compression_level(Some(9));
            out.start_file(&name, deflated).expect("start");
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..1024 {
                out.write_all(&zeros).expect("zeros");
            }
            replaced = Some(name);
        } else {
            let mut bytes = Vec::new();
            member.read_to_end(&mut bytes).expect("read");
            let stored = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored);
            out.start_file(&name, stored).expect("start");
            out.write_all(&bytes).expect("write");
        }
    }
    out.finish().expect("finish");
    replaced.expect("a storage member")
}

/// This process's peak resident set (VmHWM), in bytes.
pub fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

/// A gRPC request body: the 5-byte prefix (uncompressed, length) and the message.
pub fn grpc_body(request: &impl prost::Message) -> bytes::Bytes {
    framed(0, &request.encode_to_vec())
}

/// `message` behind a gRPC prefix with compression flag `flag` and its true length.
pub fn framed(flag: u8, message: &[u8]) -> bytes::Bytes {
    let mut wire = vec![flag];
    wire.extend_from_slice(&(message.len() as u32).to_be_bytes());
    wire.extend_from_slice(message);
    wire.into()
}

/// A call of `path` opened on a bare HTTP/2 connection (its own), headers sent, body
/// not: for requests no well-behaved client would send.
pub async fn bare_call(
    addr: &str,
    path: &str,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let authority = addr.trim_start_matches("http://");
    let tcp = tokio::net::TcpStream::connect(authority)
        .await
        .expect("connect");
    let (h2, connection) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut h2 = h2.ready().await.expect("ready");
    let head = http::Request::post(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    h2.send_request(head, false).expect("send")
}

/// The gRPC status a bare call ended with (from its trailers, or its headers for a
/// trailers-only answer), and the bytes of its response body.
pub async fn bare_status(response: h2::client::ResponseFuture) -> (tonic::Status, bytes::Bytes) {
    let response = response.await.expect("response");
    let status_of = |h: &http::HeaderMap| {
        h.get("grpc-status").map(|code| {
            let code = code.to_str().ok().and_then(|c| c.parse::<i32>().ok());
            let message = h
                .get("grpc-message")
                .and_then(|m| m.to_str().ok())
                .unwrap_or_default()
                .to_string();
            tonic::Status::new(tonic::Code::from(code.unwrap_or(2)), message)
        })
    };
    if let Some(s) = status_of(response.headers()) {
        return (s, bytes::Bytes::new());
    }
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.expect("trailers").unwrap_or_default();
    let status = status_of(&trailers)
        .unwrap_or_else(|| tonic::Status::unknown("no grpc-status in the trailers"));
    (status, data.into())
}

/// The Prometheus text of the metrics endpoint at `addr`.
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

/// This process's resident memory, in bytes (Linux).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// `GET path` on a plain HTTP/1.1 port: the status code and the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (code, body)
}
