//! TLS and mutual TLS on the gRPC port (rustls, with ring).
//!
//! `--tls-cert` and `--tls-key` (PEM) turn TLS on; `--tls-client-ca` (PEM, one or more
//! CA certificates) also makes every client present a certificate issued by one of
//! them, or its handshake fails (mutual TLS). ALPN offers `h2` only: gRPC.
//!
//! Rotation: the files are read again every few seconds, and at once on SIGHUP. When
//! their bytes change, a new rustls configuration is built and swapped in for the
//! handshakes that follow; connections already open keep the session they negotiated,
//! so nothing is dropped (cert-manager and Kubernetes Secrets rewrite the files in
//! place). A rewrite that does not make a valid configuration (half written, a key that
//! does not match the certificate) keeps the previous one; it never stops the server.
//! A failed reading is a warning the first time (a Secret read mid-swap, the new
//! certificate with the old key, is set right by the next), and an error only when the
//! next reading fails too. At start-up, unreadable or invalid files are an error. Each
//! file must be a regular file of at most 1 MiB (a FIFO or a device is refused, not
//! waited on), and reloads read them on a thread of their own, never on the runtime's.
//!
//! Handshakes run in tasks of their own, off the accept loop, each within a deadline: a
//! client that connects and never finishes its handshake holds only its own task, for
//! at most that long (5 s by default), and at most 1,024 are under way at once, 64 from
//! any one IP address (a connection past either is closed). Failures are counted in
//! `resnet_serve_tls_handshake_failures_total{reason}` (`timeout`, `error`, `busy`),
//! reloads in
//! `resnet_serve_tls_reloads_total{result}` (`applied`, and `failed`: only failures that
//! persisted to the next reading, each error once).
//!
//! Its parts: `files` reads the files (regular files within a size limit) and builds
//! a rustls configuration from them; `reload` re-reads them on a timer and on SIGHUP;
//! `handshake` accepts connections and runs their handshakes within the deadline and
//! the caps, handing them to the server until the stop.

mod files;
mod handshake;
mod reload;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_rustls::rustls::ServerConfig;

use files::{build, Files};

/// How often the files are looked at for a change.
pub const DEFAULT_RELOAD_EVERY: Duration = Duration::from_secs(5);

/// How long a client has to finish its handshake: a handshake takes a few round trips,
/// and the deadline is what a connection that never finishes holds a slot for.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Handshakes under way at once; a connection past it is closed at once.
pub const DEFAULT_MAX_HANDSHAKES: usize = 1024;

/// Handshakes under way at once from one IP address, so that one host cannot take all
/// of [`DEFAULT_MAX_HANDSHAKES`].
pub const DEFAULT_MAX_HANDSHAKES_PER_IP: u32 = 64;

/// Where the certificates are, and how patient to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOptions {
    /// The server's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) client certificates must chain to; `None`: no client
    /// certificate is asked for.
    pub client_ca: Option<PathBuf>,
    pub reload_every: Duration,
    pub handshake_timeout: Duration,
    /// Handshakes under way at once. Each holds a task and rustls' buffers for up to
    /// `handshake_timeout`: a flood of connections that never finish theirs is bounded
    /// here, refused (closed) past it, rather than held in memory.
    pub max_handshakes: usize,
    /// Handshakes under way at once from one IP address; past it, as past
    /// `max_handshakes`. Clients behind one NAT share it.
    pub max_handshakes_per_ip: u32,
}

