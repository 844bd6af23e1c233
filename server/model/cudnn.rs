//! The cuDNN path for CUDA devices (feature `cudnn`). Activations stay NHWC between
//! layers, and each convolution is one `cudnnConvolutionBiasActivationForward` call that
//! also adds the folded batch-norm bias, the block's shortcut and the ReLU. Candle's stock
//! CUDA convolution works in NCHW, runs a grouped convolution as one launch per group plus
//! a concatenation, and needs three more element-wise passes (bias, add, ReLU) per layer.
//!
//! Everything here talks to cuDNN through cudarc's raw bindings because the safe wrappers
//! hide the handles the fused call needs. cuDNN handles are not thread-safe, so each
//! thread (in practice: the model's worker thread) gets its own handle per stream.
//!
//! One file, like the CPU kernels (issue 23 exempts kernels from its ~400-line rule): the
//! descriptors, the workspace and the fused call share one set of raw-handle invariants
//! that a split would spread over `unsafe` blocks in several files.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::cudnn::{result, sys};
use candle_core::cuda::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr};
use candle_core::cuda::CudaDType;
use candle_core::{
    bail, CudaDevice, CudaStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape,
    Tensor,
};

use super::layers::FoldedConv;

fn cudnn_err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Cuda(format!("cuDNN {what}: {e:?}").into())
}

/// One cuDNN handle per (thread, CUDA stream), bound to that stream so cuDNN's kernels
/// are ordered with Candle's.
struct Handle(sys::cudnnHandle_t);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by `cudnnCreate` below and destroyed only here.
        let _ = unsafe { result::destroy_handle(self.0) };
    }
}

thread_local! {
    static HANDLES: RefCell<HashMap<usize, Handle>> = RefCell::new(HashMap::new());
}

fn with_handle<R>(dev: &CudaDevice, f: impl FnOnce(sys::cudnnHandle_t) -> Result<R>) -> Result<R> {
    let stream = dev.cuda_stream();
    let key = stream.cu_stream() as usize;
    let handle = HANDLES.with(|h| -> Result<sys::cudnnHandle_t> {
        let mut map = h.borrow_mut();
        if let Some(handle) = map.get(&key) {
            return Ok(handle.0);
        }
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| cudnn_err("bind context", e))?;
        let raw = result::create_handle().map_err(|e| cudnn_err("create handle", e))?;
        let handle = Handle(raw);
        // SAFETY: a live handle and the device's live stream.
        unsafe { result::set_stream(raw, stream.cu_stream() as *mut _) }
            .map_err(|e| cudnn_err("set stream", e))?;
        map.insert(key, handle);
        Ok(raw)
    })?;
    f(handle)
}

/// The element types the path runs in; convolutions accumulate in f32 for all of them.
trait Elem: CudaDType + DeviceRepr + Copy + 'static {
    const CUDNN: sys::cudnnDataType_t;
    fn from_f32(v: f32) -> Self;
}

impl Elem for f32 {
    const CUDNN: sys::cudnnDataType_t = sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Elem for half::f16 {
    const CUDNN: sys::cudnnDataType_t = sys::cudnnDataType_t::CUDNN_DATA_HALF;
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}

impl Elem for half::bf16 {
    const CUDNN: sys::cudnnDataType_t = sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16;
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

/// An owned cuDNN descriptor (the ones a call needs), destroyed on drop.
macro_rules! descriptor {
    ($($name:ident($raw:ty) = $destroy:path;)*) => {$(
        struct $name($raw);
        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: created by the type's constructor and destroyed only here.
                let _ = unsafe { $destroy(self.0) };
            }
        }
    )*};
}

descriptor! {
    TensorDesc(sys::cudnnTensorDescriptor_t) = result::destroy_tensor_descriptor;
    FilterDesc(sys::cudnnFilterDescriptor_t) = result::destroy_filter_descriptor;
    ConvDesc(sys::cudnnConvolutionDescriptor_t) = result::destroy_convolution_descriptor;
    ActDesc(sys::cudnnActivationDescriptor_t) = sys::cudnnDestroyActivationDescriptor;
    PoolDesc(sys::cudnnPoolingDescriptor_t) = sys::cudnnDestroyPoolingDescriptor;
}

