//! Convolutions computed straight from NHWC activations by the kernels of one vector
//! instruction set ([`Isa`]: [`super::avx512`] or [`super::avx2`]): weights packed once
//! at load into the panels the kernels stream,
//! one pointer per (pixel, tap) instead of an im2col copy, and bias, shortcut and ReLU
//! applied while the results are still in registers.
//!
//! Work is split over the thread pool in tiles of `MR` pixels; each task walks its tiles
//! against a run of output-channel blocks whose weights fit in L2, so both the pixels of
//! a tile and the weights of a block are read from cache while they are reused.

use candle_core::{bail, Result};
use rayon::prelude::*;

use super::isa::{Epilogue, Isa, MAX_MR, MAX_NR};
use super::winograd::Winograd;
use super::{threads, Geometry, SendPtr};
use crate::model::layers::FoldedConv;

/// Taps a kernel walks through pointers; larger windows (the 7x7 stem) go by rows.
const MAX_TAPS: usize = 9;
/// Below this many input channels per tap, one pointer per window row beats one per
/// pixel (the 3-channel stem: 7 taps of 21 values instead of 49 taps of 3).
const MIN_DIRECT_CHANNELS: usize = 16;
/// Bytes of packed weights a task keeps hot while it walks its tiles.
const PANEL_BUDGET: usize = 1 << 20;
/// Bytes of a tile's input rows, per tap, that stay in L1 while a dense kernel walks
/// their channels against one block of weights (the L1D of Zen 3 and Zen 4 is 32 KiB).
/// Past it the rows are re-read from L2 for every block: AVX-512 1x1 layers of 1024 and
/// 2048 input channels ran at 67-159 GFLOP/s against 160-210 for the others (14 rows).
const TILE_INPUT_BUDGET: usize = 32 << 10;
/// Input channels up to which a stride-1 3x3 convolution also keeps Winograd weights
/// (16/9 of its own size): past that, resnets run such layers at 7x7, too few tiles.
const MAX_WINOGRAD_CHANNELS: usize = 256;

/// Which kernel a convolution runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// Output channels per group a multiple of `NR`: weights `[group][block][tap][in][NR]`.
    Dense,
    /// Groups narrower than a vector (ResNeXt's 4, 8 or 16 channels, as
    /// [`Isa::narrow_takes`]): weights `[block of LANES][tap][in][LANES]`.
    Narrow,
}

#[derive(Debug)]
pub struct DirectConv<I: Isa> {
    form: Form,
    packed: Vec<f32>,
    bias: Vec<f32>,
    geo: Geometry,
    /// One tap per window row (few input channels): a row of the window is `k * c`
    /// contiguous values of a zero-bordered copy of the input.
    by_rows: bool,
    /// The Winograd form, used when a batch has tiles enough.
    winograd: Option<Winograd<I>>,
}

