//! The CPU path: NHWC activations and convolutions on weights packed once at load, with
//! bias, shortcut and ReLU fused into the convolution. Three implementations sit behind
//! [`CpuConv`]:
//!
//! - [`direct`]: kernels that read the activations in place (no im2col) and keep each
//!   output in registers until bias, shortcut and ReLU are applied; grouped convolutions
//!   of narrow groups (ResNeXt) get a kernel of their own. Written once over an [`isa`]
//!   and compiled for [`avx512`] and for [`avx2`] (with FMA).
//! - [`gemm`]: GEMMs on the `gemm` crate, the portable path (CPUs without AVX2, other
//!   architectures such as aarch64) and any shape the direct kernels do not cover.
//!
//! [`pool`] holds the layers around them (layout change, max and average pools).
//!
//! The choice is made per convolution at load ([`CpuKernels`]): by default the best the
//! CPU supports, detected at run time so one binary serves every x86-64 machine;
//! `RESNET_SERVE_CPU_KERNELS` forces one.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod direct;
mod gemm;
#[cfg(target_arch = "x86_64")]
mod isa;
mod pool;
#[cfg(target_arch = "x86_64")]
mod winograd;

pub use pool::{global_avg_pool, max_pool_3x3_s2, to_nhwc};

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::sync::OnceLock;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

#[cfg(target_arch = "x86_64")]
use isa::Isa;

use super::layers::FoldedConv;

/// The variable that forces a [`CpuKernels`] choice for the whole process.
pub const CPU_KERNELS_ENV: &str = "RESNET_SERVE_CPU_KERNELS";

/// Which kernels run the CPU convolutions (and pools): `auto` picks, per convolution,
/// the fastest implementation the CPU supports that covers its shape; the others force
/// one instruction set (shapes its direct kernels do not cover run on `gemm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CpuKernels {
    Auto,
    /// The AVX-512F direct kernels.
    Avx512,
    /// The AVX2 + FMA direct kernels.
    Avx2,
    /// GEMMs on the `gemm` crate: the portable path.
    Gemm,
}

/// A [`CpuKernels`] choice that cannot be honoured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelChoiceError {
    #[error("{CPU_KERNELS_ENV}={0:?}: expected auto, avx512, avx2 or gemm")]
    Unknown(String),
    #[error("{CPU_KERNELS_ENV}={chosen}: this CPU lacks {missing}; it supports: {supported}")]
    Unsupported {
        chosen: &'static str,
        missing: &'static str,
        supported: String,
    },
}

thread_local! {
    /// A choice made for this thread by [`CpuKernels::scope`] (tests and benchmarks
    /// compare implementations in one process).
    static SCOPED: Cell<Option<CpuKernels>> = const { Cell::new(None) };
    /// Counts of implementations chosen on this thread inside [`count_implementations`].
    static TALLY: RefCell<Option<BTreeMap<&'static str, usize>>> = const { RefCell::new(None) };
}

impl CpuKernels {
    /// The choices that name one implementation, fastest first.
    pub const CONCRETE: [CpuKernels; 3] = [CpuKernels::Avx512, CpuKernels::Avx2, CpuKernels::Gemm];

