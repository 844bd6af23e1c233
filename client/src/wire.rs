//! Calls whose request body is each message's encoding as a list of chunks, in which
//! every large `bytes` field is the caller's own buffer rather than a copy.
//!
//! tonic encodes a request into one buffer, so each tensor of a `Classify` or
//! `ModelInfer` call (or of a `ClassifyStream` frame) is copied once in user space
//! before the kernel copies it again into the socket: in a float-tensor load on 2 cores
//! that copy was 14.6% of all CPU samples, the client's largest cost after the kernel's. Here the message is encoded
//! with prost into [`Encoded`], a `BufMut` that takes a large `Bytes` field by
//! reference, and the chunks go to h2 as they are (h2 chains DATA payloads over 256
//! bytes into its writes instead of copying them). The call itself is tonic's: the same
//! channel (balancing, TLS, timeouts), headers and metadata, and tonic's own response
//! decoding, so statuses read exactly as through a generated stub.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body::Frame;
use prost::Message;
use tokio_stream::Stream;
use tonic::codec::{Codec, Streaming};
use tonic::codegen::{http, Service};
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::codec::PresizedCodec;

/// `resnet_serve.v1.Classifier/Classify`.
pub const CLASSIFY: &str = "/resnet_serve.v1.Classifier/Classify";
/// `resnet_serve.v1.Classifier/ClassifyStream`.
pub const CLASSIFY_STREAM: &str = "/resnet_serve.v1.Classifier/ClassifyStream";
/// `inference.GRPCInferenceService/ModelInfer` (KServe v2).
pub const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

/// Fields at least this long are spliced in by reference; shorter ones are copied, so a
/// message does not turn into many tiny DATA frames.
const SPLICE_MIN: usize = 4096;

/// A message's protobuf encoding as chunks: the caller's large `Bytes` fields by
/// reference, everything between them copied into small buffers.
#[derive(Debug, Default)]
pub struct Encoded {
    chunks: Vec<Bytes>,
    tail: BytesMut,
    len: usize,
}

impl Encoded {
    /// `message`'s encoding.
    pub fn new(message: &impl Message) -> Encoded {
        let mut e = Encoded::default();
        // Cannot fail: this buffer grows as needed.
        let _ = message.encode(&mut e);
        e
    }

    /// Appends a length-delimited field `tag` whose contents are `parts` one after
    /// another (a `bytes` field sent in pieces, or one more entry of a repeated one: a
    /// field may follow the others in any order on the wire).
    pub fn with_bytes_field(mut self, tag: u32, parts: &[Bytes]) -> Encoded {
        prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, &mut self);
        let len: usize = parts.iter().map(Bytes::len).sum();
        prost::encoding::encode_varint(len as u64, &mut self);
        for part in parts {
            self.put(part.clone());
        }
        self
    }

    /// Encoded length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The gRPC message: the uncompressed flag, the length, then the chunks.
    fn into_grpc_frame(mut self) -> Result<VecDeque<Bytes>, Status> {
        let len = u32::try_from(self.len).map_err(|_| {
            Status::out_of_range(format!("request of {} bytes is too large", self.len))
        })?;
        self.flush();
        let mut prefix = BytesMut::with_capacity(5);
        prefix.put_u8(0);
        prefix.put_u32(len);
        let mut chunks = VecDeque::with_capacity(self.chunks.len() + 1);
        chunks.push_back(prefix.freeze());
        chunks.extend(self.chunks);
        Ok(chunks)
    }

    fn flush(&mut self) {
        if !self.tail.is_empty() {
            self.chunks.push(self.tail.split().freeze());
        }
    }
}

// SAFETY: `chunk_mut` and `advance_mut` are the tail buffer's own; `advance_mut` counts
// what was written, as `put` and `put_slice` do.
unsafe impl BufMut for Encoded {
    fn remaining_mut(&self) -> usize {
        usize::MAX - self.len
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        // SAFETY: the caller initialised `cnt` bytes of the tail's `chunk_mut`.
        unsafe { self.tail.advance_mut(cnt) };
        self.len += cnt;
    }

