//! Eval-mode batch-norm folded into the convolution before it:
//! `bn(conv(x)) = conv'(x) + b'` with `w' = w * s`, `b' = beta - mean * s`,
//! `s = gamma / sqrt(var + eps)` per output channel. Done once at load, in f32, so each
//! block runs three convolutions instead of three convolutions and three normalisations.

/// torchvision's `BatchNorm2d` default.
pub const EPS: f32 = 1e-5;

/// The four batch-norm tensors of one layer.
pub struct BatchNorm<'a> {
    pub gamma: &'a [f32],
    pub beta: &'a [f32],
    pub mean: &'a [f32],
    pub var: &'a [f32],
}

/// Scales `weight` (`[out, ...]`, row-major) in place and returns the folded bias.
pub fn fold(weight: &mut [f32], bn: &BatchNorm<'_>) -> Vec<f32> {
    let out = bn.gamma.len();
    let per_channel = weight.len() / out.max(1);
    let mut bias = Vec::with_capacity(out);
    for (c, w) in weight.chunks_mut(per_channel).enumerate() {
        let scale = bn.gamma[c] / (bn.var[c] + EPS).sqrt();
        w.iter_mut().for_each(|v| *v *= scale);
        bias.push(bn.beta[c] - bn.mean[c] * scale);
    }
    bias
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folded_conv_equals_conv_then_batchnorm() {
        // A 1x1 convolution of 2 input channels to 2 output channels on one pixel.
        let w = [0.5f32, -1.0, 2.0, 0.25];
        let x = [1.5f32, -0.5];
        let bn = BatchNorm {
            gamma: &[0.8, 1.2],
            beta: &[0.1, -0.3],
            mean: &[0.2, -0.4],
            var: &[0.9, 2.5],
        };
        let conv = |w: &[f32], c: usize| w[2 * c] * x[0] + w[2 * c + 1] * x[1];
        let expected: Vec<f32> = (0..2)
            .map(|c| {
                (conv(&w, c) - bn.mean[c]) / (bn.var[c] + EPS).sqrt() * bn.gamma[c] + bn.beta[c]
            })
            .collect();
        let mut folded = w;
        let bias = fold(&mut folded, &bn);
        for c in 0..2 {
            let got = conv(&folded, c) + bias[c];
            assert!(
                (got - expected[c]).abs() < 1e-6,
                "channel {c}: {got} vs {}",
                expected[c]
            );
        }
    }
}
