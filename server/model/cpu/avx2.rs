//! The AVX2 + FMA microkernels behind [`super::direct`], for the x86-64 CPUs without
//! AVX-512 (AMD Zen 1-3, Intel client parts and older servers). The same indirect
//! convolution as [`super::avx512`]: one pointer per (tap, pixel) into the NHWC input,
//! the whole sum of a tile in registers, bias, shortcut and ReLU applied on the way out.
//!
//! The tile is sized for 16 ymm registers: 6 pixels by 16 output channels is 12
//! accumulators, two weight vectors and one broadcast input (the 6x16 shape of BLIS's
//! Haswell kernel; ONNX Runtime's AVX2 NCHWc kernels hold 12 accumulators as well, as 3
//! outputs by 4 blocks of 8). Per input channel a step is 12 FMAs for 8 loads, within
//! what two load ports feed while two FMA pipes stay busy.

use std::arch::x86_64::*;

use super::isa::{Epilogue, Isa, MAX_MR, MAX_NR};

/// Output pixels per tile.
pub const MR: usize = 6;
/// Output channels per dense tile: two vectors.
pub const NR: usize = 16;
/// f32 lanes in one vector.
pub const LANES: usize = 8;
const _: () = assert!(MR <= MAX_MR && NR <= MAX_NR);

/// How far ahead (in values) the dense kernel prefetches its weights: one 64-byte line
/// per step, 32 steps ahead.
const PREFETCH: usize = 512;

/// Asks for tile row `*next`'s output (for writing) and shortcut (for reading) ahead of
/// the epilogue, one row per inner step, so the misses overlap the FMAs (as in
/// [`super::avx512`]). `prefetchw` is a hint: CPUs without it (before Broadwell) decode
/// it as a no-op.
///
/// # Safety
/// Prefetches never fault, so the pointers need not be valid.
#[inline(always)]
unsafe fn prefetch_next<const V: usize>(e: &Epilogue, next: &mut usize, rows: usize) {
    if *next >= rows {
        return;
    }
    let i = *next;
    *next += 1;
    // One line holds two vectors.
    for v in (0..V).step_by(2) {
        let out = e.out[i].wrapping_add(v * LANES);
        // SAFETY: a prefetch touches no architectural state and never faults.
        unsafe {
            std::arch::asm!("prefetchw byte ptr [{0}]", in(reg) out,
                options(nostack, preserves_flags, readonly));
            if let Some(r) = &e.residual {
                _mm_prefetch::<_MM_HINT_T0>(r[i].wrapping_add(v * LANES) as *const i8);
            }
        }
    }
}

/// Bias, shortcut and ReLU on `R` rows of `V` vectors, stored.
///
/// # Safety
/// AVX2 is available; `bias`, and every `out`/`residual` row of `e`'s first `R`, hold at
/// least `V * LANES` values.
#[inline(always)]
unsafe fn finish<const V: usize, const R: usize>(e: &Epilogue, acc: &[[__m256; V]; R]) {
    // SAFETY: the caller's contract covers every pointer read or written here.
    unsafe {
        let zero = _mm256_setzero_ps();
        let mut bias = [zero; V];
        for (v, b) in bias.iter_mut().enumerate() {
            *b = _mm256_loadu_ps(e.bias.add(v * LANES));
        }
        for (i, acc) in acc.iter().enumerate() {
            for v in 0..V {
                let mut y = _mm256_add_ps(acc[v], bias[v]);
                if let Some(r) = &e.residual {
                    y = _mm256_add_ps(y, _mm256_loadu_ps(r[i].add(v * LANES)));
                }
                if e.relu {
                    y = _mm256_max_ps(y, zero);
                }
                _mm256_storeu_ps(e.out[i].add(v * LANES), y);
            }
        }
    }
}

/// A dense tile of `R x NR` outputs (`R <= MR`).
///
/// # Safety
/// The CPU has AVX2 and FMA; otherwise as [`Isa::dense_rows`] with `rows = R`.
#[target_feature(enable = "avx2,fma")]
unsafe fn dense<const R: usize>(
    a: &[*const f32],
    a_off: usize,
    taps: usize,
    kc: usize,
    b: *const f32,
    e: &Epilogue,
) {
    // SAFETY: the caller's contract bounds every read; `finish` gets NR = 2 vectors.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let mut bp = b;
        let mut prefetched = 0;
        for t in 0..taps {
            let mut p = [std::ptr::null::<f32>(); R];
            for (i, p) in p.iter_mut().enumerate() {
                *p = a[t * MR + i].add(a_off);
            }
            for k in 0..kc {
                prefetch_next::<2>(e, &mut prefetched, R);
                _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(PREFETCH) as *const i8);
                let b0 = _mm256_loadu_ps(bp);
                let b1 = _mm256_loadu_ps(bp.add(LANES));
                bp = bp.add(NR);
                for i in 0..R {
                    let x = _mm256_broadcast_ss(&*p[i].add(k));
                    acc[i][0] = _mm256_fmadd_ps(x, b0, acc[i][0]);
                    acc[i][1] = _mm256_fmadd_ps(x, b1, acc[i][1]);
                }
            }
        }
        finish::<2, R>(e, &acc);
    }
}

