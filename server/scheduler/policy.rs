//! The batching policy, in one place: which fixed batch sizes exist, how long the first
//! waiting request may wait for company, and how many requests may queue.
//!
//! A batch is dispatched when the largest allowed size is full, or when a worker is free
//! and the oldest waiting request has waited `max_queue_delay`; while every worker is
//! busy it keeps filling (see [`super::batcher::form_batch`]). It then runs at the
//! smallest allowed size that holds what is waiting, padded with zeros. Every batch
//! thus has one of a few known shapes (the kernels, plans and CUDA graphs for them are
//! warm), as in TF Serving's `allowed_batch_sizes` and Triton's dynamic batcher.

use std::time::Duration;

/// How many batches of the largest size may wait per model unless the operator says
/// otherwise (TF Serving's `max_enqueued_batches` idea). A queue is a promise of service
/// time: four full batches is already seconds on a CPU, and each waiting image holds a
/// 602 KB tensor, so a deeper default queue only turns overload into memory and latency
/// (measured in RELIABILITY.md "Soak": 256 images gave 1.54x the loaded RSS and a 10 s
/// p99 under 10x overload; 128 gave 1.33x and 5.7 s).
pub const DEFAULT_QUEUED_BATCHES: usize = 4;

/// The queue capacity when none is configured: [`DEFAULT_QUEUED_BATCHES`] of the largest
/// allowed size (128 images for the default sizes).
pub fn default_queue_capacity(sizes: &[usize]) -> usize {
    sizes
        .iter()
        .copied()
        .max()
        .unwrap_or(1)
        .max(1)
        .saturating_mul(DEFAULT_QUEUED_BATCHES)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("allowed batch sizes must be a non-empty list of positive sizes")]
    NoSizes,
    #[error("the queue capacity ({capacity}) must hold at least one largest batch ({largest})")]
    QueueTooSmall { capacity: usize, largest: usize },
}

/// How one model's requests are grouped into batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Ascending, de-duplicated, all > 0.
    sizes: Vec<usize>,
    /// How long the first request of a batch may wait for others.
    pub max_queue_delay: Duration,
    /// Images that may wait per model; past it requests are refused at once.
    pub queue_capacity: usize,
}

impl BatchPolicy {
    pub fn new(
        sizes: &[usize],
        max_queue_delay: Duration,
        queue_capacity: usize,
    ) -> Result<Self, PolicyError> {
        let mut sizes: Vec<usize> = sizes.iter().copied().filter(|&s| s > 0).collect();
        sizes.sort_unstable();
        sizes.dedup();
        let largest = *sizes.last().ok_or(PolicyError::NoSizes)?;
        if queue_capacity < largest {
            return Err(PolicyError::QueueTooSmall {
                capacity: queue_capacity,
                largest,
            });
        }
        Ok(BatchPolicy {
            sizes,
            max_queue_delay,
            queue_capacity,
        })
    }

    pub fn allowed_sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// The largest allowed batch: a batch this full is dispatched at once.
    pub fn max_batch(&self) -> usize {
        self.sizes.last().copied().unwrap_or(1)
    }

    /// The batch size `waiting` requests run at: the smallest allowed size that holds
    /// them (at most the largest; the rest wait for the next batch).
    pub fn batch_size_for(&self, waiting: usize) -> usize {
        self.sizes
            .iter()
            .copied()
            .find(|&s| s >= waiting)
            .unwrap_or_else(|| self.max_batch())
    }
}

impl Default for BatchPolicy {
    fn default() -> Self {
        BatchPolicy {
            sizes: vec![1, 2, 4, 8, 16, 32],
            max_queue_delay: Duration::from_millis(5),
            queue_capacity: default_queue_capacity(&[32]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_queue_holds_four_largest_batches() {
        assert_eq!(default_queue_capacity(&[1, 2, 4, 8, 16, 32]), 128);
        assert_eq!(default_queue_capacity(&[64, 8]), 256);
        assert_eq!(default_queue_capacity(&[]), DEFAULT_QUEUED_BATCHES);
        assert_eq!(BatchPolicy::default().queue_capacity, 128);
        let sizes = [3, 7];
        assert!(BatchPolicy::new(&sizes, Duration::ZERO, default_queue_capacity(&sizes)).is_ok());
    }

    #[test]
    fn smallest_allowed_size_that_holds_the_waiting() {
        let p = BatchPolicy::new(&[8, 1, 4, 2, 4], Duration::from_millis(5), 64).expect("valid");
        assert_eq!(p.allowed_sizes(), &[1, 2, 4, 8]);
        assert_eq!(p.batch_size_for(1), 1);
        assert_eq!(p.batch_size_for(3), 4);
        assert_eq!(p.batch_size_for(5), 8);
        assert_eq!(p.batch_size_for(8), 8);
        assert_eq!(p.batch_size_for(20), 8);
        assert_eq!(p.max_batch(), 8);
    }

    #[test]
    fn invalid_policies_are_refused() {
        assert_eq!(
            BatchPolicy::new(&[], Duration::ZERO, 8),
            Err(PolicyError::NoSizes)
        );
        assert_eq!(
            BatchPolicy::new(&[0], Duration::ZERO, 8),
            Err(PolicyError::NoSizes)
        );
        assert_eq!(
            BatchPolicy::new(&[1, 16], Duration::ZERO, 8),
            Err(PolicyError::QueueTooSmall {
                capacity: 8,
                largest: 16
            })
        );
    }
}
