//! The backend ops on device tensors (UNTESTED ON A GPU, see mod.rs). Shapes were checked by the
//! dispatching layer in backend/mod.rs; here every op allocates its output from the pool and queues
//! one or a few kernels on the Gpu's stream.

use super::gemm;
use super::{Arg, DType, DevBuf, Gpu};
use crate::backend::cpu::{Activation, Conv2dW, LinearW};
use crate::tensor::Tensor;
use std::sync::Arc;

pub(super) fn dev(t: &Tensor) -> &DevBuf {
    t.dev().expect("a device tensor")
}

fn out(like: &DevBuf, shape: Vec<usize>) -> (Tensor, DevBuf) {
    let n = shape.iter().product();
    let b = like.gpu().alloc(n, like.dtype);
    (Tensor::from_device(shape, b.clone()), b)
}

fn name(base: &str, dtype: DType) -> String {
    format!("{base}_{}", dtype.suffix())
}

/// Grid for a grid-stride elementwise kernel over `n` elements.
fn grid(n: usize) -> (u32, u32) {
    (n.div_ceil(256).clamp(1, 65535) as u32, 1)
}

/// Row-major C[m×n] = A[m×k] · B + bias[n] (+ residual[m×n]), where B is W[n×k]
/// (`b_transposed`, a linear layer's weight) or W[k×n] (a convolution's [kh·kw·cin, cout]
/// weight). fp32 accumulation; bias and residual ride in cuBLASLt's epilogue.
#[allow(clippy::too_many_arguments)]
fn gemm(
    a: &DevBuf,
    m: usize,
    k: usize,
    w: &DevBuf,
    n: usize,
    b_transposed: bool,
    bias: Option<&DevBuf>,
    residual: Option<&DevBuf>,
    c: &DevBuf,
) {
    let g = a.gpu();
    if g.failed() || m == 0 {
        return;
    }
    if a.dtype == DType::I32 {
        g.fail("integer GEMM");
        return;
    }
    // cuBLASLt is column-major: compute Cᵀ[n×m] = op(W)·Aᵀ.
    let shape = gemm::Shape {
        dtype: a.dtype,
        out_f32: false,
        transa: b_transposed,
        transb: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        lda: if b_transposed { k as i64 } else { n as i64 },
        ldb: k as i64,
        ldc: n as i64,
        batch: None,
        bias: bias.is_some(),
    };
    g.gemm(
        &shape,
        &gemm::Operands {
            a: w.ptr(),
            b: a.ptr(),
            c: residual.map(|r| r.ptr()),
            d: c.ptr(),
            bias: bias.map(|b| b.ptr()),
            alpha: 1.0,
        },
    );
}

pub fn linear(x: &Tensor, l: &LinearW) -> Tensor {
    let (k, n) = (l.in_features(), l.out_features());
    let m = x.numel() / k;
    let xd = dev(x);
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = n;
    let (t, o) = out(xd, shape);
    gemm(
        xd,
        m,
        k,
        dev(&l.weight),
        n,
        true,
        l.bias.as_ref().map(dev),
        None,
        &o,
    );
    t
}

pub fn conv2d(x: &Tensor, c: &Conv2dW) -> Tensor {
    conv2d_fused(x, c, None, None)
}

