//! The server's resident memory: read from its metrics endpoint, sampled while the soak
//! runs, and summed up as the report's [`Rss`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::report::Rss;

/// Resident-memory samples: (time, bytes); `None` where the scrape failed.
pub(super) type Samples = Arc<Mutex<Vec<(Instant, Option<f64>)>>>;

pub(super) async fn resident(target: &str) -> Option<f64> {
    let text = tokio::time::timeout(Duration::from_secs(2), crate::metrics::get(target))
        .await
        .ok()?
        .ok()?;
    crate::metrics::resident_memory(&text)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// The samples summed up: `before` the load, the median of the second half of the
/// `calibration` (start, end) and of the `overload` (start, end: SIGTERM or the end of
/// the offered load), the peak from the overload's start on, and `after` (a last reading
/// once every request had its outcome, else the last sample).
pub(super) fn summarise(
    before: f64,
    after: Option<f64>,
    s: &[(Instant, Option<f64>)],
    calibration: (Instant, Instant),
    overload: (Instant, Instant),
) -> Rss {
    let (calibration_start, calibration_end) = calibration;
    let (start, overload_end) = overload;
    let half = calibration_start + (calibration_end - calibration_start) / 2;
    let loaded = median(
        s.iter()
            .filter(|(at, _)| *at >= half && *at <= calibration_end)
            .filter_map(|(_, v)| *v)
            .collect(),
    )
    .unwrap_or(before);
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
}
