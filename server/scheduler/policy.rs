//! The batching policy, in one place: which fixed batch sizes exist, how long the first
//! waiting request may wait for company, and how many requests may queue.
//!
//! A batch closes ([`BatchPolicy::next_step`]) when the largest allowed size is full, when
//! its queue has closed, or when a worker is free and the oldest waiting request has
//! waited `max_queue_delay`; while every worker is busy it keeps filling: closing it early
//! would leave it waiting anyway, short of images (and padded with zeros) while later
//! arrivals trail behind in the next one. It then runs ([`BatchPolicy::run_size`]) at the
//! smallest allowed size that holds what is waiting, padded with zeros. Every batch thus
//! has one of a few known shapes (the kernels, plans and CUDA graphs for them are warm), as
//! in TF Serving's `allowed_batch_sizes` and Triton's dynamic batcher. These are pure
//! functions of the batch's state and the clock; [`super::batcher`] and [`super::worker`]
//! only carry them out.

use std::time::Duration;

use tokio::time::Instant;

/// What the batch being formed does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// It takes no more images: it runs as soon as a worker takes it.
    Close,
    /// It stays open for more images (and for a worker, if it has none); with a worker
    /// it closes at `until` at the latest.
    Fill { until: Option<Instant> },
}

/// The state of the batch being formed, as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Forming {
    /// Live images in it.
    pub images: usize,
    /// When its first image was queued.
    pub first_enqueued: Instant,
    /// A worker is free to run it.
    pub worker_free: bool,
    /// No more images can come (the model is shutting down).
    pub queue_closed: bool,
}

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

    /// The size a closed batch of `live` images runs at, padding included: never fewer
    /// rows than images.
    pub fn run_size(&self, live: usize) -> usize {
        self.batch_size_for(live).max(live)
    }

    /// Whether the batch being formed closes now, or until when it keeps filling.
    pub fn next_step(&self, batch: Forming, now: Instant) -> Step {
        if batch.images >= self.max_batch() || batch.queue_closed {
            return Step::Close;
        }
        if !batch.worker_free {
            return Step::Fill { until: None };
        }
        let dispatch_at = batch.first_enqueued + self.max_queue_delay;
        if now >= dispatch_at {
            Step::Close
        } else {
            Step::Fill {
                until: Some(dispatch_at),
            }
        }
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

    fn forming(images: usize, first_enqueued: Instant, worker_free: bool) -> Forming {
        Forming {
            images,
            first_enqueued,
            worker_free,
            queue_closed: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_closes_when_full_or_when_a_free_worker_waited_the_delay() {
        let p = BatchPolicy::new(&[1, 2, 4], Duration::from_millis(5), 16).expect("valid");
        let first = Instant::now();
        let deadline = first + Duration::from_millis(5);
        // A free worker: the batch fills until the first image has waited the delay.
        assert_eq!(
            p.next_step(forming(1, first, true), Instant::now()),
            Step::Fill {
                until: Some(deadline)
            }
        );
        tokio::time::advance(Duration::from_millis(4)).await;
        assert_eq!(
            p.next_step(forming(3, first, true), Instant::now()),
            Step::Fill {
                until: Some(deadline)
            }
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            p.next_step(forming(3, first, true), Instant::now()),
            Step::Close
        );
        // Every worker busy: it stays open past the delay, with no deadline of its own.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            p.next_step(forming(3, first, false), Instant::now()),
            Step::Fill { until: None }
        );
        // Full closes at once, with or without a worker, before any delay.
        let now = Instant::now();
        assert_eq!(p.next_step(forming(4, now, false), now), Step::Close);
        assert_eq!(p.next_step(forming(4, now, true), now), Step::Close);
        // So does a closed queue: nothing more can come.
        let closed = Forming {
            queue_closed: true,
            ..forming(1, now, false)
        };
        assert_eq!(p.next_step(closed, now), Step::Close);
    }

    #[test]
    fn a_zero_delay_closes_as_soon_as_a_worker_is_free() {
        let p = BatchPolicy::new(&[1, 8], Duration::ZERO, 8).expect("valid");
        let now = Instant::now();
        assert_eq!(p.next_step(forming(1, now, true), now), Step::Close);
        assert_eq!(
            p.next_step(forming(1, now, false), now),
            Step::Fill { until: None }
        );
    }

    #[test]
    fn a_batch_runs_at_the_smallest_size_that_holds_it() {
        let p = BatchPolicy::new(&[1, 4, 8], Duration::ZERO, 8).expect("valid");
        assert_eq!(p.run_size(1), 1);
        assert_eq!(p.run_size(2), 4, "padded with zeros to an allowed size");
        assert_eq!(p.run_size(5), 8);
        assert_eq!(p.run_size(9), 9, "never fewer rows than images");
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
