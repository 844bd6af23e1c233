//! The seam where layer compute happens. The network ([`super::resnet`]) only ever calls
//! what is here, with device-independent descriptions ([`FoldedConv`]) coming in at load
//! time; faster kernels replace the bodies of these functions and nothing else.
//!
//! Three kernel sets exist ([`Kernels`]): Candle's stock ops (NCHW, any device, the
//! reference path), our CPU convolutions on NHWC activations ([`super::cpu`]),
//! and, on CUDA with the `cudnn` feature, fused cuDNN convolutions on NHWC activations
//! ([`super::cudnn`]). The activation layout is private to this module: the network hands
//! in NCHW f32 and gets `[N, C]` features back.

use candle_core::{DType, Device, Module, Result, Tensor, D};

/// Which kernels a model's layers run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Candle's own ops, NCHW, on any device.
    Candle,
    /// Our CPU convolutions on packed weights, NHWC (AVX-512 kernels, or GEMMs).
    Cpu,
    /// cuDNN: one fused conv + bias (+ shortcut) (+ ReLU) call per convolution, NHWC.
    Cudnn,
}

impl Kernels {
    /// The fastest set built into this binary for `device`. `RESNET_SERVE_KERNELS=candle`
    /// forces the stock ops (kept as the reference path for comparisons).
    /// `cpu` runs f32 only; [`super::Classifier::load`] falls back for other dtypes.
    pub fn default_for(device: &Device) -> Kernels {
        let forced = std::env::var("RESNET_SERVE_KERNELS").ok();
        if forced.as_deref() == Some("candle") {
            return Kernels::Candle;
        }
        if cfg!(feature = "cudnn") && device.is_cuda() {
            Kernels::Cudnn
        } else if device.is_cpu() {
            Kernels::Cpu
        } else {
            Kernels::Candle
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernels::Candle => "candle",
            Kernels::Cpu => "cpu",
            Kernels::Cudnn => "cudnn",
        }
    }

    /// Moves an NCHW f32 batch into the layout and dtype the layers work in.
    pub fn enter(self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        let x = x.to_dtype(dtype)?;
        match self {
            Kernels::Candle => Ok(x),
            Kernels::Cpu if dtype == DType::F32 => super::cpu::to_nhwc(&x),
            #[cfg(feature = "cudnn")]
            Kernels::Cudnn => super::cudnn::to_nhwc(&x),
            #[cfg(not(feature = "cudnn"))]
            Kernels::Cudnn => candle_core::bail!("this build has no cuDNN kernels"),
            Kernels::Cpu => x.permute((0, 2, 3, 1))?.contiguous(),
        }
    }

    /// `MaxPool2d(3, stride 2, padding 1)`.
    pub fn max_pool_3x3_s2(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Kernels::Candle => max_pool_3x3_s2(x),
            Kernels::Cpu => super::cpu::max_pool_3x3_s2(x),
            #[cfg(feature = "cudnn")]
            Kernels::Cudnn => super::cudnn::max_pool_3x3_s2(x),
            #[cfg(not(feature = "cudnn"))]
            Kernels::Cudnn => candle_core::bail!("this build has no cuDNN kernels"),
        }
    }

    /// `AdaptiveAvgPool2d(1)` + flatten to `[N, C]`, in the input's dtype. The mean is
    /// taken in f32 either way.
    pub fn global_avg_pool(self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        match self {
            Kernels::Candle => global_avg_pool(x),
            Kernels::Cpu if dtype == DType::F32 => super::cpu::global_avg_pool(x),
            #[cfg(feature = "cudnn")]
            Kernels::Cudnn => super::cudnn::global_avg_pool(x),
            #[cfg(not(feature = "cudnn"))]
            Kernels::Cudnn => candle_core::bail!("this build has no cuDNN kernels"),
            Kernels::Cpu => {
                let (n, h, w, c) = x.dims4()?;
                x.to_dtype(DType::F32)?
                    .reshape((n, h * w, c))?
                    .mean(1)?
                    .to_dtype(dtype)
            }
        }
    }
}

