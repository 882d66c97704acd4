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

use super::{expand_images, png_outputs};
use crate::image_proc::dpt::DptProcessor;
use crate::image_proc::load_rgb8_on_white;
use crate::models::depth_anything::DepthAnything;
use crate::models::load::open_device;
use crate::pipeline::depth::{estimate_depth, DepthMap, MAX_BATCH};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// A Depth Anything folder (config.json, safetensors, preprocessor_config.json);
    /// without it a built-in tiny random-weight model runs (a demo, not real depth).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// One image (with --out).
    #[arg(long, conflicts_with = "images", required_unless_present = "images")]
    pub image: Option<PathBuf>,
    /// Several images or folders of images (with --out-dir).
    #[arg(long, num_args = 1..)]
    pub images: Vec<PathBuf>,
    /// The 16-bit depth PNG for --image; the preview goes beside it as NAME.preview.png.
    #[arg(
        long,
        requires = "image",
        default_value_if("image", clap::builder::ArgPredicate::IsPresent, "depth.png")
    )]
    pub out: Option<PathBuf>,
    /// Output folder for --images: DIR/<image stem>.png and .preview.png.
    #[arg(long, conflicts_with = "image", required_unless_present = "image")]
    pub out_dir: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(a: Args) -> Result<()> {
    let written = estimate_files(&Options {
        model: a.model,
        images: a.image.map_or(a.images, |i| vec![i]),
        out: a.out,
        out_dir: a.out_dir,
        device: a.device,
    })?;
    let n = written.len();
    eprintln!(
        "wrote {n} depth map{} ({}{}) and previews",
        if n == 1 { "" } else { "s" },
        written[0].display(),
        if n > 1 { " …" } else { "" }
    );
    Ok(())
}

pub struct Options {
    /// None: the built-in tiny random-weight model (a demo of the command, not real depth).
    pub model: Option<PathBuf>,
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

/// (depth file, preview file) per image.
fn outputs(o: &Options, images: &[PathBuf]) -> Result<Vec<(PathBuf, PathBuf)>> {
    let outs = png_outputs(o.out.as_deref(), o.out_dir.as_deref(), images, "depth maps")?;
    Ok(outs
        .into_iter()
        .map(|out| {
            let preview = preview_path(&out);
            (out, preview)
        })
        .collect())
}

/// Runs the command; returns the depth files written (previews beside them).
pub fn estimate_files(o: &Options) -> Result<Vec<PathBuf>> {
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
    let dev = open_device(&o.device, o.model.as_deref(), "")?;
    let (model, proc) = match &o.model {
        Some(dir) => (
            DepthAnything::load_dir(dir, &dev)?,
            DptProcessor::from_dir(dir)?,
        ),
        None => crate::builtin::depth_anything(&dev)?,
    };
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
