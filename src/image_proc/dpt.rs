//! transformers' `DPTImageProcessorPil` (the image processor of DPT and Depth Anything checkpoints)
//! from a `preprocessor_config.json`, and its `post_process_depth_estimation`.
//!
//! Preprocessing is per image, and every image keeps its own output size:
//! 1. resize with Pillow (8-bit, [`resize_rgb8`]) to `get_resize_output_image_size`: the scales
//!    `size.height / H` and `size.width / W`; with `keep_aspect_ratio` both sides take the scale
//!    *closer to 1* (`|1 - s|` smallest; not the larger scale, so this is not a lower bound: a tiny
//!    image is upscaled by the smaller factor); each side is then `round(s · side / m) · m` with
//!    `m = ensure_multiple_of` and Python's `round` (half to even). Nothing bounds the result from
//!    below, so a very thin image can round to 0 pixels: an error here (transformers fails too);
//! 2. rescale (`u8 as f64 * rescale_factor`, then f32) and normalise (`(x - mean) / std` in f32);
//! 3. with `do_pad` and a `size_divisor`, zero-pad (after normalising) each side up to a multiple of
//!    `size_divisor`, split as evenly as possible with the odd pixel at the bottom / right.
//!
//! `post_process_depth_estimation` resizes a predicted depth map to the original image size with
//! torch's `F.interpolate(mode="bicubic", align_corners=False)` (a = −0.75, no antialiasing; values
//! may overshoot the input range).

use super::{resize_rgb8, Fields, PixelScale, Resample, Size};
use crate::tensor::Tensor;
use anyhow::{anyhow, bail, Context, Result};
use image::RgbImage;
use serde_json::{Map, Value};
use std::path::Path;

/// `IMAGENET_STANDARD_MEAN` / `_STD`: the class defaults (real checkpoints set ImageNet's).
const STANDARD_MEAN: [f64; 3] = [0.5, 0.5, 0.5];
const STANDARD_STD: [f64; 3] = [0.5, 0.5, 0.5];

/// The largest side a resized image may have (far above what any depth model is run at).
pub const MAX_SIDE: usize = 16384;

/// A DPT image processor read from a `preprocessor_config.json`.
#[derive(Clone, Debug)]
pub struct DptProcessor {
    /// (height, width) of `size`; `None` when `do_resize` is false.
    size: Option<(usize, usize)>,
    keep_aspect_ratio: bool,
    ensure_multiple_of: usize,
    resample: Resample,
    scale: PixelScale,
    /// `size_divisor` when `do_pad` is true and it is set.
    pad_to: Option<usize>,
}

/// The resize fields of a [`DptProcessor`], as its config gives them.
struct ResizeSettings {
    size: Option<(usize, usize)>,
    keep_aspect_ratio: bool,
    ensure_multiple_of: usize,
    resample: Resample,
}

impl DptProcessor {
    /// Reads `dir/preprocessor_config.json` (or, failing that, the `image_processor` object of
    /// transformers 5's `processor_config.json`).
    pub fn from_dir(dir: &Path) -> Result<DptProcessor> {
        let pre = dir.join("preprocessor_config.json");
        let proc = dir.join("processor_config.json");
        if !pre.is_file() && proc.is_file() {
            let v = read_json(&proc)?;
            let Some(inner) = v.get("image_processor") else {
                bail!(
                    "{}: no `image_processor` object (and no preprocessor_config.json beside it)",
                    proc.display()
                );
            };
            return Self::from_value(&proc, inner);
        }
        Self::from_file(&pre)
    }