    fn chunk_mut(&mut self) -> &mut bytes::buf::UninitSlice {
        self.tail.chunk_mut()
    }

    fn put<T: Buf>(&mut self, mut src: T)
    where
        Self: Sized,
    {
        let n = src.remaining();
        self.len += n;
        if n < SPLICE_MIN {
            while src.has_remaining() {
                let chunk = src.chunk();
                let taken = chunk.len();
                self.tail.extend_from_slice(chunk);
                src.advance(taken);
            }
            return;
        }
        self.flush();
        // `Bytes` hands out its own storage here; other buffers are copied once.
        self.chunks.push(src.copy_to_bytes(n));
    }

    fn put_slice(&mut self, src: &[u8]) {
        self.len += src.len();
        self.tail.extend_from_slice(src);
    }
}

/// A request body of gRPC messages, each encoded as it comes from `messages` and sent as
/// its chunks, in order (h2 asks for more only when it can send).
struct Messages<S> {
    messages: Pin<Box<S>>,
    current: VecDeque<Bytes>,
}

impl<S: Stream<Item = Encoded> + Send> http_body::Body for Messages<S> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        loop {
            if let Some(chunk) = self.current.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            match std::task::ready!(self.messages.as_mut().poll_next(cx)) {
                Some(message) => match message.into_grpc_frame() {
                    Ok(chunks) => self.current = chunks,
                    Err(status) => return Poll::Ready(Some(Err(status))),
                },
                None => return Poll::Ready(None),
            }
        }
    }
}

/// Limits of one call.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request sent (tonic's `max_encoding_message_size`).
    pub max_request: usize,
    /// Largest response accepted (tonic's `max_decoding_message_size`).
    pub max_response: usize,
}

/// One unary call of `path` on `channel` with an encoded request and `metadata`
/// (`grpc-timeout` among it when the call has a deadline).
pub async fn unary<R: Message + Default + Send + 'static>(
    channel: Channel,
    path: &'static str,
    request: Encoded,
    metadata: MetadataMap,
    limits: Limits,
) -> Result<R, Status> {
    if request.len() > limits.max_request {
        // tonic's wording, so a caller sees the same status either way.
        return Err(Status::out_of_range(format!(
            "Error, encoded message length too large: found {} bytes, the limit is: {} bytes",
            request.len(),
            limits.max_request
        )));
    }
    let mut replies = call(
        channel,
        path,
        tokio_stream::once(request),
        metadata,
        limits.max_response,
    )
    .await?;
    let message = replies
        .message()
        .await?
        .ok_or_else(|| Status::internal("Missing response message."))?;
    // The trailers carry the call's final status; an error there fails the call.
    replies.trailers().await?;
    Ok(message)
}

/// A streaming call of `path`: `requests` go out as they are yielded, replies come back
/// as tonic's `Streaming`. A request over `limits.max_request` is left for the server to
/// refuse (it answers OUT_OF_RANGE in the stream), as the stream is already open.
pub async fn streaming<R: Message + Default + Send + 'static>(
    channel: Channel,
    path: &'static str,
    requests: impl Stream<Item = Encoded> + Send + 'static,
    metadata: MetadataMap,
    limits: Limits,
) -> Result<Streaming<R>, Status> {
    call(channel, path, requests, metadata, limits.max_response).await
}