impl TensorDesc {
    /// `dims` in NCHW order; `nhwc` picks the memory layout.
    fn new(dtype: sys::cudnnDataType_t, dims: [usize; 4], nhwc: bool) -> Result<Self> {
        let d = TensorDesc(
            result::create_tensor_descriptor().map_err(|e| cudnn_err("tensor descriptor", e))?,
        );
        let format = if nhwc {
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC
        } else {
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW
        };
        // SAFETY: a descriptor created just above.
        unsafe { result::set_tensor4d_descriptor(d.0, format, dtype, dims.map(|v| v as i32)) }
            .map_err(|e| cudnn_err(&format!("tensor {dims:?}"), e))?;
        Ok(d)
    }
}

impl FilterDesc {
    fn new(dtype: sys::cudnnDataType_t, kcrs: [usize; 4]) -> Result<Self> {
        let d = FilterDesc(
            result::create_filter_descriptor().map_err(|e| cudnn_err("filter descriptor", e))?,
        );
        // SAFETY: a descriptor created just above.
        unsafe {
            result::set_filter4d_descriptor(
                d.0,
                dtype,
                sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
                kcrs.map(|v| v as i32),
            )
        }
        .map_err(|e| cudnn_err("filter", e))?;
        Ok(d)
    }
}

impl ConvDesc {
    fn new(padding: usize, stride: usize, groups: usize, tensor_cores: bool) -> Result<Self> {
        let d = ConvDesc(
            result::create_convolution_descriptor()
                .map_err(|e| cudnn_err("convolution descriptor", e))?,
        );
        let (p, s) = (padding as i32, stride as i32);
        // f32 stays true f32 (FMA math: no TF32), which is what the parity tolerance assumes.
        let math = if tensor_cores {
            sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
        } else {
            sys::cudnnMathType_t::CUDNN_FMA_MATH
        };
        // SAFETY: a descriptor created just above.
        let set = unsafe {
            result::set_convolution2d_descriptor(
                d.0,
                p,
                p,
                s,
                s,
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
            .and_then(|()| result::set_convolution_group_count(d.0, groups as i32))
            .and_then(|()| result::set_convolution_math_type(d.0, math))
        };
        set.map_err(|e| cudnn_err("convolution", e))?;
        Ok(d)
    }
}

impl ActDesc {
    fn new(relu: bool) -> Result<Self> {
        let d = ActDesc(
            result::create_activation_descriptor()
                .map_err(|e| cudnn_err("activation descriptor", e))?,
        );
        let mode = if relu {
            sys::cudnnActivationMode_t::CUDNN_ACTIVATION_RELU
        } else {
            sys::cudnnActivationMode_t::CUDNN_ACTIVATION_IDENTITY
        };
        // SAFETY: a descriptor created just above.
        unsafe {
            result::set_activation_descriptor(
                d.0,
                mode,
                sys::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN,
                0.0,
            )
        }
        .map_err(|e| cudnn_err("activation", e))?;
        Ok(d)
    }
}

impl PoolDesc {
    fn new(
        mode: sys::cudnnPoolingMode_t,
        window: [usize; 2],
        padding: [usize; 2],
        stride: [usize; 2],
    ) -> Result<Self> {
        let d = PoolDesc(
            result::create_pooling_descriptor().map_err(|e| cudnn_err("pooling descriptor", e))?,
        );
        // SAFETY: a descriptor created just above.
        unsafe {
            result::set_pooling_descriptor(
                d.0,
                mode,
                sys::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN,
                2,
                &window.map(|v| v as i32),
                &padding.map(|v| v as i32),
                &stride.map(|v| v as i32),
            )
        }
        .map_err(|e| cudnn_err("pooling", e))?;
        Ok(d)
    }

    fn max_3x3_s2_p1() -> Result<Self> {
        Self::new(
            sys::cudnnPoolingMode_t::CUDNN_POOLING_MAX,
            [3, 3],
            [1, 1],
            [2, 2],
        )
    }
}

/// Weights on the device in cuDNN's NHWC filter layout (`[out, kh, kw, in / groups]`).
enum Weights {
    F32(CudaSlice<f32>, CudaSlice<f32>),
    F16(CudaSlice<half::f16>, CudaSlice<half::f16>),
    Bf16(CudaSlice<half::bf16>, CudaSlice<half::bf16>),
}

/// Which algorithm and workspace one input shape uses; chosen once per shape.
#[derive(Clone, Copy)]
struct Plan {
    algo: sys::cudnnConvolutionFwdAlgo_t,
    workspace: usize,
}

/// A convolution with folded batch-norm, run as one fused cuDNN call.
pub struct FusedConv {
    weights: Weights,
    /// `[out, in / groups, k, k]`.
    shape: [usize; 4],
    stride: usize,
    padding: usize,
    groups: usize,
    plans: Mutex<HashMap<(usize, usize, usize, bool), Plan>>,
}

/// Host time spent per convolution call, by phase, when `RESNET_SERVE_CUDNN_PROFILE=1`:
/// where the CPU cost of a forward pass goes at small batches.
mod profile {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;

