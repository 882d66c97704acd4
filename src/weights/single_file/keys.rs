//! Original (LDM / SGM) tensor names → diffusers / transformers names: the forward direction of
//! what `tools/fixtures/single_file.py` writes in reverse (and diffusers' `single_file_utils`
//! converts). Each function takes the stored names under one component prefix (prefix removed)
//! and returns (diffusers name, stored name without prefix, op).

use crate::weights::Op;
use anyhow::{bail, Result};

pub type Mapping = Vec<(String, String, Op)>;

fn num(s: &str) -> Option<usize> {
    s.parse().ok()
}

/// LDM ResBlock → diffusers ResnetBlock2D (UNet and ControlNet).
fn unet_resnet(rest: &str) -> Option<String> {
    let (head, leaf) = rest.rsplit_once('.')?;
    let new = match head {
        "in_layers.0" => "norm1",
        "in_layers.2" => "conv1",
        "emb_layers.1" => "time_emb_proj",
        "out_layers.0" => "norm2",
        "out_layers.3" => "conv2",
        "skip_connection" => "conv_shortcut",
        _ => return None,
    };
    Some(format!("{new}.{leaf}"))
}

/// UNet (`model.diffusion_model.`) or ControlNet (`control_model.`) names. `layers` is
/// layers_per_block; `up_attn[b]` whether up level b has attentions (its upsampler then sits in
/// slot 2, not 1); `hint_convs` the input_hint_block conv indices (ControlNet only).
pub fn unet(
    names: &[&str],
    layers: usize,
    up_attn: &[bool],
    hint_convs: &[usize],
) -> Result<Mapping> {
    let mut out = Mapping::new();
    for &name in names {
        match unet_key(name, layers, up_attn, hint_convs) {
            Some(m) => out.push((m, name.to_string(), Op::Whole)),
            None => bail!("unrecognised tensor `{name}`"),
        }
    }
    Ok(out)
}

/// The diffusers name of one UNet / ControlNet tensor (see [`unet`]); `None` when unrecognised.
fn unet_key(name: &str, layers: usize, up_attn: &[bool], hint_convs: &[usize]) -> Option<String> {
    let p: Vec<&str> = name.splitn(4, '.').collect();
    match p.as_slice() {
        ["time_embed", i, leaf] => match *i {
            "0" => Some(format!("time_embedding.linear_1.{leaf}")),
            "2" => Some(format!("time_embedding.linear_2.{leaf}")),
            _ => None,
        },
        ["label_emb", "0", i, leaf] => match *i {
            "0" => Some(format!("add_embedding.linear_1.{leaf}")),
            "2" => Some(format!("add_embedding.linear_2.{leaf}")),
            _ => None,
        },
        ["input_blocks", "0", "0", leaf] => Some(format!("conv_in.{leaf}")),
        ["input_blocks", i, slot, rest] => num(i)
            .filter(|&i| i > 0)
            .and_then(|i| unet_input_block(i, slot, rest, layers)),
        ["middle_block", i, rest @ ..] => unet_middle_block(i, &rest.join(".")),
        ["output_blocks", j, slot, rest] => {
            num(j).and_then(|j| unet_output_block(j, slot, rest, layers, up_attn))
        }
        ["out", i, leaf] => match *i {
            "0" => Some(format!("conv_norm_out.{leaf}")),
            "2" => Some(format!("conv_out.{leaf}")),
            _ => None,
        },
        ["zero_convs", i, "0", leaf] => Some(format!("controlnet_down_blocks.{i}.{leaf}")),
        ["middle_block_out", "0", leaf] => Some(format!("controlnet_mid_block.{leaf}")),
        ["input_hint_block", i, leaf] => num(i).and_then(|i| controlnet_hint(i, leaf, hint_convs)),
        _ => None,
    }
}

/// `input_blocks.{i}.{slot}.{rest}` (i > 0): a down block's resnet, attention or downsampler.
fn unet_input_block(i: usize, slot: &str, rest: &str, layers: usize) -> Option<String> {
    let per = layers + 1;
    let (b, l) = ((i - 1) / per, (i - 1) % per);
    match (slot, l == layers) {
        ("0", false) => unet_resnet(rest).map(|r| format!("down_blocks.{b}.resnets.{l}.{r}")),
        ("1", false) => Some(format!("down_blocks.{b}.attentions.{l}.{rest}")),
        ("0", true) => rest
            .strip_prefix("op.")
            .map(|leaf| format!("down_blocks.{b}.downsamplers.0.conv.{leaf}")),
        _ => None,
    }
}

