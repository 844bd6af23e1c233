//! Rotation: the files read again every `reload_every` and at once on SIGHUP, on a
//! thread of their own; a failed reading is a warning the first time and an error (and
//! counted) only when the next fails too.

use std::sync::Arc;

use super::{Reload, Tls};

/// What the watch makes of a failed reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The first in a row: a Secret can be read mid-swap (the new certificate, the old
    /// key), which the next reading sets right. A warning.
    Transient,
    /// The files are still wrong a reading later (or, on SIGHUP, again): an error, and
    /// counted.
    Persistent,
    /// The same error as the one last reported: nothing more to say.
    Reported,
}

/// The failed reloads in a row, and the error last reported as persistent.
#[derive(Debug, Default)]
struct Failures {
    in_a_row: u32,
    reported: Option<String>,
}

impl Failures {
    fn failed(&mut self, message: &str, hup: bool) -> Failure {
        self.in_a_row = self.in_a_row.saturating_add(1);
        if self.in_a_row == 1 {
            return Failure::Transient;
        }
        if hup || self.reported.as_deref() != Some(message) {
            self.reported = Some(message.to_owned());
            return Failure::Persistent;
        }
        Failure::Reported
    }
}

impl Tls {
    /// [`Tls::reload`] on a thread of its own: reading files blocks, and a hung mount
    /// could block for good. Not `spawn_blocking`: the runtime waits for its blocking
    /// tasks when it shuts down, and a read stuck for good would hold up the exit.
    async fn reload_off_runtime(self: Arc<Self>) -> Result<Reload, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("tls-reload".into())
            .spawn(move || {
                let _ = tx.send(self.reload());
            })
            .map_err(|e| format!("cannot start a thread to read the TLS files: {e}"))?;
        match rx.await {
            Ok(outcome) => outcome.map_err(|e| e.to_string()),
            Err(_) => Err("reading the TLS files panicked".into()),
        }
    }

    /// Reloads every `reload_every` and on SIGHUP, for as long as it runs (the server
    /// aborts it when it stops). Errors go through [`Failures`]: a warning the first
    /// time, an error (and `reloads_total{failed}`) when the next reading fails too.
    pub async fn watch(self: Arc<Self>) {
        #[cfg(unix)]
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(self.options.reload_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut failures = Failures::default();
        loop {
            #[cfg(unix)]
            let signalled = async {
                match hangup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let signalled = std::future::pending::<()>();
            let hup = tokio::select! {
                _ = tick.tick() => false,
                () = signalled => true,
            };
            match self.clone().reload_off_runtime().await {
                Ok(Reload::Applied) => {
                    failures = Failures::default();
                    self.reloads.with_label_values(&["applied"]).inc();
                    tracing::info!(cert = %self.options.cert.display(), "TLS certificate re-read");
                }
                Ok(Reload::Unchanged) => {
                    failures = Failures::default();
                    if hup {
                        tracing::info!("SIGHUP: the TLS files are unchanged");
                    }
                }
                Err(message) => match failures.failed(&message, hup) {
                    Failure::Transient => tracing::warn!(
                        "{message}; keeping the previous TLS certificate for now (a rotation \
                         may be half done): read again in {} s",
                        self.options.reload_every.as_secs_f64()
                    ),
                    Failure::Persistent => {
                        self.reloads.with_label_values(&["failed"]).inc();
                        tracing::error!("{message}; keeping the previous TLS certificate");
                    }
                    Failure::Reported => {}
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_reading_is_reported_only_when_the_next_fails_too() {
        let mut failures = Failures::default();
        // Mid-swap, then whole again: a warning, never an error.
        assert_eq!(failures.failed("mismatch", false), Failure::Transient);
        failures = Failures::default();
        assert_eq!(failures.failed("mismatch", false), Failure::Transient);
        // Still wrong at the next tick: reported once, then not again...
        assert_eq!(failures.failed("mismatch", false), Failure::Persistent);
        assert_eq!(failures.failed("mismatch", false), Failure::Reported);
        // ...unless the error changes or the operator sends SIGHUP.
        assert_eq!(failures.failed("missing", false), Failure::Persistent);
        assert_eq!(failures.failed("missing", true), Failure::Persistent);
        assert_eq!(failures.failed("missing", false), Failure::Reported);
    }
}
