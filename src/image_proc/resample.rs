//! Pillow's `Image.resize` for 8-bit RGB, ported from `libImaging/Resample.c` (convolution filters)
//! and `libImaging/Geometry.c` (`ImagingScaleAffine`, which `resize` uses for NEAREST).
//!
//! Why hand-written: the `image` crate's filters are not Pillow's. Its kernels, its antialiasing
//! (how the support widens when downscaling) and its float arithmetic with a single rounding at the
//! end differ from Pillow's, so its pixels differ from Pillow's on much of an image, and no crate
//! reproduces Pillow's integer pipeline. The vision encoders are scored against transformers'
//! PIL-backed processors, where a resize off by a level at many pixels shifts the embeddings; this
//! port is bit-identical instead (tests/suite/image_proc.rs checks every filter against Pillow 13.0.0). Everything below mirrors Pillow's arithmetic on
//! purpose (f64 filter weights, `float` box coordinates, 22-bit fixed-point coefficients, a rounding
//! and clamp to u8 after each pass, Pillow 13's choice of which pass runs first): "simplifying" any
//! of it breaks exactness on some pixel.

use std::borrow::Cow;
use std::ops::Range;

use image::RgbImage;
use rayon::prelude::*;

/// A filter kernel: weight of a sample at distance `x` (in input pixels at scale 1).
type Kernel = fn(f64) -> f64;

/// A resampling filter, by the integer codes PIL uses (and `preprocessor_config.json` stores in
/// `resample`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Resample {
    /// 0: nearest neighbour, with Pillow's pixel-centre rule.
    Nearest,
    /// 1: Lanczos, a = 3 (PIL's `LANCZOS`, formerly `ANTIALIAS`).
    Lanczos,
    /// 2: bilinear (triangle).
    Bilinear,
    /// 3: bicubic, Keys kernel with a = -0.5.
    Bicubic,
    /// 4: box.
    Box,
    /// 5: Hamming-windowed sinc over one lobe.
    Hamming,
}

impl Resample {
    /// The filter for PIL's integer code (`PIL.Image.Resampling`), `None` for an unknown code.
    pub fn from_pil(code: u64) -> Option<Resample> {
        Some(match code {
            0 => Resample::Nearest,
            1 => Resample::Lanczos,
            2 => Resample::Bilinear,
            3 => Resample::Bicubic,
            4 => Resample::Box,
            5 => Resample::Hamming,
            _ => return None,
        })
    }

    /// PIL's integer code.
    pub fn pil_code(self) -> u64 {
        match self {
            Resample::Nearest => 0,
            Resample::Lanczos => 1,
            Resample::Bilinear => 2,
            Resample::Bicubic => 3,
            Resample::Box => 4,
            Resample::Hamming => 5,
        }
    }

    /// Kernel and its support radius at scale 1 (Pillow's `struct filter`); `None` for NEAREST,
    /// which Pillow does not convolve.
    fn kernel(self) -> Option<(Kernel, f64)> {
        Some(match self {
            Resample::Nearest => return None,
            Resample::Box => (box_filter, 0.5),
            Resample::Bilinear => (bilinear_filter, 1.0),
            Resample::Hamming => (hamming_filter, 1.0),
            Resample::Bicubic => (bicubic_filter, 2.0),
            Resample::Lanczos => (lanczos_filter, 3.0),
        })
    }
}

fn box_filter(x: f64) -> f64 {
    // Half-open on the left, like Pillow: a sample exactly between two pixels goes to one of them.
    if x > -0.5 && x <= 0.5 {
        1.0
    } else {
        0.0
    }
}

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

fn hamming_filter(x: f64) -> f64 {
    let x = x.abs();
    if x == 0.0 {
        return 1.0;
    }
    if x >= 1.0 {
        return 0.0;
    }
    let x = x * std::f64::consts::PI;
    // Pillow writes the window constants as C `float` literals (0.54f, 0.46f), which are then
    // promoted to double: use the same (slightly-off) values.
    x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
}

fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn sinc_filter(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

fn lanczos_filter(x: f64) -> f64 {
    // Truncated sinc, half-open like Pillow's (-3 <= x < 3).
    if (-3.0..3.0).contains(&x) {
        sinc_filter(x) * sinc_filter(x / 3.0)
    } else {
        0.0
    }
}

/// Fixed-point fraction bits of the coefficients: 8 bits of result, 2 bits of headroom because
/// filters with negative lobes can sum above 1 or below 0 part-way, in a 32-bit accumulator.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The coefficients of one output pixel along one axis: inputs `start..start + weights.len()`.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the box `in0..in1` of an
/// input axis of `in_size` pixels mapped onto `out_size` pixels; only the output pixels in `range`
/// are computed (each output pixel's taps depend on nothing but its own index).
fn precompute_coeffs(
    in_size: usize,
    in0: f32,
    in1: f32,
    out_size: usize,
    range: Range<usize>,
    kernel: Kernel,
    support: f64,
) -> Vec<Taps> {
    // `(double)(in1 - in0) / outSize`: the box edges are C floats, subtracted as floats.
    let scale = (in1 - in0) as f64 / out_size as f64;
    // Downscaling widens the kernel by the scale factor (this is Pillow's antialiasing);
    // upscaling keeps it at its natural width.
    let filterscale = scale.max(1.0);
    let support = support * filterscale;
    let ss = 1.0 / filterscale;
    let unit = (1u32 << PRECISION_BITS) as f64;
    range
        .map(|xx| {
            let center = in0 as f64 + (xx as f64 + 0.5) * scale;
            // C `(int)` casts truncate toward zero; Rust's `as i64` does the same.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let n = (xmax - xmin).max(0) as usize;
            let mut w: Vec<f64> = (0..n)
                .map(|x| kernel(((x as i64 + xmin) as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            // Round half away from zero into fixed point (`(int)(±0.5 + k * 2^22)`).
            let weights = w
                .iter()
                .map(|&k| {
                    if k < 0.0 {
                        (-0.5 + k * unit) as i32
                    } else {
                        (0.5 + k * unit) as i32
                    }
                })
                .collect();
            Taps {
                start: xmin as usize,
                weights,
            }
        })
        .collect()
}

/// Pillow's `clip8`: drop the fraction bits (arithmetic shift, i.e. floor) and clamp to u8. The
/// accumulator starts at half a unit, so this rounds to nearest.
#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One convolution: `dot(taps, samples)` where `sample(i)` is the channel value of input `i`.
/// Wrapping arithmetic mirrors the C int accumulator (in-range inputs never overflow).
#[inline]
fn convolve(taps: &Taps, sample: impl Fn(usize) -> u8) -> u8 {
    let mut ss = 1i32 << (PRECISION_BITS - 1);
    for (i, &k) in taps.weights.iter().enumerate() {
        ss = ss.wrapping_add((sample(taps.start + i) as i32).wrapping_mul(k));
    }
    clip8(ss)
}

/// Pillow's `Image.resize((width, height), resample=filter)` of an RGB image, with `box` and
/// `reducing_gap` left at their defaults (the whole image, no reduction step), as transformers
/// calls it. An axis whose size does not change is not filtered at all (as in Pillow), and a
/// same-size resize is a copy. A zero `width` or `height` gives an empty image; an empty input gives
/// a black image of the requested size (Pillow refuses both; this never panics).
pub fn resize_rgb8(img: &RgbImage, width: u32, height: u32, filter: Resample) -> RgbImage {
    let (w, h) = (width as usize, height as usize);
    let data = resize_window(img, w, h, filter, 0..w, 0..h);
    RgbImage::from_raw(width, height, data).expect("buffer sized to width * height * 3")
}

/// The pixels `cols` x `rows` (clamped to the output) of `resize_rgb8(img, out_w, out_h, filter)`,
/// row-major RGB, computed without the rest of the output: a resize followed by a centre crop only
/// pays for the crop, and a huge intermediate size (a very thin image brought to a shortest edge)
/// costs nothing. Bit-identical to cropping the full resize, because every output pixel depends only
/// on its own taps.
pub(crate) fn resize_window(
    img: &RgbImage,
    out_w: usize,
    out_h: usize,
    filter: Resample,
    cols: Range<usize>,
    rows: Range<usize>,
) -> Vec<u8> {
    let cols = cols.start.min(out_w)..cols.end.min(out_w).max(cols.start.min(out_w));
    let rows = rows.start.min(out_h)..rows.end.min(out_h).max(rows.start.min(out_h));
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    if cols.is_empty() || rows.is_empty() {
        return Vec::new();
    }
    if in_w == 0 || in_h == 0 {
        return vec![0; cols.len() * rows.len() * 3];
    }
    if (in_w, in_h) == (out_w, out_h) {
        // Pillow returns a copy for a same-size resize, whatever the filter.
        return copy_window(img.as_raw(), in_w, &cols, &rows);
    }
    match filter.kernel() {
        None => nearest(img, out_w, out_h, cols, rows),
        Some((kernel, support)) => convolve_2d(img, out_w, out_h, cols, rows, kernel, support),
    }
}

fn copy_window(src: &[u8], stride_px: usize, cols: &Range<usize>, rows: &Range<usize>) -> Vec<u8> {
    let mut out = Vec::with_capacity(cols.len() * rows.len() * 3);
    for y in rows.clone() {
        let line = &src[y * stride_px * 3..(y + 1) * stride_px * 3];
        out.extend_from_slice(&line[cols.start * 3..cols.end * 3]);
    }
    out
}

/// Pillow's NEAREST resize: `ImagingTransform` with the affine scale `(in/out, 0, 0, 0, in/out, 0)`,
/// which lands in `ImagingScaleAffine`. The source coordinate is accumulated in f64 step by step
/// (not computed as `x * scale`), exactly as Pillow does, so rounding drift matches too.
fn nearest(
    img: &RgbImage,
    out_w: usize,
    out_h: usize,
    cols: Range<usize>,
    rows: Range<usize>,
) -> Vec<u8> {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    // Pillow's COORD(): negative -> -1 (out of range), otherwise truncate.
    let coord = |v: f64| if v < 0.0 { -1i64 } else { v as i64 };
    let positions = |in_size: usize, out_size: usize, range: &Range<usize>| -> Vec<Option<usize>> {
        let a = (in_size as f32) as f64 / out_size as f64;
        let mut o = 0.0 + a * 0.5;
        (0..range.end)
            .map(|_| {
                let i = coord(o);
                o += a;
                (i >= 0 && (i as usize) < in_size).then_some(i as usize)
            })
            .skip(range.start)
            .collect()
    };
    let xs = positions(in_w, out_w, &cols);
    let ys = positions(in_h, out_h, &rows);
    let src = img.as_raw();
    let mut out = vec![0u8; cols.len() * rows.len() * 3];
    out.par_chunks_mut(cols.len() * 3)
        .zip(ys.par_iter())
        .for_each(|(row, y)| {
            // Pillow fills out-of-range targets with zeros.
            let Some(y) = *y else { return };
            for (px, x) in row.chunks_exact_mut(3).zip(&xs) {
                if let Some(x) = *x {
                    let s = (y * in_w + x) * 3;
                    px.copy_from_slice(&src[s..s + 3]);
                }
            }
        });
    out
}

/// A rectangle of RGB pixels `[x0, x0 + w) x [y0, y0 + h)` of some image, row-major.
struct Win<'a> {
    data: Cow<'a, [u8]>,
    x0: usize,
    y0: usize,
    w: usize,
    h: usize,
}

impl Win<'_> {
    #[inline]
    fn at(&self, x: usize, y: usize, c: usize) -> u8 {
        self.data[((y - self.y0) * self.w + (x - self.x0)) * 3 + c]
    }

    fn crop(&self, cols: Range<usize>, rows: Range<usize>) -> Win<'static> {
        let mut data = Vec::with_capacity(cols.len() * rows.len() * 3);
        for y in rows.clone() {
            let line = ((y - self.y0) * self.w + (cols.start - self.x0)) * 3;
            data.extend_from_slice(&self.data[line..line + cols.len() * 3]);
        }
        Win {
            data: data.into(),
            x0: cols.start,
            y0: rows.start,
            w: cols.len(),
            h: rows.len(),
        }
    }
}

/// The input span all of `taps` read.
fn span(taps: &[Taps]) -> Range<usize> {
    let start = taps.iter().map(|t| t.start).min().unwrap_or(0);
    let end = taps
        .iter()
        .map(|t| t.start + t.weights.len())
        .max()
        .unwrap_or(start);
    start..end.max(start)
}

/// Horizontal pass (`ImagingResampleHorizontal_8bpc`) over the input rows `rows`: output columns
/// `x0..x0 + taps.len()`.
fn h_pass(input: &Win, taps: &[Taps], x0: usize, rows: Range<usize>) -> Win<'static> {
    let w = taps.len();
    let mut data = vec![0u8; w * rows.len() * 3];
    if w > 0 {
        data.par_chunks_mut(w * 3)
            .enumerate()
            .for_each(|(r, line)| {
                let y = rows.start + r;
                for (px, t) in line.chunks_exact_mut(3).zip(taps) {
                    for (c, v) in px.iter_mut().enumerate() {
                        *v = convolve(t, |x| input.at(x, y, c));
                    }
                }
            });
    }
    Win {
        data: data.into(),
        x0,
        y0: rows.start,
        w,
        h: rows.len(),
    }
}

