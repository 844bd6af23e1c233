//! Winograd F(2x2, 3x3) for the stride-1 3x3 convolutions: each 2x2 block of outputs
//! costs 16 multiplies per (input, output) channel pair instead of 36, so these layers
//! (about 37% of resnet50's work) do 2.25x fewer multiplies.
//!
//! Per chunk of tiles, on one thread and in cache: the input tiles are transformed into
//! 16 matrices `V[xi]` (tiles x in), multiplied by the weights transformed at load
//! (`U[xi]`, in x out) with the dense kernel of an [`Isa`], and the 16 products
//! are transformed back into 2x2 output blocks with bias, shortcut and ReLU applied.
//! Chunks are sized so `V` and `M` stay in L2. When a batch has too few tiles to give
//! every thread chunks, the three steps are spread over the threads one after another
//! instead (the products by output block), and below [`MIN_SPREAD_TILES`] the direct
//! kernel runs.

use std::cell::RefCell;

use candle_core::{bail, Result};
use rayon::prelude::*;

use super::isa::{Epilogue, Isa, MAX_MR, MAX_NR};
use super::{threads, SendPtr};
use crate::model::layers::FoldedConv;

/// Transformed tile size: 4x4.
const XI: usize = 16;
/// Bytes of `V` and `M` a chunk may hold, so both stay in L2 across the 16 products.
const CHUNK_BUDGET: usize = 1 << 20;
/// Chunks each thread should get, where the layer has tiles enough.
const MIN_CHUNKS_PER_THREAD: usize = 2;
/// Fewest tiles worth the spread form ([`Winograd::run_spread`]); below, the direct
/// kernel runs. Measured with AVX-512 at 49 tiles (a 14x14 layer of 256 channels at
/// batch 1: 423 against 277 effective GFLOP/s); smaller counts were not measured. Not
/// tied to the kernel's tile height: AVX2's 6-pixel tiles keep the AVX-512 threshold.
const MIN_SPREAD_TILES: usize = 28;

