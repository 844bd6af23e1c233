//! The AVX-512 microkernels behind [`super::direct`]. Each computes one tile: `MR` output
//! pixels by one block of output channels, over every tap and input channel, with the
//! whole sum held in registers, then bias, shortcut and ReLU applied on the way out, so
//! each output value is written once and never re-read.
//!
//! Rows reach a kernel as one pointer per (tap, pixel) into the NHWC input (or into a
//! zero row where the window leaves the image): the "indirect" convolution, which skips
//! the im2col copy a GEMM needs.

use std::arch::x86_64::*;

use super::isa::{Epilogue, Isa, MAX_MR, MAX_NR};

/// Output pixels per tile.
pub const MR: usize = 14;
/// Output channels per dense tile: two vectors.
pub const NR: usize = 32;
/// f32 lanes in one vector.
pub const LANES: usize = 16;
const _: () = assert!(MR <= MAX_MR && NR <= MAX_NR);

/// How far ahead (in values) the dense kernel prefetches its weights: weights come
/// from memory once per forward pass at small batches, and the hardware prefetcher alone
/// left the late layers waiting on them.
const PREFETCH: usize = 1024;

impl Epilogue {
    /// Asks for tile row `*next`'s output (for writing) and shortcut (for reading) ahead of
    /// the epilogue: rows are far apart in a large activation, so without this the
    /// stores wait on ownership of each line and the adds on the shortcut loads.
    ///
    /// `prefetchw` is written out because its target feature is not stable in Rust;
    /// every AVX-512 CPU has it.
    ///
    /// Called once per step of a kernel's inner loop, it prefetches row `*next` while
    /// `*next < rows` and moves on: one row per step, so the misses overlap the FMAs
    /// instead of queueing.
    ///
    /// # Safety
    /// `rows <= MR`; prefetches never fault, so the pointers need not be valid.
    #[inline(always)]
    unsafe fn prefetch_next<const V: usize>(&self, next: &mut usize, rows: usize) {
        if *next >= rows {
            return;
        }
        let i = *next;
        *next += 1;
        for v in 0..V {
            let out = self.out[i].wrapping_add(v * LANES);
            // SAFETY: a prefetch touches no architectural state and never faults.
            unsafe {
                std::arch::asm!("prefetchw byte ptr [{0}]", in(reg) out,
                    options(nostack, preserves_flags, readonly));
                if let Some(r) = &self.residual {
                    _mm_prefetch::<_MM_HINT_T0>(r[i].wrapping_add(v * LANES) as *const i8);
                }
            }
        }
    }

