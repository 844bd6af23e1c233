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

use std::collections::BTreeMap;
use std::error::Error as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::load::{self, LoadConfig, Mode, Transport};
use crate::Client;

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

/// What a soak measured.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub transport: String,
    pub connections: usize,
    /// Requests per second the server answered OK (measured or given).
    pub capacity_rps: f64,
    pub capacity_measured: bool,
    pub overload_factor: f64,
    pub offered_rps: f64,
    /// Seconds the overload (and drain) load was offered.
    pub offered_s: f64,
    /// Requests sent before SIGTERM (all of them without one).
    pub overload: Phase,
    /// Requests sent after SIGTERM.
    pub drain: Option<Phase>,
    /// Both phases together.
    pub total: Phase,
    /// Requests sent and never given a status (see the module doc): the total's `lost`.
    pub lost: u64,
    pub client_skipped: u64,
    pub rss: Option<Rss>,
    pub sigterm: Option<SigtermReport>,
}

/// Outcomes of the requests sent in one phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phase {
    pub sent: u64,
    pub ok: u64,
    /// RESOURCE_EXHAUSTED and UNAVAILABLE answers: the server refusing work.
    pub refused: u64,
    /// Every answer by its gRPC code name (OK included).
    pub answered: BTreeMap<String, u64>,
    /// Transport failures the server never processed, by kind.
    pub not_taken: BTreeMap<String, u64>,
    pub lost: u64,
    /// The first few lost requests' errors.
    pub lost_examples: Vec<String>,
    /// Latency of OK answers (ms from the intended send time).
    pub ok_ms: Option<Quantiles>,
    /// Latency of the refusals.
    pub refused_ms: Option<Quantiles>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Quantiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// The server's resident memory (bytes) over the run.
#[derive(Debug, Clone, Serialize)]
pub struct Rss {
    /// Before any request.
    pub before: u64,
    /// Median of the samples in the second half of the calibration (serving at capacity).
    pub loaded: u64,
    /// Median of the samples in the second half of the overload before SIGTERM (all of it
    /// without one): the plateau under 10x load, a full queue included.
    pub overloaded: u64,
    /// Highest sample from the start of the overload to the end.
    pub peak: u64,
    /// After the overload: with SIGTERM, the last sample before the server went away;
    /// without, one taken once every request had its outcome.
    pub after: u64,
    pub peak_over_loaded: f64,
    pub peak_over_overloaded: f64,
    pub samples: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct SigtermReport {
    pub pid: i32,
    /// Seconds into the overload it was sent.
    pub sent_at_s: f64,
    /// Requests sent and not yet answered when it was sent: the drain owes each an answer.
    pub outstanding: u64,
    /// Seconds from SIGTERM until the process was gone (exited or a zombie); `None`: it
    /// was still running when the soak ended.
    pub exited_after_s: Option<f64>,
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

/// How one request ended.
#[derive(Debug, Clone, PartialEq)]
enum Fate {
    Answered(tonic::Code),
    NotTaken(&'static str),
    Lost(String),
}

/// Sorts a call's result by the module doc's definitions.
fn fate(result: &Result<(), tonic::Status>) -> Fate {
    let status = match result {
        Ok(()) => return Fate::Answered(tonic::Code::Ok),
        Err(s) => s,
    };
    let Some(source) = status.source() else {
        return Fate::Answered(status.code());
    };
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(source);
    while let Some(e) = next {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            if h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return Fate::NotTaken("refused_stream");
            }
            // A GOAWAY received fails the streams above its last stream id with this
            // error; a stream the server took and then dropped fails with a broken pipe.
            if h2.is_go_away() && h2.is_remote() {
                return Fate::NotTaken("goaway");
            }
        }
        if let Some(hyper) = e.downcast_ref::<hyper::Error>() {
            if hyper.is_canceled() {
                return Fate::NotTaken("canceled_unsent");
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return Fate::NotTaken("connection_refused");
            }
        }
        next = e.source();
    }
    let mut message = format!("{:?}: {}", status.code(), status.message());
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(source);
    while let Some(e) = next {
        message.push_str(&format!(": {e}"));
        next = e.source();
    }
    Fate::Lost(message)
}

fn histogram() -> Histogram<u64> {
    // 1 µs to an hour, 3 significant digits; these bounds are valid, so this cannot fail.
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|e| panic!("histogram bounds: {e}"))
}

fn quantiles(h: &Histogram<u64>) -> Option<Quantiles> {
    if h.is_empty() {
        return None;
    }
    let ms = |v: u64| v as f64 / 1000.0;
    Some(Quantiles {
        count: h.len(),
        p50: ms(h.value_at_quantile(0.5)),
        p90: ms(h.value_at_quantile(0.9)),
        p99: ms(h.value_at_quantile(0.99)),
        max: ms(h.max()),
    })
}

