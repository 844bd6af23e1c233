//! A request's one input to the images the serving core takes: the view's name, datatype
//! and shape checked, its bytes from `raw_input_contents`, typed `contents` or a
//! shared-memory window, cut per image as slices of the frames they arrived in.

use prost::bytes::Bytes;

use crate::api::error::ServeError;
use crate::api::shm::SharedMemory;
use crate::api::unary::Segmented;
use crate::model::INPUT_SIZE;
use crate::preprocess::Image;
use crate::proto::inference::{model_infer_request::InferInputTensor, ModelInferRequest};

use super::super::views::View;
use super::{bad, shared_window, split_bytes};

/// The request's images, in batch order, as the serving core takes them (the same type
/// our Classifier API converts its images into).
pub fn images(
    view: View,
    req: &ModelInferRequest,
    raw_input_contents: Vec<Segmented>,
    shared_memory: &SharedMemory,
    max_images: usize,
) -> Result<Vec<Image>, ServeError> {
    let [input] = req.inputs.as_slice() else {
        return Err(bad(format!(
            "this model takes exactly one input, '{}' ({} {:?} with -1 for the batch); got {}",
            view.input_name(),
            view.datatype(),
            view.dims(),
            req.inputs.len()
        )));
    };
    if input.name != view.input_name() {
        return Err(bad(format!(
            "unknown input '{}'; this model's input is '{}' ({})",
            input.name,
            view.input_name(),
            view.datatype()
        )));
    }
    if input.datatype != view.datatype() {
        return Err(bad(format!(
            "input '{}' has datatype {}, expected {}",
            input.name,
            input.datatype,
            view.datatype()
        )));
    }
    let raw = match (
        raw_input_contents.len(),
        shared_window(&input.name, &input.parameters)?,
    ) {
        (0, None) => None,
        (0, Some(w)) => Some(Segmented::from(shared_memory.bytes(
            &w.region,
            w.offset,
            w.byte_size,
        )?)),
        (1, None) => raw_input_contents.into_iter().next(),
        (_, Some(_)) => {
            return Err(bad(format!(
                "input '{}' is in shared memory and in raw_input_contents; send it one way",
                input.name
            )))
        }
        (n, None) => return Err(bad(format!("{n} raw_input_contents for one input"))),
    };

    let input = &req.inputs[0];
    match view {
        View::Tensor => tensors(input, raw, max_images),
        View::Frame => frames(input, raw, max_images),
        View::Image => encoded(input, raw, max_images),
    }
}

fn dims(input: &InferInputTensor) -> Result<Vec<usize>, ServeError> {
    input
        .shape
        .iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| {
                bad(format!(
                    "input '{}' has a negative dimension in shape {:?}",
                    input.name, input.shape
                ))
            })
        })
        .collect()
}

/// The batch a shape declares, checked against the per-request limit before any size is
/// computed from it (a batch of 2^52 would overflow them).
fn batch_of(input: &InferInputTensor, shape: &[usize], max: usize) -> Result<usize, ServeError> {
    match shape.first() {
        Some(&n) if n > max => Err(bad(format!(
            "a batch of {n} images in one request; the limit is {max}"
        ))),
        Some(&n) if n > 0 => Ok(n),
        _ => Err(bad(format!(
            "input '{}' needs a batch of at least one; shape {:?}",
            input.name, input.shape
        ))),
    }
}

/// Image `i` of `n` of `per` bytes each, from bytes whose length was checked to be
/// `n * per`: a slice of the frame it arrived in unless it straddles two.
fn nth(bytes: &Segmented, i: usize, per: usize) -> Result<Bytes, ServeError> {
    bytes
        .slice(i * per..(i + 1) * per)
        .ok_or_else(|| ServeError::Internal(format!("element {i} past the checked data")))
}

