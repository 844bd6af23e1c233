//! The seam where layer compute happens. The network ([`super::resnet`]) only ever calls
//! what is here, with device-independent descriptions ([`FoldedConv`]) coming in at load
//! time; faster kernels replace the bodies of these functions and nothing else.
//!
//! Today every op is Candle's stock implementation.

use candle_core::{DType, Device, Module, Result, Tensor, D};

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
pub struct Conv {
    weight: Tensor,
    /// `[1, out, 1, 1]`, so it broadcasts over a batch.
    bias: Tensor,
    stride: usize,
    padding: usize,
    groups: usize,
}

impl Conv {
    pub fn new(c: FoldedConv, device: &Device, dtype: DType) -> Result<Self> {
        let out = c.shape[0];
        let weight = Tensor::from_vec(c.weight, c.shape.to_vec(), device)?.to_dtype(dtype)?;
        let bias = Tensor::from_vec(c.bias, (1, out, 1, 1), device)?.to_dtype(dtype)?;
        Ok(Conv {
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
pub struct Linear(candle_nn::Linear);

impl Linear {
    /// `weight` is `[out, in]` row-major, as PyTorch stores it.
    pub fn new(
        weight: Vec<f32>,
        bias: Vec<f32>,
        shape: [usize; 2],
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let w = Tensor::from_vec(weight, shape.to_vec(), device)?.to_dtype(dtype)?;
        let b = Tensor::from_vec(bias, shape[0], device)?.to_dtype(dtype)?;
        Ok(Linear(candle_nn::Linear::new(w, Some(b))))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.0.forward(x)
    }
}
