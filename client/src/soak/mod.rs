//! The soak test behind `resnet-client soak`: a server driven well past its capacity for
//! a set time, optionally sent SIGTERM while under that load, with every request
//! accounted for.
//!
//! Phases, one after another:
//! 1. **Idle**: the server's resident memory is read from its metrics endpoint.
//! 2. **Calibration**: a closed loop ([`crate::load`]) measures the server's capacity
//!    (answered requests per second), unless it is given; the resident memory sampled in
//!    the second half of this phase is the *loaded steady state*.
//! 3. **Overload**: an open loop offers `overload x capacity` requests per second, each
//!    its own task, whatever the server does, for `duration`. Latencies count from each
//!    request's intended send time, as in [`crate::load`]'s open loop.
//! 4. **Drain** (with [`Sigterm`]): SIGTERM is sent to the server `after` seconds into the
//!    overload; the load goes on until the server has exited or `duration` ends.
//!    Requests are counted in the phase in which they were sent.
//!
//! Every request sent ends in exactly one of:
//! - **answered**: the call ended with a gRPC status that came from the server (OK,
//!   RESOURCE_EXHAUSTED, UNAVAILABLE, ...). tonic attaches the underlying error as the
//!   status's source when it makes a status up from a transport failure; a status with no
//!   source is the server's.
//! - **not taken**: a transport failure that HTTP/2 or TCP guarantees the server never
//!   processed, so it is safe to retry: the connection was refused (the server had closed
//!   its listener), the stream was refused (`REFUSED_STREAM`, or above the last stream id
//!   of the server's GOAWAY), or the request was still queued in the client when its
//!   connection closed (hyper's "canceled").
//! - **lost**: sent and never given a status: any other transport failure (the
//!   connection reset or closed under an accepted stream, a stream reset without a
//!   status), or no outcome at all `drain_wait` after the load stopped (the task is then
//!   abandoned). A server that drains correctly loses nothing.
//!
//! Requests the client skipped because `max_outstanding` were already waiting are counted
//! apart (`client_skipped`): they were never sent.

mod fate;
mod memory;
mod report;
mod signal;
mod tally;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::load::{self, LoadConfig, Mode, Transport};
use crate::Client;
use fate::fate;
use memory::{resident, Samples};
use signal::{running, send_sigterm};
use tally::{Tallies, Tally};

pub use report::{Phase, Quantiles, Rss, SigtermReport, SoakReport};

/// When and to whom SIGTERM goes.
#[derive(Debug, Clone, Copy)]
pub struct Sigterm {
    pub pid: i32,
    /// Time into the overload phase.
    pub after: Duration,
}

