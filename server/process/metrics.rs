//! Prometheus metrics: one registry per server (so tests can run several), per-model
//! handles for the scheduler, and the text endpoint on its own port.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Every family the server exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// The process's own families (`process_resident_memory_bytes`, CPU seconds, open
    /// fds, threads) under their standard unprefixed names, as every Prometheus client
    /// library exports them, so stock dashboards and alerts find them; `registry` would
    /// prefix them `resnet_serve_`. Empty off Linux.
    process: Registry,
    requests: IntCounterVec,
    request_seconds: HistogramVec,
    queue_seconds: HistogramVec,
    compute_seconds: HistogramVec,
    batch_size: HistogramVec,
    padding_ratio: HistogramVec,
    batches: IntCounterVec,
    batch_slots: IntCounterVec,
    padded_slots: IntCounterVec,
    queue_depth: IntGaugeVec,
    worker_restarts: IntCounterVec,
    images_queued: IntCounterVec,
    nonfinite_inputs: IntCounterVec,
    refusals: IntCounterVec,
    auth_refusals: IntCounterVec,
    tls_handshake_failures: IntCounterVec,
    tls_reloads: IntCounterVec,
    /// Requests (unary calls and open streams) being served now.
    pub in_flight: IntGauge,
}

/// One model's view of the metrics, cheap to update from the scheduler.
pub struct ModelMetrics {
    /// Images accepted into the queue.
    pub images_queued: IntCounter,
    /// KServe images holding NaN or infinite values, computed as given.
    pub nonfinite_inputs: IntCounter,
    pub queue_seconds: Histogram,
    pub queue_depth: IntGauge,
    pub worker_restarts: IntCounter,
    compute_seconds: HistogramVec,
    batch_size: Histogram,
    padding_ratio: Histogram,
    batches: IntCounter,
    batch_slots: IntCounter,
    padded_slots: IntCounter,
    model: String,
    /// Cumulative totals for KServe's `ModelStatistics`.
    pub stats: crate::process::stats::InferStats,
}

impl ModelMetrics {
    /// A batch of `live` requests run at `size`.
    pub fn record_batch(&self, live: usize, size: usize) {
        self.batches.inc();
        self.batch_size.observe(size as f64);
        self.batch_slots.inc_by(size as u64);
        self.padded_slots.inc_by((size - live.min(size)) as u64);
        self.padding_ratio
            .observe((size - live.min(size)) as f64 / size.max(1) as f64);
    }

    pub fn observe_compute(&self, size: usize, seconds: f64) {
        self.compute_seconds
            .with_label_values(&[self.model.as_str(), &size.to_string()])
            .observe(seconds);
    }
}

fn histogram(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .unwrap_or_else(|e| panic!("metric {name} is malformed: {e}"))
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name} is malformed: {e}"))
}