    pub static CALLS: AtomicU64 = AtomicU64::new(0);
    pub static SETUP_NS: AtomicU64 = AtomicU64::new(0);
    pub static LAUNCH_NS: AtomicU64 = AtomicU64::new(0);

    pub fn enabled() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| std::env::var("RESNET_SERVE_CUDNN_PROFILE").as_deref() == Ok("1"))
    }

    pub fn add(counter: &AtomicU64, since: Instant) {
        if enabled() {
            counter.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }

    /// `calls, µs setup per call, µs launch per call` since the last report; resets.
    pub fn take() -> Option<(u64, f64, f64)> {
        if !enabled() {
            return None;
        }
        let calls = CALLS.swap(0, Ordering::Relaxed);
        let setup = SETUP_NS.swap(0, Ordering::Relaxed) as f64;
        let launch = LAUNCH_NS.swap(0, Ordering::Relaxed) as f64;
        let per = |ns: f64| {
            if calls == 0 {
                0.0
            } else {
                ns / calls as f64 / 1000.0
            }
        };
        Some((calls, per(setup), per(launch)))
    }
}

/// Profile counters since the last call (see `RESNET_SERVE_CUDNN_PROFILE`), as a line.
pub fn profile_report() -> Option<String> {
    profile::take().map(|(calls, setup, launch)| {
        format!(
            "cudnn profile: {calls} conv calls, {setup:.1} µs setup + {launch:.1} µs launch per call"
        )
    })
}

impl std::fmt::Debug for FusedConv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FusedConv")
            .field("shape", &self.shape)
            .field("stride", &self.stride)
            .field("groups", &self.groups)
            .finish()
    }
}

fn upload<T: Elem>(dev: &CudaDevice, host: &[f32]) -> Result<CudaSlice<T>> {
    let cast: Vec<T> = host.iter().map(|&v| T::from_f32(v)).collect();
    dev.clone_htod(&cast)
}

