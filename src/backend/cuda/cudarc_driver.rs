//! The CUDA driver behind `Driver` (UNTESTED ON A GPU: compiled with nvcc and cudarc, never run on
//! a device; the same code above it runs on the software device in CI). One context and one
//! non-default stream (graph capture needs one), kernels from the fatbins build.rs embeds,
//! cuBLASLt for GEMMs and cuDNN, when present, for convolutions.

use super::conv::ConvDesc;
use super::cublaslt::Planner;
use super::cudnn::CudnnPlans;
use super::driver::{ConvPlan, Driver, GraphExec, KernelSpec, LaunchCfg, Timer, DEFAULT_SMEM};
use super::{gemm, Arg};
use crate::backend::libs::{decide, LibDecision};
use anyhow::{anyhow, bail, Result};
use cudarc::cublaslt::CudaBlasLT;
use cudarc::driver::{
    result, sys, CudaContext, CudaFunction, CudaGraph, CudaStream, LaunchConfig, PushKernelArg,
};
use std::collections::HashMap;
use std::sync::Arc;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// GPU code targets embedded in this build (e.g. sm_80, sm_90).
pub fn embedded_targets() -> &'static [&'static str] {
    embedded::TARGETS
}

/// (module name, fatbin) for every kernels/*.cu file.
#[cfg(test)]
pub fn embedded_modules() -> &'static [(&'static str, &'static [u8])] {
    embedded::MODULES
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

pub struct CudaDriver {
    name: String,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlasLT,
    gemm: Planner,
    funcs: HashMap<String, (CudaFunction, u32)>,
    cudnn: Option<CudnnPlans>,
}

// Safety: cudarc's handles are used on the one stream, serialised by the caller's locks where
// they hold raw pointers (GEMM and convolution plans).
unsafe impl Send for CudaDriver {}
unsafe impl Sync for CudaDriver {}

fn blas(name: &str, stream: &Arc<CudaStream>) -> Result<CudaBlasLT> {
    // Safety: the probe only looks for the shared library; the version call runs only once it
    // is known to be present (cudarc panics on a missing one).
    let present = unsafe { cudarc::cublaslt::sys::is_culib_present() };
    let version = present.then(|| unsafe { cudarc::cublaslt::sys::cublasLtGetVersion() });
    match decide("cuBLASLt", present, version, 13, Ok(()), false) {
        LibDecision::Use => CudaBlasLT::new(stream.clone())
            .map_err(|e| anyhow!("{name}: cuBLASLt does not start: {e:?}")),
        LibDecision::Fail(why) | LibDecision::Skip(why) => bail!(
            "{name}: {why}; install CUDA 13's cuBLAS (e.g. the nvidia-cublas wheel) and put its \
             lib folder on LD_LIBRARY_PATH"
        ),
    }
}

fn cudnn(name: &str, stream: &Arc<CudaStream>) -> Option<CudnnPlans> {
    // Safety: as in `blas`.
    let present = unsafe { cudarc::cudnn::sys::is_culib_present() };
    let version = present.then(|| unsafe { cudarc::cudnn::sys::cudnnGetVersion() });
    let handle = version
        .is_some_and(|v| v / 10000 == 9)
        .then(|| cudarc::cudnn::Cudnn::new(stream.clone()).map_err(|e| format!("{e:?}")));
    let started = match &handle {
        Some(Err(e)) => Err(e.clone()),
        _ => Ok(()),
    };
    match decide("cuDNN", present, version, 9, started, true) {
        LibDecision::Use => handle
            .and_then(|h| h.ok())
            .map(|h| CudnnPlans::new(h, stream.clone())),
        LibDecision::Skip(why) | LibDecision::Fail(why) => {
            if present {
                eprintln!("toffee: warning: {name}: {why}; convolutions use im2col + cuBLASLt");
            }
            None
        }
    }
}