    /// # Safety
    /// `bias`, and every `out`/`residual` row, hold at least `V * LANES` values.
    #[inline(always)]
    unsafe fn finish<const V: usize, const R: usize>(&self, acc: &[[__m512; V]; R]) {
        // SAFETY: the caller's contract covers every pointer read or written here.
        unsafe {
            let zero = _mm512_setzero_ps();
            let mut bias = [zero; V];
            for (v, b) in bias.iter_mut().enumerate() {
                *b = _mm512_loadu_ps(self.bias.add(v * LANES));
            }
            for (i, acc) in acc.iter().enumerate() {
                for v in 0..V {
                    let mut y = _mm512_add_ps(acc[v], bias[v]);
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

/// A dense tile: `R x NR` outputs (`R <= MR`; fewer rows for the last tile of a small
/// layer, so a batch-1 7x7 layer does not compute 7 rows of zeros per 49 pixels),
/// `sum over taps t, channels k of a[t][i][k] * b[t][k][..]`.
///
/// # Safety
/// The CPU has AVX-512F. `a` holds `taps * MR` row pointers (tap-major, the first `R` of
/// each tap used), each valid for `a_off + kc` reads; `b` holds `taps * kc * NR` packed
/// weights; `e` is valid for `NR` and its first `R` rows.
#[target_feature(enable = "avx512f")]
pub unsafe fn dense<const R: usize>(
    a: &[*const f32],
    a_off: usize,
    taps: usize,
    kc: usize,
    b: *const f32,
    e: &Epilogue,
) {
    // SAFETY: the caller's contract bounds every read; `finish` gets NR = 2 vectors.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let mut bp = b;
        let mut prefetched = 0;
        for t in 0..taps {
            let mut p = [std::ptr::null::<f32>(); R];
            for (i, p) in p.iter_mut().enumerate() {
                *p = a[t * MR + i].add(a_off);
            }
            for k in 0..kc {
                e.prefetch_next::<2>(&mut prefetched, R);
                _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(PREFETCH) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(PREFETCH + LANES) as *const i8);
                let b0 = _mm512_loadu_ps(bp);
                let b1 = _mm512_loadu_ps(bp.add(LANES));
                bp = bp.add(NR);
                for i in 0..R {
                    let x = _mm512_set1_ps(*p[i].add(k));
                    acc[i][0] = _mm512_fmadd_ps(x, b0, acc[i][0]);
                    acc[i][1] = _mm512_fmadd_ps(x, b1, acc[i][1]);
                }
            }
        }
        e.finish::<2, R>(&acc);
    }
}

/// [`dense`] for a tile whose first `rows` rows are wanted (the rest may be computed
/// into `e`'s rows anyway): the smallest kernel height that covers them.
///
/// # Safety
/// As [`dense`] with `R = MR`.
#[inline(always)]
pub unsafe fn dense_rows(
    rows: usize,
    a: &[*const f32],
    a_off: usize,
    taps: usize,
    kc: usize,
    b: *const f32,
    e: &Epilogue,
) {
    // SAFETY: each height reads and writes a prefix of what `R = MR` would.
    unsafe {
        match rows {
            1 => dense::<1>(a, a_off, taps, kc, b, e),
            2 => dense::<2>(a, a_off, taps, kc, b, e),
            3..=4 => dense::<4>(a, a_off, taps, kc, b, e),
            5..=8 => dense::<8>(a, a_off, taps, kc, b, e),
            _ => dense::<MR>(a, a_off, taps, kc, b, e),
        }
    }
}

/// A tile of a grouped convolution whose groups are narrower than a vector (`ipg` of 4,
/// 8 or 16 channels, in = out per group): one vector of 16 output channels spans
/// `16 / ipg` groups, whose inputs are the same 16 channels of each pixel. Each lane
/// picks its group's input channel with a permute, so a block of groups is one FMA per
/// (tap, channel) instead of a tiny GEMM per group. Groups of exactly 16 need no permute:
/// every lane takes the same channel, broadcast straight from memory, which keeps the
/// shuffle port (one permute per cycle, half the FMA rate) out of the loop.
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
        let mut prefetched = 0;
        if ipg == LANES {
            for t in 0..taps {
                let mut p = [std::ptr::null::<f32>(); MR];
                for (i, p) in p.iter_mut().enumerate() {
                    *p = a[t * MR + i].add(a_off);
                }
                for c in 0..LANES {
                    e.prefetch_next::<1>(&mut prefetched, MR);
                    let w = _mm512_loadu_ps(bp);
                    bp = bp.add(LANES);
                    for i in 0..MR {
                        let x = _mm512_set1_ps(*p[i].add(c));
                        acc[i][0] = _mm512_fmadd_ps(x, w, acc[i][0]);
                    }
                }
            }
            e.finish::<1, MR>(&acc);
            return;
        }
        for t in 0..taps {
            let mut x = [_mm512_setzero_ps(); MR];
            for (i, x) in x.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(a[t * MR + i].add(a_off));
            }
            for c in 0..ipg {
                e.prefetch_next::<1>(&mut prefetched, MR);
                let w = _mm512_loadu_ps(bp);
                bp = bp.add(LANES);
                let idx = _mm512_add_epi32(group_start, _mm512_set1_epi32(c as i32));
                for i in 0..MR {
                    let xi = _mm512_permutexvar_ps(idx, x[i]);
                    acc[i][0] = _mm512_fmadd_ps(xi, w, acc[i][0]);
                }
            }
        }
        e.finish::<1, MR>(&acc);
    }
}

