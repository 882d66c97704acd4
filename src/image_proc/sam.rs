//! SAM's processor: transformers 5.23's `SamImageProcessorPil` (plus the coordinate rescaling of
//! `SamProcessor`). Longest side resized to `size.longest_edge` with Pillow's resampling
//! (`(newh, neww) = int(old · scale + 0.5)`), rescale in f64, normalise in f32, zero padding at
//! the bottom and right to `pad_size` AFTER normalisation; prompts rescaled to the resized frame;
//! `post_process_masks` with torch's bilinear `F.interpolate` (align_corners=False, no antialias)
//! on the host.

use super::resample::{resize_rgb8, Resample};
use super::{Fields, PixelScale};
use crate::tensor::Tensor;
use anyhow::{anyhow, bail, Context, Result};
use image::RgbImage;
use serde_json::Value;
use std::path::Path;

const IMAGENET_DEFAULT_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const IMAGENET_DEFAULT_STD: [f64; 3] = [0.229, 0.224, 0.225];

#[derive(Clone, Debug)]
pub struct SamProcessor {
    /// `None` when `do_resize` is false.
    pub longest_edge: Option<usize>,
    pub resample: Resample,
    scale: PixelScale,
    /// (height, width); `None` when `do_pad` is false.
    pub pad: Option<(usize, usize)>,
    /// `post_process_masks`' threshold (transformers' default 0.0).
    pub mask_threshold: f32,
}

/// One preprocessed image.
#[derive(Clone, Debug)]
pub struct SamInputs {
    /// [1, 3, H, W] NCHW, host.
    pub pixel_values: Tensor,
    /// (height, width) of the image.
    pub original_size: (usize, usize),
    /// (height, width) after the resize, before padding.
    pub reshaped_size: (usize, usize),
}

impl SamProcessor {
    /// `dir/preprocessor_config.json`, else the `image_processor` object nested in
    /// `dir/processor_config.json` (transformers 5's processor layout).
    pub fn from_dir(dir: &Path) -> Result<SamProcessor> {
        let pre = dir.join("preprocessor_config.json");
        if pre.is_file() {
            let v = read_json(&pre)?;
            return Self::from_json(&pre.display().to_string(), &v);
        }
        let proc = dir.join("processor_config.json");
        if proc.is_file() {
            let v = read_json(&proc)?;
            let Some(ip) = v.get("image_processor") else {
                bail!(
                    "{}: no `image_processor` object (and no preprocessor_config.json beside it)",
                    proc.display()
                );
            };
            return Self::from_json(&format!("{} (image_processor)", proc.display()), ip);
        }
        bail!(
            "{}: neither preprocessor_config.json nor processor_config.json",
            dir.display()
        )
    }

    /// From a JSON object; `name` is what errors call it. Missing fields take
    /// `SamImageProcessor`'s defaults.
    pub fn from_json(name: &str, v: &Value) -> Result<SamProcessor> {
        let m = v
            .as_object()
            .ok_or_else(|| anyhow!("{name}: expected a JSON object"))?;
        let f = Fields {
            name: name.to_string(),
            map: m,
        };
        let longest = f.size_field("size", "longest_edge", 1024)?;
        let resample = match f.get("resample") {
            None => Resample::Bilinear,
            Some(v) => v
                .as_u64()
                .and_then(Resample::from_pil)
                .ok_or_else(|| f.err("resample", format!("unsupported PIL filter {v}")))?,
        };
        let pad_h = f.size_field("pad_size", "height", 1024)?;
        let pad_w = f.size_field("pad_size", "width", 1024)?;
        Ok(SamProcessor {
            longest_edge: f.bool_or("do_resize", true)?.then_some(longest),
            resample,
            scale: PixelScale::read(&f, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)?,
            pad: f.bool_or("do_pad", true)?.then_some((pad_h, pad_w)),
            mask_threshold: 0.0,
        })
    }

    /// (height, width) of an `h`×`w` image after the resize: `_get_preprocess_shape`.
    pub fn resized_size(&self, h: usize, w: usize) -> (usize, usize) {
        match self.longest_edge {
            None => (h, w),
            Some(l) => {
                let scale = l as f64 * 1.0 / h.max(w) as f64;
                (
                    (h as f64 * scale + 0.5) as usize,
                    (w as f64 * scale + 0.5) as usize,
                )
            }
        }
    }

    /// pixel_values, original and reshaped sizes of one image.
    pub fn preprocess(&self, img: &RgbImage) -> Result<SamInputs> {
        let (h, w) = (img.height() as usize, img.width() as usize);
        if h == 0 || w == 0 {
            bail!("SAM processor: the image is empty ({w}x{h})");
        }
        let (rh, rw) = self.resized_size(h, w);
        if rh == 0 || rw == 0 {
            bail!("SAM processor: a {w}x{h} image resizes to nothing ({rw}x{rh})");
        }
        let (oh, ow) = self.pad.unwrap_or((rh, rw));
        if rh > oh || rw > ow {
            bail!("SAM processor: the resized image {rw}x{rh} is larger than pad_size {ow}x{oh}");
        }
        let resized;
        let src = if (rh, rw) == (h, w) {
            img
        } else {
            resized = resize_rgb8(img, rw as u32, rh as u32, self.resample);
            &resized
        };
        let mut chw = vec![0f32; 3 * oh * ow];
        for (y, row) in src.rows().enumerate() {
            for (x, px) in row.enumerate() {
                for c in 0..3 {
                    chw[(c * oh + y) * ow + x] = self.scale.value(px[c], c);
                }
            }
        }
        Ok(SamInputs {
            pixel_values: Tensor::new(vec![1, 3, oh, ow], chw),
            original_size: (h, w),
            reshaped_size: (rh, rw),
        })
    }

