//! `UnetConfig`: a UNet2DConditionModel / ControlNetModel config.json, parsed and checked (the
//! encoder half and embeddings the UNet and ControlNet share; unsupported options are errors
//! naming the field).

use crate::config::Config;
use anyhow::{bail, Result};

/// The parts of a UNet config that the UNet and ControlNet share (the encoder half and embeddings).
#[derive(Clone, Debug)]
pub struct UnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: Vec<usize>,
    /// true = the block has cross-attention transformers (CrossAttn*Block2D).
    pub down_attn: Vec<bool>,
    pub up_attn: Vec<bool>,
    pub mid_attn: bool,
    pub heads: Vec<usize>,
    pub cross_attention_dim: Vec<usize>,
    pub transformer_layers: Vec<usize>,
    pub reverse_transformer_layers: Vec<usize>,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    /// SDXL: Some((addition_time_embed_dim, projection_class_embeddings_input_dim)).
    pub text_time: Option<(usize, usize)>,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    /// LCM-distilled UNets: the width of the guidance-scale embedding that
    /// `time_embedding.cond_proj` adds to the timestep embedding's input.
    pub time_cond_proj_dim: Option<usize>,
}

impl UnetConfig {
    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels[0] * 4
    }

    /// Parses and validates; `controlnet` skips the decoder (up blocks) fields.
    pub fn parse(cfg: &Config, controlnet: bool) -> Result<Self> {
        check_field_sizes(cfg)?;
        let block_out_channels = cfg.usize_list("block_out_channels")?;
        let nb = block_out_channels.len();
        if nb == 0 {
            return Err(cfg.unsupported("block_out_channels", "[]", "a non-empty list"));
        }
        let (down_attn, up_attn, mid_attn) = parse_block_types(cfg, nb, controlnet)?;
        let heads = parse_heads(cfg, &block_out_channels)?;
        let (transformer_layers, reverse_transformer_layers) = parse_transformer_layers(cfg, nb)?;
        let text_time = parse_text_time(cfg)?;
        reject_unsupported_options(cfg, controlnet)?;
        check_embedding_options(cfg, &block_out_channels)?;
        let (conv_in_kernel, conv_out_kernel) = parse_conv_kernels(cfg)?;
        Ok(UnetConfig {
            in_channels: cfg.usize_or("in_channels", 4)?,
            out_channels: if controlnet {
                0
            } else {
                cfg.usize_or("out_channels", 4)?
            },
            layers_per_block: cfg.usize_per_block("layers_per_block", nb)?,
            down_attn,
            up_attn,
            mid_attn,
            heads,
            cross_attention_dim: cfg.usize_per_block("cross_attention_dim", nb)?,
            transformer_layers,
            reverse_transformer_layers,
            norm_num_groups: cfg.usize_or("norm_num_groups", 32)?,
            norm_eps: cfg.eps_or("norm_eps", 1e-5)?,
            flip_sin_to_cos: cfg.bool_or("flip_sin_to_cos", true)?,
            freq_shift: cfg.f64_or("freq_shift", 0.0)?,
            downsample_padding: cfg.usize_or("downsample_padding", 1)?,
            mid_block_scale_factor: cfg.f64_or("mid_block_scale_factor", 1.0)?,
            conv_in_kernel,
            conv_out_kernel,
            text_time,
            use_linear_projection: cfg.bool_or("use_linear_projection", false)?,
            upcast_attention: cfg.bool_or("upcast_attention", false)?,
            time_cond_proj_dim: parse_time_cond_proj_dim(cfg, controlnet)?,
            block_out_channels,
        })
    }
}

fn check_field_sizes(cfg: &Config) -> Result<()> {
    cfg.check_sizes(&[
        ("block_out_channels", 16384),
        ("in_channels", 1024),
        ("out_channels", 1024),
        ("layers_per_block", 64),
        ("transformer_layers_per_block", 128),
        ("cross_attention_dim", 16384),
        ("attention_head_dim", 4096),
        ("num_attention_heads", 4096),
        ("norm_num_groups", 16384),
        ("addition_time_embed_dim", 16384),
        ("projection_class_embeddings_input_dim", 65536),
        ("conditioning_channels", 1024),
        ("conditioning_embedding_out_channels", 16384),
    ])
}

