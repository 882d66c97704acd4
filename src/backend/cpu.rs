//! The f32 CPU reference backend: simple, obviously correct, multithreaded where it is cheap.
//! GEMMs go through the `gemm` crate; convolutions are im2col + GEMM on NHWC activations.

use super::layer::{Activation, Conv2dW, LinearW};
use crate::tensor::Tensor;
use gemm::Parallelism;
use rayon::prelude::*;

fn threads() -> Parallelism {
    match rayon::current_num_threads() {
        1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// Row-major strided matrix view for `matmul_into`.
#[derive(Clone, Copy)]
pub struct Mat {
    pub ptr: *const f32,
    pub row_stride: isize,
    pub col_stride: isize,
}

/// dst[m×n] (row stride `dst_rs`) = a[m×k] · b[k×n].
///
/// # Safety
/// Every pointer must be valid for the extents implied by the dimensions and strides.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_raw(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    a: Mat,
    b: Mat,
    par: Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs,
        false,
        a.ptr,
        a.col_stride,
        a.row_stride,
        b.ptr,
        b.col_stride,
        b.row_stride,
        0.0,
        1.0,
        false,
        false,
        false,
        par,
    );
}

/// y = x Wᵀ + b over the last dimension of `x`.
pub fn linear(x: &Tensor, l: &LinearW) -> Tensor {
    let k = l.in_features();
    let n = l.out_features();
    assert_eq!(
        x.last_dim(),
        k,
        "linear: input {:?} vs weight {:?}",
        x.shape(),
        l.weight.shape()
    );
    let m = x.numel() / k;
    let mut out = vec![0.0f32; m * n];
    if m > 0 {
        // Safety: x is m×k row-major, weight is n×k row-major (read as its transpose), out is m×n.
        unsafe {
            matmul_raw(
                m,
                n,
                k,
                out.as_mut_ptr(),
                n as isize,
                Mat {
                    ptr: x.data().as_ptr(),
                    row_stride: k as isize,
                    col_stride: 1,
                },
                Mat {
                    ptr: l.weight.data().as_ptr(),
                    row_stride: 1,
                    col_stride: k as isize,
                },
                threads(),
            );
        }
    }
    if let Some(b) = &l.bias {
        add_row_bias(&mut out, b.data());
    }
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = n;
    Tensor::new(shape, out)
}

fn add_row_bias(out: &mut [f32], bias: &[f32]) {
    let n = bias.len();
    out.par_chunks_mut(n * 64).for_each(|rows| {
        for row in rows.chunks_mut(n) {
            for (o, b) in row.iter_mut().zip(bias) {
                *o += b;
            }
        }
    });
}

/// NHWC convolution.
pub fn conv2d(x: &Tensor, c: &Conv2dW) -> Tensor {
    assert!(!c.krsc, "KRSC (GPU) convolution weights on the CPU backend");
    let (n, h, w, cin) = x.dims4();
    assert_eq!(
        cin,
        c.in_channels(),
        "conv2d: input {:?} vs weight {:?}",
        x.shape(),
        c.weight.shape()
    );
    let k = c.kernel;
    let [pt, pb, pl, pr] = c.pad;
    let ho = (h + pt + pb - k) / c.stride + 1;
    let wo = (w + pl + pr - k) / c.stride + 1;
    let cout = c.out_channels();
    let kk = k * k * cin;
    let mut out = vec![0.0f32; n * ho * wo * cout];
    let wmat = Mat {
        ptr: c.weight.data().as_ptr(),
        row_stride: cout as isize,
        col_stride: 1,
    };
    let direct = k == 1 && c.stride == 1 && c.pad == [0; 4];
    let rows = ho * wo;
    for b in 0..n {
        let img = &x.data()[b * h * w * cin..(b + 1) * h * w * cin];
        let dst = &mut out[b * rows * cout..(b + 1) * rows * cout];
        let cols;
        let a = if direct {
            img
        } else {
            cols = im2col(img, h, w, cin, k, c.stride, [pt, pl], ho, wo);
            &cols[..]
        };
        // Safety: a is rows×kk, the weight kk×cout, dst rows×cout, all row-major.
        unsafe {
            matmul_raw(
                rows,
                cout,
                kk,
                dst.as_mut_ptr(),
                cout as isize,
                Mat {
                    ptr: a.as_ptr(),
                    row_stride: kk as isize,
                    col_stride: 1,
                },
                wmat,
                threads(),
            );
        }
    }
    if let Some(bias) = &c.bias {
        add_row_bias(&mut out, bias.data());
    }
    Tensor::new(vec![n, ho, wo, cout], out)
}

