//! Inputs to the model's normalised `3 x 224 x 224` f32 tensor, exactly as the model
//! card's torchvision pipeline does it on PIL images:
//! `Resize(256)` (antialiased bilinear on the short side) -> `CenterCrop(224)` ->
//! `ToTensor()` (/255) -> `Normalize(mean, std)`.
//!
//! - [`decode`]: encoded bytes to RGB8 as PIL's `convert("RGB")`, behind size limits that
//!   refuse a pixel bomb before it is decoded.
//! - [`resize`]: the resize and crop geometry and arithmetic of PIL + torchvision.
//!
//! Raw RGB8 frames (video) enter at the resize step; ready float tensors are kept as
//! received (their values are checked where their batch is assembled).

pub mod decode;
pub mod resize;

pub use decode::Limits;

use prost::bytes::Bytes;

use crate::model::{ModelInput, INPUT_SIZE};

/// ImageNet statistics the weights were trained with.
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];
/// `Resize(256)`: the short side after resizing.
pub const RESIZE_TO: u32 = 256;

/// Elements of one model input.
pub const INPUT_LEN: usize = 3 * INPUT_SIZE * INPUT_SIZE;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PreprocessError {
    #[error("encoded image is {size} bytes, over the {limit}-byte limit")]
    TooManyBytes { size: usize, limit: usize },
    #[error("image is {width}x{height} = {pixels} pixels, over the {limit}-pixel limit")]
    TooManyPixels {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
    #[error("image is empty")]
    Empty,
    #[error("unrecognised image format (expected JPEG, PNG, WebP, BMP or GIF)")]
    UnknownFormat,
    #[error("cannot decode image: {0}")]
    Decode(String),
    #[error("raw frame {width}x{height} needs {expected} RGB8 bytes, got {got}")]
    FrameSize {
        width: u32,
        height: u32,
        expected: u64,
        got: usize,
    },
    #[error(
        "float tensor must be 3x224x224 little-endian f32 ({expected} bytes), got {got} bytes"
    )]
    TensorSize { expected: usize, got: usize },
    #[error("cannot resize image: {0}")]
    Resize(String),
}

/// One image as a client sends it.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// JPEG, PNG, WebP, BMP or GIF (first frame) bytes.
    Encoded(&'a [u8]),
    /// Row-major `height x width x 3` RGB8.
    Raw {
        width: u32,
        height: u32,
        rgb: &'a [u8],
    },
    /// A ready `3 x 224 x 224` f32 tensor, little-endian, already normalised (as
    /// received: the model input keeps these bytes rather than a copy).
    Tensor(&'a Bytes),
}

/// An image as an API hands it to the serving core: the bytes as received, owned, nothing
/// decoded yet. Both APIs convert what their callers send into these (a shared-memory
/// window is read into a `Tensor` at the API), so one preprocessing path serves both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Image {
    /// JPEG, PNG, WebP, BMP or GIF (first frame) bytes.
    Encoded(Bytes),
    /// Row-major `height x width x 3` RGB8.
    Raw { width: u32, height: u32, rgb: Bytes },
    /// A ready `3 x 224 x 224` f32 tensor, little-endian, already normalised.
    Tensor(Bytes),
}

impl Image {
    /// The image as [`Preprocessor::prepare`] reads it.
    pub fn input(&self) -> Input<'_> {
        match self {
            Image::Encoded(data) => Input::Encoded(data),
            Image::Raw { width, height, rgb } => Input::Raw {
                width: *width,
                height: *height,
                rgb,
            },
            Image::Tensor(data) => Input::Tensor(data),
        }
    }

    /// Whether preparing it is decoding and resizing (work worth a thread of the
    /// blocking pool), not only a length check.
    pub fn needs_decoding(&self) -> bool {
        !matches!(self, Image::Tensor(_))
    }
}

/// Turns inputs into model tensors under a set of limits.
#[derive(Debug, Clone, Default)]
pub struct Preprocessor {
    pub limits: Limits,
}

impl Preprocessor {
    pub fn new(limits: Limits) -> Self {
        Preprocessor { limits }
    }

    /// The normalised `3 x 224 x 224` model input (CHW) for one image.
    pub fn prepare(&self, input: Input<'_>) -> Result<ModelInput, PreprocessError> {
        match input {
            Input::Encoded(bytes) => {
                let img = decode::decode_rgb8(bytes, &self.limits)?;
                Ok(normalise(&resize::resize_and_crop(&img)?).into())
            }
            Input::Raw { width, height, rgb } => {
                let img = decode::raw_frame(width, height, rgb, &self.limits)?;
                Ok(normalise(&resize::resize_and_crop(&img)?).into())
            }
            Input::Tensor(bytes) => tensor(bytes),
        }
    }
}

/// `ToTensor` + `Normalize` on a 224x224 RGB8 crop: HWC u8 to normalised CHW f32.
pub fn normalise(crop: &image::RgbImage) -> Vec<f32> {
    let plane = INPUT_SIZE * INPUT_SIZE;
    let mut out = vec![0f32; INPUT_LEN];
    for (i, px) in crop.pixels().enumerate().take(plane) {
        for c in 0..3 {
            out[c * plane + i] = (f32::from(px[c]) / 255.0 - MEAN[c]) / STD[c];
        }
    }
    out
}

/// A ready tensor, its length checked, kept as the bytes it arrived in: it is converted
/// once, where its batch is assembled, and every value is checked finite there (a pass
/// over its 602 KB here as well cost as much as the conversion itself).
fn tensor(bytes: &Bytes) -> Result<ModelInput, PreprocessError> {
    let expected = INPUT_LEN * 4;
    if bytes.len() != expected {
        return Err(PreprocessError::TensorSize {
            expected,
            got: bytes.len(),
        });
    }
    Ok(ModelInput::LeBytes(bytes.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_input_is_kept_as_received() {
        let p = Preprocessor::default();
        let bytes: Vec<u8> = (0..INPUT_LEN)
            .flat_map(|i| (i as f32 * 1e-6).to_le_bytes())
            .collect();
        let received = Bytes::from(bytes.clone());
        let prepared = p.prepare(Input::Tensor(&received)).expect("valid");
        // The very bytes received, not a copy of them.
        assert!(matches!(&prepared, ModelInput::LeBytes(b) if b.as_ptr() == received.as_ptr()));
        assert_eq!(prepared.into_values()[10], 10.0 * 1e-6);
        for wrong in [&bytes[4..], &bytes[..3]] {
            assert!(matches!(
                p.prepare(Input::Tensor(&Bytes::copy_from_slice(wrong))),
                Err(PreprocessError::TensorSize { .. })
            ));
        }
    }

    #[test]
    fn normalise_matches_to_tensor_then_normalize() {
        let crop = image::RgbImage::from_fn(224, 224, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 255])
        });
        let t = normalise(&crop);
        let plane = 224 * 224;
        assert!((t[5] - (5.0 / 255.0 - MEAN[0]) / STD[0]).abs() < 1e-6);
        assert!((t[plane + 224 * 7] - (7.0 / 255.0 - MEAN[1]) / STD[1]).abs() < 1e-6);
        assert!((t[2 * plane] - (1.0 - MEAN[2]) / STD[2]).abs() < 1e-6);
    }
}
