//! Image preprocessing for the vision encoders (CLIP, DINOv2, DINO v1): what transformers 5.23's
//! PIL-backed image processors (`CLIPImageProcessorPil`, `BitImageProcessorPil`,
//! `ViTImageProcessorPil`) compute, built from a checkpoint's `preprocessor_config.json`.
//!
//! The pipeline is transformers' `PilBackend._preprocess`: resize with Pillow (8-bit, see
//! [`resize_rgb8`]), centre crop (zero padding where the image is smaller than the crop), rescale
//! (`u8 as f64 * rescale_factor`, then f32) and normalise (`(x - mean) / std` in f32). Each step
//! repeats transformers' arithmetic, so `pixel_values` match to the last bit or so.
//!
//! transformers 5 picks the torchvision-backed processors when torchvision is installed; those
//! resize on tensors (different antialiasing and rounding) and are *not* what this module
//! reproduces. Class names ending in `Fast` are accepted but processed the PIL way.

pub mod dpt;
pub mod interp;
mod resample;
pub mod sam;

pub use resample::{resize_rgb8, Resample};

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use image::{DynamicImage, RgbImage};
use rayon::prelude::*;
use serde_json::{Map, Value};

// Decoding (format from the content, EXIF orientation applied) is image_io's, so both paths read a
// file the same way.
use crate::image_io::decode;
use crate::tensor::Tensor;

/// Which transformers image processor a config names. Their preprocessing is the same code
/// (`PilBackend`); only the defaults of the fields a config leaves out differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessorKind {
    /// `CLIPImageProcessor` (CLIP vision towers).
    Clip,
    /// `BitImageProcessor` (DINOv2 checkpoints use it).
    Bit,
    /// `ViTImageProcessor` (DINO v1 checkpoints, `ViTFeatureExtractor` in older configs).
    Vit,
}

const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
const IMAGENET_STANDARD_MEAN: [f64; 3] = [0.5, 0.5, 0.5];
const IMAGENET_STANDARD_STD: [f64; 3] = [0.5, 0.5, 0.5];

/// The class attributes of a processor: what a missing (or `null`) config field means.
struct Defaults {
    resample: Resample,
    mean: [f64; 3],
    std: [f64; 3],
    size: Size,
    default_to_square: bool,
    crop_size: Option<(usize, usize)>,
    do_center_crop: bool,
}

impl ProcessorKind {
    /// The processor named by `image_processor_type` (preferred, as in `AutoImageProcessor`) or the
    /// legacy `feature_extractor_type` (`XFeatureExtractor` is `XImageProcessor`).
    fn from_name(name: &str) -> Option<ProcessorKind> {
        let name = name.replace("FeatureExtractor", "ImageProcessor");
        let base = name
            .strip_suffix("Fast")
            .or_else(|| name.strip_suffix("Pil"))
            .unwrap_or(&name);
        Some(match base {
            "CLIPImageProcessor" => ProcessorKind::Clip,
            "BitImageProcessor" => ProcessorKind::Bit,
            "ViTImageProcessor" => ProcessorKind::Vit,
            _ => return None,
        })
    }

    fn defaults(self) -> Defaults {
        match self {
            // CLIPImageProcessorPil and BitImageProcessorPil have identical class attributes.
            ProcessorKind::Clip | ProcessorKind::Bit => Defaults {
                resample: Resample::Bicubic,
                mean: OPENAI_CLIP_MEAN,
                std: OPENAI_CLIP_STD,
                size: Size::ShortestEdge {
                    shortest: 224,
                    longest: None,
                },
                default_to_square: false,
                crop_size: Some((224, 224)),
                do_center_crop: true,
            },
            // ViTImageProcessorPil: no crop size and `do_center_crop` unset (falsy);
            // `default_to_square` comes from BaseImageProcessor (true).
            ProcessorKind::Vit => Defaults {
                resample: Resample::Bilinear,
                mean: IMAGENET_STANDARD_MEAN,
                std: IMAGENET_STANDARD_STD,
                size: Size::Exact {
                    height: 224,
                    width: 224,
                },
                default_to_square: true,
                crop_size: None,
                do_center_crop: false,
            },
        }
    }
}

