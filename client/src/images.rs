//! What a request carries per image ([`encoded`] files, [`raw`] frames, ready
//! [`tensor`]s) and what it asks back ([`Output`]).

use crate::proto::{self, image, OutputKind, OutputSpec};

/// What to get back per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Logits,
    Probabilities,
    TopK(u32),
}

impl Output {
    pub fn spec(self) -> OutputSpec {
        match self {
            Output::Logits => OutputSpec {
                kind: OutputKind::Logits as i32,
                top_k: 0,
            },
            Output::Probabilities => OutputSpec {
                kind: OutputKind::Probabilities as i32,
                top_k: 0,
            },
            Output::TopK(k) => OutputSpec {
                kind: OutputKind::TopK as i32,
                top_k: k,
            },
        }
    }
}

/// An encoded image (JPEG, PNG, WebP, BMP, GIF).
pub fn encoded(data: Vec<u8>) -> proto::Image {
    proto::Image {
        kind: Some(image::Kind::Encoded(proto::EncodedImage {
            data: data.into(),
        })),
    }
}

/// A raw RGB8 frame, `height x width x 3`.
pub fn raw(width: u32, height: u32, rgb: Vec<u8>) -> proto::Image {
    proto::Image {
        kind: Some(image::Kind::Raw(proto::RawFrame {
            width,
            height,
            rgb: rgb.into(),
        })),
    }
}

/// A ready, normalised `3 x 224 x 224` tensor.
pub fn tensor(values: &[f32]) -> proto::Image {
    proto::Image {
        kind: Some(image::Kind::Tensor(proto::FloatTensor {
            data: values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        })),
    }
}