    /// `SamProcessor._normalize_coordinates` for boxes (x0, y0, x1, y1) given in the image of
    /// `original` (height, width): x · neww / W, y · newh / H in f64.
    pub fn rescale_boxes(&self, boxes: &[[f32; 4]], original: (usize, usize)) -> Vec<[f32; 4]> {
        let (sx, sy) = self.coord_scale(original);
        boxes
            .iter()
            .map(|b| {
                [
                    (b[0] as f64 * sx) as f32,
                    (b[1] as f64 * sy) as f32,
                    (b[2] as f64 * sx) as f32,
                    (b[3] as f64 * sy) as f32,
                ]
            })
            .collect()
    }

    /// Points (x, y) rescaled like `rescale_boxes`.
    pub fn rescale_points(&self, points: &[[f32; 2]], original: (usize, usize)) -> Vec<[f32; 2]> {
        let (sx, sy) = self.coord_scale(original);
        points
            .iter()
            .map(|p| [(p[0] as f64 * sx) as f32, (p[1] as f64 * sy) as f32])
            .collect()
    }

    fn coord_scale(&self, (h, w): (usize, usize)) -> (f64, f64) {
        let (nh, nw) = self.resized_size(h, w);
        (nw as f64 / w as f64, nh as f64 / h as f64)
    }

    /// `post_process_masks(binarize=False)` for one image: low-res logits [n, M, h, w] (or
    /// [1, n, M, h, w]) -> [n, M, H, W] logits at the original size: bilinear to pad_size, crop to
    /// `reshaped`, bilinear to `original` (torch, align_corners=False, no antialias).
    pub fn post_process_masks(
        &self,
        masks: &Tensor,
        original: (usize, usize),
        reshaped: (usize, usize),
    ) -> Result<Tensor> {
        let s = masks.shape();
        let lead: Vec<usize> = match s.len() {
            4 => s[..2].to_vec(),
            5 if s[0] == 1 => s[1..3].to_vec(),
            _ => bail!("pred_masks has shape {s:?}; expected [n, masks, h, w] for one image"),
        };
        let (h, w) = (s[s.len() - 2], s[s.len() - 1]);
        let (ph, pw) = self.pad.unwrap_or(reshaped);
        let (rh, rw) = reshaped;
        let (oh, ow) = original;
        if rh == 0 || rw == 0 || rh > ph || rw > pw || oh == 0 || ow == 0 || h == 0 || w == 0 {
            bail!(
                "post_process_masks: reshaped size {rh}x{rw} must fit the pad size {ph}x{pw}, and \
                 the original size {oh}x{ow} must not be empty"
            );
        }
        let mut out = Vec::with_capacity(lead[0] * lead[1] * oh * ow);
        for plane in masks.data().chunks(h * w) {
            let up = bilinear(plane, h, w, ph, pw);
            let crop: Vec<f32> = (0..rh)
                .flat_map(|y| up[y * pw..y * pw + rw].iter().copied())
                .collect();
            out.extend(bilinear(&crop, rh, rw, oh, ow));
        }
        Ok(Tensor::new(vec![lead[0], lead[1], oh, ow], out))
    }

    /// `> mask_threshold` of post-processed logits.
    pub fn binarize(&self, logits: &[f32]) -> Vec<bool> {
        logits.iter().map(|&v| v > self.mask_threshold).collect()
    }
}

/// torch `F.interpolate(mode="bilinear", align_corners=False)` of one [h, w] plane to [oh, ow]
/// (no antialias), f32 arithmetic in torch's order.
pub fn bilinear(src: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let axis = |n_in: usize, n_out: usize| -> Vec<(usize, usize, f32, f32)> {
        let scale = n_in as f32 / n_out as f32;
        (0..n_out)
            .map(|o| {
                let x = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
                let i0 = (x as usize).min(n_in - 1);
                let i1 = if i0 < n_in - 1 { i0 + 1 } else { i0 };
                let l1 = x - i0 as f32;
                (i0, i1, 1.0 - l1, l1)
            })
            .collect()
    };
    let (ys, xs) = (axis(h, oh), axis(w, ow));
    let mut out = Vec::with_capacity(oh * ow);
    for &(y0, y1, h0, h1) in &ys {
        for &(x0, x1, w0, w1) in &xs {
            let v = h0 * (w0 * src[y0 * w + x0] + w1 * src[y0 * w + x1])
                + h1 * (w0 * src[y1 * w + x0] + w1 * src[y1 * w + x1]);
            out.push(v);
        }
    }
    out
}

fn read_json(path: &Path) -> Result<Value> {
    let text = crate::input::read_to_string(path)
        .with_context(|| format!("cannot read image processor config {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

/// SAM's sizes: a bare number or a field of an object.
impl Fields<'_> {
    /// `size.longest_edge`, `pad_size.height`, …: a positive pixel count (a bare int is the value
    /// itself).
    fn size_field(&self, key: &str, sub: &str, default: usize) -> Result<usize> {
        let v = match self.get(key) {
            None => return Ok(default),
            Some(Value::Object(o)) => match o.get(sub).filter(|v| !v.is_null()) {
                Some(v) => v,
                None => return Err(self.err(key, format!("no `{sub}`"))),
            },
            Some(v) => v,
        };
        v.as_u64()
            .filter(|&n| n > 0 && n <= 1 << 16)
            .map(|n| n as usize)
            .ok_or_else(|| {
                self.err(
                    key,
                    format!("`{sub}`: expected a positive pixel count, found {v}"),
                )
            })
    }
}
