//! Canny edge detector for ControlNet conditioning images, bit-exact with OpenCV's
//! `cv2.Canny(cv2.cvtColor(rgb_u8, cv2.COLOR_RGB2GRAY), low, high)` (aperture 3, L1 gradient), the
//! preprocessing of the diffusers ControlNet docs. Everything after the 8-bit quantisation
//! reimplements the integer arithmetic of OpenCV's `canny.cpp`, so ties and thresholds resolve
//! exactly as there.

use rayon::prelude::*;

use crate::tensor::Tensor;

/// The 8-bit grayscale OpenCV computes for `COLOR_RGB2GRAY`: each image of an `[N, H, W, 3]` batch
/// in [0,1] is first quantised as diffusers does (`(x * 255).round()` after a clamp, i.e. the uint8
/// array of the loaded image), then `Y = (9798 R + 19235 G + 3735 B + 2^14) >> 15`: the Q15
/// 0.299 / 0.587 / 0.114 that `cvtColor` computes with (bit-exact; rounding the float formula
/// differs on about 0.1% of pixels). `[N, H, W, 1]` input is taken as gray already.
/// Returns `N * H * W` bytes.
pub fn gray_u8(rgb: &Tensor) -> Vec<u8> {
    let (_, _, _, c) = rgb.dims4();
    assert!(
        c == 3 || c == 1,
        "gray_u8 expects 1 or 3 channels, got {:?}",
        rgb.shape()
    );
    let q = |v: f32| {
        if v.is_nan() {
            0
        } else {
            (v.clamp(0.0, 1.0) * 255.0).round_ties_even() as u32
        }
    };
    rgb.data()
        .chunks_exact(c)
        .map(|p| match p {
            [r, g, b] => ((9798 * q(*r) + 19235 * q(*g) + 3735 * q(*b) + (1 << 14)) >> 15) as u8,
            _ => q(p[0]) as u8,
        })
        .collect()
}

/// OpenCV's NMS direction test constant: tan(22.5 deg) in Q15.
const TG22: i64 = 13573;

/// Canny edges of one `w`x`h` gray image as 0/1 per pixel.
fn canny_gray(g: &[u8], w: usize, h: usize, low: i32, high: i32) -> Vec<f32> {
    let pw = w + 2;
    let (dxy, mag) = sobel(g, w, h);
    let (mut map, stack) = suppress(&dxy, &mag, w, h, low, high);
    hysteresis(&mut map, stack, pw);
    (0..h)
        .flat_map(|y| (0..w).map(move |x| (y + 1) * pw + x + 1))
        .map(|i| if map[i] == 2 { 1.0 } else { 0.0 })
        .collect()
}

/// The per-pixel Sobel gradient `(dx, dy)` (`w * h`) and its magnitude (`(w + 2) * (h + 2)`).
fn sobel(g: &[u8], w: usize, h: usize) -> (Vec<(i32, i32)>, Vec<i32>) {
    // 3x3 Sobel with OpenCV's BORDER_REPLICATE; magnitude |dx| + |dy| in a buffer with a zero
    // border, which is how OpenCV's NMS sees the outside of the image.
    let (pw, ph) = (w + 2, h + 2);
    let px = |x: isize, y: isize| {
        let (x, y) = (
            x.clamp(0, w as isize - 1) as usize,
            y.clamp(0, h as isize - 1) as usize,
        );
        g[y * w + x] as i32
    };
    let mut dxy = vec![(0i32, 0i32); w * h];
    let mut mag = vec![0i32; pw * ph];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let dx = px(x + 1, y - 1) + 2 * px(x + 1, y) + px(x + 1, y + 1)
                - px(x - 1, y - 1)
                - 2 * px(x - 1, y)
                - px(x - 1, y + 1);
            let dy = px(x - 1, y + 1) + 2 * px(x, y + 1) + px(x + 1, y + 1)
                - px(x - 1, y - 1)
                - 2 * px(x, y - 1)
                - px(x + 1, y - 1);
            dxy[y as usize * w + x as usize] = (dx, dy);
            mag[(y as usize + 1) * pw + x as usize + 1] = dx.abs() + dy.abs();
        }
    }
    (dxy, mag)
}

