//! The CUDA backend: one context and stream per `Gpu`, kernels from the fatbins build.rs embeds,
//! cuBLASLt for GEMMs, and a caching pool so that after warm-up nothing is allocated.
//!
//! UNTESTED ON A GPU: this code compiles (nvcc, cudarc) but has not run on a device yet; the GPU
//! tests (tests/gpu.rs) compare every op and model with the CPU backend when a device is present.
//!
//! Errors (out of memory, a failed launch) are sticky, as CUDA's own are: an op that fails records
//! the first error and later ops on that `Gpu` do nothing; callers check `Gpu::check()` at model
//! boundaries and turn it into an ordinary error. Ops themselves stay infallible, like the CPU ones.

pub mod cudnn;
pub mod gemm;
pub mod ops;

use crate::backend::fault::Fault;
use crate::backend::libs::{decide, LibDecision};
use crate::backend::pool::{Block, Pool, RawAlloc, Reserve};
use anyhow::{anyhow, bail, Result};
use cudarc::cublaslt::CudaBlasLT;
use cudarc::driver::{
    result, sys, CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg,
};
use cudnn::CudnnHandle;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// GPU code targets embedded in this build (e.g. sm_80, sm_90).
pub fn embedded_targets() -> &'static [&'static str] {
    embedded::TARGETS
}

/// Storage type of device tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    BF16,
    F32,
    /// Token ids and row indices.
    I32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
        }
    }
    pub fn suffix(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
            DType::I32 => "i32",
        }
    }
}

/// Whether the CUDA driver library can be loaded (cudarc panics when it is missing).
pub fn driver_present() -> bool {
    // Safety: only probes for the shared library.
    unsafe { sys::is_culib_present() }
}

/// (ordinal, name, compute capability, memory in bytes).
pub type DeviceInfo = (usize, String, (i32, i32), usize);

/// Name, compute capability and memory of every visible device, or why there are none.
pub fn list_devices() -> Result<Vec<DeviceInfo>> {
    if !driver_present() {
        bail!("no CUDA driver library (libcuda.so) on this machine");
    }
    let n = CudaContext::device_count().map_err(|e| anyhow!("CUDA driver: {e}"))?;
    let mut out = Vec::new();
    for i in 0..n as usize {
        let ctx = CudaContext::new(i).map_err(|e| anyhow!("device {i}: {e}"))?;
        out.push((
            i,
            ctx.name().unwrap_or_default(),
            ctx.compute_capability().unwrap_or((0, 0)),
            ctx.total_mem().unwrap_or(0),
        ));
    }
    Ok(out)
}

/// Device memory for the caching pool (`backend::pool`, where its rules are tested).
pub struct CudaMem {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl RawAlloc for CudaMem {
    fn malloc(&self, bytes: usize) -> std::result::Result<u64, String> {
        self.ctx.bind_to_thread().map_err(|e| e.to_string())?;
        // Safety: a plain device allocation, owned by the pool until it frees it.
        unsafe { result::malloc_sync(bytes) }.map_err(|e| e.to_string())
    }

    fn free(&self, ptr: u64) {
        if self.ctx.bind_to_thread().is_ok() {
            // Safety: `ptr` came from `malloc` and the pool hands it out no more; `sync` ran
            // first, so no queued kernel still uses it.
            let _ = unsafe { result::free_sync(ptr) };
        }
    }

