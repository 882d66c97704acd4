//! UNet2DConditionModel (SD1.x, SD2.x, SDXL; any in_channels; ControlNet residual inputs).

use super::blocks::{
    load_downsample, upsample, Attention, Context, IpInput, ResnetBlock, SpatialTransformer,
    TimestepEmbedding,
};
use super::nn::GroupNorm;
use crate::backend::Device;
use crate::backend::{self as ops, Conv2dW, LinearW};
use crate::config::Config;
use crate::tensor::Tensor;
use crate::weights::{Vb, WeightStore};
use anyhow::{bail, Result};

mod config;
pub use config::UnetConfig;

/// Conditioning of one UNet call beyond the sample.
pub struct Cond<'a> {
    /// One f32 timestep per sample ([B], fractional values allowed), on the model's device.
    pub timesteps: &'a Tensor,
    /// [B, L, D] text embeddings.
    pub context: &'a Tensor,
    /// SDXL: pooled text embeds [B, E] and time ids [B, 6].
    pub text_time: Option<(&'a Tensor, &'a Tensor)>,
    /// One entry per attached image-prompt adapter (empty without adapters).
    pub ip: &'a [IpInput],
    /// LCM-distilled UNets: the guidance-scale embedding [B, time_cond_proj_dim]
    /// (`guidance_scale_embedding`); without it `cond_proj` is skipped, as in diffusers.
    pub timestep_cond: Option<&'a Tensor>,
}

impl Cond<'_> {
    pub fn context(&self) -> Context<'_> {
        Context {
            text: self.context,
            ip: self.ip,
        }
    }
}

/// Timestep (+ SDXL text/time) embedding.
pub struct Embeddings {
    time_channels: usize,
    flip: bool,
    shift: f32,
    time: TimestepEmbedding,
    /// `time_embedding.cond_proj` (no bias) of LCM-distilled UNets.
    cond_proj: Option<LinearW>,
    add: Option<(usize, TimestepEmbedding)>,
}

impl Embeddings {
    pub fn load(vb: &Vb, c: &UnetConfig) -> Result<Self> {
        let ch = c.block_out_channels[0];
        Ok(Embeddings {
            time_channels: ch,
            flip: c.flip_sin_to_cos,
            shift: c.freq_shift as f32,
            time: TimestepEmbedding::load(&vb.pp("time_embedding"), ch, c.time_embed_dim())?,
            cond_proj: c
                .time_cond_proj_dim
                .map(|d| vb.pp("time_embedding").pp("cond_proj").linear(d, ch, false))
                .transpose()?,
            add: match c.text_time {
                None => None,
                Some((td, proj)) => Some((
                    td,
                    TimestepEmbedding::load(&vb.pp("add_embedding"), proj, c.time_embed_dim())?,
                )),
            },
        })
    }

    /// Returns (time_emb, aug_emb or None); their sum is what the resnets see.
    pub fn forward(&self, cond: &Cond) -> Result<(Tensor, Option<Tensor>)> {
        let mut t =
            ops::timestep_embedding(cond.timesteps, self.time_channels, self.flip, self.shift);
        if let (Some(proj), Some(w)) = (&self.cond_proj, cond.timestep_cond) {
            t = ops::add(&t, &ops::linear(w, proj));
        }
        let emb = self.time.forward(&t);
        let aug = match (&self.add, cond.text_time) {
            (None, None) => None,
            (None, Some(_)) => bail!(
                "this UNet has no SDXL size conditioning (addition_embed_type is not text_time): \
                 text_embeds and time_ids would be ignored"
            ),
            (Some(_), None) => bail!(
                "this UNet (addition_embed_type text_time, SDXL) needs text_embeds and time_ids"
            ),
            (Some((td, mlp)), Some((text_embeds, time_ids))) => {
                let b = cond.timesteps.numel();
                let nt = time_ids.numel() / b.max(1);
                if time_ids.shape()[0] != b || text_embeds.shape()[0] != b {
                    bail!(
                        "text_embeds {:?} and time_ids {:?} must have one row per sample ({b})",
                        text_embeds.shape(),
                        time_ids.shape()
                    );
                }
                let te = ops::timestep_embedding(
                    &time_ids.reshape(vec![time_ids.numel()]),
                    *td,
                    self.flip,
                    self.shift,
                )
                .reshape(vec![b, nt * td]);
                let add_in = ops::concat_channels(&[text_embeds, &te]);
                let want = mlp.linear_1.in_features();
                if add_in.last_dim() != want {
                    bail!(
                        "text_embeds width {} + {} time ids × {td} = {} does not match projection_class_embeddings_input_dim {want}",
                        text_embeds.last_dim(),
                        nt,
                        add_in.last_dim()
                    );
                }
                Some(mlp.forward(&add_in))
            }
        };
        Ok((emb, aug))
    }
}