/// transformers' resize target (`size` after `get_size_dict`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Size {
    /// `{"shortest_edge"}` (optionally with `"longest_edge"`): keep the aspect ratio.
    ShortestEdge {
        shortest: usize,
        longest: Option<usize>,
    },
    /// `{"height", "width"}`.
    Exact { height: usize, width: usize },
}

/// An image processor read from a `preprocessor_config.json`: resize, centre crop, rescale and
/// normalise exactly as transformers' PIL-backed processor with the same config.
#[derive(Clone, Debug)]
pub struct ImageProcessor {
    kind: ProcessorKind,
    /// `None` when `do_resize` is false.
    resize: Option<Size>,
    resample: Resample,
    /// (height, width); `None` when `do_center_crop` is false.
    crop: Option<(usize, usize)>,
    scale: PixelScale,
    /// (height, width) of every output.
    out: (usize, usize),
}

/// Reads one config field, naming the file and the field in every error.
/// transformers' `rescale` and `normalize`, the last step of every image processor here:
/// `u8 as f64 * rescale_factor` cast to f32, then `(x - mean) / std` in f32 (transformers casts
/// mean and std to the image's dtype first).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PixelScale {
    /// `None` when `do_rescale` is false.
    rescale_factor: Option<f64>,
    do_normalize: bool,
    mean: [f32; 3],
    std: [f32; 3],
}

impl PixelScale {
    /// `do_rescale`, `rescale_factor` (1/255), `do_normalize`, `image_mean` and `image_std`
    /// (the processor class's `mean` and `std` when absent) of `f`.
    fn read(f: &Fields, mean: [f64; 3], std: [f64; 3]) -> Result<PixelScale> {
        let do_rescale = f.bool_or("do_rescale", true)?;
        let rescale_factor = match f.get("rescale_factor") {
            None => 1.0 / 255.0,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| f.err("rescale_factor", format!("expected a number, found {v}")))?,
        };
        let do_normalize = f.bool_or("do_normalize", true)?;
        let mean = f.triple("image_mean", mean)?;
        let std = f.triple("image_std", std)?;
        if do_normalize && std.contains(&0.0) {
            return Err(f.err("image_std", "a standard deviation of 0"));
        }
        Ok(PixelScale {
            rescale_factor: do_rescale.then_some(rescale_factor),
            do_normalize,
            mean: mean.map(|x| x as f32),
            std: std.map(|x| x as f32),
        })
    }

    /// Channel `c` of an 8-bit pixel as the model takes it.
    fn value(&self, v: u8, c: usize) -> f32 {
        let x = match self.rescale_factor {
            Some(s) => (v as f64 * s) as f32,
            None => v as f32,
        };
        if self.do_normalize {
            (x - self.mean[c]) / self.std[c]
        } else {
            x
        }
    }
}

/// A processor config's fields, for reading with errors that name `name` (its file) and the
/// field.
struct Fields<'a> {
    name: String,
    map: &'a Map<String, Value>,
}