/// (down_attn, up_attn, mid_attn): which blocks have cross-attention; no up blocks for a ControlNet.
fn parse_block_types(
    cfg: &Config,
    nb: usize,
    controlnet: bool,
) -> Result<(Vec<bool>, Vec<bool>, bool)> {
    let down_attn = parse_block_attn(
        cfg,
        "down_block_types",
        nb,
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )?;
    let up_attn = if controlnet {
        Vec::new()
    } else {
        parse_block_attn(cfg, "up_block_types", nb, "CrossAttnUpBlock2D", "UpBlock2D")?
    };
    let mid_attn = match cfg
        .opt_str("mid_block_type")?
        .unwrap_or("UNetMidBlock2DCrossAttn")
    {
        "UNetMidBlock2DCrossAttn" => true,
        other => return Err(cfg.unsupported("mid_block_type", other, "UNetMidBlock2DCrossAttn")),
    };
    Ok((down_attn, up_attn, mid_attn))
}

/// One flag per block of `field`: true for `attn_type`, false for `plain_type`.
fn parse_block_attn(
    cfg: &Config,
    field: &str,
    nb: usize,
    attn_type: &str,
    plain_type: &str,
) -> Result<Vec<bool>> {
    let types = cfg.str_list(field)?;
    if types.len() != nb {
        bail!(
            "{}: `{field}` has {} entries but `block_out_channels` has {nb}",
            cfg.path.display(),
            types.len()
        );
    }
    types
        .iter()
        .map(|t| match t.as_str() {
            t if t == attn_type => Ok(true),
            t if t == plain_type => Ok(false),
            other => Err(cfg.unsupported(field, other, &format!("{attn_type}, {plain_type}"))),
        })
        .collect::<Result<Vec<_>>>()
}

fn parse_heads(cfg: &Config, block_out_channels: &[usize]) -> Result<Vec<usize>> {
    let nb = block_out_channels.len();
    // diffusers names the head count `attention_head_dim` for historical reasons; `num_attention_heads`
    // wins when both are present.
    let heads = if cfg.get("num_attention_heads").is_some() {
        cfg.usize_per_block("num_attention_heads", nb)?
    } else {
        cfg.usize_per_block("attention_head_dim", nb)?
    };
    for (i, (&h, &c)) in heads.iter().zip(block_out_channels).enumerate() {
        if h == 0 || c % h != 0 {
            bail!(
                "{}: block {i} has {c} channels, not divisible into {h} attention heads",
                cfg.path.display()
            );
        }
    }
    Ok(heads)
}

/// (transformer_layers, reverse_transformer_layers), one count per block.
fn parse_transformer_layers(cfg: &Config, nb: usize) -> Result<(Vec<usize>, Vec<usize>)> {
    let transformer_layers = match cfg.get("transformer_layers_per_block") {
        None => vec![1; nb],
        Some(_) => cfg.usize_per_block("transformer_layers_per_block", nb)?,
    };
    let reverse_transformer_layers = match cfg.get("reverse_transformer_layers_per_block") {
        None => transformer_layers.iter().rev().copied().collect(),
        Some(_) => cfg.usize_per_block("reverse_transformer_layers_per_block", nb)?,
    };
    Ok((transformer_layers, reverse_transformer_layers))
}

fn parse_text_time(cfg: &Config) -> Result<Option<(usize, usize)>> {
    match cfg.opt_str("addition_embed_type")? {
        None => Ok(None),
        Some("text_time") => Ok(Some((
            cfg.usize("addition_time_embed_dim")?,
            cfg.usize("projection_class_embeddings_input_dim")?,
        ))),
        Some(other) => Err(cfg.unsupported("addition_embed_type", other, "null, \"text_time\"")),
    }
}

