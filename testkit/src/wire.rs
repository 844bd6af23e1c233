//! Calls written by hand: gRPC on a bare HTTP/2 connection, for requests no
//! well-behaved client would send, and `GET` on a plain HTTP/1.1 port (the probes).

use std::net::SocketAddr;

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

/// `GET path` on a plain HTTP/1.1 port: the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
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
