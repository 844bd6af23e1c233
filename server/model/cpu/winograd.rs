//! Winograd F(2x2, 3x3) for the stride-1 3x3 convolutions: each 2x2 block of outputs
//! costs 16 multiplies per (input, output) channel pair instead of 36, so these layers
//! (about 37% of resnet50's work) do 2.25x fewer multiplies.
//!
//! Per chunk of tiles, on one thread and in cache: the input tiles are transformed into
//! 16 matrices `V[xi]` (tiles x in), multiplied by the weights transformed at load
//! (`U[xi]`, in x out) with the dense kernel of [`super::avx512`], and the 16 products
//! are transformed back into 2x2 output blocks with bias, shortcut and ReLU applied.
//! Chunks are sized so `V` and `M` stay in L2; when a batch has too few tiles to give
//! every thread a chunk, the direct kernel is used instead.

use std::cell::RefCell;

use candle_core::{bail, Result};
use rayon::prelude::*;

use super::avx512::{self, Epilogue, LANES, MR, NR};
use super::{threads, SendPtr};
use crate::model::layers::FoldedConv;

/// Transformed tile size: 4x4.
const XI: usize = 16;
/// Bytes of `V` and `M` a chunk may hold, so both stay in L2 across the 16 products.
const CHUNK_BUDGET: usize = 1 << 20;
/// Chunks each thread should get, where the layer has tiles enough.
const MIN_CHUNKS_PER_THREAD: usize = 2;

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
pub struct Winograd {
    /// `U[xi]` as dense panels: `[xi][out / NR][in][NR]`.
    packed: Vec<f32>,
    zeros: Vec<f32>,
    inputs: usize,
    outputs: usize,
}

