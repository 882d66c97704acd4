//! Opening and reading the files users name: regular files only, and bounded. A FIFO given as an
//! image, a subject list or a weights file would block its open forever, and a link to /dev/zero
//! or /dev/urandom would be read until memory runs out; both are errors naming what the path is.
//! The signatures follow `std::fs`'s, so callers keep their own messages around the cause.

use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The largest file read whole (an image, a config, a tokenizer, a subject list). Weights are
/// memory-mapped, not read, and bounded by their headers instead.
pub const MAX_READ: u64 = 4 << 30;

/// Opens `path` for reading if it is a regular file (following links). The open does not wait
/// for a FIFO's writer.
pub fn open(path: impl AsRef<Path>) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path.as_ref())?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a regular file but {}", kind(&meta)),
        ));
    }
    Ok(file)
}

fn kind(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

/// The bytes of the regular file `path`, at most `MAX_READ` of them.
pub fn read(path: impl AsRef<Path>) -> io::Result<Vec<u8>> {
    let file = open(path)?;
    let len = file.metadata()?.len();
    if len > MAX_READ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{len} bytes: larger than the {MAX_READ} bytes read whole"),
        ));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // A file that grows while it is read stops at the limit too.
    file.take(MAX_READ).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The UTF-8 text of the regular file `path` (`read`).
pub fn read_to_string(path: impl AsRef<Path>) -> io::Result<String> {
    String::from_utf8(read(path)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_files_are_refused_by_what_they_are() {
        let e = read(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(e.contains("a device"), "{e}");
        let e = read_to_string(Path::new("/")).unwrap_err().to_string();
        assert!(e.contains("a folder"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // Safety: a valid C string; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open(&fifo).unwrap_err().to_string();
        assert!(e.contains("a FIFO"), "{e}");
        let f = dir.path().join("f.txt");
        std::fs::write(&f, "text").unwrap();
        assert_eq!(read_to_string(&f).unwrap(), "text");
    }
}
