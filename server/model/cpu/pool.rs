//! The CPU path's layers around the convolutions: the NCHW batch into NHWC, the stem's
//! 3x3 max pool and the global average pool. Each is one pass over memory on the compute
//! threads; the inner loops are plain element-wise loops compiled for AVX-512 (16
//! lanes), AVX2 (8 lanes) and baseline x86-64, the one run picked by the thread's
//! [`CpuKernels`] choice, so Candle's strided copies and reductions (a third of a
//! millisecond each at batch 1) are off the path.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{f32s, nhwc, CpuKernels};

/// The vector width the pools run at: the [`CpuKernels`] choice resolved on this CPU
/// (`gemm`, the portable path, runs the baseline loops).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Width {
    Avx512,
    Avx2,
    Baseline,
}

impl Width {
    /// The width `which` runs at: `auto` the widest this CPU has.
    pub(super) fn of(which: CpuKernels) -> Width {
        let which = match which {
            CpuKernels::Auto => CpuKernels::supported()
                .first()
                .copied()
                .unwrap_or(CpuKernels::Gemm),
            k => k,
        };
        match which {
            CpuKernels::Avx512 if which.runs_here() => Width::Avx512,
            CpuKernels::Avx2 if which.runs_here() => Width::Avx2,
            _ => Width::Baseline,
        }
    }

    /// The thread's choice ([`CpuKernels::current`]).
    fn current() -> Result<Width> {
        Ok(Width::of(
            CpuKernels::current().map_err(candle_core::Error::wrap)?,
        ))
    }
}

/// `[N, C, H, W]` f32 to `[N, H, W, C]`.
pub fn to_nhwc(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&ToNhwc)
}

/// `MaxPool2d(3, stride 2, padding 1)` on NHWC.
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&MaxPool)
}

/// `AdaptiveAvgPool2d(1)` + flatten on NHWC: `[N, H, W, C]` to `[N, C]`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&AvgPool)
}

/// Defines `$name(width, $args)` running `$body`, dispatched to a copy compiled for
/// AVX-512 or AVX2 as `width` says, so its loops vectorize 16 or 8 wide.
macro_rules! multiversion {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$doc])*
        fn $name(width: Width, $($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn wide($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn ymm($($arg: $ty),*) {
                    body($($arg),*)
                }
                match width {
                    // SAFETY: `Width::of` gives Avx512 only where the CPU has AVX-512F.
                    Width::Avx512 => return unsafe { wide($($arg),*) },
                    // SAFETY: `Width::of` gives Avx2 only where the CPU has AVX2 and FMA.
                    Width::Avx2 => return unsafe { ymm($($arg),*) },
                    Width::Baseline => {}
                }
            }
            let _ = width;
            body($($arg),*)
        }
    };
}

/// `dst = max over windows`, each window a slice as long as `dst`; a NaN is skipped, as
/// a comparison-based pool does. The vector kernels keep the running max in registers;
/// an auto-vectorized `max` into `dst` compiles to masked stores, each of which the next
/// window's load of `dst` waits on.
fn max_of(width: Width, dst: &mut [f32], windows: &[&[f32]]) {
    #[cfg(target_arch = "x86_64")]
    {
        use super::isa::Isa;
        /// `I::max_of` where its contract holds.
        fn vector<I: Isa>(dst: &mut [f32], windows: &[&[f32]]) -> bool {
            let fits = !windows.is_empty()
                && dst.len().is_multiple_of(I::LANES)
                && windows.iter().all(|w| w.len() >= dst.len());
            if fits {
                // SAFETY: `Width::of` checked the CPU runs `I`; the rest just above.
                unsafe { I::max_of(dst, windows) };
            }
            fits
        }
        let done = match width {
            Width::Avx512 => vector::<super::avx512::Avx512>(dst, windows),
            Width::Avx2 => vector::<super::avx2::Avx2>(dst, windows),
            Width::Baseline => false,
        };
        if done {
            return;
        }
    }
    let _ = width;
    dst.fill(f32::NEG_INFINITY);
    for w in windows {
        for (d, v) in dst.iter_mut().zip(w.iter()) {
            *d = if *v > *d { *v } else { *d };
        }
    }
}

multiversion!(
    /// `dst += src`.
    fn add_into(dst: &mut [f32], src: &[f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d += *s;
        }
    }
);

struct ToNhwc;

impl CustomOp1 for ToNhwc {
    fn name(&self) -> &'static str {
        "cpu-to-nhwc"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l)?;
        // Named NHWC by the helper; here the dims are N, C, H, W.
        let [n, c, h, w] = nhwc(l)?;
        let plane = h * w;
        let len = n * plane * c;
        if len == 0 || x.len() != len {
            bail!("to NHWC: {} values for {:?}", x.len(), l.dims());
        }
        // Written in place without zeroing first: every value is written exactly once.
        let mut out: Vec<f32> = Vec::with_capacity(len);
        // One task per image row: each reads `c` input rows and writes one output row.
        out.spare_capacity_mut()[..len]
            .par_chunks_mut(w * c)
            .enumerate()
            .for_each(|(row, dst)| {
                let (b, y) = (row / h, row % h);
                for ch in 0..c {
                    let src = &x[(b * c + ch) * plane + y * w..][..w];
                    for (px, v) in src.iter().enumerate() {
                        dst[px * c + ch].write(*v);
                    }
                }
            });
        // SAFETY: the rows cover all `len` values and each (pixel, channel) of a row was
        // written above.
        unsafe { out.set_len(len) };
        Ok((CpuStorage::F32(out), Shape::from((n, h, w, c))))
    }
}

