//! Every file toffee writes goes through here: written under a temporary name beside the final one
//! (`.NAME.tmp.<pid>-<n>`, same folder so the rename is atomic), flushed, fsynced and renamed into
//! place. Readers and crashes see no file, the old one or the whole new one, never half of one; on
//! a failure the temporary file is removed. `.tmp.` marks every temporary name, which is what the
//! clean-ups of interrupted runs look for (`is_temporary_of`).

use anyhow::{anyhow, Context, Result};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Distinguishes concurrent writes of one process into one folder.
static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh temporary name for `path`: `dir/.NAME.tmp.<pid>-<n>`.
pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{name}.tmp.{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// The temporary files being written now, for `remove_live_temporaries`.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// A temporary name in use: listed while it lives, so a process that must exit at once (a second
/// Ctrl-C) can remove the files its writers cannot. The owner renames or removes the file.
pub struct LiveTemp(PathBuf);

impl LiveTemp {
    /// A fresh temporary name for `path` (`tmp_path`), listed.
    pub fn new(path: &Path) -> LiveTemp {
        let tmp = tmp_path(path);
        LIVE.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tmp.clone());
        LiveTemp(tmp)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for LiveTemp {
    fn drop(&mut self) {
        let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = live.iter().position(|p| *p == self.0) {
            live.swap_remove(i);
        }
    }
}

/// Removes every temporary file being written now (before an immediate exit); returns how many
/// existed.
pub fn remove_live_temporaries() -> usize {
    let live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    live.iter().filter(|p| fs::remove_file(p).is_ok()).count()
}

/// Whether the file name `name` is a temporary file of a write of `final_name` (this scheme's).
pub fn is_temporary_of(name: &str, final_name: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|n| n.strip_prefix(final_name))
        .and_then(|n| n.strip_prefix(".tmp."))
        .is_some_and(|id| {
            id.split('-')
                .all(|x| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit()))
        })
}

/// Writes `path` with `fill` (a buffered writer on the temporary file); errors are the plain
/// causes, for the caller to name the file its own way.
pub fn write_with(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> Result<()>,
) -> Result<()> {
    if path.file_name().is_none() {
        return Err(anyhow!("not a file path"));
    }
    let live = LiveTemp::new(path);
    let tmp = live.path();
    let write = || -> Result<()> {
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)?;
        let mut out = BufWriter::new(file);
        fill(&mut out)?;
        out.flush()?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::rename(tmp, path)?;
        Ok(())
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(tmp);
    })
}

/// Writes `bytes` to `path` atomically unless `path` exists: false when it does (another
/// writer got there first; a hard link, unlike a rename, never replaces a file).
pub fn create_new(path: &Path, bytes: &[u8]) -> Result<bool> {
    let tmp = tmp_path(path);
    let claimed = write(&tmp, bytes).and_then(|()| match fs::hard_link(&tmp, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e).with_context(|| format!("{}: cannot create", path.display())),
    });
    let _ = fs::remove_file(&tmp);
    claimed
}

/// Writes `bytes` to `path` atomically.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |w| Ok(w.write_all(bytes)?))
        .with_context(|| format!("{}: cannot write", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporaries_are_recognised_by_their_final_name() {
        let t = tmp_path(Path::new("/x/o.png"));
        let n = t.file_name().unwrap().to_string_lossy().into_owned();
        assert!(is_temporary_of(&n, "o.png"), "{n}");
        assert!(!is_temporary_of(&n, "o"));
        assert!(!is_temporary_of(".o.png.tmp.12x-1", "o.png"));
        assert!(!is_temporary_of("o.png", "o.png"));
        assert_ne!(tmp_path(Path::new("o.png")), tmp_path(Path::new("o.png")));
    }

    #[test]
    fn a_failed_write_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.bin");
        write(&p, b"old").unwrap();
        let e = write_with(&p, |w| {
            w.write_all(b"half")?;
            Err(anyhow!("disk full"))
        });
        assert!(e.is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