    /// Reads a `preprocessor_config.json`; errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<DptProcessor> {
        Self::from_value(path, &read_json(path)?)
    }

    /// A processor from a JSON object made in code (the built-in demo); `name` is what errors
    /// call it.
    pub fn from_json(name: &str, value: &Value) -> Result<DptProcessor> {
        Self::from_value(Path::new(name), value)
    }

    fn from_value(path: &Path, value: &Value) -> Result<DptProcessor> {
        let map = value
            .as_object()
            .ok_or_else(|| anyhow!("{}: expected a JSON object", path.display()))?;
        Self::from_map(path, map)
    }

    fn from_map(path: &Path, map: &Map<String, Value>) -> Result<DptProcessor> {
        let f = Fields {
            name: path.display().to_string(),
            map,
        };
        Self::check_kind(&f)?;
        let ResizeSettings {
            size,
            keep_aspect_ratio,
            ensure_multiple_of,
            resample,
        } = Self::resize_settings(&f)?;
        let scale = PixelScale::read(&f, STANDARD_MEAN, STANDARD_STD)?;
        let do_pad = f.bool_or("do_pad", false)?;
        let size_divisor = match f.get("size_divisor") {
            None => None,
            Some(v) => Some(f.positive_int("size_divisor", v)?),
        };
        // Only segmentation maps are ever label-reduced; validate the type and move on.
        f.bool_or("do_reduce_labels", false)?;
        f.bool_or("do_convert_rgb", true)?;
        Ok(DptProcessor {
            size,
            keep_aspect_ratio,
            ensure_multiple_of,
            resample,
            scale,
            pad_to: if do_pad { size_divisor } else { None },
        })
    }

    /// Rejects a config of another image processor or of an unsupported data format.
    fn check_kind(f: &Fields) -> Result<()> {
        if let Some((key, class)) = ["image_processor_type", "feature_extractor_type"]
            .into_iter()
            .find_map(|k| f.get(k).map(|v| (k, v)))
        {
            let name = class
                .as_str()
                .unwrap_or("")
                .replace("FeatureExtractor", "ImageProcessor");
            let base = name
                .strip_suffix("Fast")
                .or_else(|| name.strip_suffix("Pil"))
                .unwrap_or(&name);
            if base != "DPTImageProcessor" {
                return Err(f.err(
                    key,
                    format!("{class} is not a DPT image processor (expected DPTImageProcessor)"),
                ));
            }
        }
        if let Some(v) = f.get("data_format") {
            if v.as_str() != Some("channels_first") {
                return Err(f.err(
                    "data_format",
                    format!("only \"channels_first\" is supported, found {v}"),
                ));
            }
        }
        Ok(())
    }

    /// `size` (`None` when `do_resize` is false), `keep_aspect_ratio`, `ensure_multiple_of` and
    /// `resample`.
    fn resize_settings(f: &Fields) -> Result<ResizeSettings> {
        let do_resize = f.bool_or("do_resize", true)?;
        let size = match f.size("size", true)? {
            None => (384, 384),
            Some(Size::Exact { height, width }) => (height, width),
            Some(Size::ShortestEdge { .. }) => {
                return Err(f.err(
                    "size",
                    "DPT resizes to {\"height\", \"width\"}; a shortest edge is not supported",
                ))
            }
        };
        let keep_aspect_ratio = f.bool_or("keep_aspect_ratio", false)?;
        let ensure_multiple_of = match f.get("ensure_multiple_of") {
            None => 1,
            Some(v) => f.positive_int("ensure_multiple_of", v)?,
        };
        let resample = match f.get("resample") {
            None => Resample::Bicubic,
            Some(v) => v.as_u64().and_then(Resample::from_pil).ok_or_else(|| {
                f.err(
                    "resample",
                    format!("unsupported PIL resampling filter {v}: expected an integer 0-5"),
                )
            })?,
        };
        Ok(ResizeSettings {
            size: do_resize.then_some(size),
            keep_aspect_ratio,
            ensure_multiple_of,
            resample,
        })
    }

    /// (height, width) an `h`×`w` image is resized to (before any padding): transformers'
    /// `get_resize_output_image_size` for DPT, in f64 like Python. Errors when a side rounds to
    /// 0 or exceeds [`MAX_SIDE`].
    pub fn resized_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let Some((oh, ow)) = self.size else {
            return Ok((h, w));
        };
        if h == 0 || w == 0 {
            bail!("an empty {w}x{h} image cannot be resized");
        }
        let mut sh = oh as f64 / h as f64;
        let mut sw = ow as f64 / w as f64;
        if self.keep_aspect_ratio {
            // Scale as little as possible: the factor closer to 1 for both sides.
            if (1.0 - sw).abs() < (1.0 - sh).abs() {
                sh = sw;
            } else {
                sw = sh;
            }
        }
        let m = self.ensure_multiple_of;
        let fit = |v: f64| (v / m as f64).round_ties_even() as usize * m;
        let (nh, nw) = (fit(sh * h as f64), fit(sw * w as f64));
        if nh == 0 || nw == 0 {
            bail!(
                "a {w}x{h} image resizes to {nw}x{nh} (size {ow}x{oh}, keep_aspect_ratio {}, \
                 ensure_multiple_of {m}): a side rounds to zero",
                self.keep_aspect_ratio
            );
        }
        if nh > MAX_SIDE || nw > MAX_SIDE {
            bail!("a {w}x{h} image resizes to {nw}x{nh}, above {MAX_SIDE} pixels a side");
        }
        Ok((nh, nw))
    }

    /// (height, width) of the pixel_values of an `h`×`w` image (resize, then padding).
    pub fn output_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let (rh, rw) = self.resized_size(h, w)?;
        Ok(match self.pad_to {
            Some(d) => (rh.div_ceil(d) * d, rw.div_ceil(d) * d),
            None => (rh, rw),
        })
    }

    /// One image -> pixel_values [1, 3, H, W] (NCHW, host, f32), its own size.
    pub fn preprocess(&self, img: &RgbImage) -> Result<Tensor> {
        let (h, w) = (img.height() as usize, img.width() as usize);
        let (rh, rw) = self.resized_size(h, w)?;
        let resized;
        let src = if (rh, rw) == (h, w) {
            img
        } else {
            resized = resize_rgb8(img, rw as u32, rh as u32, self.resample);
            &resized
        };
        let (oh, ow) = self.output_size(h, w)?;
        // transformers' pad_image: (pad - pad // 2) after, pad // 2 before.
        let (top, left) = ((oh - rh) / 2, (ow - rw) / 2);
        let mut chw = vec![0f32; 3 * oh * ow];
        for (c, plane) in chw.chunks_exact_mut(oh * ow).enumerate() {
            for (y, row) in src.as_raw().chunks_exact(rw * 3).enumerate() {
                let o = (y + top) * ow + left;
                for (x, px) in row.chunks_exact(3).enumerate() {
                    plane[o + x] = self.scale.value(px[c], c);
                }
            }
        }
        Ok(Tensor::new(vec![1, 3, oh, ow], chw))
    }

    /// Several images of one output size -> [N, 3, H, W]; an error when their sizes differ.
    pub fn pixel_values(&self, imgs: &[RgbImage]) -> Result<Tensor> {
        let rows = imgs
            .iter()
            .map(|i| self.preprocess(i))
            .collect::<Result<Vec<_>>>()?;
        if let Some(first) = rows.first() {
            if let Some(r) = rows.iter().find(|r| r.shape() != first.shape()) {
                bail!(
                    "pixel_values: images of different processed sizes ({:?} and {:?}) cannot \
                     share a batch",
                    &first.shape()[2..],
                    &r.shape()[2..]
                );
            }
        }
        let refs: Vec<&Tensor> = rows.iter().collect();
        Ok(Tensor::cat0(&refs))
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = crate::input::read_to_string(path)
        .with_context(|| format!("cannot read image processor config {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

/// transformers' `post_process_depth_estimation`: each [H, W] map of `predicted_depth`
/// ([B, H, W], host) resized to its `(height, width)` target with torch's bicubic
/// (`align_corners=False`, no antialias). Returns one [h, w] tensor per map.
pub fn post_process_depth_estimation(
    predicted_depth: &Tensor,
    target_sizes: &[(usize, usize)],
) -> Result<Vec<Tensor>> {
    let &[b, h, w] = predicted_depth.shape() else {
        bail!(
            "predicted_depth: expected [B, H, W], got {:?}",
            predicted_depth.shape()
        );
    };
    if b != target_sizes.len() {
        bail!(
            "post_process_depth_estimation: {b} depth maps but {} target sizes",
            target_sizes.len()
        );
    }
    let data = predicted_depth.data();
    target_sizes
        .iter()
        .enumerate()
        .map(|(i, &(th, tw))| {
            if th == 0 || tw == 0 {
                bail!("post_process_depth_estimation: empty target size {th}x{tw}");
            }
            let plane = &data[i * h * w..(i + 1) * h * w];
            let out = super::interp::bicubic(plane, h, w, th, tw, false);
            Ok(Tensor::new(vec![th, tw], out))
        })
        .collect()
}
