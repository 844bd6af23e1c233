//! Accepting connections on the gRPC port without spinning when the process runs out
//! of file descriptors.
//!
//! `accept` fails with EMFILE, ENFILE, ENOBUFS or ENOMEM while the process or the system
//! is out of descriptors or memory, and goes on failing at once until one is freed:
//! calling it again straight away, as tonic's loop and ours did, burns a core and floods
//! the log. After such an error the loop waits [`BACKOFF`] before accepting again (as
//! axum and hyper-util do), and logs at warn at most once a second. An error of one
//! connection only (aborted or reset before it was accepted) is skipped at once.
//!
//! [`raise_open_files_limit`] lifts the soft `RLIMIT_NOFILE` (1,024 on most systems) to
//! the hard limit at start-up, so that it takes far more clients to get there.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

/// How long the loop waits after an accept error that is not one connection's.
pub const BACKOFF: Duration = Duration::from_millis(100);

/// At most one warning per this long; the others are counted into the next one.
const WARN_EVERY: Duration = Duration::from_secs(1);

/// An error of the connection being accepted, not of the listener or the process:
/// the next one may well succeed.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// The accept errors of one listener: when the last warning went out, and how many
/// errors have not been logged since.
#[derive(Debug, Default)]
pub struct AcceptErrors {
    last_warned: Option<Instant>,
    unlogged: u64,
}

impl AcceptErrors {
    /// Counts an error that makes the loop wait; `true` when it was logged.
    fn note(&mut self, e: &io::Error, now: Instant) -> bool {
        self.unlogged = self.unlogged.saturating_add(1);
        if self
            .last_warned
            .is_some_and(|last| now.saturating_duration_since(last) < WARN_EVERY)
        {
            return false;
        }
        tracing::warn!(
            errors = self.unlogged,
            "accepting a connection failed: {e}; accepting again in {} ms",
            BACKOFF.as_millis()
        );
        self.last_warned = Some(now);
        self.unlogged = 0;
        true
    }
}

/// The next connection on `listener`, waiting out errors as the module says. Cancel
/// safe: dropped while it waits, nothing is lost.
pub async fn accept(listener: &TcpListener, errors: &mut AcceptErrors) -> (TcpStream, SocketAddr) {
    next(|| listener.accept(), errors).await
}

/// [`accept`] over any accepting function, so that its errors can be made up in tests.
async fn next<T, F, Fut>(mut accept: F, errors: &mut AcceptErrors) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<T>>,
{
    loop {
        match accept().await {
            Ok(accepted) => return accepted,
            // Anyone who can reach the port can cause these: debug only.
            Err(e) if is_connection_error(&e) => tracing::debug!("accept: {e}"),
            Err(e) => {
                errors.note(&e, Instant::now());
                tokio::time::sleep(BACKOFF).await;
            }
        }
    }
}

/// Raises the soft limit on open files to the hard limit, and returns the soft limit
/// as it then is. Each connection holds a descriptor; the usual soft limit of 1,024 is
/// a few hundred clients' worth.
#[cfg(unix)]
pub fn raise_open_files_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct it is given, which outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An accepting function that fails with `errno` `failures` times, then succeeds.
    fn failing(
        errno: i32,
        failures: usize,
    ) -> (
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
        impl FnMut() -> std::future::Ready<io::Result<()>>,
    ) {
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        let accept = move || {
            let n = counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::future::ready(if n < failures {
                Err(io::Error::from_raw_os_error(errno))
            } else {
                Ok(())
            })
        };
        (calls, accept)
    }

    #[tokio::test(start_paused = true)]
    async fn out_of_descriptors_waits_before_accepting_again() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            let (calls, accept) = failing(errno, 20);
            let start = tokio::time::Instant::now();
            next(accept, &mut AcceptErrors::default()).await;
            assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 21);
            // Twenty waits of BACKOFF: at most ten tries a second, not a spinning core.
            assert_eq!(start.elapsed(), BACKOFF * 20, "errno {errno}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_connections_error_is_skipped_at_once() {
        let (calls, accept) = failing(libc::ECONNABORTED, 5);
        let start = tokio::time::Instant::now();
        next(accept, &mut AcceptErrors::default()).await;
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 6);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[test]
    fn warns_at_most_once_a_second() {
        let mut errors = AcceptErrors::default();
        let e = io::Error::from_raw_os_error(libc::EMFILE);
        let t0 = Instant::now();
        assert!(errors.note(&e, t0));
        for ms in [1, 100, 999] {
            assert!(!errors.note(&e, t0 + Duration::from_millis(ms)), "{ms} ms");
        }
        assert_eq!(errors.unlogged, 3);
        assert!(errors.note(&e, t0 + WARN_EVERY));
        assert_eq!(errors.unlogged, 0);
    }

    #[cfg(unix)]
    #[test]
    fn the_soft_open_files_limit_is_raised_to_the_hard_one() {
        let soft = raise_open_files_limit().expect("raised");
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in raise_open_files_limit.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(soft, limit.rlim_cur);
        assert_eq!(limit.rlim_cur, limit.rlim_max);
    }
}
