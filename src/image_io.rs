//! Image files <-> NHWC tensors: loading (PNG/JPEG), masks, resize-to-cover + centre crop, sizes,
//! value ranges and crash-safe PNG saving. Conventions follow diffusers: images are RGB in [0,1]
//! (`[-1,1]` at the model's input/output), saved as 8-bit with `(x * 255).round()` after a clamp.
//! Every error names the file and the problem; bad input never panics.

use std::fs;
use std::io::Cursor;
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use image::codecs::png::PngEncoder;
use image::{DynamicImage, ExtendedColorType, ImageDecoder, ImageEncoder, ImageReader};
use rayon::prelude::*;

use crate::tensor::Tensor;

/// A decoded image.
pub struct LoadedImage {
    /// `[1, H, W, 3]` in [0,1]. Grayscale input is replicated into the three channels.
    pub rgb: Tensor,
    /// `[1, H, W, 1]` in [0,1] (1 = opaque), present when the file has an alpha channel (RGBA,
    /// gray+alpha, or a PNG `tRNS` chunk: transparent palette entries or colour key): the subject mask.
    pub alpha: Option<Tensor>,
}

/// Images larger than this many pixels are refused before decoding (a decompression bomb of a few
/// kilobytes can claim 65500×65500). 64 Mpx by default: far above any model input (a 1024² SDXL
/// image is 1 Mpx) with headroom for large photographs; `TOFFEE_MAX_IMAGE_PIXELS` overrides it.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 64 * 1024 * 1024;

/// The limit, or an error when `TOFFEE_MAX_IMAGE_PIXELS` is set to something that is not a
/// positive whole number (ignoring it would leave a user who set it unprotected, or blocked,
/// without a word).
fn max_image_pixels() -> Result<u64> {
    match std::env::var("TOFFEE_MAX_IMAGE_PIXELS") {
        Err(_) => Ok(DEFAULT_MAX_IMAGE_PIXELS),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n) if n > 0 => Ok(n),
            _ => {
                bail!("TOFFEE_MAX_IMAGE_PIXELS = `{v}`: expected a positive whole number of pixels")
            }
        },
    }
}

#[derive(Debug)]
struct TooLarge(u32, u32, u64);

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the image is {}x{} pixels, more than the limit of {} (set TOFFEE_MAX_IMAGE_PIXELS to raise it)",
            self.0, self.1, self.2
        )
    }
}

/// Decodes a PNG or JPEG (format from the content, not the extension), applying the EXIF orientation
/// like diffusers' `load_image` (`ImageOps.exif_transpose`). 16-bit PNGs keep their precision.
pub(crate) fn decode(path: &Path) -> Result<DynamicImage> {
    let p = path.display();
    let bytes = crate::input::read(path).map_err(|e| anyhow!("cannot read image {p}: {e}"))?;
    if bytes.is_empty() {
        bail!("cannot load image {p}: the file is empty");
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| anyhow!("cannot read image {p}: {e}"))?;
    if reader.format().is_none() {
        bail!("cannot load image {p}: not a PNG or JPEG file");
    }
    let max_pixels = max_image_pixels()?;
    let mut reader = reader;
    let mut limits = image::Limits::default();
    // The decoder's own allocation cap backs up the header check below (e.g. for huge ICC or EXIF
    // chunks): 16 bytes per allowed pixel.
    limits.max_alloc = Some(max_pixels.saturating_mul(16));
    reader.limits(limits);
    let decoded = (|| {
        let mut decoder = reader.into_decoder()?;
        let (w, h) = decoder.dimensions();
        if w as u64 * h as u64 > max_pixels {
            let msg = TooLarge(w, h, max_pixels).to_string();
            return Err(image::ImageError::IoError(std::io::Error::other(msg)));
        }
        let orientation = decoder.orientation()?;
        let mut img = DynamicImage::from_decoder(decoder)?;
        img.apply_orientation(orientation);
        Ok::<_, image::ImageError>(img)
    })();
    decoded.map_err(|e| anyhow!("cannot decode image {p}: {e}"))
}

fn tensor_from(h: u32, w: u32, c: usize, data: Vec<f32>) -> Tensor {
    Tensor::new(vec![1, h as usize, w as usize, c], data)
}

