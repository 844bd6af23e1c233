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

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use tonic::body::Body;
use tonic::codec::{Codec, EncodeBody, SingleMessageCompressionOverride};
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::api::admission::{Bounded, ByteBudget, Counts, Held, Reservation};

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
        let handler = Arc::new(handler);
        let limits = self.limits.clone();
        self.route(path, move |head, body| {
            let handler = handler.clone();
            let limits = limits.clone();
            async move {
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
            }
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
        let handler = Arc::new(handler);
        let limits = self.limits.clone();
        self.route(path, move |head, body| {
            let handler = handler.clone();
            let limits = limits.clone();
            async move {
                let (metadata, extensions, ()) = head.into_parts();
                let max_encoding = limits.max_encoding;
                let messages = messages(body, limits);
                let response = handler(Request::from_parts(metadata, extensions, messages)).await?;
                Ok(encode(response, max_encoding))
            }
        })
    }

    /// Routes `path` to `serve`, which gets the call's head as the interceptor passed it
    /// (with the method recorded, as tonic's generated server does) and its body; an
    /// error from either is the call's status.
    fn route<F, Fut>(mut self, path: &'static str, serve: F) -> Self
    where
        F: Fn(Request<()>, Body) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<http::Response<Body>, Status>> + Send + 'static,
    {
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or((path, ""));
        let serve = Arc::new(serve);
        let interceptor = self.interceptor;
        let route: Route = Arc::new(move |request| {
            let serve = serve.clone();
            Box::pin(async move {
                let (parts, body) = request.into_parts();
                let call = async {
                    let mut head =
                        interceptor(Request::from_http(http::Request::from_parts(parts, ())))?;
                    head.extensions_mut()
                        .insert(tonic::GrpcMethod::new(service, method));
                    serve(head, body).await
                };
                call.await.unwrap_or_else(|status| status.into_http())
            })
        });
        Arc::make_mut(&mut self.routes).insert(path, route);
        self
    }
}

/// A streaming call's messages, decoded from its frames as each is complete, each with
/// the share of the server's budget it holds until answered.
pub type Messages<M> = tokio_stream::wrappers::ReceiverStream<Result<Held<M>, Status>>;

/// Reads a streaming call's body in a task of its own and hands on each message as its
/// last byte arrives. Ends at the end of the body; a fault ends it after one error
/// (tonic's status for the same fault; RESOURCE_EXHAUSTED when the server's budget is
/// spent, INVALID_ARGUMENT past a count), and a call the client cancelled just ends. One
/// message waits at most, so a slow handler slows the reads, and HTTP/2 flow control
/// the client.
pub fn messages<M: FromFrames + Bounded + Send + 'static>(
    mut body: Body,
    limits: Limits,
) -> Messages<M> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let mut received = Frames::default();
        let mut message: Option<(usize, Reservation)> = None;
        loop {
            // Every message complete so far.
            loop {
                let len = match &message {
                    Some((len, _)) => *len,
                    None => match received.prefix() {
                        None => break,
                        Some(prefix) => match message_len_of(prefix, limits.max_decoding)
                            .and_then(|len| Ok((len, limits.budget.reserve(len)?)))
                        {
                            Ok((len, reservation)) => {
                                received.advance(PREFIX_LEN);
                                message = Some((len, reservation));
                                len
                            }
                            Err(status) => {
                                let _ = tx.send(Err(status)).await;
                                return;
                            }
                        },
                    },
                };
                if received.remaining() < len {
                    break;
                }
                let Some((_, reservation)) = message.take() else {
                    break;
                };
                let frames = received.split_to(len);
                let message = M::check_counts(&frames, &limits.counts)
                    .and_then(|()| M::decode_frames(frames))
                    .map(|message| Held {
                        message,
                        reservation: Some(reservation),
                    });
                let failed = message.is_err();
                if tx.send(message).await.is_err() || failed {
                    return;
                }
            }
            match body.frame().await {
                Some(Ok(frame)) => {
                    // Trailers of a request stream carry nothing a handler reads.
                    if let Ok(data) = frame.into_data() {
                        received.push(data);
                    }
                }
                Some(Err(status)) => {
                    if status.code() != tonic::Code::Cancelled {
                        let _ = tx.send(Err(status)).await;
                    }
                    return;
                }
                None => {
                    if received.remaining() > 0 || message.is_some() {
                        let _ = tx
                            .send(Err(Status::internal("Unexpected EOF decoding stream.")))
                            .await;
                    }
                    return;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
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

/// Reads a unary call's one message (the frames after its prefix) and the request's
/// trailers, if it sent any, with the message's reservation of `budget`, made as soon as
/// its prefix announces its length (a call past the budget is refused before its body is
/// read). The statuses are tonic's for the same faults.
pub async fn read_message(
    mut body: Body,
    max_decoding: usize,
    budget: &Arc<ByteBudget>,
) -> Result<(Frames, Option<http::HeaderMap>, Reservation), Status> {
    let mut received = Frames::default();
    let mut trailers: Option<http::HeaderMap> = None;
    let mut message_len = None;
    let mut reservation = None;
    while let Some(frame) = body.frame().await {
        match frame?.into_data() {
            Ok(data) => {
                received.push(data);
                if message_len.is_none() {
                    if let Some(prefix) = received.prefix() {
                        let len = message_len_of(prefix, max_decoding)?;
                        reservation = Some(budget.reserve(len)?);
                        message_len = Some(len);
                    }
                }
                // Refused as soon as it shows, so what a call holds stays within the limit.
                if message_len.is_some_and(|n| received.remaining() > PREFIX_LEN + n) {
                    return Err(Status::internal(
                        "protocol error: a unary call carries one message; this request had more",
                    ));
                }
            }
            Err(frame) => {
                if let Ok(more) = frame.into_trailers() {
                    trailers.get_or_insert_with(Default::default).extend(more);
                }
            }
        }
    }
    if received.remaining() == 0 {
        return Err(Status::internal("Missing request message."));
    }
    // Never more (refused above): fewer is a body that ended inside its message.
    let (Some(reservation), true) = (
        reservation,
        message_len == Some(received.remaining().saturating_sub(PREFIX_LEN)),
    ) else {
        return Err(Status::internal("Unexpected EOF decoding stream."));
    };
    received.advance(PREFIX_LEN);
    Ok((received, trailers, reservation))
}

/// The message length a prefix announces, checked against the limit.
fn message_len_of(prefix: [u8; PREFIX_LEN], limit: usize) -> Result<usize, Status> {
    match prefix[0] {
        0 => {}
        1 => {
            return Err(Status::internal(
                "protocol error: received message with compressed-flag but no grpc-encoding was specified",
            ))
        }
        flag => {
            return Err(Status::internal(format!(
                "protocol error: received message with invalid compression flag: {flag} (valid flags are 0 and 1) while receiving request"
            )))
        }
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len > limit {
        return Err(Status::out_of_range(format!(
            "Error, decoded message length too large: found {len} bytes, the limit is: {limit} bytes"
        )));
    }
    Ok(len)
}

/// A request message decoded from the frames that carried it; a malformed one is
/// INTERNAL with prost's reason, as tonic answers it.
pub trait FromFrames: Sized {
    fn decode_frames(frames: Frames) -> Result<Self, Status>;
}

fn decode_error(e: prost::DecodeError) -> Status {
    Status::internal(e.to_string())
}

impl<M: prost::Message + Default> FromFrames for M {
    fn decode_frames(frames: Frames) -> Result<Self, Status> {
        M::decode(frames).map_err(decode_error)
    }
}

/// Bytes that arrived in several frames, kept as the frames' slices: a field longer
/// than a frame (a KServe batch of tensors is tens of MiB, one `raw_input_contents`
/// entry) need not be copied into one buffer to be used a piece at a time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Segmented {
    segments: Vec<Bytes>,
    len: usize,
}

impl From<Bytes> for Segmented {
    fn from(bytes: Bytes) -> Self {
        Segmented {
            len: bytes.len(),
            segments: if bytes.is_empty() {
                vec![]
            } else {
                vec![bytes]
            },
        }
    }
}

impl Segmented {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `range` of the bytes: a slice of one segment when it lies inside one, else a
    /// copy of the pieces. `None` past the end.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Option<Bytes> {
        if range.start > range.end || range.end > self.len {
            return None;
        }
        let mut at = 0;
        let mut out: Option<BytesMut> = None;
        for seg in &self.segments {
            let (start, end) = (at, at + seg.len());
            at = end;
            if end <= range.start {
                continue;
            }
            if start >= range.end {
                break;
            }
            let piece = seg.slice(range.start.max(start) - start..range.end.min(end) - start);
            if out.is_none() && piece.len() == range.len() {
                return Some(piece);
            }
            out.get_or_insert_with(|| BytesMut::with_capacity(range.len()))
                .extend_from_slice(&piece);
        }
        Some(out.map_or_else(Bytes::new, BytesMut::freeze))
    }

    /// All the bytes in one buffer (a copy only when there are several segments).
    pub fn contiguous(&self) -> Bytes {
        self.slice(0..self.len).unwrap_or_default()
    }
}

/// A message whose repeated `bytes` field number `FIELD` is kept as [`Segmented`]
/// values in `field` (left out of `message`), so that what a caller takes of it a piece
/// at a time is sliced out of the frames rather than copied.
#[derive(Debug, Default)]
pub struct WithSegments<M, const FIELD: u32> {
    pub message: M,
    pub field: Vec<Segmented>,
}

impl<M: prost::Message + Default, const FIELD: u32> FromFrames for WithSegments<M, FIELD> {
    fn decode_frames(mut frames: Frames) -> Result<Self, Status> {
        use prost::encoding::{decode_key, decode_varint, DecodeContext, WireType};
        let mut out = WithSegments {
            message: M::default(),
            field: Vec::new(),
        };
        while frames.has_remaining() {
            let (tag, wire_type) = decode_key(&mut frames).map_err(decode_error)?;
            if tag == FIELD && wire_type == WireType::LengthDelimited {
                let len = decode_varint(&mut frames).map_err(decode_error)?;
                if len > frames.remaining() as u64 {
                    // prost's words for the same fault.
                    return Err(Status::internal(
                        "failed to decode Protobuf message: buffer underflow",
                    ));
                }
                out.field.push(frames.take_segments(len as usize));
            } else {
                out.message
                    .merge_field(tag, wire_type, &mut frames, DecodeContext::default())
                    .map_err(decode_error)?;
            }
        }
        Ok(out)
    }
}

/// A message's bytes as the frames that carried them. As a [`Buf`], its
/// `copy_to_bytes` (what prost decodes a `Bytes` field with) hands out a slice of a
/// frame, not a copy, whenever the field lies inside that frame.
#[derive(Debug, Default, Clone)]
pub struct Frames {
    chunks: VecDeque<Bytes>,
    len: usize,
}

impl Frames {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The frames' bytes, in order.
    pub(crate) fn chunks(&self) -> impl Iterator<Item = &Bytes> {
        self.chunks.iter()
    }

    pub fn push(&mut self, data: Bytes) {
        if !data.is_empty() {
            self.len += data.len();
            self.chunks.push_back(data);
        }
    }

    /// The next `len` bytes (at most what remains) as slices of their frames.
    fn take_segments(&mut self, len: usize) -> Segmented {
        let mut out = Segmented::default();
        while out.len < len {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let piece = front.split_to((len - out.len).min(front.len()));
            self.len -= piece.len();
            out.len += piece.len();
            out.segments.push(piece);
            if front.is_empty() {
                self.chunks.pop_front();
            }
        }
        out
    }

    /// The next `len` bytes (at most what remains) as frames of their own: slices of
    /// these, not copies.
    pub(crate) fn split_to(&mut self, len: usize) -> Frames {
        let mut out = Frames::default();
        for segment in self.take_segments(len).segments {
            out.push(segment);
        }
        out
    }

    /// The first [`PREFIX_LEN`] bytes, once that many have arrived.
    fn prefix(&self) -> Option<[u8; PREFIX_LEN]> {
        let mut prefix = [0u8; PREFIX_LEN];
        let mut filled = 0;
        for chunk in &self.chunks {
            let n = chunk.len().min(PREFIX_LEN - filled);
            prefix[filled..filled + n].copy_from_slice(&chunk[..n]);
            filled += n;
            if filled == PREFIX_LEN {
                return Some(prefix);
            }
        }
        None
    }
}

impl Buf for Frames {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.chunks.front().map_or(&[], |c| c)
    }

    fn advance(&mut self, mut cnt: usize) {
        while cnt > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let step = cnt.min(front.len());
            front.advance(step);
            self.len -= step;
            cnt -= step;
            if front.is_empty() {
                self.chunks.pop_front();
            }
        }
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        if let Some(front) = self.chunks.front_mut() {
            if front.len() >= len {
                let out = front.split_to(len);
                self.len -= len;
                if front.is_empty() {
                    self.chunks.pop_front();
                }
                return out;
            }
        }
        let mut out = BytesMut::with_capacity(len.min(self.len));
        out.put((&mut *self).take(len));
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;
    use prost::Message;

    fn frames_of(data: &Bytes, cuts: &[usize]) -> Frames {
        let mut frames = Frames::default();
        let mut start = 0;
        for &cut in cuts.iter().chain([data.len()].iter()) {
            frames.push(data.slice(start..cut));
            start = cut;
        }
        frames
    }

    fn tensor_request(tensors: usize, bytes_each: usize) -> proto::ClassifyRequest {
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

    fn tensor_data(request: &proto::ClassifyRequest) -> Vec<&Bytes> {
        request
            .images
            .iter()
            .filter_map(|i| match &i.kind {
                Some(proto::image::Kind::Tensor(t)) => Some(&t.data),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn decoding_across_any_frame_boundary_gives_the_same_message() {
        let request = tensor_request(3, 40);
        let encoded = Bytes::from(request.encode_to_vec());
        for cut in 0..=encoded.len() {
            for second in [cut, (cut + 7).min(encoded.len()), encoded.len()] {
                let decoded = proto::ClassifyRequest::decode(frames_of(&encoded, &[cut, second]))
                    .expect("decodes");
                assert_eq!(decoded, request, "cut at {cut}, {second}");
            }
        }
    }

    #[test]
    fn a_field_inside_one_frame_is_a_slice_of_it_and_one_across_two_is_a_copy() {
        let request = tensor_request(2, 1000);
        let encoded = Bytes::from(request.encode_to_vec());
        // One frame: both tensors point into the frame's own memory.
        let decoded = proto::ClassifyRequest::decode(frames_of(&encoded, &[])).expect("one frame");
        let range = encoded.as_ptr_range();
        for data in tensor_data(&decoded) {
            assert!(range.contains(&data.as_ptr()), "copied instead of sliced");
        }
        // A cut through the middle of the first tensor: that one is copied, the second
        // is still a slice of the second frame.
        let cut = encoded.len() / 4;
        let frames = frames_of(&encoded, &[cut]);
        let decoded = proto::ClassifyRequest::decode(frames).expect("two frames");
        let data = tensor_data(&decoded);
        assert!(!range.contains(&data[0].as_ptr()));
        assert!(range.contains(&data[1].as_ptr()));
        assert_eq!(decoded, request);
    }

    #[test]
    fn frames_advance_and_copy_across_chunks() {
        let data = Bytes::from((0u8..100).collect::<Vec<_>>());
        let mut frames = frames_of(&data, &[10, 10, 55]);
        assert_eq!(frames.remaining(), 100);
        frames.advance(8);
        assert_eq!(frames.chunk(), &data[8..10]);
        assert_eq!(frames.copy_to_bytes(50), data.slice(8..58));
        assert_eq!(frames.remaining(), 42);
        assert_eq!(frames.copy_to_bytes(0), Bytes::new());
        frames.advance(42);
        assert_eq!(frames.remaining(), 0);
        assert!(frames.chunk().is_empty());
    }

    fn body_of(chunks: Vec<Bytes>) -> Body {
        let frames = chunks
            .into_iter()
            .map(|c| Ok::<_, Status>(http_body::Frame::data(c)));
        Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)))
    }

    fn framed(flag: u8, message: &[u8]) -> Vec<u8> {
        let mut out = vec![flag];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    #[tokio::test]
    async fn a_message_is_read_from_many_frames_up_to_its_announced_length() {
        let message = tensor_request(2, 300).encode_to_vec();
        let wire = Bytes::from(framed(0, &message));
        let chunks = (0..wire.len())
            .step_by(97)
            .map(|s| wire.slice(s..(s + 97).min(wire.len())))
            .collect();
        let (frames, trailers, _) =
            read_message(body_of(chunks), 1 << 20, &ByteBudget::unlimited())
                .await
                .expect("read");
        assert!(trailers.is_none());
        assert_eq!(frames.remaining(), message.len());
        let decoded = proto::ClassifyRequest::decode(frames).expect("decodes");
        assert_eq!(decoded, tensor_request(2, 300));
    }

    #[tokio::test]
    async fn framing_faults_get_tonics_statuses() {
        let cases: Vec<(Vec<u8>, tonic::Code, &str)> = vec![
            (vec![], tonic::Code::Internal, "Missing request message"),
            (vec![0, 0, 0], tonic::Code::Internal, "Unexpected EOF"),
            (
                framed(0, &[1, 2, 3])[..6].to_vec(),
                tonic::Code::Internal,
                "Unexpected EOF",
            ),
            (
                framed(1, &[1, 2, 3]),
                tonic::Code::Internal,
                "compressed-flag",
            ),
            (
                framed(7, &[1, 2, 3]),
                tonic::Code::Internal,
                "invalid compression flag: 7",
            ),
            (
                [framed(0, &[1]), framed(0, &[2])].concat(),
                tonic::Code::Internal,
                "one message",
            ),
            (
                framed(0, &[0; 2000]),
                tonic::Code::OutOfRange,
                "found 2000 bytes, the limit is: 1024 bytes",
            ),
        ];
        for (wire, code, text) in cases {
            let err = read_message(
                body_of(vec![Bytes::from(wire.clone())]),
                1024,
                &ByteBudget::unlimited(),
            )
            .await
            .expect_err("refused");
            assert_eq!(err.code(), code, "{wire:?}: {err}");
            assert!(err.message().contains(text), "{wire:?}: {}", err.message());
        }
    }

    #[tokio::test]
    async fn bytes_past_the_message_are_refused_without_waiting_for_the_body_to_end() {
        let wire = Bytes::from([framed(0, &[1, 2, 3]), framed(0, &[4])].concat());
        let err = within_a_second(read_message(
            unending_body(wire),
            1 << 20,
            &ByteBudget::unlimited(),
        ))
        .await
        .expect_err("refused");
        assert!(err.message().contains("one message"), "{err}");
    }

    #[tokio::test]
    async fn an_oversized_message_is_refused_from_its_prefix_before_its_body_arrives() {
        let mut announced = vec![0u8];
        announced.extend_from_slice(&(64u32 << 20).to_be_bytes());
        let err = within_a_second(read_message(
            unending_body(announced.into()),
            1 << 20,
            &ByteBudget::unlimited(),
        ))
        .await
        .expect_err("refused");
        assert_eq!(err.code(), tonic::Code::OutOfRange);
    }

    #[tokio::test]
    async fn a_message_past_the_servers_budget_is_refused_from_its_prefix() {
        let budget = ByteBudget::new(1 << 20, None);
        let held = budget.reserve(600 << 10).expect("fits");
        let mut announced = vec![0u8];
        announced.extend_from_slice(&(500u32 << 10).to_be_bytes());
        let err = within_a_second(read_message(
            unending_body(announced.into()),
            1 << 30,
            &budget,
        ))
        .await
        .expect_err("refused");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
        drop(held);
        // Freed: the same message fits, and holds its bytes until dropped.
        let wire = Bytes::from(framed(0, &[7; 1000]));
        let (_, _, reservation) = read_message(body_of(vec![wire]), 1 << 30, &budget)
            .await
            .expect("read");
        assert_eq!(budget.used(), 1000);
        drop(reservation);
        assert_eq!(budget.used(), 0);
    }

    /// Fails the test instead of hanging it when `f` waits for more of the body.
    async fn within_a_second<T>(f: impl Future<Output = T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(1), f)
            .await
            .expect("answered without waiting for the body to end")
    }

    /// A body whose first frame is `first` and which then never ends.
    fn unending_body(first: Bytes) -> Body {
        let first = tokio_stream::iter([Ok::<_, Status>(http_body::Frame::data(first))]);
        Body::new(http_body_util::StreamBody::new(
            tokio_stream::StreamExt::chain(first, tokio_stream::pending()),
        ))
    }

    /// Everything a stream decoder yields for `chunks`.
    async fn stream_of(
        chunks: Vec<Bytes>,
        limit: usize,
    ) -> Vec<Result<proto::ClassifyRequest, Status>> {
        use tokio_stream::StreamExt;
        let limits = Limits {
            max_decoding: limit,
            max_encoding: limit,
            counts: Counts::new(256, limit),
            budget: ByteBudget::unlimited(),
        };
        let held: Vec<_> =
            within_a_second(messages::<proto::ClassifyRequest>(body_of(chunks), limits).collect())
                .await;
        held.into_iter().map(|r| r.map(|h| h.message)).collect()
    }

    #[tokio::test]
    async fn stream_messages_come_out_whole_however_the_frames_cut_them() {
        let requests: Vec<_> = (1..=3).map(|n| tensor_request(n, 200)).collect();
        let wire: Vec<u8> = requests
            .iter()
            .flat_map(|r| framed(0, &r.encode_to_vec()))
            .collect();
        let wire = Bytes::from(wire);
        for step in [1, 5, 7, 97, 1000, wire.len()] {
            let chunks = (0..wire.len())
                .step_by(step)
                .map(|s| wire.slice(s..(s + step).min(wire.len())))
                .collect();
            let got: Vec<_> = stream_of(chunks, 1 << 20)
                .await
                .into_iter()
                .map(|r| r.expect("decodes"))
                .collect();
            assert_eq!(got, requests, "frames of {step} bytes");
        }
        // A tensor inside one frame is a slice of that frame.
        let one = Bytes::from(framed(0, &tensor_request(1, 5000).encode_to_vec()));
        let got = stream_of(vec![one.clone()], 1 << 20).await;
        let decoded = got[0].as_ref().expect("decodes");
        let tensor = tensor_data(decoded)[0];
        assert!(one.as_ptr_range().contains(&tensor.as_ptr()));
        // An empty message is a default one; an empty body, no message.
        let empty = stream_of(vec![Bytes::from(framed(0, &[]))], 1 << 20).await;
        assert_eq!(empty.len(), 1);
        assert_eq!(
            empty[0].as_ref().expect("decodes"),
            &proto::ClassifyRequest::default()
        );
        assert!(stream_of(vec![], 1 << 20).await.is_empty());
    }

    #[tokio::test]
    async fn a_stream_fault_ends_it_after_the_good_messages_with_tonics_status() {
        let good = framed(0, &tensor_request(1, 50).encode_to_vec());
        let with = |tail: Vec<u8>| {
            let mut wire = good.clone();
            wire.extend(tail);
            vec![Bytes::from(wire)]
        };
        let mut big = vec![0u8];
        big.extend_from_slice(&(2u32 << 20).to_be_bytes());
        let cases: Vec<(Vec<u8>, tonic::Code, &str)> = vec![
            (vec![0, 0], tonic::Code::Internal, "Unexpected EOF"),
            (
                framed(0, &[1, 2, 3])[..7].to_vec(),
                tonic::Code::Internal,
                "Unexpected EOF",
            ),
            (framed(1, &[]), tonic::Code::Internal, "compressed-flag"),
            (big, tonic::Code::OutOfRange, "the limit is: 1048576 bytes"),
            (
                framed(0, &[0xff, 0xff]),
                tonic::Code::Internal,
                "failed to decode",
            ),
        ];
        for (tail, code, text) in cases {
            let got = stream_of(with(tail.clone()), 1 << 20).await;
            assert_eq!(got.len(), 2, "{tail:?}");
            assert!(got[0].is_ok());
            let err = got[1].as_ref().expect_err("fault");
            assert_eq!(err.code(), code, "{tail:?}: {err}");
            assert!(err.message().contains(text), "{tail:?}: {err}");
        }
    }
}
