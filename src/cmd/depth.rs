//! `toffee depth`: depth maps of images with a Depth Anything model folder (config.json,
//! safetensors, preprocessor_config.json).
//!
//! For every image, two files (written atomically):
//! - `NAME.png`: 16-bit grayscale. Relative models: the map min–max normalised to 0..=65535
//!   (brighter = nearer); metric models (`depth_estimation_type: "metric"`): depth in millimetres,
//!   clamped at 65535 (brighter = farther). See `pipeline::depth`.
//! - `NAME.preview.png`: an 8-bit min–max normalised preview.
//!
//! One image: `--image IMG --out depth.png` (preview `depth.preview.png`). Several: `--images A B …
//! --out-dir DIR` writes `DIR/<stem of A>.png`, …; a folder among `--images` stands for its PNG /
//! JPEG files in name order. Images are decoded like the other commands (alpha composited onto
//! white, as transformers' processors do with an RGBA image).

use crate::backend::Device;
use crate::image_proc::dpt::DptProcessor;
use crate::image_proc::load_rgb8_on_white;
use crate::models::depth_anything::DepthAnything;
use crate::pipeline::depth::{estimate_depth, DepthMap, MAX_BATCH};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub struct Options {
    pub model: PathBuf,
    /// Images or folders of images.
    pub images: Vec<PathBuf>,
    /// The output for a single image (`--image`).
    pub out: Option<PathBuf>,
    /// The output folder for several images (`--images`).
    pub out_dir: Option<PathBuf>,
    pub device: String,
}

/// `out` with `.png` replaced by `.preview.png` (`depth.png` -> `depth.preview.png`).
pub fn preview_path(out: &Path) -> PathBuf {
    out.with_extension("preview.png")
}

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

/// (depth file, preview file) per image.
fn outputs(o: &Options, images: &[PathBuf]) -> Result<Vec<(PathBuf, PathBuf)>> {
    let png = |p: &Path| -> Result<()> {
        match p.extension().map(|e| e.to_string_lossy().to_lowercase()) {
            Some(e) if e == "png" => Ok(()),
            _ => bail!(
                "--out {}: depth maps are written as 16-bit PNG; use a .png name",
                p.display()
            ),
        }
    };
    match (&o.out, &o.out_dir) {
        (Some(out), None) => {
            if images.len() != 1 {
                bail!(
                    "--out names one file, but {} images were given; use --out-dir",
                    images.len()
                );
            }
            png(out)?;
            Ok(vec![(out.clone(), preview_path(out))])
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
                    let out = dir.join(format!("{stem}.png"));
                    Ok((out.clone(), preview_path(&out)))
                })
                .collect()
        }
        (Some(_), Some(_)) => bail!("give either --out (one image) or --out-dir, not both"),
        (None, None) => bail!("give --out (one image) or --out-dir (several)"),
    }
}

/// Runs the command; returns the depth files written (previews beside them).
pub fn run(o: &Options) -> Result<Vec<PathBuf>> {
    let images = expand_images(&o.images)?;
    if images.is_empty() {
        bail!("--images: give at least one image");
    }
    let outs = outputs(o, &images)?;
    let all: Vec<PathBuf> = outs
        .iter()
        .flat_map(|(a, b)| [a.clone(), b.clone()])
        .collect();
    crate::generate::check_writable(&all)?;
    let dev = Device::open(&o.device, false)?;
    let model = DepthAnything::load_dir(&o.model, &dev)?;
    let proc = DptProcessor::from_dir(&o.model)?;
    // Decode and run a few batches' worth at a time, so a long list is not all in memory.
    for (paths, outs) in images.chunks(4 * MAX_BATCH).zip(outs.chunks(4 * MAX_BATCH)) {
        let imgs = paths
            .iter()
            .map(|p| load_rgb8_on_white(p))
            .collect::<Result<Vec<_>>>()?;
        // Size problems are found here first, so the error names the file.
        for (p, img) in paths.iter().zip(&imgs) {
            proc.output_size(img.height() as usize, img.width() as usize)
                .and_then(|(h, w)| model.check_input(h, w, 3))
                .with_context(|| format!("{}", p.display()))?;
        }
        let maps = estimate_depth(&model, &proc, &imgs)?;
        for (map, (depth, preview)) in maps.iter().zip(outs) {
            save(&model, map, depth, preview)?;
        }
    }
    Ok(outs.into_iter().map(|(d, _)| d).collect())
}

/// Writes one map: millimetres for metric models, normalised for relative ones.
pub fn save(model: &DepthAnything, map: &DepthMap, depth: &Path, preview: &Path) -> Result<()> {
    if model.is_metric() {
        map.save_png16_mm(depth)?;
    } else {
        map.save_png16(depth)?;
    }
    map.save_preview(preview)
}