/// conv(x) + bias + per_sample[n, c] + residual with the extra terms in the output pass: cuBLASLt's
/// epilogue on the GEMM paths, one `conv_epilogue` pass after cuDNN (instead of one per term).
pub fn conv2d_fused(
    x: &Tensor,
    c: &Conv2dW,
    per_sample: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Tensor {
    if dev(x).gpu().reference() && (per_sample.is_some() || residual.is_some()) {
        // One op per term, so a device run can bisect the fused epilogue.
        let mut y = conv2d_fused(x, c, None, None);
        if let Some(p) = per_sample {
            y = add_per_sample_channels(&y, p);
        }
        return match residual {
            Some(r) => add_scaled(&y, r, 1.0),
            None => y,
        };
    }
    let [pt, pb, pl, pr] = c.pad;
    let library =
        c.kernel > 1 && c.krsc && pt == pb && pl == pr && dev(x).gpu().driver().has_conv();
    conv_path(x, c, per_sample, residual, library)
}

/// Samples per call of a convolution: cuDNN descriptors and our kernels index with 32 bits, so a
/// batch past 2^31 elements in any operand (SDXL's VAE decode at 1024², batch 8) runs as smaller
/// batches. The im2col buffer counts only on the im2col path: through the library the SD VAE
/// decode at 512², batch 8, is one call per convolution.
pub fn conv_batch_chunks(
    n: usize,
    (h, w, cin): (usize, usize, usize),
    (ho, wo, cout): (usize, usize, usize),
    k: usize,
    library: bool,
) -> Vec<(usize, usize)> {
    let im2col = if k > 1 && !library {
        ho * wo * k * k * cin
    } else {
        0
    };
    crate::backend::batch_chunks(n, (h * w * cin).max(ho * wo * cout).max(im2col))
}

/// `conv2d_fused` through the library (cuDNN, when `library`) or im2col + GEMM.
fn conv_path(
    x: &Tensor,
    c: &Conv2dW,
    per_sample: Option<&Tensor>,
    residual: Option<&Tensor>,
    library: bool,
) -> Tensor {
    let (n, h, w, cin) = x.dims4();
    let k = c.kernel;
    let [pt, pb, pl, pr] = c.pad;
    let ho = (h + pt + pb - k) / c.stride + 1;
    let wo = (w + pl + pr - k) / c.stride + 1;
    let cout = c.out_channels();
    let chunks = conv_batch_chunks(n, (h, w, cin), (ho, wo, cout), k, library);
    if chunks.len() > 1 {
        let parts: Vec<Tensor> = chunks
            .iter()
            .map(|&(start, len)| {
                conv_path(
                    &x.narrow0(start, len),
                    c,
                    per_sample.map(|p| p.narrow0(start, len)).as_ref(),
                    residual.map(|r| r.narrow0(start, len)).as_ref(),
                    library,
                )
            })
            .collect();
        return Tensor::cat0(&parts.iter().collect::<Vec<_>>());
    }
    let xd = dev(x);
    let g = xd.gpu();
    let (t, o) = out(xd, vec![n, ho, wo, cout]);
    // After a recorded failure (an out-of-memory allocation) the buffers are null: launching
    // cuDNN on them would turn a recoverable error into an illegal address that poisons the
    // context. The failure is reported by the next `check`.
    if g.failed() {
        return t;
    }
    let ptr = |t: Option<&Tensor>| t.map_or(0, |t| dev(t).ptr());
    if library {
        if super::conv::conv(x, c, &o) {
            let bias = c.bias.as_ref();
            if bias.is_some() || per_sample.is_some() || residual.is_some() {
                g.launch(
                    &name("conv_epilogue", o.dtype),
                    grid(o.len),
                    256,
                    &[
                        Arg::P(o.ptr()),
                        Arg::P(ptr(bias)),
                        Arg::P(ptr(per_sample)),
                        Arg::P(ptr(residual)),
                        Arg::L(o.len as i64),
                        Arg::L((ho * wo * cout) as i64),
                        Arg::I(cout as i32),
                    ],
                );
            }
            return t;
        }
        // The library refused this shape: im2col, in batches its buffer allows.
        if conv_batch_chunks(n, (h, w, cin), (ho, wo, cout), k, false).len() > 1 {
            return conv_path(x, c, per_sample, residual, false);
        }
    }
    // 1×1 convolutions are plain GEMMs; asymmetric padding (the VAE's downsampler) and machines
    // without cuDNN go through im2col.
    let rows = n * ho * wo;
    let kk = k * k * cin;
    let direct = k == 1 && c.stride == 1 && c.pad == [0; 4];
    let cols = if direct {
        xd.clone()
    } else {
        let cols = g.alloc(rows * kk, xd.dtype);
        g.launch(
            &name("im2col", xd.dtype),
            grid(rows * kk),
            256,
            &[
                Arg::P(xd.ptr()),
                Arg::P(cols.ptr()),
                Arg::I(n as i32),
                Arg::I(h as i32),
                Arg::I(w as i32),
                Arg::I(cin as i32),
                Arg::I(k as i32),
                Arg::I(c.stride as i32),
                Arg::I(pt as i32),
                Arg::I(pl as i32),
                Arg::I(ho as i32),
                Arg::I(wo as i32),
            ],
        );
        cols
    };
    // KRSC weights are [cout, kh·kw·cin]: the transposed GEMM operand, like a linear layer's.
    gemm(
        &cols,
        rows,
        kk,
        dev(&c.weight),
        cout,
        c.krsc,
        c.bias.as_ref().map(dev),
        residual.map(dev),
        &o,
    );
    match per_sample {
        // Only without cuDNN (or for 1×1 convolutions, which no model conditions on time).
        Some(p) => add_per_sample_channels(&t, p),
        None => t,
    }
}

/// GEGLU(x·Wᵀ + b) in one tensor-core kernel (kernels/gemm_geglu.cu) when its preconditions hold
/// (widths multiples of 8, a bias, 16-byte aligned operands); else cuBLASLt then `glu`.
pub fn linear_geglu(x: &Tensor, l: &LinearW) -> Tensor {
    let (k, n2) = (l.in_features(), l.out_features());
    let n = n2 / 2;
    let m = x.numel() / k;
    let xd = dev(x);
    let g = xd.gpu();
    let fused = !g.reference()
        && m > 0
        && k.is_multiple_of(8)
        && n.is_multiple_of(8)
        && l.bias.is_some()
        && [xd.ptr(), dev(&l.weight).ptr()]
            .iter()
            .chain(l.bias.as_ref().map(|b| dev(b).ptr()).iter())
            .all(|p| p % 16 == 0);
    if !fused {
        return glu(&linear(x, l), Activation::Gelu);
    }
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = n;
    let (t, o) = out(xd, shape);
    let es = xd.dtype.size() as u64;
    // grid.y is one 128-row tile each and may not pass 65535: taller inputs run as row slices.
    for (r0, rows) in grid_y_slices(m, 128) {
        g.launch(
            &name("gemm_geglu", xd.dtype),
            (n.div_ceil(64) as u32, rows.div_ceil(128) as u32),
            256,
            &[
                Arg::P(xd.ptr() + (r0 * k) as u64 * es),
                Arg::P(dev(&l.weight).ptr()),
                Arg::P(l.bias.as_ref().map_or(0, |b| dev(b).ptr())),
                Arg::P(o.ptr() + (r0 * n) as u64 * es),
                Arg::I(rows as i32),
                Arg::I(n as i32),
                Arg::I(k as i32),
            ],
        );
    }
    t
}

/// (start, len) slices of `total` rows, `per_block` rows a grid.y block, each slice within
/// CUDA's grid.y limit of 65535 blocks.
pub fn grid_y_slices(total: usize, per_block: usize) -> Vec<(usize, usize)> {
    let step = 65535 * per_block.max(1);
    (0..total)
        .step_by(step)
        .map(|s| (s, step.min(total - s)))
        .collect()
}

/// x·Wᵀ + b + residual in one GEMM (the residual is cuBLASLt's C).
pub fn linear_residual(x: &Tensor, l: &LinearW, residual: &Tensor) -> Tensor {
    let (k, n) = (l.in_features(), l.out_features());
    let m = x.numel() / k;
    let xd = dev(x);
    if xd.gpu().reference() {
        return add_scaled(&linear(x, l), residual, 1.0);
    }
    let (t, o) = out(xd, residual.shape().to_vec());
    gemm(
        xd,
        m,
        k,
        dev(&l.weight),
        n,
        true,
        l.bias.as_ref().map(dev),
        Some(dev(residual)),
        &o,
    );
    t
}

/// GroupNorm(+SiLU): statistics split over enough blocks to fill the chip, then one vectorised
/// apply pass (kernels/norm_fast.cu); the one-block-per-group kernel (norm.cu) for
/// `TOFFEE_KERNELS=reference` and channel counts that are not a multiple of 8.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    silu: bool,
) -> Tensor {
    let c = x.last_dim();
    let n = x.shape()[0];
    let hw = x.numel() / (n * c);
    let xd = dev(x);
    let g = xd.gpu();
    let (t, o) = out(xd, x.shape().to_vec());
    if g.reference() || !c.is_multiple_of(8) || groups > 128 {
        g.launch(
            &name("group_norm", xd.dtype),
            ((n * groups) as u32, 1),
            512,
            &[
                Arg::P(xd.ptr()),
                Arg::P(dev(gamma).ptr()),
                Arg::P(dev(beta).ptr()),
                Arg::P(o.ptr()),
                Arg::I(hw as i32),
                Arg::I(c as i32),
                Arg::I(groups as i32),
                Arg::F(eps),
                Arg::I(silu as i32),
            ],
        );
        return t;
    }
    let splits = group_norm_splits(n * groups, hw * (c / groups));
    let partial = g.alloc(n * groups * splits * 3, DType::F32);
    g.launch(
        &name("group_norm_stats", xd.dtype),
        (splits as u32, (n * groups) as u32),
        256,
        &[
            Arg::P(xd.ptr()),
            Arg::P(partial.ptr()),
            Arg::I(hw as i32),
            Arg::I(c as i32),
            Arg::I(groups as i32),
            Arg::I(splits as i32),
        ],
    );
    g.launch(
        &name("group_norm_apply", xd.dtype),
        (hw.div_ceil(32) as u32, n as u32),
        256,
        &[
            Arg::P(xd.ptr()),
            Arg::P(partial.ptr()),
            Arg::P(dev(gamma).ptr()),
            Arg::P(dev(beta).ptr()),
            Arg::P(o.ptr()),
            Arg::I(hw as i32),
            Arg::I(c as i32),
            Arg::I(groups as i32),
            Arg::I(splits as i32),
            Arg::F(eps),
            Arg::I(silu as i32),
        ],
    );
    t
}

