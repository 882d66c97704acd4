//! Segment Anything: transformers' `SamModel`. A ViT image encoder (windowed and global attention
//! with decomposed relative positions, then a conv neck), a prompt encoder (points with labels and
//! boxes through a random-Fourier positional encoding) and the two-way transformer mask decoder
//! (low-resolution mask logits and IoU scores).
//!
//! The image encoder and the mask decoder run on the backend; the prompt encoder works on a handful
//! of points and runs on the host. Windows are cut and put back with `gather` (zero rows for the
//! padding); ConvTranspose2d(k=2, s=2) is a linear layer followed by a `gather` pixel shuffle; the
//! hypernetwork products are one bias-free linear layer per prompt. The final masks and scores are
//! returned on the host in transformers' layout.

use super::nn::LayerNorm;
use crate::backend::{self as ops, Activation, Conv2dW, Device, LinearW};
use crate::config::Config;
use crate::tensor::Tensor;
use crate::weights::{Vb, WeightStore};
use anyhow::{bail, Context, Result};
use std::path::Path;

/// `SamVisionConfig`.
#[derive(Clone, Debug)]
pub struct SamVisionConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub channels: usize,
    pub image_size: usize,
    pub patch: usize,
    pub eps: f64,
    pub act: Activation,
    pub qkv_bias: bool,
    pub mlp_dim: usize,
    pub use_abs_pos: bool,
    pub use_rel_pos: bool,
    /// 0: every layer global.
    pub window: usize,
    pub global_attn_indexes: Vec<usize>,
    pub output_channels: usize,
    /// Columns of the random-Fourier matrix shared with the prompt encoder.
    pub num_pos_feats: usize,
}

/// `SamPromptEncoderConfig`.
#[derive(Clone, Debug)]
pub struct SamPromptConfig {
    pub hidden: usize,
    /// Side of the image embedding grid.
    pub image_embedding_size: usize,
    /// Side of the model input, the frame points and boxes are given in.
    pub image_size: usize,
    pub num_point_embeddings: usize,
}

/// `SamMaskDecoderConfig`.
#[derive(Clone, Debug)]
pub struct SamDecoderConfig {
    pub hidden: usize,
    pub act: Act,
    pub mlp_dim: usize,
    pub layers: usize,
    pub heads: usize,
    pub downsample: usize,
    pub multimask_outputs: usize,
    pub iou_depth: usize,
    pub iou_hidden: usize,
    pub eps: f64,
}

#[derive(Clone, Debug)]
pub struct SamConfig {
    pub vision: SamVisionConfig,
    pub prompt: SamPromptConfig,
    pub decoder: SamDecoderConfig,
}

/// The mask decoder's MLP activation: ReLU (as released) or one of the backend's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    Relu,
    Other(Activation),
}

impl Act {
    fn parse(cfg: &Config, field: &str, default: &str) -> Result<Act> {
        let name = cfg.str_or(field, default)?;
        match name {
            "relu" => Ok(Act::Relu),
            _ => match Activation::parse(name) {
                Some(a @ (Activation::Gelu | Activation::QuickGelu | Activation::Silu)) => {
                    Ok(Act::Other(a))
                }
                _ => Err(cfg.unsupported(field, name, "relu, gelu, quick_gelu, silu")),
            },
        }
    }
    fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Act::Relu => relu(x),
            Act::Other(a) => a.apply(x),
        }
    }
}

fn relu(x: &Tensor) -> Tensor {
    ops::affine_clamp(x, 1.0, 0.0, 0.0, f32::INFINITY)
}

/// A nested config section (`vision_config`, …) as a Config of its own; absent means defaults.
fn section(cfg: &Config, name: &str) -> Result<Config> {
    let v = cfg
        .get(name)
        .cloned()
        .unwrap_or_else(|| serde_json::json!({}));
    Config::from_json(&format!("{} ({name})", cfg.path.display()), v)
}

impl SamConfig {
    /// From a transformers `SamModel` config.json (`model_type` "sam"); sections left out take
    /// transformers' defaults (SAM ViT-B/L/H share the prompt encoder and decoder defaults).
    pub fn parse(cfg: &Config) -> Result<SamConfig> {
        let mt = cfg.str_or("model_type", "sam")?;
        if mt != "sam" {
            return Err(cfg.unsupported("model_type", mt, "sam"));
        }
        let vision = Self::parse_vision(&section(cfg, "vision_config")?)?;
        let prompt = Self::parse_prompt(&section(cfg, "prompt_encoder_config")?)?;
        let decoder = Self::parse_decoder(&section(cfg, "mask_decoder_config")?)?;
        let grid = vision.image_size / vision.patch;
        let where_ = cfg.path.display();
        if prompt.image_embedding_size != grid {
            bail!(
                "{where_}: prompt_encoder_config.image_embedding_size {} differs from the vision \
                 grid {grid} (image_size {} / patch_size {})",
                prompt.image_embedding_size,
                vision.image_size,
                vision.patch
            );
        }
        if vision.output_channels != decoder.hidden || prompt.hidden != decoder.hidden {
            bail!(
                "{where_}: vision output_channels {}, prompt encoder hidden_size {} and mask \
                 decoder hidden_size {} must be equal",
                vision.output_channels,
                prompt.hidden,
                decoder.hidden
            );
        }
        if 2 * vision.num_pos_feats != prompt.hidden {
            bail!(
                "{where_}: 2 × vision_config.num_pos_feats ({}) must equal the prompt encoder \
                 hidden_size {}",
                vision.num_pos_feats,
                prompt.hidden
            );
        }
        if prompt.num_point_embeddings < 4 {
            bail!(
                "{where_}: prompt_encoder_config.num_point_embeddings {} < 4 (two point labels \
                 and two box corners)",
                prompt.num_point_embeddings
            );
        }
        Ok(SamConfig {
            vision,
            prompt,
            decoder,
        })
    }

