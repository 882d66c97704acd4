//! The software GPU's memory: host allocations (256-byte aligned, as cuMemAlloc's are) whose
//! addresses are the device pointers, so kernels compiled for the CPU dereference them directly.
//! Every allocation is recorded, so each copy, GEMM and convolution operand — and each pointer a
//! kernel receives — is checked to lie inside a live allocation: an extent a descriptor gets wrong
//! is an error here, where a GPU would silently read a neighbour's memory.

use super::super::DType;
use std::alloc::{alloc, dealloc, Layout};
use std::collections::BTreeMap;
use std::sync::Mutex;

const ALIGN: usize = 256;

pub struct Memory {
    /// Live allocations: address → bytes.
    live: Mutex<BTreeMap<u64, usize>>,
    /// Bytes the device has (`TOFFEE_EMU_MEMORY`), so out-of-memory paths run too.
    capacity: usize,
}

impl Memory {
    pub fn new(capacity: usize) -> Memory {
        Memory {
            live: Mutex::new(BTreeMap::new()),
            capacity,
        }
    }

    pub fn malloc(&self, bytes: usize) -> Result<u64, String> {
        let mut live = self.live.lock().unwrap();
        let used: usize = live.values().sum();
        if bytes == 0 || used.saturating_add(bytes) > self.capacity {
            return Err(format!(
                "out of memory: {bytes} bytes requested, {used} of {} in use",
                self.capacity
            ));
        }
        let layout = Layout::from_size_align(bytes, ALIGN).map_err(|e| e.to_string())?;
        // Safety: a non-zero size; freed with the same layout in `free`.
        let p = unsafe { alloc(layout) };
        if p.is_null() {
            return Err(format!("out of host memory allocating {bytes} bytes"));
        }
        live.insert(p as u64, bytes);
        Ok(p as u64)
    }

    pub fn free(&self, ptr: u64) -> Result<(), String> {
        let bytes = self
            .live
            .lock()
            .unwrap()
            .remove(&ptr)
            .ok_or_else(|| format!("free of {ptr:#x}, which is not a live allocation"))?;
        // Safety: allocated by `malloc` with this size and alignment, removed from `live` above.
        unsafe {
            dealloc(
                ptr as *mut u8,
                Layout::from_size_align_unchecked(bytes, ALIGN),
            )
        };
        Ok(())
    }

    /// Ok when [ptr, ptr + bytes) lies inside one live allocation.
    pub fn check(&self, what: &str, ptr: u64, bytes: usize) -> Result<(), String> {
        let live = self.live.lock().unwrap();
        match live.range(..=ptr).next_back() {
            Some((&base, &len)) if ptr + bytes as u64 <= base + len as u64 => Ok(()),
            Some((&base, &len)) if ptr < base + len as u64 => Err(format!(
                "{what}: {bytes} bytes at {ptr:#x} run {} bytes past the end of its {len}-byte \
                 allocation",
                ptr + bytes as u64 - (base + len as u64)
            )),
            _ => Err(format!(
                "{what}: {ptr:#x} is not in any live device allocation"
            )),
        }
    }

    /// Frees everything still allocated (the device closes).
    pub fn release(&self) {
        let live = std::mem::take(&mut *self.live.lock().unwrap());
        for (p, bytes) in live {
            // Safety: as in `free`.
            unsafe {
                dealloc(
                    p as *mut u8,
                    Layout::from_size_align_unchecked(bytes, ALIGN),
                )
            };
        }
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        self.release();
    }
}

/// `n` elements of `dtype` at `ptr` (checked by the caller) as f32.
///
/// # Safety
/// `ptr` holds `n` elements of `dtype`.
pub unsafe fn read(ptr: u64, dtype: DType, n: usize) -> Vec<f32> {
    match dtype {
        DType::F32 => std::slice::from_raw_parts(ptr as *const f32, n).to_vec(),
        DType::I32 => std::slice::from_raw_parts(ptr as *const i32, n)
            .iter()
            .map(|&v| v as f32)
            .collect(),
        DType::F16 => std::slice::from_raw_parts(ptr as *const half::f16, n)
            .iter()
            .map(|v| v.to_f32())
            .collect(),
        DType::BF16 => std::slice::from_raw_parts(ptr as *const half::bf16, n)
            .iter()
            .map(|v| v.to_f32())
            .collect(),
    }
}

/// Element `i` of `dtype` at `ptr`, as f32.
///
/// # Safety
/// `ptr` holds more than `i` elements of `dtype`.
pub unsafe fn get(ptr: u64, dtype: DType, i: usize) -> f32 {
    match dtype {
        DType::F32 => *(ptr as *const f32).add(i),
        DType::I32 => *(ptr as *const i32).add(i) as f32,
        DType::F16 => (*(ptr as *const half::f16).add(i)).to_f32(),
        DType::BF16 => (*(ptr as *const half::bf16).add(i)).to_f32(),
    }
}

/// Stores `v` rounded to nearest-even in `dtype` as element `i` at `ptr`.
///
/// # Safety
/// `ptr` holds more than `i` elements of `dtype`.
pub unsafe fn put(ptr: u64, dtype: DType, i: usize, v: f32) {
    match dtype {
        DType::F32 => *(ptr as *mut f32).add(i) = v,
        DType::I32 => *(ptr as *mut i32).add(i) = v as i32,
        DType::F16 => *(ptr as *mut half::f16).add(i) = half::f16::from_f32(v),
        DType::BF16 => *(ptr as *mut half::bf16).add(i) = half::bf16::from_f32(v),
    }
}

/// Parses `TOFFEE_EMU_MEMORY` (bytes, or with a K/M/G suffix).
pub fn parse_size(v: &str) -> Result<usize, String> {
    let (num, mult) = match v.chars().last() {
        Some('K' | 'k') => (&v[..v.len() - 1], 1usize << 10),
        Some('M' | 'm') => (&v[..v.len() - 1], 1 << 20),
        Some('G' | 'g') => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            format!("TOFFEE_EMU_MEMORY={v}: expected a size such as 2G, 512M or 1048576")
        })
}
