//! The subcommands, one module each: its clap `Args` (flags, help text), a `run` that calls the
//! library and prints what the command prints, and the command's file handling. `main.rs` only
//! parses and dispatches.

pub mod bench;
pub mod convert;
pub mod depth;
pub mod devices;
pub mod embed;
pub mod forward;
pub mod generate;
pub mod inspect;
pub mod mask;
pub mod merge;
pub mod pairs;
pub mod report;
pub mod score;
pub mod view;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The image files `paths` name: files as given, folders as their .png / .jpg / .jpeg files in
/// name order.
pub fn expand_images(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("{}: cannot list the folder", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.is_file()
                        && f.extension()
                            .map(|e| e.to_string_lossy().to_lowercase())
                            .is_some_and(|e| matches!(e.as_str(), "png" | "jpg" | "jpeg"))
                })
                .collect();
            if files.is_empty() {
                bail!("{}: no .png / .jpg images in this folder", p.display());
            }
            files.sort();
            v.extend(files);
        } else {
            v.push(p.clone());
        }
    }
    Ok(v)
}

/// The PNG file per image: `out` for one image, else `out_dir/<stem>.png` (two images of one
/// stem are an error, not an overwrite). `what` names the files in errors.
pub fn png_outputs(
    out: Option<&Path>,
    out_dir: Option<&Path>,
    images: &[PathBuf],
    what: &str,
) -> Result<Vec<PathBuf>> {
    let png = |p: &Path| -> Result<()> {
        match p.extension().map(|e| e.to_string_lossy().to_lowercase()) {
            Some(e) if e == "png" => Ok(()),
            _ => bail!(
                "--out {}: {what} are written as PNG; use a .png name",
                p.display()
            ),
        }
    };
    match (out, out_dir) {
        (Some(out), None) => {
            if images.len() != 1 {
                bail!(
                    "--out names one file, but {} images were given; use --out-dir",
                    images.len()
                );
            }
            png(out)?;
            Ok(vec![out.to_path_buf()])
        }
        (None, Some(dir)) => {
            if !dir.is_dir() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("--out-dir {}: cannot create", dir.display()))?;
            }
            let mut seen = std::collections::BTreeMap::new();
            images
                .iter()
                .map(|img| {
                    let stem = img
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .filter(|s| !s.is_empty())
                        .ok_or_else(|| anyhow::anyhow!("{}: not a file name", img.display()))?;
                    if let Some(prev) = seen.insert(stem.clone(), img.clone()) {
                        bail!(
                            "{} and {} would both be written to {}",
                            prev.display(),
                            img.display(),
                            dir.join(format!("{stem}.png")).display()
                        );
                    }
                    Ok(dir.join(format!("{stem}.png")))
                })
                .collect()
        }
        (Some(_), Some(_)) => bail!("give either --out (one image) or --out-dir, not both"),
        (None, None) => bail!("give --out (one image) or --out-dir (several)"),
    }
}

/// The value parser of count, size, index and seed flags: a non-negative whole number. A negative
/// one is taken as the flag's value (not as an unknown flag) and explained.
pub fn count<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    if s.trim_start().starts_with('-') {
        return Err("must be 0 or more: a count, size, index or seed is never negative".into());
    }
    s.parse::<T>()
        .map_err(|_| format!("`{s}` is not a whole number"))
}
