//! Fuzz harnesses for the parsers a client's request reaches: the frame-level request
//! decoders, the gRPC message framing, the KServe tensor conversion and `grpc-timeout`.
//! One function per target, shared by the libFuzzer targets and the corpus replay
//! (`tests/fuzz_corpus.rs`) through `#[path]`, as `files.rs` is. Where the same bytes
//! can be parsed two ways (frames cut at different points, or prost on one buffer) the
//! harness also asserts both agree.

#![allow(dead_code)]

use std::sync::OnceLock;

use bytes::Bytes;
use prost::Message;
use resnet_serve::api::admission::{Bounded, ByteBudget, Counts};
use resnet_serve::api::kserve::views::View;
use resnet_serve::api::kserve::{tensors, InferRequest};
use resnet_serve::api::shm::SharedMemory;
use resnet_serve::api::unary::{Frames, FromFrames, Limits};
use resnet_serve::preprocess::Preprocessor;
use resnet_serve::proto;
use resnet_serve::proto::inference::ModelInferRequest;

/// Splits `data` into a message and the points at which its frames are cut: the first
/// byte is the number of cuts (mod 8), each cut two little-endian bytes (mod the
/// message's length). Returns the message and the frames carrying it.
fn framed(data: &[u8]) -> Option<(Bytes, Frames)> {
    let (&n, rest) = data.split_first()?;
    let n = usize::from(n % 8);
    let (cuts, message) = rest.split_at_checked(2 * n)?;
    let message = Bytes::copy_from_slice(message);
    let mut points: Vec<usize> = cuts
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (message.len() + 1))
        .collect();
    points.sort_unstable();
    let mut frames = Frames::default();
    let mut at = 0;
    for p in points.into_iter().chain([message.len()]) {
        frames.push(message.slice(at..p));
        at = p;
    }
    Some((message, frames))
}

/// The bounds the server checks a message's repeated fields against, from the wire,
/// before decoding it (its defaults: 256 images, messages of up to 64 MiB).
fn counts() -> Counts {
    Counts::new(256, 64 << 20)
}

/// A message decoded from frames must be what prost decodes from one buffer; and one
/// that passed the count check from the wire holds no more than the counts allow.
fn same_as_prost<M>(data: &[u8]) -> Option<M>
where
    M: Message + Default + PartialEq + FromFrames + Bounded,
{
    let (message, frames) = framed(data)?;
    let checked = M::check_counts(&frames, &counts());
    let from_frames = M::decode_frames(frames);
    let whole = M::decode(message);
    match (from_frames, whole) {
        (Ok(a), Ok(b)) => {
            assert!(a == b, "frames and one buffer decode differently");
            checked.ok().map(|()| a)
        }
        (Err(_), Err(_)) => None,
        (a, b) => panic!(
            "frames and one buffer disagree: frames {:?}, one buffer {:?}",
            a.err(),
            b.err()
        ),
    }
}

/// The frame-level request decoders ([`FromFrames`]), the message picked by the first
/// byte: `Classify`'s request, a `ClassifyStream` message, or KServe `ModelInfer`'s
/// (with `raw_input_contents` kept as frame slices); the rest is cut into frames as
/// [`framed`] reads it.
pub fn request_frames(data: &[u8]) {
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    match choice % 3 {
        0 => {
            if let Some(request) = same_as_prost::<proto::ClassifyRequest>(rest) {
                assert!(
                    request.images.len() <= counts().images,
                    "the image count check let through {}",
                    request.images.len()
                );
            }
        }
        1 => {
            let _ = same_as_prost::<proto::StreamFrame>(rest);
        }
        _ => kserve_frames(rest),
    }
}

/// KServe `ModelInfer`'s request with `raw_input_contents` kept as frame slices
/// ([`InferRequest`]), against prost on one buffer.
fn kserve_frames(data: &[u8]) {
    let Some((message, frames)) = framed(data) else {
        return;
    };
    let checked = InferRequest::check_counts(&frames, &counts());
    let segmented = InferRequest::decode_frames(frames);
    let whole = ModelInferRequest::decode(message);
    match (segmented, whole) {
        (Ok(s), Ok(mut w)) => {
            if checked.is_ok() {
                let entries = counts().entries;
                assert!(
                    s.message.inputs.len() <= entries,
                    "{} inputs passed the check",
                    s.message.inputs.len()
                );
                assert!(
                    s.message.outputs.len() <= entries,
                    "{} outputs passed the check",
                    s.message.outputs.len()
                );
                assert!(
                    s.field.len() <= entries,
                    "{} raw contents passed the check",
                    s.field.len()
                );
            }
            let raw = std::mem::take(&mut w.raw_input_contents);
            let mut from_frames = s.message;
            without_nan(&mut from_frames);
            without_nan(&mut w);
            if from_frames != w {
                panic!(
                    "the message apart from its raw contents differs: {}",
                    first_difference(&format!("{from_frames:?}"), &format!("{w:?}"))
                );
            }
            assert_eq!(s.field.len(), raw.len());
            for (seg, bytes) in s.field.iter().zip(&raw) {
                assert_eq!(seg.len(), bytes.len());
                assert_eq!(seg.contiguous(), *bytes);
                let mid = seg.len() / 2;
                assert_eq!(seg.slice(mid..seg.len()).as_deref(), Some(&bytes[mid..]));
                assert_eq!(seg.slice(0..seg.len() + 1), None);
            }
        }
        (Err(_), Err(_)) => {}
        (a, b) => panic!(
            "frames and one buffer disagree: frames {:?}, one buffer {:?}",
            a.err(),
            b.err()
        ),
    }
}