thread_local! {
    /// Each compute thread's `V` and `M` for its chunk, kept between calls: allocating
    /// them per call cost a page fault and a memset per chunk.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Makes `v` at least `len` long. Stale values are fine: every row a chunk uses is
/// written first, except the padding rows of its last kernel tile, whose products are
/// never read.
fn grow(v: &mut Vec<f32>, len: usize) {
    if v.len() < len {
        v.resize(len, 0.0);
    }
}

/// The transformed weights of a stride-1, padding-1 3x3 convolution.
#[derive(Debug)]
pub struct Winograd<I: Isa> {
    /// `U[xi]` as dense panels: `[xi][out / NR][in][NR]`.
    packed: Vec<f32>,
    zeros: Vec<f32>,
    inputs: usize,
    outputs: usize,
    isa: std::marker::PhantomData<I>,
}

impl<I: Isa> Winograd<I> {
    /// The Winograd form of `c`, or `None` when it is not a dense stride-1 3x3
    /// convolution with channel counts the kernels take.
    pub fn new(c: &FoldedConv) -> Option<Self> {
        let [o, i, k, _] = c.shape;
        if k != 3
            || c.stride != 1
            || c.padding != 1
            || c.groups != 1
            || !o.is_multiple_of(I::NR)
            || !i.is_multiple_of(I::LANES)
        {
            return None;
        }
        let nr = I::NR;
        let nb = o / nr;
        let mut packed = vec![0f32; XI * o * i];
        for oc in 0..o {
            for ci in 0..i {
                let g = &c.weight[(oc * i + ci) * 9..][..9];
                // G g: 4x3.
                let mut t = [[0f32; 3]; 4];
                for col in 0..3 {
                    let (g0, g1, g2) = (g[col], g[3 + col], g[6 + col]);
                    t[0][col] = g0;
                    t[1][col] = 0.5 * (g0 + g1 + g2);
                    t[2][col] = 0.5 * (g0 - g1 + g2);
                    t[3][col] = g2;
                }
                // (G g) Gt: 4x4.
                for (r, t) in t.iter().enumerate() {
                    let u = [
                        t[0],
                        0.5 * (t[0] + t[1] + t[2]),
                        0.5 * (t[0] - t[1] + t[2]),
                        t[2],
                    ];
                    for (col, u) in u.into_iter().enumerate() {
                        let xi = r * 4 + col;
                        let (j, l) = (oc / nr, oc % nr);
                        packed[((xi * nb + j) * i + ci) * nr + l] = u;
                    }
                }
            }
        }
        Some(Winograd {
            packed,
            zeros: vec![0.0; o],
            inputs: i,
            outputs: o,
            isa: std::marker::PhantomData,
        })
    }

    /// Tiles per chunk for this layer: as many as keep `V` and `M` in L2, but few enough
    /// for every thread to get [`MIN_CHUNKS_PER_THREAD`]; `None` below four kernel tiles
    /// per thread, where chunks leave threads idle (resnet50's 14x14 layers at batch 1:
    /// 49 tiles) and [`Self::run_spread`] runs instead.
    fn chunk_tiles(&self, tiles: usize) -> Option<usize> {
        let mr = I::MR;
        let per_tile = XI * (self.inputs + self.outputs) * 4;
        let in_cache = ((CHUNK_BUDGET / per_tile) / mr * mr).max(mr);
        let shared = (tiles.div_ceil(threads() * MIN_CHUNKS_PER_THREAD)).div_ceil(mr) * mr;
        // The threshold in pixels is the AVX-512 one (14-pixel tiles), whatever `mr`.
        (tiles >= threads() * MIN_SPREAD_TILES * MIN_CHUNKS_PER_THREAD)
            .then_some(in_cache.min(shared).max(mr))
    }

    /// Whether running `dims` through Winograd beats the direct kernel.
    pub fn worth_it(&self, [n, h, w, _]: [usize; 4]) -> bool {
        let tiles = n * h.div_ceil(2) * w.div_ceil(2);
        self.chunk_tiles(tiles).is_some() || tiles >= MIN_SPREAD_TILES
    }

    /// `act(conv(x) + bias [+ residual])`, NHWC in and out (same height and width).
    pub fn run(
        &self,
        x: &[f32],
        [n, h, w, c]: [usize; 4],
        bias: &[f32],
        residual: Option<&[f32]>,
        relu: bool,
    ) -> Result<Vec<f32>> {
        let tiles = n * h.div_ceil(2) * w.div_ceil(2);
        match self.chunk_tiles(tiles) {
            Some(chunk) => self.run_in_chunks(x, [n, h, w, c], bias, residual, relu, chunk),
            None => self.run_spread(x, [n, h, w, c], bias, residual, relu),
        }
    }

    /// Checks the buffers against `dims`; returns (tiles, output pixels).
    fn check(
        &self,
        x: &[f32],
        [n, h, w, c]: [usize; 4],
        bias: &[f32],
        residual: Option<&[f32]>,
    ) -> Result<(usize, usize)> {
        let o = self.outputs;
        let m = n * h * w;
        if c != self.inputs
            || x.len() != m * c
            || bias.len() != o
            || residual.is_some_and(|r| r.len() != m * o)
        {
            bail!("winograd: buffer sizes do not match [{n}, {h}, {w}, {c}]");
        }
        Ok((n * h.div_ceil(2) * w.div_ceil(2), m))
    }

    /// [`Self::run`] for batches with too few tiles to give every thread chunks of its
    /// own (resnets' 14x14 layers at batch 1: 49 tiles): each step is spread over the
    /// threads on its own, the products by (transformed position, output block), with
    /// `V` and `M` whole and shared.
    pub(super) fn run_spread(
        &self,
        x: &[f32],
        dims: [usize; 4],
        bias: &[f32],
        residual: Option<&[f32]>,
        relu: bool,
    ) -> Result<Vec<f32>> {
        let (ci, o) = (self.inputs, self.outputs);
        let (tiles, m) = self.check(x, dims, bias, residual)?;
        let nb = o / I::NR;
        let zero_px = vec![0f32; ci];
        let mut v: Vec<f32> = Vec::with_capacity(XI * tiles * ci);
        let mut mm: Vec<f32> = Vec::with_capacity(XI * tiles * o);
        let mut out: Vec<f32> = Vec::with_capacity(m * o);
        let (v_ptr, mm_ptr, out_ptr) = (
            SendPtr(v.as_mut_ptr()),
            SendPtr(mm.as_mut_ptr()),
            SendPtr(out.as_mut_ptr()),
        );
        (0..tiles).into_par_iter().for_each(|tile| {
            let v_ptr = &v_ptr;
            // SAFETY: `v` has room for XI rows of `tiles * ci`; each tile its own columns.
            unsafe { self.input_tile(x, dims, &zero_px, tile, v_ptr.0.add(tile * ci), tiles * ci) };
        });
        (0..XI * nb).into_par_iter().for_each(|task| {
            let (xi, j) = (task / nb, task % nb);
            let (v_ptr, mm_ptr) = (&v_ptr, &mm_ptr);
            for r0 in (0..tiles).step_by(I::MR) {
                // SAFETY: V[xi] rows 0..tiles were written above; each task writes its
                // own (xi, block) columns of M.
                unsafe {
                    self.product(
                        xi,
                        j,
                        v_ptr.0.add(xi * tiles * ci),
                        mm_ptr.0.add(xi * tiles * o),
                        r0,
                        tiles - r0,
                    )
                };
            }
        });
        (0..tiles).into_par_iter().for_each(|tile| {
            let mm_ptr = &mm_ptr;
            // SAFETY: M was written above; the output is m x o.
            unsafe {
                self.output_tile(
                    dims,
                    tile,
                    mm_ptr.0.add(tile * o),
                    tiles * o,
                    bias,
                    residual,
                    relu,
                    &out_ptr,
                )
            };
        });
        // SAFETY: every output pixel lies in exactly one tile, transformed back above.
        unsafe { out.set_len(m * o) };
        Ok(out)
    }

    /// The tile's batch index and top-left output pixel.
    fn corner(tile: usize, [_, h, w, _]: [usize; 4]) -> (usize, usize, usize) {
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let b = tile / (th * tw);
        let (ty, tx) = ((tile / tw) % th, tile % tw);
        (b, 2 * ty, 2 * tx)
    }

    /// `V[xi][tile]` for one tile, to `v + xi * v_stride`.
    ///
    /// # Safety
    /// `I` is available; `v` is valid for XI rows of `inputs` values at `v_stride`.
    unsafe fn input_tile(
        &self,
        x: &[f32],
        dims: [usize; 4],
        zero_px: &[f32],
        tile: usize,
        v: *mut f32,
        v_stride: usize,
    ) {
        let [_, h, w, c] = dims;
        let (b, y0, x0) = Self::corner(tile, dims);
        let mut d = [[zero_px.as_ptr(); 4]; 4];
        for (r, row) in d.iter_mut().enumerate() {
            for (col, p) in row.iter_mut().enumerate() {
                // The tile's input window starts one pixel up and left (padding 1).
                let (iy, ix) = ((y0 + r).wrapping_sub(1), (x0 + col).wrapping_sub(1));
                if iy < h && ix < w {
                    *p = x[((b * h + iy) * w + ix) * c..].as_ptr();
                }
            }
        }
        // SAFETY: every pointer is a pixel of `c` channels or `zero_px`; the caller
        // vouches for `v`.
        unsafe { I::winograd_input(&d, self.inputs, v, v_stride) };
    }

    /// `M[xi][r0..r0 + rows]` for output block `j` (`rows` capped at `I::MR`): `v` and
    /// `mm` point at `V[xi]` and `M[xi]`.
    ///
    /// # Safety
    /// `I` is available; `v` holds rows `r0..r0 + min(rows, MR)` of `inputs` values,
    /// `mm` the same rows of `outputs` values.
    unsafe fn product(
        &self,
        xi: usize,
        j: usize,
        v: *const f32,
        mm: *mut f32,
        r0: usize,
        rows: usize,
    ) {
        let (ci, o) = (self.inputs, self.outputs);
        let (mr, nr) = (I::MR, I::NR);
        let nb = o / nr;
        let rows = rows.min(mr);
        let u = self.packed[(xi * nb + j) * ci * nr..][..ci * nr].as_ptr();
        let mut scratch = [0f32; MAX_MR * MAX_NR];
        let mut a = [std::ptr::null::<f32>(); MAX_MR];
        let mut out = [scratch.as_mut_ptr(); MAX_MR];
        for i in 0..mr {
            // Rows past `rows` re-read the last row and land in `scratch`.
            // SAFETY: the caller vouches for rows r0..r0 + rows.
            unsafe {
                a[i] = v.add((r0 + i.min(rows - 1)) * ci);
                if i < rows {
                    out[i] = mm.add((r0 + i) * o + j * nr);
                }
            }
        }
        let e = Epilogue {
            bias: self.zeros[j * nr..].as_ptr(),
            out,
            residual: None,
            relu: false,
        };
        // SAFETY: as above; `u` is a whole panel of ci x NR.
        unsafe { I::dense_rows(rows, &a[..mr], 0, 1, ci, u, &e) };
    }

    /// `Y = At M A` for one tile, with bias, shortcut and ReLU, into the NHWC output:
    /// `m` points at the tile's row of `M[0]`, rows of later `xi` at `m_stride`.
    ///
    /// # Safety
    /// `I` is available; `m` is valid for XI rows of `outputs` values at `m_stride`;
    /// `out` holds the whole output of `dims`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn output_tile(
        &self,
        dims: [usize; 4],
        tile: usize,
        m: *const f32,
        m_stride: usize,
        bias: &[f32],
        residual: Option<&[f32]>,
        relu: bool,
        out: &SendPtr,
    ) {
        let [_, h, w, _] = dims;
        let o = self.outputs;
        let (b, y0, x0) = Self::corner(tile, dims);
        let mut y = [[None; 2]; 2];
        let mut res = [[std::ptr::null::<f32>(); 2]; 2];
        for (a, (y_row, res_row)) in y.iter_mut().zip(res.iter_mut()).enumerate() {
            for (col, (yp, rp)) in y_row.iter_mut().zip(res_row.iter_mut()).enumerate() {
                let (oy, ox) = (y0 + a, x0 + col);
                if oy < h && ox < w {
                    let px = ((b * h + oy) * w + ox) * o;
                    // SAFETY: the pixel is inside the output.
                    *yp = Some(unsafe { out.0.add(px) });
                    if let Some(r) = residual {
                        *rp = r[px..].as_ptr();
                    }
                }
            }
        }
        // SAFETY: the caller vouches for `m` and the output; `bias` holds o values.
        unsafe {
            I::winograd_output(
                m,
                m_stride,
                o,
                bias.as_ptr(),
                &y,
                residual.map(|_| &res),
                relu,
            )
        };
    }

    /// [`Self::run`] with `chunk` tiles (a multiple of `I::MR`) per task.
    pub(super) fn run_in_chunks(
        &self,
        x: &[f32],
        dims: [usize; 4],
        bias: &[f32],
        residual: Option<&[f32]>,
        relu: bool,
        chunk: usize,
    ) -> Result<Vec<f32>> {
        let (ci, o) = (self.inputs, self.outputs);
        let (tiles, m) = self.check(x, dims, bias, residual)?;
        let mr = I::MR;
        if chunk == 0 || !chunk.is_multiple_of(mr) {
            bail!("winograd: chunks of {chunk} tiles are not whole kernel tiles");
        }
        let nb = o / I::NR;
        let zero_px = vec![0f32; ci];
        let mut out: Vec<f32> = Vec::with_capacity(m * o);
        let out_ptr = SendPtr(out.as_mut_ptr());
        let chunks = tiles.div_ceil(chunk);
        (0..chunks).into_par_iter().for_each(|chunk_index| {
            SCRATCH.with_borrow_mut(|(v, mm)| {
                grow(v, XI * chunk * ci);
                grow(mm, XI * chunk * o);
                let t0 = chunk_index * chunk;
                let valid = chunk.min(tiles - t0);
                // 1. V[xi][tile][in].
                for tt in 0..valid {
                    // SAFETY: `v` holds XI rows of `chunk * ci` values.
                    unsafe {
                        self.input_tile(
                            x,
                            dims,
                            &zero_px,
                            t0 + tt,
                            v.as_mut_ptr().add(tt * ci),
                            chunk * ci,
                        )
                    };
                }
                // 2. M[xi] = V[xi] U[xi], MR tiles at a time.
                for j in 0..nb {
                    for xi in 0..XI {
                        for r0 in (0..valid).step_by(mr) {
                            // SAFETY: r0 + mr <= chunk, so every row is inside `v` and `mm`.
                            unsafe {
                                self.product(
                                    xi,
                                    j,
                                    v.as_ptr().add(xi * chunk * ci),
                                    mm.as_mut_ptr().add(xi * chunk * o),
                                    r0,
                                    mr,
                                )
                            };
                        }
                    }
                }
                // 3. Y = At M A, with bias, shortcut and ReLU.
                for tt in 0..valid {
                    // SAFETY: `mm` holds XI rows of `chunk * o` values; the output is m x o.
                    unsafe {
                        self.output_tile(
                            dims,
                            t0 + tt,
                            mm.as_ptr().add(tt * o),
                            chunk * o,
                            bias,
                            residual,
                            relu,
                            &out_ptr,
                        )
                    };
                }
            })
        });
        // SAFETY: every output pixel lies in exactly one tile, and every tile was
        // transformed back above.
        unsafe { out.set_len(m * o) };
        Ok(out)
    }
}