/// Broadcasts element `$c` of each 128-bit half of `$x` (an in-lane shuffle: one cheap
/// uop, where a lane-crossing permute costs more on Zen).
macro_rules! splat_in_halves {
    ($x:expr, 0) => {
        _mm256_permute_ps::<0x00>($x)
    };
    ($x:expr, 1) => {
        _mm256_permute_ps::<0x55>($x)
    };
    ($x:expr, 2) => {
        _mm256_permute_ps::<0xAA>($x)
    };
    ($x:expr, 3) => {
        _mm256_permute_ps::<0xFF>($x)
    };
}

/// A narrow-group tile, as [`Isa::narrow`]: groups of 8 are one vector each, every lane
/// takes the same input channel, broadcast from memory; groups of 4 are the two halves
/// of a vector, so each lane's channel is an in-lane shuffle of the 8 loaded inputs.
///
/// # Safety
/// The CPU has AVX2 and FMA; `ipg` is 4 or 8; otherwise as [`Isa::narrow`].
#[target_feature(enable = "avx2,fma")]
unsafe fn narrow(
    a: &[*const f32],
    a_off: usize,
    taps: usize,
    ipg: usize,
    b: *const f32,
    e: &Epilogue,
) {
    // SAFETY: the caller's contract bounds every read; `finish` gets 1 vector.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 1]; MR];
        let mut bp = b;
        let mut prefetched = 0;
        if ipg == LANES {
            for t in 0..taps {
                let mut p = [std::ptr::null::<f32>(); MR];
                for (i, p) in p.iter_mut().enumerate() {
                    *p = a[t * MR + i].add(a_off);
                }
                for c in 0..LANES {
                    prefetch_next::<1>(e, &mut prefetched, MR);
                    let w = _mm256_loadu_ps(bp);
                    bp = bp.add(LANES);
                    for i in 0..MR {
                        let x = _mm256_broadcast_ss(&*p[i].add(c));
                        acc[i][0] = _mm256_fmadd_ps(x, w, acc[i][0]);
                    }
                }
            }
            finish::<1, MR>(e, &acc);
            return;
        }
        debug_assert_eq!(ipg, 4);
        for t in 0..taps {
            let mut x = [_mm256_setzero_ps(); MR];
            for (i, x) in x.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(a[t * MR + i].add(a_off));
            }
            prefetch_next::<1>(e, &mut prefetched, MR);
            macro_rules! step {
                ($c:tt) => {
                    let w = _mm256_loadu_ps(bp.add($c * LANES));
                    for i in 0..MR {
                        let xi = splat_in_halves!(x[i], $c);
                        acc[i][0] = _mm256_fmadd_ps(xi, w, acc[i][0]);
                    }
                };
            }
            step!(0);
            step!(1);
            step!(2);
            step!(3);
            bp = bp.add(4 * LANES);
        }
        finish::<1, MR>(e, &acc);
    }
}

/// Winograd F(2x2, 3x3) input transform `V = Bt d B`, 8 channels at a time.
///
/// # Safety
/// The CPU has AVX2; otherwise as [`Isa::winograd_input`].
#[target_feature(enable = "avx2,fma")]
unsafe fn winograd_input(d: &[[*const f32; 4]; 4], channels: usize, v: *mut f32, v_stride: usize) {
    // SAFETY: the caller's contract bounds every access.
    unsafe {
        for cb in (0..channels).step_by(LANES) {
            let mut t = [[_mm256_setzero_ps(); 4]; 4];
            for c in 0..4 {
                let d0 = _mm256_loadu_ps(d[0][c].add(cb));
                let d1 = _mm256_loadu_ps(d[1][c].add(cb));
                let d2 = _mm256_loadu_ps(d[2][c].add(cb));
                let d3 = _mm256_loadu_ps(d[3][c].add(cb));
                t[0][c] = _mm256_sub_ps(d0, d2);
                t[1][c] = _mm256_add_ps(d1, d2);
                t[2][c] = _mm256_sub_ps(d2, d1);
                t[3][c] = _mm256_sub_ps(d1, d3);
            }
            for (r, t) in t.iter().enumerate() {
                let out = [
                    _mm256_sub_ps(t[0], t[2]),
                    _mm256_add_ps(t[1], t[2]),
                    _mm256_sub_ps(t[2], t[1]),
                    _mm256_sub_ps(t[1], t[3]),
                ];
                for (c, o) in out.into_iter().enumerate() {
                    _mm256_storeu_ps(v.add((r * 4 + c) * v_stride + cb), o);
                }
            }
        }
    }
}

