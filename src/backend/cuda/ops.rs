//! The backend ops on device tensors (UNTESTED ON A GPU, see mod.rs). Shapes were checked by the
//! dispatching layer in backend/mod.rs; here every op allocates its output from the pool and queues
//! one or a few kernels on the Gpu's stream.

use super::{Arg, DType, DevBuf, Gpu};
use crate::backend::cpu::{Activation, Conv2dW, LinearW};
use crate::tensor::Tensor;
use cudarc::cublaslt::{Matmul, MatmulConfig};
use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};
use std::sync::Arc;

fn dev(t: &Tensor) -> &DevBuf {
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

/// A raw pool pointer seen through cudarc's slice traits, for cuBLASLt.
struct Raw<'a> {
    ptr: u64,
    len: usize,
    gpu: &'a Arc<Gpu>,
}

impl<T> DeviceSlice<T> for Raw<'_> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<cudarc::driver::CudaStream> {
        self.gpu.stream()
    }
}

impl<T> DevicePtr<T> for Raw<'_> {
    fn device_ptr<'a>(&'a self, _stream: &'a cudarc::driver::CudaStream) -> (u64, SyncOnDrop<'a>) {
        // One stream per Gpu: stream order is the only synchronisation needed.
        (self.ptr, SyncOnDrop::Sync(None))
    }
}

impl<T> DevicePtrMut<T> for Raw<'_> {
    fn device_ptr_mut<'a>(
        &'a mut self,
        _stream: &'a cudarc::driver::CudaStream,
    ) -> (u64, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Sync(None))
    }
}

/// Row-major C[m×n] = A[m×k] · B + bias[n], where B is W[n×k] (`b_transposed`, a linear layer's
/// weight) or W[k×n] (a convolution's [kh·kw·cin, cout] weight). fp32 accumulation.
#[allow(clippy::too_many_arguments)]
fn gemm(
    a: &DevBuf,
    m: usize,
    k: usize,
    w: &DevBuf,
    n: usize,
    b_transposed: bool,
    bias: Option<&DevBuf>,
    c: &DevBuf,
) {
    let g = a.gpu();
    if g.failed() || m == 0 {
        return;
    }
    // cuBLASLt is column-major: compute Cᵀ[n×m] = op(W)·Aᵀ.
    let cfg = MatmulConfig {
        transa: b_transposed,
        transb: false,
        transc: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        alpha: 1.0,
        lda: if b_transposed { k as i64 } else { n as i64 },
        ldb: k as i64,
        beta: 0.0,
        ldc: n as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    let wa = Raw {
        ptr: w.ptr(),
        len: w.len,
        gpu: g,
    };
    let xb = Raw {
        ptr: a.ptr(),
        len: a.len,
        gpu: g,
    };
    let mut cc = Raw {
        ptr: c.ptr(),
        len: c.len,
        gpu: g,
    };
    let bias_raw = bias.map(|b| Raw {
        ptr: b.ptr(),
        len: b.len,
        gpu: g,
    });
    // Safety: the three matrices and the bias have the extents given in cfg (checked by callers).
    let r = unsafe {
        match a.dtype {
            DType::I32 => {
                g.fail("integer GEMM");
                return;
            }
            DType::F16 => Matmul::<half::f16>::matmul(
                g.blas(),
                cfg,
                &wa,
                &xb,
                &mut cc,
                bias_raw.as_ref(),
                None,
            ),
            DType::BF16 => Matmul::<half::bf16>::matmul(
                g.blas(),
                cfg,
                &wa,
                &xb,
                &mut cc,
                bias_raw.as_ref(),
                None,
            ),
            DType::F32 => {
                Matmul::<f32>::matmul(g.blas(), cfg, &wa, &xb, &mut cc, bias_raw.as_ref(), None)
            }
        }
    };
    if let Err(e) = r {
        g.fail(format!("cuBLASLt matmul {m}×{k}·{k}×{n}: {e:?}"));
    }
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
        &o,
    );
    t
}

