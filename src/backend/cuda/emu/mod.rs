//! The software GPU (`--device emu`, feature `emu`): the `Driver` the CUDA backend runs on where
//! there is no GPU. Kernels are the project's own kernels/*.cu compiled as host C++ under the shim
//! in kernels/emu/; GEMMs and convolutions are CPU versions of the cuBLASLt and cuDNN semantics the
//! backend relies on (`blas`, `dnn`); memory is host memory with every allocation recorded, so
//! extents are checked (`memory`). Work runs when it is queued, in stream order (one lock).
//!
//! Graph capture records instead of running, and a replay re-runs the record, as on a GPU; what
//! real capture forbids is an error here: synchronising, copying to or from host memory, freeing
//! memory, timing. What it cannot show — hardware rounding, the memory model, timing, the real
//! libraries — is listed in docs/perf.md.
//!
//! Environment (read when the device opens): `TOFFEE_EMU_CPASYNC=issue|wait` (when `cp.async`
//! copies land), `TOFFEE_EMU_SCHEDULE=inorder|reverse|random:SEED|skew:SEED` (thread order),
//! `TOFFEE_EMU_MEMORY=SIZE` (device memory, default 16G, so out-of-memory paths can run).

mod blas;
mod dnn;
mod kernels;
mod memory;

pub use kernels::{selftest, EmuMode};

use super::conv::ConvDesc;
use super::driver::{
    ConvPlan, Driver, GraphExec, KernelSpec, LaunchCfg, Limits, Timer, DEFAULT_SMEM,
};
use super::{gemm, Arg};
use anyhow::{anyhow, Result};
use kernels::Kernel;
use memory::Memory;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// One queued operation, as a captured graph keeps it.
#[derive(Clone)]
enum Op {
    Launch {
        name: String,
        cfg: LaunchCfg,
        args: Vec<Arg>,
    },
    Memset {
        ptr: u64,
        byte: u8,
        bytes: usize,
    },
    Copy {
        dst: u64,
        src: u64,
        bytes: usize,
    },
    Gemm {
        shape: gemm::Shape,
        operands: gemm::Operands,
    },
    Conv {
        desc: ConvDesc,
        plan: ConvPlan,
        bufs: (u64, u64, u64, u64),
    },
}

/// The capture in progress: its record, or why real capture would have failed.
struct Capture {
    ops: Vec<Op>,
    invalid: Option<String>,
}

struct Inner {
    kernels: HashMap<String, (Kernel, u32)>,
    mem: Memory,
    mode: EmuMode,
    limits: Limits,
    /// Stream order: one operation at a time.
    stream: Mutex<()>,
    capture: Mutex<Option<Capture>>,
    gemm_plans: Mutex<HashSet<gemm::Shape>>,
    conv_plans: Mutex<HashMap<ConvDesc, Option<ConvPlan>>>,
}

pub struct EmuDriver(Arc<Inner>);

fn parse_mode(cp: Option<&str>, sched: Option<&str>) -> Result<EmuMode> {
    let cp_async_at_wait = match cp {
        None | Some("") | Some("issue") => 0,
        Some("wait") => 1,
        Some(o) => anyhow::bail!("TOFFEE_EMU_CPASYNC={o}: expected `issue` or `wait`"),
    };
    let seeded = |s: &str, p: &str| -> Result<Option<u32>> {
        match s.strip_prefix(p) {
            None => Ok(None),
            Some("") => Ok(Some(1)),
            Some(r) => r
                .strip_prefix(':')
                .and_then(|n| n.parse().ok())
                .map(Some)
                .ok_or_else(|| anyhow!("TOFFEE_EMU_SCHEDULE={s}: expected {p}:SEED")),
        }
    };
    let (schedule, seed) = match sched.unwrap_or("") {
        "" | "inorder" => (0, 0),
        "reverse" => (1, 0),
        s => {
            if let Some(seed) = seeded(s, "random")? {
                (2, seed)
            } else if let Some(seed) = seeded(s, "skew")? {
                (3, seed)
            } else {
                anyhow::bail!(
                    "TOFFEE_EMU_SCHEDULE={s}: expected inorder, reverse, random:SEED or skew:SEED"
                )
            }
        }
    };
    Ok(EmuMode {
        cp_async_at_wait,
        schedule,
        seed,
    })
}