/// `middle_block.{i}.{rest}`: resnet, attention, resnet.
fn unet_middle_block(i: &str, rest: &str) -> Option<String> {
    match i {
        "0" => unet_resnet(rest).map(|r| format!("mid_block.resnets.0.{r}")),
        "1" => Some(format!("mid_block.attentions.0.{rest}")),
        "2" => unet_resnet(rest).map(|r| format!("mid_block.resnets.1.{r}")),
        _ => None,
    }
}

/// `output_blocks.{j}.{slot}.{rest}`: an up block's resnet, attention or upsampler.
fn unet_output_block(
    j: usize,
    slot: &str,
    rest: &str,
    layers: usize,
    up_attn: &[bool],
) -> Option<String> {
    let per = layers + 1;
    let (b, l) = (j / per, j % per);
    let attn = up_attn.get(b).copied().unwrap_or(false);
    match slot {
        "0" => unet_resnet(rest).map(|r| format!("up_blocks.{b}.resnets.{l}.{r}")),
        "1" if attn => Some(format!("up_blocks.{b}.attentions.{l}.{rest}")),
        "1" | "2" if l == layers => rest
            .strip_prefix("conv.")
            .map(|leaf| format!("up_blocks.{b}.upsamplers.0.conv.{leaf}")),
        _ => None,
    }
}

/// `input_hint_block.{i}.{leaf}`: the first of `hint_convs` is conv_in, the last conv_out, the
/// ones between are the embedding's blocks.
fn controlnet_hint(i: usize, leaf: &str, hint_convs: &[usize]) -> Option<String> {
    let pos = hint_convs.iter().position(|&h| h == i)?;
    Some(if pos == 0 {
        format!("controlnet_cond_embedding.conv_in.{leaf}")
    } else if pos + 1 == hint_convs.len() {
        format!("controlnet_cond_embedding.conv_out.{leaf}")
    } else {
        format!("controlnet_cond_embedding.blocks.{}.{leaf}", pos - 1)
    })
}

fn vae_resnet(rest: &str) -> Option<String> {
    let (head, leaf) = rest.rsplit_once('.')?;
    let new = match head {
        "norm1" | "conv1" | "norm2" | "conv2" => head,
        "nin_shortcut" => "conv_shortcut",
        _ => return None,
    };
    Some(format!("{new}.{leaf}"))
}

/// LDM AutoencoderKL names; `levels` is the number of resolution levels (decoder.up.k is
/// diffusers' up_blocks.(levels-1-k)).
pub fn vae(names: &[&str], levels: usize) -> Result<Mapping> {
    let mut out = Mapping::new();
    for &name in names {
        let mapped = vae_key(name, levels);
        // LDM's attention projections are 1×1 convolutions; diffusers' are Linear layers.
        let op = if name.contains(".mid.attn_1.")
            && !name.contains(".norm.")
            && name.ends_with(".weight")
        {
            Op::SqueezeConv1x1
        } else {
            Op::Whole
        };
        match mapped {
            Some(m) => out.push((m, name.to_string(), op)),
            None => bail!("unrecognised tensor `{name}`"),
        }
    }
    Ok(out)
}

/// The diffusers name of one AutoencoderKL tensor (see [`vae`]); `None` when unrecognised.
fn vae_key(name: &str, levels: usize) -> Option<String> {
    let p: Vec<&str> = name.split('.').collect();
    match p.as_slice() {
        [coder @ ("encoder" | "decoder"), conv @ ("conv_in" | "conv_out"), leaf] => {
            Some(format!("{coder}.{conv}.{leaf}"))
        }
        [coder @ ("encoder" | "decoder"), "norm_out", leaf] => {
            Some(format!("{coder}.conv_norm_out.{leaf}"))
        }
        [conv @ ("quant_conv" | "post_quant_conv"), leaf] => Some(format!("{conv}.{leaf}")),
        ["encoder", "down", i, "block", j, rest @ ..] => {
            vae_resnet(&rest.join(".")).map(|r| format!("encoder.down_blocks.{i}.resnets.{j}.{r}"))
        }
        ["encoder", "down", i, "downsample", "conv", leaf] => Some(format!(
            "encoder.down_blocks.{i}.downsamplers.0.conv.{leaf}"
        )),
        ["decoder", "up", k, rest @ ..] => num(k)
            .filter(|&k| k < levels)
            .and_then(|k| vae_up_block(levels - 1 - k, rest)),
        [coder @ ("encoder" | "decoder"), "mid", block, rest @ ..] => {
            vae_mid_block(coder, block, &rest.join("."))
        }
        _ => None,
    }
}

