//! The building blocks diffusers' UNet, ControlNet and VAE share: resnets, attention, spatial
//! transformers, down/up sampling and the timestep embedding. Activations are NHWC; token layouts
//! are [B, L, C], so an NHWC map is a token sequence after a free reshape.

use super::nn::{GroupNorm, LayerNorm};
use crate::backend::{self as ops, Conv2dW, LinearW};
use crate::tensor::Tensor;
use crate::weights::Vb;
use anyhow::Result;

/// diffusers' ResnetBlock2D with the default ("default") time-embedding handling.
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2dW,
    time_emb_proj: Option<LinearW>,
    norm2: GroupNorm,
    conv2: Conv2dW,
    conv_shortcut: Option<Conv2dW>,
    output_scale: f32,
}

impl ResnetBlock {
    pub fn load(
        vb: &Vb,
        cin: usize,
        cout: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
        output_scale: f64,
    ) -> Result<Self> {
        Ok(ResnetBlock {
            norm1: GroupNorm::load(&vb.pp("norm1"), groups, cin, eps)?,
            conv1: vb.pp("conv1").conv2d(cin, cout, 3, 1, 1)?,
            time_emb_proj: temb
                .map(|t| vb.pp("time_emb_proj").linear(t, cout, true))
                .transpose()?,
            norm2: GroupNorm::load(&vb.pp("norm2"), groups, cout, eps)?,
            conv2: vb.pp("conv2").conv2d(cout, cout, 3, 1, 1)?,
            conv_shortcut: if cin != cout {
                Some(vb.pp("conv_shortcut").conv2d(cin, cout, 1, 1, 0)?)
            } else {
                None
            },
            output_scale: output_scale as f32,
        })
    }

    /// `temb_act` is SiLU(temb), computed once per UNet call by the caller.
    pub fn forward(&self, x: &Tensor, temb_act: Option<&Tensor>) -> Tensor {
        let temb = match (&self.time_emb_proj, temb_act) {
            (Some(p), Some(t)) => Some(ops::linear(t, p)),
            _ => None,
        };
        let h = ops::conv2d_fused(
            &self.norm1.forward_silu(x),
            &self.conv1,
            temb.as_ref(),
            None,
        );
        let skip = match &self.conv_shortcut {
            Some(c) => ops::conv2d(x, c),
            None => x.clone(),
        };
        let out = ops::conv2d_fused(&self.norm2.forward_silu(&h), &self.conv2, None, Some(&skip));
        if self.output_scale == 1.0 {
            out
        } else {
            ops::scale(&out, 1.0 / self.output_scale)
        }
    }
}

/// The image-prompt branches of one UNet call (IP-Adapter, Toffee adapter): per attached adapter,
/// its projected tokens [B, T, cross] and one scale λ per cross-attention layer.
pub struct IpInput {
    pub tokens: Tensor,
    pub scales: Vec<f32>,
}

/// What a transformer block's cross-attention attends to: the text embeddings and, when adapters
/// are attached, their image tokens.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    pub text: &'a Tensor,
    pub ip: &'a [IpInput],
}

impl<'a> Context<'a> {
    pub fn text(text: &'a Tensor) -> Context<'a> {
        Context { text, ip: &[] }
    }
}

/// Multi-head attention with separate q/k/v projections (diffusers' `Attention`).
pub struct Attention {
    to_q: LinearW,
    to_k: LinearW,
    to_v: LinearW,
    to_out: LinearW,
    heads: usize,
    /// Decoupled image cross-attention (diffusers' IPAdapterAttnProcessor2_0): one (to_k_ip,
    /// to_v_ip) pair per attached adapter, and this layer's index in attention-processor order
    /// (which per-layer scale applies).
    ip: Vec<(LinearW, LinearW)>,
    ip_index: usize,
}

impl Attention {
    /// `ctx_dim` is the width of the keys' source (the query width for self-attention).
    pub fn load(vb: &Vb, dim: usize, ctx_dim: usize, heads: usize, qkv_bias: bool) -> Result<Self> {
        Ok(Attention {
            to_q: vb.pp("to_q").linear(dim, dim, qkv_bias)?,
            to_k: vb.pp("to_k").linear(ctx_dim, dim, qkv_bias)?,
            to_v: vb.pp("to_v").linear(ctx_dim, dim, qkv_bias)?,
            to_out: vb.pp("to_out.0").linear(dim, dim, true)?,
            heads,
            ip: Vec::new(),
            ip_index: 0,
        })
    }