fn tensors(
    input: &InferInputTensor,
    raw: Option<Segmented>,
    max_images: usize,
) -> Result<Vec<Image>, ServeError> {
    let shape = dims(input)?;
    let side = INPUT_SIZE;
    if shape.len() != 4 || shape[1..] != [3, side, side] {
        return Err(bad(format!(
            "input 'input' must have shape [N, 3, {side}, {side}]; got {:?}",
            input.shape
        )));
    }
    let n = batch_of(input, &shape, max_images)?;
    let per = 3 * side * side * 4;
    let total = n
        .checked_mul(per)
        .ok_or_else(|| bad(format!("input shape {:?} is too large", input.shape)))?;
    let bytes = match raw {
        Some(b) => b,
        None => {
            let v = &input
                .contents
                .as_ref()
                .map(|c| &c.fp32_contents[..])
                .unwrap_or(&[]);
            Segmented::from(Bytes::from(
                v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>(),
            ))
        }
    };
    if bytes.len() != total {
        return Err(bad(format!(
            "input 'input' of shape {:?} needs {total} bytes of FP32 data; got {}",
            input.shape,
            bytes.len()
        )));
    }
    // Slices of the received frames: a copy only for an image across two of them.
    (0..n)
        .map(|i| Ok(Image::Tensor(nth(&bytes, i, per)?)))
        .collect()
}

fn frames(
    input: &InferInputTensor,
    raw: Option<Segmented>,
    max_images: usize,
) -> Result<Vec<Image>, ServeError> {
    let shape = dims(input)?;
    if shape.len() != 4 || shape[3] != 3 || shape[1] == 0 || shape[2] == 0 {
        return Err(bad(format!(
            "input 'frame' must have shape [N, H, W, 3] (RGB); got {:?}",
            input.shape
        )));
    }
    let n = batch_of(input, &shape, max_images)?;
    let (h, w) = (shape[1], shape[2]);
    let per = h
        .checked_mul(w)
        .and_then(|p| p.checked_mul(3))
        .ok_or_else(|| bad(format!("frame shape {:?} is too large", input.shape)))?;
    let bytes = match raw {
        Some(b) => b,
        None => Segmented::from(Bytes::from(
            input
                .contents
                .as_ref()
                .map(|c| &c.uint_contents[..])
                .unwrap_or(&[])
                .iter()
                .map(|&v| {
                    u8::try_from(v).map_err(|_| bad(format!("UINT8 value {v} is out of range")))
                })
                .collect::<Result<Vec<u8>, _>>()?,
        )),
    };
    if Some(bytes.len()) != per.checked_mul(n) {
        return Err(bad(format!(
            "input 'frame' of shape {:?} needs {} bytes; got {}",
            input.shape,
            per.saturating_mul(n),
            bytes.len()
        )));
    }
    let (Ok(width), Ok(height)) = (u32::try_from(w), u32::try_from(h)) else {
        return Err(bad(format!("frame shape {:?} is too large", input.shape)));
    };
    (0..n)
        .map(|i| {
            Ok(Image::Raw {
                width,
                height,
                rgb: nth(&bytes, i, per)?,
            })
        })
        .collect()
}

fn encoded(
    input: &InferInputTensor,
    raw: Option<Segmented>,
    max_images: usize,
) -> Result<Vec<Image>, ServeError> {
    let shape = dims(input)?;
    if !(shape.len() == 1 || (shape.len() == 2 && shape[1] == 1)) {
        return Err(bad(format!(
            "input 'image' must have shape [N] or [N, 1] (one encoded image each); got {:?}",
            input.shape
        )));
    }
    let n = batch_of(input, &shape, max_images)?;
    let elements: Vec<Bytes> = match raw {
        Some(b) => split_bytes(&b.contiguous(), n)?,
        None => input
            .contents
            .as_ref()
            .map(|c| c.bytes_contents.clone())
            .unwrap_or_default(),
    };
    if elements.len() != n {
        return Err(bad(format!(
            "input 'image' of shape {:?} needs {n} elements; got {}",
            input.shape,
            elements.len()
        )));
    }
    Ok(elements.into_iter().map(Image::Encoded).collect())
}

#[cfg(test)]
mod tests {
    use super::super::join_bytes;
    use super::*;
    use crate::proto::inference::{
        infer_parameter::ParameterChoice, InferParameter, InferTensorContents,
    };

    /// `images` of a request as tonic decodes it (raw contents in the message).
    fn images_of(
        view: View,
        req: &mut ModelInferRequest,
        shm: &SharedMemory,
    ) -> Result<Vec<Image>, ServeError> {
        let raw = std::mem::take(&mut req.raw_input_contents)
            .into_iter()
            .map(Segmented::from)
            .collect();
        images(view, req, raw, shm, 256)
    }