/// `decoder.up.{k}.{rest}`, diffusers' up block `b`: its resnets or upsampler.
fn vae_up_block(b: usize, rest: &[&str]) -> Option<String> {
    match rest {
        ["block", j, r @ ..] => {
            vae_resnet(&r.join(".")).map(|r| format!("decoder.up_blocks.{b}.resnets.{j}.{r}"))
        }
        ["upsample", "conv", leaf] => {
            Some(format!("decoder.up_blocks.{b}.upsamplers.0.conv.{leaf}"))
        }
        _ => None,
    }
}

/// `{coder}.mid.{block}.{rest}`: two resnets around one attention.
fn vae_mid_block(coder: &str, block: &str, rest: &str) -> Option<String> {
    match block {
        "block_1" => vae_resnet(rest).map(|r| format!("{coder}.mid_block.resnets.0.{r}")),
        "block_2" => vae_resnet(rest).map(|r| format!("{coder}.mid_block.resnets.1.{r}")),
        "attn_1" => rest.rsplit_once('.').and_then(|(head, leaf)| {
            let new = match head {
                "norm" => "group_norm",
                "q" => "to_q",
                "k" => "to_k",
                "v" => "to_v",
                "proj_out" => "to_out.0",
                _ => return None,
            };
            Some(format!("{coder}.mid_block.attentions.0.{new}.{leaf}"))
        }),
        _ => None,
    }
}

/// OpenAI CLIP in transformers names (`cond_stage_model.transformer.`): already the diffusers
/// names; `position_ids` buffers are dropped.
pub fn clip_hf(names: &[&str]) -> Result<Mapping> {
    let mut out = Mapping::new();
    for &name in names {
        if name.ends_with("position_ids") {
            continue;
        }
        if !name.starts_with("text_model.") && name != "text_projection.weight" {
            bail!("unrecognised tensor `{name}`");
        }
        out.push((name.to_string(), name.to_string(), Op::Whole));
    }
    Ok(out)
}

/// OpenCLIP's TextTransformer → transformers CLIPTextModel(WithProjection). `width` splits the
/// fused in_proj into q, k, v; blocks from `layers` on are not read (SD 2.x uses the penultimate
/// layer, so its files hold one block more than the model runs); `projection` keeps the
/// text_projection (SDXL's second encoder; SD 2.x ignores it).
pub fn open_clip(names: &[&str], width: usize, layers: usize, projection: bool) -> Result<Mapping> {
    let mut out = Mapping::new();
    for &name in names {
        match name {
            "token_embedding.weight" => {
                out.push(whole("text_model.embeddings.token_embedding.weight", name))
            }
            "positional_embedding" => out.push(whole(
                "text_model.embeddings.position_embedding.weight",
                name,
            )),
            "ln_final.weight" | "ln_final.bias" => out.push(whole(
                &format!("text_model.final_layer_norm.{}", &name[9..]),
                name,
            )),
            "text_projection" => {
                if projection {
                    out.push(("text_projection.weight".into(), name.into(), Op::Transpose));
                }
            }
            "logit_scale" | "attn_mask" => {}
            _ => open_clip_block(&mut out, name, width, layers)?,
        }
    }
    Ok(out)
}

/// `name` stored whole as `s`.
fn whole(s: &str, name: &str) -> (String, String, Op) {
    (s.to_string(), name.to_string(), Op::Whole)
}

