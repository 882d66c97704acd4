//! The device interface the backend is written against. Two implementations: the CUDA driver with
//! cuBLASLt and cuDNN (`cudarc_driver`, feature `cuda`) and the software device (`emu`, feature
//! `emu`), which runs the same kernels compiled as host C++ and CPU versions of the libraries'
//! documented semantics. Everything above this trait (pool, ops, models, pipelines) is shared, so
//! what runs on the software device is the code a GPU runs, down to the launch parameters.
//!
//! All work is queued on one stream per device; every method is called with the backend's own
//! locks released, from any thread.

use super::conv::ConvDesc;
use super::gemm;
use super::Arg;

/// A kernel launch's shape, decided once (in ops) for both devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchCfg {
    pub grid: (u32, u32, u32),
    pub block: u32,
    /// Dynamic shared memory in bytes.
    pub smem: u32,
}

/// Shared memory a kernel may use without opting in (CUDA's default dynamic limit).
pub const DEFAULT_SMEM: u32 = 48 << 10;
/// The per-block opt-in limit of sm_90 (sm_80: 163 KiB; both devices enforce the sm_90 one).
pub const MAX_SMEM: u32 = 227 << 10;

/// The sizes where the backend splits work: a GPU's grid.y/z limit, and the most elements one
/// call may touch in an operand (our kernels and cuDNN's descriptors index with 32 bits). Ops read
/// them from the device, never from constants, so the software device can be opened with smaller
/// ones (`Gpu::open_emu`) and the splitting paths, which a GPU takes only at sizes CI cannot run,
/// execute at tiny sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub grid_yz: u32,
    pub call_elems: usize,
}

impl Limits {
    pub const GPU: Limits = Limits {
        grid_yz: 65535,
        call_elems: i32::MAX as usize,
    };
}

/// What a GPU refuses at launch: more than 1024 threads a block, grid.x past 2^31 - 1, grid.y or
/// grid.z past the limit (65535), more dynamic shared memory than the kernel's attribute allows.
pub fn check_launch(
    name: &str,
    cfg: &LaunchCfg,
    smem_limit: u32,
    limits: &Limits,
) -> Result<(), String> {
    let (x, y, z) = cfg.grid;
    let yz = limits.grid_yz;
    if cfg.block == 0 || cfg.block > 1024 {
        return Err(format!(
            "launching {name}: {} threads a block (1 to 1024)",
            cfg.block
        ));
    }
    if x == 0 || y == 0 || z == 0 || x > i32::MAX as u32 || y > yz || z > yz {
        return Err(format!(
            "launching {name}: grid {x}×{y}×{z} (x ≤ 2^31-1, y and z ≤ {yz}, none 0)"
        ));
    }
    if cfg.smem > smem_limit {
        return Err(format!(
            "launching {name}: {} B of dynamic shared memory, the kernel allows {smem_limit} B",
            cfg.smem
        ));
    }
    Ok(())
}

/// A kernel to load: its module (kernels/<module>.cu), name, argument kinds (`p` pointer, `i`
/// int32, `l` int64, `f` float: the launcher's types, which the software GPU checks against the
/// kernel's C++ signature at open) and, above 48 KiB, the dynamic shared memory it is allowed
/// (CUDA's MAX_DYNAMIC_SHARED_SIZE_BYTES attribute).
pub struct KernelSpec {
    pub module: &'static str,
    pub name: String,
    pub args: &'static [u8],
    pub max_smem: Option<u32>,
}

/// Times queued work (ms per run), for autotuning: see `Gpu::time_ms`.
pub type Timer<'a> = dyn Fn(&mut dyn FnMut() -> bool) -> Option<f32> + 'a;

/// A convolution the library agreed to run: its algorithm and workspace.
#[derive(Clone, Copy, Debug)]
pub struct ConvPlan {
    pub algo: i32,
    pub ws_bytes: usize,
}