impl FusedConv {
    pub fn new(c: FoldedConv, device: &Device, dtype: DType) -> Result<Self> {
        let dev = device.as_cuda_device()?;
        let [o, i, kh, kw] = c.shape;
        // OIHW -> OHWI, the NHWC filter layout.
        let mut ohwi = vec![0f32; c.weight.len()];
        for oo in 0..o {
            for ii in 0..i {
                for y in 0..kh {
                    for x in 0..kw {
                        ohwi[((oo * kh + y) * kw + x) * i + ii] =
                            c.weight[((oo * i + ii) * kh + y) * kw + x];
                    }
                }
            }
        }
        let weights = match dtype {
            DType::F32 => Weights::F32(upload(dev, &ohwi)?, upload(dev, &c.bias)?),
            DType::F16 => Weights::F16(upload(dev, &ohwi)?, upload(dev, &c.bias)?),
            DType::BF16 => Weights::Bf16(upload(dev, &ohwi)?, upload(dev, &c.bias)?),
            other => bail!("the cuDNN path runs f32, f16 or bf16, not {other:?}"),
        };
        Ok(FusedConv {
            weights,
            shape: c.shape,
            stride: c.stride,
            padding: c.padding,
            groups: c.groups,
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// `act(conv(x) + bias [+ residual])` with `x` (and `residual`) NHWC.
    pub fn forward(&self, x: &Tensor, residual: Option<&Tensor>, relu: bool) -> Result<Tensor> {
        let x = x.contiguous()?;
        let call = ConvCall { conv: self, relu };
        match residual {
            None => x.apply_op1_no_bwd(&call),
            Some(z) => x.apply_op2_no_bwd(&z.contiguous()?, &call),
        }
    }

    fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        let k = self.shape[2];
        (
            (h + 2 * self.padding - k) / self.stride + 1,
            (w + 2 * self.padding - k) / self.stride + 1,
        )
    }

    fn run<T: Elem>(
        &self,
        dev: &CudaDevice,
        (w, bias): (&CudaSlice<T>, &CudaSlice<T>),
        x: (&CudaStorage, &Layout),
        z: Option<(&CudaStorage, &Layout)>,
        relu: bool,
    ) -> Result<(CudaStorage, Shape)> {
        let setup_started = std::time::Instant::now();
        let (xs, xl) = x;
        let &[n, h, wd, c] = xl.dims() else {
            bail!("fused conv expects NHWC input, got {:?}", xl.dims())
        };
        let [o, ipg, k, _] = self.shape;
        if c != ipg * self.groups {
            bail!(
                "fused conv: {c} input channels, weights expect {}",
                ipg * self.groups
            );
        }
        let (oh, ow) = self.out_hw(h, wd);
        let x_slice = xs.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        let x_desc = TensorDesc::new(T::CUDNN, [n, c, h, wd], true)?;
        let y_desc = TensorDesc::new(T::CUDNN, [n, o, oh, ow], true)?;
        let b_desc = TensorDesc::new(T::CUDNN, [1, o, 1, 1], false)?;
        let w_desc = FilterDesc::new(T::CUDNN, [o, ipg, k, k])?;
        let tensor_cores = T::CUDNN != sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
        let conv = ConvDesc::new(self.padding, self.stride, self.groups, tensor_cores)?;
        let act = ActDesc::new(relu)?;
        // SAFETY: the output is fully written by the convolution before anyone reads it.
        let mut y = unsafe { dev.alloc::<T>(n * oh * ow * o) }?;
        let z_slice = match z {
            Some((zs, zl)) => {
                if zl.dims() != [n, oh, ow, o] {
                    bail!(
                        "residual {:?} does not match output {:?}",
                        zl.dims(),
                        [n, oh, ow, o]
                    );
                }
                Some(zs.as_cuda_slice::<T>()?.slice(zl.start_offset()..))
            }
            None => None,
        };
        profile::add(&profile::SETUP_NS, setup_started);
        let launch_started = std::time::Instant::now();
        with_handle(dev, |handle| {
            let key = (n, h, wd, relu);
            let cached = self.plans.lock().ok().and_then(|p| p.get(&key).copied());
            let first = match cached {
                Some(p) => p,
                None => plan(handle, &x_desc, &w_desc, &conv, &y_desc, relu, false)?,
            };
            let mut launch = |plan: Plan| -> Result<()> {
                let stream = dev.cuda_stream();
                let mut workspace = if plan.workspace > 0 {
                    // SAFETY: scratch memory cuDNN writes before it reads.
                    Some(unsafe { dev.alloc::<u8>(plan.workspace) }?)
                } else {
                    None
                };
                let (xp, _gx) = x_slice.device_ptr(&stream);
                let (wp, _gw) = w.device_ptr(&stream);
                let (bp, _gb) = bias.device_ptr(&stream);
                let (yp, _gy) = y.device_ptr_mut(&stream);
                let zg = z_slice.as_ref().map(|z| z.device_ptr(&stream));
                let (wsp, _gws) = match workspace.as_mut() {
                    Some(ws) => {
                        let (p, g) = ws.device_ptr_mut(&stream);
                        (p as *mut c_void, Some(g))
                    }
                    None => (std::ptr::null_mut(), None),
                };
                let alpha1 = 1f32;
                // Without a shortcut, z aliases y and alpha2 = 0 makes cuDNN ignore it.
                let (zp, alpha2) = match &zg {
                    Some((p, _)) => (*p, 1f32),
                    None => (yp, 0f32),
                };
                // SAFETY: every pointer is a live device allocation on this stream whose size and
                // layout the descriptors describe; the guards above keep them alive.
                unsafe {
                    result::convolution_bias_activation_forward(
                        handle,
                        &alpha1 as *const f32 as *const c_void,
                        x_desc.0,
                        xp as *const c_void,
                        w_desc.0,
                        wp as *const c_void,
                        conv.0,
                        plan.algo,
                        wsp,
                        plan.workspace,
                        &alpha2 as *const f32 as *const c_void,
                        y_desc.0,
                        zp as *const c_void,
                        b_desc.0,
                        bp as *const c_void,
                        act.0,
                        y_desc.0,
                        yp as *mut c_void,
                    )
                }
                .map_err(|e| {
                    cudnn_err(
                        &format!("fused conv {:?} on {:?}", self.shape, [n, h, wd, c]),
                        e,
                    )
                })
            };
            // Not every heuristic choice is fusable for every shape; IMPLICIT_PRECOMP_GEMM is.
            let used = match launch(first) {
                Ok(()) => first,
                Err(e) if cached.is_none() && first.algo != IPG => {
                    tracing::debug!(
                        "cuDNN refused {:?} ({e}); using IMPLICIT_PRECOMP_GEMM",
                        first.algo
                    );
                    let safe = plan(handle, &x_desc, &w_desc, &conv, &y_desc, relu, true)?;
                    launch(safe)?;
                    safe
                }
                Err(e) => return Err(e),
            };
            if cached.is_none() {
                if let Ok(mut plans) = self.plans.lock() {
                    plans.insert(key, used);
                }
            }
            Ok(())
        })?;
        profile::add(&profile::LAUNCH_NS, launch_started);
        if profile::enabled() {
            profile::CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev.clone()),
            Shape::from((n, oh, ow, o)),
        ))
    }
}

