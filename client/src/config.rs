//! How to reach the server: endpoints, timeouts, retries, the bearer token and TLS
//! files, and the errors of connecting with them.

use std::time::Duration;

use tonic::transport::ClientTlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no endpoint given")]
    NoEndpoints,
    #[error("bad endpoint '{endpoint}': {source}")]
    Endpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("cannot connect: {0}")]
    Connect(#[source] tonic::transport::Error),
    #[error("the token is not a valid header value (printable ASCII only)")]
    Token,
    #[error("cannot read the TLS {what} file {path}: {source}")]
    TlsFile {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a TLS client certificate needs its key: give both --tls-cert and --tls-key")]
    TlsIdentity,
    #[error("TLS is configured but endpoint '{0}' is plaintext: use https://")]
    PlaintextEndpoint(String),
}

/// A bearer token: kept out of `Debug` output and logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(pub String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

/// How to reach the server(s) and how patient to be.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `http://host:port` or `https://host:port`; requests are balanced over all.
    pub endpoints: Vec<String>,
    pub connect_timeout: Duration,
    /// Deadline of each call (sent as `grpc-timeout`); `None` waits as long as it takes.
    pub timeout: Option<Duration>,
    /// TLS for `https://` endpoints (the webpki roots unless configured otherwise, see
    /// [`TlsFiles`]). When set, every endpoint must be `https://`.
    pub tls: Option<ClientTlsConfig>,
    /// Extra attempts after an UNAVAILABLE answer.
    pub retries: u32,
    /// First backoff; doubles each retry.
    pub backoff: Duration,
    /// Largest message received (logits of a large batch).
    pub max_message_bytes: usize,
    /// Sent with every call as `authorization: Bearer <token>` (a server started with
    /// `--auth-token-file`).
    pub token: Option<Token>,
}

impl ClientConfig {
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        ClientConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            connect_timeout: Duration::from_secs(5),
            timeout: None,
            tls: None,
            retries: 3,
            backoff: Duration::from_millis(50),
            max_message_bytes: 64 << 20,
            token: None,
        }
    }
}

/// TLS settings as files (the CLI's `--tls-*` flags): the CA to trust, a client
/// certificate and key for servers that require one (mutual TLS), and the name to
/// expect in the server's certificate when it is not the endpoint's host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM CA certificate(s); `None`: the webpki roots (public CAs).
    pub ca: Option<std::path::PathBuf>,
    /// PEM client certificate chain, with `key`.
    pub cert: Option<std::path::PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<std::path::PathBuf>,
    /// The server name to verify instead of the endpoint's host.
    pub domain: Option<String>,
}

impl TlsFiles {
    /// The TLS configuration these files make; `None` when no file or name is given
    /// (then `https://` endpoints use the webpki roots).
    pub fn config(&self) -> Result<Option<ClientTlsConfig>, ClientError> {
        if *self == TlsFiles::default() {
            return Ok(None);
        }
        let read = |what: &'static str, path: &std::path::Path| {
            std::fs::read(path).map_err(|source| ClientError::TlsFile {
                what,
                path: path.to_path_buf(),
                source,
            })
        };
        let mut tls = ClientTlsConfig::new();
        tls = match &self.ca {
            Some(ca) => {
                tls.ca_certificate(tonic::transport::Certificate::from_pem(read("CA", ca)?))
            }
            None => tls.with_webpki_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    read("certificate", cert)?,
                    read("key", key)?,
                ));
            }
            (None, None) => {}
            _ => return Err(ClientError::TlsIdentity),
        }
        if let Some(domain) = &self.domain {
            tls = tls.domain_name(domain.clone());
        }
        Ok(Some(tls))
    }
}
