//! The bytes of a message as the HTTP/2 DATA frames that carried them ([`Frames`], a
//! [`Buf`] that prost decodes from), and a field's bytes kept as slices of those frames
//! ([`Segmented`]): nothing here copies a byte that lies inside one frame.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::PREFIX_LEN;

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
    pub(super) fn take_segments(&mut self, len: usize) -> Segmented {
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
    pub(super) fn prefix(&self) -> Option<[u8; PREFIX_LEN]> {
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
    use crate::api::unary::test_requests::{tensor_data, tensor_request};
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
}
