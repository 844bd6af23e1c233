//! A weights host on loopback: plain HTTP/1.1 serving one body for every path (404 for
//! paths naming `missing`), honouring `Range`, and able to cut its first answer short,
//! for the download tests.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

/// How the test server misbehaves.
#[derive(Clone, Copy)]
pub enum Mode {
    Serve,
    /// The first response stops after this many body bytes; later ones honour `Range`.
    DropFirstAfter(usize),
}

/// Serves `body` for every path; counts requests. Stops with the test process.
pub fn serve(body: Vec<u8>, mode: Mode) -> (String, Arc<AtomicUsize>) {
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
