//! Subject masks from a name: CLIPSeg's text-prompted probabilities, thresholded, optionally
//! sharpened by SAM prompted with the box around them (the Grounded-SAM recipe, with CLIPSeg as
//! the text-grounded detector).
//!
//! The recipe, step by step:
//! 1. CLIPSeg on the image (its processor resizes to the model's square input, aspect not kept)
//!    and the text gives logits at the model size; `sigmoid`, then a bilinear resize (torch's
//!    `F.interpolate`, `align_corners=False`, no antialias) back to the image size undoes the
//!    processor's stretch.
//! 2. Pixels with probability `> threshold` form the CLIPSeg mask.
//! 3. With SAM: the box is the tight bounding box of every pixel of that mask, as
//!    (x0, y0, x1, y1) in pixel edges (`x1 = last column + 1`), so it lies inside the image. SAM
//!    runs on it with multimask output and the mask with the highest predicted IoU replaces the
//!    CLIPSeg mask. An empty CLIPSeg mask has no box: SAM does not run.
//! 4. The verdict: a mask covering less than `min_area` of the image is empty (the text matched
//!    nothing), more than `max_area` is the whole image (the text matched everything); both are
//!    reported, neither is an error.

use crate::backend::{self as ops, Device};
use crate::image_proc::sam::SamProcessor;
use crate::models::clipseg::ClipSegSegmenter;
use crate::models::sam::{segment_boxes, Sam};
use crate::tensor::Tensor;
use anyhow::{Context, Result};
use image::{GrayImage, RgbImage};
use std::path::Path;

/// How a mask is cut and judged.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskSettings {
    /// CLIPSeg probability above which a pixel is the subject.
    pub threshold: f32,
    /// Below this fraction of the image the mask is empty.
    pub min_area: f32,
    /// Above this fraction of the image the mask is the whole image.
    pub max_area: f32,
}

impl Default for MaskSettings {
    fn default() -> Self {
        MaskSettings {
            threshold: 0.5,
            min_area: 0.005,
            max_area: 0.95,
        }
    }
}

impl MaskSettings {
    pub fn check(&self, origin: &str) -> Result<()> {
        let ok = self.threshold.is_finite()
            && (0.0..1.0).contains(&self.threshold)
            && (0.0..=1.0).contains(&self.min_area)
            && (0.0..=1.0).contains(&self.max_area)
            && self.min_area < self.max_area;
        if !ok {
            anyhow::bail!(
                "{origin}: mask settings threshold {} / min_area {} / max_area {}: expected \
                 0 <= threshold < 1 and 0 <= min_area < max_area <= 1",
                self.threshold,
                self.min_area,
                self.max_area
            );
        }
        Ok(())
    }
}

/// Whether a mask is usable as a subject's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskVerdict {
    Ok,
    /// Below `min_area`: the text matched nothing.
    Empty,
    /// Above `max_area`: the text matched everything.
    WholeImage,
}

impl MaskVerdict {
    pub fn judge(area: f32, s: &MaskSettings) -> MaskVerdict {
        if area < s.min_area {
            MaskVerdict::Empty
        } else if area > s.max_area {
            MaskVerdict::WholeImage
        } else {
            MaskVerdict::Ok
        }
    }
}

/// A subject mask at its image's size.
#[derive(Clone, Debug)]
pub struct SubjectMask {
    pub width: usize,
    pub height: usize,
    /// Row-major `height × width`.
    pub mask: Vec<bool>,
    /// CLIPSeg's probabilities at the image size (row-major).
    pub probs: Vec<f32>,
    /// The box SAM was prompted with (None without SAM or when CLIPSeg found nothing).
    pub sam_box: Option<[f32; 4]>,
    /// SAM's predicted IoU of the chosen mask.
    pub sam_iou: Option<f32>,
    pub verdict: MaskVerdict,
}

impl SubjectMask {
    /// The fraction of the image the mask covers.
    pub fn area(&self) -> f32 {
        area(&self.mask)
    }