pub fn conv2d(x: &Tensor, c: &Conv2dW) -> Tensor {
    let (n, h, w, cin) = x.dims4();
    let k = c.kernel;
    let [pt, pb, pl, pr] = c.pad;
    let ho = (h + pt + pb - k) / c.stride + 1;
    let wo = (w + pl + pr - k) / c.stride + 1;
    let cout = c.out_channels();
    // cuDNN descriptors and our kernels index with 32 bits: a batch past 2^31 elements in any
    // operand (SDXL's VAE decode at 1024², batch 8) runs as smaller batches, not through a
    // tens-of-GB im2col buffer.
    let im2col = if k > 1 { ho * wo * k * k * cin } else { 0 };
    let chunks = crate::backend::batch_chunks(n, (h * w * cin).max(ho * wo * cout).max(im2col));
    if chunks.len() > 1 {
        let parts: Vec<Tensor> = chunks
            .iter()
            .map(|&(start, len)| conv2d(&x.narrow0(start, len), c))
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
    let symmetric = pt == pb && pl == pr;
    if k > 1 && c.krsc && symmetric {
        if let Some(h) = g.cudnn() {
            if cudnn_conv(&h.lock().unwrap().0, x, c, &o, (ho, wo)) {
                if let Some(b) = &c.bias {
                    let total = o.len;
                    g.launch(
                        &name("add_broadcast", o.dtype),
                        grid(total),
                        256,
                        &[
                            Arg::P(o.ptr()),
                            Arg::P(dev(b).ptr()),
                            Arg::P(o.ptr()),
                            Arg::L(total as i64),
                            Arg::L(total as i64),
                            Arg::I(cout as i32),
                            Arg::I(1),
                        ],
                    );
                }
                return t;
            }
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
        &o,
    );
    t
}

/// NHWC fp16/bf16 convolution through cuDNN (fp32 accumulation). Returns false when cuDNN refuses
/// the configuration, so the caller falls back to im2col.
fn cudnn_conv(
    h: &Arc<cudarc::cudnn::Cudnn>,
    x: &Tensor,
    c: &Conv2dW,
    o: &DevBuf,
    (ho, wo): (usize, usize),
) -> bool {
    use cudarc::cudnn::sys::{cudnnConvolutionMode_t, cudnnMathType_t, cudnnTensorFormat_t};
    let (n, hh, ww, cin) = x.dims4();
    let xd = dev(x);
    let g = xd.gpu();
    let cout = c.out_channels();
    let k = c.kernel as i32;
    let nhwc = cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
    let ci = |v: usize| v as i32;
    macro_rules! run {
        ($t:ty) => {{
            let r = (|| -> Result<(), cudarc::cudnn::CudnnError> {
                let xdsc = h.create_4d_tensor::<$t>(nhwc, [ci(n), ci(cin), ci(hh), ci(ww)])?;
                let wdsc = h.create_4d_filter::<$t>(nhwc, [ci(cout), ci(cin), k, k])?;
                let ydsc = h.create_4d_tensor::<$t>(nhwc, [ci(n), ci(cout), ci(ho), ci(wo)])?;
                let mut conv = h.create_conv2d::<f32>(
                    [ci(c.pad[0]), ci(c.pad[2])],
                    [ci(c.stride), ci(c.stride)],
                    [1, 1],
                    cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                )?;
                conv.set_math_type(cudnnMathType_t::CUDNN_TENSOR_OP_MATH)?;
                let op = cudarc::cudnn::ConvForward {
                    conv: &conv,
                    x: &xdsc,
                    w: &wdsc,
                    y: &ydsc,
                };
                let algo = op.pick_algorithm()?;
                let ws_bytes = op.get_workspace_size(algo)?;
                let ws = g.alloc(ws_bytes.div_ceil(4).max(1), DType::F32);
                if g.failed() {
                    // No workspace: nothing may launch (see `conv2d`).
                    return Ok(());
                }
                let mut wsr = Raw {
                    ptr: ws.ptr(),
                    len: ws_bytes,
                    gpu: g,
                };
                let xr = Raw {
                    ptr: xd.ptr(),
                    len: xd.len,
                    gpu: g,
                };
                let wr = Raw {
                    ptr: dev(&c.weight).ptr(),
                    len: dev(&c.weight).len,
                    gpu: g,
                };
                let mut yr = Raw {
                    ptr: o.ptr(),
                    len: o.len,
                    gpu: g,
                };
                let one = <$t>::from_f32(1.0);
                let zero = <$t>::from_f32(0.0);
                // Safety: descriptors match the buffers' extents and layouts.
                unsafe { op.launch(algo, Some(&mut wsr), (one, zero), &xr, &wr, &mut yr) }
            })();
            r
        }};
    }
    let r = match xd.dtype {
        DType::F16 => run!(half::f16),
        DType::BF16 => run!(half::bf16),
        DType::F32 | DType::I32 => return false,
    };
    r.is_ok()
}

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
    let (t, o) = out(xd, x.shape().to_vec());
    xd.gpu().launch(
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
    t
}

pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Tensor {
    let c = x.last_dim();
    let rows = x.numel() / c;
    let xd = dev(x);
    let (t, o) = out(xd, x.shape().to_vec());
    xd.gpu().launch(
        &name("layer_norm", xd.dtype),
        (rows as u32, 1),
        256,
        &[
            Arg::P(xd.ptr()),
            Arg::P(dev(gamma).ptr()),
            Arg::P(dev(beta).ptr()),
            Arg::P(o.ptr()),
            Arg::I(c as i32),
            Arg::F(eps),
        ],
    );
    t
}

pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Tensor {
    let (b, lq, hd) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let lk = k.shape()[1];
    let d = hd / heads;
    let qd = dev(q);
    let g = qd.gpu();
    let (t, o) = out(qd, vec![b, lq, hd]);
    if ![40, 64, 80, 128, 160].contains(&d) {
        attention_any(q, k, v, heads, causal, &o, |_| {});
        return t;
    }
    let rows_per_block = 16;
    g.launch(
        &format!("flash_attention_d{d}_{}", qd.dtype.suffix()),
        (lq.div_ceil(rows_per_block) as u32, (b * heads) as u32),
        128,
        &[
            Arg::P(qd.ptr()),
            Arg::P(dev(k).ptr()),
            Arg::P(dev(v).ptr()),
            Arg::P(o.ptr()),
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
    t
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