/// A convolution with batch-norm already folded in, as plain host data.
#[derive(Debug, Clone)]
pub struct FoldedConv {
    /// `[out, in / groups, k, k]`, row-major.
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub shape: [usize; 4],
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
}

/// A convolution plus bias on a device, with the activations a ResNet needs fused in.
#[derive(Debug)]
pub enum Conv {
    Candle(CandleConv),
    Cpu(super::cpu::CpuConv),
    #[cfg(feature = "cudnn")]
    Cudnn(super::cudnn::FusedConv),
}

impl Conv {
    pub fn new(c: FoldedConv, device: &Device, dtype: DType, kernels: Kernels) -> Result<Self> {
        match kernels {
            Kernels::Candle => Ok(Conv::Candle(CandleConv::new(c, device, dtype)?)),
            Kernels::Cpu => {
                if !device.is_cpu() || dtype != DType::F32 {
                    candle_core::bail!("the CPU kernels run f32 only");
                }
                Ok(Conv::Cpu(super::cpu::CpuConv::try_new(c)?))
            }
            #[cfg(feature = "cudnn")]
            Kernels::Cudnn => Ok(Conv::Cudnn(super::cudnn::FusedConv::new(c, device, dtype)?)),
            #[cfg(not(feature = "cudnn"))]
            Kernels::Cudnn => candle_core::bail!("this build has no cuDNN kernels"),
        }
    }

    /// `conv(x) + bias`, then ReLU when `relu`.
    pub fn forward(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        match self {
            Conv::Candle(c) => c.forward(x, relu),
            Conv::Cpu(c) => c.forward(x, None, relu),
            #[cfg(feature = "cudnn")]
            Conv::Cudnn(c) => c.forward(x, None, relu),
        }
    }

    /// `relu(conv(x) + bias + residual)`: the end of every residual block.
    pub fn forward_add_relu(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match self {
            Conv::Candle(c) => c.forward_add_relu(x, residual),
            Conv::Cpu(c) => c.forward(x, Some(residual), true),
            #[cfg(feature = "cudnn")]
            Conv::Cudnn(c) => c.forward(x, Some(residual), true),
        }
    }
}

/// Candle's stock convolution, NCHW.
#[derive(Debug)]
pub struct CandleConv {
    weight: Tensor,
    /// `[1, out, 1, 1]`, so it broadcasts over a batch.
    bias: Tensor,
    stride: usize,
    padding: usize,
    groups: usize,
}

impl CandleConv {
    pub fn new(c: FoldedConv, device: &Device, dtype: DType) -> Result<Self> {
        let out = c.shape[0];
        let weight = Tensor::from_vec(c.weight, c.shape.to_vec(), device)?.to_dtype(dtype)?;
        let bias = Tensor::from_vec(c.bias, (1, out, 1, 1), device)?.to_dtype(dtype)?;
        Ok(CandleConv {
            weight,
            bias,
            stride: c.stride,
            padding: c.padding,
            groups: c.groups,
        })
    }

    fn conv(&self, x: &Tensor) -> Result<Tensor> {
        x.conv2d(&self.weight, self.padding, self.stride, 1, self.groups)?
            .broadcast_add(&self.bias)
    }

    /// `conv(x) + bias`, then ReLU when `relu`.
    pub fn forward(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        let y = self.conv(x)?;
        if relu {
            y.relu()
        } else {
            Ok(y)
        }
    }

    /// `relu(conv(x) + bias + residual)`: the end of every residual block.
    pub fn forward_add_relu(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        (self.conv(x)? + residual)?.relu()
    }
}

