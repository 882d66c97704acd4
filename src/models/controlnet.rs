//! ControlNetModel: the UNet encoder plus a conditioning-image embedding and zero convolutions that
//! produce residuals for the UNet's skips and mid block.

use super::blocks::Context;
use super::unet::{check_cond, Cond, Encoder, UnetConfig};
use crate::backend::Device;
use crate::backend::{self as ops, Conv2dW};
use crate::config::Config;
use crate::tensor::Tensor;
use crate::weights::{Vb, WeightStore};
use anyhow::{bail, Result};

pub struct ControlNet {
    pub config: UnetConfig,
    /// The file or folder it came from (messages).
    pub origin: std::path::PathBuf,
    enc: Encoder,
    cond_in: Conv2dW,
    cond_blocks: Vec<Conv2dW>,
    cond_out: Conv2dW,
    bgr: bool,
    conditioning_channels: usize,
    zero_convs: Vec<Conv2dW>,
    mid_conv: Conv2dW,
}

/// ControlNet outputs: one residual per UNet skip, and one for the mid block (NHWC).
pub struct ControlOutput {
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

impl ControlNet {
    pub fn load(cfg: &Config, store: &WeightStore, device: &Device) -> Result<Self> {
        let c = UnetConfig::parse(cfg, true)?;
        let vb = Vb::root_on(store, device);
        let bgr = is_bgr(cfg)?;
        let conditioning_channels = cfg.usize_or("conditioning_channels", 3)?;
        let emb_ch = embedding_channels(cfg)?;
        let (cond_in, cond_blocks, cond_out) = load_cond_embedding(
            &vb.pp("controlnet_cond_embedding"),
            conditioning_channels,
            &emb_ch,
            c.block_out_channels[0],
        )?;
        let enc = Encoder::load(&vb, &c)?;
        let zero_convs = load_zero_convs(&vb, &c, &enc)?;
        let last = *c.block_out_channels.last().unwrap();
        let mid_conv = vb.pp("controlnet_mid_block").conv2d(last, last, 1, 1, 0)?;
        Ok(ControlNet {
            config: c,
            origin: store.origin.clone(),
            enc,
            cond_in,
            cond_blocks,
            cond_out,
            bgr,
            conditioning_channels,
            zero_convs,
            mid_conv,
        })
    }

    /// x: NHWC latents; image: NHWC conditioning image in [0, 1] at 8× the latent size.
    pub fn forward(
        &self,
        x: &Tensor,
        cond: &Cond,
        image: &Tensor,
        conditioning_scale: f32,
    ) -> Result<ControlOutput> {
        let _span = tracing::info_span!("controlnet").entered();
        let c = &self.config;
        let (b, h, w, cin) = x.dims4();
        if cin != c.in_channels {
            bail!(
                "sample has {cin} channels, the ControlNet expects in_channels = {}",
                c.in_channels
            );
        }
        check_cond(cond, b, &c.cross_attention_dim)?;
        let (ib, ih, iw, ic) = image.dims4();
        if ib != b || ic != self.conditioning_channels {
            bail!(
                "controlnet_cond has shape {:?} (NHWC), expected [{b}, H, W, {}]",
                image.shape(),
                self.conditioning_channels
            );
        }
        let e = self.embed_cond(image);
        let (emb, aug) = self.enc.emb.forward(cond)?;
        let emb = match aug {
            Some(a) => ops::add(&emb, &a),
            None => emb,
        };
        let temb = ops::silu(&emb);
        let hx = ops::conv2d(x, &self.enc.conv_in);
        if e.shape() != hx.shape() {
            bail!(
                "controlnet_cond of {ih}×{iw} embeds to {:?} but the latent {h}×{w} gives {:?}; the image must be 8× the latent size",
                e.shape(),
                hx.shape()
            );
        }
        let mut hcur = ops::add(&hx, &e);
        let mut skips = vec![hcur.clone()];
        for d in &self.enc.down {
            hcur = d.forward(&hcur, &temb, Context::text(cond.context), &mut skips);
        }
        hcur = self
            .enc
            .mid
            .forward(&hcur, &temb, Context::text(cond.context));
        let down = skips
            .iter()
            .zip(&self.zero_convs)
            .map(|(s, zc)| ops::scale(&ops::conv2d(s, zc), conditioning_scale))
            .collect();
        let mid = ops::scale(&ops::conv2d(&hcur, &self.mid_conv), conditioning_scale);
        Ok(ControlOutput { down, mid })
    }

