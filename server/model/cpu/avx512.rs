//! The AVX-512 microkernels behind [`super::direct`]. Each computes one tile: `MR` output
//! pixels by one block of output channels, over every tap and input channel, with the
//! whole sum held in registers, then bias, shortcut and ReLU applied on the way out, so
//! each output value is written once and never re-read.
//!
//! Rows reach a kernel as one pointer per (tap, pixel) into the NHWC input (or into a
//! zero row where the window leaves the image): the "indirect" convolution, which skips
//! the im2col copy a GEMM needs.

use std::arch::x86_64::*;

/// Output pixels per tile.
pub const MR: usize = 12;
/// Output channels per dense tile: two vectors.
pub const NR: usize = 32;
/// f32 lanes in one vector.
pub const LANES: usize = 16;

/// Where a tile's results go, and what is fused into them.
pub struct Epilogue {
    /// The block's first bias value.
    pub bias: *const f32,
    /// One pointer per tile row to its first output value.
    pub out: [*mut f32; MR],
    /// Per tile row, the shortcut values added before the ReLU.
    pub residual: Option<[*const f32; MR]>,
    pub relu: bool,
}

impl Epilogue {
    /// # Safety
    /// `bias`, and every `out`/`residual` row, hold at least `V * LANES` values.
    #[inline(always)]
    unsafe fn finish<const V: usize>(&self, acc: &[[__m512; V]; MR]) {
        // SAFETY: the caller's contract covers every pointer read or written here.
        unsafe {
            let zero = _mm512_setzero_ps();
            let mut bias = [zero; V];
            for (v, b) in bias.iter_mut().enumerate() {
                *b = _mm512_loadu_ps(self.bias.add(v * LANES));
            }
            for i in 0..MR {
                for v in 0..V {
                    let mut y = _mm512_add_ps(acc[i][v], bias[v]);
                    if let Some(r) = &self.residual {
                        y = _mm512_add_ps(y, _mm512_loadu_ps(r[i].add(v * LANES)));
                    }
                    if self.relu {
                        y = _mm512_max_ps(y, zero);
                    }
                    _mm512_storeu_ps(self.out[i].add(v * LANES), y);
                }
            }
        }
    }
}

/// A dense tile: `MR x NR` outputs, `sum over taps t, channels k of a[t][i][k] * b[t][k][..]`.
///
/// # Safety
/// The CPU has AVX-512F. `a` holds `taps * MR` row pointers (tap-major), each valid for
/// `a_off + kc` reads; `b` holds `taps * kc * NR` packed weights; `e` is valid for `NR`.
#[target_feature(enable = "avx512f")]
pub unsafe fn dense(
    a: &[*const f32],
    a_off: usize,
    taps: usize,
    kc: usize,
    b: *const f32,
    e: &Epilogue,
) {
    // SAFETY: the caller's contract bounds every read; `finish` gets NR = 2 vectors.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let mut bp = b;
        for t in 0..taps {
            let mut p = [std::ptr::null::<f32>(); MR];
            for (i, p) in p.iter_mut().enumerate() {
                *p = a[t * MR + i].add(a_off);
            }
            for k in 0..kc {
                let b0 = _mm512_loadu_ps(bp);
                let b1 = _mm512_loadu_ps(bp.add(LANES));
                bp = bp.add(NR);
                for i in 0..MR {
                    let x = _mm512_set1_ps(*p[i].add(k));
                    acc[i][0] = _mm512_fmadd_ps(x, b0, acc[i][0]);
                    acc[i][1] = _mm512_fmadd_ps(x, b1, acc[i][1]);
                }
            }
        }
        e.finish::<2>(&acc);
    }
}

/// A tile of a grouped convolution whose groups are narrower than a vector (`ipg` of 4,
/// 8 or 16 channels, in = out per group): one vector of 16 output channels spans
/// `16 / ipg` groups, whose inputs are the same 16 channels of each pixel. Each lane
/// picks its group's input channel with a permute, so a block of groups is one FMA per
/// (tap, channel) instead of a tiny GEMM per group.
///
/// # Safety
/// The CPU has AVX-512F. `a` holds `taps * MR` row pointers, each valid for
/// `a_off + LANES` reads; `b` holds `taps * ipg * LANES` packed weights; `ipg` divides
/// 16; `e` is valid for `LANES`.
#[target_feature(enable = "avx512f")]
pub unsafe fn narrow(
    a: &[*const f32],
    a_off: usize,
    taps: usize,
    ipg: usize,
    b: *const f32,
    e: &Epilogue,
) {
    // SAFETY: the caller's contract bounds every read; `finish` gets 1 vector.
    unsafe {
        let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        // Each lane's group starts at `lane - lane % ipg` (ipg is a power of two).
        let group_start = _mm512_andnot_si512(_mm512_set1_epi32(ipg as i32 - 1), lane);
        let mut acc = [[_mm512_setzero_ps(); 1]; MR];
        let mut bp = b;
        for t in 0..taps {
            let mut x = [_mm512_setzero_ps(); MR];
            for (i, x) in x.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(a[t * MR + i].add(a_off));
            }
            for c in 0..ipg {
                let w = _mm512_loadu_ps(bp);
                bp = bp.add(LANES);
                let idx = _mm512_add_epi32(group_start, _mm512_set1_epi32(c as i32));
                for i in 0..MR {
                    let xi = _mm512_permutexvar_ps(idx, x[i]);
                    acc[i][0] = _mm512_fmadd_ps(xi, w, acc[i][0]);
                }
            }
        }
        e.finish::<1>(&acc);
    }
}
