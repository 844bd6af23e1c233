//! Encoded bytes and raw frames to RGB8, as PIL's `Image.open(...).convert("RGB")`:
//! grey is replicated, palettes are looked up, alpha is dropped (not composited), and
//! 16-bit samples follow PIL's own rules (16-bit grey is clipped to 255 as PIL's `I;16`
//! conversion does; 16-bit colour keeps the high byte as PIL's PNG decoder does).

use std::io::Cursor;

use image::{DynamicImage, ImageFormat, ImageReader, RgbImage};

use super::PreprocessError;

/// Bounds on what a client may make us decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest encoded image accepted, in bytes.
    pub max_encoded_bytes: usize,
    /// Largest decoded image, in pixels, checked from the header before decoding.
    pub max_pixels: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_encoded_bytes: 32 << 20,
            // 40 megapixels: a 7680x5200 photo; PIL's own bomb warning starts near 89M.
            max_pixels: 40_000_000,
        }
    }
}

impl Limits {
    fn check_pixels(&self, width: u32, height: u32) -> Result<(), PreprocessError> {
        let pixels = u64::from(width) * u64::from(height);
        if pixels > self.max_pixels {
            return Err(PreprocessError::TooManyPixels {
                width,
                height,
                pixels,
                limit: self.max_pixels,
            });
        }
        if pixels == 0 {
            return Err(PreprocessError::Empty);
        }
        Ok(())
    }
}

const ACCEPTED: [ImageFormat; 5] = [
    ImageFormat::Jpeg,
    ImageFormat::Png,
    ImageFormat::WebP,
    ImageFormat::Bmp,
    ImageFormat::Gif,
];

fn reader(bytes: &[u8]) -> Result<ImageReader<Cursor<&[u8]>>, PreprocessError> {
    let r = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PreprocessError::Decode(e.to_string()))?;
    match r.format() {
        Some(f) if ACCEPTED.contains(&f) => Ok(r),
        _ => Err(PreprocessError::UnknownFormat),
    }
}

/// Decodes an encoded image to RGB8 after checking its size from the header alone.
pub fn decode_rgb8(bytes: &[u8], limits: &Limits) -> Result<RgbImage, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty);
    }
    if bytes.len() > limits.max_encoded_bytes {
        return Err(PreprocessError::TooManyBytes {
            size: bytes.len(),
            limit: limits.max_encoded_bytes,
        });
    }
    let r = reader(bytes)?;
    if r.format() == Some(ImageFormat::Jpeg) {
        if let Some(rgb) = decode_jpeg(bytes, limits)? {
            return Ok(rgb);
        }
    }
    let (width, height) = r
        .into_dimensions()
        .map_err(|e| PreprocessError::Decode(e.to_string()))?;
    limits.check_pixels(width, height)?;
    let mut r = reader(bytes)?;
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(width);
    decoder_limits.max_image_height = Some(height);
    // Room for the decoded image at 16 bits x 4 channels, and the decoder's scratch.
    decoder_limits.max_alloc = Some(u64::from(width) * u64::from(height) * 8 + (64 << 20));
    r.limits(decoder_limits);
    let img = r
        .decode()
        .map_err(|e| PreprocessError::Decode(e.to_string()))?;
    Ok(to_rgb8_like_pil(img))
}

/// JPEG through libjpeg-turbo's decoder with PIL's settings (accurate integer IDCT,
/// fancy upsampling), so pixels match PIL's exactly. `None` for colour spaces libjpeg
/// cannot turn into RGB (CMYK, YCCK), which the general decoder handles.
fn decode_jpeg(bytes: &[u8], limits: &Limits) -> Result<Option<RgbImage>, PreprocessError> {
    // mozjpeg reports libjpeg's fatal errors by unwinding (without the panic hook) out
    // of the C decoder; catch that here so a corrupt upload is an error, not a crash.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decode_jpeg_inner(bytes, limits)
    }))
    .unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "corrupt data".into());
        Err(PreprocessError::Decode(format!("JPEG: {msg}")))
    })
}