/// Resnet `j` of a block (cin → cout), followed by a spatial transformer (heads, layers, context
/// width) in cross-attention blocks.
fn load_layer(
    bvb: &Vb,
    j: usize,
    cin: usize,
    cout: usize,
    attn: Option<(usize, usize, usize)>,
    c: &UnetConfig,
) -> Result<(ResnetBlock, Option<SpatialTransformer>)> {
    let r = ResnetBlock::load(
        &bvb.pp(format!("resnets.{j}")),
        cin,
        cout,
        Some(c.time_embed_dim()),
        c.norm_num_groups,
        c.norm_eps,
        1.0,
    )?;
    let a = match attn {
        Some((heads, layers, ctx)) => Some(SpatialTransformer::load(
            &bvb.pp(format!("attentions.{j}")),
            cout,
            heads,
            layers,
            ctx,
            c.norm_num_groups,
        )?),
        None => None,
    };
    Ok((r, a))
}

enum Layer {
    Resnet(Box<ResnetBlock>),
    Attn(Box<SpatialTransformer>),
}

/// One down block: resnets (each followed by a transformer in CrossAttn blocks), then an optional
/// stride-2 downsampler. Returns every intermediate as a skip connection.
pub struct DownBlock {
    layers: Vec<(ResnetBlock, Option<SpatialTransformer>)>,
    down: Option<Conv2dW>,
}

impl DownBlock {
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: Context,
        skips: &mut Vec<Tensor>,
    ) -> Tensor {
        let mut h = x.clone();
        for (r, a) in &self.layers {
            h = r.forward(&h, Some(temb));
            if let Some(a) = a {
                h = a.forward(&h, ctx);
            }
            skips.push(h.clone());
        }
        if let Some(d) = &self.down {
            h = ops::conv2d(&h, d);
            skips.push(h.clone());
        }
        h
    }
    pub fn resnets(&self) -> usize {
        self.layers.len()
    }
    pub fn has_downsampler(&self) -> bool {
        self.down.is_some()
    }
}

pub struct MidBlock {
    layers: Vec<Layer>,
}

impl MidBlock {
    pub fn load(vb: &Vb, c: &UnetConfig) -> Result<Self> {
        let ch = *c.block_out_channels.last().unwrap();
        let g = c.norm_num_groups;
        let te = c.time_embed_dim();
        let s = c.mid_block_scale_factor;
        let mut layers = vec![Layer::Resnet(Box::new(ResnetBlock::load(
            &vb.pp("resnets.0"),
            ch,
            ch,
            Some(te),
            g,
            c.norm_eps,
            s,
        )?))];
        if c.mid_attn {
            let heads = *c.heads.last().unwrap();
            let ctx = *c.cross_attention_dim.last().unwrap();
            let tl = *c.transformer_layers.last().unwrap();
            layers.push(Layer::Attn(Box::new(SpatialTransformer::load(
                &vb.pp("attentions.0"),
                ch,
                heads,
                tl,
                ctx,
                g,
            )?)));
            layers.push(Layer::Resnet(Box::new(ResnetBlock::load(
                &vb.pp("resnets.1"),
                ch,
                ch,
                Some(te),
                g,
                c.norm_eps,
                s,
            )?)));
        }
        Ok(MidBlock { layers })
    }
    pub fn forward(&self, x: &Tensor, temb: &Tensor, ctx: Context) -> Tensor {
        let mut h = x.clone();
        for l in &self.layers {
            h = match l {
                Layer::Resnet(r) => r.forward(&h, Some(temb)),
                Layer::Attn(a) => a.forward(&h, ctx),
            };
        }
        h
    }
}

/// The encoder half every UNet-shaped model has: embeddings, conv_in, down blocks, mid block.
pub struct Encoder {
    pub emb: Embeddings,
    pub conv_in: Conv2dW,
    pub down: Vec<DownBlock>,
    pub mid: MidBlock,
}

