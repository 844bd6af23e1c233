//! The Prometheus endpoint of a server scraped over plain HTTP/1.1, and samples read from
//! its text.

use std::net::SocketAddr;

/// The Prometheus text of the metrics endpoint at `addr`.
pub async fn scrape(addr: SocketAddr) -> String {
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

/// As [`scrape`], for callers outside a runtime; `addr` is `host:port`.
pub fn scrape_blocking(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// The sum of the samples whose lines start with `prefix` (e.g.
/// `resnet_serve_requests_total{` for every series of a family, or a prefix of one
/// series' labels).
pub fn sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The value of exactly the series `series` (name and labels, e.g.
/// `resnet_serve_tls_handshake_failures_total{reason="error"}`), if exported.
pub fn series(text: &str, series: &str) -> Option<f64> {
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
}
