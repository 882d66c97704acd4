//! Component configs read off tensor shapes, for single files without a config folder. What the
//! shapes cannot say is filled in the way diffusers' LDM-config path does for the released
//! families (see `docs/models.md`, "Single-file checkpoints"): GroupNorm 32, SD1's 8 heads,
//! 64-wide heads for SD2 / SDXL, SDXL's 256-wide time embedding, the families' sample sizes and
//! VAE scaling factors.

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};

/// Stored name (component prefix removed) → shape.
pub type Shapes = BTreeMap<String, Vec<usize>>;

fn shape<'a>(s: &'a Shapes, name: &str) -> Result<&'a [usize]> {
    s.get(name)
        .map(|v| v.as_slice())
        .ok_or_else(|| anyhow!("missing tensor `{name}`"))
}

fn dim(s: &Shapes, name: &str, d: usize) -> Result<usize> {
    shape(s, name)?
        .get(d)
        .copied()
        .ok_or_else(|| anyhow!("tensor `{name}` has fewer than {} dimensions", d + 1))
}

/// The distinct integers at position `pos` of names starting with `prefix`.
fn indices(s: &Shapes, prefix: &str) -> BTreeSet<usize> {
    s.keys()
        .filter_map(|k| k.strip_prefix(prefix))
        .filter_map(|r| r.split('.').next()?.parse().ok())
        .collect()
}

/// What the UNet-shaped part of a UNet or ControlNet looks like.
pub struct UnetShape {
    pub layers: usize,
    pub channels: Vec<usize>,
    pub down_attn: Vec<bool>,
    pub depth: Vec<usize>,
    pub up_attn: Vec<bool>,
    pub context: usize,
    pub linear: bool,
}

pub fn unet_shape(s: &Shapes, with_up: bool) -> Result<UnetShape> {
    let levels = input_levels(s)?;
    let layers = resblocks(s, &levels[0])?.len();
    if layers == 0 {
        bail!("input_blocks.1 is not a ResBlock");
    }
    let (channels, down_attn, depth) = level_shapes(s, &levels, layers)?;
    let per = layers + 1;
    let up_attn = if with_up {
        (0..levels.len())
            .map(|b| s.contains_key(&format!("output_blocks.{}.1.proj_in.weight", b * per)))
            .collect()
    } else {
        Vec::new()
    };
    let attn2 = s
        .keys()
        .find(|k| k.ends_with("attn2.to_k.weight"))
        .ok_or_else(|| {
            anyhow!("no cross-attention (attn2.to_k.weight): not a text-conditioned UNet")
        })?;
    let context = dim(s, attn2, 1)?;
    let proj = s
        .keys()
        .find(|k| k.ends_with(".proj_in.weight"))
        .ok_or_else(|| anyhow!("no proj_in.weight"))?;
    Ok(UnetShape {
        layers,
        channels,
        down_attn,
        depth,
        up_attn,
        context,
        linear: shape(s, proj)?.len() == 2,
    })
}

/// The input block indices after input_blocks.0, grouped by resolution level.
fn input_levels(s: &Shapes) -> Result<Vec<Vec<usize>>> {
    let ib: Vec<usize> = indices(s, "input_blocks.").into_iter().collect();
    if ib.first() != Some(&0) || ib.len() < 2 {
        bail!("no input_blocks.0 / input_blocks.1: not a UNet");
    }
    // A downsampler (input_blocks.i.0.op) ends each level but the last.
    let mut levels: Vec<Vec<usize>> = vec![Vec::new()];
    for &i in &ib[1..] {
        levels.last_mut().unwrap().push(i);
        // A downsampler with only its bias lost its weight: name it rather than merge two levels.
        if has_prefix(s, &format!("input_blocks.{i}.0.op.")) {
            shape(s, &format!("input_blocks.{i}.0.op.weight"))?;
            levels.push(Vec::new());
        }
    }
    Ok(levels)
}

/// Whether any tensor name starts with `prefix`.
fn has_prefix(s: &Shapes, prefix: &str) -> bool {
    s.range(prefix.to_string()..)
        .next()
        .is_some_and(|(k, _)| k.starts_with(prefix))
}

/// The input blocks of level `lv` that are ResBlocks: any of a ResBlock's `in_layers`,
/// `emb_layers` or `out_layers` tensors makes one, and its `in_layers.2.weight` (the conv the
/// channels are read from) must be there: a file that lost it is missing that tensor, which would
/// otherwise read as a level with fewer ResBlocks (a layout puzzle).
fn resblocks(s: &Shapes, lv: &[usize]) -> Result<Vec<usize>> {
    let mut found = Vec::new();
    for &i in lv {
        let p = format!("input_blocks.{i}.0.");
        let is_res = ["in_layers.", "emb_layers.", "out_layers."]
            .iter()
            .any(|l| has_prefix(s, &format!("{p}{l}")));
        if is_res {
            shape(s, &format!("{p}in_layers.2.weight"))?;
            found.push(i);
        }
    }
    Ok(found)
}