/// Blocks per (sample, group) for the statistics pass: one wave of 4 blocks on each of 132 SMs
/// (an H200) without splitting below 4096 values a block or past 32 (kernels/norm_fast.cu).
pub fn group_norm_splits(sample_groups: usize, per_group: usize) -> usize {
    let cap = (per_group / 4096).clamp(1, 32);
    (528 / sample_groups.max(1)).clamp(1, cap)
}

/// LayerNorm: one warp per row (kernels/norm_fast.cu); one block per row for
/// `TOFFEE_KERNELS=reference` and widths that are not a multiple of 8.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Tensor {
    let c = x.last_dim();
    let rows = x.numel() / c;
    let xd = dev(x);
    let g = xd.gpu();
    let (t, o) = out(xd, x.shape().to_vec());
    let args = [
        Arg::P(xd.ptr()),
        Arg::P(dev(gamma).ptr()),
        Arg::P(dev(beta).ptr()),
        Arg::P(o.ptr()),
    ];
    if g.reference() || !c.is_multiple_of(8) {
        let mut a = args.to_vec();
        a.extend([Arg::I(c as i32), Arg::F(eps)]);
        g.launch(&name("layer_norm", xd.dtype), (rows as u32, 1), 256, &a);
    } else {
        let mut a = args.to_vec();
        a.extend([Arg::I(rows as i32), Arg::I(c as i32), Arg::F(eps)]);
        g.launch(
            &name("layer_norm_warp", xd.dtype),
            (rows.div_ceil(8) as u32, 1),
            256,
            &a,
        );
    }
    t
}

