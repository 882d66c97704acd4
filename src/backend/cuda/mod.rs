//! The GPU backend: a `Gpu` is one device opened for use — its driver (the CUDA driver, or the
//! software device that runs the same kernels on the CPU, see `driver`), a caching pool so that
//! after warm-up nothing is allocated, and the sticky failure state.
//!
//! UNTESTED ON A GPU: this code compiles (nvcc, cudarc) but has not run on a device yet. Above the
//! `Driver` interface it runs in CI on the software device (`--features emu`, tests/gpu.rs).
//!
//! Errors (out of memory, a failed launch) are sticky, as CUDA's own are: an op that fails records
//! the first error and later ops on that `Gpu` do nothing; callers check `Gpu::check()` at model
//! boundaries and turn it into an ordinary error. Ops themselves stay infallible, like the CPU ones.

pub mod conv;
#[cfg(feature = "cuda")]
mod cublaslt;
#[cfg(feature = "cuda")]
mod cudarc_driver;
#[cfg(feature = "cuda")]
mod cudnn;
pub mod driver;
#[cfg(feature = "emu")]
pub mod emu;
pub mod gemm;
pub mod kernels;
pub mod ops;

#[cfg(feature = "cuda")]
pub use cudarc_driver::{driver_present, embedded_targets, list_devices, DeviceInfo};

use crate::backend::fault::Fault;
use crate::backend::pool::{Block, Pool, RawAlloc, Reserve};
use anyhow::{anyhow, bail, Result};
pub use driver::Limits;
use driver::{check_launch, Driver, GraphExec, LaunchCfg};
use std::fmt;
use std::sync::Arc;
use std::sync::Mutex;

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

/// Device memory for the caching pool (`backend::pool`, where its rules are tested).
pub struct DeviceMem {
    driver: Arc<dyn Driver>,
}

impl RawAlloc for DeviceMem {
    fn malloc(&self, bytes: usize) -> std::result::Result<u64, String> {
        self.driver.malloc(bytes)
    }

    fn free(&self, ptr: u64) {
        self.driver.free(ptr)
    }

    fn sync(&self) {
        let _ = self.driver.synchronize();
    }
}

/// One device opened for use: a storage-type view (`dtype`) of the shared driver, pool and
/// failure state. Views of other storage types (`with_dtype`) share everything else, so a model
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
    /// `TOFFEE_KERNELS=reference`: the simple kernels instead of the tuned ones, so a wrong result
    /// on a device can be bisected to one kernel.
    reference: std::sync::atomic::AtomicBool,
    /// `TOFFEE_AUTOTUNE=1`: GEMM and convolution plans time their candidate algorithms on the
    /// first (eager) call of a shape instead of taking the libraries' heuristic first choice.
    autotune: std::sync::atomic::AtomicBool,
    driver: Arc<dyn Driver>,
    /// cuBLASLt's workspace, held for the Gpu's life so captured graphs may use it.
    gemm_ws: Option<Block<DeviceMem>>,
    pool: Arc<Pool<DeviceMem>>,
    /// The private memory of the graph being captured, if any.
    capture: Mutex<Option<Arc<Reserve<DeviceMem>>>>,
    error: Fault,
    /// Tests: fill every new allocation with 0xFF bytes (NaN in fp16/bf16/f32) so a kernel that
    /// leaves outputs unwritten fails loudly.
    poison: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for Gpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?})", self.name(), self.dtype)
    }
}

/// A captured graph and its private memory: the reserve is dropped after the graph (fields drop
/// in order), never before, or an eager allocation could receive an address the graph writes.
pub struct Graph {
    exec: Box<dyn GraphExec>,
    _reserve: Arc<Reserve<DeviceMem>>,
    gpu: Arc<Gpu>,
}

impl Graph {
    /// Replays the captured work on the device's stream.
    pub fn launch(&self) -> Result<()> {
        self.exec
            .launch()
            .map_err(|e| anyhow!("{}: graph launch: {e}", self.gpu.name()))
    }
}