/// Vertical pass (`ImagingResampleVertical_8bpc`) over the input columns `cols`: output rows
/// `y0..y0 + taps.len()`.
fn v_pass(input: &Win, taps: &[Taps], y0: usize, cols: Range<usize>) -> Win<'static> {
    let w = cols.len();
    let mut data = vec![0u8; w * taps.len() * 3];
    if w > 0 {
        data.par_chunks_mut(w * 3)
            .zip(taps.par_iter())
            .for_each(|(line, t)| {
                for (i, v) in line.iter_mut().enumerate() {
                    let (x, c) = (cols.start + i / 3, i % 3);
                    *v = convolve(t, |y| input.at(x, y, c));
                }
            });
    }
    Win {
        data: data.into(),
        x0: cols.start,
        y0,
        w,
        h: taps.len(),
    }
}

/// Pillow's `ImagingResampleInner`: two separable passes, each rounding to u8, a pass skipped when
/// its axis keeps its size. Pillow 13 runs the vertical pass first when the height shrinks by more
/// than twice as many pixels as the width does (python-pillow/Pillow#9549; the rule was pinned
/// down against Pillow 13.0.0 on thousands of random sizes), otherwise horizontal first. The
/// order changes the u8 rounding in between, so it must match. Each pass computes only what the
/// window needs (the first pass only the rows or columns the second one reads).
fn convolve_2d(
    img: &RgbImage,
    out_w: usize,
    out_h: usize,
    cols: Range<usize>,
    rows: Range<usize>,
    kernel: Kernel,
    support: f64,
) -> Vec<u8> {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let taps_h = (out_w != in_w)
        .then(|| precompute_coeffs(in_w, 0.0, in_w as f32, out_w, cols.clone(), kernel, support));
    let taps_v = (out_h != in_h)
        .then(|| precompute_coeffs(in_h, 0.0, in_h as f32, out_h, rows.clone(), kernel, support));
    let vertical_first = out_h < in_h && (in_h - out_h) as i64 > 2 * (in_w as i64 - out_w as i64);
    let src = Win {
        data: Cow::Borrowed(img.as_raw().as_slice()),
        x0: 0,
        y0: 0,
        w: in_w,
        h: in_h,
    };
    // Each pass maps input coordinates on its axis to output ones; a skipped pass is a copy.
    let horizontal = |input: &Win, rows: Range<usize>| match &taps_h {
        Some(t) => h_pass(input, t, cols.start, rows),
        None => input.crop(cols.clone(), rows),
    };
    let vertical = |input: &Win, cols: Range<usize>| match &taps_v {
        Some(t) => v_pass(input, t, rows.start, cols),
        None => input.crop(cols, rows.clone()),
    };
    let out = if vertical_first {
        let src_cols = taps_h.as_deref().map_or(cols.clone(), span);
        horizontal(&vertical(&src, src_cols), rows.clone())
    } else {
        let src_rows = taps_v.as_deref().map_or(rows.clone(), span);
        vertical(&horizontal(&src, src_rows), cols.clone())
    };
    debug_assert_eq!((out.w, out.h), (cols.len(), rows.len()));
    out.data.into_owned()
}
