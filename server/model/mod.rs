//! The models: torchvision's `ResNet` in the six configurations behind the twelve hub
//! names, built strictly from a state dict with batch-norm folded into each convolution.
//!
//! - [`arch`]: architectures and hub names.
//! - [`resnet`]: the network's layout (one description drives both the strict key check
//!   and the build) and its forward pass.
//! - [`batchnorm`]: folding eval-mode batch-norm into the preceding convolution.
//! - [`layers`]: the seam where layer compute happens; everything above it is
//!   kernel-agnostic. [`cpu`] holds the CPU GEMM kernels; on CUDA builds with `cudnn`,
//!   `cudnn` holds the fused GPU kernels.
//! - [`params`]: where parameters come from ([`ParamSource`]): checkpoints, or
//! - [`synthetic`]: the seeded generator the parity fixtures share with PyTorch.

pub mod arch;
pub mod batchnorm;
pub mod cpu;
#[cfg(feature = "cudnn")]
pub mod cudnn;
pub mod layers;
pub mod params;
pub mod resnet;
pub mod synthetic;

pub use arch::{Architecture, ModelName, Training, UnknownModel};
pub use layers::Kernels;
pub use params::ParamSource;

use candle_core::{DType, Device, Tensor};

/// Number of ImageNet-1k classes every model predicts.
pub const NUM_CLASSES: usize = 1000;
/// Side of the square input the models are trained on.
pub const INPUT_SIZE: usize = 224;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("state dict does not match {arch}: {problems}")]
    Mismatch {
        arch: Architecture,
        problems: String,
    },
    #[error("reading parameter '{name}': {source}")]
    Read {
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("input must be [N, 3, H, W] float32 with N >= 1 and H, W >= 32; got {0:?}")]
    BadInput(Vec<usize>),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A loaded model on one device, ready to classify batches.
#[derive(Debug)]
pub struct Classifier {
    architecture: Architecture,
    net: resnet::ResNet,
    device: Device,
    dtype: DType,
    kernels: Kernels,
}

impl Classifier {
    /// Builds `architecture` from `source`, strictly: every expected key present with its
    /// exact shape and no unexpected ones (`num_batches_tracked` aside).
    pub fn load(
        architecture: Architecture,
        source: &dyn ParamSource,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        Self::load_with(
            architecture,
            source,
            device,
            dtype,
            Kernels::default_for(device),
        )
    }

    /// [`Classifier::load`] with an explicit kernel set (benchmarks compare them).
    pub fn load_with(
        architecture: Architecture,
        source: &dyn ParamSource,
        device: &Device,
        dtype: DType,
        kernels: Kernels,
    ) -> Result<Self, ModelError> {
        let net = resnet::ResNet::load(architecture, source, device, dtype, kernels)?;
        Ok(Classifier {
            architecture,
            net,
            device: device.clone(),
            dtype,
            kernels,
        })
    }

    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    pub fn architecture(&self) -> Architecture {
        self.architecture
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Logits `[N, 1000]` (f32, on the model's device) for an `[N, 3, H, W]` f32 batch.
    pub fn forward(&self, input: &Tensor) -> Result<Tensor, ModelError> {
        let dims = input.dims().to_vec();
        if dims.len() != 4 || dims[0] == 0 || dims[1] != 3 || dims[2] < 32 || dims[3] < 32 {
            return Err(ModelError::BadInput(dims));
        }
        let x = input.to_device(&self.device)?.to_dtype(DType::F32)?;
        Ok(self.net.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// Runs each batch size once on zeros, so the first real request of each size pays
    /// for no kernel loading or cuDNN algorithm selection.
    pub fn warm_up(&self, batch_sizes: &[usize]) -> Result<(), ModelError> {
        for &n in batch_sizes {
            self.classify(&vec![0f32; n * 3 * INPUT_SIZE * INPUT_SIZE], n)?;
        }
        Ok(())
    }

    /// Logits for `n` images given as one flat, contiguous `n x 3 x 224 x 224` buffer.
    pub fn classify(&self, pixels: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ModelError> {
        let expected = n * 3 * INPUT_SIZE * INPUT_SIZE;
        if n == 0 || pixels.len() != expected {
            return Err(ModelError::BadInput(vec![
                pixels.len() / (3 * INPUT_SIZE * INPUT_SIZE),
                3,
                INPUT_SIZE,
                INPUT_SIZE,
            ]));
        }
        // One contiguous host-to-device copy of the whole batch.
        let input = Tensor::from_slice(pixels, (n, 3, INPUT_SIZE, INPUT_SIZE), &self.device)?;
        Ok(self.forward(&input)?.to_vec2::<f32>()?)
    }
}
