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
    let tmp = tmp_path(path);
    let write = || -> Result<()> {
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        let mut out = BufWriter::new(file);
        fill(&mut out)?;
        out.flush()?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::rename(&tmp, path)?;
        Ok(())
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
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
