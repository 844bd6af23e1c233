//! What a call may cost before it is decoded: a server-wide budget for the bytes of
//! request messages in flight, and bounds on the counts of repeated fields, checked by
//! walking a message's wire format before prost materialises it.
//!
//! A protobuf message can be small on the wire and large in memory: a 64 MiB
//! `ClassifyRequest` of empty images is ~33 M `Image` values (~3 GB), a KServe BYTES
//! input of empty elements or a packed UINT8 input likewise. Every count a client chooses
//! is therefore checked from the wire before decoding, against a limit that keeps what
//! decoding allocates near the size of the message itself; and the messages themselves
//! are admitted only while the bytes of all messages received and not yet answered stay
//! within the budget, so past it a new call is refused at once instead of queued in memory.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prost::encoding::{decode_key, decode_varint, WireType};
use tonic::Status;

use crate::api::refusals::RefusalLog;
use crate::api::unary::Frames;
use crate::proto;

/// Bytes of request messages received and not yet answered, across the server.
#[derive(Debug)]
pub struct ByteBudget {
    limit: usize,
    used: AtomicUsize,
    refused: Option<prometheus::IntCounter>,
    log: RefusalLog,
}

/// Bytes of one message, counted against its budget until dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<ByteBudget>,
    bytes: usize,
}

impl ByteBudget {
    /// A budget of `limit` bytes; `refused` counts the calls it turns away.
    pub fn new(limit: usize, refused: Option<prometheus::IntCounter>) -> Arc<Self> {
        Arc::new(ByteBudget {
            limit,
            used: AtomicUsize::new(0),
            refused,
            log: RefusalLog::default(),
        })
    }

    /// An unlimited budget (tests that exercise other things).
    pub fn unlimited() -> Arc<Self> {
        Self::new(usize::MAX, None)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }

    /// Reserves `bytes` for a message whose prefix announced them, or refuses the call
    /// with RESOURCE_EXHAUSTED when the server already holds its budget's worth.
    #[allow(clippy::result_large_err)]
    pub fn reserve(self: &Arc<Self>, bytes: usize) -> Result<Reservation, Status> {
        let mut used = self.used.load(Ordering::SeqCst);
        loop {
            let after = used.checked_add(bytes).filter(|&a| a <= self.limit);
            let Some(after) = after else {
                if let Some(c) = &self.refused {
                    c.inc();
                }
                let message = format!(
                    "server is busy: {used} bytes of requests in flight and this one needs {bytes} (limit {}); retry later",
                    self.limit
                );
                self.log
                    .log("RESOURCE_EXHAUSTED (in-flight bytes)", &message);
                return Err(Status::resource_exhausted(message));
            };
            match self
                .used
                .compare_exchange(used, after, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => {
                    return Ok(Reservation {
                        budget: self.clone(),
                        bytes,
                    })
                }
                Err(now) => used = now,
            }
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// A message of a stream with the budget it holds until its answer is made.
#[derive(Debug)]
pub struct Held<M> {
    pub message: M,
    pub reservation: Option<Reservation>,
}

impl<M> Held<M> {
    /// A message that holds no budget (decoded by tonic, whose own limit bounds it).
    pub fn unreserved(message: M) -> Self {
        Held {
            message,
            reservation: None,
        }
    }
}

/// The default budget: an eighth of the memory this process may use (the cgroup's limit
/// where one is set, as under Kubernetes, else the machine's), at least 256 MiB.
pub fn default_in_flight_bytes() -> usize {
    let machine = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb.saturating_mul(1024));
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let memory = match (machine, cgroup) {
        (Some(m), Some(c)) => m.min(c),
        (Some(m), None) => m,
        (None, Some(c)) => c,
        (None, None) => 8 << 30,
    };
    usize::try_from(memory / 8)
        .unwrap_or(usize::MAX)
        .max(256 << 20)
}

/// Bounds on the repeated fields of a request, checked from the wire.
#[derive(Debug, Clone, Copy)]
pub struct Counts {
    /// Images in one request: `ClassifyRequest.images`, KServe BYTES elements.
    pub images: usize,
    /// Entries of every other repeated field of a request (inputs, outputs, dimensions,
    /// parameters, raw contents).
    pub entries: usize,
    /// Bytes that a request's typed numeric contents may take once decoded.
    pub numeric_bytes: usize,
}

impl Counts {
    /// The bounds for a server that takes `max_images` per request and messages of up to
    /// `max_message` bytes: decoded numbers take at most the message's own size.
    pub fn new(max_images: usize, max_message: usize) -> Self {
        Counts {
            images: max_images,
            entries: 64,
            numeric_bytes: max_message,
        }
    }
}

/// Checks a message's counts from its wire format, before it is decoded.
pub trait Bounded {
    #[allow(clippy::result_large_err)]
    fn check_counts(frames: &Frames, counts: &Counts) -> Result<(), Status>;
}

/// Where the walk stopped: a count past its bound, or wire data prost will refuse
/// (left to prost, whose error the caller gets as tonic would give it).
enum Stop {
    Refused(Status),
    Malformed,
}

type Walk = Result<(), Stop>;

fn refuse(message: String) -> Stop {
    Stop::Refused(Status::invalid_argument(message))
}

/// Calls `visit(field, body)` for each field of the message in `buf`, `body` holding a
/// length-delimited field's bytes (slices of the frames, not copies).
fn walk(mut buf: Frames, mut visit: impl FnMut(u32, Field) -> Walk) -> Walk {
    use bytes::Buf;
    while buf.has_remaining() {
        let (tag, wire_type) = decode_key(&mut buf).map_err(|_| Stop::Malformed)?;
        let field = match wire_type {
            WireType::Varint => {
                decode_varint(&mut buf).map_err(|_| Stop::Malformed)?;
                Field::Scalar
            }
            WireType::SixtyFourBit | WireType::ThirtyTwoBit => {
                let n = if wire_type == WireType::SixtyFourBit {
                    8
                } else {
                    4
                };
                if buf.remaining() < n {
                    return Err(Stop::Malformed);
                }
                buf.advance(n);
                Field::Scalar
            }
            WireType::LengthDelimited => {
                let len = decode_varint(&mut buf).map_err(|_| Stop::Malformed)?;
                let len = usize::try_from(len)
                    .ok()
                    .filter(|&l| l <= buf.remaining())
                    .ok_or(Stop::Malformed)?;
                Field::Bytes(buf.split_to(len))
            }
            // A group: prost skips one under a field number it does not know and decodes
            // the rest, so the walk skips it the same way (stopping here would let what
            // follows it through unchecked). Under a known field number prost refuses it.
            WireType::StartGroup => {
                prost::encoding::skip_field(
                    wire_type,
                    tag,
                    &mut buf,
                    prost::encoding::DecodeContext::default(),
                )
                .map_err(|_| Stop::Malformed)?;
                Field::Scalar
            }
            WireType::EndGroup => return Err(Stop::Malformed),
        };
        visit(tag, field)?;
    }
    Ok(())
}

/// One field's value as the walk found it.
enum Field {
    Scalar,
    Bytes(Frames),
}

/// Counts the occurrences of one repeated field against `limit`.
struct Tally {
    what: &'static str,
    seen: usize,
    limit: usize,
}

impl Tally {
    fn new(what: &'static str, limit: usize) -> Self {
        Tally {
            what,
            seen: 0,
            limit,
        }
    }

    fn add(&mut self, n: usize) -> Walk {
        self.seen = self.seen.saturating_add(n);
        if self.seen > self.limit {
            return Err(refuse(format!(
                "more than {} {} in one request; the limit is {}",
                self.limit, self.what, self.limit
            )));
        }
        Ok(())
    }
}

fn run(walked: Walk) -> Result<(), Status> {
    match walked {
        Ok(()) | Err(Stop::Malformed) => Ok(()),
        Err(Stop::Refused(status)) => Err(status),
    }
}

impl Bounded for proto::ClassifyRequest {
    fn check_counts(frames: &Frames, counts: &Counts) -> Result<(), Status> {
        let mut images = Tally::new("images", counts.images);
        run(walk(frames.clone(), |tag, _| match tag {
            2 => images.add(1),
            _ => Ok(()),
        }))
    }
}

impl Bounded for proto::StreamFrame {
    /// One image per frame, and no other repeated field.
    fn check_counts(_: &Frames, _: &Counts) -> Result<(), Status> {
        Ok(())
    }
}

/// `ModelInferRequest`: inputs (5), outputs (6), raw contents (7) and parameters (4) are
/// bounded in number; inside each input its shape (3), parameters (4) and contents (5).
pub(crate) fn check_infer_request(frames: &Frames, counts: &Counts) -> Result<(), Status> {
    let mut inputs = Tally::new("inputs", counts.entries);
    let mut outputs = Tally::new("outputs", counts.entries);
    let mut raw = Tally::new("raw_input_contents", counts.entries);
    let mut params = Tally::new("parameters", counts.entries);
    let mut images = Tally::new("BYTES elements", counts.images);
    let mut numeric = Tally::new("bytes of typed contents", counts.numeric_bytes);
    run(walk(frames.clone(), |tag, field| match (tag, field) {
        (4, _) => params.add(1),
        (5, Field::Bytes(input)) => {
            inputs.add(1)?;
            check_input(input, counts, &mut images, &mut numeric)
        }
        (6, Field::Bytes(output)) => {
            outputs.add(1)?;
            let mut params = Tally::new("output parameters", counts.entries);
            walk(
                output,
                |tag, _| if tag == 2 { params.add(1) } else { Ok(()) },
            )
        }
        (7, _) => raw.add(1),
        _ => Ok(()),
    }))
}

fn check_input(input: Frames, counts: &Counts, images: &mut Tally, numeric: &mut Tally) -> Walk {
    let mut dims = Tally::new("dimensions", counts.entries);
    let mut params = Tally::new("input parameters", counts.entries);
    walk(input, |tag, field| match (tag, field) {
        (3, Field::Scalar) => dims.add(1),
        (3, Field::Bytes(packed)) => dims.add(varints(&packed)),
        (4, _) => params.add(1),
        (5, Field::Bytes(contents)) => walk(contents, |tag, field| match (tag, field) {
            (8, _) => images.add(1),
            (1..=7, Field::Scalar) => numeric.add(decoded_size(tag)),
            (1..=7, Field::Bytes(packed)) => {
                let size = decoded_size(tag);
                // Fixed-width values decode to their own size or less; only varints
                // (bools, ints) can grow, so only they are counted one by one.
                let elements = match tag {
                    6 => packed.len() / 4,
                    7 => packed.len() / 8,
                    _ if packed.len().saturating_mul(size) <= counts.numeric_bytes => packed.len(),
                    _ => varints(&packed),
                };
                numeric.add(elements.saturating_mul(size))
            }
            _ => Ok(()),
        }),
        _ => Ok(()),
    })
}

/// The in-memory size of one element of `InferTensorContents` field `tag`.
fn decoded_size(tag: u32) -> usize {
    match tag {
        1 => 1,     // bool
        2 | 4 => 4, // int32, uint32
        6 => 4,     // fp32
        _ => 8,     // int64, uint64, fp64
    }
}

/// How many varints a packed field holds: each ends with a byte below 0x80.
fn varints(packed: &Frames) -> usize {
    packed
        .chunks()
        .map(|c| c.iter().filter(|&&b| b < 0x80).count())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::inference::{
        model_infer_request::InferInputTensor, InferParameter, InferTensorContents,
        ModelInferRequest,
    };
    use bytes::Bytes;
    use prost::Message;

    fn frames(message: &impl Message) -> Frames {
        let mut f = Frames::default();
        f.push(Bytes::from(message.encode_to_vec()));
        f
    }

    #[test]
    fn the_budget_refuses_past_its_limit_and_frees_on_drop() {
        let budget = ByteBudget::new(100, None);
        let a = budget.reserve(60).expect("fits");
        let refused = budget.reserve(41).expect_err("over");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        let b = budget.reserve(40).expect("fits exactly");
        assert_eq!(budget.used(), 100);
        drop((a, b));
        assert_eq!(budget.used(), 0);
        assert!(budget.reserve(usize::MAX).is_err(), "no overflow");
    }

    #[test]
    fn classify_images_are_counted_before_decoding() {
        let counts = Counts::new(4, 1 << 20);
        let request = |n| proto::ClassifyRequest {
            images: vec![proto::Image::default(); n],
            ..Default::default()
        };
        assert!(proto::ClassifyRequest::check_counts(&frames(&request(4)), &counts).is_ok());
        let err =
            proto::ClassifyRequest::check_counts(&frames(&request(5)), &counts).expect_err("over");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("more than 4 images"), "{err}");
        // A group under an unknown field number, which prost skips, hides nothing.
        let mut grouped = vec![0x7b, 0x7c];
        grouped.extend(request(5).encode_to_vec());
        let mut f = Frames::default();
        f.push(Bytes::from(grouped.clone()));
        assert!(
            proto::ClassifyRequest::decode(&grouped[..]).is_ok(),
            "prost takes it"
        );
        assert!(proto::ClassifyRequest::check_counts(&f, &counts).is_err());
        // Garbage is left to prost, which names the fault as tonic does.
        let mut junk = Frames::default();
        junk.push(Bytes::from_static(&[0xff, 0xff]));
        assert!(proto::ClassifyRequest::check_counts(&junk, &counts).is_ok());
    }

    #[test]
    fn kserve_counts_and_numeric_sizes_are_bounded() {
        let counts = Counts::new(4, 1000);
        let input = |contents: InferTensorContents| InferInputTensor {
            name: "image".into(),
            datatype: "BYTES".into(),
            shape: vec![2, 1],
            contents: Some(contents),
            ..Default::default()
        };
        let request = |inputs: Vec<InferInputTensor>| ModelInferRequest {
            model_name: "m".into(),
            inputs,
            ..Default::default()
        };
        let check = |r: &ModelInferRequest| check_infer_request(&frames(r), &counts);
        let bytes = |n| InferTensorContents {
            bytes_contents: vec![Bytes::new(); n],
            ..Default::default()
        };
        assert!(check(&request(vec![input(bytes(4))])).is_ok());
        assert!(check(&request(vec![input(bytes(5))])).is_err());
        // 1000 bytes of u32 decode to 4000: 250 one-byte varints is the most.
        let uints = |n| InferTensorContents {
            uint_contents: vec![1; n],
            ..Default::default()
        };
        assert!(check(&request(vec![input(uints(250))])).is_ok());
        let err = check(&request(vec![input(uints(251))])).expect_err("over");
        assert!(err.message().contains("typed contents"), "{err}");
        let fp = |n| InferTensorContents {
            fp32_contents: vec![0.5; n],
            ..Default::default()
        };
        assert!(check(&request(vec![input(fp(250))])).is_ok());
        assert!(check(&request(vec![input(fp(251))])).is_err());
        assert!(
            check(&request(vec![input(bytes(0)); 65])).is_err(),
            "inputs"
        );
        let mut many_dims = input(bytes(0));
        many_dims.shape = vec![1; 65];
        assert!(check(&request(vec![many_dims])).is_err(), "dimensions");
        let mut params = request(vec![]);
        for i in 0..65 {
            params
                .parameters
                .insert(format!("p{i}"), InferParameter::default());
        }
        assert!(check(&params).is_err(), "parameters");
        let mut raw = request(vec![]);
        raw.raw_input_contents = vec![Bytes::new(); 65];
        assert!(check(&raw).is_err(), "raw contents");
    }
}