fn decode_jpeg_inner(bytes: &[u8], limits: &Limits) -> Result<Option<RgbImage>, PreprocessError> {
    use mozjpeg::{ColorSpace, DctMethod, Decompress};
    let err = |e: std::io::Error| PreprocessError::Decode(format!("JPEG: {e}"));
    let ran_out = std::rc::Rc::new(std::cell::Cell::new(false));
    let source = Watched {
        rest: bytes,
        ran_out: ran_out.clone(),
    };
    let mut d = Decompress::builder().from_reader(source).map_err(err)?;
    let (width, height) = (d.width() as u32, d.height() as u32);
    limits.check_pixels(width, height)?;
    if !matches!(
        d.color_space(),
        ColorSpace::JCS_GRAYSCALE | ColorSpace::JCS_YCbCr | ColorSpace::JCS_RGB
    ) {
        return Ok(None);
    }
    d.dct_method(DctMethod::IntegerSlow);
    d.do_fancy_upsampling(true);
    let mut started = d.rgb().map_err(err)?;
    let pixels = started.read_scanlines::<u8>().map_err(err)?;
    // libjpeg pads a file that ends inside its image data with grey and only warns; PIL
    // (the reference) refuses it as "image file is truncated", and so do we.
    if ran_out.get() {
        return Err(PreprocessError::Decode(
            "JPEG: image file is truncated (its data ends before the last row)".into(),
        ));
    }
    drop(started);
    RgbImage::from_raw(width, height, pixels)
        .map(Some)
        .ok_or_else(|| PreprocessError::Decode("JPEG: image data ends early".into()))
}

/// A JPEG's bytes as libjpeg's source, noting when libjpeg asked for more than there is.
struct Watched<'a> {
    rest: &'a [u8],
    ran_out: std::rc::Rc<std::cell::Cell<bool>>,
}

impl std::io::Read for Watched<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = std::io::Read::read(&mut self.rest, buf)?;
        if n == 0 && !buf.is_empty() {
            self.ran_out.set(true);
        }
        Ok(n)
    }
}

impl std::io::BufRead for Watched<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.rest.is_empty() {
            self.ran_out.set(true);
        }
        Ok(self.rest)
    }

    fn consume(&mut self, amt: usize) {
        self.rest = &self.rest[amt.min(self.rest.len())..];
    }
}

