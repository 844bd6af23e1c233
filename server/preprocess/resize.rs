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
fn round_half_even(x: f64) -> u64 {
    let floor = x.floor();
    let diff = x - floor;
    let r = if diff > 0.5 || (diff == 0.5 && floor % 2.0 != 0.0) {
        floor + 1.0
    } else {
        floor
    };
    r as u64
}

/// `CenterCrop(crop)`'s top-left corner in a `width x height` image.
pub fn crop_origin(width: u32, height: u32, crop: u32) -> (u32, u32) {
    let (left, top) = crop_origin_wide(width.into(), height.into(), crop.into());
    // At most (width - crop) / 2 rounded, which fits the u32 it came from.
    (
        u32::try_from(left).unwrap_or(u32::MAX),
        u32::try_from(top).unwrap_or(u32::MAX),
    )
}

/// The largest resized image computed whole: 4 M pixels, a 256 x 16384 strip (aspect
/// ratios up to 64:1). Past it only the crop is computed (see [`resize_and_crop`]).
pub const FULL_RESIZE_MAX_PIXELS: u64 = 1 << 22;

/// Resize the short side to 256 (antialiased bilinear), then take the centre 224x224.
///
/// Up to [`FULL_RESIZE_MAX_PIXELS`] resized pixels this resizes the whole image and crops
/// it, as torchvision does. Past that (a 1 x 100000 frame would resize to 256 x 25.6 M
/// pixels, 19.7 GB) only the crop is computed ([`resize_crop_window`]), so memory and
/// work are bounded by the output whatever the aspect ratio.
pub fn resize_and_crop(img: &RgbImage) -> Result<RgbImage, PreprocessError> {
    let (width, height) = img.dimensions();
    let (rw, rh) = resized_dims_wide(width, height, RESIZE_TO);
    if rw.saturating_mul(rh) > FULL_RESIZE_MAX_PIXELS {
        return resize_crop_window(img);
    }
    // Within the cap both fit u32.
    let resized = resize_short_side(img, RESIZE_TO)?;
    let crop = INPUT_SIZE as u32;
    let (left, top) = crop_origin(resized.width(), resized.height(), crop);
    Ok(image::imageops::crop_imm(&resized, left, top, crop, crop).to_image())
}

/// The 224x224 crop of the resized image, computed alone: the resampler is given the
/// crop's window in source coordinates, so each output pixel gets the filter window
/// (centre, scale, support) it has in the full resize. The resampler's fixed-point
/// precision follows the largest filter weight among the pixels it computes, which for
/// the crop alone can be a bit lower than for the whole image, so a pixel may differ from
/// the full resize by one level (tested); that is why it serves only past the cap.
pub fn resize_crop_window(img: &RgbImage) -> Result<RgbImage, PreprocessError> {
    let (width, height) = img.dimensions();
    let crop = INPUT_SIZE as u32;
    let window = crop_window(width, height)?;
    if resized_dims_wide(width, height, RESIZE_TO) == (u64::from(width), u64::from(height)) {
        // Already 256 on the short side: the crop is a copy of source pixels.
        let (left, top) = (window.left as u32, window.top as u32);
        return Ok(image::imageops::crop_imm(img, left, top, crop, crop).to_image());
    }
    let fail = |e: String| PreprocessError::Resize(e);
    let src =
        fast_image_resize::images::ImageRef::new(width, height, img.as_raw(), PixelType::U8x3)
            .map_err(|e| fail(e.to_string()))?;
    let mut dst = Image::new(crop, crop, PixelType::U8x3);
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
        .crop(window.left, window.top, window.width, window.height);
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .map_err(|e| fail(e.to_string()))?;
    RgbImage::from_raw(crop, crop, dst.into_vec())
        .ok_or_else(|| fail("resized buffer has the wrong size".into()))
}

/// Where `Resize(256)` + `CenterCrop(224)`'s output lies in the source image, in source
/// pixels: the resized image's crop rectangle scaled back by the resize factors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropWindow {
    pub left: f64,
    pub top: f64,
    pub width: f64,
    pub height: f64,
}

/// The source window of the model input for a `width x height` image. Works in `u64` /
/// `f64`, so no aspect ratio overflows: the resized long side of a 1-pixel-wide image of
/// 40 M pixels would be ~10^10, past `u32`.
pub fn crop_window(width: u32, height: u32) -> Result<CropWindow, PreprocessError> {
    if width == 0 || height == 0 {
        return Err(PreprocessError::Empty);
    }
    let (rw, rh) = resized_dims_wide(width, height, RESIZE_TO);
    let crop = INPUT_SIZE as u64;
    let (left, top) = crop_origin_wide(rw, rh, crop);
    // The resampler maps output pixel i of a window [in0, in0 + len) to the source centre
    // in0 + (i + 0.5) * len / out; with in0 = left * scale and len = crop * scale that is
    // the full resize's (left + i + 0.5) * scale.
    let sx = f64::from(width) / rw as f64;
    let sy = f64::from(height) / rh as f64;
    Ok(CropWindow {
        left: left as f64 * sx,
        top: top as f64 * sy,
        width: crop as f64 * sx,
        height: crop as f64 * sy,
    })
}