/// Samples of `img` converted to `channels` (3: RGB, 4: RGBA) as f32 in [0,1], computed as numpy
/// does in diffusers (`array.astype(float32) / 255`, or / 65535 for 16-bit files) so values are
/// bit-identical to the reference pipelines.
fn samples(img: &DynamicImage, channels: usize) -> Vec<f32> {
    let color = img.color();
    if color.bytes_per_pixel() > color.channel_count() {
        let v = if channels == 4 {
            img.to_rgba16().into_raw()
        } else {
            img.to_rgb16().into_raw()
        };
        v.into_iter().map(|v| v as f32 / 65535.0).collect()
    } else {
        let v = if channels == 4 {
            img.to_rgba8().into_raw()
        } else {
            img.to_rgb8().into_raw()
        };
        v.into_iter().map(|v| v as f32 / 255.0).collect()
    }
}

/// Loads an image as RGB in [0,1], with its alpha channel (if any) as the subject mask.
pub fn load(path: &Path) -> Result<LoadedImage> {
    let img = decode(path)?;
    let (w, h) = (img.width(), img.height());
    // Dropping alpha does not premultiply, so the colours under a transparent background are kept as
    // stored (the mask decides what they mean).
    let rgb = tensor_from(h, w, 3, samples(&img, 3));
    let alpha = img.color().has_alpha().then(|| {
        tensor_from(
            h,
            w,
            1,
            samples(&img, 4).chunks_exact(4).map(|p| p[3]).collect(),
        )
    });
    Ok(LoadedImage { rgb, alpha })
}

/// Loads an image file used as a mask: `[1, H, W, 1]` in [0,1], white = 1. Like diffusers' mask
/// processing (`PIL convert("L")`), this is the luminance of the colour channels; an alpha channel
/// is ignored (use [`load`]'s `alpha` for RGBA subject cut-outs). Gray files give their gray level
/// (16-bit kept exact); colour files use PIL's 8-bit ITU-R 601 formula
/// `L = (19595 R + 38470 G + 7471 B + 2^15) >> 16`, so masks match diffusers to the bit.
/// No binarisation here: the caller thresholds if the pipeline does.
pub fn load_mask(path: &Path) -> Result<Tensor> {
    let img = decode(path)?;
    let (w, h) = (img.width(), img.height());
    let l: Vec<f32> = if img.color().has_color() {
        let rgb = img.to_rgb8().into_raw();
        let l8 = |p: &[u8]| {
            (19595 * p[0] as u32 + 38470 * p[1] as u32 + 7471 * p[2] as u32 + 0x8000) >> 16
        };
        rgb.chunks_exact(3).map(|p| l8(p) as f32 / 255.0).collect()
    } else {
        // Gray: every sample of the RGB expansion is the gray level.
        samples(&img, 3).into_iter().step_by(3).collect()
    };
    Ok(tensor_from(h, w, 1, l))
}

/// Largest size not above `w`x`h` whose sides are multiples of `multiple` (diffusers'
/// `get_default_height_width` rounding to the VAE scale factor, 8). Use [`check_size`] first:
/// an image smaller than one multiple would give a zero side.
pub fn target_size(w: usize, h: usize, multiple: usize) -> (usize, usize) {
    let m = multiple.max(1);
    (w - w % m, h - h % m)
}

/// Errors (naming `path`) when a `w`x`h` image is too small to give at least one `multiple` per side.
pub fn check_size(path: &Path, w: usize, h: usize, multiple: usize) -> Result<()> {
    if w < multiple.max(1) || h < multiple.max(1) {
        bail!(
            "image {} is {w}x{h} pixels: too small, each side must be at least {multiple} pixels",
            path.display()
        );
    }
    Ok(())
}