#[allow(clippy::too_many_arguments)]
fn im2col(
    img: &[f32],
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    stride: usize,
    pad: [usize; 2],
    ho: usize,
    wo: usize,
) -> Vec<f32> {
    let kk = k * k * c;
    let mut cols = vec![0.0f32; ho * wo * kk];
    cols.par_chunks_mut(wo * kk)
        .enumerate()
        .for_each(|(oy, line)| {
            for ox in 0..wo {
                let row = &mut line[ox * kk..(ox + 1) * kk];
                for ky in 0..k {
                    let iy = (oy * stride + ky) as isize - pad[0] as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    for kx in 0..k {
                        let ix = (ox * stride + kx) as isize - pad[1] as isize;
                        if ix < 0 || ix >= w as isize {
                            continue;
                        }
                        let src = ((iy as usize) * w + ix as usize) * c;
                        row[(ky * k + kx) * c..(ky * k + kx + 1) * c]
                            .copy_from_slice(&img[src..src + c]);
                    }
                }
            }
        });
    cols
}

/// GroupNorm over NHWC (or [N, L, C] token layouts: the middle dimensions are flattened), optionally
/// followed by SiLU, as diffusers' resnets do.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    silu_after: bool,
) -> Tensor {
    let c = x.last_dim();
    assert!(
        c.is_multiple_of(groups),
        "group_norm: {c} channels in {groups} groups"
    );
    let n = x.shape()[0];
    let hw = x.numel() / (n * c);
    let cg = c / groups;
    let mut out = vec![0.0f32; x.numel()];
    let (g, bt) = (gamma.data(), beta.data());
    out.par_chunks_mut(hw * c)
        .zip(x.data().par_chunks(hw * c))
        .for_each(|(o, xin)| {
            for grp in 0..groups {
                // Two-pass statistics in f64: the reference must not drift on large images.
                let mut sum = 0.0f64;
                for p in 0..hw {
                    for v in &xin[p * c + grp * cg..p * c + (grp + 1) * cg] {
                        sum += *v as f64;
                    }
                }
                let count = (hw * cg) as f64;
                let mean = sum / count;
                let mut var = 0.0f64;
                for p in 0..hw {
                    for v in &xin[p * c + grp * cg..p * c + (grp + 1) * cg] {
                        let d = *v as f64 - mean;
                        var += d * d;
                    }
                }
                let inv = 1.0 / (var / count + eps as f64).sqrt();
                for p in 0..hw {
                    for ch in grp * cg..(grp + 1) * cg {
                        let v = ((xin[p * c + ch] as f64 - mean) * inv) as f32 * g[ch] + bt[ch];
                        o[p * c + ch] = if silu_after { silu1(v) } else { v };
                    }
                }
            }
        });
    Tensor::new(x.shape().to_vec(), out)
}

/// LayerNorm over the last dimension.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Tensor {
    let c = x.last_dim();
    let mut out = vec![0.0f32; x.numel()];
    let (g, b) = (gamma.data(), beta.data());
    out.par_chunks_mut(c)
        .zip(x.data().par_chunks(c))
        .for_each(|(o, xin)| {
            let mean = xin.iter().map(|v| *v as f64).sum::<f64>() / c as f64;
            let var = xin.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for i in 0..c {
                o[i] = ((xin[i] as f64 - mean) * inv) as f32 * g[i] + b[i];
            }
        });
    Tensor::new(x.shape().to_vec(), out)
}