impl Encoder {
    pub fn load(vb: &Vb, c: &UnetConfig) -> Result<Self> {
        let k = c.conv_in_kernel;
        let conv_in =
            vb.pp("conv_in")
                .conv2d(c.in_channels, c.block_out_channels[0], k, 1, k / 2)?;
        let mut down = Vec::new();
        let mut out_ch = c.block_out_channels[0];
        let nb = c.block_out_channels.len();
        for i in 0..nb {
            let in_ch = out_ch;
            out_ch = c.block_out_channels[i];
            let bvb = vb.pp(format!("down_blocks.{i}"));
            let mut layers = Vec::new();
            for j in 0..c.layers_per_block[i] {
                let attn = c.down_attn[i].then(|| {
                    (
                        c.heads[i],
                        c.transformer_layers[i],
                        c.cross_attention_dim[i],
                    )
                });
                layers.push(load_layer(
                    &bvb,
                    j,
                    if j == 0 { in_ch } else { out_ch },
                    out_ch,
                    attn,
                    c,
                )?);
            }
            let down_s = if i + 1 < nb {
                Some(load_downsample(
                    &bvb.pp("downsamplers.0"),
                    out_ch,
                    c.downsample_padding,
                )?)
            } else {
                None
            };
            down.push(DownBlock {
                layers,
                down: down_s,
            });
        }
        Ok(Encoder {
            emb: Embeddings::load(vb, c)?,
            conv_in,
            down,
            mid: MidBlock::load(&vb.pp("mid_block"), c)?,
        })
    }
}

/// One up block: resnets over (hidden ⧺ skip), transformers in CrossAttn blocks, optional upsampler.
pub struct UpBlock {
    layers: Vec<(ResnetBlock, Option<SpatialTransformer>)>,
    up: Option<Conv2dW>,
}

pub struct Unet {
    pub config: UnetConfig,
    pub enc: Encoder,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2dW,
    /// Image-prompt adapters attached (`attach_adapter`).
    attached: usize,
}

/// Intermediate activations (NHWC) recorded for debugging parity, by diffusers module name.
pub type Trace = Vec<(String, Tensor)>;

impl Unet {
    pub fn load(cfg: &Config, store: &WeightStore, device: &Device) -> Result<Self> {
        let c = UnetConfig::parse(cfg, false)?;
        let vb = Vb::root_on(store, device);
        let enc = Encoder::load(&vb, &c)?;
        let nb = c.block_out_channels.len();
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let rev_layers: Vec<usize> = c.layers_per_block.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = c.heads.iter().rev().copied().collect();
        let rev_ctx: Vec<usize> = c.cross_attention_dim.iter().rev().copied().collect();
        let mut up = Vec::new();
        let mut out_ch = rev[0];
        for i in 0..nb {
            let prev_out = out_ch;
            out_ch = rev[i];
            let in_ch = rev[(i + 1).min(nb - 1)];
            let bvb = vb.pp(format!("up_blocks.{i}"));
            let n = rev_layers[i] + 1;
            let mut layers = Vec::new();
            for j in 0..n {
                let skip = if j == n - 1 { in_ch } else { out_ch };
                let rin = if j == 0 { prev_out } else { out_ch };
                let attn = c.up_attn[i]
                    .then(|| (rev_heads[i], c.reverse_transformer_layers[i], rev_ctx[i]));
                layers.push(load_layer(&bvb, j, rin + skip, out_ch, attn, &c)?);
            }
            let up_s = if i + 1 < nb {
                Some(
                    bvb.pp("upsamplers.0.conv")
                        .conv2d(out_ch, out_ch, 3, 1, 1)?,
                )
            } else {
                None
            };
            up.push(UpBlock { layers, up: up_s });
        }
        let ch0 = c.block_out_channels[0];
        let k = c.conv_out_kernel;
        Ok(Unet {
            norm_out: GroupNorm::load(&vb.pp("conv_norm_out"), c.norm_num_groups, ch0, c.norm_eps)?,
            conv_out: vb.pp("conv_out").conv2d(ch0, c.out_channels, k, 1, k / 2)?,
            enc,
            up,
            config: c,
            attached: 0,
        })
    }

    /// Every cross-attention layer in diffusers' attention-processor order (down blocks, up
    /// blocks, then the mid block: module registration order), which is how IP-Adapter files
    /// number them (`ip_adapter.{2i+1}`).
    pub fn cross_attentions_mut(&mut self) -> Vec<&mut Attention> {
        let mut v: Vec<&mut Attention> = Vec::new();
        let down = self.enc.down.iter_mut().flat_map(|d| d.layers.iter_mut());
        let up = self.up.iter_mut().flat_map(|u| u.layers.iter_mut());
        for (_, a) in down.chain(up) {
            if let Some(a) = a {
                v.extend(a.blocks.iter_mut().map(|b| &mut b.attn2));
            }
        }
        for l in self.enc.mid.layers.iter_mut() {
            if let Layer::Attn(a) = l {
                v.extend(a.blocks.iter_mut().map(|b| &mut b.attn2));
            }
        }
        v
    }