/// Scaled dot-product attention. Head dims 40/64/80/128/160: the tensor-core flash kernel
/// (kernels/flash_tc.cu); other widths (the VAE's single 512-wide head, small test models):
/// cuBLASLt GEMMs around a row softmax, scores materialised per sample. `TOFFEE_KERNELS=reference`
/// runs the simple CUDA-core kernels instead (kernels/attention.cu).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Tensor {
    let (b, lq, hd) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let lk = k.shape()[1];
    let d = hd / heads;
    let qd = dev(q);
    let g = qd.gpu();
    let (t, o) = out(qd, vec![b, lq, hd]);
    let flash = super::FLASH_DIMS.contains(&d);
    if !flash {
        if g.reference() || causal {
            attention_any(q, k, v, heads, causal, &o, |_| {});
        } else {
            attention_gemm(q, k, v, heads, &o);
        }
        return t;
    }
    // cp.async moves 16-byte chunks: every row start must be 16-byte aligned.
    let aligned = [qd.ptr(), dev(k).ptr(), dev(v).ptr(), o.ptr()]
        .iter()
        .all(|p| p % 16 == 0)
        && hd.is_multiple_of(8);
    let tensor_cores = !g.reference() && aligned;
    let (kernel, rows_per_block, smem) = if tensor_cores {
        ("flash_tc", 64, super::flash_tc_smem(d))
    } else {
        ("flash_attention", 16, 0)
    };
    let es = qd.dtype.size() as u64;
    // grid.y is one (sample, head) each and may not pass 65535: more run as batch slices.
    let per = (65535 / heads).max(1);
    for (s0, samples) in (0..b).step_by(per).map(|s| (s, per.min(b - s))) {
        let (qo, ko) = ((s0 * lq * hd) as u64 * es, (s0 * lk * hd) as u64 * es);
        g.launch_smem(
            &format!("{kernel}_d{d}_{}", qd.dtype.suffix()),
            (lq.div_ceil(rows_per_block) as u32, (samples * heads) as u32),
            128,
            smem,
            &[
                Arg::P(qd.ptr() + qo),
                Arg::P(dev(k).ptr() + ko),
                Arg::P(dev(v).ptr() + ko),
                Arg::P(o.ptr() + qo),
                Arg::I(heads as i32),
                Arg::I(lq as i32),
                Arg::I(lk as i32),
                Arg::L(hd as i64),
                Arg::L(hd as i64),
                Arg::L(hd as i64),
                Arg::L(hd as i64),
                Arg::F(1.0 / (d as f32).sqrt()),
                Arg::I(causal as i32),
            ],
        );
    }
    t
}