    fn sync(&self) {
        let _ = self.stream.synchronize();
    }
}

/// One device opened for use: a storage-type view (`dtype`) of the shared context, stream, pool
/// and libraries. Views of other storage types (`with_dtype`) share everything else, so a model
/// that must run in bf16 (a `force_upcast` VAE) stays in the same stream order as the rest.
pub struct Gpu {
    core: Arc<GpuCore>,
    pub dtype: DType,
}

impl std::ops::Deref for Gpu {
    type Target = GpuCore;
    fn deref(&self) -> &GpuCore {
        &self.core
    }
}

pub struct GpuCore {
    pub ordinal: usize,
    /// `TOFFEE_KERNELS=reference`: the simple kernels instead of the tuned ones, so a wrong result
    /// on a device can be bisected to one kernel.
    reference: std::sync::atomic::AtomicBool,
    /// `TOFFEE_AUTOTUNE=1`: GEMM and convolution plans time their candidate algorithms on the
    /// first (eager) call of a shape instead of taking the libraries' heuristic first choice.
    autotune: std::sync::atomic::AtomicBool,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlasLT,
    gemm: gemm::Planner,
    /// cuBLASLt's workspace, held for the Gpu's life so captured graphs may use it.
    gemm_ws: Option<Block<CudaMem>>,
    funcs: HashMap<String, CudaFunction>,
    pool: Arc<Pool<CudaMem>>,
    /// The private memory of the graph being captured, if any.
    capture: Mutex<Option<Arc<Reserve<CudaMem>>>>,
    error: Fault,
    /// Tests: fill every new allocation with 0xFF bytes (NaN in fp16/bf16/f32) so a kernel that
    /// leaves outputs unwritten fails loudly.
    poison: std::sync::atomic::AtomicBool,
    /// cuDNN, when libcudnn is present (else convolutions fall back to im2col + cuBLASLt).
    cudnn: Option<Mutex<CudnnHandle>>,
}

impl fmt::Debug for Gpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cuda:{} ({:?})", self.ordinal, self.dtype)
    }
}

