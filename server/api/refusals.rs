//! Refusals in logs and metrics without letting an overload flood either: each kind of
//! refusal is counted in `resnet_serve_refusals_total{reason}` every time, and logged at
//! most once per second, with how many were folded into that line.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often one kind of refusal may write a log line.
const EVERY: Duration = Duration::from_secs(1);

/// The refusals logged so far, per kind: when one last wrote a line, and how many have
/// been folded since.
#[derive(Debug, Default)]
pub struct RefusalLog {
    kinds: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl RefusalLog {
    /// Logs `message` under `kind` unless a line of that kind went out in the last
    /// second; returns whether it was written (for tests).
    pub fn log(&self, kind: &'static str, message: &str) -> bool {
        let now = Instant::now();
        let folded = {
            let Ok(mut kinds) = self.kinds.lock() else {
                return false;
            };
            match kinds.get_mut(kind) {
                Some((last, folded)) if now.duration_since(*last) < EVERY => {
                    *folded += 1;
                    return false;
                }
                Some((last, folded)) => {
                    *last = now;
                    std::mem::take(folded)
                }
                None => {
                    kinds.insert(kind, (now, 0));
                    0
                }
            }
        };
        tracing::info!(code = kind, folded, "{message}");
        true
    }
}

/// The fixed `reason` label of a refusal with status `code`: never anything a client
/// wrote.
pub fn reason(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        ResourceExhausted => "resource_exhausted",
        Unavailable => "unavailable",
        DeadlineExceeded => "deadline_exceeded",
        InvalidArgument => "invalid_argument",
        NotFound => "not_found",
        FailedPrecondition => "failed_precondition",
        PermissionDenied => "permission_denied",
        Unauthenticated => "unauthenticated",
        OutOfRange => "out_of_range",
        Cancelled => "cancelled",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_kind_per_second() {
        let log = RefusalLog::default();
        assert!(log.log("RESOURCE_EXHAUSTED", "queue full"));
        for _ in 0..1000 {
            assert!(!log.log("RESOURCE_EXHAUSTED", "queue full"));
        }
        assert!(log.log("UNAVAILABLE", "draining"), "kinds are apart");
        if let Ok(mut kinds) = log.kinds.lock() {
            if let Some((last, folded)) = kinds.get_mut("RESOURCE_EXHAUSTED") {
                assert_eq!(*folded, 1000);
                *last -= EVERY;
            }
        }
        assert!(
            log.log("RESOURCE_EXHAUSTED", "queue full"),
            "a second later"
        );
    }
}