/// Non-causal attention for any head width as GEMMs, one sample at a time, heads as a strided
/// batch: S = scale·Q·Kᵀ in f32, P = softmax(S) in the storage type, O = P·V. For wide heads (the
/// VAE's 512) this runs on tensor cores where a flash kernel would need 512 accumulators a row.
fn attention_gemm(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, o: &DevBuf) {
    let (b, lq, hd) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let lk = k.shape()[1];
    let d = hd / heads;
    let qd = dev(q);
    let g = qd.gpu();
    let es = qd.dtype.size() as u64;
    let (hh, lqq, lkk, dd, hdd) = (heads as i64, lq as i64, lk as i64, d as i64, hd as i64);
    let s = g.alloc(heads * lq * lk, DType::F32);
    let p = g.alloc(heads * lq * lk, qd.dtype);
    for i in 0..b as u64 {
        let (qo, ko) = (i * (lq * hd) as u64 * es, i * (lk * hd) as u64 * es);
        // Column-major: S_hᵀ[lk×lq] = K_h·Q_hᵀ, with K_h and Q_h read through ld = H·D.
        g.gemm(
            &gemm::Shape {
                dtype: qd.dtype,
                out_f32: true,
                transa: true,
                transb: false,
                m: lk as u64,
                n: lq as u64,
                k: d as u64,
                lda: hdd,
                ldb: hdd,
                ldc: lkk,
                batch: Some((hh as i32, dd, dd, lqq * lkk)),
                bias: false,
            },
            &gemm::Operands {
                a: dev(k).ptr() + ko,
                b: qd.ptr() + qo,
                c: None,
                d: s.ptr(),
                bias: None,
                alpha: 1.0 / (d as f32).sqrt(),
            },
        );
        g.launch(
            &name("softmax_rows_to", qd.dtype),
            ((heads * lq) as u32, 1),
            256,
            &[Arg::P(s.ptr()), Arg::P(p.ptr()), Arg::I(lk as i32)],
        );
        // O_hᵀ[d×lq] = V_hᵀ·P_hᵀ, written through ld = H·D into the packed output.
        g.gemm(
            &gemm::Shape {
                dtype: qd.dtype,
                out_f32: false,
                transa: false,
                transb: false,
                m: d as u64,
                n: lq as u64,
                k: lk as u64,
                lda: hdd,
                ldb: lkk,
                ldc: hdd,
                batch: Some((hh as i32, dd, lqq * lkk, dd)),
                bias: false,
            },
            &gemm::Operands {
                a: dev(v).ptr() + ko,
                b: p.ptr(),
                c: None,
                d: o.ptr() + qo,
                bias: None,
                alpha: 1.0,
            },
        );
    }
}

/// y = kernel(x, y, n, extra…) for the elementwise kernels whose output is shaped like the input.
fn map(x: &Tensor, kernel: &str, extra: &[Arg]) -> Tensor {
    let xd = dev(x);
    let (t, o) = out(xd, x.shape().to_vec());
    let n = x.numel();
    let mut args = vec![Arg::P(xd.ptr()), Arg::P(o.ptr()), Arg::L(n as i64)];
    args.extend_from_slice(extra);
    xd.gpu()
        .launch(&name(kernel, xd.dtype), grid(n), 256, &args);
    t
}

/// Attention for head dims without a flash kernel (the VAE's one 512-wide head, test models):
/// fp32 scores in memory, `add_bias` on them (SAM's relative positions), row softmax, then P·V.
fn attention_any(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    causal: bool,
    o: &DevBuf,
    add_bias: impl FnOnce(&DevBuf),
) {
    let (b, lq, hd) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let lk = k.shape()[1];
    let d = hd / heads;
    let qd = dev(q);
    let g = qd.gpu();
    let bh = b * heads;
    let s = g.alloc(bh * lq * lk, DType::F32);
    let ld = hd as i64;
    g.launch(
        &name("attn_scores", qd.dtype),
        ((lq * lk).div_ceil(256).clamp(1, 65535) as u32, bh as u32),
        256,
        &[
            Arg::P(qd.ptr()),
            Arg::P(dev(k).ptr()),
            Arg::P(s.ptr()),
            Arg::I(heads as i32),
            Arg::I(lq as i32),
            Arg::I(lk as i32),
            Arg::I(d as i32),
            Arg::L(ld),
            Arg::L(ld),
            Arg::F(1.0 / (d as f32).sqrt()),
            Arg::I(causal as i32),
        ],
    );
    add_bias(&s);
    g.launch(
        "softmax_rows_f32",
        ((bh * lq) as u32, 1),
        256,
        &[Arg::P(s.ptr()), Arg::I(lk as i32)],
    );
    g.launch(
        &name("attn_pv", qd.dtype),
        ((lq * d).div_ceil(256).clamp(1, 65535) as u32, bh as u32),
        256,
        &[
            Arg::P(s.ptr()),
            Arg::P(dev(v).ptr()),
            Arg::P(o.ptr()),
            Arg::I(heads as i32),
            Arg::I(lq as i32),
            Arg::I(lk as i32),
            Arg::I(d as i32),
            Arg::L(ld),
            Arg::L(ld),
        ],
    );
}

/// act(a·x + b): kind 0 SiLU, 1 GELU, 2 quick GELU, 3 identity, 4 tanh.
fn act(x: &Tensor, kind: i32, a: f32, b: f32) -> Tensor {
    map(x, "act", &[Arg::I(kind), Arg::F(a), Arg::F(b)])
}

fn act_kind(a: Activation) -> i32 {
    match a {
        Activation::Silu => 0,
        Activation::Gelu => 1,
        Activation::QuickGelu => 2,
        Activation::Tanh => 4,
        Activation::Relu => 5,
        Activation::Sigmoid => 6,
    }
}