    fn parse_vision(c: &Config) -> Result<SamVisionConfig> {
        c.check_sizes(&[
            ("hidden_size", 16384),
            ("output_channels", 16384),
            ("num_hidden_layers", 256),
            ("num_attention_heads", 1024),
            ("num_channels", 64),
            ("image_size", 8192),
            ("patch_size", 1024),
            ("mlp_dim", 65536),
            ("window_size", 1024),
            ("global_attn_indexes", 256),
            ("num_pos_feats", 8192),
        ])?;
        let hidden = c.usize_or("hidden_size", 768)?;
        let heads = c.usize_or("num_attention_heads", 12)?;
        let p = c.path.display();
        if heads == 0 || !hidden.is_multiple_of(heads) {
            bail!("{p}: hidden_size {hidden} is not divisible by num_attention_heads {heads}");
        }
        let image_size = c.usize_or("image_size", 1024)?;
        let patch = c.usize_or("patch_size", 16)?;
        if patch == 0 || image_size < patch {
            bail!("{p}: image_size {image_size} holds no {patch}-pixel patch");
        }
        let ratio = c.f64_or("mlp_ratio", 4.0)?;
        let mlp_dim = match c.opt_usize("mlp_dim")? {
            Some(m) => m,
            None => {
                let m = hidden as f64 * ratio;
                if !(m.is_finite() && (1.0..=65536.0).contains(&m)) {
                    bail!("{p}: mlp_ratio {ratio} gives no usable MLP width");
                }
                m as usize
            }
        };
        let act_name = c.str_or("hidden_act", "gelu")?;
        let act = match Activation::parse(act_name) {
            Some(a @ (Activation::Gelu | Activation::QuickGelu | Activation::Silu)) => a,
            _ => return Err(c.unsupported("hidden_act", act_name, "gelu, quick_gelu, silu")),
        };
        let layers = c.usize_or("num_hidden_layers", 12)?;
        let global_attn_indexes = match c.get("global_attn_indexes") {
            None => vec![2, 5, 8, 11],
            Some(_) => c.usize_list("global_attn_indexes")?,
        };
        Ok(SamVisionConfig {
            hidden,
            layers,
            heads,
            channels: c.usize_or("num_channels", 3)?,
            image_size,
            patch,
            eps: c.eps_or("layer_norm_eps", 1e-6)?,
            act,
            qkv_bias: c.bool_or("qkv_bias", true)?,
            mlp_dim,
            use_abs_pos: c.bool_or("use_abs_pos", true)?,
            use_rel_pos: c.bool_or("use_rel_pos", true)?,
            window: c.usize_or("window_size", 14)?,
            global_attn_indexes,
            output_channels: c.usize_or("output_channels", 256)?,
            num_pos_feats: c.usize_or("num_pos_feats", 128)?,
        })
    }

    fn parse_prompt(c: &Config) -> Result<SamPromptConfig> {
        c.check_sizes(&[
            ("hidden_size", 16384),
            ("image_size", 8192),
            ("patch_size", 1024),
            ("image_embedding_size", 1024),
            ("num_point_embeddings", 64),
        ])?;
        let image_size = c.usize_or("image_size", 1024)?;
        let patch = c.usize_or("patch_size", 16)?.max(1);
        Ok(SamPromptConfig {
            hidden: c.usize_or("hidden_size", 256)?,
            image_embedding_size: c.usize_or("image_embedding_size", image_size / patch)?,
            image_size,
            num_point_embeddings: c.usize_or("num_point_embeddings", 4)?,
        })
    }

    fn parse_decoder(c: &Config) -> Result<SamDecoderConfig> {
        c.check_sizes(&[
            ("hidden_size", 16384),
            ("mlp_dim", 65536),
            ("num_hidden_layers", 256),
            ("num_attention_heads", 1024),
            ("attention_downsample_rate", 1024),
            ("num_multimask_outputs", 64),
            ("iou_head_depth", 64),
            ("iou_head_hidden_dim", 16384),
        ])?;
        let hidden = c.usize_or("hidden_size", 256)?;
        let heads = c.usize_or("num_attention_heads", 8)?;
        let downsample = c.usize_or("attention_downsample_rate", 2)?;
        let p = c.path.display();
        if hidden == 0 || !hidden.is_multiple_of(8) {
            bail!("{p}: hidden_size {hidden} must be a positive multiple of 8 (mask upscaling)");
        }
        if downsample == 0
            || heads == 0
            || !hidden.is_multiple_of(heads)
            || !(hidden / downsample).is_multiple_of(heads)
            || hidden / downsample == 0
        {
            bail!(
                "{p}: num_attention_heads {heads} must divide hidden_size {hidden} and \
                 hidden_size / attention_downsample_rate ({downsample})"
            );
        }
        let iou_depth = c.usize_or("iou_head_depth", 3)?;
        if iou_depth < 2 {
            bail!("{p}: iou_head_depth {iou_depth} < 2 (an input and an output layer)");
        }
        Ok(SamDecoderConfig {
            hidden,
            act: Act::parse(c, "hidden_act", "relu")?,
            mlp_dim: c.usize_or("mlp_dim", 2048)?,
            layers: c.usize_or("num_hidden_layers", 2)?,
            heads,
            downsample,
            multimask_outputs: c.usize_or("num_multimask_outputs", 3)?,
            iou_depth,
            iou_hidden: c.usize_or("iou_head_hidden_dim", 256)?,
            eps: c.eps_or("layer_norm_eps", 1e-6)?,
        })
    }
}