impl Fields<'_> {
    /// The field's value; `null` counts as absent, as in transformers (`None` means "use the class
    /// default").
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn err(&self, key: &str, msg: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("{}: field `{key}`: {msg}", self.name)
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(key, format!("expected true or false, found {v}"))),
        }
    }

    fn positive_int(&self, key: &str, v: &Value) -> Result<usize> {
        v.as_u64()
            .filter(|&n| n > 0 && n <= 1 << 20)
            .map(|n| n as usize)
            .ok_or_else(|| self.err(key, format!("expected a positive pixel count, found {v}")))
    }

    /// `image_mean` / `image_std`: three numbers, or one for all channels.
    fn triple(&self, key: &str, default: [f64; 3]) -> Result<[f64; 3]> {
        let Some(v) = self.get(key) else {
            return Ok(default);
        };
        let bad = || {
            self.err(
                key,
                format!("expected a number or a list of 3 numbers, found {v}"),
            )
        };
        match v {
            Value::Number(n) => n.as_f64().map(|x| [x; 3]).ok_or_else(bad),
            Value::Array(a) if a.len() == 3 => {
                let mut out = [0.0; 3];
                for (o, x) in out.iter_mut().zip(a) {
                    *o = x.as_f64().ok_or_else(bad)?;
                }
                Ok(out)
            }
            _ => Err(bad()),
        }
    }

    /// `size` / `crop_size` the way `get_size_dict` reads them: an int (a square, or the shortest
    /// edge when `default_to_square` is false), a `[height, width]` list, or a dict whose keys
    /// are exactly one of the supported sets.
    fn size(&self, key: &str, default_to_square: bool) -> Result<Option<Size>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let size = match v {
            Value::Number(_) => {
                let n = self.positive_int(key, v)?;
                if default_to_square {
                    Size::Exact {
                        height: n,
                        width: n,
                    }
                } else {
                    Size::ShortestEdge {
                        shortest: n,
                        longest: None,
                    }
                }
            }
            Value::Array(a) if a.len() == 2 => Size::Exact {
                height: self.positive_int(key, &a[0])?,
                width: self.positive_int(key, &a[1])?,
            },
            Value::Object(m) => self.size_dict(key, m)?,
            _ => {
                return Err(self.err(
                    key,
                    format!("expected an int, a [height, width] list or a dict, found {v}"),
                ))
            }
        };
        Ok(Some(size))
    }

    /// A `size` / `crop_size` dict: its non-null keys must be exactly one of the supported sets.
    fn size_dict(&self, key: &str, m: &Map<String, Value>) -> Result<Size> {
        let keys: Vec<&str> = {
            let mut k: Vec<&str> = m
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, _)| k.as_str())
                .collect();
            k.sort_unstable();
            k
        };
        let int = |k: &str| self.positive_int(&format!("{key}.{k}"), &m[k]);
        Ok(match keys.as_slice() {
            ["height", "width"] => Size::Exact {
                height: int("height")?,
                width: int("width")?,
            },
            ["shortest_edge"] => Size::ShortestEdge {
                shortest: int("shortest_edge")?,
                longest: None,
            },
            ["longest_edge", "shortest_edge"] => Size::ShortestEdge {
                shortest: int("shortest_edge")?,
                longest: Some(int("longest_edge")?),
            },
            _ => {
                return Err(self.err(
                    key,
                    format!(
                        "unsupported keys {keys:?}: expected {{\"height\", \"width\"}}, \
                         {{\"shortest_edge\"}} or {{\"shortest_edge\", \"longest_edge\"}}"
                    ),
                ))
            }
        })
    }
}

impl ImageProcessor {
    /// Reads `dir/preprocessor_config.json`; a missing file is an error naming the path.
    pub fn from_dir(dir: &Path) -> Result<ImageProcessor> {
        Self::from_file(&dir.join("preprocessor_config.json"))
    }

    /// Reads a `preprocessor_config.json`. The processor class comes from `image_processor_type`
    /// (or the legacy `feature_extractor_type`); fields left out or `null` take that class's
    /// defaults, unknown fields are ignored (as transformers does), and a field with a value this
    /// module cannot reproduce is an error naming the file and the field.
    pub fn from_file(path: &Path) -> Result<ImageProcessor> {
        let p = path.display();
        let text = crate::input::read_to_string(path)
            .with_context(|| format!("cannot read image processor config {p}"))?;
        let value: Value =
            serde_json::from_str(&text).with_context(|| format!("{p}: not valid JSON"))?;
        let map = value
            .as_object()
            .ok_or_else(|| anyhow!("{p}: expected a JSON object"))?;
        Self::from_map(path, map)
    }

