//! One shard on disk: a WebDataset tar written under a temporary name and renamed when complete,
//! then its index lines and its stats (the stats file marks the shard done). A killed run leaves
//! at most a temporary file, which the next run replaces.

use crate::tensor::Tensor;
use anyhow::{Context, Result};
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

/// 8-bit PNG bytes of one [1, H, W, C] image in [0, 1] (C = 1 or 3).
pub fn png_bytes(img: &Tensor) -> Result<Vec<u8>> {
    let (_, h, w, c) = img.dims4();
    // The CLI's 8-bit conversion, so a pair's PNG equals `txt2img`'s and holds the pixels scored.
    let px = crate::image_io::to_u8(img);
    let mut out = Vec::new();
    let color = if c == 1 {
        image::ExtendedColorType::L8
    } else {
        image::ExtendedColorType::Rgb8
    };
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut out),
        &px,
        w as u32,
        h as u32,
        color,
    )?;
    Ok(out)
}

/// A shard being written.
pub struct ShardWriter {
    final_path: PathBuf,
    tmp: crate::atomic_file::LiveTemp,
    tar: tar::Builder<BufWriter<File>>,
}

impl ShardWriter {
    pub fn create(final_path: &Path) -> Result<ShardWriter> {
        let final_path = final_path.to_path_buf();
        let tmp = crate::atomic_file::LiveTemp::new(&final_path);
        let f = File::create(tmp.path())
            .with_context(|| format!("{}: cannot create", tmp.path().display()))?;
        let mut tar = tar::Builder::new(BufWriter::new(f));
        tar.mode(tar::HeaderMode::Deterministic);
        Ok(ShardWriter {
            final_path,
            tmp,
            tar,
        })
    }

    /// Appends `KEY.ext` (WebDataset: the files of one sample share the key prefix).
    pub fn add(&mut self, key: &str, ext: &str, bytes: &[u8]) -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        self.tar
            .append_data(&mut h, format!("{key}.{ext}"), bytes)
            .with_context(|| format!("{}: cannot write (disk full?)", self.tmp.path().display()))
    }

    /// Finishes the tar, fsyncs it and renames it into place.
    pub fn commit(self) -> Result<PathBuf> {
        let ShardWriter {
            final_path,
            tmp,
            tar,
        } = self;
        let finish = || -> std::io::Result<()> {
            let w = tar.into_inner()?;
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()
        };
        if let Err(e) = finish() {
            let _ = std::fs::remove_file(tmp.path());
            return Err(e).with_context(|| {
                format!(
                    "{}: cannot finish the shard (disk full?)",
                    final_path.display()
                )
            });
        }
        std::fs::rename(tmp.path(), &final_path).with_context(|| {
            format!(
                "{}: cannot rename the finished shard into place",
                final_path.display()
            )
        })?;
        Ok(final_path)
    }

    /// Drops the unfinished shard (Ctrl-C, an error).
    pub fn abandon(self) {
        let _ = std::fs::remove_file(self.tmp.path());
    }
}

/// Writes `text` to `path` atomically.
pub fn write_text(path: &Path, text: &str) -> Result<()> {
    crate::atomic_file::write(path, text.as_bytes())
}