#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// What each request carries (model, transport, images); its mode, duration and
    /// warm-up are ignored (the calibration uses its own).
    pub request: LoadConfig,
    /// Length of the calibration phase (closed loop).
    pub calibrate: Duration,
    pub calibrate_concurrency: usize,
    /// The server's capacity in requests per second; `None`: measured by the calibration.
    pub capacity: Option<f64>,
    /// Offered load as a multiple of the capacity.
    pub overload: f64,
    /// Length of the overload phase (the drain included, when SIGTERM is sent).
    pub duration: Duration,
    /// Most requests waiting for an answer at once; past it a request is skipped.
    pub max_outstanding: usize,
    pub sigterm: Option<Sigterm>,
    /// How long requests still unanswered when the load stops are waited for before they
    /// count as lost; at least the server's drain timeout.
    pub drain_wait: Duration,
    /// The server's metrics endpoint (`http://host:port/metrics` or `host:port`).
    pub metrics: Option<String>,
    /// Interval of the resident-memory samples.
    pub sample_every: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    #[error("the calibration got no OK answer from the server ({0})")]
    NoCapacity(String),
    #[error("reading the server's metrics at {target}: {reason}")]
    Metrics { target: String, reason: String },
    #[error("sending SIGTERM to {pid}: {source}")]
    Signal {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the soak over `clients` (requests spread round-robin) and reports it.
pub async fn run(clients: &[Client], cfg: &SoakConfig) -> Result<SoakReport, SoakError> {
    assert!(!clients.is_empty(), "a soak needs at least one connection");
    assert!(
        !cfg.request.inputs.is_empty(),
        "a soak needs at least one input"
    );
    let metrics_error = |target: &str, reason: &str| SoakError::Metrics {
        target: target.to_string(),
        reason: reason.to_string(),
    };

    // 1. Idle.
    let before = match &cfg.metrics {
        Some(t) => Some(resident(t).await.ok_or_else(|| {
            metrics_error(
                t,
                "no process_resident_memory_bytes (is it a resnet-serve?)",
            )
        })?),
        None => None,
    };
    let samples: Samples = Arc::default();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = cfg.metrics.clone().map(|target| {
        let (samples, sampling, every) = (samples.clone(), sampling.clone(), cfg.sample_every);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while sampling.load(Ordering::SeqCst) {
                tick.tick().await;
                let at = Instant::now();
                let value = resident(&target).await;
                if let Ok(mut s) = samples.lock() {
                    s.push((at, value));
                }
            }
        })
    });

    // 2. Calibration.
    let calibration_start = Instant::now();
    let mut calibration = cfg.request.clone();
    calibration.mode = Mode::Closed {
        concurrency: cfg.calibrate_concurrency.max(1),
    };
    calibration.duration = Some(cfg.calibrate);
    calibration.requests = None;
    calibration.warmup = Duration::ZERO;
    let measured = load::run(
        clients,
        &calibration,
        None,
        indicatif::ProgressBar::hidden(),
    )
    .await;
    let calibration_end = Instant::now();
    let capacity = match cfg.capacity {
        Some(c) => c,
        None if measured.throughput_rps > 0.0 => measured.throughput_rps,
        None => {
            sampling.store(false, Ordering::SeqCst);
            return Err(SoakError::NoCapacity(format!(
                "{} requests, errors {:?}",
                measured.requests, measured.errors
            )));
        }
    };

    // 3. Overload, and 4. the drain.
    let rate = (capacity * cfg.overload).max(1e-3);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let end = start + cfg.duration;
    let tallies = Arc::new(Mutex::new(Tallies {
        overload: Tally::new(),
        drain: Tally::new(),
    }));
    let sigterm_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let slots = Arc::new(Semaphore::new(cfg.max_outstanding.max(1)));
    let outstanding_at_sigterm = Arc::new(AtomicU64::new(0));
    let exited_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let server_gone = Arc::new(AtomicBool::new(false));
    let signaller = cfg.sigterm.map(|s| {
        let (sigterm_at, exited_at, server_gone) =
            (sigterm_at.clone(), exited_at.clone(), server_gone.clone());
        let (slots, outstanding, most) = (
            slots.clone(),
            outstanding_at_sigterm.clone(),
            cfg.max_outstanding.max(1),
        );
        tokio::spawn(async move {
            tokio::time::sleep_until(start + s.after).await;
            if let Ok(mut at) = sigterm_at.lock() {
                *at = Some(Instant::now());
            }
            let waiting = most.saturating_sub(slots.available_permits());
            outstanding.store(waiting as u64, Ordering::SeqCst);
            send_sigterm(s.pid).map_err(|source| SoakError::Signal { pid: s.pid, source })?;
            // Watch for the exit so the load can stop once nobody is there to take it.
            while running(s.pid) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if let Ok(mut at) = exited_at.lock() {
                *at = Some(Instant::now());
            }
            server_gone.store(true, Ordering::SeqCst);
            Ok(())
        })
    });
    let skipped = AtomicU64::new(0);
    let mut tasks = Vec::new();
    let mut i = 0u64;
    loop {
        let intended = start + interval.mul_f64(i as f64);
        if intended >= end || server_gone.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep_until(intended).await;
        let drain = sigterm_at.lock().map(|a| a.is_some()).unwrap_or(false);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            skipped.fetch_add(1, Ordering::Relaxed);
            i += 1;
            continue;
        };
        if let Ok(mut t) = tallies.lock() {
            t.get(drain).phase.sent += 1;
        }
        let client = clients[(i % clients.len() as u64) as usize].clone();
        let (request, tallies) = (cfg.request.clone(), tallies.clone());
        tasks.push(tokio::spawn(async move {
            let result = load::call(&client, &request, i).await;
            let latency = intended.elapsed();
            if let Ok(mut t) = tallies.lock() {
                t.get(drain).record(fate(&result), latency);
            }
            drop(permit);
        }));
        i += 1;
    }
    let offer_end = Instant::now();
    let offered_s = (offer_end.min(end) - start).as_secs_f64();

    // Unanswered requests get `drain_wait`; the rest are lost.
    let deadline = Instant::now() + cfg.drain_wait;
    for t in &mut tasks {
        if tokio::time::timeout_at(deadline, &mut *t).await.is_err() {
            t.abort();
        }
    }
    let signal = match signaller {
        Some(mut s) => {
            // The watcher ends when the server exits; give it the drain's time too, and
            // stop it if the server outlives that.
            match tokio::time::timeout_at(deadline, &mut s).await {
                Ok(Ok(Err(e))) => {
                    sampling.store(false, Ordering::SeqCst);
                    return Err(e);
                }
                Err(_) => {
                    s.abort();
                    true
                }
                Ok(_) => true,
            }
        }
        None => false,
    };
    let after = match (&cfg.metrics, signal) {
        (Some(t), false) => resident(t).await,
        _ => None,
    };
    sampling.store(false, Ordering::SeqCst);
    if let Some(s) = sampler {
        s.abort();
    }

    // Sent minus recorded: the tasks abandoned at the deadline.
    let (overload, drain, total) = {
        let mut guard = tallies.lock().unwrap_or_else(|p| p.into_inner());
        let t = &mut *guard;
        for tally in [&mut t.overload, &mut t.drain] {
            let p = &tally.phase;
            let recorded =
                p.answered.values().sum::<u64>() + p.not_taken.values().sum::<u64>() + p.lost;
            for _ in recorded..p.sent {
                tally.lose("no outcome before the drain wait ended".into());
            }
        }
        let mut total = Tally::new();
        total.add(&t.overload);
        total.add(&t.drain);
        (t.overload.finish(), t.drain.finish(), total.finish())
    };

    let rss = before.map(|before| {
        let s = samples.lock().map(|s| s.clone()).unwrap_or_default();
        let overload_end = sigterm_at.lock().ok().and_then(|a| *a).unwrap_or(offer_end);
        memory::summarise(
            before,
            after,
            &s,
            (calibration_start, calibration_end),
            (start, overload_end),
        )
    });
    let sigterm = cfg.sigterm.map(|s| {
        let sent = sigterm_at.lock().ok().and_then(|a| *a);
        let exited = exited_at.lock().ok().and_then(|a| *a);
        SigtermReport {
            pid: s.pid,
            sent_at_s: sent.map_or(f64::NAN, |at| (at - start).as_secs_f64()),
            outstanding: outstanding_at_sigterm.load(Ordering::SeqCst),
            exited_after_s: match (sent, exited) {
                (Some(s), Some(e)) => Some((e - s).as_secs_f64()),
                _ => None,
            },
        }
    });
    Ok(SoakReport {
        transport: match cfg.request.transport {
            Transport::KServe => "kserve".into(),
            _ => "unary".into(),
        },
        connections: clients.len(),
        capacity_rps: capacity,
        capacity_measured: cfg.capacity.is_none(),
        overload_factor: cfg.overload,
        offered_rps: rate,
        offered_s,
        lost: total.lost,
        overload,
        drain: cfg.sigterm.map(|_| drain),
        total,
        client_skipped: skipped.load(Ordering::SeqCst),
        rss,
        sigterm,
    })
}