/// Non-maximum suppression with the thresholds: the edge map and the strong edges' indices.
fn suppress(
    dxy: &[(i32, i32)],
    mag: &[i32],
    w: usize,
    h: usize,
    low: i32,
    high: i32,
) -> (Vec<u8>, Vec<usize>) {
    let (pw, ph) = (w + 2, h + 2);
    // Non-maximum suppression along the gradient's quantised direction (horizontal, vertical or one
    // of the diagonals), with OpenCV's asymmetric `>` / `>=` so plateaus keep exactly one pixel.
    // Map: 0 = weak candidate, 1 = not an edge (also the border), 2 = edge.
    let mut map = vec![1u8; pw * ph];
    let mut stack = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let i = (y + 1) * pw + x + 1;
            let m = mag[i];
            if m <= low {
                continue;
            }
            let (dx, dy) = dxy[y * w + x];
            let ax = dx.unsigned_abs() as i64;
            let ay = (dy.unsigned_abs() as i64) << 15;
            let tg22x = ax * TG22;
            let is_max = if ay < tg22x {
                m > mag[i - 1] && m >= mag[i + 1]
            } else if ay > tg22x + (ax << 16) {
                m > mag[i - pw] && m >= mag[i + pw]
            } else {
                // Diagonal: "/" when the gradient components have opposite signs, else "\".
                let s: isize = if (dx ^ dy) < 0 { -1 } else { 1 };
                m > mag[(i - pw).wrapping_add_signed(-s)]
                    && m > mag[(i + pw).wrapping_add_signed(s)]
            };
            if !is_max {
                continue;
            }
            if m > high {
                map[i] = 2;
                stack.push(i);
            } else {
                map[i] = 0;
            }
        }
    }
    (map, stack)
}

/// Hysteresis: weak candidates 8-connected to an edge become edges.
fn hysteresis(map: &mut [u8], mut stack: Vec<usize>, pw: usize) {
    while let Some(i) = stack.pop() {
        for n in [
            i - pw - 1,
            i - pw,
            i - pw + 1,
            i - 1,
            i + 1,
            i + pw - 1,
            i + pw,
            i + pw + 1,
        ] {
            if map[n] == 0 {
                map[n] = 2;
                stack.push(n);
            }
        }
    }
}

/// Canny edges of each image of an `[N, H, W, 3]` batch in [0,1] (or `[N, H, W, 1]` gray), like
/// `cv2.Canny(gray, low, high)`: gradient magnitude above `high` starts an edge, above `low`
/// continues one (thresholds are floored to integers and swapped if given in the wrong order, as
/// OpenCV does). Returns `[N, H, W, 3]` with 1 on edges and 0 elsewhere, the edge map replicated
/// into three channels as the diffusers docs do with `np.concatenate`.
pub fn canny(rgb: &Tensor, low: f32, high: f32) -> Tensor {
    let (n, h, w, _) = rgb.dims4();
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    let (low, high) = (low.floor() as i32, high.floor() as i32);
    let gray = gray_u8(rgb);
    let mut out = vec![0.0f32; n * h * w * 3];
    if h * w == 0 {
        return Tensor::new(vec![n, h, w, 3], out);
    }
    out.par_chunks_mut(h * w * 3)
        .zip(gray.par_chunks(h * w))
        .for_each(|(dst, g)| {
            let edges = canny_gray(g, w, h, low, high);
            dst.chunks_exact_mut(3)
                .zip(edges)
                .for_each(|(d, e)| d.fill(e));
        });
    Tensor::new(vec![n, h, w, 3], out)
}