    pub fn cross_attention_layers(&self) -> usize {
        let count = |a: &Option<SpatialTransformer>| a.as_ref().map_or(0, |a| a.blocks.len());
        let down: usize = self
            .enc
            .down
            .iter()
            .flat_map(|d| &d.layers)
            .map(|(_, a)| count(a))
            .sum();
        let up: usize = self
            .up
            .iter()
            .flat_map(|u| &u.layers)
            .map(|(_, a)| count(a))
            .sum();
        let mid: usize = self
            .enc
            .mid
            .layers
            .iter()
            .map(|l| match l {
                Layer::Attn(a) => a.blocks.len(),
                Layer::Resnet(_) => 0,
            })
            .sum();
        down + up + mid
    }

    /// Attaches one adapter's per-layer (to_k_ip, to_v_ip) projections, in processor order;
    /// `layers.len()` must equal `cross_attention_layers()` (checked by the adapter loader).
    pub fn attach_adapter(&mut self, layers: Vec<(LinearW, LinearW)>) {
        for (i, (a, (k, v))) in self
            .cross_attentions_mut()
            .into_iter()
            .zip(layers)
            .enumerate()
        {
            a.push_ip(i, k, v);
        }
        self.attached += 1;
    }

    /// Number of attached adapters.
    pub fn adapters(&self) -> usize {
        self.attached
    }

    /// (query width, key-source width) of every cross-attention layer, in processor order.
    pub fn cross_attention_dims(&mut self) -> Vec<(usize, usize)> {
        self.cross_attentions_mut()
            .iter()
            .map(|a| a.dims())
            .collect()
    }

    /// Number of skip tensors the encoder produces (= ControlNet down residuals expected).
    pub fn num_skips(&self) -> usize {
        1 + self
            .enc
            .down
            .iter()
            .map(|d| d.resnets() + d.has_downsampler() as usize)
            .sum::<usize>()
    }

    /// x: NHWC latents. `residuals`: ControlNet (down residuals, mid residual), NHWC, added to the
    /// skips and the mid-block output. Returns the model output (noise or v) in NHWC.
    pub fn forward(
        &self,
        x: &Tensor,
        cond: &Cond,
        residuals: Option<(&[Tensor], &Tensor)>,
        mut trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        let b = self.check_inputs(x, cond)?;
        let mut rec = |name: &str, t: &Tensor| {
            if let Some(tr) = trace.as_deref_mut() {
                tr.push((name.to_string(), t.clone()));
            }
        };
        let _unet = tracing::info_span!("unet", batch = b).entered();
        let temb = self.embed(cond, &mut rec)?;
        let mut h = ops::conv2d(x, &self.enc.conv_in);
        rec("conv_in", &h);
        let mut skips = vec![h.clone()];
        for (i, d) in self.enc.down.iter().enumerate() {
            let _s = tracing::info_span!("down_block", i).entered();
            h = d.forward(&h, &temb, cond.context(), &mut skips);
            rec(&format!("down.{i}"), &h);
        }
        if let Some((down_res, _)) = residuals {
            add_down_residuals(&mut skips, down_res)?;
        }
        h = tracing::info_span!("mid_block")
            .in_scope(|| self.enc.mid.forward(&h, &temb, cond.context()));
        if let Some((_, mid)) = residuals {
            if mid.shape() != h.shape() {
                bail!(
                    "mid_res has shape {:?} (NHWC), the mid block output has {:?}",
                    mid.shape(),
                    h.shape()
                );
            }
            h = ops::add(&h, mid);
        }
        rec("mid", &h);
        let h = self.up_blocks(h, &temb, cond, skips, &mut rec);
        let h = self.norm_out.forward_silu(&h);
        rec("conv_norm_out", &h);
        Ok(ops::conv2d(&h, &self.conv_out))
    }