/// Lanczos3 kernel (as PIL's `Image.LANCZOS`).
fn lanczos3(x: f64) -> f64 {
    let sinc = |x: f64| {
        if x == 0.0 {
            1.0
        } else {
            let px = std::f64::consts::PI * x;
            px.sin() / px
        }
    };
    if x.abs() < 3.0 {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Resamples the middle axis of a `[outer, len, inner]` buffer to `out_len` samples, output sample
/// `i` sitting at resized position `i + offset` of a `len / scale`-long resize (so a crop costs
/// nothing), and clamps the result to `range`. Coefficients as PIL's `precompute_coeffs`: on
/// downscaling the kernel is widened by the scale factor, which antialiases.
fn resample_axis(
    src: &[f32],
    (outer, len, inner): (usize, usize, usize),
    out_len: usize,
    scale: f64,
    offset: usize,
    range: (f32, f32),
) -> Vec<f32> {
    let filter_scale = scale.max(1.0);
    let support = 3.0 * filter_scale;
    let taps: Vec<(usize, Vec<f32>)> = (0..out_len)
        .map(|i| {
            let center = (i + offset) as f64 * scale + 0.5 * scale;
            let lo = ((center - support + 0.5).floor().max(0.0) as usize).min(len - 1);
            let hi = ((center + support + 0.5).floor() as usize).clamp(lo + 1, len);
            let w: Vec<f64> = (lo..hi)
                .map(|j| lanczos3((j as f64 - center + 0.5) / filter_scale))
                .collect();
            let sum: f64 = w.iter().sum();
            (lo, w.iter().map(|v| (v / sum) as f32).collect())
        })
        .collect();
    let mut out = vec![0.0f32; outer * out_len * inner];
    out.par_chunks_mut(out_len * inner)
        .enumerate()
        .for_each(|(o, dst)| {
            let s = &src[o * len * inner..(o + 1) * len * inner];
            for (i, (lo, w)) in taps.iter().enumerate() {
                let d = &mut dst[i * inner..(i + 1) * inner];
                for (k, wk) in w.iter().enumerate() {
                    let row = &s[(lo + k) * inner..(lo + k + 1) * inner];
                    d.iter_mut().zip(row).for_each(|(d, v)| *d += wk * v);
                }
                d.iter_mut().for_each(|v| *v = v.clamp(range.0, range.1));
            }
        });
    out
}

/// Resizes an NHWC image (any channel count) preserving its aspect ratio so that it covers
/// `width`x`height`, then centre-crops to exactly that size: diffusers' `VaeImageProcessor.resize(...,
/// resize_mode="crop")` (`_resize_and_crop`), with its integer size and offset arithmetic. Lanczos3
/// with antialiasing, horizontal pass first, like PIL's `LANCZOS`. Lanczos rings past sharp edges;
/// PIL's 8-bit storage clips that to [0,255] after each pass, so each pass here clamps to [0,1]
/// (widened to the input's own range for tensors outside [0,1]). PIL also rounds to 8 bits between
/// the passes, which this f32 version does not: results differ from diffusers by at most one level.
/// Panics on a zero size (a caller bug: validate user-given sizes with [`check_size`]).
pub fn fit(img: &Tensor, width: usize, height: usize) -> Tensor {
    let (n, h, w, c) = img.dims4();
    assert!(
        width > 0 && height > 0 && w > 0 && h > 0,
        "fit {:?} to {width}x{height}",
        img.shape()
    );
    if (w, h) == (width, height) {
        return img.clone();
    }
    // The side that limits the cover matches the target exactly (the other one is floored, never
    // below the target); the crop offset is diffusers' `src_w // 2 - width // 2`.
    let (rw, rh) = if width * h > w * height {
        (width, h * width / w)
    } else {
        (w * height / h, height)
    };
    let (x0, y0) = (rw / 2 - width / 2, rh / 2 - height / 2);
    let range = img
        .data()
        .iter()
        .fold((0.0f32, 1.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let horiz = resample_axis(
        img.data(),
        (n * h, w, c),
        width,
        w as f64 / rw as f64,
        x0,
        range,
    );
    let out = resample_axis(
        &horiz,
        (n, h, width * c),
        height,
        h as f64 / rh as f64,
        y0,
        range,
    );
    Tensor::new(vec![n, height, width, c], out)
}

/// [0,1] -> [-1,1] (the VAE's input range).
pub fn to_model_range(t: &Tensor) -> Tensor {
    Tensor::new(t.shape(), t.data().iter().map(|v| v * 2.0 - 1.0).collect())
}

/// [-1,1] -> [0,1], clamped like diffusers' `VaeImageProcessor.denormalize`.
pub fn from_model_range(t: &Tensor) -> Tensor {
    Tensor::new(
        t.shape(),
        t.data()
            .iter()
            .map(|v| (v / 2.0 + 0.5).clamp(0.0, 1.0))
            .collect(),
    )
}

/// [0,1] -> u8 like diffusers' `numpy_to_pil`: clamp, `(x * 255).round()` (numpy rounds half to
/// even). NaN becomes 0.
pub fn quantize(v: f32) -> u8 {
    if v.is_nan() {
        0
    } else {
        (v.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8
    }
}

/// The 8-bit pixels of an image tensor in [0, 1] (`quantize` on every value): the one rule for every
/// PNG written and every 8-bit image handed to a model, so a pair's scores are computed on the
/// pixels its PNGs hold.
pub fn to_u8(t: &Tensor) -> Vec<u8> {
    t.data().iter().map(|&v| quantize(v)).collect()
}

/// An 8-bit RGB image of a [1, H, W, 3] tensor in [0, 1] (see `to_u8`).
pub fn to_rgb8(t: &Tensor) -> image::RgbImage {
    let (_, h, w, _) = t.dims4();
    image::RgbImage::from_raw(w as u32, h as u32, to_u8(t)).expect("H·W·3 values")
}

/// Writes `[H*W*3]` 8-bit RGB to `path` via a temporary file in the same directory, fsynced and
/// then renamed over `path`: the rename is atomic, so readers and crashes see either no file / the
/// old file or the complete new one. On any failure the temporary file is removed.
/// `rgb` [N, H, W, 3] composited on white by `mask` [N, H, W, 1] (float alpha blending; the
/// View Generator, the pairs stages and the C ABI all put subjects on white this way).
pub fn on_white(rgb: &Tensor, mask: &Tensor) -> Tensor {
    let data = rgb
        .data()
        .chunks(3)
        .zip(mask.data())
        .flat_map(|(px, &a)| {
            let a = a.clamp(0.0, 1.0);
            [
                px[0] * a + (1.0 - a),
                px[1] * a + (1.0 - a),
                px[2] * a + (1.0 - a),
            ]
        })
        .collect();
    Tensor::new(rgb.shape().to_vec(), data)
}

/// Removes the temporary files an interrupted write of `paths` left behind (see `atomic_file`);
/// returns how many.
pub fn remove_stale_temporaries<P: AsRef<Path>>(paths: &[P]) -> usize {
    let mut removed = 0;
    let mut dirs: std::collections::BTreeMap<&Path, Vec<String>> =
        std::collections::BTreeMap::new();
    for p in paths {
        let p = p.as_ref();
        if let Some(name) = p.file_name() {
            let dir = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            dirs.entry(dir)
                .or_default()
                .push(name.to_string_lossy().into_owned());
        }
    }
    for (dir, names) in dirs {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let stale = names
                .iter()
                .any(|f| crate::atomic_file::is_temporary_of(&n, f));
            if stale && fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

enum OutFormat {
    Png,
    Jpeg,
}

/// The output format an image path asks for: `.png` (or no extension) or `.jpg` / `.jpeg`.
fn format_of(path: &Path) -> Result<OutFormat> {
    match path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .as_deref()
    {
        None | Some("png") => Ok(OutFormat::Png),
        Some("jpg" | "jpeg") => Ok(OutFormat::Jpeg),
        Some(other) => bail!(
            "cannot write image {}: `.{other}` is not a supported output format (use .png or .jpg)",
            path.display()
        ),
    }
}

/// Checks that `path` names a format the image writer supports (before any work starts).
pub fn check_output_format(path: &Path) -> Result<()> {
    format_of(path).map(|_| ())
}

fn write_png_atomic(path: &Path, rgb: &[u8], w: usize, h: usize) -> Result<()> {
    let (w32, h32) = (u32::try_from(w)?, u32::try_from(h)?);
    crate::atomic_file::write_with(path, |out| {
        match format_of(path)? {
            OutFormat::Png => {
                PngEncoder::new(out).write_image(rgb, w32, h32, ExtendedColorType::Rgb8)?
            }
            OutFormat::Jpeg => image::codecs::jpeg::JpegEncoder::new_with_quality(out, 95)
                .write_image(rgb, w32, h32, ExtendedColorType::Rgb8)?,
        }
        Ok(())
    })
    .map_err(|e| anyhow!("cannot write image {}: {e:#}", path.display()))
}

/// Saves a `[1, H, W, 3]` image in [0,1] as an 8-bit RGB PNG (see [`write_png_atomic`]).
pub fn save_png(path: &Path, img: &Tensor) -> Result<()> {
    save_pngs(&[path], img)
}

/// Saves each image of a `[N, H, W, 3]` batch in [0,1] to the matching one of `N` paths (in parallel).
pub fn save_pngs<P: AsRef<Path> + Sync>(paths: &[P], img: &Tensor) -> Result<()> {
    let first = paths
        .first()
        .map(|p| p.as_ref().display().to_string())
        .unwrap_or_default();
    let &[n, h, w, 3] = img.shape() else {
        bail!(
            "cannot write image {first}: expected a [N, H, W, 3] tensor, got {:?}",
            img.shape()
        );
    };
    if n != paths.len() {
        bail!(
            "cannot write image {first}: a batch of {n} images for {} paths",
            paths.len()
        );
    }
    paths.par_iter().enumerate().try_for_each(|(i, path)| {
        let bytes: Vec<u8> = img.data()[i * h * w * 3..(i + 1) * h * w * 3]
            .iter()
            .map(|&v| quantize(v))
            .collect();
        write_png_atomic(path.as_ref(), &bytes, w, h)
    })
}
