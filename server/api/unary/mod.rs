//! Unary and streaming RPCs decoded from the request's HTTP/2 DATA frames as they
//! arrived.
//!
//! tonic copies every DATA frame of a request into one contiguous buffer before it
//! decodes the message. For a request of float tensors that is a whole extra pass over
//! tens of MiB: on a tensor load it was the server's largest single cost after the
//! kernel's own socket copy. [`FrameRoutes`] serves the hot unary methods (`Classify`,
//! KServe's `ModelInfer`) itself: the frames stay the `Bytes` that h2 read them into,
//! and the protobuf is decoded across them ([`Frames`]), so a `bytes` field that lies
//! inside one frame comes out as a slice of that frame. Only a field that straddles a
//! frame boundary is copied, which is why the server also lets clients send large
//! frames. A field longer than any frame (KServe's `raw_input_contents`, a whole batch
//! of tensors) can be kept as its frames' slices ([`WithSegments`], [`Segmented`]) and
//! cut into images from there. The streaming methods (`ClassifyStream`, KServe's
//! `ModelStreamInfer`) get their messages the same way, one at a time as each is
//! complete ([`FrameRoutes::streaming`]). Everything else about the call is what tonic
//! does: the interceptor runs as
//! the headers arrive, the message-size limits and their statuses, the refusal of
//! compressed requests (handed to tonic itself), metadata and extensions, and tonic's
//! own encoder for the response. Every other method of the service goes to tonic.

mod fields;
mod frames;
mod read;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tonic::body::Body;
use tonic::codec::{Codec, EncodeBody, SingleMessageCompressionOverride};
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::api::admission::{Bounded, ByteBudget, Counts};

pub use fields::{FromFrames, WithSegments};
pub use frames::{Frames, Segmented};
pub use read::{messages, read_message, Messages};

/// The gRPC message prefix: a compressed flag, then the length as a big-endian u32.
const PREFIX_LEN: usize = 5;

/// An interceptor in tonic's form: sees the call's headers before its body is read.
pub type Interceptor = fn(Request<()>) -> Result<Request<()>, Status>;

type RouteFuture = Pin<Box<dyn Future<Output = http::Response<Body>> + Send>>;
type Route = Arc<dyn Fn(http::Request<Body>) -> RouteFuture + Send + Sync>;

/// Message-size limits, as tonic's `max_decoding_message_size` /
/// `max_encoding_message_size` set them, and what a message may cost before it is
/// decoded (server/api/admission.rs).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_decoding: usize,
    pub max_encoding: usize,
    /// Bounds on the counts of repeated fields, checked before decoding.
    pub counts: Counts,
    /// The server's budget for the bytes of messages in flight.
    pub budget: Arc<ByteBudget>,
}

/// A tonic service with some of its unary methods served from the frames as received.
/// It keeps the inner service's name, so it takes that service's place in the router.
#[derive(Clone)]
pub struct FrameRoutes<S> {
    inner: S,
    routes: Arc<HashMap<&'static str, Route>>,
    limits: Limits,
    interceptor: Interceptor,
}

impl<S> FrameRoutes<InterceptedService<S, Interceptor>> {
    /// `service` (behind `interceptor`, as the routed methods are) answers every method
    /// not routed here, and every compressed request.
    pub fn new(service: S, limits: Limits, interceptor: Interceptor) -> Self {
        FrameRoutes {
            inner: InterceptedService::new(service, interceptor),
            routes: Arc::new(HashMap::new()),
            limits,
            interceptor,
        }
    }
}