impl<I: Isa> DirectConv<I> {
    /// The direct form of `c`, or `None` when no kernel here covers its shape.
    pub fn new(c: &FoldedConv) -> Option<Self> {
        let geo = Geometry::of(c);
        let [o, ipg, k, _] = c.shape;
        let groups = c.groups;
        let opg = o / groups;
        let taps = k * k;
        let by_rows =
            groups == 1 && (ipg < MIN_DIRECT_CHANNELS || taps > MAX_TAPS) && k <= MAX_TAPS;
        let (nr, lanes) = (I::NR, I::LANES);
        let form = if opg.is_multiple_of(nr) && (by_rows || taps <= MAX_TAPS) {
            Form::Dense
        } else if ipg == opg
            && I::narrow_takes(ipg)
            && o.is_multiple_of(lanes)
            && taps <= MAX_TAPS
            && !by_rows
        {
            Form::Narrow
        } else {
            return None;
        };
        let w = |oc: usize, ci: usize, t: usize| c.weight[(oc * ipg + ci) * taps + t];
        let mut packed = Vec::with_capacity(c.weight.len());
        match form {
            Form::Dense => {
                for g in 0..groups {
                    for j in 0..opg / nr {
                        for t in 0..taps {
                            for ci in 0..ipg {
                                packed.extend((0..nr).map(|l| w(g * opg + j * nr + l, ci, t)));
                            }
                        }
                    }
                }
            }
            Form::Narrow => {
                for jb in 0..o / lanes {
                    for t in 0..taps {
                        for ci in 0..ipg {
                            packed.extend((0..lanes).map(|l| w(jb * lanes + l, ci, t)));
                        }
                    }
                }
            }
        }
        Some(DirectConv {
            form,
            packed,
            bias: c.bias.clone(),
            geo,
            by_rows,
            winograd: (ipg <= MAX_WINOGRAD_CHANNELS)
                .then(|| Winograd::<I>::new(c))
                .flatten(),
        })
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
        if let Some(wg) = self.winograd.as_ref().filter(|wg| wg.worth_it(dims)) {
            return wg.run(x, dims, &self.bias, residual, relu);
        }
        let padded;
        let src = if self.by_rows {
            padded = pad(x, dims, geo.padding);
            let p2 = 2 * geo.padding;
            Source {
                x: &padded,
                dims: [n, h + p2, w + p2, c],
                k,
                stride: geo.stride,
                padding: 0,
                out_hw: (oh, ow),
                by_rows: true,
            }
        } else {
            Source {
                x,
                dims,
                k,
                stride: geo.stride,
                padding: geo.padding,
                out_hw: (oh, ow),
                by_rows: false,
            }
        };
        let taps = src.taps();
        let kc = if self.by_rows { k * c } else { ipg };
        let zero = vec![0f32; kc.max(src.dims[3])];
        let (width, blocks, panel) = match self.form {
            Form::Dense => (I::NR, o / I::NR, taps * kc * I::NR),
            Form::Narrow => (I::LANES, o / I::LANES, taps * ipg * I::LANES),
        };
        if self.packed.len() != blocks * panel {
            bail!("conv: packed weights do not match the geometry");
        }

        let mut out: Vec<f32> = Vec::with_capacity(m * o);
        let out_ptr = SendPtr(out.as_mut_ptr());
        // Pointers are laid out `I::MR` per tap, as the kernels index them; a tile of
        // `mr` rows fills the first `mr` of each tap.
        let mr = match self.form {
            Form::Dense => tile_height::<I>(kc),
            Form::Narrow => I::MR,
        };
        let tiles = m.div_ceil(mr);
        // Eight tasks per thread: in a server, request handling preempts compute threads
        // now and then, and the layer waits for its last task; finer tasks let the other
        // threads take over the rest (resnet50 under 16 clients: 39.5 -> 40.0 img/s, the
        // same in-process, against 4 per thread).
        let target = threads() * 8;
        // Split the larger operand across tasks, so each task reuses the smaller one from
        // cache: late layers (few pixels, many weights) split over output channels, early
        // layers (many pixels, few weights) over pixels.
        let weights_heavier = self.packed.len() > m * c;
        let (tile_tasks, col_splits) = if weights_heavier {
            let col_splits = target.min(blocks);
            (target.div_ceil(col_splits).min(tiles), col_splits)
        } else {
            let tile_tasks = target.min(tiles);
            (tile_tasks, target.div_ceil(tile_tasks).min(blocks))
        };
        let tiles_per_task = tiles.div_ceil(tile_tasks);
        let tile_tasks = tiles.div_ceil(tiles_per_task);
        let blocks_per_split = blocks.div_ceil(col_splits);
        let col_splits = blocks.div_ceil(blocks_per_split);
        let blocks_per_pass = (PANEL_BUDGET / (panel * 4)).max(1);

        (0..tile_tasks * col_splits)
            .into_par_iter()
            .for_each(|task| {
                let out_ptr = &out_ptr;
                let (tt, cs) = (task / col_splits, task % col_splits);
                let tile_range = tt * tiles_per_task..((tt + 1) * tiles_per_task).min(tiles);
                let block_end = ((cs + 1) * blocks_per_split).min(blocks);
                let mut scratch = [0f32; MAX_MR * MAX_NR];
                let mut ptrs = [std::ptr::null::<f32>(); MAX_TAPS * MAX_MR];
                let mut pass_start = cs * blocks_per_split;
                while pass_start < block_end {
                    let pass_end = (pass_start + blocks_per_pass).min(block_end);
                    for tile in tile_range.clone() {
                        let m0 = tile * mr;
                        let height = mr.min(m - m0);
                        src.tile_pointers(
                            m0,
                            m0 + height,
                            I::MR,
                            zero.as_ptr(),
                            &mut ptrs[..taps * I::MR],
                        );
                        for blk in pass_start..pass_end {
                            let col0 = blk * width;
                            let a_off = match self.form {
                                Form::Dense => (col0 / (o / geo.groups)) * ipg,
                                Form::Narrow => col0,
                            };
                            let scratch_ptr = scratch.as_mut_ptr();
                            let mut rows = [scratch_ptr; MAX_MR];
                            let mut res_rows = [scratch_ptr as *const f32; MAX_MR];
                            for i in 0..height {
                                // SAFETY: row m0 + i < m, column block inside 0..o.
                                rows[i] = unsafe { out_ptr.0.add((m0 + i) * o + col0) };
                                if let Some(r) = residual {
                                    res_rows[i] = r[(m0 + i) * o + col0..].as_ptr();
                                }
                            }
                            let e = Epilogue {
                                bias: self.bias[col0..col0 + width].as_ptr(),
                                out: rows,
                                residual: residual.map(|_| res_rows),
                                relu,
                            };
                            let b = self.packed[blk * panel..(blk + 1) * panel].as_ptr();
                            // SAFETY: `I::available()` was checked when this conv was
                            // built; every row pointer reads at most `a_off + kc` (dense)
                            // or `a_off + LANES` (narrow) values: of a pixel of `c`
                            // channels, of a window row inside the padded copy
                            // (`by_rows`), or of `zero`; the panel holds `panel` values;
                            // the output rows own `width` values each (scratch rows hold
                            // MAX_MR * MAX_NR).
                            unsafe {
                                match self.form {
                                    Form::Dense => I::dense_rows(
                                        height,
                                        &ptrs[..taps * I::MR],
                                        a_off,
                                        taps,
                                        kc,
                                        b,
                                        &e,
                                    ),
                                    Form::Narrow => {
                                        I::narrow(&ptrs[..taps * I::MR], a_off, taps, ipg, b, &e)
                                    }
                                }
                            }
                        }
                    }
                    pass_start = pass_end;
                }
            });
        // SAFETY: the tiles cover rows 0..m and the blocks columns 0..o, so every value
        // was written above.
        unsafe { out.set_len(m * o) };
        Ok(out)
    }
}