    /// The conditioning image (NHWC, in the model's channel order) embedded to the size of the
    /// UNet's first feature map.
    fn embed_cond(&self, image: &Tensor) -> Tensor {
        let image = if self.bgr {
            flip_channels(image)
        } else {
            image.clone()
        };
        let mut e = ops::silu(&ops::conv2d(&image, &self.cond_in));
        for conv in &self.cond_blocks {
            e = ops::silu(&ops::conv2d(&e, conv));
        }
        ops::conv2d(&e, &self.cond_out)
    }
}

/// `controlnet_conditioning_channel_order`: whether the model takes BGR images.
fn is_bgr(cfg: &Config) -> Result<bool> {
    match cfg.str_or("controlnet_conditioning_channel_order", "rgb")? {
        "rgb" => Ok(false),
        "bgr" => Ok(true),
        other => Err(cfg.unsupported("controlnet_conditioning_channel_order", other, "rgb, bgr")),
    }
}

/// `conditioning_embedding_out_channels`, which must not be empty.
fn embedding_channels(cfg: &Config) -> Result<Vec<usize>> {
    let emb_ch = match cfg.get("conditioning_embedding_out_channels") {
        None => vec![16, 32, 96, 256],
        Some(_) => cfg.usize_list("conditioning_embedding_out_channels")?,
    };
    if emb_ch.is_empty() {
        return Err(cfg.unsupported(
            "conditioning_embedding_out_channels",
            "[]",
            "a non-empty list",
        ));
    }
    Ok(emb_ch)
}

/// The conditioning embedding's conv_in, its blocks (a conv, then a strided conv, per step of
/// `emb_ch`) and conv_out to `ch0` channels.
fn load_cond_embedding(
    cvb: &Vb,
    conditioning_channels: usize,
    emb_ch: &[usize],
    ch0: usize,
) -> Result<(Conv2dW, Vec<Conv2dW>, Conv2dW)> {
    let cond_in = cvb
        .pp("conv_in")
        .conv2d(conditioning_channels, emb_ch[0], 3, 1, 1)?;
    let mut cond_blocks = Vec::new();
    for i in 0..emb_ch.len() - 1 {
        let (a, b) = (emb_ch[i], emb_ch[i + 1]);
        cond_blocks.push(cvb.pp(format!("blocks.{}", 2 * i)).conv2d(a, a, 3, 1, 1)?);
        cond_blocks.push(
            cvb.pp(format!("blocks.{}", 2 * i + 1))
                .conv2d(a, b, 3, 2, 1)?,
        );
    }
    let cond_out = cvb
        .pp("conv_out")
        .conv2d(*emb_ch.last().unwrap(), ch0, 3, 1, 1)?;
    Ok((cond_in, cond_blocks, cond_out))
}

/// One zero convolution per UNet skip: conv_in's, then each down block's resnets and downsampler.
fn load_zero_convs(vb: &Vb, c: &UnetConfig, enc: &Encoder) -> Result<Vec<Conv2dW>> {
    let mut zc_channels = vec![c.block_out_channels[0]];
    for (i, d) in enc.down.iter().enumerate() {
        let ch = c.block_out_channels[i];
        zc_channels.extend(std::iter::repeat_n(
            ch,
            d.resnets() + d.has_downsampler() as usize,
        ));
    }
    zc_channels
        .iter()
        .enumerate()
        .map(|(i, &ch)| {
            vb.pp(format!("controlnet_down_blocks.{i}"))
                .conv2d(ch, ch, 1, 1, 0)
        })
        .collect()
}

/// RGB <-> BGR.
fn flip_channels(x: &Tensor) -> Tensor {
    let c = x.last_dim();
    let parts: Vec<Tensor> = (0..c).rev().map(|i| ops::slice_channels(x, i, 1)).collect();
    ops::concat_channels(&parts.iter().collect::<Vec<_>>())
}