/// Scaled dot-product attention on packed heads: q [B, Lq, H·D], k and v [B, Lk, H·D] -> [B, Lq, H·D].
/// `causal` masks keys after the query position (CLIP text encoder).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Tensor {
    let (b, lq, hd) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let lk = k.shape()[1];
    assert_eq!(k.shape(), v.shape(), "attention: k and v differ");
    assert_eq!(k.shape()[2], hd, "attention: q and k widths differ");
    assert_eq!(
        hd % heads,
        0,
        "attention: width {hd} not divisible by {heads} heads"
    );
    let d = hd / heads;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0.0f32; b * lq * hd];
    let out_ptr = out.as_mut_ptr() as usize;
    (0..b * heads).into_par_iter().for_each(|bh| {
        let (bi, h) = (bh / heads, bh % heads);
        let mut scores = vec![0.0f32; lq * lk];
        let qp = q.data()[bi * lq * hd + h * d..].as_ptr();
        let kp = k.data()[bi * lk * hd + h * d..].as_ptr();
        let vp = v.data()[bi * lk * hd + h * d..].as_ptr();
        // Safety: strides stay within this (batch, head) slice of q, k, v; each task writes a
        // disjoint column block of `out`.
        unsafe {
            matmul_raw(
                lq,
                lk,
                d,
                scores.as_mut_ptr(),
                lk as isize,
                Mat {
                    ptr: qp,
                    row_stride: hd as isize,
                    col_stride: 1,
                },
                Mat {
                    ptr: kp,
                    row_stride: 1,
                    col_stride: hd as isize,
                },
                Parallelism::None,
            );
        }
        for (i, row) in scores.chunks_mut(lk).enumerate() {
            let valid = if causal { i + 1 } else { lk };
            let mut mx = f32::NEG_INFINITY;
            for s in row[..valid].iter_mut() {
                *s *= scale;
                mx = mx.max(*s);
            }
            let mut sum = 0.0f32;
            for s in row[..valid].iter_mut() {
                *s = (*s - mx).exp();
                sum += *s;
            }
            for s in row[..valid].iter_mut() {
                *s /= sum;
            }
            row[valid..].fill(0.0);
        }
        unsafe {
            let op = (out_ptr as *mut f32).add(bi * lq * hd + h * d);
            matmul_raw(
                lq,
                d,
                lk,
                op,
                hd as isize,
                Mat {
                    ptr: scores.as_ptr(),
                    row_stride: lk as isize,
                    col_stride: 1,
                },
                Mat {
                    ptr: vp,
                    row_stride: hd as isize,
                    col_stride: 1,
                },
                Parallelism::None,
            );
        }
    });
    Tensor::new(vec![b, lq, hd], out)
}

