//! The operations the models need and nothing more, on host or device tensors. Models call these
//! functions and never look at storage; each op runs where its input lives: the f32 CPU reference
//! (`cpu`) or, with the `cuda` or `emu` feature, the GPU (`cuda`: a CUDA device or the software GPU).

pub mod cpu;
/// The GPU backend: the CUDA driver (`cuda` feature) and the software device (`emu` feature)
/// behind one device interface.
#[cfg(feature = "gpu")]
pub mod cuda;
pub mod fault;
pub mod layer;
pub mod libs;
pub mod pool;
pub mod tensor;

use crate::tensor::Tensor;
use anyhow::{bail, Result};
pub use cpu::silu1;
pub use layer::{Activation, Conv2dW, LinearW};

/// Where models keep their weights and run.
#[derive(Clone, Debug)]
pub enum Device {
    Cpu,
    #[cfg(feature = "gpu")]
    /// A GPU: a CUDA device or the software device.
    Gpu(std::sync::Arc<cuda::Gpu>),
}

impl Device {
    /// `cpu`, `cuda` (device 0), `cuda:N` or `emu` (the software GPU: the CUDA backend's own
    /// code and kernels on the CPU, for tests). `bf16` picks bf16 storage on a GPU (for bf16
    /// checkpoints), else fp16.
    pub fn open(spec: &str, bf16: bool) -> Result<Device> {
        if spec == "cpu" {
            return Ok(Device::Cpu);
        }
        if !(spec == "cuda" || spec == "emu" || spec.starts_with("cuda:")) {
            bail!("unknown device `{spec}` (expected cpu, cuda, cuda:N or emu)");
        }
        #[cfg(feature = "gpu")]
        {
            let dtype = if bf16 {
                cuda::DType::BF16
            } else {
                cuda::DType::F16
            };
            Ok(Device::Gpu(cuda::Gpu::open(spec, dtype)?))
        }
        #[cfg(not(feature = "gpu"))]
        {
            let _ = bf16;
            if spec == "emu" {
                bail!("device `emu`: this build has no software device; rebuild with `--features emu`")
            }
            if let Some(n) = spec.strip_prefix("cuda:") {
                if n.parse::<usize>().is_err() {
                    bail!("device `{spec}`: expected cuda:N with N a device number");
                }
            }
            bail!("device `{spec}`: this build has no CUDA backend; rebuild with `--features cuda`")
        }
    }

    /// Where a model whose config sets `force_upcast` runs. diffusers runs such VAEs (SDXL's) in
    /// f32 because fp16 overflows in their up blocks (inf, then NaN: black images); here they run
    /// in bf16, which has f32's range and every kernel, at half f32's memory traffic. The CPU is
    /// f32 already; a bf16 device is unchanged.
    pub fn upcast(&self, force_upcast: bool) -> Device {
        match self {
            #[cfg(feature = "gpu")]
            Device::Gpu(g) if force_upcast && g.dtype == cuda::DType::F16 => {
                Device::Gpu(g.with_dtype(cuda::DType::BF16))
            }
            _ => {
                let _ = force_upcast;
                self.clone()
            }
        }
    }

