//! Client for resnet-serve's `resnet_serve.v1` gRPC API.
//!
//! [`proto`] holds the stubs generated from the workspace's `proto/` (client side only;
//! nothing here depends on Candle). [`Client`] adds what a service calling us needs:
//! several endpoints balanced, connect and per-call timeouts, optional TLS, and retries
//! with backoff for UNAVAILABLE only (a draining or restarting replica), never for
//! errors a retry cannot fix.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use resnet_client::{Client, ClientConfig, Output};
//!
//! let client = Client::connect(ClientConfig::new(["http://127.0.0.1:50051"])).await?;
//! let jpeg = std::fs::read("cat.jpg")?;
//! let response = client
//!     .classify("resnet50_swsl", vec![resnet_client::encoded(jpeg)], Output::TopK(5))
//!     .await?;
//! for class in &response.results[0].top {
//!     println!("{:.3} {}", class.score, class.label);
//! }
//! # Ok(()) }
//! ```

pub mod codec;
pub mod load;
pub mod metrics;
pub mod shm;
pub mod soak;
pub mod video;
pub mod wire;

pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("resnet_serve.v1");

    /// The KServe v2 / Triton `inference` protocol (client stubs), which the server also
    /// speaks on the same port.
    pub mod inference {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("inference");
    }
}

use std::time::Duration;

use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use proto::classifier_client::ClassifierClient;
use proto::{image, ClassifyRequest, ClassifyResponse, OutputKind, OutputSpec};

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

/// What to get back per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Logits,
    Probabilities,
    TopK(u32),
}

impl Output {
    pub fn spec(self) -> OutputSpec {
        match self {
            Output::Logits => OutputSpec {
                kind: OutputKind::Logits as i32,
                top_k: 0,
            },
            Output::Probabilities => OutputSpec {
                kind: OutputKind::Probabilities as i32,
                top_k: 0,
            },
            Output::TopK(k) => OutputSpec {
                kind: OutputKind::TopK as i32,
                top_k: k,
            },
        }
    }
}

/// An encoded image (JPEG, PNG, WebP, BMP, GIF).
pub fn encoded(data: Vec<u8>) -> proto::Image {
    proto::Image {
        kind: Some(image::Kind::Encoded(proto::EncodedImage {
            data: data.into(),
        })),
    }
}

/// A raw RGB8 frame, `height x width x 3`.
pub fn raw(width: u32, height: u32, rgb: Vec<u8>) -> proto::Image {
    proto::Image {
        kind: Some(image::Kind::Raw(proto::RawFrame {
            width,
            height,
            rgb: rgb.into(),
        })),
    }
}

/// A ready, normalised `3 x 224 x 224` tensor.
pub fn tensor(values: &[f32]) -> proto::Image {
    proto::Image {
        kind: Some(image::Kind::Tensor(proto::FloatTensor {
            data: values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        })),
    }
}

/// HTTP/2 flow-control windows, sized for requests of many float tensors.
const HTTP2_STREAM_WINDOW: u32 = 8 << 20;
const HTTP2_CONNECTION_WINDOW: u32 = 32 << 20;

/// A connected client; cheap to clone (clones share the connections).
#[derive(Clone)]
pub struct Client {
    channel: Channel,
    stub: ClassifierClient<Channel>,
    kserve: proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient<Channel>,
    config: ClientConfig,
    /// `Bearer <token>`, checked once when connecting.
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl Client {
    /// Connects to every endpoint (balanced when there are several).
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let authorization = config
            .token
            .as_ref()
            .map(|t| format!("Bearer {}", t.0.trim()).parse())
            .transpose()
            .map_err(|_| ClientError::Token)?;
        let mut endpoints = Vec::with_capacity(config.endpoints.len());
        for url in &config.endpoints {
            let mut e = Endpoint::from_shared(url.clone())
                .map_err(|source| ClientError::Endpoint {
                    endpoint: url.clone(),
                    source,
                })?
                .connect_timeout(config.connect_timeout)
                .tcp_nodelay(true)
                // A batch of float tensors is tens of MiB: HTTP/2's default 64 KiB window
                // would cost a WINDOW_UPDATE round trip per 64 KiB.
                .initial_stream_window_size(HTTP2_STREAM_WINDOW)
                .initial_connection_window_size(HTTP2_CONNECTION_WINDOW);
            if config.tls.is_some() && !url.starts_with("https://") {
                // tonic would connect in plaintext, quietly, with TLS configured.
                return Err(ClientError::PlaintextEndpoint(url.clone()));
            }
            if url.starts_with("https://") {
                let tls = config
                    .tls
                    .clone()
                    .unwrap_or_else(|| ClientTlsConfig::new().with_webpki_roots());
                e = e.tls_config(tls).map_err(|source| ClientError::Endpoint {
                    endpoint: url.clone(),
                    source,
                })?;
            }
            endpoints.push(e);
        }
        let channel = match endpoints.len() {
            0 => return Err(ClientError::NoEndpoints),
            1 => endpoints
                .remove(0)
                .connect()
                .await
                .map_err(ClientError::Connect)?,
            _ => Channel::balance_list(endpoints.into_iter()),
        };
        let kserve =
            proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient::new(
                channel.clone(),
            )
            .max_decoding_message_size(config.max_message_bytes)
            .max_encoding_message_size(config.max_message_bytes);
        let stub = ClassifierClient::new(channel.clone())
            .max_decoding_message_size(config.max_message_bytes)
            .max_encoding_message_size(config.max_message_bytes);
        Ok(Client {
            channel,
            stub,
            kserve,
            config,
            authorization,
        })
    }