const IPG: sys::cudnnConvolutionFwdAlgo_t =
    sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM;

/// Picks cuDNN's first heuristic choice that the fused call accepts. With an identity
/// activation cuDNN only fuses IMPLICIT_PRECOMP_GEMM.
fn plan(
    handle: sys::cudnnHandle_t,
    x: &TensorDesc,
    w: &FilterDesc,
    conv: &ConvDesc,
    y: &TensorDesc,
    relu: bool,
    force_precomp: bool,
) -> Result<Plan> {
    let mut algo = IPG;
    if relu && !force_precomp {
        const WANT: usize = 8;
        // SAFETY: plain-data structs that cuDNN fills in.
        let mut perf: [sys::cudnnConvolutionFwdAlgoPerf_t; WANT] = unsafe { std::mem::zeroed() };
        let mut returned = 0i32;
        // SAFETY: live descriptors and a buffer of WANT entries.
        unsafe {
            result::get_convolution_forward_algorithm(
                handle,
                x.0,
                w.0,
                conv.0,
                y.0,
                WANT as i32,
                &mut returned,
                perf.as_mut_ptr(),
            )
        }
        .map_err(|e| cudnn_err("algorithm heuristics", e))?;
        if let Some(p) = perf
            .iter()
            .take(returned.max(0) as usize)
            .find(|p| p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
        {
            algo = p.algo;
        }
    }
    // SAFETY: live descriptors.
    let workspace = unsafe {
        result::get_convolution_forward_workspace_size(handle, x.0, w.0, conv.0, y.0, algo)
    }
    .map_err(|e| cudnn_err("workspace size", e))?;
    Ok(Plan { algo, workspace })
}

struct ConvCall<'a> {
    conv: &'a FusedConv,
    relu: bool,
}

impl ConvCall<'_> {
    fn dispatch(
        &self,
        x: (&CudaStorage, &Layout),
        z: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = &x.0.device;
        match &self.conv.weights {
            Weights::F32(w, b) => self.conv.run::<f32>(dev, (w, b), x, z, self.relu),
            Weights::F16(w, b) => self.conv.run::<half::f16>(dev, (w, b), x, z, self.relu),
            Weights::Bf16(w, b) => self.conv.run::<half::bf16>(dev, (w, b), x, z, self.relu),
        }
    }
}

impl CustomOp1 for ConvCall<'_> {
    fn name(&self) -> &'static str {
        "cudnn-fused-conv"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        bail!("the cuDNN convolution runs on CUDA devices only")
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        self.dispatch((x, xl), None)
    }
}

impl CustomOp2 for ConvCall<'_> {
    fn name(&self) -> &'static str {
        "cudnn-fused-conv-add"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        bail!("the cuDNN convolution runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        z: &CudaStorage,
        zl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.dispatch((x, xl), Some((z, zl)))
    }
}

/// `MaxPool2d(3, stride 2, padding 1)` on an NHWC tensor; cuDNN pads with -inf as PyTorch
/// does.
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Weightless::MaxPool3x3S2)
}

/// NCHW to NHWC in one cuDNN call, dtype unchanged. Unlike Candle's strided copy it
/// uploads no shape metadata from the host, so a CUDA graph can capture it.
pub fn to_nhwc(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Weightless::ToNhwc)
}

