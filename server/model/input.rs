//! One image's input to a model, in the form it reached the server: values a
//! preprocessing step produced, or a client's ready tensor still as the little-endian
//! bytes it arrived in. Keeping the bytes means a tensor is converted once, straight
//! into wherever the batch is assembled (a gathered f32 buffer on the CPU, a pinned
//! half-precision staging buffer for a GPU), instead of first into an f32 copy of its
//! own (a 602 KB allocation and an extra pass per image).

use prost::bytes::Bytes;

use super::INPUT_SIZE;

/// Values in one `3 x 224 x 224` model input.
pub const IMAGE_LEN: usize = 3 * INPUT_SIZE * INPUT_SIZE;

/// An owned model input (what a queued job holds).
#[derive(Debug, Clone, PartialEq)]
pub enum ModelInput {
    /// CHW f32 values.
    Values(Vec<f32>),
    /// CHW f32 values as little-endian bytes (a slice of the received request).
    LeBytes(Bytes),
}

impl ModelInput {
    pub fn view(&self) -> InputView<'_> {
        match self {
            ModelInput::Values(v) => InputView::Values(v),
            ModelInput::LeBytes(b) => InputView::LeBytes(b),
        }
    }

    /// The values as f32 (a tensor's bytes decoded into a copy of their own).
    pub fn into_values(self) -> Vec<f32> {
        match self {
            ModelInput::Values(v) => v,
            ModelInput::LeBytes(ref bytes) => {
                let mut out = Vec::with_capacity(bytes.len() / 4);
                self.view().for_each_run(|run| out.extend_from_slice(run));
                out
            }
        }
    }
}

impl From<Vec<f32>> for ModelInput {
    fn from(values: Vec<f32>) -> Self {
        ModelInput::Values(values)
    }
}

/// A borrowed model input: what a batch is assembled from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InputView<'a> {
    Values(&'a [f32]),
    LeBytes(&'a [u8]),
}

impl<'a> From<&'a [f32]> for InputView<'a> {
    fn from(values: &'a [f32]) -> Self {
        InputView::Values(values)
    }
}

/// The longest run of values handed on at once: 16 KiB, which stays in L1 while it is
/// checked and then converted.
const CHUNK: usize = 4096;

/// The run that bytes off 4-byte alignment are decoded in before they are handed on:
/// 4 KiB. A tensor sliced straight out of an HTTP/2 frame is usually unaligned (the
/// frame's 9-byte header), so this is the common path for tensors. With 16 KiB runs,
/// the decoded copy, the source and the destination crowded L1: staging 64 such
/// tensors to f16 cost 68 µs per image against 45 aligned on this AMD EPYC; in 4 KiB
/// runs, 53 (`cargo run --release --example staging`).
const UNALIGNED_RUN: usize = 1024;

/// An image of a batch that holds a NaN or infinite value. It is computed as given (each
/// image's row depends on its own values only), and its caller decides: KServe answers
/// its row, as Triton does; our own API refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    /// Its position in the batch.
    pub image: usize,
    /// The first value that is not finite.
    pub element: usize,
}