impl Gpu {
    /// `cuda`, `cuda:N` (the CUDA driver) or `emu` (the software device, with the `emu` feature).
    pub fn open(spec: &str, dtype: DType) -> Result<Arc<Gpu>> {
        let driver: Arc<dyn Driver> = if spec == "emu" {
            #[cfg(feature = "emu")]
            {
                Arc::new(emu::EmuDriver::open(&kernels::specs(), Limits::GPU)?)
            }
            #[cfg(not(feature = "emu"))]
            bail!("device `emu`: this build has no software device; rebuild with `--features emu`")
        } else {
            let ordinal = match spec {
                "cuda" => 0,
                s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                    Some(Ok(n)) => n,
                    _ => bail!("device `{s}`: expected cuda:N with N a device number"),
                },
            };
            #[cfg(feature = "cuda")]
            {
                Arc::new(cudarc_driver::CudaDriver::open(ordinal, &kernels::specs())?)
            }
            #[cfg(not(feature = "cuda"))]
            bail!(
                "device `{spec}`: this build has no CUDA backend (cuda:{ordinal}); rebuild with \
                 `--features cuda`"
            )
        };
        Self::with_driver(driver, dtype)
    }

    /// The software device with smaller limits than a GPU's, so tests run the paths that split
    /// work at the limits (see `Limits`) at tiny sizes.
    #[cfg(feature = "emu")]
    pub fn open_emu(limits: Limits, dtype: DType) -> Result<Arc<Gpu>> {
        Self::with_driver(
            Arc::new(emu::EmuDriver::open(&kernels::specs(), limits)?),
            dtype,
        )
    }

    fn with_driver(driver: Arc<dyn Driver>, dtype: DType) -> Result<Arc<Gpu>> {
        let name = driver.name().to_string();
        let pool = Pool::new(DeviceMem {
            driver: driver.clone(),
        });
        let gemm_ws = Some(
            pool.take(GEMM_WORKSPACE, None)
                .map_err(|e| anyhow!("{name}: cuBLASLt workspace: {e}"))?,
        );
        Ok(Arc::new(Gpu {
            dtype,
            core: Arc::new(GpuCore {
                reference: std::sync::atomic::AtomicBool::new(kernels_reference()?),
                autotune: std::sync::atomic::AtomicBool::new(autotune_requested()?),
                driver,
                gemm_ws,
                pool,
                capture: Mutex::new(None),
                error: Fault::default(),
                poison: std::sync::atomic::AtomicBool::new(false),
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

    /// `cuda:N` or `emu`.
    pub fn name(&self) -> &str {
        self.driver.name()
    }

    pub fn limits(&self) -> Limits {
        self.driver.limits()
    }

    pub fn driver(&self) -> &Arc<dyn Driver> {
        &self.driver
    }

    /// Queues a planned GEMM (see `gemm`); a failure is recorded like a failed launch.
    pub fn gemm(&self, shape: &gemm::Shape, operands: &gemm::Operands) {
        if self.failed() {
            return;
        }
        let ws = self
            .gemm_ws
            .as_ref()
            .map_or((0, 0), |b| (b.ptr, GEMM_WORKSPACE));
        let tune = |run: &mut dyn FnMut() -> bool| self.time_ms(run);
        let tune = self.autotune().then_some(&tune as &driver::Timer);
        if let Err(e) = self.driver.gemm(shape, operands, ws, tune) {
            self.fail(e);
        }
    }

    /// GEMM shapes planned so far (each planned once).
    pub fn gemm_plans(&self) -> usize {
        self.driver.gemm_plans()
    }

    /// Convolution shapes planned so far (refusals included).
    pub fn conv_plans(&self) -> usize {
        self.driver.conv_plans()
    }

    /// Records the first failure; later ops become no-ops until `check` reports it.
    pub fn fail(&self, what: impl fmt::Display) {
        self.error.record(format!("{}: {what}", self.name()), false);
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
        let _ = self.driver.synchronize();
        let cleared = self.error.clear_recoverable()?;
        self.pool.trim();
        Ok(cleared)
    }

    /// Waits for all queued work; reports launch-time and asynchronous errors.
    pub fn synchronize(&self) -> Result<()> {
        if let Err(e) = self.driver.synchronize() {
            self.fail(e);
        }
        self.check()
    }

    /// Bytes held by the pool (in use or cached).
    pub fn pool_bytes(&self) -> usize {
        self.pool.held()
    }

    fn capturing(&self) -> bool {
        self.capture.lock().unwrap().is_some()
    }

    /// A pool block (the capture's private memory while a graph is being captured); None after a
    /// recorded failure, so nothing runs on a null pointer.
    fn alloc_raw(&self, bytes: usize) -> Option<Block<DeviceMem>> {
        if self.failed() {
            return None;
        }
        let reserve = self.capture.lock().unwrap().clone();
        match self.pool.take(bytes, reserve.as_ref()) {
            Ok(b) => Some(b),
            Err(e) => {
                self.error.record(format!("{}: {e}", self.name()), true);
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
    pub fn time_ms(&self, f: &mut dyn FnMut() -> bool) -> Option<f32> {
        if self.capturing() || self.failed() {
            return None;
        }
        self.driver.time_ms(f)
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
            if let Err(e) = self.driver.memset(ptr, 0xFF, bytes) {
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
        let bytes: Vec<u8> = match dtype {
            DType::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::I32 => data
                .iter()
                .flat_map(|v| (*v as i32).to_le_bytes())
                .collect(),
            DType::F16 => data
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            DType::BF16 => data
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        };
        self.htod(buf.ptr(), &bytes);
        buf
    }

    /// i32 values (token ids, row indices) -> device.
    pub fn upload_i32(self: &Arc<Self>, data: &[i32]) -> DevBuf {
        let buf = self.alloc(data.len(), DType::I32);
        if !self.failed() && !data.is_empty() {
            let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.htod(buf.ptr(), &bytes);
        }
        buf
    }

    fn htod(&self, dst: u64, src: &[u8]) {
        if let Err(e) = self.driver.htod(dst, src) {
            self.fail(e);
        }
    }

    /// Queues a kernel. `grid` and `block` are 1-D or 2-D.
    pub fn launch(&self, name: &str, grid: (u32, u32), block: u32, args: &[Arg]) {
        self.launch_smem(name, grid, block, 0, args)
    }

    /// `launch` with `smem` bytes of dynamic shared memory (see `kernels`). Launches a GPU
    /// would refuse (too many threads, a grid dimension past its limit, more shared memory than
    /// the kernel opted into) are refused here on every device, with the kernel's name.
    pub fn launch_smem(&self, name: &str, grid: (u32, u32), block: u32, smem: u32, args: &[Arg]) {
        if self.failed() {
            return;
        }
        let Some(limit) = self.driver.smem_limit(name) else {
            self.fail(format!("kernel {name} is not in the embedded modules"));
            return;
        };
        let cfg = LaunchCfg {
            grid: (grid.0.max(1), grid.1.max(1), 1),
            block,
            smem,
        };
        let r = check_launch(name, &cfg, limit, &self.driver.limits())
            .and_then(|_| self.driver.launch(name, &cfg, args));
        if let Err(e) = r {
            self.fail(e);
        }
    }

    /// Device-to-device copy of `bytes` bytes.
    pub fn copy(&self, dst: u64, src: u64, bytes: usize) {
        if self.failed() || bytes == 0 {
            return;
        }
        if let Err(e) = self.driver.dtod(dst, src, bytes) {
            self.fail(e);
        }
    }

    /// Starts capturing; until `end_capture`, allocations come from a private reserve that the
    /// graph keeps (see `backend::pool`).
    pub fn begin_capture(&self) -> Result<()> {
        *self.capture.lock().unwrap() = Some(self.pool.reserve());
        self.driver.begin_capture().map_err(|e| {
            *self.capture.lock().unwrap() = None;
            anyhow!("{}: {e}", self.name())
        })
    }

    /// The captured graph, holding its private memory.
    pub fn end_capture(self: &Arc<Self>) -> Result<Graph> {
        let reserve = self.capture.lock().unwrap().take();
        // The capture ends either way; a failure recorded during it (out of memory) says more
        // than the driver's complaint about the capture.
        let exec = self.driver.end_capture();
        self.check()?;
        let exec = exec.map_err(|e| anyhow!("{}: {e}", self.name()))?;
        Ok(Graph {
            exec,
            _reserve: reserve.expect("begin_capture set it"),
            gpu: self.clone(),
        })
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
    block: Option<Block<DeviceMem>>,
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
        let mut bytes = vec![0u8; self.bytes()];
        if !bytes.is_empty() {
            g.driver
                .dtoh(&mut bytes, self.ptr())
                .map_err(|e| anyhow!("{}: {e}", g.name()))?;
        }
        let two = |c: &[u8]| [c[0], c[1]];
        let four = |c: &[u8]| [c[0], c[1], c[2], c[3]];
        Ok(match self.dtype {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(four(c)))
                .collect(),
            DType::I32 => bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(four(c)) as f32)
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes(two(c)).to_f32())
                .collect(),
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes(two(c)).to_f32())
                .collect(),
        })
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
    #[cfg(feature = "cuda")]
    #[test]
    fn every_kernel_name_is_embedded() {
        for spec in super::kernels::specs() {
            assert!(
                super::cudarc_driver::fatbin_has(spec.module, &spec.name),
                "kernel {} is not in module {}",
                spec.name,
                spec.module
            );
        }
        let embedded: Vec<&str> = super::cudarc_driver::embedded_modules()
            .iter()
            .map(|(m, _)| *m)
            .collect();
        let mut declared: Vec<&str> = super::kernels::specs().iter().map(|s| s.module).collect();
        declared.sort();
        declared.dedup();
        assert_eq!(
            embedded, declared,
            "one module per kernels/*.cu, each in the table"
        );
    }

    /// The host's copy of flash_tc.cu's shared-memory formula, on the values its header states,
    /// and the opt-in the table derives from it (only above 48 KiB).
    #[test]
    fn flash_tc_shared_memory_matches_the_kernel_header() {
        let want = [
            (40, 28672),
            (64, 36864),
            (80, 45056),
            (128, 69632),
            (160, 43008),
        ];
        let specs = super::kernels::specs();
        let opt_in = |name: String| specs.iter().find(|s| s.name == name).unwrap().max_smem;
        for (d, bytes) in want {
            assert_eq!(super::kernels::flash_tc_smem(d), bytes, "d={d}");
            let want = (bytes > 48 << 10).then_some(bytes);
            assert_eq!(opt_in(format!("flash_tc_d{d}_bf16")), want, "d={d}");
            assert_eq!(opt_in(format!("flash_attention_d{d}_f16")), None);
        }
        let header = include_str!("../../../kernels/flash_tc.cu");
        for (d, bytes) in want {
            assert!(header.contains(&format!("D={d}: {bytes}")), "d={d}");
        }
    }
}