/// One tensor of a `transformer.resblocks.` block (see [`open_clip`]), appended to `out`.
fn open_clip_block(out: &mut Mapping, name: &str, width: usize, layers: usize) -> Result<()> {
    let Some(rest) = name.strip_prefix("transformer.resblocks.") else {
        bail!("unrecognised tensor `{name}`");
    };
    let Some((n, rest)) = rest.split_once('.').and_then(|(n, r)| Some((num(n)?, r))) else {
        bail!("unrecognised tensor `{name}`");
    };
    if n >= layers {
        return Ok(());
    }
    let pre = format!("text_model.encoder.layers.{n}");
    match rest {
        "attn.in_proj_weight" | "attn.in_proj_bias" => {
            let leaf = if rest.ends_with("weight") {
                "weight"
            } else {
                "bias"
            };
            for (i, p) in ["q", "k", "v"].iter().enumerate() {
                out.push((
                    format!("{pre}.self_attn.{p}_proj.{leaf}"),
                    name.to_string(),
                    Op::Rows {
                        start: i * width,
                        len: width,
                    },
                ));
            }
        }
        _ => {
            let (head, leaf) = rest.rsplit_once('.').unwrap_or((rest, ""));
            let new = match head {
                "attn.out_proj" => "self_attn.out_proj",
                "ln_1" => "layer_norm1",
                "ln_2" => "layer_norm2",
                "mlp.c_fc" => "mlp.fc1",
                "mlp.c_proj" => "mlp.fc2",
                _ => bail!("unrecognised tensor `{name}`"),
            };
            out.push(whole(&format!("{pre}.{new}.{leaf}"), name));
        }
    }
    Ok(())
}

/// A diffusers UNet module name in SGM/LDM naming (the inverse of `unet`), for kohya LoRAs written
/// against original-layout models: `down_blocks.1.attentions.0.proj_in` → `input_blocks.4.1.proj_in`.
pub fn unet_to_ldm(module: &str, layers: usize, up_attn: &[bool]) -> Option<String> {
    let per = layers + 1;
    let p: Vec<&str> = module.splitn(5, '.').collect();
    match p.as_slice() {
        ["down_blocks", b, "resnets", l, rest] => {
            let i = 1 + num(b)? * per + num(l)?;
            Some(format!("input_blocks.{i}.0.{}", ldm_resnet(rest)?))
        }
        ["down_blocks", b, "attentions", l, rest] => {
            let i = 1 + num(b)? * per + num(l)?;
            Some(format!("input_blocks.{i}.1.{rest}"))
        }
        ["down_blocks", b, "downsamplers", "0", "conv"] => {
            Some(format!("input_blocks.{}.0.op", 1 + num(b)? * per + layers))
        }
        ["up_blocks", b, "resnets", l, rest] => {
            let j = num(b)? * per + num(l)?;
            Some(format!("output_blocks.{j}.0.{}", ldm_resnet(rest)?))
        }
        ["up_blocks", b, "attentions", l, rest] => {
            let j = num(b)? * per + num(l)?;
            Some(format!("output_blocks.{j}.1.{rest}"))
        }
        ["up_blocks", b, "upsamplers", "0", "conv"] => {
            let b = num(b)?;
            let slot = if *up_attn.get(b)? { 2 } else { 1 };
            Some(format!("output_blocks.{}.{slot}.conv", b * per + layers))
        }
        ["mid_block", "resnets", k, rest @ ..] => {
            let slot = if num(k)? == 0 { 0 } else { 2 };
            Some(format!(
                "middle_block.{slot}.{}",
                ldm_resnet(&rest.join("."))?
            ))
        }
        ["mid_block", "attentions", "0", rest @ ..] => {
            Some(format!("middle_block.1.{}", rest.join(".")))
        }
        ["time_embedding", l] => Some(format!(
            "time_embed.{}",
            if *l == "linear_1" { 0 } else { 2 }
        )),
        ["add_embedding", l] => Some(format!(
            "label_emb.0.{}",
            if *l == "linear_1" { 0 } else { 2 }
        )),
        ["conv_in"] => Some("input_blocks.0.0".into()),
        ["conv_out"] => Some("out.2".into()),
        ["conv_norm_out"] => Some("out.0".into()),
        _ => None,
    }
}

/// diffusers ResnetBlock2D → LDM ResBlock (the inverse of `unet_resnet`); `rest` may be a bare
/// module name.
fn ldm_resnet(rest: &str) -> Option<String> {
    let (head, tail) = rest.split_once('.').unwrap_or((rest, ""));
    let new = match head {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "time_emb_proj" => "emb_layers.1",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        _ => return None,
    };
    Some(if tail.is_empty() {
        new.to_string()
    } else {
        format!("{new}.{tail}")
    })
}