pub fn activation(x: &Tensor, a: Activation) -> Tensor {
    act(x, act_kind(a), 1.0, 0.0)
}

pub fn affine(x: &Tensor, a: f32, b: f32) -> Tensor {
    act(x, 3, a, b)
}

pub fn affine_clamp(x: &Tensor, a: f32, b: f32, lo: f32, hi: f32) -> Tensor {
    map(
        x,
        "affine_clamp",
        &[Arg::F(a), Arg::F(b), Arg::F(lo), Arg::F(hi)],
    )
}

pub fn glu(x: &Tensor, a: Activation) -> Tensor {
    let c = x.last_dim() / 2;
    let rows = x.numel() / (2 * c);
    let xd = dev(x);
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = c;
    let (t, o) = out(xd, shape);
    xd.gpu().launch(
        &name("glu", xd.dtype),
        grid(rows * c),
        256,
        &[
            Arg::P(xd.ptr()),
            Arg::P(o.ptr()),
            Arg::L(rows as i64),
            Arg::I(c as i32),
            Arg::I(act_kind(a)),
        ],
    );
    t
}

pub fn add_scaled(a: &Tensor, b: &Tensor, s: f32) -> Tensor {
    let ad = dev(a);
    let (t, o) = out(ad, a.shape().to_vec());
    let n = a.numel();
    ad.gpu().launch(
        &name("add_scaled", ad.dtype),
        grid(n),
        256,
        &[
            Arg::P(ad.ptr()),
            Arg::P(dev(b).ptr()),
            Arg::P(o.ptr()),
            Arg::L(n as i64),
            Arg::F(s),
        ],
    );
    t
}

pub fn add_per_sample_channels(x: &Tensor, v: &Tensor) -> Tensor {
    let n = x.shape()[0];
    let c = x.last_dim();
    let per = x.numel() / n;
    let xd = dev(x);
    let (t, o) = out(xd, x.shape().to_vec());
    xd.gpu().launch(
        &name("add_broadcast", xd.dtype),
        grid(x.numel()),
        256,
        &[
            Arg::P(xd.ptr()),
            Arg::P(dev(v).ptr()),
            Arg::P(o.ptr()),
            Arg::L(x.numel() as i64),
            Arg::L(per as i64),
            Arg::I(c as i32),
            Arg::I(n as i32),
        ],
    );
    t
}

pub fn concat_channels(parts: &[&Tensor]) -> Tensor {
    let lead = &parts[0].shape()[..parts[0].rank() - 1];
    let rows: usize = lead.iter().product();
    let total: usize = parts.iter().map(|p| p.last_dim()).sum();
    let d0 = dev(parts[0]);
    let mut shape = lead.to_vec();
    shape.push(total);
    let (t, o) = out(d0, shape);
    let mut off = 0;
    for p in parts {
        let pd = dev(p);
        let c = p.last_dim();
        pd.gpu().launch(
            &name("place_channels", pd.dtype),
            grid(rows * c),
            256,
            &[
                Arg::P(pd.ptr()),
                Arg::I(c as i32),
                Arg::P(o.ptr()),
                Arg::I(total as i32),
                Arg::I(off as i32),
                Arg::L(rows as i64),
            ],
        );
        off += c;
    }
    t
}

pub fn slice_channels(x: &Tensor, start: usize, len: usize) -> Tensor {
    let c = x.last_dim();
    let rows = x.numel() / c;
    let xd = dev(x);
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = len;
    let (t, o) = out(xd, shape);
    xd.gpu().launch(
        &name("slice_channels", xd.dtype),
        grid(rows * len),
        256,
        &[
            Arg::P(xd.ptr()),
            Arg::I(c as i32),
            Arg::P(o.ptr()),
            Arg::I(len as i32),
            Arg::I(start as i32),
            Arg::L(rows as i64),
        ],
    );
    t
}

pub fn upsample_nearest(x: &Tensor, oh: usize, ow: usize) -> Tensor {
    let (n, h, w, c) = x.dims4();
    let xd = dev(x);
    let (t, o) = out(xd, vec![n, oh, ow, c]);
    xd.gpu().launch(
        &name("upsample_nearest", xd.dtype),
        grid(n * oh * ow * c),
        256,
        &[
            Arg::P(xd.ptr()),
            Arg::P(o.ptr()),
            Arg::I(n as i32),
            Arg::I(h as i32),
            Arg::I(w as i32),
            Arg::I(c as i32),
            Arg::I(oh as i32),
            Arg::I(ow as i32),
        ],
    );
    t
}

pub fn depth_to_space(x: &Tensor, k: usize) -> Tensor {
    let (n, h, w, ckk) = x.dims4();
    let c = ckk / (k * k);
    let xd = dev(x);
    let (t, o) = out(xd, vec![n, h * k, w * k, c]);
    xd.gpu().launch(
        &name("depth_to_space", xd.dtype),
        grid(x.numel()),
        256,
        &[
            Arg::P(xd.ptr()),
            Arg::P(o.ptr()),
            Arg::I(n as i32),
            Arg::I(h as i32),
            Arg::I(w as i32),
            Arg::I(c as i32),
            Arg::I(k as i32),
        ],
    );
    t
}