/// `MaxPool2d(3, stride 2, padding 1)`. Candle's pool has no padding; zero padding is
/// exact here because the input comes straight out of a ReLU (every value >= 0, and
/// each window holds at least one real value).
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    x.pad_with_zeros(2, 1, 1)?
        .pad_with_zeros(3, 1, 1)?
        .max_pool2d_with_stride((3, 3), (2, 2))
}

/// `AdaptiveAvgPool2d(1)` + flatten: `[N, C, H, W]` to `[N, C]`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.mean(D::Minus1)?.mean(D::Minus1)
}

/// The classifier head.
#[derive(Debug)]
pub enum Linear {
    Candle(candle_nn::Linear),
    /// A 1x1 convolution on the CPU kernels over `[N, 1, 1, in]`, with the outputs
    /// padded with zero rows to whole kernel blocks: one pass over the weights, split
    /// across the threads (Candle's GEMM read them on one thread at batch 1: 0.6 ms).
    Cpu {
        conv: Box<super::cpu::CpuConv>,
        outputs: usize,
    },
    /// A fused cuDNN 1x1 convolution over `[N, 1, 1, in]`: no separate bias pass, and
    /// nothing uploaded from the host per call, so a CUDA graph can capture it.
    #[cfg(feature = "cudnn")]
    Cudnn(Box<super::cudnn::FusedConv>),
}

impl Linear {
    /// Output rows of the CPU form are padded to a multiple of this (the dense kernel's
    /// block of output channels).
    const CPU_BLOCK: usize = 32;

    /// `weight` is `[out, in]` row-major, as PyTorch stores it.
    pub fn new(
        weight: Vec<f32>,
        bias: Vec<f32>,
        shape: [usize; 2],
        device: &Device,
        dtype: DType,
        kernels: Kernels,
    ) -> Result<Self> {
        let [outputs, inputs] = shape;
        if kernels == Kernels::Cpu && device.is_cpu() && dtype == DType::F32 {
            if weight.len() != outputs * inputs || bias.len() != outputs {
                candle_core::bail!("linear: weight or bias does not match {shape:?}");
            }
            let padded = outputs.next_multiple_of(Self::CPU_BLOCK);
            let (mut weight, mut bias) = (weight, bias);
            weight.resize(padded * inputs, 0.0);
            bias.resize(padded, 0.0);
            let conv = Box::new(super::cpu::CpuConv::try_new(FoldedConv {
                weight,
                bias,
                shape: [padded, inputs, 1, 1],
                stride: 1,
                padding: 0,
                groups: 1,
            })?);
            return Ok(Linear::Cpu { conv, outputs });
        }
        #[cfg(feature = "cudnn")]
        if kernels == Kernels::Cudnn {
            let conv = super::cudnn::FusedConv::new(
                FoldedConv {
                    weight,
                    bias,
                    shape: [outputs, inputs, 1, 1],
                    stride: 1,
                    padding: 0,
                    groups: 1,
                },
                device,
                dtype,
            )?;
            return Ok(Linear::Cudnn(Box::new(conv)));
        }
        let w = Tensor::from_vec(weight, shape.to_vec(), device)?.to_dtype(dtype)?;
        let b = Tensor::from_vec(bias, shape[0], device)?.to_dtype(dtype)?;
        Ok(Linear::Candle(candle_nn::Linear::new(w, Some(b))))
    }

    /// `[N, in]` to `[N, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Candle(l) => l.forward(x),
            Linear::Cpu { conv, outputs } => {
                let (n, inputs) = x.dims2()?;
                let y = conv.forward(&x.reshape((n, 1, 1, inputs))?, None, false)?;
                let padded = y.dim(3)?;
                y.reshape((n, padded))?.narrow(1, 0, *outputs)?.contiguous()
            }
            #[cfg(feature = "cudnn")]
            Linear::Cudnn(conv) => {
                let (n, inputs) = x.dims2()?;
                let y = conv.forward(&x.reshape((n, 1, 1, inputs))?, None, false)?;
                let outputs = y.dim(3)?;
                y.reshape((n, outputs))
            }
        }
    }
}
