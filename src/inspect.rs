//! `toffee inspect`: what a checkpoint folder or file is, as far as the engine understands it.

use crate::backend::Device;
use crate::config::Config;
use crate::models::load::{self, normalise_text_encoder, Checkpoint};
use crate::weights::layout::open_weights;
use crate::weights::single_file::SingleFile;
use crate::weights::WeightStore;
use anyhow::{bail, Context, Result};
use std::fmt::Write;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Unet,
    ControlNet,
    Vae,
    ClipText,
    /// ViTModel (DINO v1), Dinov2Model, CLIPVisionModel(WithProjection), CLIPModel.
    Vision,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::Unet => "UNet2DConditionModel",
            Family::ControlNet => "ControlNetModel",
            Family::Vae => "AutoencoderKL",
            Family::ClipText => "CLIPTextModel",
            Family::Vision => "vision transformer",
        }
    }
}

/// The family from config.json's `_class_name` (diffusers) or `architectures` (transformers).
pub fn family_of(cfg: &Config) -> Result<Family> {
    if let Some(c) = cfg.opt_str("_class_name")? {
        return match c {
            "UNet2DConditionModel" => Ok(Family::Unet),
            "ControlNetModel" => Ok(Family::ControlNet),
            "AutoencoderKL" => Ok(Family::Vae),
            other => Err(cfg.unsupported(
                "_class_name",
                other,
                "UNet2DConditionModel, ControlNetModel, AutoencoderKL",
            )),
        };
    }
    const VISION_TYPES: [&str; 6] = [
        "vit",
        "dino",
        "dinov2",
        "dinov2_with_registers",
        "clip_vision_model",
        "clip",
    ];
    if let Some(t) = cfg.opt_str("model_type")? {
        if VISION_TYPES.contains(&t) {
            return Ok(Family::Vision);
        }
    }
    if let Some(a) = cfg.get("architectures").and_then(|a| a.as_array()) {
        for v in a {
            if matches!(
                v.as_str(),
                Some("CLIPTextModel" | "CLIPTextModelWithProjection")
            ) {
                return Ok(Family::ClipText);
            }
        }
        return Err(cfg.unsupported(
            "architectures",
            serde_json::Value::Array(a.clone()),
            "CLIPTextModel, CLIPTextModelWithProjection, or a vision model_type (vit, dinov2, \
             dinov2_with_registers, clip_vision_model, clip)",
        ));
    }
    if cfg.opt_str("model_type")? == Some("clip_text_model") {
        return Ok(Family::ClipText);
    }
    bail!("{}: cannot recognise the model: no `_class_name` (diffusers) or `architectures` (transformers) field", cfg.path.display())
}

/// A one-line variant description for the family.
pub fn variant(family: Family, cfg: &Config) -> Result<String> {
    match family {
        Family::Unet | Family::ControlNet => unet_variant(cfg),
        Family::Vae => Ok(format!(
            "latent_channels {}, scaling_factor {}, {}",
            cfg.usize_or("latent_channels", 4)?,
            cfg.f64_or("scaling_factor", 0.18215)?,
            if crate::models::vae::force_upcast(cfg)? {
                "runs in bf16 on GPUs (force_upcast: fp16 would overflow)"
            } else {
                "runs in the pipeline's fp16/bf16 on GPUs"
            }
        )),
        Family::Vision => vision_variant(cfg),
        Family::ClipText => {
            let proj = cfg
                .get("architectures")
                .map(|a| a.to_string().contains("WithProjection"))
                .unwrap_or(false);
            Ok(format!(
                "{}hidden_size {}, {} layers, {}",
                if proj { "with projection, " } else { "" },
                cfg.usize("hidden_size")?,
                cfg.usize("num_hidden_layers")?,
                cfg.str_or("hidden_act", "quick_gelu")?
            ))
        }
    }
}