impl Winograd {
    /// The Winograd form of `c`, or `None` when it is not a dense stride-1 3x3
    /// convolution with channel counts the kernels take.
    pub fn new(c: &FoldedConv) -> Option<Self> {
        let [o, i, k, _] = c.shape;
        if k != 3
            || c.stride != 1
            || c.padding != 1
            || c.groups != 1
            || !o.is_multiple_of(NR)
            || !i.is_multiple_of(LANES)
        {
            return None;
        }
        let nb = o / NR;
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
                        let (j, l) = (oc / NR, oc % NR);
                        packed[((xi * nb + j) * i + ci) * NR + l] = u;
                    }
                }
            }
        }
        Some(Winograd {
            packed,
            zeros: vec![0.0; o],
            inputs: i,
            outputs: o,
        })
    }

    /// Tiles per chunk for this layer: as many as keep `V` and `M` in L2, but few enough
    /// for every thread to get [`MIN_CHUNKS_PER_THREAD`]; `None` below four kernel tiles
    /// per thread, where the direct kernel measured faster (resnet50's 14x14 layers at
    /// batch 1: 49 tiles).
    fn chunk_tiles(&self, tiles: usize) -> Option<usize> {
        let per_tile = XI * (self.inputs + self.outputs) * 4;
        let in_cache = ((CHUNK_BUDGET / per_tile) / MR * MR).max(MR);
        let shared = (tiles.div_ceil(threads() * MIN_CHUNKS_PER_THREAD)).div_ceil(MR) * MR;
        (tiles >= threads() * MR * MIN_CHUNKS_PER_THREAD * 2)
            .then_some(in_cache.min(shared).max(MR))
    }

    /// Whether running `dims` through Winograd beats the direct kernel.
    pub fn worth_it(&self, [n, h, w, _]: [usize; 4]) -> bool {
        self.chunk_tiles(n * h.div_ceil(2) * w.div_ceil(2))
            .is_some()
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
        let Some(chunk) = self.chunk_tiles(tiles) else {
            bail!("winograd: {tiles} tiles are too few for this layer");
        };
        self.run_in_chunks(x, [n, h, w, c], bias, residual, relu, chunk)
    }

    /// [`Self::run`] with `chunk` tiles (a multiple of [`MR`]) per task.
    pub(super) fn run_in_chunks(
        &self,
        x: &[f32],
        [n, h, w, c]: [usize; 4],
        bias: &[f32],
        residual: Option<&[f32]>,
        relu: bool,
        chunk: usize,
    ) -> Result<Vec<f32>> {
        let (ci, o) = (self.inputs, self.outputs);
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let tiles = n * th * tw;
        let m = n * h * w;
        if c != ci
            || x.len() != m * c
            || bias.len() != o
            || residual.is_some_and(|r| r.len() != m * o)
        {
            bail!("winograd: buffer sizes do not match [{n}, {h}, {w}, {c}]");
        }
        if chunk == 0 || !chunk.is_multiple_of(MR) {
            bail!("winograd: chunks of {chunk} tiles are not whole kernel tiles");
        }
        let nb = o / NR;
        let zero_px = vec![0f32; c];
        let mut out: Vec<f32> = Vec::with_capacity(m * o);
        let out_ptr = SendPtr(out.as_mut_ptr());
        let chunks = tiles.div_ceil(chunk);
        (0..chunks).into_par_iter().for_each(|chunk_index| {
            SCRATCH.with_borrow_mut(|(v, mm)| {
                grow(v, XI * chunk * ci);
                grow(mm, XI * chunk * o);
                let out_ptr = &out_ptr;
                let t0 = chunk_index * chunk;
                let valid = chunk.min(tiles - t0);
                // The tile's top-left input pixel (may be -1) and output pixel.
                let corner = |tile: usize| {
                    let b = tile / (th * tw);
                    let (ty, tx) = ((tile / tw) % th, tile % tw);
                    (b, 2 * ty, 2 * tx)
                };
                // 1. V[xi][tile][in].
                for tt in 0..valid {
                    let (b, y0, x0) = corner(t0 + tt);
                    let mut d = [[zero_px.as_ptr(); 4]; 4];
                    for (r, row) in d.iter_mut().enumerate() {
                        for (col, p) in row.iter_mut().enumerate() {
                            let (iy, ix) = ((y0 + r).wrapping_sub(1), (x0 + col).wrapping_sub(1));
                            if iy < h && ix < w {
                                *p = x[((b * h + iy) * w + ix) * c..].as_ptr();
                            }
                        }
                    }
                    // SAFETY: AVX-512 was detected before this form was chosen; every
                    // pointer is a pixel of `c` channels or `zero_px`; `v` holds
                    // XI * chunk rows of `ci` values.
                    unsafe {
                        avx512::winograd_input(&d, ci, v.as_mut_ptr().add(tt * ci), chunk * ci)
                    };
                }
                // 2. M[xi] = V[xi] U[xi], MR tiles at a time.
                for j in 0..nb {
                    for xi in 0..XI {
                        let u = self.packed[(xi * nb + j) * ci * NR..][..ci * NR].as_ptr();
                        for r0 in (0..valid).step_by(MR) {
                            let mut a = [std::ptr::null::<f32>(); MR];
                            let mut rows = [std::ptr::null_mut::<f32>(); MR];
                            for i in 0..MR {
                                let row = xi * chunk + r0 + i;
                                a[i] = v[row * ci..].as_ptr();
                                rows[i] = mm[row * o + j * NR..].as_mut_ptr();
                            }
                            let e = Epilogue {
                                bias: self.zeros[j * NR..].as_ptr(),
                                out: rows,
                                residual: None,
                                relu: false,
                            };
                            // SAFETY: as above; r0 + MR <= chunk, so every row is inside
                            // `v` (ci values) and `mm` (o values, NR from j * NR).
                            unsafe { avx512::dense::<MR>(&a, 0, 1, ci, u, &e) };
                        }
                    }
                }
                // 3. Y = At M A, with bias, shortcut and ReLU.
                for tt in 0..valid {
                    let (b, y0, x0) = corner(t0 + tt);
                    let mut y = [[None; 2]; 2];
                    let mut res = [[std::ptr::null::<f32>(); 2]; 2];
                    for (a, (y_row, res_row)) in y.iter_mut().zip(res.iter_mut()).enumerate() {
                        for (col, (yp, rp)) in y_row.iter_mut().zip(res_row.iter_mut()).enumerate()
                        {
                            let (oy, ox) = (y0 + a, x0 + col);
                            if oy < h && ox < w {
                                let px = ((b * h + oy) * w + ox) * o;
                                // SAFETY: the pixel is inside the m x o output.
                                *yp = Some(unsafe { out_ptr.0.add(px) });
                                if let Some(r) = residual {
                                    *rp = r[px..].as_ptr();
                                }
                            }
                        }
                    }
                    // SAFETY: as above; `mm` rows hold o values, `bias` o values.
                    unsafe {
                        avx512::winograd_output(
                            mm[tt * o..].as_ptr(),
                            chunk * o,
                            o,
                            bias.as_ptr(),
                            &y,
                            residual.map(|_| &res),
                            relu,
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
