//! The models: torchvision's `ResNet` in the six configurations behind the twelve hub
//! names, built strictly from a state dict with batch-norm folded into each convolution.
//!
//! - [`arch`]: architectures and hub names.
//! - [`input`]: one image's input as it reached the server (values, or a tensor's bytes).
//! - [`resnet`]: the network's layout (one description drives both the strict key check
//!   and the build) and its forward pass.
//! - [`batchnorm`]: folding eval-mode batch-norm into the preceding convolution.
//! - [`layers`]: the seam where layer compute happens; everything above it is
//!   kernel-agnostic. [`cpu`] holds the CPU GEMM kernels; on CUDA builds with `cudnn`,
//!   `cudnn` holds the fused GPU kernels and `cuda_graph` the captured passes that
//!   replay them per batch size.
//! - [`params`]: where parameters come from ([`ParamSource`]): checkpoints, or
//! - [`synthetic`]: the seeded generator the parity fixtures share with PyTorch.

pub mod arch;
pub mod batchnorm;
pub mod cpu;
#[cfg(feature = "cudnn")]
pub mod cuda_graph;
#[cfg(feature = "cudnn")]
pub mod cudnn;
pub mod input;
pub mod layers;
pub mod params;
pub mod resnet;
pub mod synthetic;

pub use arch::{Architecture, ModelName, Training, UnknownModel};
pub use input::{stage_batch, InputView, ModelInput, Rejected, IMAGE_LEN};
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

/// A batch in one contiguous buffer, and the images left out of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Gathered {
    pub pixels: Vec<f32>,
    /// Images holding a NaN or infinite value (gathered as they are).
    pub rejected: Vec<Rejected>,
}

