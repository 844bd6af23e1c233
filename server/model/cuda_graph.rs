//! CUDA graphs for the fixed batch sizes (feature `cudnn`). cuDNN's legacy entry point
//! spends 100-270 µs of host time per convolution call, which made a ResNet-50 forward
//! pass host-bound below batch 256 (BENCHMARKS.md). Capturing each allowed batch size's
//! whole forward pass once, at warm-up, and replaying it costs one launch per batch.
//!
//! A captured pass owns everything that must keep its address between replays: the
//! input and output tensors on the device and two pinned host buffers. A replay converts
//! the images (f32 values, or a tensor's bytes as received) straight into the pinned
//! input buffer in the model's dtype (so half precision moves half the bytes), copies it
//! up in one transfer, launches the graph and copies the logits back. Intermediate
//! activations are allocated inside the graph (stream-ordered allocation nodes) and
//! freed inside it.
//!
//! Several workers may share one model on a GPU, each on its own per-thread stream, so
//! each batch size has a pool of captured passes; a worker that finds none free runs the
//! pass eagerly rather than wait.
//!
//! One file (over issue 23's ~400 lines): capture, the replay's pinned buffers and the
//! pool are one piece of raw CUDA driver code whose addresses must stay valid together;
//! it compiles only with the `cudnn` feature, where the whole of it is reviewed at once.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use candle_core::cuda::cudarc::driver::{
    result as cu, sys, CudaContext, CudaEvent, CudaGraph, DevicePtr,
};
use candle_core::{bail, DType, Device, Result, Storage, Tensor};

use super::input::stage_batch;
use super::resnet::ResNet;
use super::{InputView, Logits, Rejected, IMAGE_LEN, INPUT_SIZE, NUM_CLASSES};

fn driver_err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Cuda(format!("CUDA graph, {what}: {e:?}").into())
}

/// Page-locked host memory: transfers from it run at full bus speed, asynchronously.
struct Pinned {
    ptr: *mut c_void,
    bytes: usize,
    /// Made current again to free it: a model may be dropped on any thread.
    ctx: Arc<CudaContext>,
}

// SAFETY: a plain host allocation, used by one thread at a time (the pool hands each
// captured pass to one worker).
unsafe impl Send for Pinned {}

impl Pinned {
    fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self> {
        ctx.bind_to_thread().map_err(|e| driver_err("bind", e))?;
        // SAFETY: the context is current; the size is what the caller asked for.
        let ptr = unsafe { cu::malloc_host(bytes, 0) }.map_err(|e| driver_err("pinned", e))?;
        Ok(Pinned {
            ptr,
            bytes,
            ctx: ctx.clone(),
        })
    }

    fn as_mut<T: Copy>(&mut self) -> &mut [T] {
        // SAFETY: `bytes` bytes allocated by `cuMemHostAlloc` (page-aligned), exclusively
        // borrowed; every element type used here is plain data.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.ptr as *mut T,
                self.bytes / std::mem::size_of::<T>(),
            )
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by `cuMemHostAlloc` in `new`, freed once, its context current.
            let _ = unsafe { cu::free_host(self.ptr) };
        }
    }
}

/// The device address of a contiguous CUDA tensor's first element.
fn device_ptr(t: &Tensor) -> Result<sys::CUdeviceptr> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        bail!("not a CUDA tensor")
    };
    let stream = s.device.cuda_stream();
    let offset = layout.start_offset();
    let ptr = match t.dtype() {
        DType::F32 => {
            s.as_cuda_slice::<f32>()?
                .slice(offset..)
                .device_ptr(&stream)
                .0
        }
        DType::F16 => {
            s.as_cuda_slice::<half::f16>()?
                .slice(offset..)
                .device_ptr(&stream)
                .0
        }
        DType::BF16 => {
            s.as_cuda_slice::<half::bf16>()?
                .slice(offset..)
                .device_ptr(&stream)
                .0
        }
        other => bail!("no CUDA graph for {other:?}"),
    };
    Ok(ptr)
}