/// A tiny random-weight config in the fixture's shape (built-in demo models, tests).
pub fn builtin_config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["SamModel"],
        "model_type": "sam",
        "vision_config": {
            "hidden_size": 32, "output_channels": 16, "num_hidden_layers": 3,
            "num_attention_heads": 2, "num_channels": 3, "image_size": 64, "patch_size": 16,
            "hidden_act": "gelu", "layer_norm_eps": 1e-6, "qkv_bias": true, "mlp_ratio": 2.0,
            "mlp_dim": 64, "use_abs_pos": true, "use_rel_pos": true, "window_size": 3,
            "global_attn_indexes": [1], "num_pos_feats": 8
        },
        "prompt_encoder_config": {
            "hidden_size": 16, "image_size": 64, "patch_size": 16, "image_embedding_size": 4,
            "mask_input_channels": 4, "num_point_embeddings": 4, "hidden_act": "gelu",
            "layer_norm_eps": 1e-6
        },
        "mask_decoder_config": {
            "hidden_size": 16, "hidden_act": "relu", "mlp_dim": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "attention_downsample_rate": 2, "num_multimask_outputs": 3,
            "iou_head_depth": 3, "iou_head_hidden_dim": 16, "layer_norm_eps": 1e-6
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Image encoder

/// transformers' `get_rel_pos` table resize: `F.interpolate(mode="linear", align_corners=False)`
/// of a [L, D] table to `n` rows (identity when L == n).
pub fn resize_rel_pos(table: &Tensor, n: usize) -> Tensor {
    let (l, d) = (table.shape()[0], table.shape()[1]);
    if l == n {
        return table.clone();
    }
    let src = table.data();
    let scale = l as f32 / n as f32;
    let mut out = vec![0.0f32; n * d];
    for (i, row) in out.chunks_mut(d).enumerate() {
        let x = ((i as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (x as usize).min(l - 1);
        let i1 = (i0 + 1).min(l - 1);
        let t = x - i0 as f32;
        for (c, o) in row.iter_mut().enumerate() {
            *o = (1.0 - t) * src[i0 * d + c] + t * src[i1 * d + c];
        }
    }
    Tensor::new(vec![n, d], out)
}

struct VisionLayer {
    ln1: LayerNorm,
    qkv: LinearW,
    proj: LinearW,
    /// Resized to 2·S − 1 rows for this layer's token grid S (window or whole grid).
    rel: Option<(Tensor, Tensor)>,
    ln2: LayerNorm,
    lin1: LinearW,
    lin2: LinearW,
    /// 0: global attention.
    window: usize,
}

impl VisionLayer {
    fn load(vb: &Vb, c: &SamVisionConfig, window: usize) -> Result<VisionLayer> {
        let d = c.hidden;
        let hd = d / c.heads;
        let side = if window == 0 {
            c.image_size / c.patch
        } else {
            window
        };
        let rel = if c.use_rel_pos {
            let a = vb.pp("attn");
            let table = |name: &str| -> Result<Tensor> {
                let full = format!("{}.{name}", a.prefix());
                // The stored table may have any length (resized below); random weights have
                // the length the layer uses.
                let shape = match a.store().shape(&full) {
                    Some(s) => s,
                    None if a.store().is_random() => vec![2 * side - 1, hd],
                    // get_any's error names the checkpoint and the tensor.
                    None => return Err(a.store().get_any(&full).unwrap_err()),
                };
                if shape.len() != 2 || shape[1] != hd || shape[0] == 0 {
                    bail!("`{full}` has shape {shape:?}; expected [rows, {hd}]");
                }
                let t = a.store().get(&full, &shape)?;
                Ok(vb.device().put(resize_rel_pos(&t, 2 * side - 1)))
            };
            Some((table("rel_pos_h")?, table("rel_pos_w")?))
        } else {
            None
        };
        Ok(VisionLayer {
            ln1: LayerNorm::load(&vb.pp("layer_norm1"), d, c.eps)?,
            qkv: vb.pp("attn.qkv").linear(d, 3 * d, c.qkv_bias)?,
            proj: vb.pp("attn.proj").linear(d, d, true)?,
            rel,
            ln2: LayerNorm::load(&vb.pp("layer_norm2"), d, c.eps)?,
            lin1: vb.pp("mlp.lin1").linear(d, c.mlp_dim, true)?,
            lin2: vb.pp("mlp.lin2").linear(c.mlp_dim, d, true)?,
            window,
        })
    }

    /// x: [B, g, g, D] NHWC.
    fn forward(&self, x: &Tensor, c: &SamVisionConfig, dev: &Device) -> Tensor {
        let (b, gh, gw, d) = x.dims4();
        let h = self.ln1.forward(x);
        let (tokens, side_h, side_w) = if self.window > 0 {
            let ws = self.window;
            let idx = window_rows(b, gh, gw, ws);
            let flat = h.reshape(vec![b * gh * gw, d]);
            let zero = dev.put(Tensor::zeros(vec![1, d]));
            let table = Tensor::cat0(&[&flat, &zero]);
            let n = idx.len() / (ws * ws);
            let t = ops::gather(&table, &dev.put_ids(&idx)).reshape(vec![n, ws * ws, d]);
            (t, ws, ws)
        } else {
            (h.reshape(vec![b, gh * gw, d]), gh, gw)
        };
        let qkv = ops::linear(&tokens, &self.qkv);
        let (q, k, v) = (
            ops::slice_channels(&qkv, 0, d),
            ops::slice_channels(&qkv, d, d),
            ops::slice_channels(&qkv, 2 * d, d),
        );
        let a = match &self.rel {
            Some((rh, rw)) => ops::rel_pos_attention(&q, &k, &v, c.heads, (side_h, side_w), rh, rw),
            None => ops::attention(&q, &k, &v, c.heads, false),
        };
        let a = ops::linear(&a, &self.proj);
        let a = if self.window > 0 {
            let idx = unwindow_rows(b, gh, gw, self.window);
            let n = a.shape()[0] * a.shape()[1];
            ops::gather(&a.reshape(vec![n, d]), &dev.put_ids(&idx)).reshape(vec![b, gh, gw, d])
        } else {
            a.reshape(vec![b, gh, gw, d])
        };
        let x = ops::add(x, &a);
        let m = ops::linear(
            &c.act.apply(&ops::linear(&self.ln2.forward(&x), &self.lin1)),
            &self.lin2,
        );
        ops::add(&x, &m)
    }
}

/// Rows of `[B·gh·gw + 1, D]` (the last row zero) that make the ws×ws windows of a zero-padded
/// grid, window by window in (batch, window row, window column) order: transformers'
/// `window_partition`.
fn window_rows(b: usize, gh: usize, gw: usize, ws: usize) -> Vec<u32> {
    let (nh, nw) = (gh.div_ceil(ws), gw.div_ceil(ws));
    let zero = (b * gh * gw) as u32;
    let mut idx = Vec::with_capacity(b * nh * nw * ws * ws);
    for bi in 0..b {
        for wy in 0..nh {
            for wx in 0..nw {
                for iy in 0..ws {
                    for ix in 0..ws {
                        let (y, x) = (wy * ws + iy, wx * ws + ix);
                        idx.push(if y < gh && x < gw {
                            ((bi * gh + y) * gw + x) as u32
                        } else {
                            zero
                        });
                    }
                }
            }
        }
    }
    idx
}

/// The inverse of `window_rows`: for every grid token, its row among the windows' tokens
/// (`window_unpartition`, padding dropped).
fn unwindow_rows(b: usize, gh: usize, gw: usize, ws: usize) -> Vec<u32> {
    let (nh, nw) = (gh.div_ceil(ws), gw.div_ceil(ws));
    let mut idx = Vec::with_capacity(b * gh * gw);
    for bi in 0..b {
        for y in 0..gh {
            for x in 0..gw {
                let win = (bi * nh + y / ws) * nw + x / ws;
                idx.push((win * ws * ws + (y % ws) * ws + x % ws) as u32);
            }
        }
    }
    idx
}

struct VisionEncoder {
    patch_embed: Conv2dW,
    /// [1, g, g, D]
    pos: Option<Tensor>,
    layers: Vec<VisionLayer>,
    neck_conv1: Conv2dW,
    neck_ln1: LayerNorm,
    neck_conv2: Conv2dW,
    neck_ln2: LayerNorm,
}

impl VisionEncoder {
    fn load(vb: &Vb, c: &SamVisionConfig) -> Result<VisionEncoder> {
        let g = c.image_size / c.patch;
        let d = c.hidden;
        let layers = (0..c.layers)
            .map(|i| {
                let w = if c.global_attn_indexes.contains(&i) {
                    0
                } else {
                    c.window
                };
                VisionLayer::load(&vb.pp(format!("layers.{i}")), c, w)
            })
            .collect::<Result<Vec<_>>>()?;
        let oc = c.output_channels;
        // SamLayerNorm's default eps (the neck builds it without the config's).
        let neck_eps = 1e-6;
        Ok(VisionEncoder {
            patch_embed: vb
                .pp("patch_embed.projection")
                .conv2d(c.channels, d, c.patch, c.patch, 0)?,
            pos: if c.use_abs_pos {
                Some(vb.get("pos_embed", &[1, g, g, d])?)
            } else {
                None
            },
            layers,
            neck_conv1: vb.pp("neck.conv1").conv2d_bias(d, oc, 1, 1, 0, false)?,
            neck_ln1: LayerNorm::load(&vb.pp("neck.layer_norm1"), oc, neck_eps)?,
            neck_conv2: vb.pp("neck.conv2").conv2d_bias(oc, oc, 3, 1, 1, false)?,
            neck_ln2: LayerNorm::load(&vb.pp("neck.layer_norm2"), oc, neck_eps)?,
        })
    }

    /// pixels [B, S, S, C] -> image embeddings [B, g, g, output_channels].
    fn forward(&self, pixels: &Tensor, c: &SamVisionConfig, dev: &Device) -> Tensor {
        let b = pixels.shape()[0];
        let mut x = ops::conv2d(pixels, &self.patch_embed);
        if let Some(p) = &self.pos {
            x = ops::add(&x, &Tensor::cat0(&vec![p; b]));
        }
        for l in &self.layers {
            x = l.forward(&x, c, dev);
        }
        let x = self.neck_ln1.forward(&ops::conv2d(&x, &self.neck_conv1));
        self.neck_ln2.forward(&ops::conv2d(&x, &self.neck_conv2))
    }
}

// ---------------------------------------------------------------------------------------------
// Prompt encoder (host)

struct PromptEncoder {
    /// [2, F] random-Fourier matrix (`shared_image_embedding.positional_embedding`).
    fourier: Vec<f32>,
    feats: usize,
    /// point_embed.0..3: negative point, positive point, box corner 1, box corner 2.
    point_embed: Vec<Vec<f32>>,
    not_a_point: Vec<f32>,
    no_mask: Vec<f32>,
    input_size: f32,
}

impl PromptEncoder {
    fn load(store: &WeightStore, c: &SamConfig) -> Result<PromptEncoder> {
        let f = c.vision.num_pos_feats;
        let h = c.prompt.hidden;
        let fourier_name =
            if store.contains("shared_image_embedding.positional_embedding") || store.is_random() {
                "shared_image_embedding.positional_embedding"
            } else {
                "prompt_encoder.shared_embedding.positional_embedding"
            };
        let row = |name: &str| -> Result<Vec<f32>> { Ok(store.get(name, &[1, h])?.into_vec()) };
        Ok(PromptEncoder {
            fourier: store.get(fourier_name, &[2, f])?.into_vec(),
            feats: f,
            point_embed: (0..4)
                .map(|i| row(&format!("prompt_encoder.point_embed.{i}.weight")))
                .collect::<Result<_>>()?,
            not_a_point: row("prompt_encoder.not_a_point_embed.weight")?,
            no_mask: row("prompt_encoder.no_mask_embed.weight")?,
            input_size: c.prompt.image_size as f32,
        })
    }

    /// `SamPositionalEmbedding` of one point in [0, 1]²: [sin(2π·c·P), cos(2π·c·P)], c = 2·p − 1.
    fn encode(&self, x: f32, y: f32) -> Vec<f32> {
        let f = self.feats;
        let (cx, cy) = (2.0 * x - 1.0, 2.0 * y - 1.0);
        let two_pi = (2.0 * std::f64::consts::PI) as f32;
        let mut out = vec![0.0f32; 2 * f];
        for j in 0..f {
            let v = two_pi * (cx * self.fourier[j] + cy * self.fourier[f + j]);
            out[j] = v.sin();
            out[f + j] = v.cos();
        }
        out
    }

    /// A point in input pixels: shifted to the pixel centre, normalised by the input size.
    fn encode_pixel(&self, x: f32, y: f32) -> Vec<f32> {
        let s = self.input_size;
        self.encode((x + 0.5) / s, (y + 0.5) / s)
    }

    fn embed_point(&self, x: f32, y: f32, label: i64) -> Vec<f32> {
        match label {
            -1 => self.not_a_point.clone(),
            -10 => vec![0.0; self.not_a_point.len()],
            l => {
                let mut e = self.encode_pixel(x, y);
                if l == 0 || l == 1 {
                    for (a, b) in e.iter_mut().zip(&self.point_embed[l as usize]) {
                        *a += b;
                    }
                }
                e
            }
        }
    }

    /// Sparse embeddings [B, n, tokens, C] (host) of checked prompts.
    fn sparse(&self, p: &Prompts) -> Tensor {
        let c = self.not_a_point.len();
        let n = p.prompts_per_image();
        let mut rows: Vec<Vec<Vec<f32>>> = vec![Vec::new(); p.batch * n];
        if let Some((pts, labels)) = &p.points {
            let k = pts.shape()[2];
            let (pd, ld) = (pts.data(), labels.data());
            for (i, r) in rows.iter_mut().enumerate() {
                for j in 0..k {
                    let o = i * k + j;
                    r.push(self.embed_point(pd[2 * o], pd[2 * o + 1], ld[o] as i64));
                }
                if p.boxes.is_none() {
                    // transformers pads point prompts with one not-a-point when there is no box.
                    r.push(self.not_a_point.clone());
                }
            }
        }
        if let Some(boxes) = &p.boxes {
            let bd = boxes.data();
            for (i, r) in rows.iter_mut().enumerate() {
                let bx = &bd[4 * i..4 * i + 4];
                for (corner, pe) in [(0usize, 2usize), (1, 3)] {
                    let mut e = self.encode_pixel(bx[2 * corner], bx[2 * corner + 1]);
                    for (a, b) in e.iter_mut().zip(&self.point_embed[pe]) {
                        *a += b;
                    }
                    r.push(e);
                }
            }
        }
        if rows.iter().all(|r| r.is_empty()) {
            return Tensor::zeros(vec![p.batch, 1, 1, c]);
        }
        let t = rows[0].len();
        let data: Vec<f32> = rows.into_iter().flatten().flatten().collect();
        Tensor::new(vec![p.batch, n, t, c], data)
    }
}

/// Checked prompts in the model's input frame (host tensors): points [B, n, k, 2] (x, y) with
/// labels [B, n, k] (1 foreground, 0 background, -1 not a point, -10 padding), boxes [B, n, 4]
/// (x0, y0, x1, y1).
pub struct Prompts {
    batch: usize,
    points: Option<(Tensor, Tensor)>,
    boxes: Option<Tensor>,
}

impl Prompts {
    /// Checks shapes against each other and the image batch `batch`; errors name the tensor.
    pub fn new(
        batch: usize,
        points: Option<&Tensor>,
        labels: Option<&Tensor>,
        boxes: Option<&Tensor>,
    ) -> Result<Prompts> {
        let points = match (points, labels) {
            (None, None) => None,
            (None, Some(_)) => bail!("`input_labels` given without `input_points`"),
            (Some(p), l) => {
                let s = p.shape();
                if s.len() != 4 || s[3] != 2 || s[0] != batch {
                    bail!(
                        "`input_points` has shape {s:?}; expected [{batch}, point_batch, points, 2]"
                    );
                }
                // transformers labels every point 1 when no labels are given.
                let l = match l {
                    Some(l) => l.clone(),
                    None => Tensor::new(s[..3].to_vec(), vec![1.0; s[0] * s[1] * s[2]]),
                };
                if l.shape() != &s[..3] {
                    bail!(
                        "`input_labels` has shape {:?}; expected {:?} (one per input point)",
                        l.shape(),
                        &s[..3]
                    );
                }
                if let Some(v) = l.data().iter().find(|v| v.fract() != 0.0) {
                    bail!("`input_labels` holds {v}, not an integer label");
                }
                Some((p.clone(), l))
            }
        };
        if let Some(b) = boxes {
            let s = b.shape();
            if s.len() != 3 || s[2] != 4 || s[0] != batch {
                bail!("`input_boxes` has shape {s:?}; expected [{batch}, boxes, 4]");
            }
            if let Some((p, _)) = &points {
                if p.shape()[1] != s[1] {
                    bail!(
                        "{} boxes per image but {} point batches: give as many boxes as point \
                         batches",
                        s[1],
                        p.shape()[1]
                    );
                }
            }
        }
        for (name, t) in [
            ("input_points", points.as_ref().map(|p| &p.0)),
            ("input_boxes", boxes),
        ] {
            if let Some(v) = t.and_then(|t| t.data().iter().find(|v| !v.is_finite())) {
                bail!("`{name}` holds a non-finite value ({v})");
            }
        }
        Ok(Prompts {
            batch,
            points,
            boxes: boxes.cloned(),
        })
    }

    /// Prompts (point batches or boxes) per image; 1 when there are none.
    pub fn prompts_per_image(&self) -> usize {
        match (&self.points, &self.boxes) {
            (Some((p, _)), _) => p.shape()[1],
            (None, Some(b)) => b.shape()[1],
            (None, None) => 1,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Mask decoder

/// `SamAttention`: projections to hidden / downsample, heads, SDPA, output projection.
struct Attn {
    q: LinearW,
    k: LinearW,
    v: LinearW,
    o: LinearW,
    heads: usize,
}

impl Attn {
    fn load(vb: &Vb, hidden: usize, inner: usize, heads: usize) -> Result<Attn> {
        Ok(Attn {
            q: vb.pp("q_proj").linear(hidden, inner, true)?,
            k: vb.pp("k_proj").linear(hidden, inner, true)?,
            v: vb.pp("v_proj").linear(hidden, inner, true)?,
            o: vb.pp("out_proj").linear(inner, hidden, true)?,
            heads,
        })
    }
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let a = ops::attention(
            &ops::linear(q, &self.q),
            &ops::linear(k, &self.k),
            &ops::linear(v, &self.v),
            self.heads,
            false,
        );
        ops::linear(&a, &self.o)
    }
}

struct TwoWayBlock {
    self_attn: Attn,
    ln1: LayerNorm,
    t2i: Attn,
    ln2: LayerNorm,
    lin1: LinearW,
    lin2: LinearW,
    ln3: LayerNorm,
    ln4: LayerNorm,
    i2t: Attn,
    skip_first_pe: bool,
}

impl TwoWayBlock {
    fn load(vb: &Vb, c: &SamDecoderConfig, first: bool) -> Result<TwoWayBlock> {
        let h = c.hidden;
        let inner = h / c.downsample;
        let ln = |n: &str| LayerNorm::load(&vb.pp(n), h, c.eps);
        Ok(TwoWayBlock {
            self_attn: Attn::load(&vb.pp("self_attn"), h, h, c.heads)?,
            ln1: ln("layer_norm1")?,
            t2i: Attn::load(&vb.pp("cross_attn_token_to_image"), h, inner, c.heads)?,
            ln2: ln("layer_norm2")?,
            lin1: vb.pp("mlp.lin1").linear(h, c.mlp_dim, true)?,
            lin2: vb.pp("mlp.lin2").linear(c.mlp_dim, h, true)?,
            ln3: ln("layer_norm3")?,
            ln4: ln("layer_norm4")?,
            i2t: Attn::load(&vb.pp("cross_attn_image_to_token"), h, inner, c.heads)?,
            skip_first_pe: first,
        })
    }

    /// queries [N, T, C], keys [N, HW, C]; `qpe` the prompt tokens, `kpe` the image positions.
    fn forward(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        qpe: &Tensor,
        kpe: &Tensor,
        act: Act,
    ) -> (Tensor, Tensor) {
        let q = if self.skip_first_pe {
            self.self_attn.forward(queries, queries, queries)
        } else {
            let qq = ops::add(queries, qpe);
            ops::add(queries, &self.self_attn.forward(&qq, &qq, queries))
        };
        let q = self.ln1.forward(&q);
        let kk = ops::add(keys, kpe);
        let q = self.ln2.forward(&ops::add(
            &q,
            &self.t2i.forward(&ops::add(&q, qpe), &kk, keys),
        ));
        let m = ops::linear(&act.apply(&ops::linear(&q, &self.lin1)), &self.lin2);
        let q = self.ln3.forward(&ops::add(&q, &m));
        let k = self.ln4.forward(&ops::add(
            keys,
            &self.i2t.forward(&kk, &ops::add(&q, qpe), &q),
        ));
        (q, k)
    }
}

/// `SamFeedForward`: proj_in, ReLU, (depth − 2) × (layer, ReLU), proj_out.
struct FeedForward {
    proj_in: LinearW,
    layers: Vec<LinearW>,
    proj_out: LinearW,
}

impl FeedForward {
    fn load(vb: &Vb, inp: usize, hidden: usize, out: usize, depth: usize) -> Result<Self> {
        Ok(FeedForward {
            proj_in: vb.pp("proj_in").linear(inp, hidden, true)?,
            layers: (0..depth - 2)
                .map(|i| vb.pp(format!("layers.{i}")).linear(hidden, hidden, true))
                .collect::<Result<_>>()?,
            proj_out: vb.pp("proj_out").linear(hidden, out, true)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = relu(&ops::linear(x, &self.proj_in));
        for l in &self.layers {
            h = relu(&ops::linear(&h, l));
        }
        ops::linear(&h, &self.proj_out)
    }
}

/// torch ConvTranspose2d(kernel_size=k, stride=k) on NHWC: a linear layer to k·k·Cout channels
/// per input pixel, then a pixel shuffle (`gather`).
struct ConvT {
    lin: LinearW,
    k: usize,
    cout: usize,
}

impl ConvT {
    fn load(vb: &Vb, cin: usize, cout: usize, k: usize) -> Result<ConvT> {
        let w = vb
            .store()
            .get(&format!("{}.weight", vb.prefix()), &[cin, cout, k, k])?;
        let b = vb.store().get(&format!("{}.bias", vb.prefix()), &[cout])?;
        let (w, b) = (w.data(), b.data());
        let rows = k * k * cout;
        let mut lw = vec![0.0f32; rows * cin];
        let mut lb = vec![0.0f32; rows];
        for ci in 0..cin {
            for co in 0..cout {
                for p in 0..k * k {
                    lw[(p * cout + co) * cin + ci] = w[(ci * cout + co) * k * k + p];
                }
            }
        }
        for p in 0..k * k {
            lb[p * cout..(p + 1) * cout].copy_from_slice(b);
        }
        Ok(ConvT {
            lin: vb.put_linear(LinearW {
                weight: Tensor::new(vec![rows, cin], lw),
                bias: Some(Tensor::new(vec![rows], lb)),
            }),
            k,
            cout,
        })
    }
    fn forward(&self, x: &Tensor, dev: &Device) -> Tensor {
        let (n, h, w, _) = x.dims4();
        let k = self.k;
        let y = ops::linear(x, &self.lin).reshape(vec![n * h * w * k * k, self.cout]);
        let (oh, ow) = (h * k, w * k);
        let mut idx = Vec::with_capacity(n * oh * ow);
        for b in 0..n {
            for oy in 0..oh {
                for ox in 0..ow {
                    let src = (b * h + oy / k) * w + ox / k;
                    idx.push((src * k * k + (oy % k) * k + ox % k) as u32);
                }
            }
        }
        ops::gather(&y, &dev.put_ids(&idx)).reshape(vec![n, oh, ow, self.cout])
    }
}

struct MaskDecoder {
    /// [1 + masks, C] host: the IoU token, then the mask tokens.
    output_tokens: Tensor,
    layers: Vec<TwoWayBlock>,
    final_attn: Attn,
    final_ln: LayerNorm,
    up1: ConvT,
    up_ln: LayerNorm,
    up2: ConvT,
    hyper: Vec<FeedForward>,
    iou_head: FeedForward,
}

impl MaskDecoder {
    fn load(vb: &Vb, c: &SamDecoderConfig) -> Result<MaskDecoder> {
        let h = c.hidden;
        let m = c.multimask_outputs + 1;
        let iou = vb.store().get("mask_decoder.iou_token.weight", &[1, h])?;
        let masks = vb.store().get("mask_decoder.mask_tokens.weight", &[m, h])?;
        let t = vb.pp("transformer");
        Ok(MaskDecoder {
            output_tokens: Tensor::cat0(&[&iou, &masks]),
            layers: (0..c.layers)
                .map(|i| TwoWayBlock::load(&t.pp(format!("layers.{i}")), c, i == 0))
                .collect::<Result<_>>()?,
            final_attn: Attn::load(
                &t.pp("final_attn_token_to_image"),
                h,
                h / c.downsample,
                c.heads,
            )?,
            // nn.LayerNorm(hidden_size): torch's default eps, not the config's.
            final_ln: LayerNorm::load(&t.pp("layer_norm_final_attn"), h, 1e-5)?,
            up1: ConvT::load(&vb.pp("upscale_conv1"), h, h / 4, 2)?,
            up_ln: LayerNorm::load(&vb.pp("upscale_layer_norm"), h / 4, 1e-6)?,
            up2: ConvT::load(&vb.pp("upscale_conv2"), h / 4, h / 8, 2)?,
            hyper: (0..m)
                .map(|i| {
                    FeedForward::load(
                        &vb.pp(format!("output_hypernetworks_mlps.{i}")),
                        h,
                        h,
                        h / 8,
                        3,
                    )
                })
                .collect::<Result<_>>()?,
            iou_head: FeedForward::load(
                &vb.pp("iou_prediction_head"),
                h,
                c.iou_hidden,
                m,
                c.iou_depth,
            )?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The model

/// A loaded `SamModel`.
pub struct Sam {
    pub config: SamConfig,
    vision: VisionEncoder,
    prompt: PromptEncoder,
    decoder: MaskDecoder,
    /// [g·g, C] image-wide positional encoding, on the device.
    image_pe: Tensor,
    device: Device,
}

/// transformers' `SamImageSegmentationOutput` (host tensors) plus the image embeddings.
pub struct SamOutput {
    /// [B, n, M, 4g, 4g] low-resolution mask logits (M = 3 with multimask output, else 1).
    pub pred_masks: Tensor,
    /// [B, n, M]
    pub iou_scores: Tensor,
    /// [B, g, g, C] NHWC, on the device.
    pub image_embeddings: Tensor,
}

impl Sam {
    pub fn load(cfg: &Config, store: &WeightStore, device: &Device) -> Result<Sam> {
        let c = SamConfig::parse(cfg)?;
        let vb = Vb::root_on(store, device);
        let vision = VisionEncoder::load(&vb.pp("vision_encoder"), &c.vision)?;
        let prompt = PromptEncoder::load(store, &c)?;
        let decoder = MaskDecoder::load(&vb.pp("mask_decoder"), &c.decoder)?;
        let g = c.prompt.image_embedding_size;
        let mut pe = Vec::with_capacity(g * g * c.prompt.hidden);
        for y in 0..g {
            for x in 0..g {
                let (fx, fy) = ((x as f32 + 0.5) / g as f32, (y as f32 + 0.5) / g as f32);
                pe.extend(prompt.encode(fx, fy));
            }
        }
        Ok(Sam {
            image_pe: device.put(Tensor::new(vec![g * g, c.prompt.hidden], pe)),
            config: c,
            vision,
            prompt,
            decoder,
            device: device.clone(),
        })
    }

    /// A transformers model folder: config.json + model.safetensors (or a sharded index).
    pub fn load_dir(dir: &Path, device: &Device) -> Result<Sam> {
        let config = Config::read_dir(dir)?;
        let weights = crate::weights::layout::open_weights(dir)?;
        Sam::load(&config, &weights, device)
            .with_context(|| format!("loading SAM from {}", dir.display()))
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Side of the square model input (pixel_values must be this size).
    pub fn input_size(&self) -> usize {
        self.config.vision.image_size
    }

    /// `get_image_embeddings`: pixel_values NHWC [B, S, S, C] (host or device) -> [B, g, g, C].
    pub fn image_embeddings(&self, pixels: &Tensor) -> Result<Tensor> {
        let c = &self.config.vision;
        if pixels.rank() != 4 {
            bail!(
                "pixel_values has shape {:?}; expected rank 4",
                pixels.shape()
            );
        }
        let (_, h, w, ch) = pixels.dims4();
        if h != c.image_size || w != c.image_size || ch != c.channels {
            bail!(
                "pixel_values is {h}x{w} with {ch} channels; SAM takes {s}x{s} with {} \
                 (pad the image to its image_size, as SamProcessor does)",
                c.channels,
                s = c.image_size
            );
        }
        Ok(self
            .vision
            .forward(&self.device.put_same(pixels), c, &self.device))
    }

    /// The prompt encoder and mask decoder on image embeddings [B, g, g, C]: (pred_masks, iou_scores)
    /// on the host.
    pub fn decode(
        &self,
        image_embeddings: &Tensor,
        prompts: &Prompts,
        multimask: bool,
    ) -> Result<(Tensor, Tensor)> {
        let dc = &self.config.decoder;
        let dev = &self.device;
        let (b, g, _, ch) = image_embeddings.dims4();
        if prompts.batch != b {
            bail!("{} images but prompts for {} images", b, prompts.batch);
        }
        let sparse = self.prompt.sparse(prompts);
        let n = sparse.shape()[1];
        let nn = b * n;
        // IoU + mask tokens, then the prompt tokens (none when the sparse embeddings sum to 0, as
        // transformers decides).
        let use_sparse = sparse.data().iter().sum::<f32>() != 0.0;
        let st = if use_sparse { sparse.shape()[2] } else { 0 };
        let out_tokens = self.decoder.output_tokens.data();
        let t = out_tokens.len() / ch + st;
        let mut tokens = Vec::with_capacity(nn * t * ch);
        for i in 0..nn {
            tokens.extend_from_slice(out_tokens);
            if use_sparse {
                tokens.extend_from_slice(&sparse.data()[i * st * ch..(i + 1) * st * ch]);
            }
        }
        let qpe = dev.put(Tensor::new(vec![nn, t, ch], tokens));
        // Image embeddings + the no-mask embedding, repeated per prompt.
        let no_mask = Tensor::new(vec![b, ch], self.prompt.no_mask.repeat(b));
        let img = ops::add_per_sample_channels(image_embeddings, &dev.put(no_mask));
        let per: Vec<Tensor> = (0..b).map(|i| img.narrow0(i, 1)).collect();
        let reps: Vec<&Tensor> = per.iter().flat_map(|p| std::iter::repeat_n(p, n)).collect();
        let mut keys = Tensor::cat0(&reps).reshape(vec![nn, g * g, ch]);
        let kpe = Tensor::cat0(&vec![&self.image_pe; nn]).reshape(vec![nn, g * g, ch]);
        let mut queries = qpe.clone();
        for l in &self.decoder.layers {
            (queries, keys) = l.forward(&queries, &keys, &qpe, &kpe, dc.act);
        }
        let a = self.decoder.final_attn.forward(
            &ops::add(&queries, &qpe),
            &ops::add(&keys, &kpe),
            &keys,
        );
        let queries = self
            .decoder
            .final_ln
            .forward(&ops::add(&queries, &a))
            .reshape(vec![nn, t * ch]);
        // Upscaled embeddings [N, 4g, 4g, C/8].
        let up = self
            .decoder
            .up1
            .forward(&keys.reshape(vec![nn, g, g, ch]), dev);
        let up = Activation::Gelu.apply(&self.decoder.up_ln.forward(&up));
        let up = Activation::Gelu.apply(&self.decoder.up2.forward(&up, dev));
        let (hw, c8) = (up.shape()[1] * up.shape()[2], ch / 8);
        let side = up.shape()[1];
        let m_all = dc.multimask_outputs + 1;
        let picked: Vec<usize> = if multimask {
            (1..m_all).collect()
        } else {
            vec![0]
        };
        let hyper: Vec<Tensor> = picked
            .iter()
            .map(|&i| {
                let tok = ops::slice_channels(&queries, (1 + i) * ch, ch);
                self.decoder.hyper[i].forward(&tok)
            })
            .collect();
        let hyper = ops::concat_channels(&hyper.iter().collect::<Vec<_>>());
        let m = picked.len();
        let mut masks = vec![0.0f32; nn * m * hw];
        for i in 0..nn {
            let w = LinearW {
                weight: hyper.narrow0(i, 1).reshape(vec![m, c8]),
                bias: None,
            };
            let r = ops::linear(&up.narrow0(i, 1).reshape(vec![hw, c8]), &w).to_host()?;
            // [HW, M] -> [M, HW]
            for (p, row) in r.data().chunks(m).enumerate() {
                for (j, v) in row.iter().enumerate() {
                    masks[(i * m + j) * hw + p] = *v;
                }
            }
        }
        let iou = self
            .decoder
            .iou_head
            .forward(&ops::slice_channels(&queries, 0, ch))
            .to_host()?;
        let iou: Vec<f32> = iou
            .data()
            .chunks(m_all)
            .flat_map(|r| picked.iter().map(|&j| r[j]).collect::<Vec<_>>())
            .collect();
        dev.check()?;
        Ok((
            Tensor::new(vec![b, n, m, side, side], masks),
            Tensor::new(vec![b, n, m], iou),
        ))
    }

    /// `SamModel.forward` on pixel_values NHWC [B, S, S, C] and prompts.
    pub fn forward(
        &self,
        pixels: &Tensor,
        prompts: &Prompts,
        multimask: bool,
    ) -> Result<SamOutput> {
        let _span = tracing::info_span!("sam").entered();
        let emb = self.image_embeddings(pixels)?;
        let (pred_masks, iou_scores) = self.decode(&emb, prompts, multimask)?;
        Ok(SamOutput {
            pred_masks,
            iou_scores,
            image_embeddings: emb,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Image + boxes -> masks

/// The masks SAM predicts for one box, at the image's size.
#[derive(Clone, Debug)]
pub struct BoxMasks {
    pub width: usize,
    pub height: usize,
    /// M masks (3 with multimask output, else 1), each row-major height × width.
    pub masks: Vec<Vec<bool>>,
    /// The predicted IoU of each mask.
    pub iou: Vec<f32>,
}

impl BoxMasks {
    /// The mask with the highest predicted IoU (the first of equals) and its score.
    pub fn best(&self) -> (&[bool], f32) {
        let mut best = 0;
        for (i, s) in self.iou.iter().enumerate() {
            if *s > self.iou[best] {
                best = i;
            }
        }
        (&self.masks[best], self.iou[best])
    }
}

/// Checks boxes (x0, y0, x1, y1) in the pixels of a `w`×`h` image: finite, inside it, not empty.
pub fn check_boxes(boxes: &[[f32; 4]], w: usize, h: usize) -> Result<()> {
    for (i, b) in boxes.iter().enumerate() {
        let [x0, y0, x1, y1] = *b;
        if b.iter().any(|v| !v.is_finite()) {
            bail!("box {i} {b:?}: not finite");
        }
        if x0 < 0.0 || y0 < 0.0 || x1 > w as f32 || y1 > h as f32 {
            bail!("box {i} {b:?} (x0, y0, x1, y1) is outside the {w}x{h} image");
        }
        if x1 <= x0 || y1 <= y0 {
            bail!("box {i} {b:?} is empty: expected x0 < x1 and y0 < y1");
        }
    }
    Ok(())
}

/// SAM on one image with box prompts, as transformers' processor + model + `post_process_masks`:
/// one `BoxMasks` per box, masks at the image size.
pub fn segment_boxes(
    sam: &Sam,
    proc: &crate::image_proc::sam::SamProcessor,
    img: &image::RgbImage,
    boxes: &[[f32; 4]],
    multimask: bool,
) -> Result<Vec<BoxMasks>> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if boxes.is_empty() {
        bail!("no boxes to segment");
    }
    check_boxes(boxes, w, h)?;
    let inp = proc.preprocess(img)?;
    let scaled = proc.rescale_boxes(boxes, inp.original_size);
    let bt = Tensor::new(
        vec![1, boxes.len(), 4],
        scaled.iter().flatten().copied().collect(),
    );
    let prompts = Prompts::new(1, None, None, Some(&bt))?;
    let out = sam.forward(&inp.pixel_values.to_nhwc(), &prompts, multimask)?;
    let logits = proc.post_process_masks(&out.pred_masks, inp.original_size, inp.reshaped_size)?;
    let m = out.iou_scores.shape()[2];
    let plane = w * h;
    Ok((0..boxes.len())
        .map(|i| BoxMasks {
            width: w,
            height: h,
            masks: (0..m)
                .map(|j| proc.binarize(&logits.data()[(i * m + j) * plane..][..plane]))
                .collect(),
            iou: out.iou_scores.data()[i * m..(i + 1) * m].to_vec(),
        })
        .collect())
}
