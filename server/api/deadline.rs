//! Call deadlines: a request's `grpc-timeout`, stamped as its headers arrive, so that the
//! queue and the batcher drop work nobody waits for and our DEADLINE_EXCEEDED reaches the
//! caller before its own timer ends the call.

use std::time::Duration;

use tokio::time::Instant;
use tonic::{Request, Status};

/// The deadline a request's `grpc-timeout` sets, stamped by [`stamp_deadline`].
#[derive(Debug, Clone, Copy)]
pub struct Deadline(pub Instant);

/// Interceptor: runs as the request's headers arrive (before its body is decoded), so
/// the deadline counts from the same instant as tonic's own timer. It is set ahead of
/// the client's by a tenth (at most 25 ms), so our DEADLINE_EXCEEDED reaches the client
/// before its own timer, or tonic's on this side, ends the call with CANCELLED.
#[allow(clippy::result_large_err)]
pub fn stamp_deadline(mut req: Request<()>) -> Result<Request<()>, Status> {
    if let Some(d) = grpc_timeout(&req) {
        let margin = (d / 10).min(Duration::from_millis(25));
        // A timeout past what the clock can add is no deadline at all.
        if let Some(at) = Instant::now().checked_add(d.saturating_sub(margin)) {
            req.extensions_mut().insert(Deadline(at));
        }
    }
    Ok(req)
}

pub(crate) fn deadline_of<T>(req: &Request<T>) -> Option<Instant> {
    req.extensions().get::<Deadline>().map(|d| d.0)
}

/// The `grpc-timeout` header as a duration.
fn grpc_timeout<T>(req: &Request<T>) -> Option<Duration> {
    parse_grpc_timeout(req.metadata().get("grpc-timeout")?.to_str().ok()?)
}

/// A `grpc-timeout` value: at most 8 ASCII digits and a unit, as the gRPC spec writes it
/// (tonic ignores anything else, and so do we).
pub fn parse_grpc_timeout(raw: &str) -> Option<Duration> {
    let (digits, unit) = raw.split_at(raw.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Some(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_spec_writes_them() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "S", "5", "123456789S", "-1S", "1.5S", "5s", "5 S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        assert_eq!(
            parse_grpc_timeout("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_runs_a_tenth_ahead_at_most_25_ms() {
        let stamped = |t: &str| {
            let mut req = Request::new(());
            req.metadata_mut()
                .insert("grpc-timeout", t.parse().expect("ascii"));
            deadline_of(&stamp_deadline(req).expect("stamped"))
        };
        let now = Instant::now();
        assert_eq!(stamped("100m"), Some(now + Duration::from_millis(90)));
        assert_eq!(stamped("10S"), Some(now + Duration::from_millis(9975)));
        assert_eq!(stamped("x"), None);
        assert_eq!(deadline_of(&Request::new(())), None);
    }
}