/// Options whose non-default values the engine does not implement.
fn reject_unsupported_options(cfg: &Config, controlnet: bool) -> Result<()> {
    for (field, ok) in [
        ("class_embed_type", None::<&str>),
        ("encoder_hid_dim_type", None),
        ("timestep_post_act", None),
        ("cross_attention_norm", None),
    ] {
        if let Some(v) = cfg.get(field) {
            if ok.is_none() {
                return Err(cfg.unsupported(field, v, "null"));
            }
        }
    }
    let expect_str = |field: &str, want: &str| -> Result<()> {
        match cfg.opt_str(field)? {
            None => Ok(()),
            Some(v) if v == want => Ok(()),
            Some(v) => Err(cfg.unsupported(field, v, want)),
        }
    };
    expect_str("act_fn", "silu")?;
    expect_str("time_embedding_type", "positional")?;
    expect_str("resnet_time_scale_shift", "default")?;
    expect_str("attention_type", "default")?;
    if !controlnet {
        expect_str("resnet_time_scale_shift", "default")?;
    }
    for field in [
        "dual_cross_attention",
        "center_input_sample",
        "class_embeddings_concat",
        "resnet_skip_time_act",
        "global_pool_conditions",
    ] {
        if cfg.bool_or(field, false)? {
            return Err(cfg.unsupported(field, true, "false"));
        }
    }
    Ok(())
}

/// Options that may only take the values the embeddings and resnets are built for.
fn check_embedding_options(cfg: &Config, block_out_channels: &[usize]) -> Result<()> {
    match cfg.get("only_cross_attention") {
        None => {}
        Some(serde_json::Value::Bool(false)) => {}
        Some(serde_json::Value::Array(a))
            if a.iter().all(|v| v == &serde_json::Value::Bool(false)) => {}
        Some(v) => return Err(cfg.unsupported("only_cross_attention", v, "false")),
    }
    if cfg.get("time_embedding_dim").is_some() {
        let d = cfg.usize("time_embedding_dim")?;
        if d != block_out_channels[0] * 4 {
            return Err(cfg.unsupported(
                "time_embedding_dim",
                d,
                "null (4 × block_out_channels[0])",
            ));
        }
    }
    if cfg.get("encoder_hid_dim").is_some() {
        return Err(cfg.unsupported(
            "encoder_hid_dim",
            cfg.get("encoder_hid_dim").unwrap(),
            "null",
        ));
    }
    if (cfg.f64_or("resnet_out_scale_factor", 1.0)? - 1.0).abs() > 0.0 {
        return Err(cfg.unsupported(
            "resnet_out_scale_factor",
            cfg.get("resnet_out_scale_factor").unwrap(),
            "1.0",
        ));
    }
    Ok(())
}

/// (conv_in_kernel, conv_out_kernel).
fn parse_conv_kernels(cfg: &Config) -> Result<(usize, usize)> {
    let conv_in_kernel = cfg.usize_or("conv_in_kernel", 3)?;
    let conv_out_kernel = cfg.usize_or("conv_out_kernel", 3)?;
    for (f, k) in [
        ("conv_in_kernel", conv_in_kernel),
        ("conv_out_kernel", conv_out_kernel),
    ] {
        if k % 2 == 0 {
            return Err(cfg.unsupported(f, k, "an odd kernel size"));
        }
    }
    Ok((conv_in_kernel, conv_out_kernel))
}

fn parse_time_cond_proj_dim(cfg: &Config, controlnet: bool) -> Result<Option<usize>> {
    match cfg.get("time_cond_proj_dim") {
        None | Some(serde_json::Value::Null) => Ok(None),
        // ControlNetModel has the same option; no distilled ControlNet is supported yet.
        Some(v) if controlnet => Err(cfg.unsupported("time_cond_proj_dim", v, "null")),
        Some(_) => Ok(Some(cfg.usize("time_cond_proj_dim")?)),
    }
}