impl Gpu {
    /// Opens device `ordinal` with its own stream and loads every embedded kernel module.
    pub fn new(ordinal: usize, dtype: DType) -> Result<Arc<Gpu>> {
        if !driver_present() {
            bail!("cuda:{ordinal}: no CUDA driver library (libcuda.so) on this machine");
        }
        let n = CudaContext::device_count().map_err(|e| anyhow!("CUDA driver: {e}"))?;
        if ordinal >= n.max(0) as usize {
            bail!("cuda:{ordinal}: this machine has {n} CUDA device(s)");
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("cuda:{ordinal}: {e}"))?;
        // Safety: everything runs on this Gpu's single stream, so stream order is all the
        // synchronisation needed; cudarc's per-buffer events would also break graph capture.
        unsafe { ctx.disable_event_tracking() };
        // Graph capture needs a non-default stream.
        let stream = ctx
            .new_stream()
            .map_err(|e| anyhow!("cuda:{ordinal}: cannot create a stream: {e}"))?;
        // Safety (both probes): they only look for the shared libraries; the version calls run
        // only once a library is known to be present (cudarc panics on a missing one).
        let blas_present = unsafe { cudarc::cublaslt::sys::is_culib_present() };
        let blas_version =
            blas_present.then(|| unsafe { cudarc::cublaslt::sys::cublasLtGetVersion() });
        let blas = match decide("cuBLASLt", blas_present, blas_version, 13, Ok(()), false) {
            LibDecision::Use => CudaBlasLT::new(stream.clone())
                .map_err(|e| anyhow!("cuda:{ordinal}: cuBLASLt does not start: {e:?}"))?,
            LibDecision::Fail(why) | LibDecision::Skip(why) => bail!(
                "cuda:{ordinal}: {why}; install CUDA 13's cuBLAS (e.g. the nvidia-cublas wheel) \
                 and put its lib folder on LD_LIBRARY_PATH"
            ),
        };
        let cudnn_present = unsafe { cudarc::cudnn::sys::is_culib_present() };
        let cudnn_version = cudnn_present.then(|| unsafe { cudarc::cudnn::sys::cudnnGetVersion() });
        let version_ok = cudnn_version.is_some_and(|v| v / 10000 == 9);
        let handle = if version_ok {
            Some(cudarc::cudnn::Cudnn::new(stream.clone()).map_err(|e| format!("{e:?}")))
        } else {
            None
        };
        let started = match &handle {
            Some(Err(e)) => Err(e.clone()),
            _ => Ok(()),
        };
        let cudnn = match decide("cuDNN", cudnn_present, cudnn_version, 9, started, true) {
            LibDecision::Use => handle
                .and_then(|h| h.ok())
                .map(|h| Mutex::new(CudnnHandle::new(h))),
            LibDecision::Skip(why) | LibDecision::Fail(why) => {
                if cudnn_present {
                    eprintln!(
                        "toffee: warning: cuda:{ordinal}: {why}; convolutions use im2col + cuBLASLt"
                    );
                }
                None
            }
        };
        let mut funcs = HashMap::new();
        for (name, fatbin) in embedded::MODULES {
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(fatbin.to_vec()))
                .map_err(|e| {
                    anyhow!(
                        "cuda:{ordinal}: cannot load kernel module {name} (built for {:?}): {e}",
                        embedded::TARGETS
                    )
                })?;
            for f in kernel_names(name) {
                let func = module.load_function(&f).map_err(|e| {
                    anyhow!("cuda:{ordinal}: kernel {f} missing from module {name}: {e}")
                })?;
                if let Some(bytes) = dynamic_smem(&f) {
                    func.set_attribute(
                        sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        bytes as i32,
                    )
                    .map_err(|e| anyhow!("cuda:{ordinal}: {f}: {bytes} B of shared memory: {e}"))?;
                }
                funcs.insert(f, func);
            }
        }
        let pool = Pool::new(CudaMem {
            ctx: ctx.clone(),
            stream: stream.clone(),
        });
        let gemm_ws = Some(
            pool.take(GEMM_WORKSPACE, None)
                .map_err(|e| anyhow!("cuda:{ordinal}: cuBLASLt workspace: {e}"))?,
        );
        Ok(Arc::new(Gpu {
            dtype,
            core: Arc::new(GpuCore {
                ordinal,
                reference: std::sync::atomic::AtomicBool::new(kernels_reference()?),
                autotune: std::sync::atomic::AtomicBool::new(autotune_requested()?),
                ctx,
                stream,
                blas,
                gemm: gemm::Planner::default(),
                gemm_ws,
                funcs,
                pool,
                capture: Mutex::new(None),
                error: Fault::default(),
                poison: std::sync::atomic::AtomicBool::new(false),
                cudnn,
            }),
        }))
    }

    /// The same device with another storage type for new tensors (see `Gpu`).
    pub fn with_dtype(&self, dtype: DType) -> Arc<Gpu> {
        Arc::new(Gpu {
            core: self.core.clone(),
            dtype,
        })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn blas(&self) -> &CudaBlasLT {
        &self.blas
    }

    /// Queues a planned cuBLASLt GEMM (see `gemm`); a failure is recorded like a failed launch.
    pub fn gemm(&self, shape: &gemm::Shape, operands: &gemm::Operands) {
        if self.failed() {
            return;
        }
        use cudarc::cublaslt::MatmulShared;
        let ws = self
            .gemm_ws
            .as_ref()
            .map_or((0, 0), |b| (b.ptr, GEMM_WORKSPACE));
        let tune = |run: &mut dyn FnMut() -> bool| self.time_ms(run);
        // Safety: the handle lives with the Gpu; callers pass operands of the extents in `shape`;
        // the workspace block is held until the Gpu drops.
        let r = unsafe {
            self.gemm.run(
                *self.blas.handle(),
                self.stream.cu_stream() as _,
                shape,
                operands,
                ws,
                self.autotune().then_some(&tune as &gemm::Timer),
            )
        };
        if let Err(e) = r {
            self.fail(e);
        }
    }

    /// GEMM shapes planned so far (each planned once).
    pub fn gemm_plans(&self) -> usize {
        self.gemm.planned()
    }

    pub fn cudnn(&self) -> Option<&Mutex<CudnnHandle>> {
        self.cudnn.as_ref()
    }

    /// Records the first failure; later ops become no-ops until `check` reports it.
    pub fn fail(&self, what: impl fmt::Display) {
        self.error
            .record(format!("cuda:{}: {what}", self.ordinal), false);
    }

    pub fn failed(&self) -> bool {
        self.error.is_set()
    }

    /// The first recorded failure, as an error.
    pub fn check(&self) -> Result<()> {
        self.error.check()
    }

    /// After an out-of-memory failure: waits for queued work, clears the failure and returns the
    /// pool's cache, so a smaller batch can run: Ok(true) when a failure was cleared. Any other
    /// failure stays (Err).
    pub fn recover(&self) -> Result<bool> {
        let _ = self.stream.synchronize();
        let cleared = self.error.clear_recoverable()?;
        self.pool.trim();
        Ok(cleared)
    }

    /// Waits for all queued work; reports launch-time and asynchronous errors.
    pub fn synchronize(&self) -> Result<()> {
        if let Err(e) = self.stream.synchronize() {
            self.fail(e);
        }
        self.check()
    }

    /// Bytes held by the pool (in use or cached).
    pub fn pool_bytes(&self) -> usize {
        self.pool.held()
    }

    /// A pool block (the capture's private memory while a graph is being captured); None after a
    /// recorded failure, so nothing runs on a null pointer.
    fn alloc_raw(&self, bytes: usize) -> Option<Block<CudaMem>> {
        if self.failed() {
            return None;
        }
        let reserve = self.capture.lock().unwrap().clone();
        match self.pool.take(bytes, reserve.as_ref()) {
            Ok(b) => Some(b),
            Err(e) => {
                self.error
                    .record(format!("cuda:{}: {e}", self.ordinal), true);
                None
            }
        }
    }

    /// Whether plans time their candidates (`TOFFEE_AUTOTUNE=1`).
    pub fn autotune(&self) -> bool {
        self.autotune.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Tests: autotune shapes planned from now on.
    pub fn set_autotune(&self, on: bool) {
        self.autotune
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Milliseconds per run of `f` (queued work on this Gpu's stream), averaged over 3 runs after
    /// a warm-up; None while a graph is being captured (nothing may wait then), after a failure,
    /// or when `f` reports one. Used by autotuning only.
    pub fn time_ms(&self, mut f: impl FnMut() -> bool) -> Option<f32> {
        if self.capture.lock().unwrap().is_some() || self.failed() || !f() {
            return None;
        }
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.stream.record_event(timing).ok()?;
        for _ in 0..3 {
            if !f() {
                return None;
            }
        }
        let end = self.stream.record_event(timing).ok()?;
        start.elapsed_ms(&end).ok().map(|t| t / 3.0)
    }

    /// Whether the simple reference kernels run instead of the tuned ones (`TOFFEE_KERNELS`).
    pub fn reference(&self) -> bool {
        self.reference.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Tests: switch between the reference and the tuned kernels on a live device.
    pub fn set_reference(&self, on: bool) {
        self.reference
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn set_poison(&self, on: bool) {
        self.poison.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// An uninitialised device buffer of `len` elements of `dtype`.
    pub fn alloc(self: &Arc<Self>, len: usize, dtype: DType) -> DevBuf {
        let bytes = (len * dtype.size()).max(1);
        let block = self.alloc_raw(bytes);
        let ptr = block.as_ref().map_or(0, |b| b.ptr);
        if ptr != 0 && self.poison.load(std::sync::atomic::Ordering::Relaxed) {
            // Safety: a live pool buffer of at least `bytes` bytes, on our stream.
            if let Err(e) =
                unsafe { result::memset_d8_async(ptr, 0xFF, bytes, self.stream.cu_stream()) }
            {
                self.fail(e);
            }
        }
        DevBuf {
            mem: Arc::new(DevMem {
                gpu: self.clone(),
                block,
            }),
            len,
            dtype,
        }
    }

    /// Host f32 values -> device buffer of `dtype`.
    pub fn upload(self: &Arc<Self>, data: &[f32], dtype: DType) -> DevBuf {
        let buf = self.alloc(data.len(), dtype);
        if self.failed() || data.is_empty() {
            return buf;
        }
        let r = match dtype {
            DType::F32 => self.htod(buf.ptr(), data),
            DType::I32 => self.htod(
                buf.ptr(),
                &data.iter().map(|v| *v as i32).collect::<Vec<_>>(),
            ),
            DType::F16 => self.htod(
                buf.ptr(),
                &data
                    .iter()
                    .map(|v| half::f16::from_f32(*v))
                    .collect::<Vec<_>>(),
            ),
            DType::BF16 => self.htod(
                buf.ptr(),
                &data
                    .iter()
                    .map(|v| half::bf16::from_f32(*v))
                    .collect::<Vec<_>>(),
            ),
        };
        if let Err(e) = r {
            self.fail(e);
        }
        buf
    }

    /// i32 values (token ids, row indices) -> device.
    pub fn upload_i32(self: &Arc<Self>, data: &[i32]) -> DevBuf {
        let buf = self.alloc(data.len(), DType::I32);
        if !self.failed() && !data.is_empty() {
            if let Err(e) = self.htod(buf.ptr(), data) {
                self.fail(e);
            }
        }
        buf
    }

    fn htod<T>(&self, dst: u64, src: &[T]) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| anyhow!("{e}"))?;
        // Safety: dst holds at least size_of_val(src) bytes. A copy from pageable memory is staged
        // before this returns, so `src` may go away afterwards; on our stream it is ordered after
        // earlier kernels that may still use a recycled `dst`.
        unsafe {
            result::memcpy_htod_async(dst, src, self.stream.cu_stream()).map_err(|e| anyhow!("{e}"))
        }
    }

    /// Queues a kernel. `grid` and `block` are 1-D or 2-D.
    pub fn launch(&self, name: &str, grid: (u32, u32), block: u32, args: &[Arg]) {
        self.launch_smem(name, grid, block, 0, args)
    }

    /// `launch` with `smem` bytes of dynamic shared memory (see `dynamic_smem`).
    pub fn launch_smem(&self, name: &str, grid: (u32, u32), block: u32, smem: u32, args: &[Arg]) {
        if self.failed() {
            return;
        }
        let Some(f) = self.funcs.get(name) else {
            self.fail(format!("kernel {name} is not in the embedded modules"));
            return;
        };
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::P(v) => b.arg(v),
                Arg::I(v) => b.arg(v),
                Arg::L(v) => b.arg(v),
                Arg::F(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (grid.0.max(1), grid.1.max(1), 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: smem,
        };
        // Safety: argument lists match the extern "C" signatures in kernels/ (checked by the GPU tests).
        if let Err(e) = unsafe { b.launch(cfg) } {
            self.fail(format!("launching {name}: {e}"));
        }
    }

    /// Device-to-device copy of `bytes` bytes.
    pub fn copy(&self, dst: u64, src: u64, bytes: usize) {
        if self.failed() || bytes == 0 {
            return;
        }
        // Safety: both ranges are live pool buffers of at least `bytes` bytes.
        if let Err(e) =
            unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
        {
            self.fail(e);
        }
    }

    /// Starts capturing; until `end_capture`, allocations come from a private reserve that the
    /// graph keeps (see `backend::pool`).
    pub fn begin_capture(&self) -> Result<()> {
        *self.capture.lock().unwrap() = Some(self.pool.reserve());
        let r = self
            .stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED);
        r.map_err(|e| {
            *self.capture.lock().unwrap() = None;
            anyhow!("cuda:{}: begin graph capture: {e}", self.ordinal)
        })
    }

    /// The captured graph and its private memory: keep the reserve as long as the graph (drop it
    /// after the graph), or an eager allocation could receive an address the graph writes.
    pub fn end_capture(&self) -> Result<(cudarc::driver::CudaGraph, Arc<Reserve<CudaMem>>)> {
        let reserve = self.capture.lock().unwrap().take();
        let g = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(|e| anyhow!("cuda:{}: end graph capture: {e}", self.ordinal))?;
        self.check()?;
        let g =
            g.ok_or_else(|| anyhow!("cuda:{}: graph capture recorded nothing", self.ordinal))?;
        Ok((g, reserve.expect("begin_capture set it")))
    }
}

/// cuBLASLt workspace: 32 MiB, what NVIDIA recommends for Hopper.
const GEMM_WORKSPACE: usize = 32 << 20;

/// `TOFFEE_AUTOTUNE`: `1` times candidate algorithms per shape, `0` or unset takes heuristics.
pub fn autotune_requested() -> Result<bool> {
    parse_autotune(std::env::var("TOFFEE_AUTOTUNE").ok().as_deref())
}

fn parse_autotune(v: Option<&str>) -> Result<bool> {
    match v {
        None | Some("") | Some("0") => Ok(false),
        Some("1") => Ok(true),
        Some(other) => bail!("TOFFEE_AUTOTUNE={other}: expected 1 or 0"),
    }
}

/// `TOFFEE_KERNELS`: `reference` picks the simple kernels, `fast` (the default) the tuned ones.
pub fn kernels_reference() -> Result<bool> {
    parse_kernels(std::env::var("TOFFEE_KERNELS").ok().as_deref())
}

fn parse_kernels(v: Option<&str>) -> Result<bool> {
    match v {
        None | Some("") | Some("fast") => Ok(false),
        Some("reference") => Ok(true),
        Some(other) => bail!("TOFFEE_KERNELS={other}: expected `reference` or `fast`"),
    }
}

/// A kernel argument: device pointer, 32-bit int, 64-bit int (`long`), float.
#[derive(Clone, Copy)]
pub enum Arg {
    P(u64),
    I(i32),
    L(i64),
    F(f32),
}

/// One pool allocation (None after a failure); its block returns to the pool (or to the graph
/// reserve it came from) when the last buffer using it is dropped.
pub struct DevMem {
    gpu: Arc<Gpu>,
    block: Option<Block<CudaMem>>,
}

/// A device buffer of `len` elements of `dtype`.
#[derive(Clone)]
pub struct DevBuf {
    mem: Arc<DevMem>,
    pub len: usize,
    pub dtype: DType,
}

impl fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DevBuf({:?} × {} on {:?})",
            self.dtype, self.len, self.mem.gpu
        )
    }
}

impl DevBuf {
    pub fn ptr(&self) -> u64 {
        self.mem.block.as_ref().map_or(0, |b| b.ptr)
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.mem.gpu
    }

    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }

    /// Values converted to f32 on the host (waits for queued work).
    pub fn download(&self) -> Result<Vec<f32>> {
        let g = self.gpu();
        g.synchronize()?;
        g.ctx.bind_to_thread().map_err(|e| anyhow!("{e}"))?;
        // Safety: the buffer holds `len` elements of `dtype`; the stream is idle.
        unsafe {
            Ok(match self.dtype {
                DType::F32 => {
                    let mut v = vec![0f32; self.len];
                    result::memcpy_dtoh_sync(&mut v, self.ptr()).map_err(|e| anyhow!("{e}"))?;
                    v
                }
                DType::F16 => {
                    let mut v = vec![half::f16::ZERO; self.len];
                    result::memcpy_dtoh_sync(&mut v, self.ptr()).map_err(|e| anyhow!("{e}"))?;
                    v.iter().map(|x| x.to_f32()).collect()
                }
                DType::BF16 => {
                    let mut v = vec![half::bf16::ZERO; self.len];
                    result::memcpy_dtoh_sync(&mut v, self.ptr()).map_err(|e| anyhow!("{e}"))?;
                    v.iter().map(|x| x.to_f32()).collect()
                }
                DType::I32 => {
                    let mut v = vec![0i32; self.len];
                    result::memcpy_dtoh_sync(&mut v, self.ptr()).map_err(|e| anyhow!("{e}"))?;
                    v.iter().map(|x| *x as f32).collect()
                }
            })
        }
    }

    /// Elements `start..start+len` as a new buffer.
    pub fn copy_range(&self, start: usize, len: usize) -> DevBuf {
        let g = self.gpu();
        let out = g.alloc(len, self.dtype);
        g.copy(
            out.ptr(),
            self.ptr() + (start * self.dtype.size()) as u64,
            len * self.dtype.size(),
        );
        out
    }

    /// Buffers one after the other.
    pub fn concat(parts: &[&DevBuf]) -> DevBuf {
        let g = parts[0].gpu();
        let dtype = parts[0].dtype;
        let out = g.alloc(parts.iter().map(|p| p.len).sum(), dtype);
        let mut off = 0;
        for p in parts {
            if p.dtype != dtype {
                g.fail("concatenating buffers of different dtypes");
            }
            g.copy(out.ptr() + off as u64, p.ptr(), p.bytes());
            off += p.bytes();
        }
        out
    }

    /// Whether both are views of one allocation (device buffers are never written in place, except
    /// graph inputs through `copy_from`, so the same live allocation means the same values).
    pub fn same(&self, other: &DevBuf) -> bool {
        Arc::ptr_eq(&self.mem, &other.mem) && self.len == other.len && self.dtype == other.dtype
    }

    /// Overwrites this buffer with `src` (same size): graph inputs are refreshed this way.
    pub fn copy_from(&self, src: &DevBuf) {
        if src.bytes() != self.bytes() {
            self.gpu().fail(format!(
                "copy of {} bytes into a {}-byte buffer",
                src.bytes(),
                self.bytes()
            ));
            return;
        }
        self.gpu().copy(self.ptr(), src.ptr(), self.bytes());
    }
}