impl CudaDriver {
    /// Opens device `ordinal` with its own stream and loads `kernels` from the embedded modules.
    pub fn open(ordinal: usize, kernels: &[KernelSpec]) -> Result<CudaDriver> {
        let name = format!("cuda:{ordinal}");
        if !driver_present() {
            bail!("{name}: no CUDA driver library (libcuda.so) on this machine");
        }
        let n = CudaContext::device_count().map_err(|e| anyhow!("CUDA driver: {e}"))?;
        if ordinal >= n.max(0) as usize {
            bail!("{name}: this machine has {n} CUDA device(s)");
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("{name}: {e}"))?;
        // Safety: everything runs on this device's single stream, so stream order is all the
        // synchronisation needed; cudarc's per-buffer events would also break graph capture.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| anyhow!("{name}: cannot create a stream: {e}"))?;
        let blas = blas(&name, &stream)?;
        let cudnn = cudnn(&name, &stream);
        let mut modules = HashMap::new();
        let mut funcs = HashMap::new();
        for k in kernels {
            if !modules.contains_key(k.module) {
                let fatbin = embedded::MODULES
                    .iter()
                    .find(|(m, _)| *m == k.module)
                    .ok_or_else(|| anyhow!("{name}: no embedded kernel module {}", k.module))?
                    .1;
                let module = ctx
                    .load_module(cudarc::nvrtc::Ptx::from_binary(fatbin.to_vec()))
                    .map_err(|e| {
                        anyhow!(
                            "{name}: cannot load kernel module {} (built for {:?}): {e}",
                            k.module,
                            embedded::TARGETS
                        )
                    })?;
                modules.insert(k.module, module);
            }
            let func = modules[k.module].load_function(&k.name).map_err(|e| {
                anyhow!(
                    "{name}: kernel {} missing from module {}: {e}",
                    k.name,
                    k.module
                )
            })?;
            if let Some(bytes) = k.max_smem {
                func.set_attribute(
                    sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
                .map_err(|e| anyhow!("{name}: {}: {bytes} B of shared memory: {e}", k.name))?;
            }
            funcs.insert(k.name.clone(), (func, k.max_smem.unwrap_or(DEFAULT_SMEM)));
        }
        Ok(CudaDriver {
            name,
            ctx,
            stream,
            blas,
            gemm: Planner::default(),
            funcs,
            cudnn,
        })
    }

    fn bind(&self) -> Result<(), String> {
        self.ctx.bind_to_thread().map_err(|e| e.to_string())
    }
}

struct Graph(CudaGraph);

// Safety: a graph is launched on the stream it was captured from, under the caller's order.
unsafe impl Send for Graph {}
unsafe impl Sync for Graph {}

impl GraphExec for Graph {
    fn launch(&self) -> Result<(), String> {
        self.0.launch().map_err(|e| e.to_string())
    }
}

impl Driver for CudaDriver {
    fn name(&self) -> &str {
        &self.name
    }

    fn malloc(&self, bytes: usize) -> Result<u64, String> {
        self.bind()?;
        // Safety: a plain device allocation, owned by the pool until it frees it.
        unsafe { result::malloc_sync(bytes) }.map_err(|e| e.to_string())
    }

    fn free(&self, ptr: u64) {
        if self.bind().is_ok() {
            // Safety: `ptr` came from `malloc` and the pool hands it out no more; it synchronised
            // first, so no queued kernel still uses it.
            let _ = unsafe { result::free_sync(ptr) };
        }
    }

    fn memset(&self, ptr: u64, byte: u8, bytes: usize) -> Result<(), String> {
        // Safety: a live pool buffer of at least `bytes` bytes, on our stream.
        unsafe { result::memset_d8_async(ptr, byte, bytes, self.stream.cu_stream()) }
            .map_err(|e| e.to_string())
    }

    fn htod(&self, dst: u64, src: &[u8]) -> Result<(), String> {
        self.bind()?;
        // Safety: dst holds at least src.len() bytes. A copy from pageable memory is staged
        // before this returns, so `src` may go away afterwards; on our stream it is ordered after
        // earlier kernels that may still use a recycled `dst`.
        unsafe { result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| e.to_string())
    }

    fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<(), String> {
        self.synchronize()?;
        self.bind()?;
        // Safety: src holds dst.len() bytes; the stream is idle.
        unsafe { result::memcpy_dtoh_sync(dst, src) }.map_err(|e| e.to_string())
    }

    fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<(), String> {
        // Safety: both ranges are live pool buffers of at least `bytes` bytes.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .map_err(|e| e.to_string())
    }

    fn launch(&self, name: &str, cfg: &LaunchCfg, args: &[Arg]) -> Result<(), String> {
        let Some((f, _)) = self.funcs.get(name) else {
            return Err(format!("kernel {name} is not loaded"));
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
        let c = LaunchConfig {
            grid_dim: cfg.grid,
            block_dim: (cfg.block, 1, 1),
            shared_mem_bytes: cfg.smem,
        };
        // Safety: argument lists match the extern "C" signatures in kernels/ (checked kind by
        // kind on the software device, which runs every launch site in CI).
        unsafe { b.launch(c) }
            .map(|_| ())
            .map_err(|e| format!("launching {name}: {e}"))
    }

    fn smem_limit(&self, name: &str) -> Option<u32> {
        self.funcs.get(name).map(|(_, s)| *s)
    }

    fn gemm(
        &self,
        s: &gemm::Shape,
        o: &gemm::Operands,
        ws: (u64, usize),
        tune: Option<&Timer>,
    ) -> Result<(), String> {
        use cudarc::cublaslt::MatmulShared;
        // Safety: the handle lives with the driver; callers pass operands of the extents in `s`;
        // the workspace block is held until the device closes.
        unsafe {
            self.gemm.run(
                *self.blas.handle(),
                self.stream.cu_stream() as _,
                s,
                o,
                ws,
                tune,
            )
        }
    }

    fn gemm_plans(&self) -> usize {
        self.gemm.planned()
    }

    fn has_conv(&self) -> bool {
        self.cudnn.is_some()
    }

    fn conv_plan(&self, d: &ConvDesc) -> (Option<ConvPlan>, bool) {
        match &self.cudnn {
            Some(c) => c.plan(d),
            None => (None, false),
        }
    }

    fn conv_tune(&self, d: &ConvDesc, time: &Timer, run: &dyn Fn(ConvPlan) -> bool) {
        if let Some(c) = &self.cudnn {
            c.tune(d, time, run)
        }
    }

    fn conv(
        &self,
        d: &ConvDesc,
        plan: ConvPlan,
        x: u64,
        w: u64,
        y: u64,
        ws: u64,
    ) -> Result<(), String> {
        let Some(c) = &self.cudnn else {
            return Err("no cuDNN".into());
        };
        // Safety: the buffers were allocated for the descriptor's extents by conv::conv.
        unsafe { c.launch(d, plan, (x, w, y, ws)) }
    }

    fn conv_plans(&self) -> usize {
        self.cudnn.as_ref().map_or(0, |c| c.planned())
    }

    fn synchronize(&self) -> Result<(), String> {
        self.stream.synchronize().map_err(|e| e.to_string())
    }

    fn begin_capture(&self) -> Result<(), String> {
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| format!("begin graph capture: {e}"))
    }

    fn end_capture(&self) -> Result<Box<dyn GraphExec>, String> {
        let g = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(|e| format!("end graph capture: {e}"))?;
        let g = g.ok_or_else(|| "graph capture recorded nothing".to_string())?;
        Ok(Box::new(Graph(g)))
    }

    fn time_ms(&self, f: &mut dyn FnMut() -> bool) -> Option<f32> {
        if !f() {
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
}

/// Tests: the fatbin of `module` holds every kernel name the backend loads from it.
#[cfg(test)]
pub fn fatbin_has(module: &str, kernel: &str) -> bool {
    embedded::MODULES
        .iter()
        .filter(|(m, _)| *m == module)
        .any(|(_, fatbin)| {
            fatbin
                .windows(kernel.len() + 1)
                .any(|w| &w[..kernel.len()] == kernel.as_bytes() && w[kernel.len()] == 0)
        })
}