#[inline]
pub fn silu1(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

#[inline]
fn gelu1(v: f32) -> f32 {
    (0.5 * v as f64 * (1.0 + libm::erf(v as f64 / std::f64::consts::SQRT_2))) as f32
}

#[inline]
fn quick_gelu1(v: f32) -> f32 {
    v / (1.0 + (-1.702 * v).exp())
}

fn map(x: &Tensor, f: impl Fn(f32) -> f32 + Sync) -> Tensor {
    let mut out = vec![0.0f32; x.numel()];
    out.par_chunks_mut(4096)
        .zip(x.data().par_chunks(4096))
        .for_each(|(o, i)| {
            for (o, i) in o.iter_mut().zip(i) {
                *o = f(*i);
            }
        });
    Tensor::new(x.shape().to_vec(), out)
}

pub fn silu(x: &Tensor) -> Tensor {
    map(x, silu1)
}
pub fn gelu(x: &Tensor) -> Tensor {
    map(x, gelu1)
}
pub fn quick_gelu(x: &Tensor) -> Tensor {
    map(x, quick_gelu1)
}
pub fn scale(x: &Tensor, s: f32) -> Tensor {
    map(x, |v| v * s)
}

/// Gated linear unit: the first half of the last dimension times `act` of the second half (GEGLU
/// with GELU; DINOv2's SwiGLU with SiLU once its gate half is moved second at load time).
pub fn glu(x: &Tensor, act: Activation) -> Tensor {
    let f = act.scalar_fn();
    let c2 = x.last_dim();
    let c = c2 / 2;
    let rows = x.numel() / c2;
    let mut out = vec![0.0f32; rows * c];
    out.par_chunks_mut(c)
        .zip(x.data().par_chunks(c2))
        .for_each(|(o, i)| {
            for j in 0..c {
                o[j] = i[j] * f(i[c + j]);
            }
        });
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = c;
    Tensor::new(shape, out)
}

pub fn add(a: &Tensor, b: &Tensor) -> Tensor {
    assert_eq!(a.shape(), b.shape(), "add: shapes differ");
    let mut out = a.data().to_vec();
    out.par_chunks_mut(4096)
        .zip(b.data().par_chunks(4096))
        .for_each(|(o, i)| {
            for (o, i) in o.iter_mut().zip(i) {
                *o += i;
            }
        });
    Tensor::new(a.shape().to_vec(), out)
}

/// a + s·b
pub fn add_scaled(a: &Tensor, b: &Tensor, s: f32) -> Tensor {
    assert_eq!(a.shape(), b.shape(), "add_scaled: shapes differ");
    let mut out = a.data().to_vec();
    out.par_chunks_mut(4096)
        .zip(b.data().par_chunks(4096))
        .for_each(|(o, i)| {
            for (o, i) in o.iter_mut().zip(i) {
                *o += s * i;
            }
        });
    Tensor::new(a.shape().to_vec(), out)
}

/// x [N, ..., C] + v [N, C]: a per-sample channel vector broadcast over the spatial dimensions.
pub fn add_per_sample_channels(x: &Tensor, v: &Tensor) -> Tensor {
    let n = x.shape()[0];
    let c = x.last_dim();
    assert_eq!(
        v.shape(),
        [n, c],
        "add_per_sample_channels: {:?} vs {:?}",
        x.shape(),
        v.shape()
    );
    let per = x.numel() / n;
    let mut out = x.data().to_vec();
    out.par_chunks_mut(per).enumerate().for_each(|(b, img)| {
        let vv = &v.data()[b * c..(b + 1) * c];
        for px in img.chunks_mut(c) {
            for (o, a) in px.iter_mut().zip(vv) {
                *o += a;
            }
        }
    });
    Tensor::new(x.shape().to_vec(), out)
}

/// Concatenation along the last (channel) dimension.
pub fn concat_channels(parts: &[&Tensor]) -> Tensor {
    let lead = &parts[0].shape()[..parts[0].rank() - 1];
    let rows: usize = lead.iter().product();
    let total: usize = parts.iter().map(|p| p.last_dim()).sum();
    let mut out = vec![0.0f32; rows * total];
    for p in parts {
        assert_eq!(
            &p.shape()[..p.rank() - 1],
            lead,
            "concat_channels: leading dims differ"
        );
    }
    out.par_chunks_mut(total).enumerate().for_each(|(r, o)| {
        let mut off = 0;
        for p in parts {
            let c = p.last_dim();
            o[off..off + c].copy_from_slice(&p.data()[r * c..(r + 1) * c]);
            off += c;
        }
    });
    let mut shape = lead.to_vec();
    shape.push(total);
    Tensor::new(shape, out)
}

/// Nearest-neighbour resize of NHWC with PyTorch's index rule (src = floor(dst · in / out)).
pub fn upsample_nearest(x: &Tensor, out_h: usize, out_w: usize) -> Tensor {
    let (n, h, w, c) = x.dims4();
    let mut out = vec![0.0f32; n * out_h * out_w * c];
    let sy = h as f32 / out_h as f32;
    let sx = w as f32 / out_w as f32;
    out.par_chunks_mut(out_w * c)
        .enumerate()
        .for_each(|(row, o)| {
            let (b, oy) = (row / out_h, row % out_h);
            let iy = ((oy as f32 * sy) as usize).min(h - 1);
            for ox in 0..out_w {
                let ix = ((ox as f32 * sx) as usize).min(w - 1);
                let s = ((b * h + iy) * w + ix) * c;
                o[ox * c..(ox + 1) * c].copy_from_slice(&x.data()[s..s + c]);
            }
        });
    Tensor::new(vec![n, out_h, out_w, c], out)
}

/// The pixel shuffle after a stride-k transposed convolution's GEMM: x [N, H, W, k·k·C] with
/// channel (ky·k + kx)·C + c → [N, H·k, W·k, C].
pub fn depth_to_space(x: &Tensor, k: usize) -> Tensor {
    let (n, h, w, ckk) = x.dims4();
    let c = ckk / (k * k);
    let (oh, ow) = (h * k, w * k);
    let mut out = vec![0.0f32; x.numel()];
    out.par_chunks_mut(ow * c).enumerate().for_each(|(row, o)| {
        let (b, oy) = (row / oh, row % oh);
        let (iy, ky) = (oy / k, oy % k);
        for ox in 0..ow {
            let (ix, kx) = (ox / k, ox % k);
            let s = ((b * h + iy) * w + ix) * ckk + (ky * k + kx) * c;
            o[ox * c..(ox + 1) * c].copy_from_slice(&x.data()[s..s + c]);
        }
    });
    Tensor::new(vec![n, oh, ow, c], out)
}

/// torch's source coordinate and weights along one axis of a bilinear resize (no antialias).
fn bilinear_taps(inp: usize, out: usize, align_corners: bool) -> Vec<(usize, usize, f32)> {
    (0..out)
        .map(|o| {
            let src = if align_corners {
                if out > 1 {
                    o as f32 * (inp as f32 - 1.0) / (out as f32 - 1.0)
                } else {
                    0.0
                }
            } else {
                ((o as f32 + 0.5) * inp as f32 / out as f32 - 0.5).max(0.0)
            };
            let i0 = (src as usize).min(inp - 1);
            let i1 = (i0 + 1).min(inp - 1);
            (i0, i1, src - i0 as f32)
        })
        .collect()
}

/// Bilinear resize of NHWC as `F.interpolate(mode="bilinear", align_corners=…)`.
pub fn resize_bilinear(x: &Tensor, oh: usize, ow: usize, align_corners: bool) -> Tensor {
    let (n, h, w, c) = x.dims4();
    let ty = bilinear_taps(h, oh, align_corners);
    let tx = bilinear_taps(w, ow, align_corners);
    let d = x.data();
    let mut out = vec![0.0f32; n * oh * ow * c];
    out.par_chunks_mut(ow * c).enumerate().for_each(|(row, o)| {
        let (b, oy) = (row / oh, row % oh);
        let (y0, y1, ly) = ty[oy];
        let at = |y: usize, xx: usize, ch: usize| d[((b * h + y) * w + xx) * c + ch];
        for (ox, &(x0, x1, lx)) in tx.iter().enumerate() {
            for ch in 0..c {
                let top = (1.0 - lx) * at(y0, x0, ch) + lx * at(y0, x1, ch);
                let bot = (1.0 - lx) * at(y1, x0, ch) + lx * at(y1, x1, ch);
                o[ox * c + ch] = (1.0 - ly) * top + ly * bot;
            }
        }
    });
    Tensor::new(vec![n, oh, ow, c], out)
}

/// FiLM: mul[N, C]·x[N, ..., C] + add[N, C].
pub fn film(x: &Tensor, mul: &Tensor, add: &Tensor) -> Tensor {
    let n = x.shape()[0];
    let c = x.last_dim();
    let per = x.numel() / n;
    let mut out = x.data().to_vec();
    out.par_chunks_mut(per).enumerate().for_each(|(b, img)| {
        let m = &mul.data()[b * c..(b + 1) * c];
        let a = &add.data()[b * c..(b + 1) * c];
        for px in img.chunks_mut(c) {
            for ((o, m), a) in px.iter_mut().zip(m).zip(a) {
                *o = m * *o + a;
            }
        }
    });
    Tensor::new(x.shape().to_vec(), out)
}

/// Sinusoidal timestep embedding as diffusers' `get_timestep_embedding` (scale 1, max period 10000).
pub fn timestep_embedding(t: &[f32], dim: usize, flip_sin_to_cos: bool, freq_shift: f32) -> Tensor {
    let half = dim / 2;
    let mut out = vec![0.0f32; t.len() * dim];
    // Frequencies computed in f32 like torch: exp(-ln(10000) · i / (half - shift)).
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((-(10000f64.ln()) as f32) * i as f32 / (half as f32 - freq_shift)).exp())
        .collect();
    for (b, &tv) in t.iter().enumerate() {
        let row = &mut out[b * dim..(b + 1) * dim];
        for i in 0..half {
            let a = tv * freqs[i];
            let (s, c) = (a.sin(), a.cos());
            if flip_sin_to_cos {
                row[i] = c;
                row[half + i] = s;
            } else {
                row[i] = s;
                row[half + i] = c;
            }
        }
    }
    Tensor::new(vec![t.len(), dim], out)
}