/// One phase's tally while it runs.
struct Tally {
    phase: Phase,
    ok_us: Histogram<u64>,
    refused_us: Histogram<u64>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            phase: Phase::default(),
            ok_us: histogram(),
            refused_us: histogram(),
        }
    }

    fn record(&mut self, fate: Fate, latency: Duration) {
        let micros = (latency.as_micros().max(1)).min(u128::from(u64::MAX)) as u64;
        let p = &mut self.phase;
        match fate {
            Fate::Answered(code) => {
                *p.answered.entry(load::code_name(code)).or_insert(0) += 1;
                match code {
                    tonic::Code::Ok => {
                        p.ok += 1;
                        self.ok_us.saturating_record(micros);
                    }
                    tonic::Code::ResourceExhausted | tonic::Code::Unavailable => {
                        p.refused += 1;
                        self.refused_us.saturating_record(micros);
                    }
                    _ => {}
                }
            }
            Fate::NotTaken(kind) => *p.not_taken.entry(kind.to_string()).or_insert(0) += 1,
            Fate::Lost(message) => self.lose(message),
        }
    }

    fn lose(&mut self, message: String) {
        self.phase.lost += 1;
        if self.phase.lost_examples.len() < 5 {
            self.phase.lost_examples.push(message);
        }
    }

    fn finish(&self) -> Phase {
        let mut p = self.phase.clone();
        p.ok_ms = quantiles(&self.ok_us);
        p.refused_ms = quantiles(&self.refused_us);
        p
    }

    fn add(&mut self, other: &Tally) {
        let (p, o) = (&mut self.phase, &other.phase);
        p.sent += o.sent;
        p.ok += o.ok;
        p.refused += o.refused;
        p.lost += o.lost;
        for (k, v) in &o.answered {
            *p.answered.entry(k.clone()).or_insert(0) += v;
        }
        for (k, v) in &o.not_taken {
            *p.not_taken.entry(k.clone()).or_insert(0) += v;
        }
        for e in &o.lost_examples {
            if p.lost_examples.len() < 5 {
                p.lost_examples.push(e.clone());
            }
        }
        let _ = self.ok_us.add(&other.ok_us);
        let _ = self.refused_us.add(&other.refused_us);
    }
}

/// Both phases' tallies; a `std::sync::Mutex` because it is never held across an await.
struct Tallies {
    overload: Tally,
    drain: Tally,
}

impl Tallies {
    fn get(&mut self, drain: bool) -> &mut Tally {
        if drain {
            &mut self.drain
        } else {
            &mut self.overload
        }
    }
}

/// Resident-memory samples: (time, bytes); `None` where the scrape failed.
type Samples = Arc<Mutex<Vec<(Instant, Option<f64>)>>>;

async fn resident(target: &str) -> Option<f64> {
    let text = tokio::time::timeout(Duration::from_secs(2), crate::metrics::get(target))
        .await
        .ok()?
        .ok()?;
    crate::metrics::resident_memory(&text)
}

/// Whether process `pid` is still running: neither gone nor a zombie (the state field
/// of `/proc/PID/stat` follows the parenthesised command name).
fn running(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

fn send_sigterm(pid: i32) -> std::io::Result<()> {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
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
        let half = calibration_start + (calibration_end - calibration_start) / 2;
        let loaded = median(
            s.iter()
                .filter(|(at, _)| *at >= half && *at <= calibration_end)
                .filter_map(|(_, v)| *v)
                .collect(),
        )
        .unwrap_or(before);
        let overload_end = sigterm_at.lock().ok().and_then(|a| *a).unwrap_or(offer_end);
        let overload_half = start + (overload_end.max(start) - start) / 2;
        let overloaded = median(
            s.iter()
                .filter(|(at, _)| *at >= overload_half && *at <= overload_end)
                .filter_map(|(_, v)| *v)
                .collect(),
        )
        .unwrap_or(0.0);
        let peak = s
            .iter()
            .filter(|(at, _)| *at >= start)
            .filter_map(|(_, v)| *v)
            .fold(0.0, f64::max);
        let after = after
            .or_else(|| s.iter().rev().find_map(|(_, v)| *v))
            .unwrap_or(0.0);
        Rss {
            before: before as u64,
            loaded: loaded as u64,
            overloaded: overloaded as u64,
            peak: peak as u64,
            after: after as u64,
            peak_over_loaded: if loaded > 0.0 { peak / loaded } else { 0.0 },
            peak_over_overloaded: if overloaded > 0.0 {
                peak / overloaded
            } else {
                0.0
            },
            samples: s.iter().filter(|(_, v)| v.is_some()).count(),
        }
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

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let others: Vec<String> = self
            .answered
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "OK" | "RESOURCE_EXHAUSTED" | "UNAVAILABLE"))
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let code = |c: &str| self.answered.get(c).copied().unwrap_or(0);
        writeln!(
            f,
            "  sent {}: ok {}, refused {} (RESOURCE_EXHAUSTED {}, UNAVAILABLE {}), other answers {}, not taken {}, LOST {}",
            self.sent,
            self.ok,
            self.refused,
            code("RESOURCE_EXHAUSTED"),
            code("UNAVAILABLE"),
            if others.is_empty() { "0".into() } else { others.join(", ") },
            self.not_taken.values().sum::<u64>(),
            self.lost
        )?;
        for (name, q) in [("ok", &self.ok_ms), ("refused", &self.refused_ms)] {
            if let Some(q) = q {
                writeln!(
                    f,
                    "  {name} latency ms: p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
                    q.p50, q.p90, q.p99, q.max
                )?;
            }
        }
        for (kind, n) in &self.not_taken {
            writeln!(f, "  not taken, {kind}: {n}")?;
        }
        for e in &self.lost_examples {
            writeln!(f, "  lost: {e}")?;
        }
        Ok(())
    }
}