/// [`resized_dims`] without the `u32` limit on the result.
fn resized_dims_wide(width: u32, height: u32, size: u32) -> (u64, u64) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = (f64::from(size) * f64::from(long) / f64::from(short)) as u64;
    if width <= height {
        (u64::from(size), new_long)
    } else {
        (new_long, u64::from(size))
    }
}

/// [`crop_origin`] on `u64` sizes.
fn crop_origin_wide(width: u64, height: u64, crop: u64) -> (u64, u64) {
    let left = round_half_even(width.saturating_sub(crop) as f64 / 2.0);
    let top = round_half_even(height.saturating_sub(crop) as f64 / 2.0);
    (left, top)
}

/// The whole image resized so its short side is `size`.
pub fn resize_short_side(img: &RgbImage, size: u32) -> Result<RgbImage, PreprocessError> {
    let (w, h) = resized_dims(img.width(), img.height(), size);
    if (w, h) == img.dimensions() {
        return Ok(img.clone());
    }
    let fail = |e: String| PreprocessError::Resize(e);
    let src = fast_image_resize::images::ImageRef::new(
        img.width(),
        img.height(),
        img.as_raw(),
        PixelType::U8x3,
    )
    .map_err(|e| fail(e.to_string()))?;
    let mut dst = Image::new(w, h, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
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

    /// The full resize then the crop.
    fn resize_then_crop(img: &RgbImage) -> RgbImage {
        let resized = resize_short_side(img, RESIZE_TO).expect("resizes");
        let crop = INPUT_SIZE as u32;
        let (left, top) = crop_origin(resized.width(), resized.height(), crop);
        image::imageops::crop_imm(&resized, left, top, crop, crop).to_image()
    }

    #[test]
    fn the_crop_alone_is_the_full_resizes_crop_within_one_level() {
        // Up- and downscaling, both orientations, odd sizes, the 256 short side (a copy),
        // sizes whose crop offset rounds half to even, and strips past the cap.
        let mut sizes = vec![
            (640, 427),
            (427, 640),
            (256, 300),
            (300, 256),
            (257, 257),
            (259, 256),
            (97, 150),
            (224, 224),
            (1, 700),
            (700, 3),
            (1023, 767),
            (2000, 1999),
            (3, 400),
            (1, 300),
        ];
        // And a spread of others from a fixed linear congruential sequence.
        let mut x: u64 = 12345;
        for _ in 0..40 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let w = 1 + (x >> 33) as u32 % 900;
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let h = 1 + (x >> 33) as u32 % 900;
            sizes.push((w, h));
        }
        let (mut identical, mut pixels_off) = (0, 0);
        for &(w, h) in &sizes {
            let img = RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([(x * 7 + y * 3) as u8, (x ^ y) as u8, (x * y) as u8])
            });
            let got = resize_crop_window(&img).expect("resizes");
            let want = resize_then_crop(&img);
            let off = got
                .as_raw()
                .iter()
                .zip(want.as_raw())
                .filter(|(a, b)| a != b)
                .count();
            let worst = got
                .as_raw()
                .iter()
                .zip(want.as_raw())
                .map(|(&a, &b)| a.abs_diff(b))
                .max();
            assert!(worst <= Some(1), "{w}x{h}: off by {worst:?}");
            identical += usize::from(off == 0);
            pixels_off += off;
        }
        // The fixed-point precision differs for few sizes, and then in few samples.
        // (Measured: 44 of 54 sizes identical.)
        assert!(
            identical * 4 >= sizes.len() * 3,
            "{identical} of {}",
            sizes.len()
        );
        assert!(
            pixels_off < sizes.len() * 224 * 224 * 3 / 100,
            "{pixels_off}"
        );
    }

    #[test]
    fn the_whole_image_is_resized_below_the_cap() {
        // 97 x 150 is one where the crop alone rounds some samples differently.
        let img = RgbImage::from_fn(97, 150, |x, y| image::Rgb([(x * 7 + y * 3) as u8, 5, 9]));
        assert!(resize_and_crop(&img).expect("resizes") == resize_then_crop(&img));
    }

    #[test]
    fn any_aspect_ratio_costs_only_the_crop() {
        // Resized whole, 1 x 100000 is 256 x 25.6 M pixels (19.7 GB); 1 x 40 M is past u32.
        for (w, h) in [(1, 100_000), (100_000, 1), (1, 40_000_000)] {
            let img = RgbImage::from_pixel(w, h, image::Rgb([10, 20, 30]));
            let out = resize_and_crop(&img).expect("resizes");
            assert_eq!(out.dimensions(), (224, 224));
            assert_eq!(out.get_pixel(100, 100).0, [10, 20, 30]);
        }
        assert_eq!(crop_window(0, 5), Err(PreprocessError::Empty));
    }

    #[test]
    fn output_is_the_model_input_size() {
        let img = RgbImage::from_fn(301, 199, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let out = resize_and_crop(&img).map(|o| o.dimensions());
        assert_eq!(out, Ok((224, 224)));
    }
}