/// Rows `idx` (f32-held integers, exact below 2²⁴) of a [rows, D] table.
pub fn gather(table: &Tensor, idx: &Tensor) -> Tensor {
    let d = table.last_dim();
    let rows = table.numel() / d.max(1);
    let mut out = Vec::with_capacity(idx.numel() * d);
    for &i in idx.data() {
        let i = i as usize;
        assert!(i < rows, "gather: index {i} out of {rows} rows");
        out.extend_from_slice(&table.data()[i * d..(i + 1) * d]);
    }
    Tensor::new(vec![idx.numel(), d], out)
}

pub fn activation(x: &Tensor, a: Activation) -> Tensor {
    map(x, a.scalar_fn())
}

impl Activation {
    fn scalar_fn(self) -> fn(f32) -> f32 {
        match self {
            Activation::Silu => silu1,
            Activation::Gelu => gelu1,
            Activation::QuickGelu => quick_gelu1,
            Activation::Tanh => f32::tanh,
            Activation::Relu => |v| v.max(0.0),
            Activation::Sigmoid => |v| 1.0 / (1.0 + (-v).exp()),
        }
    }
}

pub fn affine(x: &Tensor, a: f32, b: f32) -> Tensor {
    map(x, |v| a * v + b)
}

pub fn affine_clamp(x: &Tensor, a: f32, b: f32, lo: f32, hi: f32) -> Tensor {
    map(x, |v| (a * v + b).clamp(lo, hi))
}