    /// The storage type of tensors made on this device: `f32`, `f16` or `bf16`.
    pub fn storage(&self) -> &'static str {
        match self {
            Device::Cpu => "f32",
            #[cfg(feature = "gpu")]
            Device::Gpu(g) => g.dtype.suffix(),
        }
    }

    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }

    /// A host tensor moved to this device (weights at load time, inputs at the edges).
    pub fn put(&self, t: Tensor) -> Tensor {
        match self {
            Device::Cpu => t,
            #[cfg(feature = "gpu")]
            Device::Gpu(g) => {
                let host = t.to_host().expect("host tensor");
                Tensor::from_device(host.shape().to_vec(), g.upload(host.data(), g.dtype))
            }
        }
    }

    /// Like `put`, but keeps f32 on the GPU (timesteps, scheduler state).
    pub fn put_f32(&self, t: Tensor) -> Tensor {
        match self {
            Device::Cpu => t,
            #[cfg(feature = "gpu")]
            Device::Gpu(g) => {
                let host = t.to_host().expect("host tensor");
                Tensor::from_device(
                    host.shape().to_vec(),
                    g.upload(host.data(), cuda::DType::F32),
                )
            }
        }
    }

    /// `t` in the model storage type on this device (host tensors are uploaded, f32 device
    /// tensors cast).
    pub fn put_same(&self, t: &Tensor) -> Tensor {
        match self {
            Device::Cpu => t.to_host().expect("CPU tensors are host tensors"),
            #[cfg(feature = "gpu")]
            Device::Gpu(g) => match t.dev() {
                None => self.put(t.clone()),
                Some(_) => cuda::ops::cast(t, g.dtype),
            },
        }
    }

    /// `t` as f32 on this device (the scheduler's precision).
    pub fn put_f32_same(&self, t: &Tensor) -> Tensor {
        match self {
            Device::Cpu => t.to_host().expect("CPU tensors are host tensors"),
            #[cfg(feature = "gpu")]
            Device::Gpu(_) => match t.dev() {
                None => self.put_f32(t.clone()),
                Some(_) => cuda::ops::cast(t, cuda::DType::F32),
            },
        }
    }

    /// Indices (token ids, row numbers) on this device, for `gather`.
    pub fn put_ids(&self, ids: &[u32]) -> Tensor {
        match self {
            Device::Cpu => Tensor::new(vec![ids.len()], ids.iter().map(|&i| i as f32).collect()),
            #[cfg(feature = "gpu")]
            Device::Gpu(g) => Tensor::from_device(
                vec![ids.len()],
                g.upload_i32(&ids.iter().map(|&i| i as i32).collect::<Vec<_>>()),
            ),
        }
    }

    /// Tests: fill new device allocations with NaN so unwritten outputs are caught.
    pub fn set_poison(&self, on: bool) {
        #[cfg(feature = "gpu")]
        if let Device::Gpu(g) = self {
            g.set_poison(on);
        }
        let _ = on;
    }

    /// Tests and bisection: the simple reference kernels (true) or the tuned ones (false), as
    /// `TOFFEE_KERNELS=reference|fast` picks at start. No effect on the CPU.
    pub fn set_reference_kernels(&self, on: bool) {
        #[cfg(feature = "gpu")]
        if let Device::Gpu(g) = self {
            g.set_reference(on);
        }
        let _ = on;
    }

    /// Tests: time candidate algorithms for GEMM and convolution shapes planned from now on, as
    /// `TOFFEE_AUTOTUNE=1` does from the start. No effect on the CPU.
    pub fn set_autotune(&self, on: bool) {
        #[cfg(feature = "gpu")]
        if let Device::Gpu(g) = self {
            g.set_autotune(on);
        }
        let _ = on;
    }

    /// Reports a failure recorded by device ops since the start (out of memory, failed launch).
    pub fn check(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "gpu")]
            Device::Gpu(g) => g.check(),
        }
    }

    /// Clears an out-of-memory failure (waiting for queued work and returning cached memory) so
    /// the caller can retry with a smaller batch: Ok(true) when one was cleared, Ok(false) when
    /// there was none; any other failure is returned.
    pub fn recover(&self) -> Result<bool> {
        match self {
            Device::Cpu => Ok(false),
            #[cfg(feature = "gpu")]
            Device::Gpu(g) => g.recover(),
        }
    }

    /// Waits for queued device work and reports failures.
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "gpu")]
            Device::Gpu(g) => g.synchronize(),
        }
    }

    pub fn name(&self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            #[cfg(feature = "gpu")]
            Device::Gpu(g) => g.name().to_string(),
        }
    }
}

/// Runs `$gpu` when `$t` lives on a GPU, `$cpu` otherwise.
macro_rules! dispatch {
    ($t:expr, $cpu:expr, $gpu:expr) => {{
        #[cfg(feature = "gpu")]
        if !$t.is_host() {
            return $gpu;
        }
        $cpu
    }};
}

pub fn linear(x: &Tensor, l: &LinearW) -> Tensor {
    assert_eq!(
        x.last_dim(),
        l.in_features(),
        "linear: input {:?} vs weight {:?}",
        x.shape(),
        l.weight.shape()
    );
    dispatch!(x, cpu::linear(x, l), cuda::ops::linear(x, l))
}

pub fn conv2d(x: &Tensor, c: &Conv2dW) -> Tensor {
    conv2d_fused(x, c, None, None)
}

/// x·Wᵀ + b + residual: a layer whose output joins a residual stream (the residual is cuBLASLt's
/// C on GPUs, so the sum costs no extra pass). `residual` has the output's shape.
pub fn linear_residual(x: &Tensor, l: &LinearW, residual: &Tensor) -> Tensor {
    assert_eq!(
        x.last_dim(),
        l.in_features(),
        "linear_residual: input {:?} vs weight {:?}",
        x.shape(),
        l.weight.shape()
    );
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = l.out_features();
    assert_eq!(
        residual.shape(),
        shape,
        "linear_residual: residual {:?} vs output {shape:?}",
        residual.shape()
    );
    dispatch!(
        x,
        cpu::add_scaled(&cpu::linear(x, l), residual, 1.0),
        cuda::ops::linear_residual(x, l, residual)
    )
}