impl<S> FrameRoutes<S> {
    /// Serves `path` ("/package.Service/Method") with `handler`, the same function the
    /// generated service trait would call.
    pub fn unary<M, R, F, Fut>(self, path: &'static str, handler: F) -> Self
    where
        M: FromFrames + Bounded + Send + 'static,
        R: prost::Message + Default + Send + 'static,
        F: Fn(Request<M>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response<R>, Status>> + Send + 'static,
    {
        self.route(path, handler, |handler, limits, head, body| async move {
            // Held until the answer is made: the message's bytes count against the
            // server's budget while any of them may still be in use.
            let (frames, trailers, _reservation) =
                read_message(body, limits.max_decoding, &limits.budget).await?;
            M::check_counts(&frames, &limits.counts)?;
            let message = M::decode_frames(frames)?;
            let (mut metadata, extensions, ()) = head.into_parts();
            if let Some(trailers) = trailers {
                let mut headers = metadata.into_headers();
                headers.extend(trailers);
                metadata = MetadataMap::from_headers(headers);
            }
            let response = handler(Request::from_parts(metadata, extensions, message)).await?;
            Ok(encode(
                response.map(|message| tokio_stream::once(Ok(message))),
                limits.max_encoding,
            ))
        })
    }

    /// Serves the streaming method `path` with `handler`, which gets the call's messages
    /// as a stream decoded from its frames (tonic's `Streaming` in all but the copy).
    pub fn streaming<M, R, Out, F, Fut>(self, path: &'static str, handler: F) -> Self
    where
        M: FromFrames + Bounded + Send + 'static,
        R: prost::Message + Default + Send + 'static,
        Out: tokio_stream::Stream<Item = Result<R, Status>> + Send + 'static,
        F: Fn(Request<Messages<M>>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response<Out>, Status>> + Send + 'static,
    {
        self.route(path, handler, |handler, limits, head, body| async move {
            let (metadata, extensions, ()) = head.into_parts();
            let max_encoding = limits.max_encoding;
            let messages = messages(body, limits);
            let response = handler(Request::from_parts(metadata, extensions, messages)).await?;
            Ok(encode(response, max_encoding))
        })
    }

    /// Routes `path` to `serve`, which gets the method's `handler`, the limits, the call's
    /// head as the interceptor passed it (with the method recorded, as tonic's generated
    /// server does) and its body; an error from either is the call's status.
    fn route<H, F, Fut>(mut self, path: &'static str, handler: H, serve: F) -> Self
    where
        H: Send + Sync + 'static,
        F: Fn(Arc<H>, Limits, Request<()>, Body) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<http::Response<Body>, Status>> + Send + 'static,
    {
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or((path, ""));
        let (handler, serve) = (Arc::new(handler), Arc::new(serve));
        let limits = self.limits.clone();
        let interceptor = self.interceptor;
        let route: Route = Arc::new(move |request| {
            let (handler, serve, limits) = (handler.clone(), serve.clone(), limits.clone());
            Box::pin(async move {
                let (parts, body) = request.into_parts();
                let call = async {
                    let mut head =
                        interceptor(Request::from_http(http::Request::from_parts(parts, ())))?;
                    head.extensions_mut()
                        .insert(tonic::GrpcMethod::new(service, method));
                    serve(handler, limits, head, body).await
                };
                call.await.unwrap_or_else(|status| status.into_http())
            })
        });
        Arc::make_mut(&mut self.routes).insert(path, route);
        self
    }
}

impl<S: NamedService> NamedService for FrameRoutes<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tonic::codegen::Service<http::Request<Body>> for FrameRoutes<S>
where
    S: tonic::codegen::Service<
        http::Request<Body>,
        Response = http::Response<B>,
        Error = Infallible,
    >,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        match self.routes.get(request.uri().path()) {
            Some(route) if !compressed(&request) => {
                let answer = route(request);
                Box::pin(async move { Ok(answer.await) })
            }
            _ => {
                let answer = self.inner.call(request);
                Box::pin(async move { answer.await.map(|r| r.map(Body::new)) })
            }
        }
    }
}

/// Whether the request declares a compressed body: those go to tonic, which refuses
/// them (no compression is enabled) with its own UNIMPLEMENTED answer.
fn compressed<B>(request: &http::Request<B>) -> bool {
    request
        .headers()
        .get("grpc-encoding")
        .is_some_and(|e| e.as_bytes() != b"identity")
}

/// tonic's own server-side encoder, its response headers and its trailers, for the
/// one message of a unary reply or each of a stream's.
fn encode<R, S>(response: Response<S>, max_encoding: usize) -> http::Response<Body>
where
    R: prost::Message + Default + Send + 'static,
    S: tokio_stream::Stream<Item = Result<R, Status>> + Send + 'static,
{
    let (metadata, messages, extensions) = response.into_parts();
    let body = EncodeBody::new_server(
        tonic_prost::ProstCodec::<R, R>::default().encoder(),
        messages,
        None,
        SingleMessageCompressionOverride::default(),
        Some(max_encoding),
    );
    let mut http = http::Response::new(Body::new(body));
    *http.version_mut() = http::Version::HTTP_2;
    *http.headers_mut() = metadata.into_headers();
    *http.extensions_mut() = extensions;
    http.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    http
}

#[cfg(test)]
mod test_requests {
    //! Classifier requests carrying tensors, whose bytes a test can find again.

    use bytes::Bytes;

    use crate::proto;

    pub(super) fn tensor_request(tensors: usize, bytes_each: usize) -> proto::ClassifyRequest {
        proto::ClassifyRequest {
            model: "m".into(),
            images: (0..tensors)
                .map(|i| proto::Image {
                    kind: Some(proto::image::Kind::Tensor(proto::FloatTensor {
                        data: Bytes::from(vec![i as u8 + 1; bytes_each]),
                    })),
                })
                .collect(),
            output: None,
            request_id: "r".into(),
        }
    }

    pub(super) fn tensor_data(request: &proto::ClassifyRequest) -> Vec<&Bytes> {
        request
            .images
            .iter()
            .filter_map(|i| match &i.kind {
                Some(proto::image::Kind::Tensor(t)) => Some(&t.data),
                _ => None,
            })
            .collect()
    }
}