    /// `residual`, when given, is added by `to_out`'s GEMM (no separate pass on GPUs).
    pub fn forward(&self, x: &Tensor, ctx: Option<&Tensor>, residual: Option<&Tensor>) -> Tensor {
        let c = ctx.unwrap_or(x);
        let q = ops::linear(x, &self.to_q);
        let k = ops::linear(c, &self.to_k);
        let v = ops::linear(c, &self.to_v);
        self.out(&ops::attention(&q, &k, &v, self.heads, false), residual)
    }

    fn out(&self, a: &Tensor, residual: Option<&Tensor>) -> Tensor {
        match residual {
            Some(r) => ops::linear_residual(a, &self.to_out, r),
            None => ops::linear(a, &self.to_out),
        }
    }

    /// Cross-attention to the text plus, per adapter, λ·attention(q, K_ip, V_ip) before `to_out`
    /// (a branch with λ = 0 is skipped, as diffusers does, so it changes nothing).
    pub fn forward_cross(&self, x: &Tensor, ctx: Context, residual: Option<&Tensor>) -> Tensor {
        let q = ops::linear(x, &self.to_q);
        let k = ops::linear(ctx.text, &self.to_k);
        let v = ops::linear(ctx.text, &self.to_v);
        let mut a = ops::attention(&q, &k, &v, self.heads, false);
        for (branch, (k_ip, v_ip)) in ctx.ip.iter().zip(&self.ip) {
            let s = branch.scales[self.ip_index];
            if s == 0.0 {
                continue;
            }
            let ki = ops::linear(&branch.tokens, k_ip);
            let vi = ops::linear(&branch.tokens, v_ip);
            a = ops::add_scaled(&a, &ops::attention(&q, &ki, &vi, self.heads, false), s);
        }
        self.out(&a, residual)
    }

    /// (query width, key source width) of this layer: what an adapter's to_k_ip must map.
    pub fn dims(&self) -> (usize, usize) {
        (self.to_q.out_features(), self.to_k.in_features())
    }

    /// Attaches one adapter's projections for this layer (index `index` in processor order).
    pub fn push_ip(&mut self, index: usize, k: LinearW, v: LinearW) {
        self.ip_index = index;
        self.ip.push((k, v));
    }

    /// Removes every attached adapter.
    pub fn clear_ip(&mut self) {
        self.ip.clear();
    }
}

/// BasicTransformerBlock: self-attention, cross-attention, GEGLU feed-forward, pre-LayerNorm.
pub struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    pub attn2: Attention,
    norm3: LayerNorm,
    ff_in: LinearW,
    ff_out: LinearW,
}