/// Sends the request headers and body and reads the reply's headers, as tonic's client
/// does; the replies are decoded by tonic.
async fn call<R: Message + Default + Send + 'static>(
    mut channel: Channel,
    path: &'static str,
    requests: impl Stream<Item = Encoded> + Send + 'static,
    metadata: MetadataMap,
    max_response: usize,
) -> Result<Streaming<R>, Status> {
    let body = Messages {
        messages: Box::pin(requests),
        current: VecDeque::new(),
    };
    let mut http_request = http::Request::new(tonic::body::Body::new(body));
    *http_request.method_mut() = http::Method::POST;
    *http_request.version_mut() = http::Version::HTTP_2;
    *http_request.uri_mut() = http::Uri::from_static(path);
    let headers = http_request.headers_mut();
    *headers = metadata.into_headers();
    headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );

    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| Status::from_error(Box::new(e)))?;
    let response = channel
        .call(http_request)
        .await
        .map_err(|e| Status::from_error(Box::new(e)))?;

    // A trailers-only answer carries its status in the headers.
    let status_code = response.status();
    let trailers_only = Status::from_header_map(response.headers());
    if let Some(status) = &trailers_only {
        if status.code() != Code::Ok {
            return Err(status.clone());
        }
    }
    let decoder = PresizedCodec::<(), R>::default().decoder();
    Ok(match trailers_only {
        Some(_) => Streaming::new_empty(decoder, response.into_body()),
        None => Streaming::new_response(
            decoder,
            response.into_body(),
            status_code,
            None,
            Some(max_response),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{image, ClassifyRequest, FloatTensor, Image};

    fn tensor_request(tensors: &[Bytes]) -> ClassifyRequest {
        ClassifyRequest {
            model: "resnet50_swsl".into(),
            images: tensors
                .iter()
                .map(|data| Image {
                    kind: Some(image::Kind::Tensor(FloatTensor { data: data.clone() })),
                })
                .collect(),
            output: None,
            request_id: "r1".into(),
        }
    }

    fn joined(e: Encoded) -> Vec<u8> {
        let mut out = Vec::new();
        let mut frame = e.into_grpc_frame().expect("small");
        let prefix = frame.pop_front().expect("prefix");
        assert_eq!(prefix[0], 0);
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        for c in frame {
            out.extend_from_slice(&c);
        }
        assert_eq!(out.len(), len);
        out
    }

    #[test]
    fn large_fields_are_spliced_by_reference_and_the_encoding_is_prosts() {
        let tensors: Vec<Bytes> = (0..3u8)
            .map(|i| Bytes::from(vec![i; 3 * 224 * 224 * 4]))
            .collect();
        let req = tensor_request(&tensors);
        let e = Encoded::new(&req);
        assert_eq!(e.len(), req.encoded_len());
        // Each tensor is one chunk that points into the caller's buffer.
        let mut chunks = e.chunks.clone();
        if !e.tail.is_empty() {
            chunks.push(e.tail.clone().freeze());
        }
        for t in &tensors {
            assert!(chunks
                .iter()
                .any(|c| c.as_ptr() == t.as_ptr() && c.len() == t.len()));
        }
        assert_eq!(joined(e), req.encode_to_vec());
    }

    #[test]
    fn small_fields_are_copied() {
        let small = Bytes::from(vec![7u8; 100]);
        let req = tensor_request(std::slice::from_ref(&small));
        let e = Encoded::new(&req);
        assert!(e.chunks.is_empty(), "one small message stays in one buffer");
        assert_eq!(joined(e), req.encode_to_vec());
    }

    #[test]
    fn an_appended_bytes_field_decodes_as_one_field_of_its_parts() {
        use crate::proto::inference::ModelInferRequest;
        let parts: Vec<Bytes> = (0..4u8).map(|i| Bytes::from(vec![i; 10_000])).collect();
        let req = ModelInferRequest {
            model_name: "m".into(),
            ..Default::default()
        };
        let bytes = joined(Encoded::new(&req).with_bytes_field(7, &parts));
        let back = ModelInferRequest::decode(&bytes[..]).expect("valid protobuf");
        assert_eq!(back.model_name, "m");
        assert_eq!(back.raw_input_contents.len(), 1);
        assert_eq!(back.raw_input_contents[0], parts.concat());
    }
}
