//! The protobuf decoding of a request message from its frames ([`FromFrames`]), and the
//! field walker that keeps one repeated `bytes` field as slices of the frames
//! ([`WithSegments`]).

use bytes::Buf;
use tonic::Status;

use super::{Frames, Segmented};

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