/// `images` (each `3 x 224 x 224`) gathered into one contiguous buffer of `size` inputs,
/// the ones after them zero, each value checked finite as it is copied (the images that
/// are not are named, and gathered as they are). Only the padding is zeroed (a zeroed
/// 4.8 MB buffer written over again showed as 0.6% of a loaded server's time).
pub fn padded_batch(images: &[InputView<'_>], size: usize) -> Result<Gathered, ModelError> {
    check_batch(images, size)?;
    let mut pixels = Vec::with_capacity(size * IMAGE_LEN);
    let mut rejected = Vec::new();
    for (image, input) in images.iter().enumerate() {
        if let Err(element) = input.extend_checked(&mut pixels) {
            rejected.push(Rejected { image, element });
        }
    }
    pixels.resize(size * IMAGE_LEN, 0.0);
    Ok(Gathered { pixels, rejected })
}

/// Refuses a batch that is empty, larger than `size`, or holds an image of the wrong
/// length.
fn check_batch(images: &[InputView<'_>], size: usize) -> Result<(), ModelError> {
    if size == 0 || images.len() > size || images.iter().any(|i| i.len() != IMAGE_LEN) {
        return Err(ModelError::BadInput(vec![
            images.len(),
            3,
            INPUT_SIZE,
            INPUT_SIZE,
        ]));
    }
    Ok(())
}

/// A batch's logit rows, and how long of its compute went to preparing the input
/// (gathering it, or staging it for a device): the split KServe statistics report as
/// `compute_input` and `compute_infer`.
#[derive(Debug, Clone, PartialEq)]
pub struct Logits {
    pub rows: Vec<Vec<f32>>,
    pub input_time: std::time::Duration,
    /// Images holding values that are not finite, computed as they are: each caller
    /// decides whether to answer its row.
    pub rejected: Vec<Rejected>,
}

/// A loaded model on one device, ready to classify batches.
#[derive(Debug)]
pub struct Classifier {
    architecture: Architecture,
    net: resnet::ResNet,
    device: Device,
    dtype: DType,
    kernels: Kernels,
    /// The CPU kernels' convolutions by implementation (`avx2-direct=53`); empty off
    /// the CPU kernels.
    cpu_implementations: String,
    /// Captured forward passes by batch size (cuDNN kernels only; made by `warm_up`).
    #[cfg(feature = "cudnn")]
    graphs: cuda_graph::Graphs,
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
        let (net, counts) = cpu::count_implementations(|| {
            resnet::ResNet::load(architecture, source, device, dtype, kernels)
        });
        let net = net?;
        let cpu_implementations = cpu::describe_counts(&counts);
        if !counts.is_empty() {
            tracing::info!(
                %architecture,
                cpu_kernels = cpu::CpuKernels::current().map(|k| k.name()).unwrap_or("?"),
                convolutions = %cpu_implementations,
                "CPU convolution kernels chosen"
            );
        }
        Ok(Classifier {
            architecture,
            net,
            device: device.clone(),
            dtype,
            kernels,
            cpu_implementations,
            #[cfg(feature = "cudnn")]
            graphs: cuda_graph::Graphs::default(),
        })
    }

    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// The kernels that run the model: the CPU convolutions by implementation
    /// (`avx512-direct=54`, `avx2-direct=50 gemm=4`), else the kernel set's name.
    pub fn implementation(&self) -> String {
        if self.cpu_implementations.is_empty() {
            self.kernels.name().to_string()
        } else {
            self.cpu_implementations.clone()
        }
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
    /// for no kernel loading or cuDNN algorithm selection. With cuDNN kernels it then
    /// captures each size's pass as a CUDA graph, `copies` times (one per worker that may
    /// run it at once), checked against the eager pass; a size whose capture fails is
    /// logged and keeps running eagerly.
    pub fn warm_up(&self, batch_sizes: &[usize], copies: usize) -> Result<(), ModelError> {
        for &n in batch_sizes {
            self.classify(&vec![0f32; n * 3 * INPUT_SIZE * INPUT_SIZE], n)?;
        }
        #[cfg(feature = "cudnn")]
        if self.kernels == Kernels::Cudnn && cuda_graph::Graphs::enabled() {
            for &n in batch_sizes {
                if let Err(e) = self
                    .graphs
                    .capture(&self.net, &self.device, self.dtype, n, copies)
                {
                    tracing::warn!(batch = n, error = %e, "no CUDA graph; this size runs eagerly");
                }
            }
        }
        #[cfg(not(feature = "cudnn"))]
        let _ = copies;
        Ok(())
    }

    /// Batch sizes that replay a captured CUDA graph.
    pub fn graph_sizes(&self) -> Vec<usize> {
        #[cfg(feature = "cudnn")]
        return self.graphs.batch_sizes();
        #[cfg(not(feature = "cudnn"))]
        Vec::new()
    }

    /// Replays the captured pass of `n` on the input it already holds, without copies or
    /// waiting for the GPU; false when there is none. For benchmarks against engines
    /// timed with resident inputs.
    pub fn launch_resident(&self, n: usize) -> Result<bool, ModelError> {
        #[cfg(feature = "cudnn")]
        if let Some(done) = self.graphs.launch_resident(n) {
            done?;
            return Ok(true);
        }
        let _ = n;
        Ok(false)
    }

    /// Logits for `images` (each one `3 x 224 x 224` input) padded with zero images to
    /// `size` rows. A captured pass of that size converts each image once, straight into
    /// its pinned staging buffer; otherwise the images are gathered into one buffer for
    /// the eager pass.
    pub fn classify_batch(
        &self,
        images: &[InputView<'_>],
        size: usize,
    ) -> Result<Logits, ModelError> {
        check_batch(images, size)?;
        #[cfg(feature = "cudnn")]
        if let Some(out) = self.graphs.run(images, size) {
            return Ok(out?);
        }
        let started = std::time::Instant::now();
        let Gathered { pixels, rejected } = padded_batch(images, size)?;
        let input_time = started.elapsed();
        // Checked above and no captured pass was free: straight to the eager pass.
        Ok(Logits {
            rows: self.classify_eager(&pixels, size)?,
            input_time,
            rejected,
        })
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
        #[cfg(feature = "cudnn")]
        {
            let images: Vec<InputView<'_>> =
                pixels.chunks(IMAGE_LEN).map(InputView::from).collect();
            // Images holding NaN or infinity are staged and computed as they are, as on
            // the eager pass, so the captured rows stand whatever they held; only the
            // serving path refuses such images.
            if let Some(out) = self.graphs.run(&images, n) {
                return Ok(out?.rows);
            }
        }
        self.classify_eager(pixels, n)
    }

    /// [`Classifier::classify`] without a captured pass: one contiguous host-to-device
    /// copy of the whole (already checked) batch, then the layers one by one.
    fn classify_eager(&self, pixels: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ModelError> {
        let input = Tensor::from_slice(pixels, (n, 3, INPUT_SIZE, INPUT_SIZE), &self.device)?;
        Ok(self.forward(&input)?.to_vec2::<f32>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use synthetic::SyntheticWeights;

    #[test]
    fn classify_batch_pads_with_zero_images_and_checks_its_input() {
        let arch = Architecture::Resnet18;
        let model = Classifier::load(
            arch,
            &SyntheticWeights::new(arch, 7),
            &Device::Cpu,
            DType::F32,
        )
        .expect("model");
        let len = 3 * INPUT_SIZE * INPUT_SIZE;
        let pixels = synthetic::input(3, 2, INPUT_SIZE);
        let images: Vec<InputView<'_>> = pixels.chunks(len).map(InputView::from).collect();
        let rows = model.classify_batch(&images, 3).expect("logits").rows;
        let mut padded = pixels.clone();
        padded.resize(3 * len, 0.0);
        assert_eq!(rows, model.classify(&padded, 3).expect("logits"));
        assert_eq!(rows.len(), 3);
        // The same images as a tensor's little-endian bytes, off 4-byte alignment.
        let mut bytes = vec![0u8];
        bytes.extend(pixels.iter().flat_map(|v| v.to_le_bytes()));
        let as_bytes: Vec<InputView<'_>> =
            bytes[1..].chunks(4 * len).map(InputView::LeBytes).collect();
        assert_eq!(
            model.classify_batch(&as_bytes, 3).expect("logits").rows,
            rows
        );

        for bad in [
            model.classify_batch(&images, 1),
            model.classify_batch(&[InputView::from(&pixels[..len - 1])], 1),
        ] {
            assert!(matches!(bad, Err(ModelError::BadInput(_))), "{bad:?}");
        }
    }
}