/// `AdaptiveAvgPool2d(1)` + flatten on an NHWC tensor: `[N, H, W, C]` to `[N, C]`, as one
/// cuDNN average pool over the whole plane (cuDNN accumulates in f32 for f16 and bf16).
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    let (n, _, _, c) = x.dims4()?;
    x.contiguous()?
        .apply_op1_no_bwd(&Weightless::GlobalAvgPool)?
        .reshape((n, c))
}

/// The single-input cuDNN calls without weights: layout change and pools.
enum Weightless {
    ToNhwc,
    MaxPool3x3S2,
    GlobalAvgPool,
}

impl Weightless {
    fn run<T: Elem>(&self, xs: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = &xs.device;
        let &[n, d1, d2, d3] = xl.dims() else {
            bail!("expected a 4-d tensor, got {:?}", xl.dims())
        };
        let x_slice = xs.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        // 3x3, stride 2, padding 1: ceil(v / 2).
        let pooled = |v: usize| v.div_ceil(2);
        let (len, shape) = match self {
            Weightless::ToNhwc => (n * d1 * d2 * d3, Shape::from((n, d2, d3, d1))),
            Weightless::MaxPool3x3S2 => (
                n * pooled(d1) * pooled(d2) * d3,
                Shape::from((n, pooled(d1), pooled(d2), d3)),
            ),
            Weightless::GlobalAvgPool => (n * d3, Shape::from((n, 1, 1, d3))),
        };
        // SAFETY: fully written by the cuDNN call below.
        let mut y = unsafe { dev.alloc::<T>(len) }?;
        with_handle(dev, |handle| {
            let stream = dev.cuda_stream();
            let (xp, _gx) = x_slice.device_ptr(&stream);
            let (yp, _gy) = y.device_ptr_mut(&stream);
            let (alpha, beta) = (1f32, 0f32);
            let (alpha, beta) = (
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
            );
            match self {
                Weightless::ToNhwc => {
                    let (c, h, w) = (d1, d2, d3);
                    let x_desc = TensorDesc::new(T::CUDNN, [n, c, h, w], false)?;
                    let y_desc = TensorDesc::new(T::CUDNN, [n, c, h, w], true)?;
                    // SAFETY: live allocations matching the descriptors.
                    unsafe {
                        sys::cudnnTransformTensor(
                            handle,
                            alpha,
                            x_desc.0,
                            xp as *const c_void,
                            beta,
                            y_desc.0,
                            yp as *mut c_void,
                        )
                    }
                    .result()
                    .map_err(|e| cudnn_err("NCHW to NHWC", e))
                }
                Weightless::MaxPool3x3S2 | Weightless::GlobalAvgPool => {
                    let (h, w, c) = (d1, d2, d3);
                    let x_desc = TensorDesc::new(T::CUDNN, [n, c, h, w], true)?;
                    let (pool, y_desc, what) = match self {
                        Weightless::MaxPool3x3S2 => (
                            PoolDesc::max_3x3_s2_p1()?,
                            TensorDesc::new(T::CUDNN, [n, c, pooled(h), pooled(w)], true)?,
                            "max pool",
                        ),
                        _ => (
                            PoolDesc::new(
                                sys::cudnnPoolingMode_t::CUDNN_POOLING_AVERAGE_COUNT_INCLUDE_PADDING,
                                [h, w],
                                [0, 0],
                                [h, w],
                            )?,
                            TensorDesc::new(T::CUDNN, [n, c, 1, 1], true)?,
                            "global average pool",
                        ),
                    };
                    // SAFETY: live allocations matching the descriptors.
                    unsafe {
                        result::pooling_forward(
                            handle,
                            pool.0,
                            alpha,
                            x_desc.0,
                            xp as *const c_void,
                            beta,
                            y_desc.0,
                            yp as *mut c_void,
                        )
                    }
                    .map_err(|e| cudnn_err(what, e))
                }
            }
        })?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), shape))
    }
}

impl CustomOp1 for Weightless {
    fn name(&self) -> &'static str {
        match self {
            Weightless::ToNhwc => "cudnn-to-nhwc",
            Weightless::MaxPool3x3S2 => "cudnn-max-pool",
            Weightless::GlobalAvgPool => "cudnn-global-avg-pool",
        }
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        bail!("{} runs on CUDA devices only", self.name())
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        match x.dtype() {
            DType::F32 => self.run::<f32>(x, xl),
            DType::F16 => self.run::<half::f16>(x, xl),
            DType::BF16 => self.run::<half::bf16>(x, xl),
            other => bail!("{}: unsupported dtype {other:?}", self.name()),
        }
    }
}