/// The tallest tile a dense kernel runs at (its own height, 8 or 4 rows) whose input
/// rows of `kc` channels fit [`TILE_INPUT_BUDGET`]; 4 rows at the least.
fn tile_height<I: Isa>(kc: usize) -> usize {
    // `kc` comes from a checkpoint's shapes.
    let fits = |rows: usize| {
        rows.saturating_mul(kc)
            .saturating_mul(std::mem::size_of::<f32>())
            <= TILE_INPUT_BUDGET
    };
    [I::MR, 8, 4]
        .into_iter()
        .filter(|&rows| rows <= I::MR)
        .find(|&rows| fits(rows))
        .unwrap_or(4.min(I::MR))
}

/// The NHWC tensor a kernel reads, and the window geometry over it.
struct Source<'a> {
    x: &'a [f32],
    dims: [usize; 4],
    k: usize,
    stride: usize,
    padding: usize,
    out_hw: (usize, usize),
    /// One tap per window row: the input has no padding left to apply.
    by_rows: bool,
}

/// `x` with a border of `p` zero pixels.
fn pad(x: &[f32], [n, h, w, c]: [usize; 4], p: usize) -> Vec<f32> {
    let (hp, wp) = (h + 2 * p, w + 2 * p);
    let mut out = vec![0f32; n * hp * wp * c];
    out.par_chunks_mut(hp * wp * c)
        .zip(x.par_chunks(h * w * c))
        .for_each(|(dst, src)| {
            for y in 0..h {
                let d = ((y + p) * wp + p) * c;
                dst[d..d + w * c].copy_from_slice(&src[y * w * c..(y + 1) * w * c]);
            }
        });
    out
}