fn to_rgb8_like_pil(img: DynamicImage) -> RgbImage {
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageLuma16(grey) => {
            let (w, h) = grey.dimensions();
            RgbImage::from_fn(w, h, |x, y| {
                let v = grey.get_pixel(x, y)[0].min(255) as u8;
                image::Rgb([v, v, v])
            })
        }
        DynamicImage::ImageLumaA16(grey) => {
            let (w, h) = grey.dimensions();
            RgbImage::from_fn(w, h, |x, y| {
                let v = (grey.get_pixel(x, y)[0] >> 8) as u8;
                image::Rgb([v, v, v])
            })
        }
        DynamicImage::ImageRgb16(rgb) => {
            let (w, h) = rgb.dimensions();
            RgbImage::from_fn(w, h, |x, y| {
                let p = rgb.get_pixel(x, y).0;
                image::Rgb([(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            })
        }
        DynamicImage::ImageRgba16(rgba) => {
            let (w, h) = rgba.dimensions();
            RgbImage::from_fn(w, h, |x, y| {
                let p = rgba.get_pixel(x, y).0;
                image::Rgb([(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            })
        }
        // 8-bit grey, grey+alpha, RGBA and palette (already expanded by the decoder):
        // the crate's conversion replicates grey and drops alpha, as PIL does.
        other => other.to_rgb8(),
    }
}

/// Wraps a raw `height x width x 3` RGB8 frame after checking its size.
pub fn raw_frame(
    width: u32,
    height: u32,
    rgb: &[u8],
    limits: &Limits,
) -> Result<RgbImage, PreprocessError> {
    limits.check_pixels(width, height)?;
    let expected = u64::from(width) * u64::from(height) * 3;
    if rgb.len() as u64 != expected {
        return Err(PreprocessError::FrameSize {
            width,
            height,
            expected,
            got: rgb.len(),
        });
    }
    RgbImage::from_raw(width, height, rgb.to_vec()).ok_or(PreprocessError::FrameSize {
        width,
        height,
        expected,
        got: rgb.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PNG header (IHDR) claiming `w x h`, then an empty IDAT: no pixel data at all.
    fn png_header(w: u32, h: u32) -> Vec<u8> {
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(b"IHDR");
        ihdr.extend_from_slice(&w.to_be_bytes());
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        let crc = crc32(&ihdr);
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        out.extend_from_slice(&13u32.to_be_bytes());
        out.extend_from_slice(&ihdr);
        out.extend_from_slice(&crc.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(b"IDAT");
        out.extend_from_slice(&crc32(b"IDAT").to_be_bytes());
        out
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn pixel_bomb_is_refused_from_its_header() {
        let bomb = png_header(100_000, 100_000);
        let err = decode_rgb8(&bomb, &Limits::default()).expect_err("must refuse");
        assert!(
            matches!(
                err,
                PreprocessError::TooManyPixels {
                    pixels: 10_000_000_000,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn byte_limit_and_garbage() {
        let limits = Limits {
            max_encoded_bytes: 10,
            ..Limits::default()
        };
        assert!(matches!(
            decode_rgb8(&[0u8; 11], &limits),
            Err(PreprocessError::TooManyBytes {
                size: 11,
                limit: 10
            })
        ));
        assert_eq!(
            decode_rgb8(b"not an image at all", &Limits::default()),
            Err(PreprocessError::UnknownFormat)
        );
        assert_eq!(
            decode_rgb8(&[], &Limits::default()),
            Err(PreprocessError::Empty)
        );
        // A real header with nothing behind it: a decode error, not a panic.
        assert!(matches!(
            decode_rgb8(&png_header(8, 8), &Limits::default()),
            Err(PreprocessError::Decode(_))
        ));
    }

    #[test]
    fn corrupt_jpeg_is_an_error_not_a_crash() {
        let mut jpeg = Vec::new();
        let img =
            image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 4, y as u8 * 5, 90]));
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut jpeg), ImageFormat::Jpeg)
            .expect("encode");
        assert!(decode_rgb8(&jpeg, &Limits::default()).is_ok());
        for cut in [4, 20, 100, 200] {
            let err = decode_rgb8(&jpeg[..cut], &Limits::default());
            assert!(
                matches!(err, Err(PreprocessError::Decode(_))),
                "cut {cut}: {err:?}"
            );
        }
    }

    #[test]
    fn a_truncated_jpeg_is_refused_as_pil_refuses_it() {
        let img = image::RgbImage::from_fn(160, 120, |x, y| {
            image::Rgb([(x * 3) as u8, (y * 2) as u8, (x ^ y) as u8])
        });
        let mut jpeg = Vec::new();
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut jpeg), ImageFormat::Jpeg)
            .expect("encode");
        assert!(decode_rgb8(&jpeg, &Limits::default()).is_ok());
        for cut in [jpeg.len() / 2, jpeg.len() - 40] {
            match decode_rgb8(&jpeg[..cut], &Limits::default()) {
                Err(PreprocessError::Decode(m)) => assert!(m.contains("truncated"), "{m}"),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn raw_frames_are_checked() {
        let l = Limits::default();
        assert!(raw_frame(2, 2, &[0; 12], &l).is_ok());
        assert!(matches!(
            raw_frame(2, 2, &[0; 11], &l),
            Err(PreprocessError::FrameSize { expected: 12, .. })
        ));
        assert_eq!(raw_frame(0, 5, &[], &l), Err(PreprocessError::Empty));
    }

    #[test]
    fn sixteen_bit_follows_pil() {
        let grey = image::ImageBuffer::from_fn(2, 1, |x, _| {
            image::Luma([if x == 0 { 200u16 } else { 1000 }])
        });
        let rgb = to_rgb8_like_pil(DynamicImage::ImageLuma16(grey));
        assert_eq!(rgb.get_pixel(0, 0).0, [200, 200, 200]);
        assert_eq!(rgb.get_pixel(1, 0).0, [255, 255, 255]);
        let colour =
            image::ImageBuffer::from_fn(1, 1, |_, _| image::Rgb([0x1234u16, 0xff00, 0x00ff]));
        assert_eq!(
            to_rgb8_like_pil(DynamicImage::ImageRgb16(colour))
                .get_pixel(0, 0)
                .0,
            [0x12, 0xff, 0x00]
        );
    }
}
