//! PyTorch's `F.interpolate(mode="bicubic", align_corners=False)` on small host planes, with and
//! without `antialias`: DINOv2 resizes its position embeddings with the first
//! (`Dinov2Model`) or the second (`Dinov2WithRegistersModel`), and the two differ (cubic
//! coefficient −0.75 with clamped borders, against −0.5 with a widened, renormalised window).
//! Written here because these are weights-sized host computations done once per input size and
//! no image crate reproduces torch's index rules.

/// Keys' cubic convolution kernel (torch's `cubic_convolution1/2`).
fn cubic_weights(t: f32, a: f32) -> [f32; 4] {
    let c1 = |x: f32| ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    let c2 = |x: f32| ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a;
    [c2(t + 1.0), c1(t), c1(1.0 - t), c2(2.0 - t)]
}

/// One axis of torch's non-antialiased bicubic: for every output index, four source indices
/// (clamped to the border) and their weights.
fn taps_plain(inp: usize, out: usize) -> Vec<([usize; 4], [f32; 4])> {
    let scale = inp as f32 / out as f32;
    (0..out)
        .map(|i| {
            let real = scale * (i as f32 + 0.5) - 0.5;
            let base = real.floor();
            let t = real - base;
            let w = cubic_weights(t, -0.75);
            let idx = std::array::from_fn(|k| {
                (base as isize - 1 + k as isize).clamp(0, inp as isize - 1) as usize
            });
            (idx, w)
        })
        .collect()
}

/// torch's bicubic with `align_corners=True`: output i samples input position
/// i·(in − 1)/(out − 1), cubic coefficient −0.75, border indices clamped.
fn taps_aligned(inp: usize, out: usize) -> Vec<([usize; 4], [f32; 4])> {
    let scale = if out > 1 {
        (inp as f32 - 1.0) / (out as f32 - 1.0)
    } else {
        0.0
    };
    (0..out)
        .map(|i| {
            let real = scale * i as f32;
            let base = real.floor();
            let w = cubic_weights(real - base, -0.75);
            let idx = std::array::from_fn(|k| {
                (base as isize - 1 + k as isize).clamp(0, inp as isize - 1) as usize
            });
            (idx, w)
        })
        .collect()
}

/// Bicubic resize with `align_corners=True` (no antialiasing), as kornia's / torch's
/// `interpolate(..., mode="bicubic", align_corners=True)`.
pub fn bicubic_align_corners(src: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    separable4(src, w, &taps_aligned(h, oh), &taps_aligned(w, ow))
}

/// Four-tap separable filtering: rows through `ty`, columns through `tx`.
fn separable4(
    src: &[f32],
    w: usize,
    ty: &[([usize; 4], [f32; 4])],
    tx: &[([usize; 4], [f32; 4])],
) -> Vec<f32> {
    let ow = tx.len();
    let mut out = vec![0.0f32; ty.len() * ow];
    for (y, (iy, wy)) in ty.iter().enumerate() {
        for (x, (ix, wx)) in tx.iter().enumerate() {
            let mut acc = 0.0f32;
            for r in 0..4 {
                let row = &src[iy[r] * w..];
                let v: f32 = (0..4).map(|k| wx[k] * row[ix[k]]).sum();
                acc += wy[r] * v;
            }
            out[y * ow + x] = acc;
        }
    }
    out
}

/// Pillow-style bicubic (a = −0.5) used by torch's antialiased path.
fn aa_filter(x: f32) -> f32 {
    let a = -0.5f32;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// One axis of torch's antialiased bicubic (`_upsample_bicubic2d_aa`): a window of source indices
/// starting at `start`, with normalised weights; the window widens by the downscale factor.
fn taps_aa(inp: usize, out: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = inp as f32 / out as f32;
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let inv = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    (0..out)
        .map(|i| {
            let center = scale * (i as f32 + 0.5);
            let lo = ((center - support + 0.5) as isize).max(0) as usize;
            let hi = ((center + support + 0.5) as isize).min(inp as isize) as usize;
            let mut w: Vec<f32> = (lo..hi)
                .map(|j| aa_filter((j as f32 - center + 0.5) * inv))
                .collect();
            let total: f32 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            (lo, w)
        })
        .collect()
}

/// Bicubic resize of one row-major `h`×`w` plane to `oh`×`ow`.
pub fn bicubic(src: &[f32], h: usize, w: usize, oh: usize, ow: usize, antialias: bool) -> Vec<f32> {
    assert_eq!(src.len(), h * w, "bicubic: plane size");
    if antialias {
        // Width first, then height, as torch's separable kernel does.
        let tx = taps_aa(w, ow);
        let ty = taps_aa(h, oh);
        let mut mid = vec![0.0f32; h * ow];
        for y in 0..h {
            for (x, (lo, wt)) in tx.iter().enumerate() {
                mid[y * ow + x] = wt
                    .iter()
                    .enumerate()
                    .map(|(k, c)| c * src[y * w + lo + k])
                    .sum();
            }
        }
        let mut out = vec![0.0f32; oh * ow];
        for (y, (lo, wt)) in ty.iter().enumerate() {
            for x in 0..ow {
                out[y * ow + x] = wt
                    .iter()
                    .enumerate()
                    .map(|(k, c)| c * mid[(lo + k) * ow + x])
                    .sum();
            }
        }
        out
    } else {
        separable4(src, w, &taps_plain(h, oh), &taps_plain(w, ow))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_corners_keep_the_corners() {
        let src: Vec<f32> = (0..20).map(|v| (v * v) as f32 * 0.1).collect();
        let out = bicubic_align_corners(&src, 4, 5, 7, 9);
        assert!((out[0] - src[0]).abs() < 1e-6);
        assert!((out[8] - src[4]).abs() < 1e-5);
        assert!((out[62] - src[19]).abs() < 1e-4);
    }

    #[test]
    fn same_size_is_identity() {
        let src: Vec<f32> = (0..12).map(|v| v as f32 * 0.5 - 2.0).collect();
        for aa in [false, true] {
            let out = bicubic(&src, 3, 4, 3, 4, aa);
            for (a, b) in out.iter().zip(&src) {
                assert!((a - b).abs() < 1e-6, "{aa}: {out:?}");
            }
        }
    }

    #[test]
    fn constant_planes_stay_constant() {
        let src = vec![1.5f32; 20];
        for aa in [false, true] {
            for (oh, ow) in [(7, 3), (2, 9), (1, 1)] {
                for v in bicubic(&src, 4, 5, oh, ow, aa) {
                    assert!((v - 1.5).abs() < 1e-5, "{aa} {oh}x{ow}: {v}");
                }
                for v in bicubic_align_corners(&src, 4, 5, oh, ow) {
                    assert!((v - 1.5).abs() < 1e-5, "aligned {oh}x{ow}: {v}");
                }
            }
        }
    }
}
