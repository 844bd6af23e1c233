//! What a soak measured: each phase's outcomes, the server's memory and its SIGTERM, as
//! JSON or as text.

use std::collections::BTreeMap;

use serde::Serialize;

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