pub fn resize_bilinear(x: &Tensor, oh: usize, ow: usize, align_corners: bool) -> Tensor {
    let (n, h, w, c) = x.dims4();
    let xd = dev(x);
    let (t, o) = out(xd, vec![n, oh, ow, c]);
    xd.gpu().launch(
        &name("resize_bilinear", xd.dtype),
        grid(n * oh * ow * c),
        256,
        &[
            Arg::P(xd.ptr()),
            Arg::P(o.ptr()),
            Arg::I(n as i32),
            Arg::I(h as i32),
            Arg::I(w as i32),
            Arg::I(c as i32),
            Arg::I(oh as i32),
            Arg::I(ow as i32),
            Arg::I(align_corners as i32),
        ],
    );
    t
}

pub fn film(x: &Tensor, mul: &Tensor, add: &Tensor) -> Tensor {
    let n = x.shape()[0];
    let c = x.last_dim();
    let xd = dev(x);
    let (t, o) = out(xd, x.shape().to_vec());
    xd.gpu().launch(
        &name("film", xd.dtype),
        grid(x.numel()),
        256,
        &[
            Arg::P(xd.ptr()),
            Arg::P(dev(mul).ptr()),
            Arg::P(dev(add).ptr()),
            Arg::P(o.ptr()),
            Arg::L(x.numel() as i64),
            Arg::L((x.numel() / n) as i64),
            Arg::I(c as i32),
        ],
    );
    t
}

/// `t`: f32 device timesteps [B].
pub fn timestep_embedding(
    t: &Tensor,
    dim: usize,
    flip: bool,
    shift: f32,
    gpu: &Arc<Gpu>,
) -> Tensor {
    let td = dev(t);
    let b = t.numel();
    let o = gpu.alloc(b * dim, gpu.dtype);
    gpu.launch(
        &name("timestep_embedding", gpu.dtype),
        grid(b * dim),
        256,
        &[
            Arg::P(td.ptr()),
            Arg::P(o.ptr()),
            Arg::I(b as i32),
            Arg::I(dim as i32),
            Arg::I(flip as i32),
            Arg::F(shift),
        ],
    );
    Tensor::from_device(vec![b, dim], o)
}

/// Rows `idx` (an I32 device tensor) of a [rows, d] device tensor.
pub fn gather(table: &Tensor, idx: &Tensor) -> Tensor {
    let d = table.last_dim();
    let td = dev(table);
    let ids = dev(idx);
    let g = td.gpu();
    if ids.dtype != DType::I32 {
        g.fail("row indices must be i32 on the device");
    }
    let n = idx.numel();
    let (t, o) = out(td, vec![n, d]);
    g.launch(
        &name("gather_rows", td.dtype),
        grid(n * d),
        256,
        &[
            Arg::P(td.ptr()),
            Arg::P(ids.ptr()),
            Arg::P(o.ptr()),
            Arg::L(n as i64),
            Arg::I(d as i32),
        ],
    );
    t
}

/// c0·t0 + c1·t1 + … (up to four terms), in the dtype of t0.
pub fn lincomb(terms: &[(&Tensor, f32)]) -> Tensor {
    let d0 = dev(terms[0].0);
    let n = terms[0].0.numel();
    let (t, o) = out(d0, terms[0].0.shape().to_vec());
    let mut args = Vec::new();
    for i in 0..4 {
        match terms.get(i) {
            Some((x, c)) => {
                args.push(Arg::P(dev(x).ptr()));
                args.push(Arg::F(*c));
            }
            None => {
                args.push(Arg::P(0));
                args.push(Arg::F(0.0));
            }
        }
    }
    args.push(Arg::P(o.ptr()));
    args.push(Arg::L(n as i64));
    d0.gpu()
        .launch(&name("lincomb", d0.dtype), grid(n), 256, &args);
    t
}

pub fn cfg_combine(pred: &Tensor, guidance: f32) -> Tensor {
    let pd = dev(pred);
    let half = pred.numel() / 2;
    let mut shape = pred.shape().to_vec();
    shape[0] /= 2;
    let (t, o) = out(pd, shape);
    pd.gpu().launch(
        &name("cfg_combine", pd.dtype),
        grid(half),
        256,
        &[
            Arg::P(pd.ptr()),
            Arg::P(o.ptr()),
            Arg::L(half as i64),
            Arg::F(guidance),
        ],
    );
    t
}

