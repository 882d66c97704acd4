//! `toffee view`: novel views of one subject image with a Zero1to3-layout View Generator.

use crate::generate::{check_writable, output_paths};
use crate::image_io;
use crate::models::load::open_device;
use crate::pipeline::request::{Naming, Settings};
use crate::pipeline::view::{Pose, View, ViewGenerator, ViewRequest};
use crate::sched::SchedulerKind;
use crate::tensor::Tensor;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// A Zero1to3 pipeline folder (unet, vae, image_encoder, cc_projection, scheduler).
    #[arg(long)]
    pub model: PathBuf,
    /// The subject; its alpha channel (or --mask) composites it on white first.
    #[arg(long)]
    pub image: PathBuf,
    /// White = subject (instead of the image's alpha).
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// Polar (elevation) change in degrees, e.g. 0 or 10,-10.
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        required = true
    )]
    pub elevation: Vec<f32>,
    /// Azimuth change in degrees, e.g. 0,90,180,270.
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        required = true
    )]
    pub azimuth: Vec<f32>,
    /// Camera distance change.
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        default_value = "0"
    )]
    pub radius: Vec<f32>,
    #[arg(long, default_value_t = 50, allow_negative_numbers = true, value_parser = super::count::<usize>)]
    pub steps: usize,
    #[arg(long, default_value_t = 3.0)]
    pub guidance: f32,
    /// Override the pipeline's scheduler.
    #[arg(long)]
    pub scheduler: Option<SchedulerKind>,
    /// View i uses seed + i.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = super::count::<u64>)]
    pub seed: u64,
    /// Views per UNet batch.
    #[arg(long, default_value_t = 4, allow_negative_numbers = true, value_parser = super::count::<usize>)]
    pub batch: usize,
    /// Output PNG; several views become NAME-0000.png, ….
    #[arg(long, default_value = "view.png")]
    pub out: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(a: Args) -> Result<()> {
    let paths = write_views(&a)?;
    eprintln!("wrote {} view(s) ({})", paths.len(), paths[0].display());
    Ok(())
}

/// Pairs the angle lists: each list has one value (used for every view) or one per view.
pub fn poses(elevation: &[f32], azimuth: &[f32], radius: &[f32]) -> Result<Vec<Pose>> {
    let n = elevation.len().max(azimuth.len()).max(radius.len());
    for (name, v) in [
        ("--elevation", elevation),
        ("--azimuth", azimuth),
        ("--radius", radius),
    ] {
        if v.is_empty() || (v.len() != 1 && v.len() != n) {
            bail!(
                "{name}: give one value or {n} (one per view), got {}",
                v.len()
            );
        }
        if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
            bail!("{name}: {bad} is not a finite number");
        }
    }
    let at = |v: &[f32], i: usize| if v.len() == 1 { v[0] } else { v[i] };
    Ok((0..n)
        .map(|i| Pose {
            polar: at(elevation, i),
            azimuth: at(azimuth, i),
            radius: at(radius, i),
        })
        .collect())
}

/// The subject as Zero123 expects it: composited on white by its alpha (or `mask`), fitted to
/// `size`² (resize to cover, centre crop), in 8-bit steps. [1, size, size, 3] in [0, 1].
pub fn prepare_subject(image: &Path, mask: Option<&Path>, size: usize) -> Result<Tensor> {
    let img = image_io::load(image)?;
    let (_, h, w, _) = img.rgb.dims4();
    let alpha = match mask {
        Some(m) => {
            let t = image_io::load_mask(m)?;
            let (_, mh, mw, _) = t.dims4();
            if (mh, mw) != (h, w) {
                bail!(
                    "{}: the mask is {mw}x{mh} but the image is {w}x{h}",
                    m.display()
                );
            }
            Some(t)
        }
        None => img.alpha,
    };
    let on_white = match (alpha, mask) {
        (None, _) => img.rgb,
        // The image's own alpha: Pillow's integer alpha_composite onto white, as the reference.
        (Some(_), None) => {
            let rgb = crate::image_proc::load_rgb8_on_white(image)?;
            Tensor::new(
                vec![1, h, w, 3],
                rgb.into_raw()
                    .into_iter()
                    .map(|v| v as f32 / 255.0)
                    .collect(),
            )
        }
        (Some(a), Some(_)) => image_io::on_white(&img.rgb, &a),
    };
    let fitted = if (h, w) == (size, size) {
        on_white
    } else {
        image_io::fit(&on_white, size, size)
    };
    Ok(Tensor::new(
        fitted.shape().to_vec(),
        fitted
            .data()
            .iter()
            .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() / 255.0)
            .collect(),
    ))
}

/// Renders every pose; returns the files written.
pub fn write_views(o: &Args) -> Result<Vec<PathBuf>> {
    let poses = poses(&o.elevation, &o.azimuth, &o.radius)?;
    Settings {
        batch: o.batch,
        scheduler: o.scheduler,
        ..Settings::txt2img(o.steps, o.guidance, o.seed)
    }
    .check(Naming::Flags)?;
    let paths = output_paths(&o.out, poses.len());
    check_writable(&paths)?;
    image_io::check_output_format(&o.out)?;
    let dev = open_device(&o.device, Some(&o.model), "unet")?;
    let gen = ViewGenerator::load(&o.model, &dev)?;
    let subject = prepare_subject(&o.image, o.mask.as_deref(), gen.default_size)?;
    let req = ViewRequest {
        subjects: vec![subject],
        views: poses
            .into_iter()
            .map(|pose| View { subject: 0, pose })
            .collect(),
        steps: o.steps,
        guidance: o.guidance,
        scheduler: o.scheduler,
        seed: o.seed,
        batch: o.batch,
    };
    gen.run_batches(&req, &mut |_, _| {}, &mut |first, _, images| {
        let n = images.shape()[0];
        image_io::save_pngs(&paths[first..first + n], &images)
    })?;
    Ok(paths)
}
