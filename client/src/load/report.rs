//! What a load measured: the [`Recorder`] its workers share while it runs, and the
//! [`LoadReport`] made of it, as text, JSON or a CSV row.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use serde::Serialize;
use tokio::time::Instant;

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub mode: String,
    /// Connections the requests were spread over.
    pub connections: usize,
    /// `closed` or `open`.
    pub loop_kind: String,
    /// Concurrency (closed loop) or offered requests/s (open loop).
    pub offered: f64,
    pub transport: String,
    pub duration_s: f64,
    /// Requests counted: `ok + sum(errors)`.
    pub requests: u64,
    pub ok: u64,
    /// Failed requests by gRPC status code name.
    pub errors: BTreeMap<String, u64>,
    pub throughput_rps: f64,
    pub images_per_s: f64,
    pub latency_ms: Latency,
    /// Server-side batching during the run, when its metrics endpoint was given.
    pub server: Option<crate::metrics::BatchStats>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// Shared between workers: latencies (µs) and outcomes of measured requests.
pub(super) struct Recorder {
    pub(super) measure_from: Instant,
    pub(super) histogram: Mutex<Histogram<u64>>,
    pub(super) ok: AtomicU64,
    pub(super) errors: Mutex<BTreeMap<String, u64>>,
    pub(super) progress: ProgressBar,
}

impl Recorder {
    pub(super) fn record(&self, intended: Instant, result: Result<(), tonic::Code>) {
        if intended < self.measure_from {
            return; // warm-up
        }
        let micros = intended.elapsed().as_micros().max(1) as u64;
        if let Ok(mut h) = self.histogram.lock() {
            h.saturating_record(micros);
        }
        match result {
            Ok(()) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(code) => {
                if let Ok(mut e) = self.errors.lock() {
                    *e.entry(code_name(code)).or_insert(0) += 1;
                }
            }
        }
        self.progress.inc(1);
    }
}

pub(crate) fn code_name(code: tonic::Code) -> String {
    format!("{code:?}").chars().fold(String::new(), |mut s, c| {
        if c.is_uppercase() && !s.is_empty() {
            s.push('_');
        }
        s.push(c.to_ascii_uppercase());
        s
    })
}

/// A latency histogram in microseconds: 1 µs to an hour, 3 significant digits.
pub(crate) fn latency_histogram() -> Histogram<u64> {
    // These bounds are valid, so this cannot fail.
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|e| panic!("histogram bounds: {e}"))
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} ({}, {} connection{}), {:.1} s",
            self.mode,
            self.transport,
            self.connections,
            if self.connections == 1 { "" } else { "s" },
            self.duration_s
        )?;
        writeln!(
            f,
            "requests: {} ({} ok, {} failed)   throughput: {:.2} req/s, {:.2} images/s",
            self.requests,
            self.ok,
            self.requests - self.ok,
            self.throughput_rps,
            self.images_per_s
        )?;
        let l = &self.latency_ms;
        writeln!(
            f,
            "latency ms: p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.1}",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        )?;
        for (code, n) in &self.errors {
            writeln!(f, "errors {code}: {n}")?;
        }
        if let Some(s) = &self.server {
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

impl LoadReport {
    pub const CSV_HEADER: &'static str =
        "loop,offered,transport,duration_s,requests,ok,failed,throughput_rps,images_per_s,p50_ms,p90_ms,p99_ms,p999_ms,max_ms,mean_ms,server_batches,server_mean_batch";

    pub fn csv_row(&self) -> String {
        let l = &self.latency_ms;
        format!(
            "{},{},{},{:.3},{},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{},{}",
            self.loop_kind,
            self.offered,
            self.transport,
            self.duration_s,
            self.requests,
            self.ok,
            self.requests - self.ok,
            self.throughput_rps,
            self.images_per_s,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            l.mean,
            self.server
                .as_ref()
                .map_or(String::new(), |s| format!("{:.0}", s.batches)),
            self.server
                .as_ref()
                .map_or(String::new(), |s| format!("{:.3}", s.mean_batch_size)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_grpc_style() {
        assert_eq!(
            code_name(tonic::Code::ResourceExhausted),
            "RESOURCE_EXHAUSTED"
        );
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(
            code_name(tonic::Code::DeadlineExceeded),
            "DEADLINE_EXCEEDED"
        );
    }
}
