//! What [`super::direct`] and [`super::winograd`] need from a vector instruction set:
//! the tile sizes and the microkernels. [`super::avx512`] (16 lanes, a 14 x 32 tile in
//! 32 zmm registers) and [`super::avx2`] (8 lanes, a 6 x 16 tile in 16 ymm registers)
//! implement it, so the packing, tiling, threading and Winograd transforms around the
//! kernels are written once and compiled once per instruction set.

/// The largest tile height of any implementation: arrays of tile rows are this long and
/// an implementation uses the first [`Isa::MR`].
pub const MAX_MR: usize = 14;
/// The largest dense block width of any implementation.
pub const MAX_NR: usize = 32;

/// Where a tile's results go, and what is fused into them.
pub struct Epilogue {
    /// The block's first bias value.
    pub bias: *const f32,
    /// One pointer per tile row to its first output value (the first [`Isa::MR`] used).
    pub out: [*mut f32; MAX_MR],
    /// Per tile row, the shortcut values added before the ReLU.
    pub residual: Option<[*const f32; MAX_MR]>,
    pub relu: bool,
}

/// A vector instruction set's kernels. Every `unsafe fn` here requires that
/// [`Isa::available`] returned true on this CPU, on top of its own contract.
pub trait Isa: Copy + Send + Sync + std::fmt::Debug + 'static {
    /// The name [`super::CpuConv::implementation`] reports.
    const NAME: &'static str;
    /// Output pixels per tile (at most [`MAX_MR`]).
    const MR: usize;
    /// Output channels per dense tile (at most [`MAX_NR`]).
    const NR: usize;
    /// f32 lanes in one vector.
    const LANES: usize;

    /// Whether this CPU runs these kernels.
    fn available() -> bool;

    /// Whether [`Isa::narrow`] takes groups of `ipg` channels.
    fn narrow_takes(ipg: usize) -> bool;

    /// A dense tile of which the first `rows` rows are wanted:
    /// `sum over taps t, channels k of a[t][i][k] * b[t][k][..NR]`, then the epilogue.
    ///
    /// # Safety
    /// `a` holds `taps * MR` row pointers (tap-major), each valid for `a_off + kc` reads;
    /// `b` holds `taps * kc * NR` packed weights; `e` is valid for `NR` values and its
    /// first `MR` rows (scratch rows past `rows`).
    unsafe fn dense_rows(
        rows: usize,
        a: &[*const f32],
        a_off: usize,
        taps: usize,
        kc: usize,
        b: *const f32,
        e: &Epilogue,
    );

    /// A tile of a grouped convolution of narrow groups (`ipg` in = out channels per
    /// group, [`Isa::narrow_takes`]): one vector of `LANES` output channels.
    ///
    /// # Safety
    /// `a` holds `taps * MR` row pointers, each valid for `a_off + LANES` reads; `b`
    /// holds `taps * ipg * LANES` packed weights; `e` is valid for `LANES` and `MR` rows.
    unsafe fn narrow(
        a: &[*const f32],
        a_off: usize,
        taps: usize,
        ipg: usize,
        b: *const f32,
        e: &Epilogue,
    );

    /// Winograd F(2x2, 3x3) input transform of one 4x4 tile.
    ///
    /// # Safety
    /// Each `d` pointer is valid for `channels` reads, each of the 16 `v` rows for
    /// `channels` writes; `channels` is a multiple of `LANES`.
    unsafe fn winograd_input(
        d: &[[*const f32; 4]; 4],
        channels: usize,
        v: *mut f32,
        v_stride: usize,
    );

    /// Winograd F(2x2, 3x3) output transform of one tile, with bias, shortcut and ReLU.
    ///
    /// # Safety
    /// `m` rows, `bias` and every `y`/`residual` pointer are valid for `channels` values;
    /// `channels` is a multiple of `LANES`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn winograd_output(
        m: *const f32,
        m_stride: usize,
        channels: usize,
        bias: *const f32,
        y: &[[Option<*mut f32>; 2]; 2],
        residual: Option<&[[*const f32; 2]; 2]>,
        relu: bool,
    );

    /// `dst = max over windows`, NaN skipped as a comparison-based pool does.
    ///
    /// # Safety
    /// `windows` is not empty; `dst.len()` is a multiple of `LANES` and every window at
    /// least as long.
    unsafe fn max_of(dst: &mut [f32], windows: &[&[f32]]);
}