    /// Checks the sample and the conditioning against the model; returns the batch size.
    fn check_inputs(&self, x: &Tensor, cond: &Cond) -> Result<usize> {
        let c = &self.config;
        let (b, _, _, cin) = x.dims4();
        if cin != c.in_channels {
            bail!(
                "sample has {cin} channels, the UNet expects in_channels = {}",
                c.in_channels
            );
        }
        check_cond(cond, b, &c.cross_attention_dim)?;
        if cond.ip.len() != self.attached {
            bail!(
                "{} image-prompt inputs for {} attached adapter(s)",
                cond.ip.len(),
                self.attached
            );
        }
        for (i, ip) in cond.ip.iter().enumerate() {
            let ts = ip.tokens.shape();
            if ts.len() != 3 || ts[0] != b {
                bail!("adapter {i}: image tokens have shape {ts:?}, expected [{b}, tokens, dim]");
            }
            if ip.scales.len() != self.cross_attention_layers() {
                bail!(
                    "adapter {i}: {} layer scales for {} cross-attention layers",
                    ip.scales.len(),
                    self.cross_attention_layers()
                );
            }
        }
        Ok(b)
    }

    /// The embedding the resnets see: silu(time_emb + aug_emb).
    fn embed(&self, cond: &Cond, rec: &mut impl FnMut(&str, &Tensor)) -> Result<Tensor> {
        let (emb, aug) = self.enc.emb.forward(cond)?;
        rec("time_emb", &emb);
        let emb = match aug {
            Some(a) => {
                rec("aug_emb", &a);
                ops::add(&emb, &a)
            }
            None => emb,
        };
        rec("emb", &emb);
        Ok(ops::silu(&emb))
    }

    /// The decoder: each up block consumes the encoder's skips from the last one back.
    fn up_blocks(
        &self,
        mut h: Tensor,
        temb: &Tensor,
        cond: &Cond,
        mut skips: Vec<Tensor>,
        rec: &mut impl FnMut(&str, &Tensor),
    ) -> Tensor {
        for (i, u) in self.up.iter().enumerate() {
            let _s = tracing::info_span!("up_block", i).entered();
            for (r, a) in &u.layers {
                let s = skips.pop().expect("skip count matches the block layout");
                h = r.forward(&ops::concat_channels(&[&h, &s]), Some(temb));
                if let Some(a) = a {
                    h = a.forward(&h, cond.context());
                }
            }
            if let Some(conv) = &u.up {
                // The next skip fixes the size, so odd latent sizes round-trip as in diffusers.
                let next = skips
                    .last()
                    .expect("an upsampler is followed by more skips");
                h = upsample(&h, conv, Some((next.shape()[1], next.shape()[2])));
            }
            rec(&format!("up.{i}"), &h);
        }
        h
    }
}

/// Adds ControlNet's down residuals to the encoder's skips, one for one.
fn add_down_residuals(skips: &mut [Tensor], down_res: &[Tensor]) -> Result<()> {
    if down_res.len() != skips.len() {
        bail!(
            "{} ControlNet down residuals given, the UNet has {} skip connections",
            down_res.len(),
            skips.len()
        );
    }
    for (i, (s, r)) in skips.iter_mut().zip(down_res).enumerate() {
        if s.shape() != r.shape() {
            bail!(
                "down_res.{i} has shape {:?} (NHWC), the UNet's skip has {:?}",
                r.shape(),
                s.shape()
            );
        }
        *s = ops::add(s, r);
    }
    Ok(())
}

pub(crate) fn check_cond(cond: &Cond, b: usize, ctx_dims: &[usize]) -> Result<()> {
    if cond.timesteps.numel() != b {
        bail!("{} timesteps for a batch of {b}", cond.timesteps.numel());
    }
    let cs = cond.context.shape();
    if cs.len() != 3 || cs[0] != b || cs[2] != ctx_dims[0] {
        bail!(
            "encoder_hidden_states has shape {cs:?}, expected [{b}, tokens, {}]",
            ctx_dims[0]
        );
    }
    Ok(())
}

/// diffusers' `get_guidance_scale_embedding` (LatentConsistencyModelPipeline): a sinusoidal
/// embedding of `(guidance − 1)·1000`, [sin | cos] over `dim / 2` frequencies
/// `exp(−i·ln(10⁴)/(dim/2 − 1))`, zero-padded to an odd `dim`; float32 like torch. One row per
/// sample.
pub fn guidance_scale_embedding(guidance: f32, dim: usize, rows: usize) -> Tensor {
    let w = (guidance - 1.0) * 1000.0;
    let half = dim / 2;
    let step = 10000f32.ln() / (half as f32 - 1.0);
    let args: Vec<f32> = (0..half).map(|i| w * (i as f32 * -step).exp()).collect();
    let row: Vec<f32> = args
        .iter()
        .map(|a| a.sin())
        .chain(args.iter().map(|a| a.cos()))
        .chain((dim % 2 == 1).then_some(0.0))
        .collect();
    Tensor::new(vec![rows, dim], row.repeat(rows))
}
