//! Any checkpoint to safetensors: every tensor, contiguous, in its stored dtype, under
//! its normalised name (no `module.` prefix, no `state_dict` nesting).

use std::collections::HashMap;
use std::path::Path;

use super::{Checkpoint, DType, WeightsError};

fn safetensors_dtype(d: DType) -> safetensors::Dtype {
    use safetensors::Dtype as S;
    match d {
        DType::F64 => S::F64,
        DType::F32 => S::F32,
        DType::F16 => S::F16,
        DType::BF16 => S::BF16,
        DType::I64 => S::I64,
        DType::I32 => S::I32,
        DType::I16 => S::I16,
        DType::I8 => S::I8,
        DType::U8 => S::U8,
        DType::Bool => S::BOOL,
    }
}

/// Writes `checkpoint` to `out` as safetensors; returns the number of tensors written.
pub fn to_safetensors(checkpoint: &Checkpoint, out: &Path) -> Result<usize, WeightsError> {
    let mut data = Vec::with_capacity(checkpoint.len());
    for name in checkpoint.names() {
        let (dtype, bytes) = checkpoint.read_raw(name)?;
        let shape = checkpoint
            .info(name)
            .map(|i| i.shape)
            .ok_or_else(|| WeightsError::MissingTensor(name.to_string()))?;
        data.push((name.to_string(), dtype, shape, bytes));
    }
    let views = data
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors_dtype(*dtype), shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| {
                    WeightsError::malformed(checkpoint.path(), format!("tensor '{name}': {e}"))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata: HashMap<String, String> =
        HashMap::from([("source_format".to_string(), checkpoint.format().to_string())]);
    let tmp = out.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, Some(metadata), &tmp)
        .map_err(|e| WeightsError::malformed(out, format!("writing safetensors: {e}")))?;
    std::fs::rename(&tmp, out).map_err(|e| WeightsError::io(out, e))?;
    Ok(data.len())
}
