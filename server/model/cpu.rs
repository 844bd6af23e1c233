//! The CPU path: NHWC activations and every convolution as GEMMs on weights packed once
//! at load. A 1x1 stride-1 convolution is one GEMM straight on the activations (no
//! im2col); others gather patches group by group, and a grouped convolution is one GEMM
//! per group written in place into the output (Candle's stock op runs each group as a
//! separate convolution and concatenates). The output starts as bias (+ shortcut) and
//! the GEMM accumulates into it, so bias, residual add and ReLU cost one extra pass
//! instead of three.
//!
//! GEMMs run on the `gemm` crate (the one Candle uses), which picks AVX2/FMA or AVX-512
//! kernels at run time, so one binary serves every x86-64 machine.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::layers::FoldedConv;

/// A convolution with folded batch-norm, weights packed per group as GEMM right-hand
/// sides: `[groups][k * k * in_per_group][out_per_group]`, row-major.
#[derive(Debug)]
pub struct CpuConv {
    packed: Vec<f32>,
    bias: Vec<f32>,
    /// `[out, in / groups, k, k]`.
    shape: [usize; 4],
    stride: usize,
    padding: usize,
    groups: usize,
}

fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

impl CpuConv {
    pub fn new(c: FoldedConv) -> Self {
        let [o, ipg, k, _] = c.shape;
        let opg = o / c.groups;
        let kg = k * k * ipg;
        let mut packed = vec![0f32; c.groups * kg * opg];
        for g in 0..c.groups {
            for ol in 0..opg {
                let oc = g * opg + ol;
                for ci in 0..ipg {
                    for y in 0..k {
                        for x in 0..k {
                            let src = ((oc * ipg + ci) * k + y) * k + x;
                            let row = (y * k + x) * ipg + ci;
                            packed[(g * kg + row) * opg + ol] = c.weight[src];
                        }
                    }
                }
            }
        }
        CpuConv {
            packed,
            bias: c.bias,
            shape: c.shape,
            stride: c.stride,
            padding: c.padding,
            groups: c.groups,
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

    fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        let k = self.shape[2];
        (
            (h + 2 * self.padding - k) / self.stride + 1,
            (w + 2 * self.padding - k) / self.stride + 1,
        )
    }

    fn run(
        &self,
        x: &[f32],
        [n, h, w, c]: [usize; 4],
        residual: Option<&[f32]>,
        relu: bool,
    ) -> Result<(Vec<f32>, [usize; 4])> {
        let [o, ipg, k, _] = self.shape;
        if c != ipg * self.groups {
            bail!(
                "conv: {c} input channels, weights expect {}",
                ipg * self.groups
            );
        }
        let (oh, ow) = self.out_hw(h, w);
        let m = n * oh * ow;
        let opg = o / self.groups;
        let kg = k * k * ipg;
        // The output starts as bias (+ shortcut); the GEMMs accumulate into it.
        let mut out = vec![0f32; m * o];
        out.par_chunks_mut(o).enumerate().for_each(|(row, dst)| {
            dst.copy_from_slice(&self.bias);
            if let Some(z) = residual {
                for (d, r) in dst.iter_mut().zip(&z[row * o..(row + 1) * o]) {
                    *d += r;
                }
            }
        });
        let direct = k == 1 && self.stride == 1 && self.padding == 0;
        let cols;
        let (lhs, lhs_rs): (&[f32], usize) = if direct {
            (x, c)
        } else {
            cols = self.im2col(x, [n, h, w, c], oh, ow);
            (&cols, self.groups * kg)
        };
        let out_ptr = SendPtr(out.as_mut_ptr());
        let gemm_group = |g: usize, parallelism: Parallelism| {
            let out_ptr = &out_ptr;
            // SAFETY: each group writes only its own `opg` output columns of every row;
            // `lhs` holds `m` rows of `lhs_rs` values, of which the group reads its `kg`
            // columns; `packed` holds the group's `kg x opg` block. All sizes are checked
            // above and the buffers outlive the call.
            unsafe {
                gemm::gemm(
                    m,
                    opg,
                    kg,
                    out_ptr.0.add(g * opg),
                    1,
                    o as isize,
                    true,
                    lhs.as_ptr().add(g * kg),
                    1,
                    lhs_rs as isize,
                    self.packed.as_ptr().add(g * kg * opg),
                    1,
                    opg as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        };
        if self.groups == 1 {
            gemm_group(0, Parallelism::Rayon(threads()));
        } else {
            // Many small GEMMs: spread the groups over the threads instead.
            (0..self.groups)
                .into_par_iter()
                .for_each(|g| gemm_group(g, Parallelism::None));
        }
        if relu {
            out.par_chunks_mut(4096)
                .for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0)));
        }
        Ok((out, [n, oh, ow, o]))
    }