pub fn mask_mix(a: &Tensor, b: &Tensor, mask: &Tensor) -> Tensor {
    let ad = dev(a);
    let c = a.last_dim();
    let px = a.numel() / c;
    let (t, o) = out(ad, a.shape().to_vec());
    ad.gpu().launch(
        &name("mask_mix", ad.dtype),
        grid(px * c),
        256,
        &[
            Arg::P(ad.ptr()),
            Arg::P(dev(b).ptr()),
            Arg::P(dev(mask).ptr()),
            Arg::P(o.ptr()),
            Arg::L(px as i64),
            Arg::I(c as i32),
        ],
    );
    t
}

pub fn gauss_sample(mean: &Tensor, logvar: &Tensor, noise: &Tensor, scale: f32) -> Tensor {
    let md = dev(mean);
    let n = mean.numel();
    let (t, o) = out(md, mean.shape().to_vec());
    md.gpu().launch(
        &name("gauss_sample", md.dtype),
        grid(n),
        256,
        &[
            Arg::P(md.ptr()),
            Arg::P(dev(logvar).ptr()),
            Arg::P(dev(noise).ptr()),
            Arg::P(o.ptr()),
            Arg::L(n as i64),
            Arg::F(scale),
        ],
    );
    t
}

/// The same values in another storage type.
pub fn cast(x: &Tensor, dtype: DType) -> Tensor {
    let xd = dev(x);
    if xd.dtype == dtype {
        return x.clone();
    }
    let g = xd.gpu();
    let o = g.alloc(x.numel(), dtype);
    let n = x.numel();
    let kernel = match (xd.dtype, dtype) {
        (DType::F32, DType::F16) => "cast_f32_f16",
        (DType::F32, DType::BF16) => "cast_f32_bf16",
        (DType::F16, DType::F32) => "cast_f16_f32",
        (DType::BF16, DType::F32) => "cast_bf16_f32",
        (DType::F16, DType::BF16) => "cast_f16_bf16",
        (DType::BF16, DType::F16) => "cast_bf16_f16",
        (a, b) => {
            g.fail(format!("no cast from {a:?} to {b:?}"));
            return Tensor::from_device(x.shape().to_vec(), o);
        }
    };
    g.launch(
        kernel,
        grid(n),
        256,
        &[Arg::P(xd.ptr()), Arg::P(o.ptr()), Arg::L(n as i64)],
    );
    Tensor::from_device(x.shape().to_vec(), o)
}

/// SAM's decomposed relative-position attention (see backend::rel_pos_attention): the generic
/// materialised-scores path with the relative terms added to the f32 scores (kernels/sam.cu).
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
    let qd = dev(q);
    let g = qd.gpu();
    let (t, o) = out(qd, vec![b, l, hd]);
    attention_any(q, k, v, heads, false, &o, |s| {
        g.launch(
            &name("rel_pos_bias", qd.dtype),
            (
                (l * l).div_ceil(256).clamp(1, 65535) as u32,
                (b * heads) as u32,
            ),
            256,
            &[
                Arg::P(qd.ptr()),
                Arg::P(dev(rel_h).ptr()),
                Arg::P(dev(rel_w).ptr()),
                Arg::P(s.ptr()),
                Arg::I(heads as i32),
                Arg::I(grid.0 as i32),
                Arg::I(grid.1 as i32),
                Arg::I((hd / heads) as i32),
            ],
        );
    });
    t
}

#[cfg(test)]
mod tests {
    /// Issue 23 defect: the path is chosen before the batch is split. The SD VAE decoder's widest
    /// 3×3 convolutions at 512², batch 8 (256 → 256 and 512 → 256 channels) are one call through
    /// cuDNN; only im2col's 9×-wider buffer needs 2–3 calls.
    #[test]
    fn library_convolutions_are_not_split_for_an_unused_im2col_buffer() {
        for cin in [256, 512] {
            let shape = ((512, 512, cin), (512, 512, 256));
            assert_eq!(
                super::conv_batch_chunks(8, shape.0, shape.1, 3, true),
                [(0, 8)]
            );
            let im2col = super::conv_batch_chunks(8, shape.0, shape.1, 3, false);
            assert!((2..=8).contains(&im2col.len()), "{im2col:?}");
            assert_eq!(im2col.iter().map(|c| c.1).sum::<usize>(), 8);
        }
        // SDXL's VAE at 1024²: the activations alone pass 2^31 elements at batch 8.
        let big = super::conv_batch_chunks(8, (1024, 1024, 512), (1024, 1024, 512), 3, true);
        assert!(big.len() > 1, "{big:?}");
    }

    #[test]
    fn grid_y_slices_stay_within_the_limit() {
        assert_eq!(super::grid_y_slices(128, 128), [(0, 128)]);
        let rows = 65535 * 128 + 5;
        assert_eq!(
            super::grid_y_slices(rows, 128),
            [(0, 65535 * 128), (65535 * 128, 5)]
        );
        assert!(super::grid_y_slices(0, 128).is_empty());
    }
}
