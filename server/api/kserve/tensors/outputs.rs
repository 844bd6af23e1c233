//! The outputs a request asks for (checked before any compute, shared-memory windows
//! included) and a batch's logits encoded as each: FP32 rows, or the classification
//! extension's top-K strings, in the response or written into a region.

use std::sync::Arc;

use prost::bytes::Bytes;

use crate::api::error::ServeError;
use crate::api::shm::{Region, SharedMemory};
use crate::labels;
use crate::model::NUM_CLASSES;
use crate::proto::inference::{
    infer_parameter::ParameterChoice, model_infer_request::InferRequestedOutputTensor,
    model_infer_response::InferOutputTensor, InferParameter,
};

use super::super::views::Output;
use super::{bad, integer, join_bytes, shared_window};

/// What to send back for one output.
#[derive(Debug, Clone)]
pub struct OutputRequest {
    pub output: Output,
    /// The classification extension: the top K as BYTES `"score:index:label"`.
    pub classes: Option<usize>,
    /// Written into this shared-memory window instead of the response.
    pub shared: Option<SharedOutput>,
}

/// Where in a registered region an output goes: at most `byte_size` bytes at `offset`.
#[derive(Debug, Clone)]
pub struct SharedOutput {
    region: Arc<Region>,
    offset: u64,
    byte_size: u64,
}

impl OutputRequest {
    /// Fails, before any compute, if this output goes to shared memory and its window
    /// cannot hold it for `images` images (FP32 outputs; a classification's strings
    /// vary in length and are checked when written).
    pub fn check_fits(&self, images: usize) -> Result<(), ServeError> {
        let (Some(shared), None) = (&self.shared, self.classes) else {
            return Ok(());
        };
        let needed = (images * NUM_CLASSES * 4) as u64;
        if needed > shared.byte_size {
            return Err(bad(format!(
                "output '{}' of {images} images needs {needed} bytes; its shared memory window holds {}",
                self.output.name(),
                shared.byte_size
            )));
        }
        Ok(())
    }
}

impl SharedOutput {
    /// Writes an output's raw contents into the window, and says where in the tensor's
    /// parameters (as Triton does); fails if they do not fit in it.
    pub fn place(&self, tensor: &mut InferOutputTensor, raw: &[u8]) -> Result<(), ServeError> {
        if raw.len() as u64 > self.byte_size {
            return Err(bad(format!(
                "output '{}' needs {} bytes; its shared memory window holds {}",
                tensor.name,
                raw.len(),
                self.byte_size
            )));
        }
        self.region.write(self.offset, raw)?;
        let param = |choice| InferParameter {
            parameter_choice: Some(choice),
        };
        tensor.parameters.insert(
            "shared_memory_region".into(),
            param(ParameterChoice::StringParam(self.region.name.clone())),
        );
        tensor.parameters.insert(
            "shared_memory_byte_size".into(),
            param(ParameterChoice::Int64Param(raw.len() as i64)),
        );
        if self.offset != 0 {
            tensor.parameters.insert(
                "shared_memory_offset".into(),
                param(ParameterChoice::Int64Param(self.offset as i64)),
            );
        }
        Ok(())
    }
}

/// The outputs a request asked for; the listed one (`logits`, as a tensor) when it named
/// none, as Triton answers every output its configuration lists.
/// Shared-memory outputs are checked here, before any compute: the region exists and
/// the window lies inside it.
pub fn requested(
    outputs: &[InferRequestedOutputTensor],
    shared_memory: &SharedMemory,
) -> Result<Vec<OutputRequest>, ServeError> {
    if outputs.is_empty() {
        return Ok(Output::LISTED
            .into_iter()
            .map(|output| OutputRequest {
                output,
                classes: None,
                shared: None,
            })
            .collect());
    }
    outputs
        .iter()
        .map(|o| {
            let output = Output::parse(&o.name).ok_or_else(|| {
                bad(format!(
                    "unknown output '{}'; the output is 'logits' (and 'probabilities', the softmax of the logits, when named)",
                    o.name
                ))
            })?;
            let classes = match integer(&o.parameters, "classification")? {
                None | Some(0) => None,
                Some(k) if (1..=NUM_CLASSES as i128).contains(&k) => Some(k as usize),
                Some(k) => {
                    return Err(bad(format!(
                        "classification count {k} must be between 1 and {NUM_CLASSES}"
                    )))
                }
            };
            let shared = match shared_window(&o.name, &o.parameters)? {
                None => None,
                Some(w) => {
                    let region = shared_memory.region(&w.region)?;
                    // The whole window must lie in the region, whatever is written to it.
                    region.range(w.offset, w.byte_size)?;
                    Some(SharedOutput {
                        region,
                        offset: w.offset,
                        byte_size: w.byte_size,
                    })
                }
            };
            Ok(OutputRequest {
                output,
                classes,
                shared,
            })
        })
        .collect()
}

/// One output tensor and its raw contents for a batch of logit rows.
pub fn encode(req: &OutputRequest, logits: &[Vec<f32>]) -> (InferOutputTensor, Bytes) {
    let values: Vec<Vec<f32>> = match req.output {
        Output::Logits => logits.to_vec(),
        Output::Probabilities => logits.iter().map(|l| labels::softmax(l)).collect(),
    };
    let n = values.len() as i64;
    match req.classes {
        None => (
            InferOutputTensor {
                name: req.output.name().into(),
                datatype: "FP32".into(),
                shape: vec![n, NUM_CLASSES as i64],
                ..Default::default()
            },
            Bytes::from(
                values
                    .iter()
                    .flatten()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
        ),
        Some(k) => {
            // Triton's format: the output's own value (not a probability unless the
            // output is one), its class index and its label; best first.
            let strings: Vec<String> = values
                .iter()
                .flat_map(|row| {
                    labels::top_k(row, k)
                        .into_iter()
                        .map(|s| format!("{:.6}:{}:{}", s.score, s.index, s.label))
                })
                .collect();
            (
                InferOutputTensor {
                    name: req.output.name().into(),
                    datatype: "BYTES".into(),
                    shape: vec![n, k as i64],
                    ..Default::default()
                },
                Bytes::from(join_bytes(strings.iter().map(|s| s.as_bytes()))),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::split_bytes;
    use super::*;

    #[test]
    fn classification_strings_follow_triton() {
        let mut logits = vec![0f32; NUM_CLASSES];
        logits[3] = 2.5;
        logits[9] = 1.25;
        let (t, raw) = encode(
            &OutputRequest {
                output: Output::Logits,
                classes: Some(2),
                shared: None,
            },
            &[logits],
        );
        assert_eq!(
            (t.datatype.as_str(), t.shape.clone()),
            ("BYTES", vec![1, 2])
        );
        let items = split_bytes(&raw, 256).expect("bytes");
        assert_eq!(
            String::from_utf8_lossy(&items[0]),
            format!("2.500000:3:{}", labels::label(3))
        );
        assert!(String::from_utf8_lossy(&items[1]).starts_with("1.250000:9:"));
    }
}