    /// A processor from a JSON object made in code (built-in models); `name` is what errors call it.
    pub fn from_json(name: &str, value: &Value) -> Result<ImageProcessor> {
        let map = value
            .as_object()
            .ok_or_else(|| anyhow!("{name}: expected a JSON object"))?;
        Self::from_map(Path::new(name), map)
    }

    /// `CLIPImageProcessor()` with its class defaults (224 shortest edge, 224 crop, bicubic, CLIP
    /// mean/std): what diffusers uses for an IP-Adapter image encoder folder that has no
    /// preprocessor_config.json.
    pub fn clip_default() -> ImageProcessor {
        let mut map = Map::new();
        map.insert(
            "image_processor_type".into(),
            Value::from("CLIPImageProcessor"),
        );
        Self::from_map(Path::new("<CLIPImageProcessor defaults>"), &map)
            .expect("the class defaults are supported")
    }

    fn from_map(path: &Path, map: &Map<String, Value>) -> Result<ImageProcessor> {
        let f = Fields {
            name: path.display().to_string(),
            map,
        };
        let kind = Self::processor_kind(&f)?;
        let d = kind.defaults();
        Self::reject_unsupported(&f, kind)?;
        let (do_resize, size, resample) = Self::resize_settings(&f, &d)?;
        let crop = Self::crop_settings(&f, &d)?;
        let scale = PixelScale::read(&f, d.mean, d.std)?;
        // Validate the type even though the input is RGB already.
        f.bool_or("do_convert_rgb", true)?;
        let out = Self::fixed_output_size(&f, crop, do_resize, size)?;
        Ok(ImageProcessor {
            kind,
            resize: do_resize.then_some(size),
            resample,
            crop,
            scale,
            out,
        })
    }

    /// The class named by `image_processor_type` (or `feature_extractor_type`).
    fn processor_kind(f: &Fields) -> Result<ProcessorKind> {
        let (class_key, class) = ["image_processor_type", "feature_extractor_type"]
            .into_iter()
            .find_map(|k| f.get(k).map(|v| (k, v)))
            .ok_or_else(|| {
                anyhow!(
                    "{}: no `image_processor_type` (or `feature_extractor_type`) field naming the \
                     image processor class",
                    f.name
                )
            })?;
        class
            .as_str()
            .and_then(ProcessorKind::from_name)
            .ok_or_else(|| {
                f.err(
                    class_key,
                    format!(
                        "unsupported image processor {class}: expected CLIPImageProcessor, \
                         BitImageProcessor or ViTImageProcessor"
                    ),
                )
            })
    }

    /// Settings that would change the output in ways not reproduced here.
    fn reject_unsupported(f: &Fields, kind: ProcessorKind) -> Result<()> {
        if f.bool_or("do_pad", false)? {
            return Err(f.err("do_pad", "padding to a batch size is not supported"));
        }
        if let Some(v) = f.get("data_format") {
            if v.as_str() != Some("channels_first") {
                return Err(f.err(
                    "data_format",
                    format!("only \"channels_first\" is supported, found {v}"),
                ));
            }
        }
        if kind == ProcessorKind::Clip && f.bool_or("use_square_size", false)? {
            return Err(f.err(
                "use_square_size",
                "KOSMOS-2's square resize is not supported",
            ));
        }
        Ok(())
    }

    /// (do_resize, size, resample).
    fn resize_settings(f: &Fields, d: &Defaults) -> Result<(bool, Size, Resample)> {
        let default_to_square = f.bool_or("default_to_square", d.default_to_square)?;
        let do_resize = f.bool_or("do_resize", true)?;
        let size = f.size("size", default_to_square)?.unwrap_or(d.size);
        let resample = match f.get("resample") {
            None => d.resample,
            Some(v) => v.as_u64().and_then(Resample::from_pil).ok_or_else(|| {
                f.err(
                    "resample",
                    format!("unsupported PIL resampling filter {v}: expected an integer 0-5"),
                )
            })?,
        };
        Ok((do_resize, size, resample))
    }