/// [`variant`] of a UNet or ControlNet.
fn unet_variant(cfg: &Config) -> Result<String> {
    let base = if cfg.opt_str("addition_embed_type")? == Some("text_time") {
        "SDXL-style (text_time added embeddings)"
    } else if cfg.bool_or("use_linear_projection", false)? {
        "SD2.x-style (linear projection)"
    } else {
        "SD1.x-style"
    };
    let inc = cfg.usize_or("in_channels", 4)?;
    let extra = match inc {
        4 => String::new(),
        9 => ", inpainting (9 input channels)".into(),
        n => format!(", {n} input channels"),
    };
    let ctx = cfg
        .get("cross_attention_dim")
        .map(|v| v.to_string())
        .unwrap_or_default();
    Ok(format!("{base}{extra}, cross_attention_dim {ctx}"))
}

/// [`variant`] of a vision transformer.
fn vision_variant(cfg: &Config) -> Result<String> {
    let c = crate::models::vit::VitConfig::parse(cfg)?;
    let class = cfg
        .get("architectures")
        .and_then(|a| a.as_array())
        .and_then(|a| a.first())
        .and_then(|v| v.as_str())
        .unwrap_or(c.kind.class_name())
        .to_string();
    let mut s = format!(
        "{class}: image size {}, patch size {}, hidden_size {}, {} layers, {} heads, {}",
        c.image_size,
        c.patch,
        c.hidden,
        c.layers,
        c.heads,
        format!("{:?}", c.act).to_lowercase()
    );
    if c.swiglu {
        s += ", SwiGLU MLP";
    }
    if c.registers > 0 {
        s += &format!(", {} register tokens", c.registers);
    }
    if let Some(p) = c.projection_dim {
        s += &format!(", projection_dim {p}");
    }
    if cfg.get("text_config").is_some() {
        s += ", with the CLIP text tower";
    }
    Ok(s)
}

fn human_bytes(n: usize) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", units[u])
    }
}