impl Source<'_> {
    fn taps(&self) -> usize {
        if self.by_rows {
            self.k
        } else {
            self.k * self.k
        }
    }

    /// Pointers to the input under each tap of output pixels `m0..m0 + mr` (tap-major,
    /// `mr` per tap): a pixel, or the first pixel of a window row when `by_rows`; `zero`
    /// outside the image and past the last pixel `m`.
    fn tile_pointers(
        &self,
        m0: usize,
        m: usize,
        mr: usize,
        zero: *const f32,
        ptrs: &mut [*const f32],
    ) {
        let [_, h, w, c] = self.dims;
        let (oh, ow) = self.out_hw;
        let k = self.k;
        // A 1x1 stride-1 convolution reads output pixel `row`'s own input pixel.
        let pointwise = k == 1 && self.stride == 1 && self.padding == 0 && !self.by_rows;
        // The first row's position, then stepped: three divisions per row cost as much
        // as a fifth of a 1x1 layer's tile (6 x 16 outputs over 64 channels).
        let (mut b, mut oy, mut ox) = (m0 / (oh * ow), (m0 / ow) % oh, m0 % ow);
        for i in 0..mr {
            let row = m0 + i;
            if i > 0 {
                ox += 1;
                if ox == ow {
                    ox = 0;
                    oy += 1;
                    if oy == oh {
                        oy = 0;
                        b += 1;
                    }
                }
            }
            if row >= m {
                for t in 0..self.taps() {
                    ptrs[t * mr + i] = zero;
                }
                continue;
            }
            if pointwise {
                ptrs[i] = self.x[row * c..].as_ptr();
                continue;
            }
            if self.by_rows {
                for ky in 0..k {
                    let iy = oy * self.stride + ky;
                    ptrs[ky * mr + i] =
                        self.x[((b * h + iy) * w + ox * self.stride) * c..].as_ptr();
                }
                continue;
            }
            let iy0 = (oy * self.stride) as isize - self.padding as isize;
            let ix0 = (ox * self.stride) as isize - self.padding as isize;
            for ky in 0..k {
                let iy = iy0 + ky as isize;
                for kx in 0..k {
                    let ix = ix0 + kx as isize;
                    let inside = (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix);
                    ptrs[(ky * k + kx) * mr + i] = if inside {
                        self.x[((b * h + iy as usize) * w + ix as usize) * c..].as_ptr()
                    } else {
                        zero
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{avx2::Avx2, avx512::Avx512};
    use super::*;

    #[test]
    fn wide_inputs_get_tiles_whose_rows_fit_in_l1() {
        // The tallest tile stays where its rows fit: every 3x3 tap of resnets' up to
        // 512 channels, the 1x1s of up to 512.
        assert_eq!(tile_height::<Avx512>(512), 14);
        assert_eq!(tile_height::<Avx512>(1024), 8);
        assert_eq!(tile_height::<Avx512>(2048), 4);
        assert_eq!(tile_height::<Avx2>(1024), 6);
        assert_eq!(tile_height::<Avx2>(2048), 4);
        // Never below 4 rows, however wide.
        assert_eq!(tile_height::<Avx512>(1 << 20), 4);
        assert_eq!(tile_height::<Avx512>(usize::MAX), 4);
        for kc in [1, 64, 1024, 2048, 4096] {
            assert!(tile_height::<Avx512>(kc) <= Avx512::MR);
            assert!(tile_height::<Avx2>(kc) <= Avx2::MR);
        }
    }
}
