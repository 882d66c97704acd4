//! The kernels of kernels/*.cu compiled as host C++ under the shim (kernels/emu/, built by
//! build.rs): one launch table per module, looked up by name like a module load on a GPU. Each
//! launcher checks the argument count and every argument's kind against the kernel's C++
//! signature, then runs the grid block by block, every CUDA thread a fiber.

use super::super::Arg;
use std::ffi::{c_char, c_int, c_void, CStr};

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EmuDim3 {
    pub x: u32,
    pub y: u32,
    pub z: u32,
}

/// How the shim schedules threads and `cp.async` copies (kernels/emu/registry.h).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmuMode {
    /// 0: a copy lands when issued (exposes write-after-read hazards); 1: at the wait (exposes
    /// missing waits).
    pub cp_async_at_wait: c_int,
    /// 0 in order, 1 reverse, 2 random, 3 warp-skewed (one warp runs ahead as far as it can).
    pub schedule: c_int,
    pub seed: u32,
}

type LaunchFn = unsafe extern "C" fn(
    EmuDim3,
    EmuDim3,
    u32,
    *const EmuMode,
    *const *const c_void,
    *const c_char,
    usize,
    *mut c_char,
    usize,
) -> c_int;

#[repr(C)]
pub struct EmuKernel {
    name: *const c_char,
    launch: LaunchFn,
    kinds: *const c_char,
}

mod generated {
    use super::EmuKernel;
    include!(concat!(env!("OUT_DIR"), "/emu/modules.rs"));
}

extern "C" {
    fn toffee_emu_selftest(report: *mut c_char, len: usize) -> c_int;
}

/// A kernel of the software GPU: its launcher and parameter kinds (`KernelSpec::args`' letters).
#[derive(Clone, Copy)]
pub struct Kernel(LaunchFn, &'static [u8]);

/// The kernels `module` defines, by name; None for a module that was not compiled.
pub fn module(module: &str) -> Option<Vec<(String, Kernel)>> {
    let (_, table) = generated::MODULES.iter().find(|(m, _)| *m == module)?;
    let mut n = 0usize;
    // Safety: the generated table function returns a static array of `n` entries.
    let entries = unsafe {
        let p = table(&mut n);
        std::slice::from_raw_parts(p, n)
    };
    Some(
        entries
            .iter()
            .map(|e| {
                // Safety: names and kinds are static NUL-terminated strings.
                let (name, kinds) = unsafe { (CStr::from_ptr(e.name), CStr::from_ptr(e.kinds)) };
                (
                    name.to_string_lossy().into_owned(),
                    Kernel(e.launch, kinds.to_bytes()),
                )
            })
            .collect(),
    )
}

impl Kernel {
    /// The C++ signature's parameter kinds.
    pub fn kinds(&self) -> &'static [u8] {
        self.1
    }

    /// Runs the whole grid to completion on this thread.
    pub fn launch(
        &self,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        mode: &EmuMode,
        args: &[Arg],
    ) -> Result<(), String> {
        let mut values: Vec<[u8; 8]> = Vec::with_capacity(args.len());
        let mut kinds = Vec::with_capacity(args.len() + 1);
        for a in args {
            let mut v = [0u8; 8];
            let k = match a {
                Arg::P(p) => {
                    v.copy_from_slice(&p.to_ne_bytes());
                    b'p'
                }
                Arg::I(i) => {
                    v[..4].copy_from_slice(&i.to_ne_bytes());
                    b'i'
                }
                Arg::L(l) => {
                    v.copy_from_slice(&l.to_ne_bytes());
                    b'l'
                }
                Arg::F(f) => {
                    v[..4].copy_from_slice(&f.to_ne_bytes());
                    b'f'
                }
            };
            values.push(v);
            kinds.push(k as c_char);
        }
        kinds.push(0);
        let ptrs: Vec<*const c_void> = values.iter().map(|v| v.as_ptr().cast()).collect();
        let mut err = vec![0 as c_char; 512];
        let dim = |x, y, z| EmuDim3 { x, y, z };
        // Safety: `ptrs` point to 8-byte values of the kinds in `kinds`, which the launcher
        // checks against the kernel's parameters before reading them; `err` is writable.
        let r = unsafe {
            (self.0)(
                dim(grid.0, grid.1, grid.2),
                dim(block, 1, 1),
                smem,
                mode,
                ptrs.as_ptr(),
                kinds.as_ptr(),
                args.len(),
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if r == 0 {
            Ok(())
        } else {
            // Safety: the launcher NUL-terminates within `err`.
            Err(unsafe { CStr::from_ptr(err.as_ptr()) }
                .to_string_lossy()
                .into_owned())
        }
    }
}

/// The shim's own unit tests (fragment layouts against the PTX ISA tables, cp.async, barriers,
/// deadlock and range detection): (failures, report).
pub fn selftest() -> (i32, String) {
    let mut report = vec![0 as c_char; 16 << 10];
    // Safety: a writable buffer of the stated length; the report is NUL-terminated.
    let n = unsafe { toffee_emu_selftest(report.as_mut_ptr(), report.len()) };
    let text = unsafe { CStr::from_ptr(report.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    (n, text)
}
