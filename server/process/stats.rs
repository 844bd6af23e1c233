//! Triton-style cumulative inference statistics per model (what KServe's
//! `ModelStatistics` reports): counts and nanoseconds for successful and failed requests,
//! queueing, and the three phases of each batch (assembling the input, the forward pass,
//! handing results back), plus the same phases per batch size. Prometheus histograms
//! ([`crate::process::metrics`]) answer "how is it distributed"; these answer "how much in total".

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A count and the total time it took.
#[derive(Debug, Default)]
pub struct Tally {
    count: AtomicU64,
    ns: AtomicU64,
}

impl Tally {
    pub fn add(&self, count: u64, total: Duration) {
        self.count.fetch_add(count, Ordering::Relaxed);
        self.ns.fetch_add(
            total.as_nanos().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    /// `(count, nanoseconds)`.
    pub fn get(&self) -> (u64, u64) {
        (
            self.count.load(Ordering::Relaxed),
            self.ns.load(Ordering::Relaxed),
        )
    }
}

/// Per-batch-size execution totals: `(executions, [input, infer, output] ns)`.
pub type BatchTotals = BTreeMap<usize, (u64, [u64; 3])>;

/// One model's totals since it was loaded.
#[derive(Debug, Default)]
pub struct InferStats {
    /// Requests answered, and their end-to-end time.
    pub success: Tally,
    /// Requests that named this model and failed.
    pub fail: Tally,
    /// Per image: time between queueing and joining a batch.
    pub queue: Tally,
    /// Per image: its batch's input assembly, forward pass and output hand-back.
    pub compute_input: Tally,
    pub compute_infer: Tally,
    pub compute_output: Tally,
    /// Images computed (padding excluded).
    pub inference_count: AtomicU64,
    /// Batches run.
    pub execution_count: AtomicU64,
    /// Milliseconds since the Unix epoch at the last finished batch.
    pub last_inference_ms: AtomicU64,
    batches: Mutex<BatchTotals>,
}

impl InferStats {
    /// One batch of `live` images run at `size`, with the time of each phase.
    pub fn record_batch(
        &self,
        live: usize,
        size: usize,
        input: Duration,
        infer: Duration,
        output: Duration,
    ) {
        let live_n = live as u64;
        self.compute_input.add(live_n, input * live as u32);
        self.compute_infer.add(live_n, infer * live as u32);
        self.compute_output.add(live_n, output * live as u32);
        self.inference_count.fetch_add(live_n, Ordering::Relaxed);
        self.execution_count.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.last_inference_ms.store(now, Ordering::Relaxed);
        let ns = |d: Duration| d.as_nanos().min(u64::MAX as u128) as u64;
        if let Ok(mut b) = self.batches.lock() {
            let e = b.entry(size).or_insert((0, [0; 3]));
            e.0 += 1;
            e.1[0] += ns(input);
            e.1[1] += ns(infer);
            e.1[2] += ns(output);
        }
    }

    /// A finished request that named this model.
    pub fn record_request(&self, ok: bool, elapsed: Duration) {
        if ok {
            self.success.add(1, elapsed);
        } else {
            self.fail.add(1, elapsed);
        }
    }

    pub fn batch_totals(&self) -> BatchTotals {
        self.batches.lock().map(|b| b.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_count_images_per_phase_and_executions_per_size() {
        let s = InferStats::default();
        let ms = Duration::from_millis;
        s.record_batch(3, 4, ms(1), ms(10), ms(2));
        s.record_batch(1, 1, ms(1), ms(5), ms(1));
        assert_eq!(s.compute_infer.get(), (4, 35_000_000));
        assert_eq!(s.inference_count.load(Ordering::Relaxed), 4);
        assert_eq!(s.execution_count.load(Ordering::Relaxed), 2);
        let b = s.batch_totals();
        assert_eq!(b[&4], (1, [1_000_000, 10_000_000, 2_000_000]));
        assert_eq!(b[&1].0, 1);
        s.record_request(true, ms(3));
        s.record_request(false, ms(1));
        assert_eq!(s.success.get(), (1, 3_000_000));
        assert_eq!(s.fail.get().0, 1);
    }
}