/// Winograd F(2x2, 3x3) output transform `Y = At M A`, 8 channels at a time, with bias,
/// shortcut and ReLU.
///
/// # Safety
/// The CPU has AVX2; otherwise as [`Isa::winograd_output`].
#[target_feature(enable = "avx2,fma")]
unsafe fn winograd_output(
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
        let zero = _mm256_setzero_ps();
        for cb in (0..channels).step_by(LANES) {
            let (mut top, mut bottom) = ([zero; 4], [zero; 4]);
            for (c, (top, bottom)) in top.iter_mut().zip(bottom.iter_mut()).enumerate() {
                let at = |r: usize| _mm256_loadu_ps(m.add((r * 4 + c) * m_stride + cb));
                let (m0, m1, m2, m3) = (at(0), at(1), at(2), at(3));
                *top = _mm256_add_ps(_mm256_add_ps(m0, m1), m2);
                *bottom = _mm256_sub_ps(_mm256_sub_ps(m1, m2), m3);
            }
            let b = _mm256_loadu_ps(bias.add(cb));
            for (a, s) in [top, bottom].iter().enumerate() {
                let out = [
                    _mm256_add_ps(_mm256_add_ps(s[0], s[1]), s[2]),
                    _mm256_sub_ps(_mm256_sub_ps(s[1], s[2]), s[3]),
                ];
                for (col, mut v) in out.into_iter().enumerate() {
                    let Some(dst) = y[a][col] else { continue };
                    v = _mm256_add_ps(v, b);
                    if let Some(r) = residual {
                        v = _mm256_add_ps(v, _mm256_loadu_ps(r[a][col].add(cb)));
                    }
                    if relu {
                        v = _mm256_max_ps(v, zero);
                    }
                    _mm256_storeu_ps(dst.add(cb), v);
                }
            }
        }
    }
}

/// `dst = max over windows`, 8 channels at a time with the running max in a register.
/// `maxps` returns its second operand when either is NaN, so the running max (second)
/// survives a NaN in a window, as a comparison-based pool skips it.
///
/// # Safety
/// The CPU has AVX2; otherwise as [`Isa::max_of`].
#[target_feature(enable = "avx2,fma")]
unsafe fn max_of(dst: &mut [f32], windows: &[&[f32]]) {
    // SAFETY: the caller's contract bounds every access.
    unsafe {
        for cb in (0..dst.len()).step_by(LANES) {
            let mut m = _mm256_loadu_ps(windows[0].as_ptr().add(cb));
            for w in &windows[1..] {
                m = _mm256_max_ps(_mm256_loadu_ps(w.as_ptr().add(cb)), m);
            }
            _mm256_storeu_ps(dst.as_mut_ptr().add(cb), m);
        }
    }
}

/// The AVX2 + FMA kernels above, for [`super::direct`] and [`super::winograd`].
#[derive(Debug, Clone, Copy)]
pub struct Avx2;

impl Isa for Avx2 {
    const NAME: &'static str = "avx2-direct";
    const MR: usize = MR;
    const NR: usize = NR;
    const LANES: usize = LANES;

    fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }

    fn narrow_takes(ipg: usize) -> bool {
        ipg == 4 || ipg == LANES
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
        // SAFETY: each height reads and writes a prefix of what `R = MR` would; the
        // trait's contract covers the rest.
        unsafe {
            match rows {
                1 => dense::<1>(a, a_off, taps, kc, b, e),
                2 => dense::<2>(a, a_off, taps, kc, b, e),
                3 => dense::<3>(a, a_off, taps, kc, b, e),
                4 => dense::<4>(a, a_off, taps, kc, b, e),
                _ => dense::<MR>(a, a_off, taps, kc, b, e),
            }
        }
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
        // SAFETY: `DirectConv` only builds a narrow form for `narrow_takes` groups; the
        // trait's contract covers the rest.
        unsafe { narrow(a, a_off, taps, ipg, b, e) }
    }

    #[inline(always)]
    unsafe fn winograd_input(
        d: &[[*const f32; 4]; 4],
        channels: usize,
        v: *mut f32,
        v_stride: usize,
    ) {
        // SAFETY: the trait's contract.
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
        // SAFETY: the trait's contract.
        unsafe { winograd_output(m, m_stride, channels, bias, y, residual, relu) }
    }

    #[inline(always)]
    unsafe fn max_of(dst: &mut [f32], windows: &[&[f32]]) {
        // SAFETY: the trait's contract.
        unsafe { max_of(dst, windows) }
    }
}
