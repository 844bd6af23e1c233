//! The CPU path: NHWC activations and convolutions on weights packed once at load, with
//! bias, shortcut and ReLU fused into the convolution. Two implementations sit behind
//! [`CpuConv`]:
//!
//! - [`direct`]: AVX-512 kernels that read the activations in place (no im2col) and keep
//!   each output in registers until bias, shortcut and ReLU are applied; grouped
//!   convolutions of narrow groups (ResNeXt) get a kernel of their own.
//! - [`gemm`]: GEMMs on the `gemm` crate, for CPUs without AVX-512 and any shape the
//!   direct kernels do not cover.
//!
//! [`pool`] holds the layers around them (layout change, max and average pools).
//!
//! The choice is made per convolution at load, by CPU feature detection at run time, so
//! one binary serves every x86-64 machine.

#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod direct;
mod gemm;
mod pool;
#[cfg(target_arch = "x86_64")]
mod winograd;

pub use pool::{global_avg_pool, max_pool_3x3_s2, to_nhwc};

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::layers::FoldedConv;

/// Which implementation runs a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuImpl {
    /// The AVX-512 direct kernels where they cover the shape, else `Gemm`.
    Best,
    /// GEMMs on the `gemm` crate.
    Gemm,
}

/// The shape of a convolution, as the kernels need it.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    /// `[out, in / groups, k, k]`.
    shape: [usize; 4],
    stride: usize,
    padding: usize,
    groups: usize,
}

impl Geometry {
    fn of(c: &FoldedConv) -> Self {
        Geometry {
            shape: c.shape,
            stride: c.stride,
            padding: c.padding,
            groups: c.groups,
        }
    }

    fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        let k = self.shape[2];
        (
            (h + 2 * self.padding - k) / self.stride + 1,
            (w + 2 * self.padding - k) / self.stride + 1,
        )
    }
}

#[derive(Debug)]
enum Plan {
    #[cfg(target_arch = "x86_64")]
    Direct(direct::DirectConv),
    Gemm(gemm::GemmConv),
}

/// A convolution with folded batch-norm, ready for NHWC f32 activations.
#[derive(Debug)]
pub struct CpuConv {
    plan: Plan,
    geo: Geometry,
}

fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

impl CpuConv {
    pub fn new(c: FoldedConv) -> Self {
        Self::with_impl(c, CpuImpl::Best)
    }

    pub fn with_impl(c: FoldedConv, which: CpuImpl) -> Self {
        let geo = Geometry::of(&c);
        #[cfg(target_arch = "x86_64")]
        if which == CpuImpl::Best && direct::available() {
            if let Some(d) = direct::DirectConv::new(&c) {
                return CpuConv {
                    plan: Plan::Direct(d),
                    geo,
                };
            }
        }
        let _ = which;
        CpuConv {
            plan: Plan::Gemm(gemm::GemmConv::new(&c)),
            geo,
        }
    }

    /// Which implementation this convolution runs on.
    pub fn implementation(&self) -> &'static str {
        match self.plan {
            #[cfg(target_arch = "x86_64")]
            Plan::Direct(_) => "avx512-direct",
            Plan::Gemm(_) => "gemm",
        }
    }

    /// `act(conv(x) + bias [+ residual])` with `x` (and `residual`) NHWC f32.
    pub fn forward(&self, x: &Tensor, residual: Option<&Tensor>, relu: bool) -> Result<Tensor> {
        let x = x.contiguous()?;
        let op = ConvOp { conv: self, relu };
        match residual {
            None => x.apply_op1_no_bwd(&op),
            Some(z) => x.apply_op2_no_bwd(&z.contiguous()?, &op),
        }
    }

    fn run(
        &self,
        x: &[f32],
        dims: [usize; 4],
        residual: Option<&[f32]>,
        relu: bool,
    ) -> Result<(Vec<f32>, [usize; 4])> {
        let [o, ipg, _, _] = self.geo.shape;
        let [n, h, w, c] = dims;
        if c != ipg * self.geo.groups {
            bail!(
                "conv: {c} input channels, weights expect {}",
                ipg * self.geo.groups
            );
        }
        let (oh, ow) = self.geo.out_hw(h, w);
        let m = n * oh * ow;
        if x.len() != n * h * w * c || residual.is_some_and(|r| r.len() != m * o) {
            bail!("conv: buffer sizes do not match {dims:?}");
        }
        let out = match &self.plan {
            #[cfg(target_arch = "x86_64")]
            Plan::Direct(d) => d.run(x, dims, residual, relu)?,
            Plan::Gemm(g) => g.run(x, dims, residual, relu)?,
        };
        Ok((out, [n, oh, ow, o]))
    }

    fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        self.geo.out_hw(h, w)
    }
}

struct SendPtr(*mut f32);
// SAFETY: the pointer is only used for disjoint writes (one column block per group).
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

