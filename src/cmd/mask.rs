//! `toffee mask`: subject masks from a text with CLIPSeg, optionally sharpened by SAM prompted
//! with the CLIPSeg mask's box (see `pipeline::mask` for the recipe).
//!
//! Per image: an 8-bit grayscale PNG (255 subject, 0 background), written atomically, and one
//! JSON line on stdout: `{"image", "mask", "text", "area", "verdict", "box", "sam_iou"}`. A text
//! that matches nothing writes an all-black mask with verdict `"empty"` and a warning; it is not
//! an error. Without `--model`, built-in tiny random-weight models run (a demo of the command,
//! not real masks).

use super::{expand_images, png_outputs};
use crate::backend::Device;
use crate::image_proc::load_rgb8_on_white;
use crate::models::load::open_device;
use crate::pipeline::mask::{MaskSettings, MaskVerdict, Segmenter, SubjectMask};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// A CLIPSeg folder (CLIPSegForImageSegmentation, tokenizer, preprocessor config).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A SAM folder (SamModel): refines CLIPSeg's mask from its bounding box.
    #[arg(long)]
    pub sam: Option<PathBuf>,
    /// With the built-in CLIPSeg (no --model): also run the built-in SAM.
    #[arg(long, conflicts_with = "sam")]
    pub builtin_sam: bool,
    /// One image (with --out).
    #[arg(long, conflicts_with = "images", required_unless_present = "images")]
    pub image: Option<PathBuf>,
    /// Several images or folders of images (with --out-dir).
    #[arg(long, num_args = 1..)]
    pub images: Vec<PathBuf>,
    /// What to find ("a teapot"); default: each image's file name (red_teapot.png -> "red
    /// teapot").
    #[arg(long)]
    pub text: Option<String>,
    /// CLIPSeg probability above which a pixel is the subject.
    #[arg(long, default_value_t = 0.5)]
    pub threshold: f32,
    /// The mask PNG for --image.
    #[arg(
        long,
        requires = "image",
        default_value_if("image", clap::builder::ArgPredicate::IsPresent, "mask.png")
    )]
    pub out: Option<PathBuf>,
    /// Output folder for --images: DIR/<image stem>.png.
    #[arg(long, conflicts_with = "image", required_unless_present = "image")]
    pub out_dir: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(a: Args) -> Result<()> {
    let reports = mask_files(&Options {
        model: a.model,
        sam: a.sam,
        builtin_sam: a.builtin_sam,
        images: a.image.map_or(a.images, |i| vec![i]),
        text: a.text,
        settings: MaskSettings {
            threshold: a.threshold,
            ..Default::default()
        },
        out: a.out,
        out_dir: a.out_dir,
        device: a.device,
    })?;
    for r in &reports {
        println!("{}", serde_json::to_string(r)?);
        if r.verdict != MaskVerdict::Ok {
            let what = match r.verdict {
                MaskVerdict::Empty => "empty",
                _ => "the whole image",
            };
            eprintln!(
                "toffee: warning: {}: the mask for `{}` is {what} ({:.1}% of the image)",
                r.image.display(),
                r.text,
                100.0 * r.area
            );
        }
    }
    let n = reports.len();
    eprintln!("wrote {n} mask{}", if n == 1 { "" } else { "s" });
    Ok(())
}

pub struct Options {
    /// CLIPSeg folder; None: the built-in tiny model.
    pub model: Option<PathBuf>,
    /// SAM folder: refines CLIPSeg's mask from its box (needs `model`).
    pub sam: Option<PathBuf>,
    /// With the built-in CLIPSeg: also the built-in SAM.
    pub builtin_sam: bool,
    /// Images or folders of images.
    pub images: Vec<PathBuf>,
    /// The text; None: each image's file name as a noun (`red_teapot.png` -> "red teapot").
    pub text: Option<String>,
    pub settings: MaskSettings,
    pub out: Option<PathBuf>,
    pub out_dir: Option<PathBuf>,
    pub device: String,
}

/// What one image gave.
#[derive(Debug, serde::Serialize)]
pub struct MaskReport {
    pub image: PathBuf,
    pub mask: PathBuf,
    pub text: String,
    pub area: f32,
    pub verdict: MaskVerdict,
    #[serde(rename = "box")]
    pub sam_box: Option<[f32; 4]>,
    pub sam_iou: Option<f32>,
}

/// The noun a file name stands for, as the pairs job reads subject names:
/// `red_teapot.png` -> "red teapot".
pub fn text_of(image: &Path) -> String {
    crate::dataset::plan::noun_of(
        &image
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    )
}

/// Loads the models `o` names (built-in ones without `model`).
pub fn segmenter(o: &Options, dev: &Device) -> Result<Segmenter> {
    match &o.model {
        Some(m) => {
            if o.builtin_sam {
                bail!("the built-in SAM goes with the built-in CLIPSeg: give --sam DIR");
            }
            Segmenter::load(m, o.sam.as_deref(), o.settings, dev)
        }
        None => {
            if o.sam.is_some() {
                bail!("--sam needs --model: a SAM folder refines a CLIPSeg folder's masks");
            }
            crate::builtin::segmenter(o.builtin_sam, o.settings, dev)
        }
    }
}

/// Runs the command: writes a mask per image and returns what each gave.
pub fn mask_files(o: &Options) -> Result<Vec<MaskReport>> {
    o.settings.check("toffee mask")?;
    let images = expand_images(&o.images)?;
    if images.is_empty() {
        bail!("--images: give at least one image");
    }
    let outs = png_outputs(o.out.as_deref(), o.out_dir.as_deref(), &images, "masks")?;
    crate::generate::check_writable(&outs)?;
    let texts: Vec<String> = images
        .iter()
        .map(|p| match &o.text {
            Some(t) => Ok(t.clone()),
            None => {
                let t = text_of(p);
                if t.is_empty() {
                    bail!("{}: no --text and no name to use as one", p.display());
                }
                Ok(t)
            }
        })
        .collect::<Result<_>>()?;
    if texts.iter().any(|t| t.trim().is_empty()) {
        bail!("--text is empty: name the subject to find");
    }
    let dev = open_device(&o.device, o.model.as_deref(), "")?;
    let seg = segmenter(o, &dev)?;
    let mut reports = Vec::new();
    for ((path, out), text) in images.iter().zip(&outs).zip(&texts) {
        let img = load_rgb8_on_white(path)?;
        let m: SubjectMask = seg
            .segment(&img, text)
            .with_context(|| format!("{}", path.display()))?;
        m.save_png(out)?;
        reports.push(MaskReport {
            image: path.clone(),
            mask: out.clone(),
            text: text.clone(),
            area: m.area(),
            verdict: m.verdict,
            sam_box: m.sam_box,
            sam_iou: m.sam_iou,
        });
    }
    Ok(reports)
}