/// `p`, `i`, `l`, `f` kinds as C types, for messages.
fn kinds_word(kinds: &[u8]) -> String {
    let word = |k: &u8| match k {
        b'p' => "pointer",
        b'i' => "int",
        b'l' => "long",
        b'f' => "float",
        _ => "?",
    };
    kinds.iter().map(word).collect::<Vec<_>>().join(", ")
}

impl EmuDriver {
    /// The software device with `kernels` loaded (each must exist, as on a GPU), refusing launches
    /// and splitting work at `limits` (a GPU's, or smaller ones for tests).
    pub fn open(specs: &[KernelSpec], limits: Limits) -> Result<EmuDriver> {
        let env = |k| std::env::var(k).ok();
        let mode = parse_mode(
            env("TOFFEE_EMU_CPASYNC").as_deref(),
            env("TOFFEE_EMU_SCHEDULE").as_deref(),
        )?;
        let capacity = match env("TOFFEE_EMU_MEMORY") {
            Some(v) => memory::parse_size(&v).map_err(|e| anyhow!(e))?,
            None => 16 << 30,
        };
        let mut modules: HashMap<&str, HashMap<String, Kernel>> = HashMap::new();
        let mut loaded = HashMap::new();
        for s in specs {
            if !modules.contains_key(s.module) {
                let m = kernels::module(s.module)
                    .ok_or_else(|| anyhow!("emu: no kernel module {}", s.module))?;
                modules.insert(s.module, m.into_iter().collect());
            }
            let k = modules[s.module].get(&s.name).ok_or_else(|| {
                anyhow!("emu: kernel {} missing from module {}", s.name, s.module)
            })?;
            if k.kinds() != s.args {
                anyhow::bail!(
                    "emu: kernel {}: the launcher passes ({}), kernels/{}.cu declares ({})",
                    s.name,
                    kinds_word(s.args),
                    s.module,
                    kinds_word(k.kinds())
                );
            }
            if let Some(b) = s.max_smem {
                if b > super::driver::MAX_SMEM {
                    anyhow::bail!("emu: {}: {b} B of shared memory: invalid value", s.name);
                }
            }
            loaded.insert(s.name.clone(), (*k, s.max_smem.unwrap_or(DEFAULT_SMEM)));
        }
        Ok(EmuDriver(Arc::new(Inner {
            kernels: loaded,
            mem: Memory::new(capacity),
            mode,
            limits,
            stream: Mutex::new(()),
            capture: Mutex::new(None),
            gemm_plans: Mutex::new(HashSet::new()),
            conv_plans: Mutex::new(HashMap::new()),
        })))
    }
}

impl Inner {
    /// Records `op` while capturing, else runs it.
    fn queue(&self, op: Op) -> Result<(), String> {
        if let Some(c) = self.capture.lock().unwrap().as_mut() {
            c.ops.push(op);
            return Ok(());
        }
        self.run(&op)
    }

    /// Marks the capture invalid (as CUDA does when a forbidden call is made on a capturing
    /// stream) and returns the error for the call.
    fn forbid_in_capture(&self, what: &str) -> Result<(), String> {
        match self.capture.lock().unwrap().as_mut() {
            Some(c) => {
                let e = format!("{what} while a graph is being captured (illegal on a GPU)");
                c.invalid.get_or_insert(e.clone());
                Err(e)
            }
            None => Ok(()),
        }
    }

    fn run(&self, op: &Op) -> Result<(), String> {
        let _stream = self.stream.lock().unwrap();
        match op {
            Op::Launch { name, cfg, args } => {
                let (k, _) = self
                    .kernels
                    .get(name)
                    .ok_or_else(|| format!("kernel {name} is not loaded"))?;
                for (i, a) in args.iter().enumerate() {
                    if let Arg::P(p) = a {
                        if *p != 0 {
                            self.mem.check(&format!("{name} argument {i}"), *p, 1)?;
                        }
                    }
                }
                k.launch(cfg.grid, cfg.block, cfg.smem, &self.mode, args)
                    .map_err(|e| format!("{name}: {e}"))
            }
            Op::Memset { ptr, byte, bytes } => {
                self.mem.check("memset", *ptr, *bytes)?;
                // Safety: checked above.
                unsafe { std::ptr::write_bytes(*ptr as *mut u8, *byte, *bytes) };
                Ok(())
            }
            Op::Copy { dst, src, bytes } => {
                self.mem.check("device copy destination", *dst, *bytes)?;
                self.mem.check("device copy source", *src, *bytes)?;
                // Safety: both ranges checked; memmove semantics like cuMemcpy's.
                unsafe { std::ptr::copy(*src as *const u8, *dst as *mut u8, *bytes) };
                Ok(())
            }
            Op::Gemm { shape, operands } => blas::run(&self.mem, shape, operands),
            Op::Conv { desc, plan, bufs } => {
                dnn::run(&self.mem, desc, *plan, *bufs, self.limits.call_elems)
            }
        }
    }
}