pub fn slice_channels(x: &Tensor, start: usize, len: usize) -> Tensor {
    let c = x.last_dim();
    let out: Vec<f32> = x
        .data()
        .chunks(c)
        .flat_map(|row| row[start..start + len].iter().copied())
        .collect();
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = len;
    Tensor::new(shape, out)
}

pub fn lincomb(terms: &[(&Tensor, f32)]) -> Tensor {
    let mut out: Vec<f32> = terms[0].0.data().iter().map(|v| terms[0].1 * v).collect();
    for (t, c) in &terms[1..] {
        for (o, v) in out.iter_mut().zip(t.data()) {
            *o += c * v;
        }
    }
    Tensor::new(terms[0].0.shape().to_vec(), out)
}

pub fn cfg_combine(pred: &Tensor, guidance: f32) -> Tensor {
    let n = pred.shape()[0] / 2;
    let (u, c) = (pred.narrow0(0, n), pred.narrow0(n, n));
    add_scaled(&u, &add_scaled(&c, &u, -1.0), guidance)
}

pub fn mask_mix(a: &Tensor, b: &Tensor, mask: &Tensor) -> Tensor {
    let c = a.last_dim();
    let out = a
        .data()
        .chunks(c)
        .zip(b.data().chunks(c))
        .zip(mask.data())
        .flat_map(|((pa, pb), m)| pa.iter().zip(pb).map(move |(x, y)| (1.0 - m) * x + m * y))
        .collect();
    Tensor::new(a.shape().to_vec(), out)
}

