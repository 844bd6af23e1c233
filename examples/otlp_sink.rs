//! A real OTLP/gRPC trace receiver for measurements: it accepts every export, counts
//! the spans, and prints the count when stopped (SIGTERM or Ctrl-C). What
//! `scripts/ab_secure.sh` points the server's exporter at, so that the cost measured is
//! that of exporting to a collector, not of failing to reach one.
//!
//!     cargo run --release --example otlp_sink -- 127.0.0.1:4317

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

#[derive(Default)]
struct Sink {
    spans: AtomicU64,
    exports: AtomicU64,
}

struct Service(Arc<Sink>);

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.spans.fetch_add(spans as u64, Ordering::Relaxed);
        self.0.exports.fetch_add(1, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: std::net::SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4317".into())
        .parse()?;
    let sink = Arc::new(Sink::default());
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    eprintln!("otlp_sink listening on {addr}");
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Service(sink.clone())))
        .serve_with_shutdown(addr, stop)
        .await?;
    println!(
        "spans={} exports={}",
        sink.spans.load(Ordering::Relaxed),
        sink.exports.load(Ordering::Relaxed)
    );
    Ok(())
}