impl std::fmt::Display for SoakReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "soak ({}, {} connection{}): capacity {:.1} req/s ({}), offered {:.1} req/s ({}x) for {:.1} s",
            self.transport,
            self.connections,
            if self.connections == 1 { "" } else { "s" },
            self.capacity_rps,
            if self.capacity_measured { "measured" } else { "given" },
            self.offered_rps,
            self.overload_factor,
            self.offered_s
        )?;
        writeln!(f, "overload:")?;
        write!(f, "{}", self.overload)?;
        if let Some(d) = &self.drain {
            writeln!(f, "after SIGTERM:")?;
            write!(f, "{d}")?;
        }
        if let Some(s) = &self.sigterm {
            match s.exited_after_s {
                Some(e) => writeln!(
                    f,
                    "SIGTERM to {} at {:.1} s with {} requests outstanding; it exited {:.2} s later",
                    s.pid, s.sent_at_s, s.outstanding, e
                )?,
                None => writeln!(
                    f,
                    "SIGTERM to {} at {:.1} s with {} requests outstanding; it had not exited when the soak ended",
                    s.pid, s.sent_at_s, s.outstanding
                )?,
            }
        }
        if let Some(r) = &self.rss {
            writeln!(
                f,
                "server RSS MiB: before {:.1}, loaded {:.1}, overloaded {:.1}, peak {:.1} ({:.2}x loaded, {:.2}x overloaded), after {:.1} ({} samples)",
                mib(r.before),
                mib(r.loaded),
                mib(r.overloaded),
                mib(r.peak),
                r.peak_over_loaded,
                r.peak_over_overloaded,
                mib(r.after),
                r.samples
            )?;
        }
        if self.client_skipped > 0 {
            writeln!(
                f,
                "client skipped {} requests (max outstanding reached)",
                self.client_skipped
            )?;
        }
        writeln!(
            f,
            "requests lost (sent, never given a status): {}",
            self.lost
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_servers_statuses_are_answers() {
        assert_eq!(fate(&Ok(())), Fate::Answered(tonic::Code::Ok));
        let refused = tonic::Status::resource_exhausted("queue full");
        assert_eq!(
            fate(&Err(refused)),
            Fate::Answered(tonic::Code::ResourceExhausted)
        );
    }

    #[test]
    fn transport_failures_are_not_taken_or_lost() {
        let with = |source: Box<dyn std::error::Error + Send + Sync>| {
            let mut s = tonic::Status::unavailable("transport");
            s.set_source(Arc::from(source));
            fate(&Err(s))
        };
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(
            with(Box::new(refused)),
            Fate::NotTaken("connection_refused")
        );
        assert_eq!(
            with(Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM))),
            Fate::NotTaken("refused_stream")
        );
        let reset = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stream closed");
        assert!(matches!(with(Box::new(reset)), Fate::Lost(m) if m.contains("stream closed")));
        // A stream reset with no status is lost too.
        assert!(matches!(
            with(Box::new(h2::Error::from(h2::Reason::INTERNAL_ERROR))),
            Fate::Lost(_)
        ));
    }

    #[test]
    fn a_tally_keeps_refusals_and_answers_apart() {
        let mut t = Tally::new();
        t.phase.sent = 4;
        t.record(Fate::Answered(tonic::Code::Ok), Duration::from_millis(40));
        t.record(
            Fate::Answered(tonic::Code::ResourceExhausted),
            Duration::from_millis(2),
        );
        t.record(Fate::Answered(tonic::Code::InvalidArgument), Duration::ZERO);
        t.record(Fate::NotTaken("goaway"), Duration::ZERO);
        let p = t.finish();
        assert_eq!((p.ok, p.refused, p.lost), (1, 1, 0));
        assert_eq!(p.answered["INVALID_ARGUMENT"], 1);
        assert_eq!(p.not_taken["goaway"], 1);
        let refused = p.refused_ms.expect("refusals");
        assert!((refused.p99 - 2.0).abs() < 0.01, "{refused:?}");
        assert!(p.ok_ms.expect("ok").p50 >= 39.9);
    }

    #[test]
    fn a_zombie_or_missing_process_is_not_running() {
        assert!(running(std::process::id() as i32));
        assert!(!running(i32::MAX));
    }
}