/// One batch size's forward pass, captured.
struct Captured {
    graph: CudaGraph,
    batch: usize,
    dtype: DType,
    device: Device,
    /// `[batch, 3, 224, 224]` in the model's dtype; the graph reads it.
    input: Tensor,
    /// `[batch, 1000]` in the model's dtype; the graph's last node writes it. Held so
    /// that its memory (at `output_ptr`) lives as long as the graph.
    _output: Tensor,
    input_ptr: sys::CUdeviceptr,
    output_ptr: sys::CUdeviceptr,
    staging_in: Pinned,
    staging_out: Pinned,
    /// Recorded after each replay's copies; waited on instead of the stream (see
    /// [`Wait`]).
    done: CudaEvent,
    wait: Wait,
}

/// How a worker waits for its replay. A CUDA context defaults to spinning while the GPU
/// works (when a process has fewer contexts than cores), which keeps a core busy per
/// worker for the whole forward pass: on a host that also receives the requests, that
/// is CPU the serving path needs. A blocking-sync event sleeps instead, at the cost of a
/// thread wake-up (tens of µs) per batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Sleep until the replay is done (the default).
    Block,
    /// Spin on the stream: `RESNET_SERVE_CUDA_SYNC=spin`.
    Spin,
}

impl Wait {
    pub fn from_env() -> Self {
        match std::env::var("RESNET_SERVE_CUDA_SYNC").as_deref() {
            Ok("spin") => Wait::Spin,
            _ => Wait::Block,
        }
    }
}

// SAFETY: CUDA graph objects may be used from any thread as long as calls on one graph
// are serialized; a `Captured` is only reachable through `Graphs`, which hands it to one
// thread at a time (taken out of the pool under its mutex, put back after use).
unsafe impl Send for Captured {}