/// Winograd F(2x2, 3x3) input transform `V = Bt d B` of one 4x4 input tile, 16 channels
/// at a time: `d[r][c]` points at the tile's pixel (row r, column c), or at zeros outside
/// the image; `V[xi]` goes to `v + xi * v_stride`.
///
/// # Safety
/// The CPU has AVX-512F; each `d` pointer is valid for `channels` reads, each of the 16
/// `v` rows for `channels` writes; `channels` is a multiple of 16.
#[target_feature(enable = "avx512f")]
pub unsafe fn winograd_input(
    d: &[[*const f32; 4]; 4],
    channels: usize,
    v: *mut f32,
    v_stride: usize,
) {
    // SAFETY: the caller's contract bounds every access.
    unsafe {
        for cb in (0..channels).step_by(LANES) {
            let mut t = [[_mm512_setzero_ps(); 4]; 4];
            for c in 0..4 {
                let d0 = _mm512_loadu_ps(d[0][c].add(cb));
                let d1 = _mm512_loadu_ps(d[1][c].add(cb));
                let d2 = _mm512_loadu_ps(d[2][c].add(cb));
                let d3 = _mm512_loadu_ps(d[3][c].add(cb));
                t[0][c] = _mm512_sub_ps(d0, d2);
                t[1][c] = _mm512_add_ps(d1, d2);
                t[2][c] = _mm512_sub_ps(d2, d1);
                t[3][c] = _mm512_sub_ps(d1, d3);
            }
            for (r, t) in t.iter().enumerate() {
                let out = [
                    _mm512_sub_ps(t[0], t[2]),
                    _mm512_add_ps(t[1], t[2]),
                    _mm512_sub_ps(t[2], t[1]),
                    _mm512_sub_ps(t[1], t[3]),
                ];
                for (c, o) in out.into_iter().enumerate() {
                    _mm512_storeu_ps(v.add((r * 4 + c) * v_stride + cb), o);
                }
            }
        }
    }
}

/// Winograd F(2x2, 3x3) output transform `Y = At M A` of one tile, 16 channels at a
/// time, with bias, shortcut and ReLU: `m` holds `M[xi]` at `m + xi * m_stride`;
/// `y[a][b]` is the output pixel (row a, column b) or `None` outside the image, and
/// `residual[a][b]` its shortcut.
///
/// # Safety
/// The CPU has AVX-512F; `m` rows, `bias` and every `y`/`residual` pointer are valid for
/// `channels` values; `channels` is a multiple of 16.
#[target_feature(enable = "avx512f")]
pub unsafe fn winograd_output(
    m: *const f32,
    m_stride: usize,
    channels: usize,
    bias: *const f32,
    y: &[[Option<*mut f32>; 2]; 2],
    residual: Option<&[[*const f32; 2]; 2]>,
    relu: bool,
) {
    // SAFETY: the caller's contract bounds every access.
    unsafe {
        let zero = _mm512_setzero_ps();
        for cb in (0..channels).step_by(LANES) {
            let (mut top, mut bottom) = ([zero; 4], [zero; 4]);
            for (c, (top, bottom)) in top.iter_mut().zip(bottom.iter_mut()).enumerate() {
                let at = |r: usize| _mm512_loadu_ps(m.add((r * 4 + c) * m_stride + cb));
                let (m0, m1, m2, m3) = (at(0), at(1), at(2), at(3));
                *top = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
                *bottom = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
            }
            let b = _mm512_loadu_ps(bias.add(cb));
            for (a, s) in [top, bottom].iter().enumerate() {
                let out = [
                    _mm512_add_ps(_mm512_add_ps(s[0], s[1]), s[2]),
                    _mm512_sub_ps(_mm512_sub_ps(s[1], s[2]), s[3]),
                ];
                for (col, mut v) in out.into_iter().enumerate() {
                    let Some(dst) = y[a][col] else { continue };
                    v = _mm512_add_ps(v, b);
                    if let Some(r) = residual {
                        v = _mm512_add_ps(v, _mm512_loadu_ps(r[a][col].add(cb)));
                    }
                    if relu {
                        v = _mm512_max_ps(v, zero);
                    }
                    _mm512_storeu_ps(dst.add(cb), v);
                }
            }
        }
    }
}