pub trait Driver: Send + Sync {
    /// `cuda:N` or `emu`: the prefix of every message about this device.
    fn name(&self) -> &str;
    fn limits(&self) -> Limits {
        Limits::GPU
    }
    fn malloc(&self, bytes: usize) -> Result<u64, String>;
    /// Returns a block `malloc` gave; queued work no longer uses it (the pool synchronised).
    fn free(&self, ptr: u64);
    fn memset(&self, ptr: u64, byte: u8, bytes: usize) -> Result<(), String>;
    /// Host → device; `src` may be dropped once this returns.
    fn htod(&self, dst: u64, src: &[u8]) -> Result<(), String>;
    /// Device → host after the queued work (synchronising).
    fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<(), String>;
    fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<(), String>;
    /// Queues kernel `name` (loaded at open; limits already checked).
    fn launch(&self, name: &str, cfg: &LaunchCfg, args: &[Arg]) -> Result<(), String>;
    /// The kernel's dynamic shared memory limit (DEFAULT_SMEM unless raised at load), None when
    /// no such kernel was loaded.
    fn smem_limit(&self, name: &str) -> Option<u32>;
    /// Queues D = alpha·op(A)·op(B) (+ bias) (+ C) as cuBLASLt would with `s` as its
    /// descriptors (planned once per shape; `tune` times the candidates on the first call).
    fn gemm(
        &self,
        s: &gemm::Shape,
        o: &gemm::Operands,
        workspace: (u64, usize),
        tune: Option<&Timer>,
    ) -> Result<(), String>;
    /// GEMM shapes planned so far.
    fn gemm_plans(&self) -> usize;
    /// Whether convolutions can run through the library (else im2col + GEMM).
    fn has_conv(&self) -> bool;
    /// The plan for a convolution (None: the library refuses it), and whether it was made by
    /// this call (each shape is planned once).
    fn conv_plan(&self, d: &ConvDesc) -> (Option<ConvPlan>, bool);
    /// Replaces a plan's algorithm by the fastest the library accepts (autotuning): `run` queues
    /// the convolution with a candidate plan and reports whether it launched.
    fn conv_tune(&self, d: &ConvDesc, time: &Timer, run: &dyn Fn(ConvPlan) -> bool);
    /// Queues y = conv(x, w) (NHWC x and y, KRSC w) with `plan`'s algorithm and workspace.
    fn conv(
        &self,
        d: &ConvDesc,
        plan: ConvPlan,
        x: u64,
        w: u64,
        y: u64,
        ws: u64,
    ) -> Result<(), String>;
    /// Convolution shapes planned so far (refusals included).
    fn conv_plans(&self) -> usize;
    /// Waits for queued work; reports asynchronous failures.
    fn synchronize(&self) -> Result<(), String>;
    fn begin_capture(&self) -> Result<(), String>;
    fn end_capture(&self) -> Result<Box<dyn GraphExec>, String>;
    /// Milliseconds `f` (queueing work) takes on the device, averaged over 3 runs after one
    /// warm-up run; None when it fails.
    fn time_ms(&self, f: &mut dyn FnMut() -> bool) -> Option<f32>;
}

/// An instantiated graph.
pub trait GraphExec: Send + Sync {
    fn launch(&self) -> Result<(), String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launches_are_checked_against_the_hardware_limits() {
        let cfg = |grid, block, smem| LaunchCfg { grid, block, smem };
        let ok = |c: LaunchCfg| check_launch("k", &c, DEFAULT_SMEM, &Limits::GPU);
        assert!(ok(cfg((i32::MAX as u32, 65535, 65535), 1024, DEFAULT_SMEM)).is_ok());
        for bad in [
            cfg((1, 65536, 1), 32, 0),
            cfg((1, 1, 65536), 32, 0),
            cfg((1 << 31, 1, 1), 32, 0),
            cfg((0, 1, 1), 32, 0),
            cfg((1, 1, 1), 1025, 0),
            cfg((1, 1, 1), 0, 0),
            cfg((1, 1, 1), 32, DEFAULT_SMEM + 1),
        ] {
            let e = ok(bad).unwrap_err();
            assert!(e.starts_with("launching k: "), "{e}");
        }
        let small = Limits {
            grid_yz: 4,
            ..Limits::GPU
        };
        assert!(check_launch("k", &cfg((1, 5, 1), 32, 0), DEFAULT_SMEM, &small).is_err());
        assert!(check_launch("k", &cfg((1, 4, 4), 32, 0), MAX_SMEM, &small).is_ok());
    }
}