/// Head dims the attention kernels are instantiated for (kernels/attention.cu, flash_tc.cu).
pub const FLASH_DIMS: [usize; 5] = [40, 64, 80, 128, 160];

/// Dynamic shared memory of the tensor-core flash kernel for head dim `d` (kernels/flash_tc.cu's
/// `Cfg<D>::SMEM_BYTES`): four key/value tiles of BC rows, each row padded to a multiple of 16
/// plus an 8-half skew.
pub fn flash_tc_smem(d: usize) -> u32 {
    let pitch = d.div_ceil(16) * 16 + 8;
    let bc = if d <= 128 { 64 } else { 32 };
    (4 * bc * pitch * 2) as u32
}

/// Kernels launched with more than the default 48 KiB of dynamic shared memory allowed.
fn dynamic_smem(kernel: &str) -> Option<u32> {
    let d = kernel.strip_prefix("flash_tc_d")?.split('_').next()?;
    d.parse().ok().map(flash_tc_smem)
}

/// The extern "C" kernel names each module defines (see kernels/*.cu).
fn kernel_names(module: &str) -> Vec<String> {
    let typed = |names: &[&str], types: &[&str]| -> Vec<String> {
        names
            .iter()
            .flat_map(|n| types.iter().map(move |t| format!("{n}_{t}")))
            .collect()
    };
    match module {
        "norm" => typed(&["group_norm", "layer_norm"], &["f16", "bf16"]),
        "gemm_geglu" => typed(&["gemm_geglu"], &["f16", "bf16"]),
        "norm_fast" => typed(
            &["group_norm_stats", "group_norm_apply", "layer_norm_warp"],
            &["f16", "bf16"],
        ),
        "flash_tc" => {
            let names: Vec<String> = FLASH_DIMS
                .iter()
                .map(|d| format!("flash_tc_d{d}"))
                .collect();
            typed(
                &names.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
                &["f16", "bf16"],
            )
        }
        "attention" => {
            let names: Vec<String> = FLASH_DIMS
                .iter()
                .map(|d| format!("flash_attention_d{d}"))
                .collect();
            let mut refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
            refs.extend(["attn_scores", "attn_pv"]);
            let mut v = typed(&refs, &["f16", "bf16"]);
            v.push("softmax_rows_f32".into());
            v.extend(typed(&["softmax_rows_to"], &["f16", "bf16"]));
            v
        }
        "elementwise" => {
            let mut v = typed(
                &[
                    "act",
                    "glu",
                    "add_scaled",
                    "add_broadcast",
                    "conv_epilogue",
                    "place_channels",
                    "slice_channels",
                    "upsample_nearest",
                    "depth_to_space",
                    "resize_bilinear",
                    "film",
                    "im2col",
                    "timestep_embedding",
                    "gather_rows",
                    "lincomb",
                    "cfg_combine",
                    "mask_mix",
                    "gauss_sample",
                    "affine_clamp",
                ],
                &["f16", "bf16", "f32"],
            );
            v.extend(
                [
                    "cast_f32_f16",
                    "cast_f32_bf16",
                    "cast_f16_f32",
                    "cast_bf16_f32",
                    "cast_f16_bf16",
                    "cast_bf16_f16",
                ]
                .map(String::from),
            );
            v
        }
        "sam" => typed(&["rel_pos_bias"], &["f16", "bf16"]),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_choice_is_read_strictly() {
        assert!(!super::parse_kernels(None).unwrap());
        assert!(!super::parse_kernels(Some("fast")).unwrap());
        assert!(super::parse_kernels(Some("reference")).unwrap());
        let e = super::parse_kernels(Some("ref")).unwrap_err().to_string();
        assert!(e.contains("TOFFEE_KERNELS=ref"), "{e}");
        assert!(!super::parse_autotune(None).unwrap());
        assert!(super::parse_autotune(Some("1")).unwrap());
        let e = super::parse_autotune(Some("yes")).unwrap_err().to_string();
        assert!(e.contains("TOFFEE_AUTOTUNE=yes"), "{e}");
    }

    /// Every kernel the runtime loads by name is in the module build.rs compiled (checked on the
    /// fatbin bytes, so it needs no GPU): a renamed kernel fails here, not at a user's first run.
    #[test]
    fn every_kernel_name_is_embedded() {
        for (module, fatbin) in super::embedded::MODULES {
            for name in super::kernel_names(module) {
                let found = fatbin
                    .windows(name.len() + 1)
                    .any(|w| &w[..name.len()] == name.as_bytes() && w[name.len()] == 0);
                assert!(found, "kernel {name} is not in module {module}");
            }
        }
        assert_eq!(
            super::embedded::MODULES.len(),
            7,
            "norm, norm_fast, attention, flash_tc, gemm_geglu, elementwise, sam"
        );
    }

    /// The host's copy of flash_tc.cu's shared-memory formula, on the values its header states.
    #[test]
    fn flash_tc_shared_memory_matches_the_kernel_header() {
        let want = [
            (40, 28672),
            (64, 36864),
            (80, 45056),
            (128, 69632),
            (160, 43008),
        ];
        for (d, bytes) in want {
            assert_eq!(super::flash_tc_smem(d), bytes, "d={d}");
            assert_eq!(
                super::dynamic_smem(&format!("flash_tc_d{d}_bf16")),
                Some(bytes)
            );
        }
        assert_eq!(super::dynamic_smem("flash_attention_d64_f16"), None);
        let header = include_str!("../../../kernels/flash_tc.cu");
        for (d, bytes) in want {
            assert!(header.contains(&format!("D={d}: {bytes}")), "d={d}");
        }
    }
}
