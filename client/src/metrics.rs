//! Reads the server's batching statistics from its Prometheus endpoint, so a load
//! report can say how the server batched what it was sent.

use std::collections::BTreeMap;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Counters summed over every model the server runs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BatchStats {
    pub batches: f64,
    /// Batch slots run, padding included.
    pub slots: f64,
    pub padded_slots: f64,
    pub mean_batch_size: f64,
    /// Mean real (non-padding) images per batch.
    pub mean_live_per_batch: f64,
    /// Batches run at each size (`le` bucket -> count, not cumulative).
    pub batch_sizes: BTreeMap<u32, f64>,
    /// Mean time the server spent on a request, receipt to reply (so the client's
    /// latency minus this is the network and the client itself).
    pub mean_request_ms: f64,
    /// Mean time an image waited in the model's queue for its batch.
    pub mean_queue_ms: f64,
    /// Mean forward-pass time per batch (staging and copies included).
    pub mean_compute_ms: f64,
    #[serde(skip)]
    sums: Timings,
}

/// Sums and counts of the server's latency histograms (seconds).
#[derive(Debug, Clone, Copy, Default)]
struct Timings {
    request: (f64, f64),
    queue: (f64, f64),
    compute: (f64, f64),
}

impl Timings {
    fn since(&self, before: &Timings) -> Timings {
        let d = |a: (f64, f64), b: (f64, f64)| (a.0 - b.0, a.1 - b.1);
        Timings {
            request: d(self.request, before.request),
            queue: d(self.queue, before.queue),
            compute: d(self.compute, before.compute),
        }
    }

    /// Means in milliseconds: request, queue, compute.
    fn means_ms(&self) -> (f64, f64, f64) {
        let ms = |(sum, count): (f64, f64)| {
            if count > 0.0 {
                1000.0 * sum / count
            } else {
                0.0
            }
        };
        (ms(self.request), ms(self.queue), ms(self.compute))
    }

    /// Adds `value` when `name` is one of the three histograms' `_sum` or `_count`.
    fn add(&mut self, name: &str, value: f64) {
        let slot = match name.split('{').next().unwrap_or(name) {
            "resnet_serve_request_duration_seconds_sum" => &mut self.request.0,
            "resnet_serve_request_duration_seconds_count" => &mut self.request.1,
            "resnet_serve_queue_duration_seconds_sum" => &mut self.queue.0,
            "resnet_serve_queue_duration_seconds_count" => &mut self.queue.1,
            "resnet_serve_compute_duration_seconds_sum" => &mut self.compute.0,
            "resnet_serve_compute_duration_seconds_count" => &mut self.compute.1,
            _ => return,
        };
        *slot += value;
    }
}

impl BatchStats {
    /// What happened between `before` and `self`.
    pub fn since(&self, before: &BatchStats) -> BatchStats {
        let batches = self.batches - before.batches;
        let slots = self.slots - before.slots;
        let padded = self.padded_slots - before.padded_slots;
        let batch_sizes = self
            .batch_sizes
            .iter()
            .map(|(k, v)| (*k, v - before.batch_sizes.get(k).copied().unwrap_or(0.0)))
            .filter(|(_, v)| *v > 0.0)
            .collect();
        let sums = self.sums.since(&before.sums);
        let (mean_request_ms, mean_queue_ms, mean_compute_ms) = sums.means_ms();
        BatchStats {
            mean_request_ms,
            mean_queue_ms,
            mean_compute_ms,
            sums,
            batches,
            slots,
            padded_slots: padded,
            mean_batch_size: if batches > 0.0 { slots / batches } else { 0.0 },
            mean_live_per_batch: if batches > 0.0 {
                (slots - padded) / batches
            } else {
                0.0
            },
            batch_sizes,
        }
    }

    /// Parses the counters out of Prometheus text.
    pub fn parse(text: &str) -> BatchStats {
        let mut s = BatchStats::default();
        let mut cumulative: BTreeMap<u32, f64> = BTreeMap::new();
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            s.sums.add(name, value);
            if name.starts_with("resnet_serve_batches_total") {
                s.batches += value;
            } else if name.starts_with("resnet_serve_batch_slots_total") {
                s.slots += value;
            } else if name.starts_with("resnet_serve_padded_slots_total") {
                s.padded_slots += value;
            } else if name.starts_with("resnet_serve_batch_size_bucket") {
                let le = name.split("le=\"").nth(1).and_then(|r| r.split('"').next());
                if let Some(Ok(le)) = le.map(|l| l.parse::<f64>()) {
                    *cumulative.entry(le as u32).or_insert(0.0) += value;
                }
            }
        }
        let mut previous = 0.0;
        for (le, c) in cumulative {
            s.batch_sizes.insert(le, c - previous);
            previous = c;
        }
        s.mean_batch_size = if s.batches > 0.0 {
            s.slots / s.batches
        } else {
            0.0
        };
        s.mean_live_per_batch = if s.batches > 0.0 {
            (s.slots - s.padded_slots) / s.batches
        } else {
            0.0
        };
        (s.mean_request_ms, s.mean_queue_ms, s.mean_compute_ms) = s.sums.means_ms();
        s
    }
}