    /// The centre crop (height, width), None when `do_center_crop` is off.
    fn crop_settings(f: &Fields, d: &Defaults) -> Result<Option<(usize, usize)>> {
        let do_center_crop = f.bool_or("do_center_crop", d.do_center_crop)?;
        // `crop_size` as an int is always a square (`get_size_dict` with its default).
        let crop_size = match f.size("crop_size", true)? {
            None => d.crop_size,
            Some(Size::Exact { height, width }) => Some((height, width)),
            Some(Size::ShortestEdge { .. }) => {
                return Err(f.err("crop_size", "expected {\"height\", \"width\"}"))
            }
        };
        match (do_center_crop, crop_size) {
            (false, _) => Ok(None),
            (true, Some(c)) => Ok(Some(c)),
            (true, None) => Err(f.err("crop_size", "missing, but `do_center_crop` is true")),
        }
    }

    /// The engine batches images into one tensor, so every output must have the same size.
    fn fixed_output_size(
        f: &Fields,
        crop: Option<(usize, usize)>,
        do_resize: bool,
        size: Size,
    ) -> Result<(usize, usize)> {
        const VARIABLE: &str = "gives every image its own output size; a fixed size is needed \
                                (a centre crop, or a {\"height\", \"width\"} resize)";
        match (crop, do_resize, size) {
            (Some(c), _, _) => Ok(c),
            (None, true, Size::Exact { height, width }) => Ok((height, width)),
            (None, true, Size::ShortestEdge { .. }) => Err(f.err(
                "size",
                format!("a shortest-edge resize without a crop {VARIABLE}"),
            )),
            (None, false, _) => {
                Err(f.err("do_resize", format!("no resize and no crop {VARIABLE}")))
            }
        }
    }

    /// The processor class the config named.
    pub fn kind(&self) -> ProcessorKind {
        self.kind
    }

    /// The resampling filter of the resize step.
    pub fn resample(&self) -> Resample {
        self.resample
    }

    /// (height, width) of pixel_values.
    pub fn output_size(&self) -> (usize, usize) {
        self.out
    }

    /// The per-channel mean the processor subtracts (in rescaled units), as f32.
    pub fn image_mean(&self) -> [f32; 3] {
        self.scale.mean
    }

    /// The per-channel standard deviation the processor divides by, as f32.
    pub fn image_std(&self) -> [f32; 3] {
        self.scale.std
    }

    /// (height, width) an `h`x`w` image is resized to: transformers' `get_resize_output_image_size`
    /// (`default_to_square=False`) for a shortest edge, `get_size_with_aspect_ratio` when a longest
    /// edge caps it. Float arithmetic in the same order as Python's, truncated like `int()`.
    fn resized_size(&self, h: usize, w: usize) -> (usize, usize) {
        match self.resize {
            None => (h, w),
            Some(Size::Exact { height, width }) => (height, width),
            Some(Size::ShortestEdge {
                shortest,
                longest: None,
            }) => {
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                // Python: int(size * long / short), an exact int product then a true division.
                let new_long = ((shortest * long) as f64 / short as f64) as usize;
                if w <= h {
                    (new_long, shortest)
                } else {
                    (shortest, new_long)
                }
            }
            Some(Size::ShortestEdge {
                shortest,
                longest: Some(max_size),
            }) => {
                let (hf, wf) = (h as f64, w as f64);
                let mut size = shortest;
                let mut raw_size = None;
                let (min_o, max_o) = (hf.min(wf), hf.max(wf));
                if max_o / min_o * size as f64 > max_size as f64 {
                    let raw = max_size as f64 * min_o / max_o;
                    raw_size = Some(raw);
                    // Python's round(): half to even.
                    size = raw.round_ties_even() as usize;
                }
                if (h <= w && h == size) || (w <= h && w == size) {
                    (h, w)
                } else if w < h {
                    let oh = match raw_size {
                        Some(r) => r * hf / wf,
                        None => (size * h) as f64 / wf,
                    };
                    (oh as usize, size)
                } else {
                    let ow = match raw_size {
                        Some(r) => r * wf / hf,
                        None => (size * w) as f64 / hf,
                    };
                    (size, ow as usize)
                }
            }
        }
    }

