//! Where a model's parameters come from: anything that can name its tensors, tell their
//! shapes and hand one over as f32 on request.

use crate::weights::Checkpoint;

/// A source of named f32 tensors, read one at a time so loading never holds two copies
/// of a model.
pub trait ParamSource {
    fn names(&self) -> Vec<String>;
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    fn read_f32(&self, name: &str) -> Result<Vec<f32>, Box<dyn std::error::Error + Send + Sync>>;
}

impl ParamSource for Checkpoint {
    fn names(&self) -> Vec<String> {
        Checkpoint::names(self).map(str::to_string).collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.info(name).map(|i| i.shape)
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Checkpoint::read_f32(self, name)?)
    }
}
