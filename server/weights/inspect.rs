//! `weights inspect`: what a checkpoint file holds, without building a model.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Checkpoint;
use crate::model::Architecture;

/// A checkpoint's vital statistics.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub file: String,
    pub format: String,
    pub tensors: usize,
    /// Elements of learnable tensors (running statistics and counters excluded), as
    /// `sum(p.numel() for p in model.parameters())` counts them.
    pub parameters: usize,
    /// Tensor count per element type.
    pub dtypes: BTreeMap<String, usize>,
    /// The architecture the shapes match, if any of the six.
    pub architecture: Option<String>,
}

pub fn summarize(checkpoint: &Checkpoint) -> Summary {
    let mut parameters = 0;
    let mut dtypes = BTreeMap::new();
    for name in checkpoint.names() {
        let Some(info) = checkpoint.info(name) else {
            continue;
        };
        *dtypes.entry(info.dtype.to_string()).or_insert(0) += 1;
        let buffer = name.ends_with("running_mean")
            || name.ends_with("running_var")
            || name.ends_with("num_batches_tracked");
        if !buffer {
            parameters += info.numel();
        }
    }
    let architecture =
        Architecture::detect(|k| checkpoint.info(k).map(|i| i.shape)).map(|a| a.to_string());
    Summary {
        file: checkpoint.path().display().to_string(),
        format: checkpoint.format().to_string(),
        tensors: checkpoint.len(),
        parameters,
        dtypes,
        architecture,
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "file:         {}", self.file)?;
        writeln!(f, "format:       {}", self.format)?;
        writeln!(f, "tensors:      {}", self.tensors)?;
        writeln!(f, "parameters:   {}", self.parameters)?;
        let dtypes: Vec<String> = self
            .dtypes
            .iter()
            .map(|(d, n)| format!("{d} x{n}"))
            .collect();
        writeln!(f, "dtypes:       {}", dtypes.join(", "))?;
        write!(
            f,
            "architecture: {}",
            self.architecture
                .as_deref()
                .unwrap_or("not one of the six ResNet/ResNeXt layouts")
        )
    }
}