    pub fn name(self) -> &'static str {
        match self {
            CpuKernels::Auto => "auto",
            CpuKernels::Avx512 => "avx512",
            CpuKernels::Avx2 => "avx2",
            CpuKernels::Gemm => "gemm",
        }
    }

    pub fn parse(s: &str) -> std::result::Result<Self, KernelChoiceError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(CpuKernels::Auto),
            "avx512" => Ok(CpuKernels::Avx512),
            "avx2" => Ok(CpuKernels::Avx2),
            "gemm" => Ok(CpuKernels::Gemm),
            _ => Err(KernelChoiceError::Unknown(s.to_string())),
        }
    }

    /// What this CPU must have for the choice, or `None` if it runs anywhere.
    fn requirement(self) -> Option<&'static str> {
        match self {
            CpuKernels::Avx512 => Some("AVX-512F"),
            CpuKernels::Avx2 => Some("AVX2 and FMA"),
            CpuKernels::Auto | CpuKernels::Gemm => None,
        }
    }

    /// Whether this CPU (and this build's architecture) runs the choice.
    pub fn runs_here(self) -> bool {
        match self {
            CpuKernels::Auto | CpuKernels::Gemm => true,
            #[cfg(target_arch = "x86_64")]
            CpuKernels::Avx512 => avx512::Avx512::available(),
            #[cfg(target_arch = "x86_64")]
            CpuKernels::Avx2 => avx2::Avx2::available(),
            #[cfg(not(target_arch = "x86_64"))]
            CpuKernels::Avx512 | CpuKernels::Avx2 => false,
        }
    }

    /// The implementations this CPU runs, fastest first (`gemm` always).
    pub fn supported() -> Vec<CpuKernels> {
        Self::CONCRETE
            .into_iter()
            .filter(|k| k.runs_here())
            .collect()
    }

    /// `self`, or why this CPU cannot honour it.
    pub fn check(self) -> std::result::Result<Self, KernelChoiceError> {
        match self.requirement() {
            Some(missing) if !self.runs_here() => Err(KernelChoiceError::Unsupported {
                chosen: self.name(),
                missing,
                supported: std::iter::once("auto")
                    .chain(Self::supported().into_iter().map(|k| k.name()))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
            _ => Ok(self),
        }
    }

    /// The process's choice: `RESNET_SERVE_CPU_KERNELS`, read once (unset is `auto`).
    pub fn from_env() -> std::result::Result<Self, KernelChoiceError> {
        static CHOICE: OnceLock<std::result::Result<CpuKernels, KernelChoiceError>> =
            OnceLock::new();
        CHOICE
            .get_or_init(|| {
                let raw = std::env::var(CPU_KERNELS_ENV).unwrap_or_default();
                CpuKernels::parse(&raw)?.check()
            })
            .clone()
    }

    /// The choice in force on this thread: a [`CpuKernels::scope`]'s, else the process's.
    pub fn current() -> std::result::Result<Self, KernelChoiceError> {
        match SCOPED.get() {
            Some(k) => Ok(k),
            None => Self::from_env(),
        }
    }

    /// Runs `f` with `self` in force on this thread (models loaded and pools run inside
    /// use it), or refuses a choice this CPU cannot honour.
    pub fn scope<R>(self, f: impl FnOnce() -> R) -> std::result::Result<R, KernelChoiceError> {
        self.check()?;
        let before = SCOPED.replace(Some(self));
        // Restores the outer choice even if `f` panics.
        struct Restore(Option<CpuKernels>);
        impl Drop for Restore {
            fn drop(&mut self) {
                SCOPED.set(self.0);
            }
        }
        let _restore = Restore(before);
        Ok(f())
    }
}

/// Runs `f` (a model's load) and counts the convolutions built inside it on this thread
/// by implementation name: what start-up logs and `GetModel` report.
pub fn count_implementations<R>(f: impl FnOnce() -> R) -> (R, BTreeMap<&'static str, usize>) {
    let before = TALLY.replace(Some(BTreeMap::new()));
    let out = f();
    let counts = TALLY.replace(before).unwrap_or_default();
    (out, counts)
}

/// `counts` as one short line: `avx2-direct=49 gemm=5`.
pub fn describe_counts(counts: &BTreeMap<&'static str, usize>) -> String {
    counts
        .iter()
        .map(|(k, n)| format!("{k}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
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
    Avx512(direct::DirectConv<avx512::Avx512>),
    #[cfg(target_arch = "x86_64")]
    Avx2(direct::DirectConv<avx2::Avx2>),
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
    /// `c` on the implementation the thread's choice ([`CpuKernels::current`]) picks.
    pub fn try_new(c: FoldedConv) -> Result<Self> {
        let which = CpuKernels::current().map_err(candle_core::Error::wrap)?;
        Self::with_kernels(c, which)
    }

    /// `c` on the implementation `which` picks for its shape: the direct kernels of the
    /// chosen instruction set (for `auto`, the fastest this CPU runs) where they cover
    /// it, else GEMMs. A choice this CPU cannot run is an error.
    pub fn with_kernels(c: FoldedConv, which: CpuKernels) -> Result<Self> {
        let which = which.check().map_err(candle_core::Error::wrap)?;
        let geo = Geometry::of(&c);
        let plan = Self::plan(&c, which);
        let conv = CpuConv { plan, geo };
        TALLY.with_borrow_mut(|t| {
            if let Some(t) = t {
                *t.entry(conv.implementation()).or_default() += 1;
            }
        });
        Ok(conv)
    }

    fn plan(c: &FoldedConv, which: CpuKernels) -> Plan {
        #[cfg(target_arch = "x86_64")]
        {
            use CpuKernels::{Auto, Avx2, Avx512};
            if matches!(which, Auto | Avx512) && avx512::Avx512::available() {
                if let Some(d) = direct::DirectConv::new(c) {
                    return Plan::Avx512(d);
                }
            }
            if matches!(which, Auto | Avx2) && avx2::Avx2::available() {
                if let Some(d) = direct::DirectConv::new(c) {
                    return Plan::Avx2(d);
                }
            }
        }
        let _ = which;
        Plan::Gemm(gemm::GemmConv::new(c))
    }

    /// Which implementation this convolution runs on.
    pub fn implementation(&self) -> &'static str {
        match self.plan {
            #[cfg(target_arch = "x86_64")]
            Plan::Avx512(_) => avx512::Avx512::NAME,
            #[cfg(target_arch = "x86_64")]
            Plan::Avx2(_) => avx2::Avx2::NAME,
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
            Plan::Avx512(d) => d.run(x, dims, residual, relu)?,
            #[cfg(target_arch = "x86_64")]
            Plan::Avx2(d) => d.run(x, dims, residual, relu)?,
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
        // Inputs too wide for a full tile's rows to stay in L1: 8-row tiles on AVX-512
        // (1024 channels), 4-row tiles on both (2048).
        Case {
            name: "1x1 of 1024 in",
            oik: [64, 1024, 1],
            stride: 1,
            padding: 0,
            groups: 1,
            input: [2, 3, 5],
        },
        Case {
            name: "1x1 s2 of 1024 in",
            oik: [64, 1024, 1],
            stride: 2,
            padding: 0,
            groups: 1,
            input: [1, 7, 7],
        },
        Case {
            name: "1x1 of 2048 in",
            oik: [32, 2048, 1],
            stride: 1,
            padding: 0,
            groups: 1,
            input: [1, 7, 7],
        },
        Case {
            name: "3x3 of 1024 in",
            oik: [32, 1024, 3],
            stride: 1,
            padding: 1,
            groups: 1,
            input: [1, 3, 4],
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

    fn check(case: &Case, which: CpuKernels, with_residual: bool, relu: bool) -> &'static str {
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
        let conv = CpuConv::with_kernels(folded.clone(), which)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
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
        conv.implementation()
    }

    /// Runs `f` for every concrete implementation this CPU supports, says in the test
    /// output which it could not run, and checks the set it ran is the CPU's whole
    /// supported set (so a host that loses a feature does not pass by running less).
    fn for_each_supported(what: &str, mut f: impl FnMut(CpuKernels)) {
        let mut ran = Vec::new();
        for which in CpuKernels::CONCRETE {
            if !which.runs_here() {
                eprintln!("{what}: NOT RUN on {}: this CPU lacks it", which.name());
                continue;
            }
            f(which);
            ran.push(which);
        }
        eprintln!(
            "{what}: ran {}",
            ran.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
        );
        assert_eq!(ran, CpuKernels::supported(), "{what}");
        assert!(
            ran.contains(&CpuKernels::Gemm),
            "{what}: the portable path runs anywhere"
        );
    }

    /// What a forced choice must run a covered shape on.
    fn direct_name(which: CpuKernels) -> &'static str {
        match which {
            #[cfg(target_arch = "x86_64")]
            CpuKernels::Avx512 => avx512::Avx512::NAME,
            #[cfg(target_arch = "x86_64")]
            CpuKernels::Avx2 => avx2::Avx2::NAME,
            _ => "gemm",
        }
    }

    #[test]
    fn every_implementation_matches_the_reference_on_every_shape_kind() {
        for_each_supported("every shape kind", |which| {
            for case in CASES {
                let used = [
                    check(case, which, false, false),
                    check(case, which, true, true),
                    check(case, which, false, true),
                ];
                assert!(used.iter().all(|u| *u == used[0]), "{}", case.name);
            }
        });
    }

    #[test]
    fn every_height_of_a_last_tile_matches_the_reference() {
        // 1..=2 * MR pixels (of the tallest tile): the last tile has every row count
        // once, so each short-tile kernel runs, with and without a shortcut.
        for_each_supported("last tiles", |which| {
            for pixels in 1..=2 * 14 {
                for (oik, groups) in [
                    ([64, 32, 1], 1),
                    ([32, 32, 3], 8),
                    ([64, 64, 3], 16),
                    // Shorter tiles for wide inputs (direct.rs `tile_height`).
                    ([32, 1024, 1], 1),
                    ([32, 2048, 1], 1),
                ] {
                    let case = Case {
                        name: "short tile",
                        oik,
                        stride: 1,
                        padding: oik[2] / 2,
                        groups,
                        input: [1, 1, pixels],
                    };
                    check(&case, which, true, true);
                    check(&case, which, false, false);
                }
            }
        });
    }

    #[cfg(target_arch = "x86_64")]
    fn winograd_matches<I: Isa>() {
        let mr = I::MR;
        for (o, i, [n, h, w], chunk) in [
            (32, 16, [2, 7, 9], mr),
            (64, 32, [1, 6, 6], 2 * mr),
            (32, 48, [3, 5, 4], 5 * mr),
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
            let wg = winograd::Winograd::<I>::new(&folded).expect("a winograd shape");
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
                        "{} {o}x{i} {h}x{w}: {err} (scale {scale})",
                        I::NAME
                    );
                }
            }
        }
    }

    #[test]
    fn winograd_matches_the_reference_in_chunks_and_spread() {
        for_each_supported("winograd", |which| match which {
            #[cfg(target_arch = "x86_64")]
            CpuKernels::Avx512 => winograd_matches::<avx512::Avx512>(),
            #[cfg(target_arch = "x86_64")]
            CpuKernels::Avx2 => winograd_matches::<avx2::Avx2>(),
            // The portable path has no Winograd form.
            _ => {}
        });
    }

    #[test]
    fn the_direct_kernels_cover_every_resnet_convolution_shape() {
        for_each_supported("coverage", |which| {
            for case in &CASES[..CASES.len() - 1] {
                let [o, i, k] = case.oik;
                let conv = CpuConv::with_kernels(
                    FoldedConv {
                        weight: vec![0.0; o * (i / case.groups) * k * k],
                        bias: vec![0.0; o],
                        shape: [o, i / case.groups, k, k],
                        stride: case.stride,
                        padding: case.padding,
                        groups: case.groups,
                    },
                    which,
                )
                .expect("a supported choice");
                assert_eq!(conv.implementation(), direct_name(which), "{}", case.name);
            }
        });
    }

    #[test]
    fn auto_picks_the_fastest_supported_implementation() {
        let best = CpuKernels::supported()[0];
        let conv = CpuConv::with_kernels(
            FoldedConv {
                weight: vec![0.0; 64 * 32],
                bias: vec![0.0; 64],
                shape: [64, 32, 1, 1],
                stride: 1,
                padding: 0,
                groups: 1,
            },
            CpuKernels::Auto,
        )
        .expect("auto runs anywhere");
        assert_eq!(conv.implementation(), direct_name(best));
    }

    #[test]
    fn choices_parse_and_an_unsupported_one_is_refused_by_name() {
        for k in CpuKernels::CONCRETE.into_iter().chain([CpuKernels::Auto]) {
            assert_eq!(CpuKernels::parse(k.name()), Ok(k));
            assert_eq!(CpuKernels::parse(&k.name().to_uppercase()), Ok(k));
        }
        let err = CpuKernels::parse("avx1024").expect_err("unknown");
        assert!(
            err.to_string()
                .contains("expected auto, avx512, avx2 or gemm"),
            "{err}"
        );
        for k in CpuKernels::CONCRETE {
            match k.check() {
                Ok(_) => assert!(k.runs_here()),
                Err(e) => {
                    assert!(!k.runs_here());
                    let msg = e.to_string();
                    assert!(msg.contains(k.name()) && msg.contains("lacks"), "{msg}");
                    assert!(k.scope(|| ()).is_err(), "a scope refuses {}", k.name());
                }
            }
        }
    }

    #[test]
    fn a_scope_forces_the_choice_and_the_tally_counts_it() {
        let conv = || {
            CpuConv::try_new(FoldedConv {
                weight: vec![0.0; 64 * 32],
                bias: vec![0.0; 64],
                shape: [64, 32, 1, 1],
                stride: 1,
                padding: 0,
                groups: 1,
            })
            .expect("builds")
        };
        for which in CpuKernels::supported() {
            let (names, counts) = count_implementations(|| {
                which
                    .scope(|| [conv().implementation(), conv().implementation()])
                    .expect("supported")
            });
            assert_eq!(names, [direct_name(which); 2]);
            assert_eq!(
                describe_counts(&counts),
                format!("{}=2", direct_name(which))
            );
        }
    }
}
