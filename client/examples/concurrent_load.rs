//! C concurrent clients each send R single-image Classify requests (an encoded image
//! file) to a running server, then print throughput and the server's batch-size
//! histogram from its metrics endpoint.
//!
//! `cargo run --release -p resnet-client --example concurrent_load -- http://127.0.0.1:50051 127.0.0.1:9090 IMAGE 8 40`

use std::time::Instant;

use resnet_client::proto::classifier_client::ClassifierClient;
use resnet_client::proto::{image, ClassifyRequest, EncodedImage, Image};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, metrics, image, clients, requests] = &args[..] else {
        return Err(
            "usage: concurrent_load URL METRICS_ADDR IMAGE CLIENTS REQUESTS_PER_CLIENT".into(),
        );
    };
    let data = std::fs::read(image)?;
    let (clients, requests): (usize, usize) = (clients.parse()?, requests.parse()?);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut client = ClassifierClient::connect(url.clone()).await?;
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(requests);
            for _ in 0..requests {
                let t = Instant::now();
                let req = ClassifyRequest {
                    images: vec![Image {
                        kind: Some(image::Kind::Encoded(EncodedImage { data: data.clone() })),
                    }],
                    ..Default::default()
                };
                client.classify(req).await?;
                latencies.push(t.elapsed().as_secs_f64());
            }
            Ok::<_, tonic::Status>(latencies)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    let pct = |p: f64| all[((all.len() - 1) as f64 * p) as usize] * 1000.0;
    println!(
        "{} requests from {clients} clients in {elapsed:.1} s: {:.2} req/s; latency p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms",
        all.len(),
        all.len() as f64 / elapsed,
        pct(0.5),
        pct(0.9),
        pct(0.99)
    );
    let mut s = tokio::net::TcpStream::connect(metrics).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    for line in text.lines() {
        if line.starts_with("resnet_serve_batch_size_bucket")
            || line.starts_with("resnet_serve_batches_total")
            || line.starts_with("resnet_serve_padded_slots_total")
            || line.starts_with("resnet_serve_batch_slots_total")
        {
            println!("{line}");
        }
    }
    Ok(())
}