    /// The configuration it connected with (to open more connections like it).
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// A KServe v2 / Triton stub on the same connections.
    pub fn kserve_stub(
        &self,
    ) -> proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient<Channel> {
        self.kserve.clone()
    }

    /// The generated stub, for calls this layer does not wrap.
    pub fn stub(&self) -> ClassifierClient<Channel> {
        self.stub.clone()
    }

    /// Sends an encoded request to `path` (one of [`wire`]'s paths) with this call's
    /// deadline (`None`: none): its large fields go out as the caller's own buffers.
    pub async fn unary<R: prost::Message + Default + Send + 'static>(
        &self,
        path: &'static str,
        request: wire::Encoded,
        timeout: Option<Duration>,
    ) -> Result<R, Status> {
        let mut call = tonic::Request::new(());
        if let Some(t) = timeout {
            call.set_timeout(t);
        }
        self.authorize(call.metadata_mut());
        wire::unary(
            self.channel.clone(),
            path,
            request,
            call.into_parts().0,
            self.limits(),
        )
        .await
    }

    fn limits(&self) -> wire::Limits {
        wire::Limits {
            max_request: self.config.max_message_bytes,
            max_response: self.config.max_message_bytes,
        }
    }

    /// A request carrying the configured deadline and token.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        if let Some(t) = self.config.timeout {
            r.set_timeout(t);
        }
        self.authorize(r.metadata_mut());
        r
    }

    /// Adds the configured token, if any, to a call's metadata.
    fn authorize(&self, metadata: &mut MetadataMap) {
        if let Some(value) = &self.authorization {
            metadata.insert("authorization", value.clone());
        }
    }

    /// Classifies `images` with `model` (empty: the server's default).
    pub async fn classify(
        &self,
        model: &str,
        images: Vec<proto::Image>,
        output: Output,
    ) -> Result<ClassifyResponse, Status> {
        self.classify_request(ClassifyRequest {
            model: model.to_string(),
            images,
            output: Some(output.spec()),
            request_id: String::new(),
        })
        .await
    }

    /// Sends a request, retrying with exponential backoff while the server answers
    /// UNAVAILABLE.
    pub async fn classify_request(
        &self,
        request: ClassifyRequest,
    ) -> Result<ClassifyResponse, Status> {
        self.classify_with_timeout(request, self.config.timeout)
            .await
    }

    /// As [`Client::classify_request`], with this call's own deadline (`None`: none).
    pub async fn classify_with_timeout(
        &self,
        request: ClassifyRequest,
        timeout: Option<Duration>,
    ) -> Result<ClassifyResponse, Status> {
        let mut backoff = self.config.backoff;
        let mut attempt = 0;
        loop {
            let encoded = wire::Encoded::new(&request);
            match self.unary(wire::CLASSIFY, encoded, timeout).await {
                Ok(r) => return Ok(r),
                Err(s) if s.code() == Code::Unavailable && attempt < self.config.retries => {
                    attempt += 1;
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(s) => return Err(s),
            }
        }
    }

    /// Opens a `ClassifyStream`: frames go out as `frames` yields them; results come
    /// back in the same order.
    pub async fn classify_stream(
        &self,
        frames: impl tokio_stream::Stream<Item = proto::StreamFrame> + Send + 'static,
    ) -> Result<tonic::Streaming<proto::StreamResult>, Status> {
        use tokio_stream::StreamExt;
        let mut metadata = MetadataMap::new();
        self.authorize(&mut metadata);
        wire::streaming(
            self.channel.clone(),
            wire::CLASSIFY_STREAM,
            frames.map(|f| wire::Encoded::new(&f)),
            metadata,
            self.limits(),
        )
        .await
    }

    pub async fn list_models(&self) -> Result<Vec<proto::ModelInfo>, Status> {
        let mut stub = self.stub.clone();
        Ok(stub
            .list_models(self.request(proto::ListModelsRequest {}))
            .await?
            .into_inner()
            .models)
    }
}