    fn request(view: View, datatype: &str, shape: Vec<i64>, raw: Vec<u8>) -> ModelInferRequest {
        ModelInferRequest {
            inputs: vec![InferInputTensor {
                name: view.input_name().into(),
                datatype: datatype.into(),
                shape,
                ..Default::default()
            }],
            raw_input_contents: vec![Bytes::from(raw)],
            ..Default::default()
        }
    }

    fn string(v: &str) -> InferParameter {
        InferParameter {
            parameter_choice: Some(ParameterChoice::StringParam(v.into())),
        }
    }

    fn int(v: i64) -> InferParameter {
        InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(v)),
        }
    }

    #[test]
    fn tensors_across_frames_are_sliced_and_only_straddlers_copied() {
        use crate::api::unary::{Frames, FromFrames};
        use prost::Message;
        let per = 3 * 224 * 224 * 4;
        let data: Vec<u8> = (0..3 * per).map(|i| (i % 251) as u8).collect();
        let mut req = request(View::Tensor, "FP32", vec![3, 3, 224, 224], data.clone());
        req.id = "frames".into();
        let body = req.encode_to_vec();
        // The tensors are the body's last bytes; two frames, cut inside image 1.
        let cut = body.len() - data.len() + per + 100;
        let (first, second) = (
            Bytes::copy_from_slice(&body[..cut]),
            Bytes::copy_from_slice(&body[cut..]),
        );
        let mut frames = Frames::default();
        frames.push(first.clone());
        frames.push(second.clone());
        let decoded = crate::api::kserve::InferRequest::decode_frames(frames).expect("decode");
        assert_eq!(decoded.message.id, "frames");
        assert!(decoded.message.raw_input_contents.is_empty());
        let [raw] = decoded.field.as_slice() else {
            panic!("{} raw fields", decoded.field.len());
        };
        assert_eq!(raw.contiguous(), data);
        assert_eq!(raw.slice(0..3 * per + 1), None);
        let got = images(
            View::Tensor,
            &decoded.message,
            decoded.field.clone(),
            &SharedMemory::new(false),
            256,
        )
        .expect("images");
        let within = |frame: &Bytes, b: &Bytes| {
            let start = frame.as_ptr() as usize;
            (start..start + frame.len()).contains(&(b.as_ptr() as usize))
        };
        for (i, img) in got.iter().enumerate() {
            let Image::Tensor(t) = img else {
                panic!("{img:?}");
            };
            assert_eq!(t[..], data[i * per..(i + 1) * per], "image {i}");
            let (in_first, in_second) = (within(&first, t), within(&second, t));
            match i {
                0 => assert!(in_first, "image 0 is a slice of the first frame"),
                1 => assert!(!in_first && !in_second, "image 1 straddles: a copy"),
                _ => assert!(in_second, "image 2 is a slice of the second frame"),
            }
        }
        // A truncated field is refused, not read past.
        let mut short = Frames::default();
        short.push(Bytes::copy_from_slice(&body[..body.len() - 1]));
        assert!(crate::api::kserve::InferRequest::decode_frames(short).is_err());
    }

    #[test]
    fn a_batch_past_the_limit_is_refused_before_any_size_is_computed() {
        let shm = SharedMemory::new(false);
        for (view, datatype, shape) in [
            (View::Tensor, "FP32", vec![(1i64 << 52) + 1, 3, 224, 224]),
            (View::Tensor, "FP32", vec![i64::MAX, 3, 224, 224]),
            (View::Frame, "UINT8", vec![1 << 40, 1 << 20, 1 << 20, 3]),
            (View::Image, "BYTES", vec![257]),
        ] {
            let mut req = request(view, datatype, shape.clone(), vec![]);
            let err = images_of(view, &mut req, &shm).expect_err("refused");
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{shape:?}");
            assert!(err.to_string().contains("the limit is 256"), "{err}");
        }
        // Within the batch limit, a frame too large to size is refused, not wrapped.
        let mut req = request(View::Frame, "UINT8", vec![2, 1 << 62, 1 << 62, 3], vec![]);
        let err = images_of(View::Frame, &mut req, &shm).expect_err("refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        // More BYTES elements than the shape declares stop the split early.
        let joined = Bytes::from(join_bytes(std::iter::repeat_n(&b""[..], 1000)));
        assert!(split_bytes(&joined, 3).is_err());
    }

    #[test]
    fn tensor_inputs_are_split_per_image_and_checked() {
        let per = 3 * 224 * 224 * 4;
        let mut req = request(View::Tensor, "FP32", vec![2, 3, 224, 224], vec![0; 2 * per]);
        assert_eq!(
            images_of(View::Tensor, &mut req, &SharedMemory::new(false))
                .map(|v| v.len())
                .ok(),
            Some(2)
        );
        let mut short = request(View::Tensor, "FP32", vec![2, 3, 224, 224], vec![0; per]);
        let err = images_of(View::Tensor, &mut short, &SharedMemory::new(false))
            .expect_err("short")
            .to_string();
        assert!(err.contains("needs 1204224 bytes"), "{err}");
        let mut wrong = request(View::Tensor, "FP16", vec![1, 3, 224, 224], vec![0; per]);
        assert!(images_of(View::Tensor, &mut wrong, &SharedMemory::new(false)).is_err());
        let mut shape = request(View::Tensor, "FP32", vec![1, 3, 224, 225], vec![0; per]);
        assert!(images_of(View::Tensor, &mut shape, &SharedMemory::new(false)).is_err());
    }

    #[test]
    fn typed_contents_work_for_frames_and_images() {
        let mut frame = request(View::Frame, "UINT8", vec![1, 2, 2, 3], vec![]);
        frame.raw_input_contents.clear();
        frame.inputs[0].contents = Some(InferTensorContents {
            uint_contents: vec![7; 12],
            ..Default::default()
        });
        assert_eq!(
            images_of(View::Frame, &mut frame, &SharedMemory::new(false))
                .map(|v| v.len())
                .ok(),
            Some(1)
        );
        frame.inputs[0].contents = Some(InferTensorContents {
            uint_contents: vec![256; 12],
            ..Default::default()
        });
        assert!(images_of(View::Frame, &mut frame, &SharedMemory::new(false)).is_err());
        let mut img = request(
            View::Image,
            "BYTES",
            vec![2, 1],
            join_bytes([&b"a"[..], b"b"].into_iter()),
        );
        assert_eq!(
            images_of(View::Image, &mut img, &SharedMemory::new(false))
                .map(|v| v.len())
                .ok(),
            Some(2)
        );
    }

    #[test]
    fn tensors_in_shared_memory_are_windows_of_their_region() {
        let per = 3 * 224 * 224 * 4;
        let mut data = vec![0u8; 16 + 2 * per];
        data[16..20].copy_from_slice(&1.5f32.to_le_bytes());
        let object = crate::api::shm::test_objects::Object::with("tensors", &data);
        let shm = SharedMemory::new(true);
        shm.register("r", &object.key(), 0, data.len() as u64)
            .expect("register");
        let shared = |offset: i64, size: i64| {
            let mut req = request(View::Tensor, "FP32", vec![2, 3, 224, 224], vec![]);
            req.raw_input_contents.clear();
            let params = &mut req.inputs[0].parameters;
            params.insert("shared_memory_region".into(), string("r"));
            params.insert("shared_memory_byte_size".into(), int(size));
            params.insert("shared_memory_offset".into(), int(offset));
            req
        };
        let got = images_of(View::Tensor, &mut shared(16, 2 * per as i64), &shm).expect("images");
        let Image::Tensor(t) = &got[0] else {
            panic!("{got:?}");
        };
        assert_eq!(t[..4], 1.5f32.to_le_bytes());
        for (mut req, what) in [
            (shared(17, 2 * per as i64), "run past"),
            (shared(0, per as i64), "needs 1204224 bytes"),
            (shared(-1, per as i64), "must not be negative"),
        ] {
            let err = images_of(View::Tensor, &mut req, &shm).expect_err(what);
            assert!(err.to_string().contains(what), "{err}");
        }
        let mut both = shared(16, 2 * per as i64);
        both.raw_input_contents.push(Bytes::from(vec![0; 2 * per]));
        assert!(images_of(View::Tensor, &mut both, &shm).is_err());
        let mut unsized_ = shared(16, 0);
        unsized_.inputs[0]
            .parameters
            .remove("shared_memory_byte_size");
        assert!(images_of(View::Tensor, &mut unsized_, &shm).is_err());
    }
}