impl Captured {
    fn capture(net: &ResNet, device: &Device, dtype: DType, batch: usize) -> Result<Self> {
        let cuda = device.as_cuda_device()?;
        let stream = cuda.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| driver_err("bind", e))?;
        let size = dtype.size_in_bytes();
        let input = Tensor::zeros((batch, 3, INPUT_SIZE, INPUT_SIZE), dtype, device)?;
        let output = Tensor::zeros((batch, NUM_CLASSES), dtype, device)?;
        let (input_ptr, output_ptr) = (device_ptr(&input)?, device_ptr(&output)?);
        // One eager pass first: cuDNN's plans and Candle's modules are chosen and loaded
        // outside the capture.
        drop(net.forward(&input)?);
        device.synchronize()?;
        stream
            .context()
            .check_err()
            .map_err(|e| driver_err("before capture", e))?;
        // Relaxed: a library call that is not capturable but harmless (say, a host-side
        // query) must not invalidate the capture.
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| driver_err("begin capture", e))?;
        let recorded = (|| -> Result<()> {
            let logits = net.forward(&input)?;
            if logits.dims() != [batch, NUM_CLASSES] || logits.dtype() != dtype {
                bail!("unexpected logits {:?} {:?}", logits.dims(), logits.dtype());
            }
            let from = device_ptr(&logits)?;
            // SAFETY: both are live device allocations of `batch * 1000` elements of
            // `dtype`; the copy is recorded on the capturing stream.
            unsafe {
                cu::memcpy_dtod_async(
                    output_ptr,
                    from,
                    batch * NUM_CLASSES * size,
                    stream.cu_stream(),
                )
            }
            .map_err(|e| driver_err("logits copy", e))?;
            // `logits` drops here, inside the capture: its free becomes a graph node.
            Ok(())
        })();
        let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        recorded?;
        let graph = ended
            .map_err(|e| driver_err("end capture", e))?
            .ok_or_else(|| driver_err("end capture", "nothing was captured"))?;
        stream
            .context()
            .check_err()
            .map_err(|e| driver_err("during capture", e))?;
        graph.upload().map_err(|e| driver_err("upload", e))?;
        let done = stream
            .context()
            .new_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))
            .map_err(|e| driver_err("event", e))?;
        Ok(Captured {
            graph,
            batch,
            dtype,
            device: device.clone(),
            input,
            _output: output,
            input_ptr,
            output_ptr,
            staging_in: Pinned::new(stream.context(), batch * IMAGE_LEN * size)?,
            staging_out: Pinned::new(stream.context(), batch * NUM_CLASSES * size)?,
            done,
            wait: Wait::from_env(),
        })
    }

    /// Converts `images` (each `3 x 224 x 224`, zero images after them up to the batch
    /// size) into the pinned input buffer in the model's dtype: one pass per image, from
    /// the bytes a tensor arrived in where it did, each value checked finite on the way.
    /// An image holding NaN or infinity is staged as it is, as the eager pass takes it,
    /// and returned, so that the caller decides whether its row is answered.
    fn stage(&mut self, images: &[InputView<'_>]) -> Result<Vec<Rejected>> {
        if images.len() > self.batch || images.iter().any(|i| i.len() != IMAGE_LEN) {
            bail!(
                "a captured batch of {} takes up to {} images of {IMAGE_LEN} values",
                self.batch,
                self.batch
            );
        }
        use half::slice::HalfFloatSliceExt;
        Ok(match self.dtype {
            DType::F32 => stage_batch(self.staging_in.as_mut::<f32>(), images, 0.0, |d, s| {
                d.copy_from_slice(s)
            }),
            DType::F16 => stage_batch(
                self.staging_in.as_mut::<half::f16>(),
                images,
                half::f16::ZERO,
                |d, s| d.convert_from_f32_slice(s),
            ),
            DType::BF16 => stage_batch(
                self.staging_in.as_mut::<half::bf16>(),
                images,
                half::bf16::ZERO,
                |d, s| d.convert_from_f32_slice(s),
            ),
            other => bail!("no CUDA graph for {other:?}"),
        })
    }

    /// Copy up, replay, copy back: the logits of `images` (padding rows included), with
    /// the host time spent staging them.
    fn run(&mut self, images: &[InputView<'_>]) -> Result<Logits> {
        let started = std::time::Instant::now();
        let rejected = self.stage(images)?;
        let input_time = started.elapsed();
        let stream = self.device.as_cuda_device()?.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| driver_err("bind", e))?;
        let cu_stream = stream.cu_stream();
        // SAFETY: the pinned buffers and device tensors are live, sized for this batch,
        // and not touched by the host again until the stream is synchronized below.
        unsafe { cu::memcpy_htod_async(self.input_ptr, self.staging_in.as_mut::<u8>(), cu_stream) }
            .map_err(|e| driver_err("input copy", e))?;
        self.graph.launch().map_err(|e| driver_err("launch", e))?;
        // SAFETY: as above.
        unsafe {
            cu::memcpy_dtoh_async(self.staging_out.as_mut::<u8>(), self.output_ptr, cu_stream)
        }
        .map_err(|e| driver_err("logits copy", e))?;
        match self.wait {
            Wait::Block => {
                self.done
                    .record(&stream)
                    .map_err(|e| driver_err("record", e))?;
                self.done.synchronize()
            }
            Wait::Spin => stream.synchronize(),
        }
        .map_err(|e| driver_err("sync", e))?;
        let rows = match self.dtype {
            DType::F32 => self
                .staging_out
                .as_mut::<f32>()
                .chunks(NUM_CLASSES)
                .map(<[f32]>::to_vec)
                .collect(),
            DType::F16 => rows_of(self.staging_out.as_mut::<half::f16>(), half::f16::to_f32),
            DType::BF16 => rows_of(self.staging_out.as_mut::<half::bf16>(), half::bf16::to_f32),
            other => bail!("no CUDA graph for {other:?}"),
        };
        Ok(Logits {
            rows,
            input_time,
            rejected,
        })
    }

    /// The replay alone, with the input already on the device (what a benchmark against
    /// PyTorch with resident inputs measures). Does not wait for the GPU.
    fn launch(&self) -> Result<()> {
        self.graph.launch().map_err(|e| driver_err("launch", e))
    }

    /// The replay's logits must match the eager pass's on the same input.
    fn verify(&mut self, net: &ResNet) -> Result<()> {
        let images: Vec<Vec<f32>> = (0..self.batch)
            .map(|b| {
                (0..IMAGE_LEN)
                    .map(|i| ((i * 7 + b * 13) % 251) as f32 / 125.0 - 1.0)
                    .collect()
            })
            .collect();
        let refs: Vec<InputView<'_>> = images.iter().map(|i| InputView::from(&i[..])).collect();
        let replayed = self.run(&refs)?.rows;
        // The eager pass reads the same staged (already converted) input.
        let eager = net
            .forward(&self.input)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let scale = eager
            .iter()
            .flatten()
            .fold(0f32, |m, v| m.max(v.abs()))
            .max(1e-6);
        let diff = eager
            .iter()
            .flatten()
            .zip(replayed.iter().flatten())
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        if replayed.iter().flatten().any(|v| !v.is_finite()) || diff > 1e-3 * scale {
            bail!("replayed logits differ from the eager pass by {diff} (scale {scale})");
        }
        Ok(())
    }
}