impl TlsOptions {
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        TlsOptions {
            cert: cert.into(),
            key: key.into(),
            client_ca: None,
            reload_every: DEFAULT_RELOAD_EVERY,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_ip: DEFAULT_MAX_HANDSHAKES_PER_IP,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS {what} file {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS {what} file {path}: {reason}")]
    Invalid {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// A bug, not the operator's: what was read does not match what was asked for.
    #[error("TLS configuration: {0}")]
    Inconsistent(&'static str),
    #[error("TLS certificate {cert} and key {key}: {reason}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// The configuration handshakes use now, and the reading it was built from.
struct Current {
    config: Arc<ServerConfig>,
    digest: [u8; 32],
}

/// TLS for the gRPC port: the current configuration, reloaded when the files change,
/// and the handshakes of accepted connections.
pub struct Tls {
    options: TlsOptions,
    /// Held only to read or swap an `Arc`, never across an await: a std lock.
    current: RwLock<Current>,
    handshake_failures: prometheus::IntCounterVec,
    reloads: prometheus::IntCounterVec,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Whether a reload changed anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    Applied,
}

impl Tls {
    /// Reads and checks the files: an error here keeps the server from starting.
    pub fn load(
        options: TlsOptions,
        metrics: &crate::process::metrics::Metrics,
    ) -> Result<Arc<Tls>, TlsError> {
        let files = Files::read(&options)?;
        let config = build(&options, &files)?;
        Ok(Arc::new(Tls {
            current: RwLock::new(Current {
                config,
                digest: files.digest(),
            }),
            options,
            handshake_failures: metrics.tls_handshake_failures(),
            reloads: metrics.tls_reloads(),
        }))
    }

    /// The configuration for the next handshake.
    fn config(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(c) => c.config.clone(),
            Err(poisoned) => poisoned.into_inner().config.clone(),
        }
    }

    /// Reads the files again and, if they changed and make a valid configuration, uses
    /// it for the handshakes that follow. On an error the previous one stays.
    pub fn reload(&self) -> Result<Reload, TlsError> {
        let files = Files::read(&self.options)?;
        let digest = files.digest();
        let unchanged = match self.current.read() {
            Ok(c) => c.digest == digest,
            Err(poisoned) => poisoned.into_inner().digest == digest,
        };
        if unchanged {
            return Ok(Reload::Unchanged);
        }
        let config = build(&self.options, &files)?;
        let mut current = match self.current.write() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        *current = Current { config, digest };
        Ok(Reload::Applied)
    }
}

#[cfg(test)]
mod fixtures;

#[cfg(test)]
mod tests {
    use super::fixtures::{client, handshake, Ca, Setup};
    use super::*;

    #[tokio::test]
    async fn serves_its_certificate_and_takes_a_rotation() {
        let ca = Ca::new("test CA");
        let first = ca.leaf("first");
        let setup = Setup::new(&first, None);
        let metrics = crate::process::metrics::Metrics::new();
        let tls = Tls::load(setup.options.clone(), &metrics).expect("loads");
        assert_eq!(
            handshake(&tls, client(&ca, None)).await,
            Ok(first.der.clone())
        );
        assert_eq!(tls.reload().expect("reload"), Reload::Unchanged);

        let second = ca.leaf("second");
        setup.write(&second);
        assert_eq!(tls.reload().expect("reload"), Reload::Applied);
        assert_eq!(
            handshake(&tls, client(&ca, None)).await,
            Ok(second.der.clone())
        );

        // A key that is not the certificate's, and a half-written certificate: refused,
        // the previous configuration stays.
        let third = ca.leaf("third");
        std::fs::write(&setup.options.cert, &third.cert).expect("write");
        let err = tls.reload().expect_err("mismatched key");
        assert!(matches!(err, TlsError::Pair { .. }), "{err}");
        std::fs::write(&setup.options.cert, &third.cert[..third.cert.len() / 2]).expect("write");
        std::fs::write(&setup.options.key, &third.key).expect("write");
        assert!(tls.reload().is_err());
        std::fs::remove_file(&setup.options.key).expect("remove");
        assert!(matches!(tls.reload(), Err(TlsError::Read { .. })));
        assert_eq!(
            handshake(&tls, client(&ca, None)).await,
            Ok(second.der.clone())
        );

        // Once the files are whole again, they are taken.
        setup.write(&third);
        assert_eq!(tls.reload().expect("reload"), Reload::Applied);
        assert_eq!(handshake(&tls, client(&ca, None)).await, Ok(third.der));
        drop(setup.dir);
    }

    #[tokio::test]
    async fn client_certificates_of_its_ca_only() {
        let ca = Ca::new("server CA");
        let clients = Ca::new("client CA");
        let foreign = Ca::new("foreign CA");
        let setup = Setup::new(&ca.leaf("server"), Some(&clients));
        let metrics = crate::process::metrics::Metrics::new();
        let tls = Tls::load(setup.options.clone(), &metrics).expect("loads");

        let good = clients.leaf("good client");
        assert!(handshake(&tls, client(&ca, Some(&good))).await.is_ok());
        let none = handshake(&tls, client(&ca, None)).await;
        assert!(none.is_err(), "no client certificate: {none:?}");
        let stranger = foreign.leaf("stranger");
        let refused = handshake(&tls, client(&ca, Some(&stranger))).await;
        assert!(refused.is_err(), "foreign client certificate: {refused:?}");

        // The client CA rotates too: the foreign CA's clients are let in.
        let ca_path = setup.options.client_ca.clone().expect("path");
        std::fs::write(&ca_path, &foreign.pem).expect("write");
        assert_eq!(tls.reload().expect("reload"), Reload::Applied);
        assert!(handshake(&tls, client(&ca, Some(&stranger))).await.is_ok());
        assert!(handshake(&tls, client(&ca, Some(&good))).await.is_err());
    }
}