struct Graph {
    inner: Arc<Inner>,
    ops: Vec<Op>,
}

impl GraphExec for Graph {
    fn launch(&self) -> Result<(), String> {
        // A replay inside another capture would be a child graph node; we never do that.
        self.inner.forbid_in_capture("a graph launch")?;
        for op in &self.ops {
            self.inner.run(op)?;
        }
        Ok(())
    }
}

impl Driver for EmuDriver {
    fn name(&self) -> &str {
        "emu"
    }

    fn limits(&self) -> Limits {
        self.0.limits
    }

    fn malloc(&self, bytes: usize) -> Result<u64, String> {
        // cuMemAlloc is allowed while capturing in relaxed mode (the pool's reserve uses it).
        self.0.mem.malloc(bytes)
    }

    fn free(&self, ptr: u64) {
        // cuMemFree synchronises: it would invalidate a capture.
        let _ = self.0.forbid_in_capture("freeing device memory");
        if let Err(e) = self.0.mem.free(ptr) {
            eprintln!("toffee: emu: {e}");
        }
    }

    fn memset(&self, ptr: u64, byte: u8, bytes: usize) -> Result<(), String> {
        self.0.queue(Op::Memset { ptr, byte, bytes })
    }

    fn htod(&self, dst: u64, src: &[u8]) -> Result<(), String> {
        self.0
            .forbid_in_capture("a copy from pageable host memory")?;
        let _stream = self.0.stream.lock().unwrap();
        self.0.mem.check("host-to-device copy", dst, src.len())?;
        // Safety: checked above.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<(), String> {
        self.0
            .forbid_in_capture("reading device memory on the host")?;
        let _stream = self.0.stream.lock().unwrap();
        self.0.mem.check("device-to-host copy", src, dst.len())?;
        // Safety: checked above.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<(), String> {
        self.0.queue(Op::Copy { dst, src, bytes })
    }

    fn launch(&self, name: &str, cfg: &LaunchCfg, args: &[Arg]) -> Result<(), String> {
        self.0.queue(Op::Launch {
            name: name.to_string(),
            cfg: *cfg,
            args: args.to_vec(),
        })
    }

    fn smem_limit(&self, name: &str) -> Option<u32> {
        self.0.kernels.get(name).map(|(_, s)| *s)
    }

    fn gemm(
        &self,
        s: &gemm::Shape,
        o: &gemm::Operands,
        _workspace: (u64, usize),
        tune: Option<&Timer>,
    ) -> Result<(), String> {
        let fresh = self.0.gemm_plans.lock().unwrap().insert(*s);
        if fresh {
            blas::validate(s)?;
            if let Some(time) = tune {
                // One candidate: the extra runs only rewrite D, as on a GPU.
                time(&mut || {
                    self.0
                        .run(&Op::Gemm {
                            shape: *s,
                            operands: *o,
                        })
                        .is_ok()
                });
            }
        }
        self.0.queue(Op::Gemm {
            shape: *s,
            operands: *o,
        })
    }

    fn gemm_plans(&self) -> usize {
        self.0.gemm_plans.lock().unwrap().len()
    }

    fn has_conv(&self) -> bool {
        true
    }

    fn conv_plan(&self, d: &ConvDesc) -> (Option<ConvPlan>, bool) {
        let mut plans = self.0.conv_plans.lock().unwrap();
        let fresh = !plans.contains_key(d);
        (
            *plans
                .entry(*d)
                .or_insert_with(|| dnn::plan(d, self.0.limits.call_elems)),
            fresh,
        )
    }