/// GEGLU of a linear layer: the first half of x·Wᵀ + b times GELU of the second half (diffusers'
/// feed-forward input). On GPUs one tensor-core kernel computes both halves and the product, so
/// the 2×-wide projection never goes to memory.
pub fn linear_geglu(x: &Tensor, l: &LinearW) -> Tensor {
    assert_eq!(
        x.last_dim(),
        l.in_features(),
        "linear_geglu: input {:?} vs weight {:?}",
        x.shape(),
        l.weight.shape()
    );
    assert!(
        l.out_features().is_multiple_of(2),
        "linear_geglu: odd width {:?}",
        l.weight.shape()
    );
    dispatch!(
        x,
        cpu::glu(&cpu::linear(x, l), Activation::Gelu),
        cuda::ops::linear_geglu(x, l)
    )
}

/// conv(x) + bias + per_sample[n, c] + residual: a resnet's convolution with its time embedding
/// (`per_sample`, [N, Cout]) or its skip connection (`residual`, the output's shape) folded into
/// the output pass on GPUs.
pub fn conv2d_fused(
    x: &Tensor,
    c: &Conv2dW,
    per_sample: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Tensor {
    assert_eq!(
        x.last_dim(),
        c.in_channels(),
        "conv2d: input {:?} vs weight {:?}",
        x.shape(),
        c.weight.shape()
    );
    dispatch!(
        x,
        {
            let mut y = cpu::conv2d(x, c);
            if let Some(p) = per_sample {
                y = add_per_sample_channels(&y, p);
            }
            match residual {
                Some(r) => add(&y, r),
                None => y,
            }
        },
        cuda::ops::conv2d_fused(x, c, per_sample, residual)
    )
}

pub fn group_norm(
    x: &Tensor,
    groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    silu: bool,
) -> Tensor {
    assert!(
        x.last_dim().is_multiple_of(groups),
        "group_norm: {} channels in {groups} groups",
        x.last_dim()
    );
    dispatch!(
        x,
        cpu::group_norm(x, groups, gamma, beta, eps, silu),
        cuda::ops::group_norm(x, groups, gamma, beta, eps, silu)
    )
}

pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Tensor {
    dispatch!(
        x,
        cpu::layer_norm(x, gamma, beta, eps),
        cuda::ops::layer_norm(x, gamma, beta, eps)
    )
}

/// Scaled dot-product attention on packed heads: q [B, Lq, H·D], k and v [B, Lk, H·D].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Tensor {
    assert_eq!(k.shape(), v.shape(), "attention: k and v differ");
    assert_eq!(
        q.shape()[2],
        k.shape()[2],
        "attention: q and k widths differ"
    );
    assert_eq!(
        q.shape()[2] % heads,
        0,
        "attention: width not divisible by {heads} heads"
    );
    dispatch!(
        q,
        cpu::attention(q, k, v, heads, causal),
        cuda::ops::attention(q, k, v, heads, causal)
    )
}

pub fn silu(x: &Tensor) -> Tensor {
    Activation::Silu.apply(x)
}

impl Activation {
    pub fn apply(self, x: &Tensor) -> Tensor {
        dispatch!(x, cpu::activation(x, self), cuda::ops::activation(x, self))
    }
}

/// a·x + b.
pub fn affine(x: &Tensor, a: f32, b: f32) -> Tensor {
    dispatch!(x, cpu::affine(x, a, b), cuda::ops::affine(x, a, b))
}

pub fn scale(x: &Tensor, s: f32) -> Tensor {
    affine(x, s, 0.0)
}

/// clamp(a·x + b, lo, hi).
pub fn affine_clamp(x: &Tensor, a: f32, b: f32, lo: f32, hi: f32) -> Tensor {
    dispatch!(
        x,
        cpu::affine_clamp(x, a, b, lo, hi),
        cuda::ops::affine_clamp(x, a, b, lo, hi)
    )
}

/// The first half of the last dimension times `act` of the second half.
pub fn glu(x: &Tensor, act: Activation) -> Tensor {
    assert!(
        x.last_dim().is_multiple_of(2),
        "glu: odd width {:?}",
        x.shape()
    );
    dispatch!(x, cpu::glu(x, act), cuda::ops::glu(x, act))
}