pub fn gauss_sample(mean: &Tensor, logvar: &Tensor, noise: &Tensor, scale: f32) -> Tensor {
    let out = mean
        .data()
        .iter()
        .zip(logvar.data())
        .zip(noise.data())
        .map(|((m, lv), e)| scale * (m + (0.5 * lv.clamp(-30.0, 20.0)).exp() * e))
        .collect();
    Tensor::new(mean.shape().to_vec(), out)
}

/// SAM's attention with decomposed relative positions (transformers' `SamVisionAttention`): q, k,
/// v [B, gh·gw, heads·D] over a gh×gw token grid; per head the logits are
/// `scale·q·k + q·rel_h[qy − ky + gh − 1] + q·rel_w[qx − kx + gw − 1]` with the UNSCALED query in
/// the relative terms, `rel_h` [2·gh − 1, D] and `rel_w` [2·gw − 1, D] already resized to the grid.
pub fn rel_pos_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    grid: (usize, usize),
    rel_h: &Tensor,
    rel_w: &Tensor,
) -> Tensor {
    let (b, l, hd) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let (gh, gw) = grid;
    let d = hd / heads;
    let scale = 1.0 / (d as f32).sqrt();
    let (qd, kd, vd) = (q.data(), k.data(), v.data());
    let (rh, rw) = (rel_h.data(), rel_w.data());
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let mut out = vec![0.0f32; b * l * hd];
    // One task per (batch, query token); it writes that token's row of every head.
    out.par_chunks_mut(hd).enumerate().for_each(|(row, o)| {
        let (bi, i) = (row / l, row % l);
        let (qy, qx) = (i / gw, i % gw);
        let mut s = vec![0.0f32; l];
        for h in 0..heads {
            let qr = &qd[row * hd + h * d..][..d];
            let th: Vec<f32> = (0..gh)
                .map(|ky| dot(qr, &rh[(qy + gh - 1 - ky) * d..][..d]))
                .collect();
            let tw: Vec<f32> = (0..gw)
                .map(|kx| dot(qr, &rw[(qx + gw - 1 - kx) * d..][..d]))
                .collect();
            let mut mx = f32::NEG_INFINITY;
            for (j, sj) in s.iter_mut().enumerate() {
                let kr = &kd[(bi * l + j) * hd + h * d..][..d];
                *sj = scale * dot(qr, kr) + th[j / gw] + tw[j % gw];
                mx = mx.max(*sj);
            }
            let mut sum = 0.0f32;
            for sj in s.iter_mut() {
                *sj = (*sj - mx).exp();
                sum += *sj;
            }
            let oh = &mut o[h * d..(h + 1) * d];
            for (j, sj) in s.iter().enumerate() {
                let p = sj / sum;
                let vr = &vd[(bi * l + j) * hd + h * d..][..d];
                for (x, y) in oh.iter_mut().zip(vr) {
                    *x += p * y;
                }
            }
        }
    });
    Tensor::new(vec![b, l, hd], out)
}