fn rows_of<T: Copy>(values: &[T], to_f32: impl Fn(T) -> f32) -> Vec<Vec<f32>> {
    values
        .chunks(NUM_CLASSES)
        .map(|row| row.iter().map(|&v| to_f32(v)).collect())
        .collect()
}

/// The captured passes of one model, by batch size.
#[derive(Default)]
pub struct Graphs {
    free: Mutex<HashMap<usize, Vec<Captured>>>,
}

impl std::fmt::Debug for Graphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graphs")
            .field("batch_sizes", &self.batch_sizes())
            .finish()
    }
}

impl Drop for Graphs {
    /// Graph allocations stay reserved in the device's graph memory pool after their
    /// graphs are gone; an unloaded model's activations go back to the device here.
    fn drop(&mut self) {
        let free = std::mem::take(self.free.get_mut().unwrap_or_else(|p| p.into_inner()));
        let ctx = free
            .values()
            .flatten()
            .next()
            .map(|c| c.staging_in.ctx.clone());
        drop(free);
        if let Some(ctx) = ctx {
            if ctx.bind_to_thread().is_ok() {
                // SAFETY: a valid device of a live context; no graph of it is left here.
                let _ = unsafe { sys::cuDeviceGraphMemTrim(ctx.cu_device()) };
            }
        }
    }
}

impl Graphs {
    /// `RESNET_SERVE_CUDA_GRAPHS=0` turns capture off (every pass runs eagerly).
    pub fn enabled() -> bool {
        std::env::var("RESNET_SERVE_CUDA_GRAPHS").as_deref() != Ok("0")
    }

    /// Captures `copies` passes of batch size `batch` and checks one against the eager
    /// pass. On failure nothing is kept and the size keeps running eagerly.
    pub fn capture(
        &self,
        net: &ResNet,
        device: &Device,
        dtype: DType,
        batch: usize,
        copies: usize,
    ) -> Result<()> {
        let mut made = Vec::with_capacity(copies);
        for _ in 0..copies.max(1) {
            made.push(Captured::capture(net, device, dtype, batch)?);
        }
        if let Some(first) = made.first_mut() {
            first.verify(net)?;
        }
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.entry(batch).or_default().extend(made);
        Ok(())
    }

    pub fn batch_sizes(&self) -> Vec<usize> {
        let free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let mut sizes: Vec<usize> = free.keys().copied().collect();
        sizes.sort_unstable();
        sizes
    }

    fn take(&self, batch: usize) -> Option<Captured> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.get_mut(&batch).and_then(Vec::pop)
    }

    fn give_back(&self, c: Captured) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.entry(c.batch).or_default().push(c);
    }

    /// The logits of `images` padded to `batch`, by replay; `None` when no captured pass
    /// of that size is free (the caller runs it eagerly). A pass whose replay failed is
    /// dropped rather than reused.
    pub fn run(&self, images: &[InputView<'_>], batch: usize) -> Option<Result<Logits>> {
        let mut c = self.take(batch)?;
        let out = c.run(images);
        if out.is_ok() {
            self.give_back(c);
        }
        Some(out)
    }

    /// Launches the captured pass of `batch` on whatever input it holds, without copies
    /// or waiting; `None` when none is free.
    pub fn launch_resident(&self, batch: usize) -> Option<Result<()>> {
        let c = self.take(batch)?;
        let out = c.launch();
        self.give_back(c);
        Some(out)
    }
}