impl InputView<'_> {
    /// Number of f32 values (a byte input whose length is not a multiple of 4 counts
    /// its whole values only, and then never matches a model's input length).
    pub fn len(&self) -> usize {
        match self {
            InputView::Values(v) => v.len(),
            InputView::LeBytes(b) if b.len() % 4 == 0 => b.len() / 4,
            // Never equal to a valid length: `len` is compared, never used to index.
            InputView::LeBytes(_) => usize::MAX,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` on consecutive runs of at most [`CHUNK`] values, in order, until it
    /// fails. Values given as f32, and bytes already aligned on a little-endian
    /// machine, are handed on in place; other bytes are decoded a run at a time.
    pub fn try_for_each_run<E>(&self, mut f: impl FnMut(&[f32]) -> Result<(), E>) -> Result<(), E> {
        let aligned = match *self {
            InputView::Values(v) => Some(v),
            InputView::LeBytes(b) if cfg!(target_endian = "little") => {
                bytemuck::try_cast_slice::<u8, f32>(b).ok()
            }
            InputView::LeBytes(_) => None,
        };
        if let Some(values) = aligned {
            return values.chunks(CHUNK).try_for_each(f);
        }
        let InputView::LeBytes(b) = *self else {
            return Ok(());
        };
        let mut buf = [0f32; UNALIGNED_RUN];
        for bytes in b.chunks(UNALIGNED_RUN * 4) {
            let n = bytes.len() / 4;
            let whole = &bytes[..n * 4];
            // Unaligned vector loads (measured as fast as `copy_from_slice`'s memcpy, or
            // faster), and right on either endianness.
            for (v, le) in buf.iter_mut().zip(whole.chunks_exact(4)) {
                *v = f32::from_le_bytes([le[0], le[1], le[2], le[3]]);
            }
            f(&buf[..n])?;
        }
        Ok(())
    }

    /// Calls `f` on consecutive runs of the values, in order (see
    /// [`InputView::try_for_each_run`]).
    pub fn for_each_run(&self, mut f: impl FnMut(&[f32])) {
        let _ = self.try_for_each_run(|run| {
            f(run);
            Ok::<(), std::convert::Infallible>(())
        });
    }

    /// Calls `f` with each run and the index of its first value, and checks every value
    /// of the run is finite (it is in L1 by then, so the check costs no pass over memory
    /// of its own). Fails, once every run is handed on, with the index of the first value
    /// that is not.
    fn for_each_checked_run(&self, mut f: impl FnMut(usize, &[f32])) -> Result<(), usize> {
        let mut at = 0;
        let mut first = None;
        self.for_each_run(|run| {
            if first.is_none() {
                first = first_non_finite(run).map(|k| at + k);
            }
            f(at, run);
            at += run.len();
        });
        first.map_or(Ok(()), Err)
    }

    /// Appends the values to `out`, checking every value is finite on the way. Fails
    /// with the index of the first that is not; every value is appended either way.
    pub fn extend_checked(&self, out: &mut Vec<f32>) -> Result<(), usize> {
        self.for_each_checked_run(|_, run| out.extend_from_slice(run))
    }

    /// Writes the values into `dst` (exactly [`InputView::len`] elements) through
    /// `convert`, which turns each run of f32 values into the same number of `T`,
    /// checking every value is finite on the way. Fails with the index of the first
    /// value that is not; every value is written either way.
    pub fn convert_checked<T>(
        &self,
        dst: &mut [T],
        mut convert: impl FnMut(&mut [T], &[f32]),
    ) -> Result<(), usize> {
        self.for_each_checked_run(|at, run| convert(&mut dst[at..at + run.len()], run))
    }
}

/// Converts `images` into `dst` (a batch of `dst.len() / IMAGE_LEN` slots) through
/// `convert`, one image per slot and in parallel, each value checked finite on the way;
/// the slots after the images are `zero`. Returns the images that are not finite (staged
/// as they are). This is how a batch is staged for a device.
pub fn stage_batch<T: Copy + Send + Sync>(
    dst: &mut [T],
    images: &[InputView<'_>],
    zero: T,
    convert: impl Fn(&mut [T], &[f32]) + Sync,
) -> Vec<Rejected> {
    use rayon::prelude::*;
    dst.par_chunks_mut(IMAGE_LEN)
        .enumerate()
        .filter_map(|(image, d)| {
            let checked = match images.get(image) {
                Some(src) => src.convert_checked(d, &convert),
                None => {
                    d.fill(zero);
                    Ok(())
                }
            };
            checked.err().map(|element| Rejected { image, element })
        })
        .collect()
}

/// The index of the first NaN or infinite value in `values`, if any. Checked a block at
/// a time without an early exit inside the block, which the compiler vectorizes (~20 µs
/// less per 602 KB tensor than an element-wise search).
fn first_non_finite(values: &[f32]) -> Option<usize> {
    const BLOCK: usize = 256;
    let bad_block = values
        .chunks(BLOCK)
        .position(|b| b.iter().fold(false, |bad, v| bad | !v.is_finite()))?;
    let in_block = values[bad_block * BLOCK..]
        .iter()
        .position(|v| !v.is_finite())
        .unwrap_or(0);
    Some(bad_block * BLOCK + in_block)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize) -> Vec<f32> {
        (0..n).map(|i| i as f32 * 0.25 - 3.0).collect()
    }

    fn le_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|f| f.to_le_bytes()).collect()
    }

    #[test]
    fn bytes_aligned_or_not_read_as_their_values() {
        let v = values(3 * CHUNK + 17);
        let bytes = le_bytes(&v);
        // One byte in front puts the same bytes off 4-byte alignment.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        for b in [&bytes[..], &shifted[1..]] {
            let view = InputView::LeBytes(b);
            assert_eq!(view.len(), v.len());
            let mut out = vec![0f32; v.len()];
            assert_eq!(
                view.convert_checked(&mut out, |d, s| d.copy_from_slice(s)),
                Ok(())
            );
            assert_eq!(out, v);
            let mut halves = vec![half::f16::ZERO; v.len()];
            let to_half = |d: &mut [half::f16], s: &[f32]| {
                d.iter_mut()
                    .zip(s)
                    .for_each(|(d, s)| *d = half::f16::from_f32(*s))
            };
            assert_eq!(view.convert_checked(&mut halves, to_half), Ok(()));
            assert!(halves
                .iter()
                .zip(&v)
                .all(|(h, f)| *h == half::f16::from_f32(*f)));
            let mut runs = Vec::new();
            view.for_each_run(|r| runs.extend_from_slice(r));
            assert_eq!(runs, v);
        }
        assert_eq!(InputView::LeBytes(&bytes[1..]).len(), usize::MAX);
    }

    #[test]
    fn a_staged_batch_zeroes_padding_and_names_the_images_not_finite() {
        let good = values(IMAGE_LEN);
        let mut bad = values(IMAGE_LEN);
        bad[5] = f32::NAN;
        let images = [InputView::Values(&good), InputView::Values(&bad)];
        let mut dst = vec![7f32; 3 * IMAGE_LEN];
        let rejected = stage_batch(&mut dst, &images, 0.0, |d, s| d.copy_from_slice(s));
        assert_eq!(
            rejected,
            vec![Rejected {
                image: 1,
                element: 5
            }]
        );
        assert_eq!(dst[..IMAGE_LEN], good[..]);
        // Staged as given, NaN included.
        assert!(dst[IMAGE_LEN..2 * IMAGE_LEN]
            .iter()
            .zip(&bad)
            .all(|(d, b)| d.to_bits() == b.to_bits()));
        assert!(dst[2 * IMAGE_LEN..].iter().all(|&v| v == 0.0));
        let mut gathered = vec![1.0];
        assert_eq!(
            InputView::Values(&bad).extend_checked(&mut gathered),
            Err(5)
        );
        assert_eq!(gathered.len(), 1 + IMAGE_LEN, "appended all the same");
    }

    #[test]
    fn the_first_non_finite_value_is_named_wherever_it_falls() {
        let n = 3 * CHUNK + 17;
        for (at, bad) in [
            (0, f32::NAN),
            (1000, f32::INFINITY),
            (UNALIGNED_RUN - 1, f32::NAN),
            (UNALIGNED_RUN, f32::INFINITY),
            (CHUNK - 1, f32::NAN),
            (CHUNK + 3, f32::NAN),
            (n - 1, f32::NEG_INFINITY),
        ] {
            let mut v = values(n);
            v[at] = bad;
            if at + 5 < n {
                v[at + 5] = f32::NAN; // only the first counts
            }
            let bytes = le_bytes(&v);
            let mut shifted = vec![0u8];
            shifted.extend_from_slice(&bytes);
            for view in [
                InputView::Values(&v),
                InputView::LeBytes(&bytes),
                InputView::LeBytes(&shifted[1..]),
            ] {
                let mut out = vec![0f32; n];
                assert_eq!(
                    view.convert_checked(&mut out, |d, s| d.copy_from_slice(s)),
                    Err(at),
                    "{at}"
                );
            }
        }
    }
}
