//! What one checkpoint may make its reader hold, from the architecture it is for: each
//! format reader checks the sizes a file claims against these before it allocates.

use std::fs::File;
use std::path::Path;

use super::WeightsError;
use crate::model::resnet::Layout;
use crate::model::Architecture;

/// What one checkpoint may make its reader hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of tensor data: the storages together, and the tensors viewing them
    /// together (a view can be larger than its storage).
    pub max_tensor_bytes: u64,
    /// Bytes of the index: the pickle, or the safetensors header.
    pub max_index_bytes: u64,
    /// The model the limits are for, for messages.
    pub model: &'static str,
}

impl Limits {
    /// A state dict's index is ~100 bytes a tensor (~100 KB for the largest model).
    const INDEX_BYTES: u64 = 16 << 20;
    /// Per tensor: buffers that are not parameters (`num_batches_tracked`) and padding.
    const SLACK_PER_TENSOR: u64 = 4096;

    /// What `arch`'s state dict holds: every tensor of the model definition in the widest
    /// dtype a checkpoint may store (8 bytes), plus a little per tensor.
    pub fn for_architecture(arch: Architecture) -> Limits {
        let shapes = Layout::new(arch).expected_shapes();
        let elements: u64 = shapes
            .values()
            .map(|s| s.iter().map(|&d| d as u64).product::<u64>())
            .sum();
        let tensors = shapes.len() as u64;
        Limits {
            max_tensor_bytes: elements * 8 + (2 * tensors + 64) * Self::SLACK_PER_TENSOR,
            max_index_bytes: Self::INDEX_BYTES,
            model: arch.as_str(),
        }
    }

    /// The largest any architecture this server serves needs: for files read without
    /// a model in mind (`inspect`, `convert`).
    pub fn any_architecture() -> Limits {
        let largest = Architecture::ALL
            .into_iter()
            .map(Limits::for_architecture)
            .max_by_key(|l| l.max_tensor_bytes)
            .unwrap_or(Limits {
                max_tensor_bytes: 0,
                max_index_bytes: Self::INDEX_BYTES,
                model: "",
            });
        Limits {
            model: "the largest model this server serves",
            ..largest
        }
    }

    /// The largest file: twice the tensor bytes (room for a training checkpoint's
    /// optimizer state beside the weights) and the index. Files are read in part, but
    /// the hash check of a torch.hub name reads all of one.
    pub fn max_file_bytes(&self) -> u64 {
        self.max_tensor_bytes
            .saturating_mul(2)
            .saturating_add(self.max_index_bytes)
    }

    pub(super) fn check_file(&self, path: &Path, file: &File) -> Result<(), WeightsError> {
        let len = file
            .metadata()
            .map_err(|e| WeightsError::io(path, e))?
            .len();
        if len > self.max_file_bytes() {
            return Err(self.exceeded(
                path,
                format!("file of {len} bytes"),
                format!(
                    "the {} bytes a {} checkpoint may take",
                    self.max_file_bytes(),
                    self.model
                ),
            ));
        }
        Ok(())
    }

    /// "the N bytes resnet18 can hold", for messages.
    pub(super) fn holds(&self) -> String {
        format!(
            "the {} bytes {} can hold",
            self.max_tensor_bytes, self.model
        )
    }

    pub(super) fn exceeded(&self, path: &Path, what: String, limit: String) -> WeightsError {
        WeightsError::TooLarge {
            path: path.to_path_buf(),
            what,
            limit,
        }
    }

    /// `total` bytes of `what` so far plus `len` more, refused past the limit:
    /// "storage data" (the storages together) or "tensors" (as read, views included).
    pub(super) fn add(
        &self,
        path: &Path,
        total: u64,
        len: u64,
        what: &str,
    ) -> Result<u64, WeightsError> {
        match total.checked_add(len) {
            Some(t) if t <= self.max_tensor_bytes => Ok(t),
            _ => Err(self.exceeded(
                path,
                format!("{what} of more than {} bytes", total.max(len)),
                self.holds(),
            )),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::any_architecture()
    }
}