/// Digits in groups of three: 859,520,964.
pub fn grouped(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn weights_summary(w: &WeightStore) -> String {
    let mut bytes = 0;
    let dtypes: Vec<String> = w
        .dtype_summary()
        .iter()
        .map(|(d, (b, n))| {
            bytes += b;
            format!("{} × {}", grouped(*n), d.name())
        })
        .collect();
    format!(
        "{} parameters ({}), {}",
        grouped(w.param_count()),
        dtypes.join(", "),
        human_bytes(bytes)
    )
}

/// Describes one model folder and returns its parameter count; with `load`, also builds the model
/// (every tensor read and checked).
fn describe_model(dir: &Path, sub: &str, load_model: bool, out: &mut String) -> Result<usize> {
    let cfg = Config::read_dir(dir)?;
    let fam = family_of(&cfg)?;
    let mut w = open_weights(dir)?;
    if fam == Family::ClipText {
        normalise_text_encoder(&mut w);
    }
    writeln!(out, "{sub}: {} — {}", fam.name(), variant(fam, &cfg)?).unwrap();
    writeln!(out, "  weights: {}", weights_summary(&w)).unwrap();
    let public: serde_json::Map<String, serde_json::Value> = cfg
        .json
        .iter()
        .filter(|(k, _)| !k.starts_with('_'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    writeln!(out, "  config: {}", serde_json::Value::Object(public)).unwrap();
    if load_model {
        match fam {
            Family::Unet => drop(load::load_unet(dir, &Device::Cpu)?),
            Family::ControlNet => drop(load::load_controlnet(dir, &Device::Cpu)?),
            Family::Vae => drop(load::load_vae(dir, &Device::Cpu)?),
            Family::ClipText => drop(load::load_text_encoder(dir, sub, &Device::Cpu)?),
            Family::Vision => drop(load::load_image_encoder(dir, &Device::Cpu)?),
        }
        writeln!(out, "  loaded: ok").unwrap();
    }
    Ok(w.param_count())
}

pub fn inspect(path: &Path, load_model: bool) -> Result<String> {
    let mut out = String::new();
    if !path.exists() {
        bail!("{}: no such file or directory", path.display());
    }
    if path.join("adapter_config.json").is_file()
        || (path.is_file() && WeightStore::open_file(path)?.contains("ip_adapter.1.to_k_ip.weight"))
    {
        return describe_adapter(path);
    }
    if path.is_file() && looks_original(&WeightStore::open_file(path)?) {
        return describe_single_file(path, load_model);
    }
    // Not a folder: a weights file, or the error that says what else it is (a FIFO, a device).
    if !path.is_dir() {
        let w = WeightStore::open_file(path)?;
        let kind = guess_from_names(&w);
        writeln!(out, "{}: safetensors file — {kind}", path.display()).unwrap();
        writeln!(out, "  weights: {}", weights_summary(&w)).unwrap();
        return Ok(out);
    }
    let index = path.join("model_index.json");
    if index.is_file() {
        return describe_pipeline(path, &index, load_model);
    }
    if path.join("config.json").is_file() {
        let sub = path
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        describe_model(path, &sub, load_model, &mut out)?;
        return Ok(out);
    }
    bail!("{}: cannot recognise: neither a diffusers pipeline (model_index.json), a model folder (config.json), nor a safetensors file", path.display())
}

/// An IP-Adapter: what it is and, for toffee adapters, which image-encoder tokens it takes.
fn describe_adapter(path: &Path) -> Result<String> {
    let mut out = String::new();
    let a = crate::models::adapter::Adapter::load(path, &Device::Cpu)?;
    writeln!(out, "{}: {}", path.display(), a.describe()).unwrap();
    if let Some(sel) = &a.selection {
        writeln!(
            out,
            "  tokens: {} of `{}`{}",
            if sel.patch_only {
                "patch tokens"
            } else {
                "all tokens"
            },
            sel.output,
            a.image_encoder
                .as_ref()
                .map(|e| format!(", image encoder {e}"))
                .unwrap_or_default()
        )
        .unwrap();
    }
    Ok(out)
}

/// A diffusers pipeline folder: each model component, then the other components present.
fn describe_pipeline(path: &Path, index: &Path, load_model: bool) -> Result<String> {
    let mut out = String::new();
    let cfg = Config::read(index)?;
    let class = cfg.str_or("_class_name", "unknown pipeline")?.to_string();
    writeln!(out, "{}: diffusers pipeline ({class})", path.display()).unwrap();
    let mut total = 0;
    for sub in [
        "unet",
        "controlnet",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "image_encoder",
    ] {
        let d = path.join(sub);
        if d.join("config.json").is_file() {
            total += describe_model(&d, sub, load_model, &mut out)
                .with_context(|| format!("{}: component `{sub}`", path.display()))?;
        }
    }
    for sub in ["tokenizer", "tokenizer_2", "scheduler", "feature_extractor"] {
        if path.join(sub).is_dir() {
            writeln!(out, "{sub}: present").unwrap();
        }
    }
    writeln!(out, "total: {} parameters", grouped(total)).unwrap();
    Ok(out)
}

/// Tensor names of the original (LDM / SGM) layouts.
fn looks_original(w: &WeightStore) -> bool {
    w.names().any(|n| {
        [
            "model.diffusion_model.",
            "first_stage_model.",
            "cond_stage_model.",
            "conditioner.embedders.",
            "control_model.",
            "input_hint_block.",
            "encoder.down.",
        ]
        .iter()
        .any(|p| n.starts_with(p))
    })
}

/// A single-file checkpoint: its family, and per component where the config comes from, the
/// parameter count and what would be loaded.
fn describe_single_file(path: &Path, load_model: bool) -> Result<String> {
    let mut out = String::new();
    let sf = SingleFile::open(path)?;
    writeln!(
        out,
        "{}: single-file checkpoint — {}{}",
        path.display(),
        sf.family.describe(),
        if sf.is_inpaint() {
            ", inpainting (9-channel UNet)"
        } else {
            ""
        }
    )
    .unwrap();
    match sf.config_dir() {
        Some(d) => writeln!(out, "  configs: from {} (sidecar)", d.display()).unwrap(),
        None => writeln!(out, "  configs: inferred from the tensor shapes").unwrap(),
    }
    let mut total = 0;
    for sub in sf.components() {
        total += describe_single_file_component(path, sub, load_model, &mut out)?;
    }
    if sf.components().contains(&"unet") {
        describe_single_file_pipeline(&sf, &mut out)?;
    }
    let unused = sf.unused_tensors();
    if unused > 0 {
        writeln!(
            out,
            "unused: {unused} tensors outside the components (not loaded)"
        )
        .unwrap();
    }
    writeln!(out, "total: {} parameters", grouped(total)).unwrap();
    Ok(out)
}

/// One component of a single-file checkpoint (appended to `out`); returns its parameter count.
fn describe_single_file_component(
    path: &Path,
    sub: &str,
    load_model: bool,
    out: &mut String,
) -> Result<usize> {
    let ck = Checkpoint::open(path, sub)?;
    let n = ck.weights.param_count();
    writeln!(
        out,
        "{sub}: {} parameters — {}",
        grouped(n),
        weights_summary(&ck.weights)
    )
    .unwrap();
    let public: serde_json::Map<String, serde_json::Value> = ck
        .config
        .json
        .iter()
        .filter(|(k, _)| !k.starts_with('_'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    writeln!(out, "  config: {}", serde_json::Value::Object(public)).unwrap();
    if load_model {
        match sub {
            "unet" => drop(load::load_unet(path, &Device::Cpu)?),
            "controlnet" => drop(load::load_controlnet(path, &Device::Cpu)?),
            "vae" => drop(load::load_vae(path, &Device::Cpu)?),
            _ => drop(load::load_text_encoder(path, sub, &Device::Cpu)?),
        }
        writeln!(out, "  loaded: ok").unwrap();
    }
    Ok(n)
}

/// Where a single-file checkpoint's scheduler and tokenizer come from.
fn describe_single_file_pipeline(sf: &SingleFile, out: &mut String) -> Result<()> {
    let sched = sf.scheduler_config()?;
    writeln!(
        out,
        "scheduler: {} ({}), prediction_type {}",
        sched.str_or("_class_name", "?")?,
        if sf.config_dir().is_some() {
            "config folder"
        } else {
            "built-in default for the family"
        },
        sched.str_or("prediction_type", "epsilon")?
    )
    .unwrap();
    writeln!(
        out,
        "tokenizer: {}",
        if sf.config_dir().is_some() {
            "config folder"
        } else {
            "built-in CLIP vocabulary"
        }
    )
    .unwrap();
    Ok(())
}

fn guess_from_names(w: &WeightStore) -> &'static str {
    let has = |p: &str| w.names().any(|n| n.starts_with(p));
    if has("model.diffusion_model.") {
        "original (LDM) single-file Stable Diffusion checkpoint"
    } else if has("controlnet_cond_embedding.") {
        "ControlNetModel weights (diffusers names)"
    } else if has("encoder.conv_in.") && has("decoder.") {
        "AutoencoderKL weights (diffusers names)"
    } else if has("down_blocks.") && has("conv_in.") {
        "UNet2DConditionModel weights (diffusers names)"
    } else if has("vision_model.") || has("embeddings.patch_embeddings.") {
        "vision transformer weights (transformers names: CLIP vision, ViT or DINOv2)"
    } else if has("text_model.") || has("encoder.layers.") {
        "CLIP text encoder weights (transformers names)"
    } else {
        "unrecognised tensor names"
    }
}