struct MaxPool;

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "cpu-max-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l)?;
        let [n, h, w, c] = nhwc(l)?;
        if h == 0 || w == 0 || c == 0 {
            bail!("max pool: empty input {:?}", l.dims());
        }
        let (oh, ow) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
        let width = Width::current()?;
        let mut out = vec![0f32; n * oh * ow * c];
        // One task per output row.
        out.par_chunks_mut(ow * c)
            .enumerate()
            .for_each(|(row, dst)| {
                let (b, oy) = (row / oh, row % oh);
                for (ox, dst) in dst.chunks_exact_mut(c).enumerate() {
                    let mut windows = [&x[..0]; 9];
                    let mut count = 0;
                    for iy in (2 * oy).saturating_sub(1)..(2 * oy + 2).min(h) {
                        let line = &x[(b * h + iy) * w * c..][..w * c];
                        for ix in (2 * ox).saturating_sub(1)..(2 * ox + 2).min(w) {
                            windows[count] = &line[ix * c..][..c];
                            count += 1;
                        }
                    }
                    max_of(width, dst, &windows[..count]);
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, oh, ow, c))))
    }
}

struct AvgPool;

impl CustomOp1 for AvgPool {
    fn name(&self) -> &'static str {
        "cpu-global-avg-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l)?;
        let [n, h, w, c] = nhwc(l)?;
        let pixels = h * w;
        if pixels == 0 || c == 0 {
            bail!("average pool: empty input {:?}", l.dims());
        }
        let width = Width::current()?;
        let mut out = vec![0f32; n * c];
        out.par_chunks_mut(c).enumerate().for_each(|(b, dst)| {
            for px in x[b * pixels * c..][..pixels * c].chunks_exact(c) {
                add_into(width, dst, px);
            }
            let scale = 1.0 / pixels as f32;
            dst.iter_mut().for_each(|v| *v *= scale);
        });
        Ok((CpuStorage::F32(out), Shape::from((n, c))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, D};

    use super::*;

    /// Values with ties, negatives and a spread of magnitudes, NCHW.
    fn input(dims: (usize, usize, usize, usize)) -> Result<Tensor> {
        let len = dims.0 * dims.1 * dims.2 * dims.3;
        let v: Vec<f32> = (0..len)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.01 - 5.0)
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu)
    }

    fn assert_same(got: &Tensor, want: &Tensor) -> Result<()> {
        assert_eq!(got.dims(), want.dims());
        let diff = (got - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff <= 1e-5, "max difference {diff}");
        Ok(())
    }

    #[test]
    fn to_nhwc_matches_a_permute() -> Result<()> {
        let x = input((2, 3, 5, 7))?;
        assert_same(&to_nhwc(&x)?, &x.permute((0, 2, 3, 1))?.contiguous()?)
    }

    /// Runs `f` under every implementation this CPU supports (saying which it could
    /// not run), and checks the widths it ran are the ones the CPU has.
    fn for_each_supported(what: &str, f: impl Fn() -> Result<()>) -> Result<()> {
        let mut widths = Vec::new();
        for which in CpuKernels::CONCRETE {
            if !which.runs_here() {
                eprintln!("{what}: NOT RUN on {}: this CPU lacks it", which.name());
                continue;
            }
            which.scope(&f).map_err(candle_core::Error::wrap)??;
            widths.push(Width::of(which));
        }
        let want: Vec<Width> = CpuKernels::supported().into_iter().map(Width::of).collect();
        assert_eq!(widths, want, "{what}");
        assert!(widths.contains(&Width::Baseline), "{what}");
        Ok(())
    }

    #[test]
    fn max_pool_matches_candles_padded_pool_on_even_and_odd_sides() -> Result<()> {
        for_each_supported("max pool", || {
            // 32 channels run whole vectors; 12 is not a multiple of 8 or 16 and takes
            // the element-wise loop on every width.
            for (c, h, w) in [(32, 8, 8), (32, 7, 9), (32, 1, 2), (12, 5, 6)] {
                let x = input((2, c, h, w))?;
                // The reference: pad with -inf (not zero, so negative inputs are tested).
                let padded = x
                    .pad_with_same(2, 1, 1)?
                    .pad_with_same(3, 1, 1)?
                    .max_pool2d_with_stride((3, 3), (2, 2))?;
                let got = max_pool_3x3_s2(&x.permute((0, 2, 3, 1))?)?;
                assert_same(&got.permute((0, 3, 1, 2))?, &padded)?;
            }
            Ok(())
        })
    }

    #[test]
    fn global_avg_pool_matches_a_mean() -> Result<()> {
        for_each_supported("average pool", || {
            let x = input((3, 40, 7, 7))?;
            let want = x.mean(D::Minus1)?.mean(D::Minus1)?;
            assert_same(&global_avg_pool(&x.permute((0, 2, 3, 1))?)?, &want)
        })
    }
}
