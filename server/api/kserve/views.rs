//! How our models appear to KServe clients. Each served model is three KServe models
//! that share its queue, one per input kind, so every one of them has exactly one
//! required input (as perf_analyzer and tritonclient expect):
//!
//! | KServe model | input | datatype | shape |
//! |---|---|---|---|
//! | `NAME` | `input` | FP32 | `[-1, 3, 224, 224]`, normalised NCHW |
//! | `NAME_frame` | `frame` | UINT8 | `[-1, -1, -1, 3]`, RGB frames (any size, resized as images are) |
//! | `NAME_image` | `image` | BYTES | `[-1, 1]` (or `[-1]`), each element an encoded JPEG/PNG/WebP/GIF/BMP |
//!
//! Each lists one output, `logits`, FP32 `[-1, 1000]`, as the checkpoint computes them:
//! Triton's image clients take a model with exactly one output for a classifier. The
//! softmax of the logits, `probabilities` (FP32 `[-1, 1000]`), is answered too when a
//! request names it, though neither metadata nor configuration lists it.

use crate::model::{INPUT_SIZE, NUM_CLASSES};

/// Which input a KServe model name takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Tensor,
    Frame,
    Image,
}

/// An output tensor every view offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Logits,
    Probabilities,
}

impl Output {
    /// Every output a request may name.
    pub const ALL: [Output; 2] = [Output::Logits, Output::Probabilities];
    /// The outputs metadata and configuration list, and a request that names none gets.
    pub const LISTED: [Output; 1] = [Output::Logits];

    pub fn name(self) -> &'static str {
        match self {
            Output::Logits => "logits",
            Output::Probabilities => "probabilities",
        }
    }

    pub fn parse(name: &str) -> Option<Output> {
        Output::ALL.into_iter().find(|o| o.name() == name)
    }

    /// Dims without the batch dimension.
    pub fn dims(self) -> Vec<i64> {
        vec![NUM_CLASSES as i64]
    }
}

impl View {
    pub const ALL: [View; 3] = [View::Tensor, View::Frame, View::Image];

    const FRAME_SUFFIX: &'static str = "_frame";
    const IMAGE_SUFFIX: &'static str = "_image";

    /// Splits a KServe model name into our model's name and the view.
    pub fn split(name: &str) -> (&str, View) {
        if let Some(base) = name.strip_suffix(Self::FRAME_SUFFIX) {
            (base, View::Frame)
        } else if let Some(base) = name.strip_suffix(Self::IMAGE_SUFFIX) {
            (base, View::Image)
        } else {
            (name, View::Tensor)
        }
    }

    /// The KServe model name of this view of `base`.
    pub fn name(self, base: &str) -> String {
        match self {
            View::Tensor => base.to_string(),
            View::Frame => format!("{base}{}", Self::FRAME_SUFFIX),
            View::Image => format!("{base}{}", Self::IMAGE_SUFFIX),
        }
    }

    pub fn input_name(self) -> &'static str {
        match self {
            View::Tensor => "input",
            View::Frame => "frame",
            View::Image => "image",
        }
    }

    /// KServe datatype name.
    pub fn datatype(self) -> &'static str {
        match self {
            View::Tensor => "FP32",
            View::Frame => "UINT8",
            View::Image => "BYTES",
        }
    }

    /// Dims without the batch dimension (-1: any size).
    pub fn dims(self) -> Vec<i64> {
        let side = INPUT_SIZE as i64;
        match self {
            View::Tensor => vec![3, side, side],
            View::Frame => vec![-1, -1, 3],
            // Triton's convention for one string per batch item; `[N]` is accepted too.
            View::Image => vec![1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for view in View::ALL {
            let name = view.name("resnet50_swsl");
            assert_eq!(View::split(&name), ("resnet50_swsl", view));
        }
        assert_eq!(View::split("resnet18_ssl"), ("resnet18_ssl", View::Tensor));
        assert_eq!(Output::parse("probabilities"), Some(Output::Probabilities));
        assert_eq!(Output::parse("OUTPUT__0"), None);
    }
}