impl std::fmt::Display for BatchStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "server: {:.0} batches, mean size {:.2} ({:.2} real images, {:.1}% padding)",
            self.batches,
            self.mean_batch_size,
            self.mean_live_per_batch,
            if self.slots > 0.0 {
                100.0 * self.padded_slots / self.slots
            } else {
                0.0
            }
        )?;
        let sizes: Vec<String> = self
            .batch_sizes
            .iter()
            .map(|(k, v)| format!("{k}: {v:.0}"))
            .collect();
        writeln!(f, "server batch sizes: {}", sizes.join(", "))?;
        writeln!(
            f,
            "server time: {:.2} ms per request, {:.2} ms queued per image, {:.2} ms compute per batch",
            self.mean_request_ms, self.mean_queue_ms, self.mean_compute_ms
        )
    }
}

/// GETs `/metrics` from `addr` (`host:port`) and parses the batching counters.
pub async fn scrape(addr: &str) -> std::io::Result<BatchStats> {
    Ok(BatchStats::parse(&get(addr).await?))
}

/// The text of a plain-HTTP GET of `target`: `http://host:port/path`, or `host:port`
/// for `/metrics` there. Headers are left in front of the body (no metric line looks
/// like one).
pub async fn get(target: &str) -> std::io::Result<String> {
    let rest = target.strip_prefix("http://").unwrap_or(target);
    let (addr, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/metrics"),
    };
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    Ok(text)
}

/// The server's resident memory in bytes (`process_resident_memory_bytes`), when its
/// metrics text has it.
pub fn resident_memory(text: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix("process_resident_memory_bytes ")?
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counters_and_de_cumulates_buckets() {
        let text = "# TYPE x counter\n\
resnet_serve_batches_total{model=\"a\"} 10\n\
resnet_serve_batch_slots_total{model=\"a\"} 24\n\
resnet_serve_padded_slots_total{model=\"a\"} 4\n\
resnet_serve_batch_size_bucket{model=\"a\",le=\"1\"} 2\n\
resnet_serve_batch_size_bucket{model=\"a\",le=\"2\"} 6\n\
resnet_serve_batch_size_bucket{model=\"a\",le=\"4\"} 10\n\
resnet_serve_batch_size_bucket{model=\"a\",le=\"+Inf\"} 10\n\
resnet_serve_request_duration_seconds_sum{model=\"a\",rpc=\"classify\"} 0.5\n\
resnet_serve_request_duration_seconds_count{model=\"a\",rpc=\"classify\"} 20\n\
resnet_serve_queue_duration_seconds_sum{model=\"a\"} 0.024\n\
resnet_serve_queue_duration_seconds_count{model=\"a\"} 20\n\
resnet_serve_compute_duration_seconds_sum{model=\"a\",batch_size=\"4\"} 0.03\n\
resnet_serve_compute_duration_seconds_count{model=\"a\",batch_size=\"4\"} 4\n\
resnet_serve_compute_duration_seconds_sum{model=\"a\",batch_size=\"2\"} 0.02\n\
resnet_serve_compute_duration_seconds_count{model=\"a\",batch_size=\"2\"} 6\n";
        let s = BatchStats::parse(text);
        assert_eq!((s.batches, s.slots, s.padded_slots), (10.0, 24.0, 4.0));
        assert_eq!(s.batch_sizes.get(&1), Some(&2.0));
        assert_eq!(s.batch_sizes.get(&2), Some(&4.0));
        assert_eq!(s.batch_sizes.get(&4), Some(&4.0));
        assert!((s.mean_live_per_batch - 2.0).abs() < 1e-9);
        let ms = (s.mean_request_ms, s.mean_queue_ms, s.mean_compute_ms);
        assert!(
            (ms.0 - 25.0).abs() < 1e-9 && (ms.1 - 1.2).abs() < 1e-9,
            "{ms:?}"
        );
        assert!(
            (ms.2 - 5.0).abs() < 1e-9,
            "compute summed over batch sizes: {ms:?}"
        );
        let d = s.since(&BatchStats::default());
        assert_eq!(d.batches, 10.0);
        assert!((d.mean_compute_ms - 5.0).abs() < 1e-9);
        assert_eq!(s.since(&s).mean_request_ms, 0.0, "no requests in between");
    }

    #[test]
    fn resident_memory_is_read_from_its_standard_series() {
        let text = "HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n\
# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
# TYPE process_resident_memory_bytes gauge\n\
process_resident_memory_bytes 123457536\n\
process_virtual_memory_bytes 9e9\n";
        assert_eq!(resident_memory(text), Some(123457536.0));
        assert_eq!(
            resident_memory("resnet_serve_process_resident_memory_bytes 5\n"),
            None
        );
    }
}