/// Per level: its channels, whether it has attentions, and their transformer depth. Every level
/// must have `layers` ResBlocks.
fn level_shapes(
    s: &Shapes,
    levels: &[Vec<usize>],
    layers: usize,
) -> Result<(Vec<usize>, Vec<bool>, Vec<usize>)> {
    let (mut channels, mut down_attn, mut depth) = (Vec::new(), Vec::new(), Vec::new());
    for (b, lv) in levels.iter().enumerate() {
        let r = resblocks(s, lv)?;
        if r.len() != layers {
            bail!(
                "level {b} has {} ResBlocks, level 0 has {layers}: not a layout diffusers can build",
                r.len()
            );
        }
        channels.push(dim(
            s,
            &format!("input_blocks.{}.0.in_layers.2.weight", r[0]),
            0,
        )?);
        let d = indices(s, &format!("input_blocks.{}.1.transformer_blocks.", r[0])).len();
        down_attn.push(d > 0);
        depth.push(d);
    }
    Ok((channels, down_attn, depth))
}

/// SD1 (OpenAI CLIP-L context) uses 8 heads everywhere; SD2 / SDXL 64-wide heads.
fn heads(u: &UnetShape) -> Value {
    if u.context == 768 {
        json!(8)
    } else {
        json!(u
            .channels
            .iter()
            .map(|c| (c / 64).max(1))
            .collect::<Vec<_>>())
    }
}