fn nhwc(l: &Layout) -> Result<[usize; 4]> {
    match l.dims() {
        &[n, h, w, c] => Ok([n, h, w, c]),
        d => bail!("expected an NHWC tensor, got {d:?}"),
    }
}

fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let all = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => bail!("expected a contiguous tensor"),
    }
}

struct ConvOp<'a> {
    conv: &'a CpuConv,
    relu: bool,
}

impl CustomOp1 for ConvOp<'_> {
    fn name(&self) -> &'static str {
        "cpu-conv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (out, dims) = self.conv.run(f32s(s, l)?, nhwc(l)?, None, self.relu)?;
        Ok((CpuStorage::F32(out), Shape::from(dims.to_vec())))
    }
}

impl CustomOp2 for ConvOp<'_> {
    fn name(&self) -> &'static str {
        "cpu-conv-add"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        zs: &CpuStorage,
        zl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let z = f32s(zs, zl)?;
        let dims = nhwc(l)?;
        let (oh, ow) = self.conv.out_hw(dims[1], dims[2]);
        let want = [dims[0], oh, ow, self.conv.geo.shape[0]];
        if nhwc(zl)? != want {
            bail!("residual {:?} does not match output {want:?}", zl.dims());
        }
        let (out, dims) = self.conv.run(f32s(s, l)?, dims, Some(z), self.relu)?;
        Ok((CpuStorage::F32(out), Shape::from(dims.to_vec())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn noise(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The textbook loop nest in f64: the reference both implementations must match.
    fn reference(
        c: &FoldedConv,
        x: &[f32],
        [n, h, w, ch]: [usize; 4],
        residual: Option<&[f32]>,
        relu: bool,
    ) -> Vec<f32> {
        let geo = Geometry::of(c);
        let [o, ipg, k, _] = c.shape;
        let opg = o / c.groups;
        let (oh, ow) = geo.out_hw(h, w);
        let mut out = vec![0f32; n * oh * ow * o];
        for b in 0..n {
            for oy in 0..oh {
                for ox in 0..ow {
                    let row = (b * oh + oy) * ow + ox;
                    for oc in 0..o {
                        let g = oc / opg;
                        let mut acc = c.bias[oc] as f64;
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * c.stride + ky) as isize - c.padding as isize;
                                let ix = (ox * c.stride + kx) as isize - c.padding as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let px = ((b * h + iy as usize) * w + ix as usize) * ch;
                                for ci in 0..ipg {
                                    let wv = c.weight[((oc * ipg + ci) * k + ky) * k + kx];
                                    acc += wv as f64 * x[px + g * ipg + ci] as f64;
                                }
                            }
                        }
                        if let Some(r) = residual {
                            acc += r[row * o + oc] as f64;
                        }
                        out[row * o + oc] = if relu { acc.max(0.0) } else { acc } as f32;
                    }
                }
            }
        }
        out
    }

    /// The largest absolute difference, and the largest reference magnitude.
    fn max_error(got: &[f32], want: &[f32]) -> (f32, f32) {
        assert_eq!(got.len(), want.len(), "output lengths");
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let err = got
            .iter()
            .zip(want)
            .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
        (err, scale)
    }

    struct Case {
        name: &'static str,
        /// `[out, in, k]`.
        oik: [usize; 3],
        stride: usize,
        padding: usize,
        groups: usize,
        /// `[n, h, w]`.
        input: [usize; 3],
    }

    const CASES: &[Case] = &[
        Case {
            name: "1x1",
            oik: [64, 32, 1],
            stride: 1,
            padding: 0,
            groups: 1,
            input: [2, 7, 5],
        },
        Case {
            name: "1x1 s2",
            oik: [128, 64, 1],
            stride: 2,
            padding: 0,
            groups: 1,
            input: [1, 9, 9],
        },
        Case {
            name: "3x3",
            oik: [32, 48, 3],
            stride: 1,
            padding: 1,
            groups: 1,
            input: [2, 6, 7],
        },
        Case {
            name: "3x3 s2",
            oik: [64, 32, 3],
            stride: 2,
            padding: 1,
            groups: 1,
            input: [1, 11, 10],
        },
        Case {
            name: "stem 7x7",
            oik: [64, 3, 7],
            stride: 2,
            padding: 3,
            groups: 1,
            input: [2, 17, 15],
        },
        Case {
            name: "groups of 4",
            oik: [64, 64, 3],
            stride: 1,
            padding: 1,
            groups: 16,
            input: [2, 5, 6],
        },
        Case {
            name: "groups of 8 s2",
            oik: [64, 64, 3],
            stride: 2,
            padding: 1,
            groups: 8,
            input: [1, 9, 8],
        },
        Case {
            name: "groups of 16",
            oik: [64, 64, 3],
            stride: 1,
            padding: 1,
            groups: 4,
            input: [1, 5, 5],
        },
        Case {
            name: "groups of 64",
            oik: [128, 128, 3],
            stride: 1,
            padding: 1,
            groups: 2,
            input: [1, 4, 6],
        },
        Case {
            name: "uncovered: 40 out",
            oik: [40, 16, 3],
            stride: 1,
            padding: 1,
            groups: 1,
            input: [1, 5, 5],
        },
    ];

    fn check(case: &Case, which: CpuImpl, with_residual: bool, relu: bool) {
        let [o, i, k] = case.oik;
        let ipg = i / case.groups;
        let folded = FoldedConv {
            weight: noise(o * ipg * k * k, 1),
            bias: noise(o, 2),
            shape: [o, ipg, k, k],
            stride: case.stride,
            padding: case.padding,
            groups: case.groups,
        };
        let [n, h, w] = case.input;
        let dims = [n, h, w, i];
        let x = noise(n * h * w * i, 3);
        let conv = CpuConv::with_impl(folded.clone(), which);
        let (oh, ow) = conv.out_hw(h, w);
        let residual = with_residual.then(|| noise(n * oh * ow * o, 4));
        let (got, got_dims) = conv
            .run(&x, dims, residual.as_deref(), relu)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let want = reference(&folded, &x, dims, residual.as_deref(), relu);
        assert_eq!(got_dims, [n, oh, ow, o], "{}", case.name);
        let (err, scale) = max_error(&got, &want);
        assert!(
            err <= 1e-5 * scale,
            "{} on {}: max error {err} (scale {scale})",
            case.name,
            conv.implementation()
        );
    }

    #[test]
    fn both_implementations_match_the_reference_on_every_shape_kind() {
        for case in CASES {
            for which in [CpuImpl::Best, CpuImpl::Gemm] {
                check(case, which, false, false);
                check(case, which, true, true);
                check(case, which, false, true);
            }
        }
    }

    #[test]
    fn every_height_of_a_last_tile_matches_the_reference() {
        // 1..=2 * MR pixels: the last tile has every row count once, so each short-tile
        // kernel runs, with and without a shortcut.
        for pixels in 1..=2 * 14 {
            for (oik, groups) in [([64, 32, 1], 1), ([32, 32, 3], 8)] {
                let case = Case {
                    name: "short tile",
                    oik,
                    stride: 1,
                    padding: oik[2] / 2,
                    groups,
                    input: [1, 1, pixels],
                };
                check(&case, CpuImpl::Best, true, true);
                check(&case, CpuImpl::Best, false, false);
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn winograd_matches_the_reference_in_chunks_and_spread() {
        if !direct::available() {
            return;
        }
        for (o, i, [n, h, w], chunk) in [
            (32, 16, [2, 7, 9], MR_TILES),
            (64, 32, [1, 6, 6], 2 * MR_TILES),
            (32, 48, [3, 5, 4], 5 * MR_TILES),
        ] {
            let folded = FoldedConv {
                weight: noise(o * i * 9, 5),
                bias: noise(o, 6),
                shape: [o, i, 3, 3],
                stride: 1,
                padding: 1,
                groups: 1,
            };
            let x = noise(n * h * w * i, 7);
            let residual = noise(n * h * w * o, 8);
            let wg = winograd::Winograd::new(&folded).expect("a winograd shape");
            for (res, relu) in [(None, false), (Some(&residual[..]), true)] {
                let want = reference(&folded, &x, [n, h, w, i], res, relu);
                let chunked = wg
                    .run_in_chunks(&x, [n, h, w, i], &folded.bias, res, relu, chunk)
                    .expect("winograd runs in chunks");
                let spread = wg
                    .run_spread(&x, [n, h, w, i], &folded.bias, res, relu)
                    .expect("winograd runs spread");
                for got in [chunked, spread] {
                    let (err, scale) = max_error(&got, &want);
                    assert!(
                        err <= 1e-5 * scale,
                        "{o}x{i} {h}x{w}: {err} (scale {scale})"
                    );
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    const MR_TILES: usize = avx512::MR;

    #[test]
    fn the_direct_kernels_cover_every_resnet_convolution_shape() {
        #[cfg(target_arch = "x86_64")]
        if direct::available() {
            for case in &CASES[..CASES.len() - 1] {
                let [o, i, k] = case.oik;
                let conv = CpuConv::new(FoldedConv {
                    weight: vec![0.0; o * (i / case.groups) * k * k],
                    bias: vec![0.0; o],
                    shape: [o, i / case.groups, k, k],
                    stride: case.stride,
                    padding: case.padding,
                    groups: case.groups,
                });
                assert_eq!(conv.implementation(), "avx512-direct", "{}", case.name);
            }
        }
    }
}
