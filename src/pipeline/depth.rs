//! Monocular depth: images -> DPT preprocessing -> Depth Anything -> depth maps at each image's own
//! size (transformers' `post_process_depth_estimation`), and the files they are saved as.
//!
//! File encodings (both written atomically: a temporary file renamed into place):
//! - [`DepthMap::save_png16`]: 16-bit grayscale PNG, the map min–max normalised to 0..=65535
//!   (`round((d − min) / (max − min) · 65535)`; a constant map is all 0). For relative models
//!   (inverse depth) brighter = nearer. The scale is per image, so values are comparable only
//!   within one file.
//! - [`DepthMap::save_png16_mm`]: 16-bit grayscale PNG of metric depth in millimetres
//!   (`round(d · 1000)`, clamped to 0..=65535, i.e. at most 65.535 m): for metric models, an
//!   absolute scale shared by every file; brighter = farther.
//! - [`DepthMap::save_preview`]: 8-bit grayscale PNG, min–max normalised to 0..=255, for looking at.
//!
//! NaN values (none come out of a healthy model) are written as 0.

use crate::image_proc::dpt::{post_process_depth_estimation, DptProcessor};
use crate::models::depth_anything::DepthAnything;
use crate::tensor::Tensor;
use anyhow::{anyhow, Context, Result};
use image::{DynamicImage, ImageBuffer, Luma, RgbImage};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

/// Images per model call in [`estimate_depth`] (images of one processed size share a call).
pub const MAX_BATCH: usize = 8;

/// A depth map at an input image's size, row-major `height × width`.
#[derive(Clone, Debug, PartialEq)]
pub struct DepthMap {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

impl DepthMap {
    /// (min, max) of the finite values ((0, 0) when there are none).
    pub fn range(&self) -> (f32, f32) {
        let (lo, hi) = self
            .data
            .iter()
            .filter(|v| v.is_finite())
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        if lo > hi {
            (0.0, 0.0)
        } else {
            (lo, hi)
        }
    }

    /// Values min–max normalised to 0..=`top` and rounded (half to even); a constant map and NaN
    /// give 0.
    fn normalised(&self, top: f32) -> impl Iterator<Item = f32> + '_ {
        let (lo, hi) = self.range();
        let span = hi - lo;
        self.data.iter().map(move |&v| {
            if !v.is_finite() || span <= 0.0 {
                0.0
            } else {
                (((v - lo) / span).clamp(0.0, 1.0) * top).round_ties_even()
            }
        })
    }

    /// The 16-bit samples [`save_png16`](Self::save_png16) writes.
    pub fn to_u16_normalised(&self) -> Vec<u16> {
        self.normalised(65535.0).map(|v| v as u16).collect()
    }

    /// The 16-bit samples [`save_png16_mm`](Self::save_png16_mm) writes: millimetres.
    pub fn to_u16_millimetres(&self) -> Vec<u16> {
        self.data
            .iter()
            .map(|&v| {
                if v.is_nan() {
                    0
                } else {
                    (v as f64 * 1000.0).round_ties_even().clamp(0.0, 65535.0) as u16
                }
            })
            .collect()
    }

    /// The 8-bit samples [`save_preview`](Self::save_preview) writes.
    pub fn to_u8_normalised(&self) -> Vec<u8> {
        self.normalised(255.0).map(|v| v as u8).collect()
    }

    /// 16-bit grayscale PNG, min–max normalised (see the module docs).
    pub fn save_png16(&self, path: &Path) -> Result<()> {
        self.write16(path, self.to_u16_normalised())
    }

    /// 16-bit grayscale PNG of depth in millimetres, for metric models (see the module docs).
    pub fn save_png16_mm(&self, path: &Path) -> Result<()> {
        self.write16(path, self.to_u16_millimetres())
    }

    /// 8-bit grayscale PNG, min–max normalised.
    pub fn save_preview(&self, path: &Path) -> Result<()> {
        let img: ImageBuffer<Luma<u8>, Vec<u8>> = self.buffer(path, self.to_u8_normalised())?;
        write_png(path, DynamicImage::ImageLuma8(img))
    }

    fn write16(&self, path: &Path, samples: Vec<u16>) -> Result<()> {
        let img: ImageBuffer<Luma<u16>, Vec<u16>> = self.buffer(path, samples)?;
        write_png(path, DynamicImage::ImageLuma16(img))
    }

    fn buffer<T: image::Primitive>(
        &self,
        path: &Path,
        samples: Vec<T>,
    ) -> Result<ImageBuffer<Luma<T>, Vec<T>>> {
        let (w, h) = (u32::try_from(self.width)?, u32::try_from(self.height)?);
        ImageBuffer::from_raw(w, h, samples).ok_or_else(|| {
            anyhow!(
                "cannot write {}: a {}x{} depth map holds {} values",
                path.display(),
                self.width,
                self.height,
                self.data.len()
            )
        })
    }
}

/// Encodes in memory, then writes via a temporary file renamed into place.
fn write_png(path: &Path, img: DynamicImage) -> Result<()> {
    let mut bytes = Vec::new();
    img.write_with_encoder(image::codecs::png::PngEncoder::new(&mut bytes))
        .with_context(|| format!("cannot encode {}", path.display()))?;
    crate::weights::safetensors::write_atomic(path, &bytes)
}

/// Depth maps of `images`, each at its own size: every image is preprocessed by `proc` (its own
/// processed size), images of equal processed size run together (at most [`MAX_BATCH`] per call),
/// and each prediction is resized back to its image (bicubic, as
/// `post_process_depth_estimation`). Errors name the image by its position.
pub fn estimate_depth(
    model: &DepthAnything,
    proc: &DptProcessor,
    images: &[RgbImage],
) -> Result<Vec<DepthMap>> {
    let pixels: Vec<Tensor> = images
        .par_iter()
        .enumerate()
        .map(|(i, img)| {
            let t = proc.preprocess(img).with_context(|| image_name(i, img))?;
            let (_, c, h, w) = t.dims4();
            model
                .check_input(h, w, c)
                .with_context(|| image_name(i, img))?;
            Ok(t)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut groups: BTreeMap<(usize, usize), Vec<usize>> = BTreeMap::new();
    for (i, p) in pixels.iter().enumerate() {
        groups
            .entry((p.shape()[2], p.shape()[3]))
            .or_default()
            .push(i);
    }
    let dev = model.device();
    let mut out: Vec<Option<DepthMap>> = vec![None; images.len()];
    for idx in groups.values() {
        for chunk in idx.chunks(MAX_BATCH) {
            let batch: Vec<&Tensor> = chunk.iter().map(|&i| &pixels[i]).collect();
            let x = dev.put(Tensor::cat0(&batch).to_nhwc());
            let pred = model.forward(&x);
            dev.check()?;
            let pred = pred.to_host()?;
            let sizes: Vec<(usize, usize)> = chunk
                .iter()
                .map(|&i| (images[i].height() as usize, images[i].width() as usize))
                .collect();
            for (&i, d) in chunk
                .iter()
                .zip(post_process_depth_estimation(&pred, &sizes)?)
            {
                out[i] = Some(DepthMap {
                    width: d.shape()[1],
                    height: d.shape()[0],
                    data: d.into_vec(),
                });
            }
        }
    }
    Ok(out
        .into_iter()
        .map(|d| d.expect("every image is in one group"))
        .collect())
}

fn image_name(i: usize, img: &RgbImage) -> String {
    format!("image {i} ({}x{})", img.width(), img.height())
}
