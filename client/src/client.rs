//! [`Client`]: the connections to one or more endpoints and the calls made on them,
//! with the configured deadline, token and retries.

use std::time::Duration;

use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use crate::proto::{self, classifier_client::ClassifierClient, ClassifyRequest, ClassifyResponse};
use crate::{wire, ClientConfig, ClientError, Output};

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
