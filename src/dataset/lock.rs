//! Who builds which shard. A run claims the unfinished shards of its slice before it cleans up or
//! builds anything: one byte per shard of the folder's lock file (`format::LOCK_FILE`), locked
//! with Linux's open-file-description record locks. The kernel drops them when the run ends,
//! however it ends (no stale lock to clean up after a kill), they conflict between two claims of
//! one process too (the C ABI may run two jobs at once), and NFS clients pass them to the server
//! (not tested here: CI has no NFS). Array tasks of one job claim disjoint shards and run side by
//! side; a second run of shards that are being built is refused before it touches the folder.
//! Byte ranges rather than one lock per folder because a Slurm array's tasks share their folder
//! by design.

use super::format;
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// The shards a run holds; released when dropped.
pub struct Claim {
    _file: Option<File>,
}

/// Claims `shards` of the job in `out` (which exists) or fails naming the first one that another
/// run holds.
pub fn claim(out: &Path, shards: &[usize]) -> Result<Claim> {
    if shards.is_empty() {
        return Ok(Claim { _file: None });
    }
    let path = out.join(format::LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("{}: cannot open the lock file", path.display()))?;
    for &shard in shards {
        match lock_byte(&file, shard) {
            Ok(true) => {}
            Ok(false) => bail!(
                "{}: shard {} ({}) is being built by another run into this folder; wait for it \
                 to finish, or give each run its own --shard-index",
                out.display(),
                shard,
                format::shard_name(shard)
            ),
            Err(e) => {
                return Err(e).with_context(|| format!("{}: cannot lock", path.display()));
            }
        }
    }
    Ok(Claim { _file: Some(file) })
}

/// Takes a write lock on byte `i` of `file` without waiting; false when another open file
/// description holds it.
fn lock_byte(file: &File, i: usize) -> std::io::Result<bool> {
    // Safety: flock is plain data; zeroed is a valid value for every field.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = libc::F_WRLCK as libc::c_short;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    l.l_start = i as libc::off_t;
    l.l_len = 1;
    // Safety: a valid descriptor and a pointer to an initialised flock that outlives the call.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &l) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_of_one_process_conflict_only_where_they_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let a = claim(dir.path(), &[0, 2]).unwrap();
        let b = claim(dir.path(), &[1, 3]).unwrap();
        let e = claim(dir.path(), &[3, 4]).err().unwrap().to_string();
        assert!(e.contains("shard 3") && e.contains("another run"), "{e}");
        drop(b);
        let c = claim(dir.path(), &[1, 3, 4]).unwrap();
        drop((a, c));
        claim(dir.path(), &[0, 1, 2, 3, 4]).unwrap();
    }
}
