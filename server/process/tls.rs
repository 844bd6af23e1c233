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

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

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

/// Finished handshakes waiting for the server to take them; past it, handshakes wait.
const READY_CONNECTIONS: usize = 64;

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

/// One reading of the files.
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

/// The most a certificate, key or CA file may hold. A chain of a few certificates is a
/// few KiB; a CA bundle as big as the system's is ~200 KiB.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// One file, whole: a regular file of at most [`MAX_FILE_BYTES`]. A FIFO would block
/// the read (or, without O_NONBLOCK, the open) until someone writes to it, and a device
/// such as `/dev/zero` would never end; both are refused.
fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let unreadable = |source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    let invalid = |reason: String| TlsError::Invalid {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    // Followed if a symbolic link: Kubernetes mounts Secrets as links into `..data/`.
    let file = options.open(path).map_err(unreadable)?;
    let metadata = file.metadata().map_err(unreadable)?;
    if !metadata.is_file() {
        return Err(invalid("not a regular file".into()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(invalid(format!("larger than {} MiB", MAX_FILE_BYTES >> 20)));
    }
    Ok(bytes)
}

impl Files {
    fn read(options: &TlsOptions) -> Result<Files, TlsError> {
        Ok(Files {
            cert: read_file("certificate", &options.cert)?,
            key: read_file("key", &options.key)?,
            client_ca: options
                .client_ca
                .as_deref()
                .map(|p| read_file("client CA", p))
                .transpose()?,
        })
    }

    /// What tells one reading from another, without keeping the key's bytes around.
    fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()] {
            match part {
                Some(bytes) => {
                    h.update((bytes.len() as u64).to_le_bytes());
                    h.update(bytes);
                }
                None => h.update(u64::MAX.to_le_bytes()),
            }
        }
        h.finalize().into()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate of a PEM file, at least one.
fn certificates(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let invalid = |reason: String| TlsError::Invalid {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid("holds no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// The rustls configuration of one reading of the files.
fn build(options: &TlsOptions, files: &Files) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates("certificate", &options.cert, &files.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|e| TlsError::Invalid {
        what: "key",
        path: options.key.clone(),
        reason: format!("no private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
    })?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Pair {
            cert: options.cert.clone(),
            key: options.key.clone(),
            reason: e.to_string(),
        })?;
    let builder = match (&options.client_ca, &files.client_ca) {
        (Some(path), Some(pem)) => {
            let invalid = |reason: String| TlsError::Invalid {
                what: "client CA",
                path: path.clone(),
                reason,
            };
            let mut roots = RootCertStore::empty();
            for ca in certificates("client CA", path, pem)? {
                roots
                    .add(ca)
                    .map_err(|e| invalid(format!("not a CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| invalid(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        (None, None) => builder.with_no_client_auth(),
        // Never reached as the files are read; spelled out so that no change can turn
        // mutual TLS off without saying so.
        (Some(path), None) => {
            return Err(TlsError::Invalid {
                what: "client CA",
                path: path.clone(),
                reason: "was not read; refusing to serve without client certificates".into(),
            })
        }
        (None, Some(_)) => {
            return Err(TlsError::Inconsistent(
                "a client CA was read, but no --tls-client-ca names one",
            ))
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Pair {
            cert: options.cert.clone(),
            key: options.key.clone(),
            reason: e.to_string(),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

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

/// Handshakes under way per source IP address; an address leaves the map when its
/// last handshake ends, so it holds only addresses with one under way.
#[derive(Debug)]
struct PerIp {
    limit: u32,
    under_way: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, u32>>,
}

/// One handshake's place in [`PerIp`], given back when dropped.
struct IpSlot {
    per_ip: Arc<PerIp>,
    ip: std::net::IpAddr,
}

impl PerIp {
    fn try_take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<IpSlot> {
        // An IPv4 client on a dual-stack socket arrives as ::ffff:a.b.c.d.
        let ip = ip.to_canonical();
        let mut map = self.under_way.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.get(&ip).copied().unwrap_or(0);
        if n >= self.limit {
            return None;
        }
        map.insert(ip, n.saturating_add(1));
        Some(IpSlot {
            per_ip: self.clone(),
            ip,
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.under_way
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self
            .per_ip
            .under_way
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
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

    /// Accepts connections on `listener` and yields them once their handshake is done.
    /// Each handshake is a task of its own with a deadline, so none waits for another.
    ///
    /// When `stop` resolves, the listener closes at once (a client then finds the port
    /// closed: its request was never sent), the handshakes under way finish or time out,
    /// and the stream ends once every connection they made has been yielded. The server
    /// must stop on the stream's end, not on a signal of its own: a connection accepted
    /// and handshaken but not yet taken from the stream would be dropped with a request
    /// the client sent on it (tests/soak.rs, over TLS). Dropping the stream also closes
    /// the listener.
    pub fn incoming(
        self: &Arc<Self>,
        listener: TcpListener,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
        let (tx, rx) = mpsc::channel(READY_CONNECTIONS);
        let tls = self.clone();
        let handshakes = Arc::new(tokio::sync::Semaphore::new(self.options.max_handshakes));
        let per_ip = Arc::new(PerIp {
            limit: self.options.max_handshakes_per_ip,
            under_way: Default::default(),
        });
        tokio::spawn(async move {
            let mut errors = crate::process::accept::AcceptErrors::default();
            let mut stop = std::pin::pin!(stop);
            loop {
                // Out of descriptors, it waits rather than spins (crate::process::accept).
                // Biased: once `stop` has resolved, no connection is accepted after it.
                let (stream, peer) = tokio::select! {
                    biased;
                    () = &mut stop => break,
                    () = tx.closed() => break,
                    accepted = crate::process::accept::accept(&listener, &mut errors) => accepted,
                };
                let Some(ip_slot) = per_ip.try_take(peer.ip()) else {
                    tls.handshake_failures.with_label_values(&["busy"]).inc();
                    drop(stream);
                    continue;
                };
                let Ok(slot) = handshakes.clone().try_acquire_owned() else {
                    tls.handshake_failures.with_label_values(&["busy"]).inc();
                    drop(stream);
                    continue;
                };
                crate::process::server::nodelay(&stream);
                let acceptor = TlsAcceptor::from(tls.config());
                let tx = tx.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _slots = (slot, ip_slot);
                    match tokio::time::timeout(
                        tls.options.handshake_timeout,
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(connection)) => {
                            let _ = tx.send(Ok(connection)).await;
                        }
                        // Debug only: anyone who can reach the port can make these.
                        Ok(Err(e)) => {
                            tls.handshake_failures.with_label_values(&["error"]).inc();
                            tracing::debug!(?peer, "TLS handshake failed: {e}");
                        }
                        Err(_) => {
                            tls.handshake_failures.with_label_values(&["timeout"]).inc();
                            tracing::debug!(?peer, "TLS handshake timed out");
                        }
                    }
                });
            }
            // The port closes now; the stream ends when the last handshake's task, which
            // holds a sender, has handed its connection over or given up.
            drop(listener);
        });
        ReceiverStream::new(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::pki_types::ServerName;
    use tokio_rustls::rustls::ClientConfig;
    use tokio_rustls::TlsConnector;
    use tokio_stream::StreamExt;

    struct Ca {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    /// A certificate and its key, PEM, and the certificate's DER.
    struct Leaf {
        cert: String,
        key: String,
        der: CertificateDer<'static>,
    }

    impl Ca {
        fn new(name: &str) -> Ca {
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().expect("key");
            let cert = params.self_signed(&key).expect("self-signed");
            Ca {
                pem: cert.pem(),
                issuer: Issuer::new(params, key),
            }
        }

        fn leaf(&self, name: &str) -> Leaf {
            let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
            params.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().expect("key");
            let cert = params.signed_by(&key, &self.issuer).expect("signed");
            Leaf {
                cert: cert.pem(),
                key: key.serialize_pem(),
                der: cert.der().clone(),
            }
        }
    }

    struct Setup {
        dir: tempfile::TempDir,
        options: TlsOptions,
    }

    impl Setup {
        fn new(leaf: &Leaf, client_ca: Option<&Ca>) -> Setup {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut options =
                TlsOptions::new(dir.path().join("tls.crt"), dir.path().join("tls.key"));
            if let Some(ca) = client_ca {
                let path = dir.path().join("ca.crt");
                std::fs::write(&path, &ca.pem).expect("write");
                options.client_ca = Some(path);
            }
            let setup = Setup { dir, options };
            setup.write(leaf);
            setup
        }

        fn write(&self, leaf: &Leaf) {
            std::fs::write(&self.options.cert, &leaf.cert).expect("write");
            std::fs::write(&self.options.key, &leaf.key).expect("write");
        }
    }

    fn client(ca: &Ca, identity: Option<&Leaf>) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).expect("pem"))
            .expect("root");
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots);
        let mut config = match identity {
            Some(leaf) => builder
                .with_client_auth_cert(
                    vec![leaf.der.clone()],
                    PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).expect("key"),
                )
                .expect("client cert"),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        TlsConnector::from(Arc::new(config))
    }

    /// One handshake against the current configuration, over an in-memory pipe: the
    /// server's certificate as the client saw it, or the handshake's error. A TLS 1.3
    /// server refuses a client certificate after the client's side is done, so the
    /// client reads once to learn the outcome.
    async fn handshake(
        tls: &Tls,
        connector: TlsConnector,
    ) -> Result<CertificateDer<'static>, String> {
        let (client_io, server_io) = tokio::io::duplex(1 << 16);
        let acceptor = TlsAcceptor::from(tls.config());
        let server = tokio::spawn(async move {
            let mut s = acceptor
                .accept(server_io)
                .await
                .map_err(|e| e.to_string())?;
            s.write_all(b"ok").await.map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(s)
        });
        let name = ServerName::try_from("localhost").expect("name");
        let mut c = connector
            .connect(name, client_io)
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 2];
        c.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        let _ = server.await;
        let (_, session) = c.get_ref();
        assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));
        Ok(session.peer_certificates().expect("certificates")[0].clone())
    }

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

    #[test]
    fn bad_files_at_start_up_are_errors_that_name_them() {
        let ca = Ca::new("test CA");
        let leaf = ca.leaf("server");
        let metrics = crate::process::metrics::Metrics::new();
        let setup = Setup::new(&leaf, None);

        let mut missing = setup.options.clone();
        missing.cert = setup.dir.path().join("absent.crt");
        let err = Tls::load(missing, &metrics).expect_err("missing");
        assert!(err.to_string().contains("absent.crt"), "{err}");

        std::fs::write(&setup.options.cert, "not a certificate\n").expect("write");
        let err = Tls::load(setup.options.clone(), &metrics).expect_err("garbage");
        assert!(err.to_string().contains("no CERTIFICATE"), "{err}");

        std::fs::write(&setup.options.cert, &leaf.cert).expect("write");
        std::fs::write(&setup.options.key, &leaf.cert).expect("write");
        let err = Tls::load(setup.options.clone(), &metrics).expect_err("no key");
        assert!(err.to_string().contains("no private key"), "{err}");

        std::fs::write(&setup.options.key, ca.leaf("other").key).expect("write");
        let err = Tls::load(setup.options.clone(), &metrics).expect_err("foreign key");
        assert!(matches!(err, TlsError::Pair { .. }), "{err}");

        setup.write(&leaf);
        let mut no_ca = setup.options.clone();
        let ca_path = setup.dir.path().join("empty-ca.crt");
        std::fs::write(&ca_path, "").expect("write");
        no_ca.client_ca = Some(ca_path);
        let err = Tls::load(no_ca, &metrics).expect_err("empty CA");
        assert!(err.to_string().contains("client CA"), "{err}");
    }

    /// `Tls::load` on a thread, so that a regression that blocks fails the test
    /// instead of hanging it.
    fn load_within_seconds(options: TlsOptions) -> Result<Arc<Tls>, TlsError> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(Tls::load(options, &crate::process::metrics::Metrics::new()));
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("loading the files blocked")
    }

    #[cfg(unix)]
    #[test]
    fn fifos_devices_and_oversized_files_are_refused_not_waited_on() {
        let ca = Ca::new("test CA");
        let leaf = ca.leaf("server");
        let setup = Setup::new(&leaf, None);

        // Nobody writes to it: std::fs::read waited in open() for good.
        let fifo = setup.dir.path().join("fifo.crt");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
        let mut options = setup.options.clone();
        options.cert = fifo.clone();
        let err = load_within_seconds(options).expect_err("a FIFO");
        assert!(err.to_string().contains("not a regular file"), "{err}");
        assert!(err.to_string().contains("fifo.crt"), "{err}");

        // Endless: std::fs::read read it until memory ran out.
        let mut options = setup.options.clone();
        options.client_ca = Some(PathBuf::from("/dev/zero"));
        let err = load_within_seconds(options).expect_err("/dev/zero");
        assert!(err.to_string().contains("/dev/zero"), "{err}");

        // A valid chain padded past 1 MiB (PEM parsers skip the text between blocks):
        // it loaded before; now it is refused, at start-up and on reload.
        let padded = format!("{}{}", leaf.cert, "\n".repeat(1 << 20));
        let big = setup.dir.path().join("big.crt");
        std::fs::write(&big, &padded).expect("write");
        let mut options = setup.options.clone();
        options.cert = big.clone();
        let err = load_within_seconds(options).expect_err("oversized");
        assert!(err.to_string().contains("larger than 1 MiB"), "{err}");
        assert!(err.to_string().contains("big.crt"), "{err}");
        let tls = load_within_seconds(setup.options.clone()).expect("loads");
        std::fs::write(&setup.options.cert, &padded).expect("write");
        let err = tls.reload().expect_err("oversized on reload");
        assert!(err.to_string().contains("larger than 1 MiB"), "{err}");

        // At the limit exactly, it still loads.
        let fits = format!("{}{}", leaf.cert, "\n".repeat((1 << 20) - leaf.cert.len()));
        std::fs::write(&setup.options.cert, &fits).expect("write");
        assert!(tls.reload().is_ok());
    }

    #[test]
    fn a_client_ca_that_was_not_read_is_an_error_not_plain_tls() {
        let ca = Ca::new("test CA");
        let setup = Setup::new(&ca.leaf("server"), Some(&Ca::new("client CA")));
        let mut files = Files::read(&setup.options).expect("read");
        assert!(build(&setup.options, &files).is_ok());
        files.client_ca = None;
        let err = build(&setup.options, &files).expect_err("mutual TLS off");
        assert!(err.to_string().contains("ca.crt"), "{err}");
        let mut plain = setup.options.clone();
        plain.client_ca = None;
        files.client_ca = Some(ca.pem.clone().into_bytes());
        let err = build(&plain, &files).expect_err("a CA no option names");
        assert!(matches!(err, TlsError::Inconsistent(_)), "{err}");
    }

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

    #[tokio::test]
    async fn connections_past_the_handshakes_under_way_are_closed() {
        let ca = Ca::new("test CA");
        let mut setup = Setup::new(&ca.leaf("server"), None);
        setup.options.max_handshakes = 1;
        let metrics = crate::process::metrics::Metrics::new();
        let tls = Tls::load(setup.options.clone(), &metrics).expect("loads");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut incoming = tls.incoming(listener, std::future::pending());
        let name = || ServerName::try_from("localhost").expect("name");

        // The one slot, held by a client that says nothing.
        let silent = TcpStream::connect(addr).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let refused = client(&ca, None).connect(name(), tcp).await;
        assert!(refused.is_err(), "a handshake past the limit went through");
        assert_eq!(tls.handshake_failures.with_label_values(&["busy"]).get(), 1);

        // The slot is free again once the silent client leaves.
        drop(silent);
        let mut served = false;
        for _ in 0..100 {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            if client(&ca, None).connect(name(), tcp).await.is_ok() {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(served, "the slot was never given back");
        let accepted = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await;
        assert!(matches!(accepted, Ok(Some(Ok(_)))));
    }

    #[test]
    fn handshakes_per_ip_are_counted_and_forgotten_at_zero() {
        let per_ip = Arc::new(PerIp {
            limit: 2,
            under_way: Default::default(),
        });
        let a: std::net::IpAddr = "10.0.0.1".parse().expect("ip");
        let mapped: std::net::IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        let b: std::net::IpAddr = "10.0.0.2".parse().expect("ip");
        let first = per_ip.try_take(a).expect("one");
        let second = per_ip.try_take(mapped).expect("two, the same address");
        assert!(per_ip.try_take(a).is_none(), "a third from one address");
        let other = per_ip.try_take(b).expect("another address");
        drop(first);
        let third = per_ip.try_take(a).expect("a place was given back");
        drop((second, third, other));
        assert_eq!(
            per_ip.len(),
            0,
            "addresses with nothing under way are forgotten"
        );
    }

    #[tokio::test]
    async fn handshakes_past_the_limit_of_one_address_are_closed() {
        let ca = Ca::new("test CA");
        let mut setup = Setup::new(&ca.leaf("server"), None);
        setup.options.max_handshakes_per_ip = 1;
        let metrics = crate::process::metrics::Metrics::new();
        let tls = Tls::load(setup.options.clone(), &metrics).expect("loads");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mut incoming = tls.incoming(listener, std::future::pending());
        let name = || ServerName::try_from("localhost").expect("name");
        let from = |ip: [u8; 4]| async move {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket
                .bind(std::net::SocketAddr::from((ip, 0)))
                .expect("bind");
            socket
                .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
                .await
                .expect("connect")
        };

        // 127.0.0.1's one handshake, held by a client that says nothing.
        let silent = from([127, 0, 0, 1]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let refused = client(&ca, None)
            .connect(name(), from([127, 0, 0, 1]).await)
            .await;
        assert!(refused.is_err(), "a second handshake from one address");
        assert_eq!(tls.handshake_failures.with_label_values(&["busy"]).get(), 1);
        // Another address (all of 127/8 is loopback on Linux) is served meanwhile.
        let other = client(&ca, None)
            .connect(name(), from([127, 0, 0, 2]).await)
            .await;
        assert!(other.is_ok(), "{other:?}");
        let accepted = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await;
        assert!(matches!(accepted, Ok(Some(Ok(_)))));

        // Once the silent client leaves, its address may handshake again.
        drop(silent);
        let mut served = false;
        for _ in 0..100 {
            let tcp = from([127, 0, 0, 1]).await;
            if client(&ca, None).connect(name(), tcp).await.is_ok() {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(served, "the address's place was never given back");
    }

    #[tokio::test]
    async fn a_silent_client_does_not_hold_up_others_and_times_out() {
        let ca = Ca::new("test CA");
        let leaf = ca.leaf("server");
        let mut setup = Setup::new(&leaf, None);
        setup.options.handshake_timeout = Duration::from_millis(1500);
        let metrics = crate::process::metrics::Metrics::new();
        let tls = Tls::load(setup.options.clone(), &metrics).expect("loads");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut incoming = tls.incoming(listener, std::future::pending());

        // Connects and says nothing.
        let _silent = TcpStream::connect(addr).await.expect("connect");
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("localhost").expect("name");
        let connector = client(&ca, None);
        let client_side = tokio::spawn(async move { connector.connect(name, tcp).await });
        let accepted = tokio::time::timeout(Duration::from_millis(1200), incoming.next())
            .await
            .expect("the second client's handshake finishes before the first times out")
            .expect("a connection")
            .expect("accepted");
        assert!(accepted.get_ref().0.nodelay().expect("option"), "Nagle off");
        let _client = client_side.await.expect("task").expect("client handshake");

        tokio::time::sleep(Duration::from_millis(1600)).await;
        let timeouts = tls.handshake_failures.with_label_values(&["timeout"]).get();
        assert_eq!(timeouts, 1);

        // Plaintext HTTP/2 to the TLS port: a handshake error.
        let mut plain = TcpStream::connect(addr).await.expect("connect");
        plain
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .expect("write");
        let mut rest = Vec::new();
        let _ = plain.read_to_end(&mut rest).await;
        // Counted by the handshake's task once it has let go of the connection.
        let errors = || tls.handshake_failures.with_label_values(&["error"]).get();
        for _ in 0..200 {
            if errors() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(errors(), 1);
    }

    #[tokio::test]
    async fn at_stop_the_port_closes_and_every_handshaken_connection_is_yielded() {
        let ca = Ca::new("test CA");
        let setup = Setup::new(&ca.leaf("server"), None);
        let metrics = crate::process::metrics::Metrics::new();
        let tls = Tls::load(setup.options.clone(), &metrics).expect("loads");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut incoming = tls.incoming(listener, async {
            let _ = stop_rx.await;
        });
        let name = || ServerName::try_from("localhost").expect("name");

        // Handshaken before the stop and not yet taken from the stream: a client that
        // has sent its request on it.
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let mut waiting = client(&ca, None)
            .connect(name(), tcp)
            .await
            .expect("handshake");
        waiting.write_all(b"first").await.expect("write");
        waiting.flush().await.expect("flush");
        // Accepted before the stop, its handshake after it.
        let late = TcpStream::connect(addr).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(200)).await;

        stop_tx.send(()).expect("stop");
        let mut closed = false;
        for _ in 0..100 {
            if TcpStream::connect(addr).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(closed, "the port still takes connections after the stop");
        let mut late = client(&ca, None)
            .connect(name(), late)
            .await
            .expect("a handshake under way at the stop finishes");
        late.write_all(b"second").await.expect("write");
        late.flush().await.expect("flush");

        let mut got = Vec::new();
        while let Some(connection) = tokio::time::timeout(Duration::from_secs(5), incoming.next())
            .await
            .expect("the stream ends once both are yielded")
        {
            let mut connection = connection.expect("accepted");
            let mut buf = [0u8; 6];
            let n = connection.read(&mut buf).await.expect("read");
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        got.sort();
        assert_eq!(got, ["first", "second"]);
    }
}
