//! SAM's configuration: transformers' `SamConfig` and its three sections.

use crate::backend::{self as ops, Activation};
use crate::config::Config;
use crate::tensor::Tensor;
use anyhow::{bail, Result};

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
    pub(super) fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Act::Relu => relu(x),
            Act::Other(a) => a.apply(x),
        }
    }
}

pub(super) fn relu(x: &Tensor) -> Tensor {
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