pub fn geglu(x: &Tensor) -> Tensor {
    glu(x, Activation::Gelu)
}

pub fn add(a: &Tensor, b: &Tensor) -> Tensor {
    add_scaled(a, b, 1.0)
}

/// a + s·b
pub fn add_scaled(a: &Tensor, b: &Tensor, s: f32) -> Tensor {
    assert_eq!(a.shape(), b.shape(), "add: shapes differ");
    dispatch!(a, cpu::add_scaled(a, b, s), cuda::ops::add_scaled(a, b, s))
}

/// x [N, ..., C] + v [N, C]: a per-sample channel vector broadcast over the spatial dimensions.
pub fn add_per_sample_channels(x: &Tensor, v: &Tensor) -> Tensor {
    assert_eq!(
        v.shape(),
        [x.shape()[0], x.last_dim()],
        "add_per_sample_channels: {:?} vs {:?}",
        x.shape(),
        v.shape()
    );
    dispatch!(
        x,
        cpu::add_per_sample_channels(x, v),
        cuda::ops::add_per_sample_channels(x, v)
    )
}

/// Concatenation along the last (channel) dimension.
pub fn concat_channels(parts: &[&Tensor]) -> Tensor {
    let lead = &parts[0].shape()[..parts[0].rank() - 1];
    for p in parts {
        assert_eq!(
            &p.shape()[..p.rank() - 1],
            lead,
            "concat_channels: leading dims differ"
        );
    }
    dispatch!(
        parts[0],
        cpu::concat_channels(parts),
        cuda::ops::concat_channels(parts)
    )
}

/// Channels `start..start+len` of the last dimension.
pub fn slice_channels(x: &Tensor, start: usize, len: usize) -> Tensor {
    assert!(
        start + len <= x.last_dim(),
        "slice_channels {start}+{len} of {:?}",
        x.shape()
    );
    dispatch!(
        x,
        cpu::slice_channels(x, start, len),
        cuda::ops::slice_channels(x, start, len)
    )
}

/// Nearest-neighbour resize of NHWC with PyTorch's index rule.
pub fn upsample_nearest(x: &Tensor, out_h: usize, out_w: usize) -> Tensor {
    dispatch!(
        x,
        cpu::upsample_nearest(x, out_h, out_w),
        cuda::ops::upsample_nearest(x, out_h, out_w)
    )
}

/// [N, H, W, k·k·C] with channel (ky·k + kx)·C + c → [N, H·k, W·k, C]: the pixel shuffle that
/// turns a GEMM into a transposed convolution whose kernel equals its stride.
pub fn depth_to_space(x: &Tensor, k: usize) -> Tensor {
    assert!(
        k > 0 && x.rank() == 4 && x.last_dim().is_multiple_of(k * k),
        "depth_to_space: {:?} by {k}",
        x.shape()
    );
    dispatch!(
        x,
        cpu::depth_to_space(x, k),
        cuda::ops::depth_to_space(x, k)
    )
}

/// Batch slices (start, len) of `n` samples of `per_sample` elements each, every slice at most
/// `limit` elements where one sample allows it (single samples otherwise): 32-bit indexing limits
/// (`limit` = 2^31 - 1 on a GPU).
pub fn batch_chunks(n: usize, per_sample: usize, limit: usize) -> Vec<(usize, usize)> {
    let per_chunk = (limit / per_sample.max(1)).clamp(1, n.max(1));
    (0..n)
        .step_by(per_chunk)
        .map(|s| (s, per_chunk.min(n - s)))
        .collect()
}

/// Bilinear resize of NHWC with torch's `F.interpolate(mode="bilinear")` index rules (no
/// antialias).
pub fn resize_bilinear(x: &Tensor, out_h: usize, out_w: usize, align_corners: bool) -> Tensor {
    assert!(
        x.rank() == 4 && x.numel() > 0 && out_h > 0 && out_w > 0,
        "resize_bilinear: {:?} to {out_h}x{out_w}",
        x.shape()
    );
    dispatch!(
        x,
        cpu::resize_bilinear(x, out_h, out_w, align_corners),
        cuda::ops::resize_bilinear(x, out_h, out_w, align_corners)
    )
}

/// FiLM conditioning: mul[N, C]·x[N, ..., C] + add[N, C].
pub fn film(x: &Tensor, mul: &Tensor, add: &Tensor) -> Tensor {
    let want = [x.shape()[0], x.last_dim()];
    assert!(
        mul.shape() == want && add.shape() == want,
        "film: {:?} with {:?} and {:?}",
        x.shape(),
        mul.shape(),
        add.shape()
    );
    dispatch!(x, cpu::film(x, mul, add), cuda::ops::film(x, mul, add))
}

