//! torchvision's `Resize(256)` + `CenterCrop(224)` on a PIL image, to the pixel.
//!
//! Geometry follows torchvision (the long side truncated, the crop offset rounded half
//! to even as Python's `round` does); the resampling is fast_image_resize's convolution
//! with the bilinear filter, which like PIL widens the filter by the downscale factor
//! (antialiasing) and works in 8-bit fixed point per pass.

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;

use super::{PreprocessError, RESIZE_TO};
use crate::model::INPUT_SIZE;

/// `Resize(size)`'s output for a `width x height` image: the short side becomes `size`,
/// the long side `int(size * long / short)`.
pub fn resized_dims(width: u32, height: u32, size: u32) -> (u32, u32) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = (f64::from(size) * f64::from(long) / f64::from(short)) as u32;
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// Python's `round` for the non-negative halves `CenterCrop` produces: half to even.
fn round_half_even(x: f64) -> u32 {
    let floor = x.floor();
    let diff = x - floor;
    let r = if diff > 0.5 || (diff == 0.5 && floor % 2.0 != 0.0) {
        floor + 1.0
    } else {
        floor
    };
    r as u32
}

/// `CenterCrop(crop)`'s top-left corner in a `width x height` image.
pub fn crop_origin(width: u32, height: u32, crop: u32) -> (u32, u32) {
    let left = round_half_even(f64::from(width.saturating_sub(crop)) / 2.0);
    let top = round_half_even(f64::from(height.saturating_sub(crop)) / 2.0);
    (left, top)
}

/// Resize the short side to 256 (antialiased bilinear), then take the centre 224x224.
pub fn resize_and_crop(img: &RgbImage) -> Result<RgbImage, PreprocessError> {
    let resized = resize_short_side(img, RESIZE_TO)?;
    let crop = INPUT_SIZE as u32;
    let (left, top) = crop_origin(resized.width(), resized.height(), crop);
    Ok(image::imageops::crop_imm(&resized, left, top, crop, crop).to_image())
}

/// The whole image resized so its short side is `size`.
pub fn resize_short_side(img: &RgbImage, size: u32) -> Result<RgbImage, PreprocessError> {
    let (w, h) = resized_dims(img.width(), img.height(), size);
    if (w, h) == img.dimensions() {
        return Ok(img.clone());
    }
    let src = Image::from_vec_u8(
        img.width(),
        img.height(),
        img.as_raw().clone(),
        PixelType::U8x3,
    );
    let mut dst = Image::new(w, h, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    let fail = |e: String| PreprocessError::Resize(e);
    let src = src.map_err(|e| fail(e.to_string()))?;
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .map_err(|e| fail(e.to_string()))?;
    RgbImage::from_raw(w, h, dst.into_vec())
        .ok_or_else(|| fail("resized buffer has the wrong size".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_truncates_the_long_side() {
        assert_eq!(resized_dims(640, 427, 256), (383, 256)); // 256 * 640 / 427 = 383.7
        assert_eq!(resized_dims(300, 451, 256), (256, 384)); // 384.85 truncated
        assert_eq!(resized_dims(512, 512, 256), (256, 256));
        assert_eq!(resized_dims(97, 150, 256), (256, 395)); // upscaling: 395.87
    }

    #[test]
    fn crop_rounds_half_to_even_like_python() {
        // (257 - 224) / 2 = 16.5 -> 16 in Python (Rust's f64::round says 17).
        assert_eq!(crop_origin(257, 257, 224), (16, 16));
        // (259 - 224) / 2 = 17.5 -> 18.
        assert_eq!(crop_origin(259, 256, 224), (18, 16));
        assert_eq!(crop_origin(383, 256, 224), (80, 16)); // 79.5 -> 80
    }

    #[test]
    fn output_is_the_model_input_size() {
        let img = RgbImage::from_fn(301, 199, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let out = resize_and_crop(&img).map(|o| o.dimensions());
        assert_eq!(out, Ok((224, 224)));
    }
}
