//! The batcher task: forms batches from a model's queues by [`BatchPolicy`] and hands
//! each to a free worker; the next one fills while the workers compute. High-priority
//! jobs are always taken before normal ones.

use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};
use tokio::time::{sleep_until, Instant};

use super::policy::{BatchPolicy, Forming, Step};
use super::Job;
use crate::process::metrics::ModelMetrics;

/// A model's waiting jobs, in two priority levels.
pub struct Queues {
    pub high: mpsc::Receiver<Job>,
    pub normal: mpsc::Receiver<Job>,
}

impl Queues {
    /// The next job, high priority first; `None` once both queues are closed and empty.
    async fn recv(&mut self) -> Option<Job> {
        tokio::select! {
            biased;
            Some(job) = self.high.recv() => Some(job),
            job = self.normal.recv() => match job {
                Some(job) => Some(job),
                // The handle closes both at once; drain what high priority still holds.
                None => self.high.recv().await,
            },
        }
    }

    pub fn len(&self) -> usize {
        self.high.len() + self.normal.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Jobs for one forward pass. The worker drops any that died while it was busy and
/// then runs the smallest allowed size that holds the rest.
pub struct Batch {
    pub jobs: Vec<Job>,
}

/// Worker threads waiting for a batch: each adds a permit before it waits, and a batch
/// is only closed once it can take one. Shared by a model's batcher and its replicas.
pub type FreeWorkers = Arc<Semaphore>;

/// Waits for a first live job, then gathers more until the policy closes the batch
/// ([`BatchPolicy::next_step`]), taking a free worker's permit meanwhile. Dead jobs are
/// dropped on arrival. Returns the jobs with the taken worker's permit spent; `None`
/// once the queue is closed and empty.
pub async fn form_batch(
    rx: &mut Queues,
    policy: &BatchPolicy,
    free: &Semaphore,
) -> Option<Vec<Job>> {
    let first = loop {
        let job = rx.recv().await?;
        if !job.is_dead(Instant::now()) {
            break job;
        }
    };
    let first_enqueued = first.enqueued;
    let mut jobs = vec![first];
    let mut worker = None;
    let mut queue_closed = false;
    loop {
        let forming = Forming {
            images: jobs.len(),
            first_enqueued,
            worker_free: worker.is_some(),
            queue_closed,
        };
        let until = match policy.next_step(forming, Instant::now()) {
            Step::Close => break,
            Step::Fill { until } => until,
        };
        tokio::select! {
            // Jobs already waiting are taken before the worker or the timer is looked at.
            biased;
            job = rx.recv() => match job {
                Some(job) if !job.is_dead(Instant::now()) => jobs.push(job),
                Some(_) => {}
                None => queue_closed = true,
            },
            permit = free.acquire(), if worker.is_none() => match permit {
                Ok(p) => worker = Some(p),
                // Closed: no worker will ever come; let the caller find the queue shut.
                Err(_) => break,
            },
            // The policy is asked again: past `until` it closes the batch.
            () = sleep_until(until.unwrap_or(first_enqueued)), if until.is_some() => {}
        }
    }
    match worker {
        Some(p) => p.forget(),
        None => {
            if let Ok(p) = free.acquire().await {
                p.forget();
            }
        }
    }
    Some(jobs)
}

pub async fn batcher_task(
    mut rx: Queues,
    policy: BatchPolicy,
    free: FreeWorkers,
    to_worker: mpsc::Sender<Batch>,
    metrics: Arc<ModelMetrics>,
) {
    loop {
        let Ok(slot) = to_worker.reserve().await else {
            fail_queued(&mut rx);
            break;
        };
        let Some(mut jobs) = form_batch(&mut rx, &policy, &free).await else {
            break;
        };
        let now = Instant::now();
        jobs.retain(|j| !j.is_dead(now));
        if jobs.is_empty() {
            // The worker that was counted on still waits: give its permit back.
            free.add_permits(1);
            continue;
        }
        for j in &jobs {
            let waited = now - j.enqueued;
            metrics.queue_seconds.observe(waited.as_secs_f64());
            metrics.stats.queue.add(1, waited);
        }
        metrics.queue_depth.set(rx.len() as i64);
        slot.send(Batch { jobs });
    }
}

/// The worker is gone for good: answer what is queued rather than drop it silently.
fn fail_queued(rx: &mut Queues) {
    for q in [&mut rx.high, &mut rx.normal] {
        q.close();
        while let Ok(j) = q.try_recv() {
            let _ = j
                .respond
                .send(Err(super::ScheduleError::Stopped("worker".into())));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;
    use crate::scheduler::ScheduleError;

    type Reply = oneshot::Receiver<Result<Vec<f32>, ScheduleError>>;

    fn job(deadline: Option<Instant>) -> (Job, Reply) {
        let (respond, rx) = oneshot::channel();
        let job = Job {
            input: crate::model::ModelInput::Values(vec![]),
            index: 0,
            enqueued: Instant::now(),
            deadline,
            respond,
            origin: crate::scheduler::Origin::default(),
            queued: tracing::Span::none(),
        };
        (job, rx)
    }

    /// Queues fed through the normal level only (the high one is closed and empty).
    fn normal_only(n: usize) -> (mpsc::Sender<Job>, Queues) {
        let (tx, normal) = mpsc::channel(n);
        let (_, high) = mpsc::channel(n);
        (tx, Queues { high, normal })
    }

    fn policy(delay_ms: u64) -> BatchPolicy {
        BatchPolicy::new(&[1, 2, 4], Duration::from_millis(delay_ms), 16).expect("policy")
    }

    /// Workers enough that none is ever waited for.
    fn idle() -> Semaphore {
        Semaphore::new(64)
    }

    #[tokio::test(start_paused = true)]
    async fn while_the_worker_is_busy_the_batch_stays_open_and_fills() {
        let (tx, mut rx) = normal_only(16);
        let free = Arc::new(Semaphore::new(0));
        let start = Instant::now();
        let (j, _r) = job(None);
        tx.send(j).await.ok();
        let (tx2, free2) = (tx.clone(), free.clone());
        let feeder = tokio::spawn(async move {
            let mut replies = Vec::new();
            for at in [3, 50] {
                tokio::time::sleep_until(start + Duration::from_millis(at)).await;
                let (j, r) = job(None);
                tx2.send(j).await.ok();
                replies.push(r);
            }
            // The worker comes free long after the first job's 10 ms.
            tokio::time::sleep_until(start + Duration::from_millis(100)).await;
            free2.add_permits(1);
            replies
        });
        let batch = form_batch(&mut rx, &policy(10), &free)
            .await
            .expect("batch");
        assert_eq!(
            batch.len(),
            3,
            "everything that came while the worker was busy"
        );
        assert_eq!(Instant::now() - start, Duration::from_millis(100));
        assert_eq!(free.available_permits(), 0, "the worker's permit is spent");
        drop(feeder.await.expect("feeder"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_waits_for_a_free_worker_and_no_longer() {
        let (tx, mut rx) = normal_only(16);
        let free = Arc::new(Semaphore::new(0));
        let mut replies = Vec::new();
        for _ in 0..6 {
            let (j, r) = job(None);
            tx.send(j).await.ok();
            replies.push(r);
        }
        let start = Instant::now();
        let later = free.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            later.add_permits(1);
        });
        let batch = form_batch(&mut rx, &policy(1000), &free)
            .await
            .expect("batch");
        assert_eq!(batch.len(), 4, "the largest allowed size");
        assert_eq!(Instant::now() - start, Duration::from_millis(20));
        assert_eq!(rx.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn waits_the_delay_from_the_first_arrival_then_dispatches_what_came() {
        let (tx, mut rx) = normal_only(16);
        let mut replies = Vec::new();
        let start = Instant::now();
        let (j, r) = job(None);
        tx.send(j).await.ok();
        replies.push(r);
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(3)).await;
            let (j, r) = job(None);
            tx.send(j).await.ok();
            // Arrives after the first job's 10 ms are up: belongs to the next batch.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let (j2, r2) = job(None);
            tx.send(j2).await.ok();
            (r, r2, tx)
        });
        let batch = form_batch(&mut rx, &policy(10), &idle())
            .await
            .expect("batch");
        assert_eq!(batch.len(), 2);
        assert_eq!(
            Instant::now() - start,
            Duration::from_millis(10),
            "dispatched at the first job's delay"
        );
        let (_r, _r2, _tx) = sender.await.expect("sender");
        let next = form_batch(&mut rx, &policy(10), &idle())
            .await
            .expect("batch");
        assert_eq!(next.len(), 1);
        drop(replies);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_goes_at_once() {
        let (tx, mut rx) = normal_only(16);
        let mut replies = Vec::new();
        for _ in 0..6 {
            let (j, r) = job(None);
            tx.send(j).await.ok();
            replies.push(r);
        }
        let start = Instant::now();
        let batch = form_batch(&mut rx, &policy(1000), &idle())
            .await
            .expect("batch");
        assert_eq!(batch.len(), 4, "the largest allowed size");
        assert_eq!(Instant::now(), start, "no waiting when full");
        let rest = form_batch(&mut rx, &policy(1000), &idle())
            .await
            .expect("batch");
        assert_eq!(rest.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_and_expired_jobs_are_skipped() {
        let (tx, mut rx) = normal_only(16);
        let (gone, r) = job(None);
        drop(r); // the client went away
        tx.send(gone).await.ok();
        let (late, _r_late) = job(Some(Instant::now()));
        tx.send(late).await.ok();
        let (live, _r_live) = job(None);
        tx.send(live).await.ok();
        let batch = form_batch(&mut rx, &policy(5), &idle())
            .await
            .expect("batch");
        assert_eq!(batch.len(), 1);
        assert!(!batch[0].respond.is_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn high_priority_jobs_go_first() {
        let (normal_tx, normal) = mpsc::channel(16);
        let (high_tx, high) = mpsc::channel(16);
        let mut rx = Queues { high, normal };
        let mut replies = Vec::new();
        for _ in 0..5 {
            let (j, r) = job(None);
            normal_tx.send(j).await.ok();
            replies.push(r);
        }
        let (urgent, urgent_reply) = job(None);
        high_tx.send(urgent).await.ok();
        let batch = form_batch(&mut rx, &policy(5), &idle())
            .await
            .expect("batch");
        assert_eq!(batch.len(), 4);
        // The high-priority job is first although it was queued last.
        let mut batch = batch.into_iter();
        let first = batch.next().expect("non-empty");
        let _ = first.respond.send(Ok(vec![1.0]));
        assert_eq!(urgent_reply.await.ok(), Some(Ok(vec![1.0])));
        assert_eq!(batch.len(), 3);
        assert_eq!(rx.len(), 2, "two normal jobs wait for the next batch");
        drop(replies);
    }

    #[tokio::test(start_paused = true)]
    async fn closed_queue_ends_the_task() {
        let (tx, mut rx) = normal_only(4);
        drop(tx);
        assert!(form_batch(&mut rx, &policy(5), &idle()).await.is_none());
    }
}