impl Metrics {
    pub fn new() -> Self {
        let m = Metrics {
            registry: Registry::new_custom(Some("resnet_serve".into()), None)
                .unwrap_or_else(|e| panic!("registry: {e}")),
            process: Registry::new(),
            requests: counter(
                "requests_total",
                "Requests by model, RPC and gRPC status code.",
                &["model", "rpc", "code"],
            ),
            request_seconds: histogram(
                "request_duration_seconds",
                "End-to-end request latency.",
                &["model", "rpc"],
                &LATENCY_BUCKETS,
            ),
            queue_seconds: histogram(
                "queue_duration_seconds",
                "Time an image waited in its model's queue.",
                &["model"],
                &LATENCY_BUCKETS,
            ),
            compute_seconds: histogram(
                "compute_duration_seconds",
                "Forward-pass time per batch.",
                &["model", "batch_size"],
                &LATENCY_BUCKETS,
            ),
            batch_size: histogram(
                "batch_size",
                "Size each batch ran at (allowed sizes only).",
                &["model"],
                &BATCH_BUCKETS,
            ),
            padding_ratio: histogram(
                "batch_padding_ratio",
                "Fraction of each batch that was padding.",
                &["model"],
                &[0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0],
            ),
            batches: counter("batches_total", "Batches run.", &["model"]),
            batch_slots: counter(
                "batch_slots_total",
                "Batch slots run, padding included.",
                &["model"],
            ),
            padded_slots: counter(
                "padded_slots_total",
                "Batch slots that were padding.",
                &["model"],
            ),
            queue_depth: IntGaugeVec::new(
                Opts::new("queue_depth", "Images waiting per model."),
                &["model"],
            )
            .unwrap_or_else(|e| panic!("queue_depth: {e}")),
            worker_restarts: counter(
                "worker_restarts_total",
                "Model workers restarted after a panic.",
                &["model"],
            ),
            images_queued: counter(
                "images_queued_total",
                "Images accepted into a model's queue.",
                &["model"],
            ),
            nonfinite_inputs: counter(
                "kserve_nonfinite_inputs_total",
                "KServe FP32 images holding NaN or infinite values, computed as given (as Triton does).",
                &["model"],
            ),
            refusals: counter(
                "refusals_total",
                "Calls and images refused, by reason (a fixed set: never a client's string).",
                &["reason"],
            ),
            auth_refusals: counter(
                "auth_refusals_total",
                "Calls refused for their credentials: missing, invalid, scope.",
                &["reason"],
            ),
            tls_handshake_failures: counter(
                "tls_handshake_failures_total",
                "TLS handshakes that failed (error), were not finished in time (timeout), or were refused with too many under way (busy).",
                &["reason"],
            ),
            tls_reloads: counter(
                "tls_reloads_total",
                "Changed TLS certificate files taken (applied) or refused (failed).",
                &["result"],
            ),
            in_flight: IntGauge::new(
                "requests_in_flight",
                "Requests and open streams being served.",
            )
            .unwrap_or_else(|e| panic!("requests_in_flight: {e}")),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.requests.clone()),
            Box::new(m.request_seconds.clone()),
            Box::new(m.queue_seconds.clone()),
            Box::new(m.compute_seconds.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.padding_ratio.clone()),
            Box::new(m.batches.clone()),
            Box::new(m.batch_slots.clone()),
            Box::new(m.padded_slots.clone()),
            Box::new(m.queue_depth.clone()),
            Box::new(m.worker_restarts.clone()),
            Box::new(m.in_flight.clone()),
            Box::new(m.images_queued.clone()),
            Box::new(m.nonfinite_inputs.clone()),
            Box::new(m.refusals.clone()),
            Box::new(m.auth_refusals.clone()),
            Box::new(m.tls_handshake_failures.clone()),
            Box::new(m.tls_reloads.clone()),
        ];
        for c in collectors {
            // Names are fixed and distinct, so registration cannot collide.
            let _ = m.registry.register(c);
        }
        // Read from /proc/self at each scrape: the soak tool (`resnet-client soak`) and
        // operators watch the resident memory under load here.
        #[cfg(target_os = "linux")]
        let _ = m.process.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        m
    }

    /// One finished request: its outcome and end-to-end latency.
    pub fn observe_request(
        &self,
        model: &str,
        rpc: &str,
        code: &str,
        elapsed: std::time::Duration,
    ) {
        self.requests.with_label_values(&[model, rpc, code]).inc();
        self.request_seconds
            .with_label_values(&[model, rpc])
            .observe(elapsed.as_secs_f64());
    }

    /// Calls refused for their credentials, by reason.
    pub fn auth_refusals(&self) -> IntCounterVec {
        self.auth_refusals.clone()
    }

    /// Failed TLS handshakes, by reason (server/process/tls/handshake.rs).
    pub fn tls_handshake_failures(&self) -> IntCounterVec {
        self.tls_handshake_failures.clone()
    }

    /// Reloads of the TLS files, by result (server/process/tls/reload.rs).
    pub fn tls_reloads(&self) -> IntCounterVec {
        self.tls_reloads.clone()
    }

    /// The counter of refusals for one fixed `reason`.
    pub fn refusals(&self, reason: &'static str) -> IntCounter {
        self.refusals.with_label_values(&[reason])
    }

    pub fn for_model(&self, model: &str) -> Arc<ModelMetrics> {
        Arc::new(ModelMetrics {
            images_queued: self.images_queued.with_label_values(&[model]),
            nonfinite_inputs: self.nonfinite_inputs.with_label_values(&[model]),
            queue_seconds: self.queue_seconds.with_label_values(&[model]),
            queue_depth: self.queue_depth.with_label_values(&[model]),
            worker_restarts: self.worker_restarts.with_label_values(&[model]),
            compute_seconds: self.compute_seconds.clone(),
            batch_size: self.batch_size.with_label_values(&[model]),
            padding_ratio: self.padding_ratio.with_label_values(&[model]),
            batches: self.batches.with_label_values(&[model]),
            batch_slots: self.batch_slots.with_label_values(&[model]),
            padded_slots: self.padded_slots.with_label_values(&[model]),
            model: model.to_string(),
            stats: crate::process::stats::InferStats::default(),
        })
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let mut families = self.registry.gather();
        families.extend(self.process.gather());
        let _ = prometheus::TextEncoder::new().encode(&families, &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether the server takes traffic now: `Err` says why not ("models are loading",
/// "draining").
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Serves, as plain HTTP on `listener` until `shutdown` resolves: `GET /metrics`; `GET
/// /livez`, 200 while the process and its runtime answer (a liveness probe: it says
/// nothing of the models, so a long load never restarts the pod); `GET /readyz`, 200 only
/// when `ready` says so, else 503 with the reason (a readiness probe that works when the
/// gRPC port speaks TLS, which kubelet's gRPC probes cannot).
pub async fn serve(
    metrics: Metrics,
    listener: tokio::net::TcpListener,
    ready: Readiness,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let text = |status: StatusCode, body: String| {
        (
            status,
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; charset=utf-8",
            )],
            body,
        )
    };
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        m.render(),
                    )
                }
            }),
        )
        .route(
            "/livez",
            get(move || async move { text(StatusCode::OK, "alive\n".into()) }),
        )
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    match ready() {
                        Ok(()) => text(StatusCode::OK, "ready\n".into()),
                        Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Where the metrics endpoint listens by default.
pub fn default_addr() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9090))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the unlabelled series `name` in Prometheus text.
    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_process_resident_memory_is_exported_under_its_standard_name() {
        let text = Metrics::new().render();
        let rss =
            sample(&text, "process_resident_memory_bytes").unwrap_or_else(|| panic!("{text}"));
        // This test process holds at least a few MiB.
        assert!(rss > 1e6, "{rss}");
        assert!(
            text.contains("# TYPE process_resident_memory_bytes gauge"),
            "{text}"
        );
        for family in [
            "process_virtual_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
            "process_threads",
        ] {
            assert!(sample(&text, family).is_some(), "{family} missing: {text}");
        }
        // Not also under the server's prefix.
        assert!(!text.contains("resnet_serve_process_"), "{text}");
        // The server's own families keep theirs.
        assert!(
            sample(&text, "resnet_serve_requests_in_flight").is_some(),
            "{text}"
        );
    }
}