    /// Patches, group-major within each output pixel: `[n*oh*ow][groups][k][k][in/groups]`,
    /// zero where the window leaves the image.
    fn im2col(&self, x: &[f32], [n, h, w, c]: [usize; 4], oh: usize, ow: usize) -> Vec<f32> {
        let [_, ipg, k, _] = self.shape;
        let kg = k * k * ipg;
        let row_len = self.groups * kg;
        let mut cols = vec![0f32; n * oh * ow * row_len];
        let (s, p) = (self.stride as isize, self.padding as isize);
        cols.par_chunks_mut(row_len)
            .enumerate()
            .for_each(|(row, dst)| {
                let b = row / (oh * ow);
                let oy = (row / ow) % oh;
                let ox = row % ow;
                for ky in 0..k {
                    let iy = oy as isize * s - p + ky as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    for kx in 0..k {
                        let ix = ox as isize * s - p + kx as isize;
                        if ix < 0 || ix >= w as isize {
                            continue;
                        }
                        let src = ((b * h + iy as usize) * w + ix as usize) * c;
                        for g in 0..self.groups {
                            let d = g * kg + (ky * k + kx) * ipg;
                            dst[d..d + ipg].copy_from_slice(&x[src + g * ipg..src + (g + 1) * ipg]);
                        }
                    }
                }
            });
        cols
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
        "cpu-gemm-conv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (out, dims) = self.conv.run(f32s(s, l)?, nhwc(l)?, None, self.relu)?;
        Ok((CpuStorage::F32(out), Shape::from(dims.to_vec())))
    }
}

impl CustomOp2 for ConvOp<'_> {
    fn name(&self) -> &'static str {
        "cpu-gemm-conv-add"
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
        let want = [dims[0], oh, ow, self.conv.shape[0]];
        if nhwc(zl)? != want {
            bail!("residual {:?} does not match output {want:?}", zl.dims());
        }
        let (out, dims) = self.conv.run(f32s(s, l)?, dims, Some(z), self.relu)?;
        Ok((CpuStorage::F32(out), Shape::from(dims.to_vec())))
    }
}

/// `MaxPool2d(3, stride 2, padding 1)` on NHWC.
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&MaxPool)
}

struct MaxPool;

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "cpu-max-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l)?;
        let [n, h, w, c] = nhwc(l)?;
        let (oh, ow) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
        let mut out = vec![f32::NEG_INFINITY; n * oh * ow * c];
        out.par_chunks_mut(c).enumerate().for_each(|(row, dst)| {
            let b = row / (oh * ow);
            let (oy, ox) = ((row / ow) % oh, row % ow);
            for iy in (2 * oy).saturating_sub(1)..(2 * oy + 2).min(h) {
                for ix in (2 * ox).saturating_sub(1)..(2 * ox + 2).min(w) {
                    let src = &x[((b * h + iy) * w + ix) * c..][..c];
                    for (d, v) in dst.iter_mut().zip(src) {
                        *d = d.max(*v);
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, oh, ow, c))))
    }
}
