//! AutoencoderKL: encode to the latent distribution (mean, logvar), decode latents to images.

use super::blocks::{load_downsample, upsample, ResnetBlock, VaeAttention};
use super::nn::GroupNorm;
use crate::backend::Device;
use crate::backend::{self as ops, Conv2dW};
use crate::config::Config;
use crate::tensor::Tensor;
use crate::weights::{Vb, WeightStore};
use anyhow::{bail, Result};

const EPS: f64 = 1e-6;

/// Renames old diffusers VAE attention tensors (query/key/value/proj_attn) to the current names.
pub fn normalise_legacy_name(name: &str) -> Option<String> {
    for (old, new) in [
        (".query.", ".to_q."),
        (".key.", ".to_k."),
        (".value.", ".to_v."),
        (".proj_attn.", ".to_out.0."),
    ] {
        if name.contains(old) && name.contains(".attentions.") {
            return Some(name.replacen(old, new, 1));
        }
    }
    None
}

struct Mid {
    r0: ResnetBlock,
    attn: Option<VaeAttention>,
    r1: ResnetBlock,
}

impl Mid {
    fn load(vb: &Vb, ch: usize, groups: usize, attention: bool) -> Result<Self> {
        Ok(Mid {
            r0: ResnetBlock::load(&vb.pp("resnets.0"), ch, ch, None, groups, EPS, 1.0)?,
            attn: if attention {
                Some(VaeAttention::load(&vb.pp("attentions.0"), ch, groups, EPS)?)
            } else {
                None
            },
            r1: ResnetBlock::load(&vb.pp("resnets.1"), ch, ch, None, groups, EPS, 1.0)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.r0.forward(x, None);
        if let Some(a) = &self.attn {
            h = a.forward(&h);
        }
        self.r1.forward(&h, None)
    }
}

/// `n` resnets of a block, the first taking `cin` channels.
fn load_resnets(
    b: &Vb,
    n: usize,
    cin: usize,
    cout: usize,
    groups: usize,
) -> Result<Vec<ResnetBlock>> {
    (0..n)
        .map(|j| {
            ResnetBlock::load(
                &b.pp(format!("resnets.{j}")),
                if j == 0 { cin } else { cout },
                cout,
                None,
                groups,
                EPS,
                1.0,
            )
        })
        .collect()
}

struct Block {
    resnets: Vec<ResnetBlock>,
    resample: Option<Conv2dW>,
}

/// The encoder's down blocks (`e` = the `encoder` prefix), a downsampler after all but the last.
fn load_down_blocks(e: &Vb, ch: &[usize], layers: usize, groups: usize) -> Result<Vec<Block>> {
    let nb = ch.len();
    let mut enc_down = Vec::new();
    let mut out_ch = ch[0];
    for (i, &c) in ch.iter().enumerate() {
        let in_ch = out_ch;
        out_ch = c;
        let b = e.pp(format!("down_blocks.{i}"));
        let resnets = load_resnets(&b, layers, in_ch, out_ch, groups)?;
        let resample = if i + 1 < nb {
            Some(load_downsample(&b.pp("downsamplers.0"), out_ch, 0)?)
        } else {
            None
        };
        enc_down.push(Block { resnets, resample });
    }
    Ok(enc_down)
}

/// The decoder's up blocks (`d` = the `decoder` prefix) over the reversed channel list, an
/// upsampler after all but the last.
fn load_up_blocks(d: &Vb, ch: &[usize], layers: usize, groups: usize) -> Result<Vec<Block>> {
    let nb = ch.len();
    let rev: Vec<usize> = ch.iter().rev().copied().collect();
    let mut dec_up = Vec::new();
    let mut out_ch = rev[0];
    for (i, &c) in rev.iter().enumerate() {
        let prev = out_ch;
        out_ch = c;
        let b = d.pp(format!("up_blocks.{i}"));
        let resnets = load_resnets(&b, layers + 1, prev, out_ch, groups)?;
        let resample = if i + 1 < nb {
            Some(b.pp("upsamplers.0.conv").conv2d(out_ch, out_ch, 3, 1, 1)?)
        } else {
            None
        };
        dec_up.push(Block { resnets, resample });
    }
    Ok(dec_up)
}

fn scaling_factor(cfg: &Config) -> Result<f64> {
    let f = cfg.f64_or("scaling_factor", 0.18215)?;
    if !(f.is_finite() && f > 0.0) {
        return Err(cfg.unsupported("scaling_factor", f, "a positive number"));
    }
    Ok(f)
}

/// Whether the VAE must not run in fp16 (`force_upcast`: SDXL's overflows there). Old SD1/SD2
/// configs lack the field and their pipelines never upcast, so absent means false.
pub fn force_upcast(cfg: &Config) -> Result<bool> {
    cfg.bool_or("force_upcast", false)
}

pub struct Vae {
    /// Where the VAE runs (bf16 on a GPU for `force_upcast` VAEs, see `Device::upcast`)...
    device: Device,
    /// ...and where its callers' tensors live: inputs and outputs are cast between the two.
    io: Device,
    pub latent_channels: usize,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    in_channels: usize,
    enc_conv_in: Conv2dW,
    enc_down: Vec<Block>,
    enc_mid: Mid,
    enc_norm: GroupNorm,
    enc_conv_out: Conv2dW,
    quant_conv: Option<Conv2dW>,
    post_quant_conv: Option<Conv2dW>,
    dec_conv_in: Conv2dW,
    dec_mid: Mid,
    dec_up: Vec<Block>,
    dec_norm: GroupNorm,
    dec_conv_out: Conv2dW,
}

impl Vae {
    pub fn load(cfg: &Config, store: &WeightStore, device: &Device) -> Result<Self> {
        let ch = Self::check_config(cfg)?;
        let nb = ch.len();
        let layers = cfg.usize_or("layers_per_block", 1)?;
        let groups = cfg.usize_or("norm_num_groups", 32)?;
        let lat = cfg.usize_or("latent_channels", 4)?;
        let cin = cfg.usize_or("in_channels", 3)?;
        let cout = cfg.usize_or("out_channels", 3)?;
        let attention = cfg.bool_or("mid_block_add_attention", true)?;
        let io = device.clone();
        let device = device.upcast(force_upcast(cfg)?);
        let vb = Vb::root_on(store, &device);
        let e = vb.pp("encoder");
        let enc_down = load_down_blocks(&e, &ch, layers, groups)?;
        let d = vb.pp("decoder");
        let dec_up = load_up_blocks(&d, &ch, layers, groups)?;
        let last = ch[nb - 1];
        Ok(Vae {
            device,
            io,
            latent_channels: lat,
            scaling_factor: scaling_factor(cfg)?,
            shift_factor: cfg
                .get("shift_factor")
                .map(|_| cfg.f64_or("shift_factor", 0.0))
                .transpose()?,
            in_channels: cin,
            enc_conv_in: e.pp("conv_in").conv2d(cin, ch[0], 3, 1, 1)?,
            enc_down,
            enc_mid: Mid::load(&e.pp("mid_block"), last, groups, attention)?,
            enc_norm: GroupNorm::load(&e.pp("conv_norm_out"), groups, last, EPS)?,
            enc_conv_out: e.pp("conv_out").conv2d(last, 2 * lat, 3, 1, 1)?,
            quant_conv: if cfg.bool_or("use_quant_conv", true)? {
                Some(vb.pp("quant_conv").conv2d(2 * lat, 2 * lat, 1, 1, 0)?)
            } else {
                None
            },
            post_quant_conv: if cfg.bool_or("use_post_quant_conv", true)? {
                Some(vb.pp("post_quant_conv").conv2d(lat, lat, 1, 1, 0)?)
            } else {
                None
            },
            dec_conv_in: d.pp("conv_in").conv2d(lat, last, 3, 1, 1)?,
            dec_mid: Mid::load(&d.pp("mid_block"), last, groups, attention)?,
            dec_up,
            dec_norm: GroupNorm::load(&d.pp("conv_norm_out"), groups, ch[0], EPS)?,
            dec_conv_out: d.pp("conv_out").conv2d(ch[0], cout, 3, 1, 1)?,
        })
    }

    /// Validates the block layout and activation; returns `block_out_channels` (never empty).
    fn check_config(cfg: &Config) -> Result<Vec<usize>> {
        cfg.check_sizes(&[
            ("block_out_channels", 16384),
            ("in_channels", 1024),
            ("out_channels", 1024),
            ("latent_channels", 1024),
            ("layers_per_block", 64),
            ("norm_num_groups", 16384),
        ])?;
        let ch = cfg.usize_list("block_out_channels")?;
        let nb = ch.len();
        if nb == 0 {
            return Err(cfg.unsupported("block_out_channels", "[]", "a non-empty list"));
        }
        for (field, want) in [
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ] {
            let types = cfg.str_list(field)?;
            if types.len() != nb {
                bail!(
                    "{}: `{field}` has {} entries but `block_out_channels` has {nb}",
                    cfg.path.display(),
                    types.len()
                );
            }
            if let Some(t) = types.iter().find(|t| *t != want) {
                return Err(cfg.unsupported(field, t, want));
            }
        }
        if cfg.str_or("act_fn", "silu")? != "silu" {
            return Err(cfg.unsupported("act_fn", cfg.str("act_fn")?, "silu"));
        }
        Ok(ch)
    }

    /// The storage type the VAE computes in (`f32` on the CPU; `f16` or `bf16` on a GPU).
    pub fn storage(&self) -> &'static str {
        self.device.storage()
    }

    /// How much the encoder shrinks an image side.
    /// A lower bound of the bytes decoding `n` images of h×w holds at once on the CPU (`budget`):
    /// the decoder's last level, or the mid-block attention's score matrices.
    pub fn decode_floor(&self, n: usize, h: usize, w: usize) -> u64 {
        if !self.device.is_cpu() {
            return 0;
        }
        let last = crate::budget::f32_bytes(&[n, h, w, self.dec_conv_out.in_channels()]);
        let t = (h / self.downscale()) * (w / self.downscale());
        let scores = match self.dec_mid.attn {
            Some(_) => crate::budget::attention_scores(n, t, t),
            None => 0,
        };
        last.max(scores)
    }

    pub fn downscale(&self) -> usize {
        1 << (self.enc_down.len() - 1)
    }

    /// image: NHWC in [-1, 1] -> (mean, logvar), NHWC latents (logvar clamped to [-30, 20] as diffusers does).
    pub fn encode(&self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        let _span = tracing::info_span!("vae.encode").entered();
        let (_, h, w, c) = image.dims4();
        if c != self.in_channels {
            bail!(
                "image has {c} channels, the VAE expects {}",
                self.in_channels
            );
        }
        let f = self.downscale();
        if h % f != 0 || w % f != 0 {
            bail!("image size {h}×{w} is not a multiple of the VAE's downscale factor {f}");
        }
        let mut x = ops::conv2d(&self.device.put_same(image), &self.enc_conv_in);
        for b in &self.enc_down {
            for r in &b.resnets {
                x = r.forward(&x, None);
            }
            if let Some(d) = &b.resample {
                x = ops::conv2d(&x, d);
            }
        }
        x = self.enc_mid.forward(&x);
        x = ops::conv2d(&self.enc_norm.forward_silu(&x), &self.enc_conv_out);
        if let Some(q) = &self.quant_conv {
            x = ops::conv2d(&x, q);
        }
        let l = self.latent_channels;
        let mean = ops::slice_channels(&x, 0, l);
        let logvar = ops::affine_clamp(&ops::slice_channels(&x, l, l), 1.0, 0.0, -30.0, 20.0);
        Ok((self.io.put_same(&mean), self.io.put_same(&logvar)))
    }

    /// latent: NHWC (unscaled, as `vae.decode` takes it) -> image NHWC, nominally [-1, 1].
    pub fn decode(&self, latent: &Tensor) -> Result<Tensor> {
        let _span = tracing::info_span!("vae.decode").entered();
        let (_, _, _, c) = latent.dims4();
        if c != self.latent_channels {
            bail!(
                "latent has {c} channels, the VAE expects latent_channels = {}",
                self.latent_channels
            );
        }
        let mut x = self.device.put_same(latent);
        if let Some(p) = &self.post_quant_conv {
            x = ops::conv2d(&x, p);
        }
        x = ops::conv2d(&x, &self.dec_conv_in);
        x = self.dec_mid.forward(&x);
        for b in &self.dec_up {
            for r in &b.resnets {
                x = r.forward(&x, None);
            }
            if let Some(u) = &b.resample {
                x = upsample(&x, u, None);
            }
        }
        Ok(self.io.put_same(&ops::conv2d(
            &self.dec_norm.forward_silu(&x),
            &self.dec_conv_out,
        )))
    }
}
