//! The portable CPU convolution: every convolution as GEMMs on the `gemm` crate (the one
//! Candle uses, which picks SSE/AVX2/AVX-512 kernels at run time). A 1x1 stride-1
//! convolution is one GEMM straight on the activations; others gather patches group by
//! group (im2col), and a grouped convolution is one GEMM per group written in place into
//! the output. Used where [`super::direct`] has no kernel: CPUs without AVX-512, and
//! shapes the direct kernels do not cover.

use candle_core::{bail, Result};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{threads, Geometry, SendPtr};
use crate::model::layers::FoldedConv;

/// Weights packed per group as GEMM right-hand sides:
/// `[groups][k * k * in_per_group][out_per_group]`, row-major.
#[derive(Debug)]
pub struct GemmConv {
    packed: Vec<f32>,
    bias: Vec<f32>,
    geo: Geometry,
}

impl GemmConv {
    pub fn new(c: &FoldedConv) -> Self {
        let geo = Geometry::of(c);
        let [o, ipg, k, _] = c.shape;
        let opg = o / c.groups;
        let kg = k * k * ipg;
        let mut packed = vec![0f32; c.groups * kg * opg];
        for g in 0..c.groups {
            for ol in 0..opg {
                let oc = g * opg + ol;
                for ci in 0..ipg {
                    for t in 0..k * k {
                        let row = t * ipg + ci;
                        packed[(g * kg + row) * opg + ol] = c.weight[(oc * ipg + ci) * k * k + t];
                    }
                }
            }
        }
        GemmConv {
            packed,
            bias: c.bias.clone(),
            geo,
        }
    }

    /// `act(conv(x) + bias [+ residual])`, NHWC in and out; `dims` and the buffer sizes
    /// are checked by the caller.
    pub fn run(
        &self,
        x: &[f32],
        dims: [usize; 4],
        residual: Option<&[f32]>,
        relu: bool,
    ) -> Result<Vec<f32>> {
        let geo = &self.geo;
        let [o, ipg, k, _] = geo.shape;
        let [n, h, w, c] = dims;
        let (oh, ow) = geo.out_hw(h, w);
        let m = n * oh * ow;
        let opg = o / geo.groups;
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
        let direct = k == 1 && geo.stride == 1 && geo.padding == 0;
        let cols;
        let (lhs, lhs_rs): (&[f32], usize) = if direct {
            (x, c)
        } else {
            cols = im2col(geo, x, dims, (oh, ow));
            (&cols, geo.groups * kg)
        };
        if lhs.len() < m * lhs_rs || self.packed.len() < geo.groups * kg * opg {
            bail!("conv: operand sizes do not match the geometry");
        }
        let out_ptr = SendPtr(out.as_mut_ptr());
        let gemm_group = |g: usize, parallelism: Parallelism| {
            let out_ptr = &out_ptr;
            // SAFETY: each group writes only its own `opg` output columns of every row;
            // `lhs` holds `m` rows of `lhs_rs` values, of which the group reads its `kg`
            // columns; `packed` holds the group's `kg x opg` block (both checked above)
            // and the buffers outlive the call.
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
        if geo.groups == 1 {
            gemm_group(0, Parallelism::Rayon(threads()));
        } else {
            // Many small GEMMs: spread the groups over the threads instead.
            (0..geo.groups)
                .into_par_iter()
                .for_each(|g| gemm_group(g, Parallelism::None));
        }
        if relu {
            out.par_chunks_mut(4096)
                .for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0)));
        }
        Ok(out)
    }
}

/// Patches, group-major within each output pixel: `[n*oh*ow][groups][k][k][in/groups]`,
/// zero where the window leaves the image.
pub(super) fn im2col(
    geo: &Geometry,
    x: &[f32],
    [n, h, w, c]: [usize; 4],
    (oh, ow): (usize, usize),
) -> Vec<f32> {
    let [_, ipg, k, _] = geo.shape;
    let groups = geo.groups;
    let kg = k * k * ipg;
    let row_len = groups * kg;
    let mut cols = vec![0f32; n * oh * ow * row_len];
    let (s, p) = (geo.stride as isize, geo.padding as isize);
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
                    for g in 0..groups {
                        let d = g * kg + (ky * k + kx) * ipg;
                        dst[d..d + ipg].copy_from_slice(&x[src + g * ipg..src + (g + 1) * ipg]);
                    }
                }
            }
        });
    cols
}
