//! The memory a run may allocate, checked before the allocation happens. Rust aborts the process
//! when an allocation fails (no error, no clean-up; an embedding host dies with it), so sizes that
//! flags, config fields or C structs claim are compared with a budget while they are still
//! numbers. The estimates are lower bounds: buffers the CPU reference certainly holds at once
//! (a skip activation of the UNet's first level while an attention layer holds its score
//! matrices, one per worker thread; the VAE decoder's last level; the decoded images). A run that
//! fits is never refused; one refused could only have aborted. On a GPU only the host images
//! count (the device reports its own out-of-memory as an error).
//!
//! The budget is `TOFFEE_MEMORY_BUDGET` (bytes, or a number with K, M, G or T), else the smaller
//! of the machine's memory and the address-space limit (`ulimit -v`).

use anyhow::{bail, Context, Result};

const VAR: &str = "TOFFEE_MEMORY_BUDGET";

/// The budget in bytes.
pub fn budget() -> Result<u64> {
    match std::env::var(VAR) {
        Ok(v) => parse_bytes(&v).with_context(|| {
            format!("{VAR}={v}: expected a number of bytes, optionally with K, M, G or T")
        }),
        Err(_) => Ok(machine_memory().min(address_space_limit())),
    }
}

fn parse_bytes(v: &str) -> Result<u64> {
    let v = v.trim();
    let (num, shift) = match v.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => bail!("unknown unit `{c}`"),
            };
            (&v[..i], shift)
        }
        _ => (v, 0),
    };
    let n: u64 = num.trim().parse()?;
    match n.checked_mul(1 << shift) {
        Some(b) if b > 0 => Ok(b),
        _ => bail!("not a positive size that fits in 64 bits"),
    }
}

/// MemTotal of /proc/meminfo (unbounded where it cannot be read).
fn machine_memory() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(u64::MAX, |kib| kib.saturating_mul(1024))
}

/// RLIMIT_AS, the address space a process may map (`ulimit -v`).
fn address_space_limit() -> u64 {
    // Safety: getrlimit writes one rlimit through a valid pointer.
    let mut r: libc::rlimit = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut r) } != 0 || r.rlim_cur == libc::RLIM_INFINITY
    {
        return u64::MAX;
    }
    r.rlim_cur
}

/// Refuses `need` bytes over the budget; `what` names the request in the message.
pub fn check(need: u64, what: impl FnOnce() -> String) -> Result<()> {
    let budget = budget()?;
    if need > budget {
        bail!(
            "{} needs at least {} at once, over the memory budget of {} (the machine's \
             memory or `ulimit -v`; {VAR} sets it)",
            what(),
            human(need),
            human(budget)
        );
    }
    Ok(())
}

fn human(bytes: u64) -> String {
    if bytes == u64::MAX {
        return "more than 16 EiB".into();
    }
    let (unit, shift) = match bytes {
        b if b >= 1 << 30 => ("GiB", 30),
        b if b >= 1 << 20 => ("MiB", 20),
        _ => ("KiB", 10),
    };
    format!("{:.1} {unit}", bytes as f64 / (1u64 << shift) as f64)
}

/// Products of sizes in bytes (f32), saturating: an absurd claim stays absurd instead of
/// wrapping to something small.
pub fn f32_bytes(dims: &[usize]) -> u64 {
    dims.iter()
        .fold(4u64, |acc, &d| acc.saturating_mul(d as u64))
}

/// Score matrices of attention over `tq` × `tk` tokens that the CPU reference holds at once:
/// one per worker thread, at most one per (sample, head).
pub fn attention_scores(samples_heads: usize, tq: usize, tk: usize) -> u64 {
    let live = rayon::current_num_threads().min(samples_heads).max(1);
    f32_bytes(&[live, tq, tk])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_absurd_products_saturate() {
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert_eq!(parse_bytes("8G").unwrap(), 8 << 30);
        assert_eq!(parse_bytes(" 3 k ").unwrap(), 3 << 10);
        for bad in ["", "0", "-1", "1.5G", "2X", "99999999999T"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        assert_eq!(f32_bytes(&[1 << 40, 1 << 40]), u64::MAX);
        assert!(check(u64::MAX, || "x".into())
            .unwrap_err()
            .to_string()
            .contains("x needs at least more than 16 EiB"));
    }
}