    fn conv_tune(&self, d: &ConvDesc, time: &Timer, run: &dyn Fn(ConvPlan) -> bool) {
        let mut best: Option<(f32, ConvPlan)> = None;
        for algo in dnn::ALGOS {
            let c = ConvPlan {
                algo,
                ws_bytes: dnn::workspace(d, algo),
            };
            if let Some(t) = time(&mut || run(c)) {
                if best.is_none_or(|(b, _)| t < b) {
                    best = Some((t, c));
                }
            }
        }
        if let Some((_, c)) = best {
            self.0.conv_plans.lock().unwrap().insert(*d, Some(c));
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
        self.0.queue(Op::Conv {
            desc: *d,
            plan,
            bufs: (x, w, y, ws),
        })
    }

    fn conv_plans(&self) -> usize {
        self.0.conv_plans.lock().unwrap().len()
    }

    fn synchronize(&self) -> Result<(), String> {
        // Work ran when it was queued; waiting on a capturing stream is what a GPU forbids.
        self.0.forbid_in_capture("synchronising the stream")
    }

    fn begin_capture(&self) -> Result<(), String> {
        let mut c = self.0.capture.lock().unwrap();
        if c.is_some() {
            return Err("begin graph capture: the stream is already capturing".into());
        }
        *c = Some(Capture {
            ops: Vec::new(),
            invalid: None,
        });
        Ok(())
    }

    fn end_capture(&self) -> Result<Box<dyn GraphExec>, String> {
        let c = self
            .0
            .capture
            .lock()
            .unwrap()
            .take()
            .ok_or("end graph capture: the stream is not capturing")?;
        if let Some(why) = c.invalid {
            return Err(format!(
                "end graph capture: the capture was invalidated by {why}"
            ));
        }
        if c.ops.is_empty() {
            return Err("graph capture recorded nothing".into());
        }
        Ok(Box::new(Graph {
            inner: self.0.clone(),
            ops: c.ops,
        }))
    }

    fn time_ms(&self, f: &mut dyn FnMut() -> bool) -> Option<f32> {
        if self.0.capture.lock().unwrap().is_some() || !f() {
            return None;
        }
        let t = std::time::Instant::now();
        for _ in 0..3 {
            if !f() {
                return None;
            }
        }
        Some(t.elapsed().as_secs_f32() * 1000.0 / 3.0)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn modes_are_read_strictly() {
        let m = super::parse_mode(Some("wait"), Some("skew:7")).unwrap();
        assert_eq!((m.cp_async_at_wait, m.schedule, m.seed), (1, 3, 7));
        let m = super::parse_mode(None, None).unwrap();
        assert_eq!((m.cp_async_at_wait, m.schedule), (0, 0));
        assert!(super::parse_mode(Some("lazy"), None).is_err());
        assert!(super::parse_mode(None, Some("skew:x")).is_err());
        assert!(super::parse_mode(None, Some("fast")).is_err());
    }

    /// The shim's own unit tests: fragment layouts of mma.sync / ldmatrix against the PTX ISA
    /// tables, cp.async timing, shuffles, and that a deadlock or an out-of-range shared access is
    /// an error rather than a hang or an abort.
    /// Every launcher's argument types equal its kernel's C++ parameters, checked at open for
    /// every kernel (not only those a test launches); a launcher that disagrees is refused.
    #[test]
    fn launcher_signatures_match_the_kernels() {
        use crate::backend::cuda::{driver::Limits, kernels};
        let mut specs = kernels::specs();
        assert!(super::EmuDriver::open(&specs, Limits::GPU).is_ok());
        let gemm = specs
            .iter_mut()
            .find(|s| s.name == "gemm_geglu_f16")
            .unwrap();
        gemm.args = b"pppplii";
        let e = super::EmuDriver::open(&specs, Limits::GPU)
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            e,
            "emu: kernel gemm_geglu_f16: the launcher passes (pointer, pointer, pointer, pointer, \
             long, int, int), kernels/gemm_geglu.cu declares (pointer, pointer, pointer, pointer, \
             int, int, int)"
        );
    }

    #[test]
    fn shim_selftest_passes() {
        let (failures, report) = super::selftest();
        assert_eq!(failures, 0, "{report}");
    }
}