    /// The mask as an 8-bit image: 255 subject, 0 background.
    pub fn to_gray(&self) -> GrayImage {
        let px = self.mask.iter().map(|&m| if m { 255 } else { 0 }).collect();
        GrayImage::from_raw(self.width as u32, self.height as u32, px).expect("w*h samples")
    }

    /// Writes [`to_gray`](Self::to_gray) as a PNG via a temporary file renamed into place.
    pub fn save_png(&self, path: &Path) -> Result<()> {
        let mut bytes = Vec::new();
        self.to_gray()
            .write_with_encoder(image::codecs::png::PngEncoder::new(&mut bytes))
            .with_context(|| format!("cannot encode {}", path.display()))?;
        crate::weights::safetensors::write_atomic(path, &bytes)
    }
}

fn area(mask: &[bool]) -> f32 {
    if mask.is_empty() {
        return 0.0;
    }
    mask.iter().filter(|&&m| m).count() as f32 / mask.len() as f32
}

/// Probabilities [S, S] (or [1, S, S]) resized to `w`×`h`, bilinear, torch's
/// `align_corners=False` rule.
pub fn probs_at(probs: &Tensor, w: usize, h: usize) -> Vec<f32> {
    let s = probs.shape();
    let (ph, pw) = (s[s.len() - 2], s[s.len() - 1]);
    let nhwc = probs.reshape(vec![1, ph, pw, 1]);
    ops::resize_bilinear(&nhwc, h, w, false).data().to_vec()
}

/// The tight box (x0, y0, x1, y1) around the set pixels, in pixel edges; None when none is set.
pub fn mask_box(mask: &[bool], w: usize, h: usize) -> Option<[f32; 4]> {
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for y in 0..h {
        for x in 0..w {
            if mask[y * w + x] {
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x + 1);
                y1 = y1.max(y + 1);
            }
        }
    }
    (x0 != usize::MAX).then_some([x0 as f32, y0 as f32, x1 as f32, y1 as f32])
}

/// CLIPSeg, and optionally SAM, loaded for masking subjects by name.
pub struct Segmenter {
    pub clipseg: ClipSegSegmenter,
    pub sam: Option<(Sam, SamProcessor)>,
    pub settings: MaskSettings,
}

impl Segmenter {
    /// A CLIPSeg folder and optionally a SAM folder (each as transformers saves it).
    pub fn load(
        clipseg: &Path,
        sam: Option<&Path>,
        settings: MaskSettings,
        device: &Device,
    ) -> Result<Segmenter> {
        let clipseg = ClipSegSegmenter::from_dir(clipseg, device)
            .with_context(|| format!("loading CLIPSeg from {}", clipseg.display()))?;
        let sam = sam
            .map(|dir| -> Result<(Sam, SamProcessor)> {
                let model = Sam::load_dir(dir, device)
                    .with_context(|| format!("loading SAM from {}", dir.display()))?;
                Ok((model, SamProcessor::from_dir(dir)?))
            })
            .transpose()?;
        Ok(Segmenter {
            clipseg,
            sam,
            settings,
        })
    }

    /// The subject named `text` in `img` (see the module docs for the recipe).
    pub fn segment(&self, img: &RgbImage, text: &str) -> Result<SubjectMask> {
        let _span = tracing::info_span!("mask").entered();
        let (w, h) = (img.width() as usize, img.height() as usize);
        let probs = self.clipseg.probs(img, &[text.to_string()])?;
        let probs = probs_at(&probs, w, h);
        let mut mask: Vec<bool> = probs.iter().map(|&p| p > self.settings.threshold).collect();
        let (mut sam_box, mut sam_iou) = (None, None);
        if let Some((sam, proc)) = &self.sam {
            if let Some(b) = mask_box(&mask, w, h) {
                let out = segment_boxes(sam, proc, img, &[b], true)?;
                let (best, iou) = out[0].best();
                mask = best.to_vec();
                sam_box = Some(b);
                sam_iou = Some(iou);
            }
        }
        let verdict = MaskVerdict::judge(area(&mask), &self.settings);
        Ok(SubjectMask {
            width: w,
            height: h,
            mask,
            probs,
            sam_box,
            sam_iou,
            verdict,
        })
    }
}