/// One registered shared-memory region ("fuzz", 4096 bytes), for the KServe inputs and
/// outputs that point into one. Its object is unlinked once mapped, so nothing is left
/// in /dev/shm.
fn shared_memory() -> &'static SharedMemory {
    static SHM: OnceLock<SharedMemory> = OnceLock::new();
    SHM.get_or_init(|| {
        let shm = SharedMemory::new(true);
        let key = format!("resnet-serve-fuzz-{}", std::process::id());
        let path = std::path::Path::new("/dev/shm").join(&key);
        if std::fs::write(&path, vec![0x3fu8; 4096]).is_ok() {
            let _ = shm.register("fuzz", &format!("/{key}"), 0, 4096);
            let _ = std::fs::remove_file(&path);
        }
        shm
    })
}

/// KServe tensors to model inputs: a `ModelInferRequest` (prost, from the bytes after
/// the first) under the view the first byte picks, to the core's images
/// ([`tensors::images`]) and from there to model inputs as the services prepare them;
/// and its requested outputs.
pub fn kserve_tensors(data: &[u8]) {
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    let Ok(message) = ModelInferRequest::decode(rest) else {
        return;
    };
    let view = View::ALL[usize::from(choice) % View::ALL.len()];
    let shm = shared_memory();
    let _ = tensors::requested(&message.outputs, shm);
    let request = InferRequest::from(message);
    let Ok(images) = tensors::images(view, &request.message, request.field, shm, counts().images)
    else {
        return;
    };
    let p = Preprocessor::default();
    for img in images.into_iter().take(4) {
        let _ = p.prepare(img.input());
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// The gRPC message framing readers (the 5-byte prefix, its flag and announced length
/// against the limit, messages across DATA frames): the unary reader
/// ([`resnet_serve::api::unary::read_message`]) and the streaming one
/// ([`resnet_serve::api::unary::messages`]) over the same body, cut into frames at the
/// points [`framed`] reads, under a decoding limit and an in-flight budget of 4 KiB,
/// all of which is given back once the messages are dropped.
pub fn message_reader(data: &[u8]) {
    use tokio_stream::StreamExt;
    const LIMIT: usize = 4096;
    let Some((_, frames)) = framed(data) else {
        return;
    };
    let mut chunks = Vec::new();
    let mut frames = frames;
    while bytes::Buf::has_remaining(&frames) {
        let n = bytes::Buf::chunk(&frames).len();
        chunks.push(bytes::Buf::copy_to_bytes(&mut frames, n));
    }
    let body = |chunks: Vec<Bytes>| {
        let frames = chunks
            .into_iter()
            .map(|c| Ok::<_, tonic::Status>(http_body::Frame::data(c)));
        tonic::body::Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)))
    };
    runtime().block_on(async {
        let budget = ByteBudget::new(LIMIT, None);
        if let Ok((message, _, _reservation)) =
            resnet_serve::api::unary::read_message(body(chunks.clone()), LIMIT, &budget).await
        {
            assert!(bytes::Buf::remaining(&message) <= LIMIT);
            let _ = proto::ClassifyRequest::decode_frames(message);
        }
        assert_eq!(budget.used(), 0, "a finished call still holds budget");
        let limits = Limits {
            max_decoding: LIMIT,
            max_encoding: LIMIT,
            counts: counts(),
            budget: budget.clone(),
        };
        let stream = resnet_serve::api::unary::messages::<proto::StreamFrame>(body(chunks), limits);
        let results: Vec<_> = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            stream.collect::<Vec<_>>(),
        )
        .await
        .expect("the stream reader ends when its body does");
        // A fault ends the stream: nothing follows an error.
        if let Some(i) = results.iter().position(Result::is_err) {
            assert_eq!(i + 1, results.len(), "messages after a fault");
        }
        drop(results);
        assert_eq!(budget.used(), 0, "answered messages still hold budget");
    });
}

/// The `grpc-timeout` header, through the interceptor that turns it into a deadline
/// ([`resnet_serve::api::deadline::stamp_deadline`]), with the bytes as the header's value.
pub fn grpc_timeout(data: &[u8]) {
    let Ok(value) = tonic::metadata::AsciiMetadataValue::try_from(data) else {
        return;
    };
    let mut req = tonic::Request::new(());
    req.metadata_mut().insert("grpc-timeout", value);
    let _ = resnet_serve::api::deadline::stamp_deadline(req);
}

/// Where two debug renderings part, with some context of each.
fn first_difference(a: &str, b: &str) -> String {
    let at = a
        .bytes()
        .zip(b.bytes())
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    let around = |s: &str| -> String { s.chars().skip(at.saturating_sub(120)).take(240).collect() };
    format!(
        "from frames ...{}... from one buffer ...{}...",
        around(a),
        around(b)
    )
}

/// The message with every NaN of its float fields made 0: a NaN is unequal to itself, so
/// two decodings of one message holding one would otherwise compare unequal.
fn without_nan(m: &mut ModelInferRequest) {
    use resnet_serve::proto::inference::infer_parameter::ParameterChoice;
    use resnet_serve::proto::inference::InferParameter;
    fn param(p: &mut InferParameter) {
        if let Some(ParameterChoice::DoubleParam(d)) = &mut p.parameter_choice {
            if d.is_nan() {
                *d = 0.0;
            }
        }
    }
    m.parameters.values_mut().for_each(param);
    for input in &mut m.inputs {
        input.parameters.values_mut().for_each(param);
        if let Some(c) = &mut input.contents {
            c.fp32_contents
                .iter_mut()
                .filter(|x| x.is_nan())
                .for_each(|x| *x = 0.0);
            c.fp64_contents
                .iter_mut()
                .filter(|x| x.is_nan())
                .for_each(|x| *x = 0.0);
        }
    }
    for output in &mut m.outputs {
        output.parameters.values_mut().for_each(param);
    }
}