fn common_unet(u: &UnetShape, s: &Shapes, family: &str) -> Result<serde_json::Map<String, Value>> {
    let down: Vec<&str> = u
        .down_attn
        .iter()
        .map(|&a| {
            if a {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
        })
        .collect();
    let mid_depth = indices(s, "middle_block.1.transformer_blocks.").len();
    let mut tl: Vec<usize> = u.depth.iter().map(|&d| d.max(1)).collect();
    if mid_depth > 0 && mid_depth != *tl.last().unwrap() {
        bail!(
            "the mid block has {mid_depth} transformer layers, the last level {}: diffusers ties them",
            tl.last().unwrap()
        );
    }
    if tl.is_empty() {
        tl.push(1);
    }
    let mut c = serde_json::Map::new();
    let in_channels = dim(s, "input_blocks.0.0.weight", 1)?;
    c.insert("in_channels".into(), json!(in_channels));
    c.insert("block_out_channels".into(), json!(u.channels));
    c.insert("layers_per_block".into(), json!(u.layers));
    c.insert("down_block_types".into(), json!(down));
    c.insert("transformer_layers_per_block".into(), json!(tl));
    c.insert("cross_attention_dim".into(), json!(u.context));
    c.insert("use_linear_projection".into(), json!(u.linear));
    // SD 2.1 768-v computes attention in f32 (its fp16 attention overflows); its inpainting
    // model and every other family do not.
    c.insert(
        "upcast_attention".into(),
        json!(family == "sd2" && in_channels != 9),
    );
    c.insert("attention_head_dim".into(), heads(u));
    c.insert("norm_num_groups".into(), json!(32));
    c.insert(
        "sample_size".into(),
        json!(match family {
            // SD 2.x 768-v; its inpainting model is a 512 one
            "sd2" if in_channels != 9 => 96,
            "sdxl" => 128,
            _ => 64,
        }),
    );
    if s.contains_key("label_emb.0.0.weight") {
        c.insert("addition_embed_type".into(), json!("text_time"));
        c.insert("addition_time_embed_dim".into(), json!(256));
        c.insert(
            "projection_class_embeddings_input_dim".into(),
            json!(dim(s, "label_emb.0.0.weight", 1)?),
        );
    }
    Ok(c)
}

pub fn unet_config(s: &Shapes, family: &str) -> Result<Value> {
    let u = unet_shape(s, true)?;
    let mut c = common_unet(&u, s, family)?;
    let up: Vec<&str> = u
        .up_attn
        .iter()
        .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" })
        .collect();
    c.insert("_class_name".into(), json!("UNet2DConditionModel"));
    c.insert("out_channels".into(), json!(dim(s, "out.2.weight", 0)?));
    c.insert("up_block_types".into(), json!(up));
    Ok(Value::Object(c))
}

pub fn controlnet_config(s: &Shapes, hint_convs: &[usize]) -> Result<Value> {
    let u = unet_shape(s, false)?;
    let mut c = common_unet(&u, s, if u.context == 768 { "sd1" } else { "sd2" })?;
    c.insert("_class_name".into(), json!("ControlNetModel"));
    c.insert("controlnet_conditioning_channel_order".into(), json!("rgb"));
    c.insert("global_pool_conditions".into(), json!(false));
    c.remove("sample_size");
    let first = *hint_convs
        .first()
        .ok_or_else(|| anyhow!("no input_hint_block convolutions"))?;
    c.insert(
        "conditioning_channels".into(),
        json!(dim(s, &format!("input_hint_block.{first}.weight"), 1)?),
    );
    // conv_in, then pairs of blocks (same width, then a stride-2 step to the next), conv_out.
    let inner = &hint_convs[1..hint_convs.len().saturating_sub(1)];
    let mut widths = vec![dim(s, &format!("input_hint_block.{first}.weight"), 0)?];
    for pair in inner.chunks(2) {
        if let Some(&i) = pair.get(1) {
            widths.push(dim(s, &format!("input_hint_block.{i}.weight"), 0)?);
        }
    }
    c.insert("conditioning_embedding_out_channels".into(), json!(widths));
    Ok(Value::Object(c))
}

/// `inpaint`: the checkpoint's UNet is a 9-channel one (SD 2's inpainting model is a 512 model).
pub fn vae_config(s: &Shapes, family: &str, inpaint: bool) -> Result<Value> {
    let levels = indices(s, "encoder.down.").len();
    if levels == 0 {
        bail!("no encoder.down.* blocks: not an AutoencoderKL");
    }
    let channels = (0..levels)
        .map(|i| dim(s, &format!("encoder.down.{i}.block.0.conv1.weight"), 0))
        .collect::<Result<Vec<_>>>()?;
    let sdxl = family == "sdxl";
    Ok(json!({
        "_class_name": "AutoencoderKL",
        "in_channels": dim(s, "encoder.conv_in.weight", 1)?,
        "out_channels": dim(s, "decoder.conv_out.weight", 0)?,
        "latent_channels": dim(s, "decoder.conv_in.weight", 1)?,
        "block_out_channels": channels,
        "layers_per_block": indices(s, "encoder.down.0.block.").len(),
        "down_block_types": vec!["DownEncoderBlock2D"; levels],
        "up_block_types": vec!["UpDecoderBlock2D"; levels],
        "norm_num_groups": 32,
        "sample_size": if sdxl { 1024 } else if family == "sd2" && !inpaint { 768 } else { 512 },
        "scaling_factor": if sdxl { 0.13025 } else { 0.18215 },
        // diffusers' AutoencoderKL default; the released configs all keep it
        "force_upcast": true,
    }))
}

/// OpenAI CLIP text encoder (transformers names, `text_model.` kept).
pub fn clip_config(s: &Shapes) -> Result<Value> {
    let emb = shape(s, "text_model.embeddings.token_embedding.weight")?;
    let hidden = emb[1];
    Ok(json!({
        "architectures": ["CLIPTextModel"],
        "vocab_size": emb[0],
        "hidden_size": hidden,
        "num_hidden_layers": indices(s, "text_model.encoder.layers.").len(),
        "num_attention_heads": (hidden / 64).max(1),
        "intermediate_size": dim(s, "text_model.encoder.layers.0.mlp.fc1.weight", 0)?,
        "max_position_embeddings": dim(s, "text_model.embeddings.position_embedding.weight", 0)?,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "eos_token_id": 2,
    }))
}

/// OpenCLIP text tower: SD 2.x runs all blocks but the last (`penultimate`), SDXL all of them
/// with the projection.
pub fn open_clip_config(s: &Shapes, penultimate: bool) -> Result<Value> {
    let emb = shape(s, "token_embedding.weight")?;
    let hidden = emb[1];
    let blocks = indices(s, "transformer.resblocks.").len();
    let layers = if penultimate {
        blocks.saturating_sub(1)
    } else {
        blocks
    };
    if layers == 0 {
        bail!("no transformer.resblocks.*");
    }
    let mut c = json!({
        "architectures": [if penultimate { "CLIPTextModel" } else { "CLIPTextModelWithProjection" }],
        "vocab_size": emb[0],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": (hidden / 64).max(1),
        "intermediate_size": dim(s, "transformer.resblocks.0.mlp.c_fc.weight", 0)?,
        "max_position_embeddings": dim(s, "positional_embedding", 0)?,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "eos_token_id": 2,
    });
    if !penultimate {
        c["projection_dim"] = json!(dim(s, "text_projection", 1)?);
    }
    Ok(c)
}

/// Number of VAE resolution levels.
pub fn vae_levels(s: &Shapes) -> usize {
    indices(s, "encoder.down.").len()
}