    /// One image -> [3, H, W] f32 (CHW), exactly the processor's pixel_values row. An empty image
    /// (no pixels, which transformers cannot process) gives the values of an all-black image.
    pub fn preprocess(&self, img: &RgbImage) -> Vec<f32> {
        let (oh, ow) = self.out;
        // u8 HWC of the output: the crop window of the resized image, zero where the crop reaches
        // past it (transformers pads with zeros before rescaling).
        let mut hwc = vec![0u8; oh * ow * 3];
        let (h, w) = (img.height() as usize, img.width() as usize);
        if h > 0 && w > 0 {
            let (rh, rw) = self.resized_size(h, w);
            // transformers' center_crop: top = (orig - crop) // 2 (floor division), and output
            // pixel (i, j) is resized pixel (i + top, j + left) whether or not it had to pad.
            let (top, left) = match self.crop {
                Some((ch, cw)) => (
                    (rh as i64 - ch as i64).div_euclid(2),
                    (rw as i64 - cw as i64).div_euclid(2),
                ),
                None => (0, 0),
            };
            let clamp = |v: i64, n: usize| v.clamp(0, n as i64) as usize;
            let rows = clamp(top, rh)..clamp(top + oh as i64, rh);
            let cols = clamp(left, rw)..clamp(left + ow as i64, rw);
            // Without a resize, (rh, rw) is the image's own size and this is a plain copy.
            let window =
                resample::resize_window(img, rw, rh, self.resample, cols.clone(), rows.clone());
            let (dy, dx) = (
                (rows.start as i64 - top) as usize,
                (cols.start as i64 - left) as usize,
            );
            let n = cols.len() * 3;
            if n > 0 {
                for (r, line) in window.chunks_exact(n).enumerate() {
                    let o = ((r + dy) * ow + dx) * 3;
                    hwc[o..o + n].copy_from_slice(line);
                }
            }
        }
        let mut chw = vec![0f32; 3 * oh * ow];
        for (c, plane) in chw.chunks_exact_mut(oh * ow).enumerate() {
            for (o, px) in plane.iter_mut().zip(hwc.chunks_exact(3)) {
                *o = self.scale.value(px[c], c);
            }
        }
        chw
    }

    /// Many images -> pixel_values [N, 3, H, W] as a crate::tensor::Tensor (NCHW, host, f32).
    pub fn pixel_values(&self, imgs: &[RgbImage]) -> Tensor {
        let (h, w) = self.out;
        let rows: Vec<Vec<f32>> = imgs.par_iter().map(|img| self.preprocess(img)).collect();
        Tensor::new(vec![imgs.len(), 3, h, w], rows.concat())
    }
}