/// Sinusoidal embedding of f32 timesteps `t` [B] (host or device; the result lives with them).
pub fn timestep_embedding(
    t: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f32,
) -> Tensor {
    #[cfg(feature = "gpu")]
    if let Some(d) = t.dev() {
        return cuda::ops::timestep_embedding(t, dim, flip_sin_to_cos, freq_shift, d.gpu());
    }
    cpu::timestep_embedding(t.data(), dim, flip_sin_to_cos, freq_shift)
}

/// Rows `idx` of a [rows, D] table (token embeddings, pooling); `idx` comes from
/// `Device::put_ids` on the table's device.
pub fn gather(table: &Tensor, idx: &Tensor) -> Tensor {
    dispatch!(
        table,
        cpu::gather(table, idx),
        cuda::ops::gather(table, idx)
    )
}

/// Σ cᵢ·tᵢ over up to four tensors of one shape.
pub fn lincomb(terms: &[(&Tensor, f32)]) -> Tensor {
    assert!(
        !terms.is_empty() && terms.len() <= 4,
        "lincomb takes 1 to 4 terms"
    );
    for (t, _) in terms {
        assert_eq!(t.shape(), terms[0].0.shape(), "lincomb: shapes differ");
    }
    dispatch!(terms[0].0, cpu::lincomb(terms), cuda::ops::lincomb(terms))
}

/// Classifier-free guidance on a [uncond; cond] batch: u + g·(c − u).
pub fn cfg_combine(pred: &Tensor, guidance: f32) -> Tensor {
    dispatch!(
        pred,
        cpu::cfg_combine(pred, guidance),
        cuda::ops::cfg_combine(pred, guidance)
    )
}

/// (1 − m)·a + m·b with a one-channel mask per pixel.
pub fn mask_mix(a: &Tensor, b: &Tensor, mask: &Tensor) -> Tensor {
    assert_eq!(a.shape(), b.shape(), "mask_mix: shapes differ");
    assert_eq!(
        mask.numel() * a.last_dim(),
        a.numel(),
        "mask_mix: mask {:?} vs {:?}",
        mask.shape(),
        a.shape()
    );
    dispatch!(
        a,
        cpu::mask_mix(a, b, mask),
        cuda::ops::mask_mix(a, b, mask)
    )
}

/// VAE posterior sample: scale·(mean + exp(½·clamp(logvar, −30, 20))·noise).
pub fn gauss_sample(mean: &Tensor, logvar: &Tensor, noise: &Tensor, scale: f32) -> Tensor {
    dispatch!(
        mean,
        cpu::gauss_sample(mean, logvar, noise, scale),
        cuda::ops::gauss_sample(mean, logvar, noise, scale)
    )
}

/// SAM's vision attention with decomposed relative positions: q, k, v [B, gh·gw, heads·D] over a
/// gh×gw token grid, `rel_h` [2·gh − 1, D], `rel_w` [2·gw − 1, D] (already resized to the grid).
/// Logits: `q·k/√D + q·rel_h[qy − ky + gh − 1] + q·rel_w[qx − kx + gw − 1]`, unscaled q in the
/// relative terms (transformers' `add_decomposed_rel_pos`).
pub fn rel_pos_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    grid: (usize, usize),
    rel_h: &Tensor,
    rel_w: &Tensor,
) -> Tensor {
    let (gh, gw) = grid;
    assert_eq!(q.shape(), k.shape(), "rel_pos_attention: q and k differ");
    assert_eq!(k.shape(), v.shape(), "rel_pos_attention: k and v differ");
    assert_eq!(q.shape()[1], gh * gw, "rel_pos_attention: tokens vs grid");
    assert_eq!(
        q.shape()[2] % heads,
        0,
        "rel_pos_attention: width not divisible by {heads} heads"
    );
    let d = q.shape()[2] / heads;
    assert_eq!(rel_h.shape(), [2 * gh - 1, d], "rel_pos_attention: rel_h");
    assert_eq!(rel_w.shape(), [2 * gw - 1, d], "rel_pos_attention: rel_w");
    dispatch!(
        q,
        cpu::rel_pos_attention(q, k, v, heads, grid, rel_h, rel_w),
        cuda::ops::rel_pos_attention(q, k, v, heads, grid, rel_h, rel_w)
    )
}