/// `dst = max over windows` (each window as long as `dst`), 16 channels at a time with
/// the running max in a register; a NaN in a window is skipped, as a comparison-based
/// pool does.
///
/// # Safety
/// The CPU has AVX-512F; `windows` is not empty; `dst.len()` is a multiple of 16 and
/// every window at least as long.
#[target_feature(enable = "avx512f")]
pub unsafe fn max_of(dst: &mut [f32], windows: &[&[f32]]) {
    // SAFETY: the caller's contract bounds every access.
    unsafe {
        for cb in (0..dst.len()).step_by(LANES) {
            let mut m = _mm512_loadu_ps(windows[0].as_ptr().add(cb));
            for w in &windows[1..] {
                m = _mm512_max_ps(_mm512_loadu_ps(w.as_ptr().add(cb)), m);
            }
            _mm512_storeu_ps(dst.as_mut_ptr().add(cb), m);
        }
    }
}

/// The AVX-512F kernels above, for [`super::direct`] and [`super::winograd`].
#[derive(Debug, Clone, Copy)]
pub struct Avx512;

impl Isa for Avx512 {
    const NAME: &'static str = "avx512-direct";
    const MR: usize = MR;
    const NR: usize = NR;
    const LANES: usize = LANES;

    fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
    }

    fn narrow_takes(ipg: usize) -> bool {
        ipg > 0 && LANES.is_multiple_of(ipg)
    }

    #[inline(always)]
    unsafe fn dense_rows(
        rows: usize,
        a: &[*const f32],
        a_off: usize,
        taps: usize,
        kc: usize,
        b: *const f32,
        e: &Epilogue,
    ) {
        // SAFETY: the trait's contract is `dense_rows`'s.
        unsafe { dense_rows(rows, a, a_off, taps, kc, b, e) }
    }

    #[inline(always)]
    unsafe fn narrow(
        a: &[*const f32],
        a_off: usize,
        taps: usize,
        ipg: usize,
        b: *const f32,
        e: &Epilogue,
    ) {
        // SAFETY: the trait's contract is `narrow`'s.
        unsafe { narrow(a, a_off, taps, ipg, b, e) }
    }

    #[inline(always)]
    unsafe fn winograd_input(
        d: &[[*const f32; 4]; 4],
        channels: usize,
        v: *mut f32,
        v_stride: usize,
    ) {
        // SAFETY: the trait's contract is `winograd_input`'s.
        unsafe { winograd_input(d, channels, v, v_stride) }
    }

    #[inline(always)]
    unsafe fn winograd_output(
        m: *const f32,
        m_stride: usize,
        channels: usize,
        bias: *const f32,
        y: &[[Option<*mut f32>; 2]; 2],
        residual: Option<&[[*const f32; 2]; 2]>,
        relu: bool,
    ) {
        // SAFETY: the trait's contract is `winograd_output`'s.
        unsafe { winograd_output(m, m_stride, channels, bias, y, residual, relu) }
    }

    #[inline(always)]
    unsafe fn max_of(dst: &mut [f32], windows: &[&[f32]]) {
        // SAFETY: the trait's contract is `max_of`'s.
        unsafe { max_of(dst, windows) }
    }
}