/// The RGBA samples Pillow holds for a decoded file, as `convert("RGBA")` would give them (alpha
/// 255 where the file has none). Pillow's 8-bit view of 16-bit PNGs is not a rescale: colour
/// samples keep their high byte, and 16-bit gray (mode `I;16`) is clipped at 255.
fn pil_rgba(img: &DynamicImage) -> Vec<[u8; 4]> {
    let hi = |v: u16| (v >> 8) as u8;
    match img {
        DynamicImage::ImageLuma8(b) => b.pixels().map(|p| [p[0], p[0], p[0], 255]).collect(),
        DynamicImage::ImageLumaA8(b) => b.pixels().map(|p| [p[0], p[0], p[0], p[1]]).collect(),
        DynamicImage::ImageRgb8(b) => b.pixels().map(|p| [p[0], p[1], p[2], 255]).collect(),
        DynamicImage::ImageRgba8(b) => b.pixels().map(|p| p.0).collect(),
        DynamicImage::ImageLuma16(b) => b
            .pixels()
            .map(|p| {
                let v = p[0].min(255) as u8;
                [v, v, v, 255]
            })
            .collect(),
        DynamicImage::ImageLumaA16(b) => b
            .pixels()
            .map(|p| [hi(p[0]), hi(p[0]), hi(p[0]), hi(p[1])])
            .collect(),
        DynamicImage::ImageRgb16(b) => b
            .pixels()
            .map(|p| [hi(p[0]), hi(p[1]), hi(p[2]), 255])
            .collect(),
        DynamicImage::ImageRgba16(b) => b
            .pixels()
            .map(|p| [hi(p[0]), hi(p[1]), hi(p[2]), hi(p[3])])
            .collect(),
        // Float images do not come out of PNG or JPEG files.
        other => other.to_rgba8().pixels().map(|p| p.0).collect(),
    }
}

fn rgb_image(w: u32, h: u32, px: impl Iterator<Item = [u8; 3]>) -> RgbImage {
    let data: Vec<u8> = px.flatten().collect();
    RgbImage::from_raw(w, h, data).expect("one RGB triple per pixel")
}

/// Decodes a PNG/JPEG file to RGB the way PIL's Image.open(p).convert("RGB") does (EXIF orientation applied like image_io.rs); errors name the file.
///
/// Grayscale is replicated, palettes are expanded, and alpha is dropped, not composited: the colour
/// stored under a transparent pixel is kept. (transformers' own `convert_to_rgb`, applied when a
/// processor is handed an image with alpha, composites onto white instead: see
/// [`load_rgb8_on_white`].) JPEGs are decoded by the `image` crate, whose IDCT and chroma upsampling
/// may differ from libjpeg-turbo's by a level or so.
pub fn load_rgb8(path: &Path) -> Result<RgbImage> {
    let img = decode(path)?;
    let (w, h) = (img.width(), img.height());
    if let DynamicImage::ImageRgb8(rgb) = img {
        return Ok(rgb);
    }
    Ok(rgb_image(
        w,
        h,
        pil_rgba(&img).into_iter().map(|p| [p[0], p[1], p[2]]),
    ))
}

/// Decodes a PNG/JPEG file to RGB as transformers' processors see it when given the PIL image
/// itself (`do_convert_rgb`): an image with alpha (an alpha channel or a PNG `tRNS` transparency)
/// is alpha-composited onto opaque white with Pillow's integer `alpha_composite`; other images are
/// as [`load_rgb8`]. EXIF orientation is applied; errors name the file.
pub fn load_rgb8_on_white(path: &Path) -> Result<RgbImage> {
    let img = decode(path)?;
    if !img.color().has_alpha() {
        return load_rgb8(path);
    }
    let (w, h) = (img.width(), img.height());
    Ok(rgb_image(
        w,
        h,
        pil_rgba(&img).into_iter().map(composite_on_white),
    ))
}

/// Pillow's `ImagingAlphaComposite` of `src` over an opaque white pixel (7 extra bits of precision,
/// divisions by 255 done with shifts), alpha then dropped.
fn composite_on_white(src: [u8; 4]) -> [u8; 3] {
    const PRECISION_BITS: u32 = 7;
    let a = src[3] as u32;
    if a == 0 {
        return [255; 3];
    }
    let shift_div255 = |v: u32| ((v >> 8) + v) >> 8;
    let blend = 255 * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    [0, 1, 2].map(|c| {
        let t = src[c] as u32 * coef1 + 255 * coef2;
        (shift_div255(t + (0x80 << PRECISION_BITS)) >> PRECISION_BITS) as u8
    })
}