impl TransformerBlock {
    pub fn load(vb: &Vb, dim: usize, heads: usize, ctx_dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(TransformerBlock {
            norm1: LayerNorm::load(&vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(&vb.pp("attn1"), dim, dim, heads, false)?,
            norm2: LayerNorm::load(&vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(&vb.pp("attn2"), dim, ctx_dim, heads, false)?,
            norm3: LayerNorm::load(&vb.pp("norm3"), dim, 1e-5)?,
            ff_in: vb.pp("ff.net.0.proj").linear(dim, inner * 2, true)?,
            ff_out: vb.pp("ff.net.2").linear(inner, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor, ctx: Context) -> Tensor {
        let x = self.attn1.forward(&self.norm1.forward(x), None, Some(x));
        let x = self
            .attn2
            .forward_cross(&self.norm2.forward(&x), ctx, Some(&x));
        ops::linear_residual(
            &ops::linear_geglu(&self.norm3.forward(&x), &self.ff_in),
            &self.ff_out,
            &x,
        )
    }
}

/// Transformer2DModel on continuous (spatial) input. proj_in/proj_out are 1×1 convolutions or
/// linear layers depending on `use_linear_projection`; on NHWC both are the same channel matmul.
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: LinearW,
    pub blocks: Vec<TransformerBlock>,
    proj_out: LinearW,
}

impl SpatialTransformer {
    pub fn load(
        vb: &Vb,
        channels: usize,
        heads: usize,
        layers: usize,
        ctx_dim: usize,
        groups: usize,
    ) -> Result<Self> {
        Ok(SpatialTransformer {
            norm: GroupNorm::load(&vb.pp("norm"), groups, channels, 1e-6)?,
            proj_in: vb.pp("proj_in").linear(channels, channels, true)?,
            blocks: (0..layers)
                .map(|i| {
                    TransformerBlock::load(
                        &vb.pp(format!("transformer_blocks.{i}")),
                        channels,
                        heads,
                        ctx_dim,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: vb.pp("proj_out").linear(channels, channels, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor, ctx: Context) -> Tensor {
        let (n, h, w, c) = x.dims4();
        let mut t = ops::linear(&self.norm.forward(x), &self.proj_in).reshape(vec![n, h * w, c]);
        for b in &self.blocks {
            t = b.forward(&t, ctx);
        }
        ops::linear_residual(&t, &self.proj_out, &x.reshape(vec![n, h * w, c]))
            .reshape(vec![n, h, w, c])
    }
}

/// The VAE's single-head spatial self-attention with its own GroupNorm and a residual.
pub struct VaeAttention {
    norm: GroupNorm,
    attn: Attention,
}

impl VaeAttention {
    pub fn load(vb: &Vb, channels: usize, groups: usize, eps: f64) -> Result<Self> {
        Ok(VaeAttention {
            norm: GroupNorm::load(&vb.pp("group_norm"), groups, channels, eps)?,
            attn: Attention::load(vb, channels, channels, 1, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (n, h, w, c) = x.dims4();
        let t = self.norm.forward(x).reshape(vec![n, h * w, c]);
        self.attn
            .forward(&t, None, Some(&x.reshape(vec![n, h * w, c])))
            .reshape(vec![n, h, w, c])
    }
}

/// Stride-2 3×3 convolution. diffusers' `padding=0` variant (VAE encoder) pads right and bottom by one.
pub fn load_downsample(vb: &Vb, channels: usize, padding: usize) -> Result<Conv2dW> {
    let mut c = vb.pp("conv").conv2d(channels, channels, 3, 2, padding)?;
    if padding == 0 {
        c.pad = [0, 1, 0, 1];
    }
    Ok(c)
}

/// Nearest-neighbour upsampling to `size` (twice the input unless a skip connection says otherwise), then a 3×3 conv.
pub fn upsample(x: &Tensor, conv: &Conv2dW, size: Option<(usize, usize)>) -> Tensor {
    let (_, h, w, _) = x.dims4();
    let (oh, ow) = size.unwrap_or((h * 2, w * 2));
    ops::conv2d(&ops::upsample_nearest(x, oh, ow), conv)
}

/// Sinusoidal projection + TimestepEmbedding MLP (linear, SiLU, linear).
pub struct TimestepEmbedding {
    pub linear_1: LinearW,
    pub linear_2: LinearW,
}

impl TimestepEmbedding {
    pub fn load(vb: &Vb, cin: usize, cout: usize) -> Result<Self> {
        Ok(TimestepEmbedding {
            linear_1: vb.pp("linear_1").linear(cin, cout, true)?,
            linear_2: vb.pp("linear_2").linear(cout, cout, true)?,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        ops::linear(&ops::silu(&ops::linear(x, &self.linear_1)), &self.linear_2)
    }
}
