//! The running count of one phase's outcomes and latencies, made into its [`Phase`]
//! report at the end.

use std::time::Duration;

use hdrhistogram::Histogram;

use super::fate::Fate;
use super::report::{Phase, Quantiles};
use crate::load::{self, latency_histogram};

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
pub(super) struct Tally {
    pub(super) phase: Phase,
    ok_us: Histogram<u64>,
    refused_us: Histogram<u64>,
}

impl Tally {
    pub(super) fn new() -> Tally {
        Tally {
            phase: Phase::default(),
            ok_us: latency_histogram(),
            refused_us: latency_histogram(),
        }
    }

    pub(super) fn record(&mut self, fate: Fate, latency: Duration) {
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

    pub(super) fn lose(&mut self, message: String) {
        self.phase.lost += 1;
        if self.phase.lost_examples.len() < 5 {
            self.phase.lost_examples.push(message);
        }
    }

    pub(super) fn finish(&self) -> Phase {
        let mut p = self.phase.clone();
        p.ok_ms = quantiles(&self.ok_us);
        p.refused_ms = quantiles(&self.refused_us);
        p
    }

    pub(super) fn add(&mut self, other: &Tally) {
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
pub(super) struct Tallies {
    pub(super) overload: Tally,
    pub(super) drain: Tally,
}

impl Tallies {
    pub(super) fn get(&mut self, drain: bool) -> &mut Tally {
        if drain {
            &mut self.drain
        } else {
            &mut self.overload
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
