//! From a path on disk to a loaded model: folder resolution, config, weights and the name
//! normalisations each family needs.

use super::clip_text::{self, ClipText};
use super::controlnet::ControlNet;
use super::unet::Unet;
use super::vae::{self, Vae};
use super::vit::{self, Vit};
use crate::backend::Device;
use crate::config::Config;
use crate::weights::layout::{component_dir, open_weights};
use crate::weights::lora::{unet_ldm_namer, Lora};
use crate::weights::single_file::{is_single_file, SingleFile};
use crate::weights::WeightStore;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// A model folder's config and weights.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: Config,
    pub weights: WeightStore,
}

impl Checkpoint {
    /// `path` is a pipeline folder (the `subfolder` component is used), a model folder, or a
    /// single-file checkpoint (its `subfolder` component).
    pub fn open(path: &Path, subfolder: &str) -> Result<Checkpoint> {
        if is_single_file(path) {
            let sf = SingleFile::open(path)?;
            let config = sf.config(subfolder)?;
            let weights = sf.weights(subfolder, &config)?;
            return Ok(Checkpoint {
                dir: path.to_path_buf(),
                config,
                weights,
            });
        }
        let dir = component_dir(path, subfolder)?;
        let config = Config::read_dir(&dir)?;
        let weights = open_weights(&dir)?;
        Ok(Checkpoint {
            dir,
            config,
            weights,
        })
    }
}

/// A folder's config must name the class the command loads (diffusers `_class_name`), when it
/// names one: a VAE folder given as the UNet is an error, not a confusing missing field.
fn expect_class(ck: &Checkpoint, classes: &[&str]) -> Result<()> {
    match ck.config.opt_str("_class_name")? {
        Some(c) if !classes.contains(&c) => bail!(
            "{}: `_class_name` is {c}, but {} was expected here",
            ck.config.path.display(),
            classes.join(" or ")
        ),
        _ => Ok(()),
    }
}

pub fn load_unet(path: &Path, device: &Device) -> Result<Unet> {
    load_unet_with(path, device, &[])
}

/// Adds the deltas of every LoRA that adapts `component` to the checkpoint's weights.
fn apply_loras(ck: &mut Checkpoint, component: &str, loras: &[Lora]) -> Result<()> {
    let ldm = unet_ldm_namer(&ck.weights);
    let none = |_: &str| None;
    for l in loras.iter().filter(|l| l.touches(component)) {
        let namer: &dyn Fn(&str) -> Option<String> = if component == "unet" { &ldm } else { &none };
        for (name, d) in l.deltas(component, &ck.weights, namer)? {
            ck.weights.add_delta(&name, d)?;
        }
    }
    Ok(())
}

/// A component's checkpoint with LoRA deltas attached (text encoders' names normalised), as the
/// loaders below build it: for tests and tools that read the fused weights themselves.
pub fn checkpoint_with_loras(path: &Path, component: &str, loras: &[Lora]) -> Result<Checkpoint> {
    let mut ck = Checkpoint::open(path, component)?;
    if component.starts_with("text_encoder") {
        normalise_text_encoder(&mut ck.weights);
    }
    apply_loras(&mut ck, component, loras)?;
    Ok(ck)
}

/// The UNet with LoRAs fused into its weights.
pub fn load_unet_with(path: &Path, device: &Device, loras: &[Lora]) -> Result<Unet> {
    let mut ck = Checkpoint::open(path, "unet")?;
    apply_loras(&mut ck, "unet", loras)?;
    expect_class(&ck, &["UNet2DConditionModel"])?;
    Unet::load(&ck.config, &ck.weights, device)
        .with_context(|| format!("loading the UNet from {}", ck.dir.display()))
}

pub fn load_controlnet(path: &Path, device: &Device) -> Result<ControlNet> {
    let ck = Checkpoint::open(path, "controlnet")?;
    expect_class(&ck, &["ControlNetModel"])?;
    ControlNet::load(&ck.config, &ck.weights, device)
        .with_context(|| format!("loading the ControlNet from {}", ck.dir.display()))
}

pub fn load_vae(path: &Path, device: &Device) -> Result<Vae> {
    let mut ck = Checkpoint::open(path, "vae")?;
    expect_class(&ck, &["AutoencoderKL"])?;
    ck.weights.normalise_names(vae::normalise_legacy_name);
    Vae::load(&ck.config, &ck.weights, device)
        .with_context(|| format!("loading the VAE from {}", ck.dir.display()))
}

/// `subfolder` is "text_encoder" or "text_encoder_2".
pub fn load_text_encoder(path: &Path, subfolder: &str, device: &Device) -> Result<ClipText> {
    load_text_encoder_with(path, subfolder, device, &[])
}

/// A text encoder with LoRAs fused into its weights.
pub fn load_text_encoder_with(
    path: &Path,
    subfolder: &str,
    device: &Device,
    loras: &[Lora],
) -> Result<ClipText> {
    let mut ck = Checkpoint::open(path, subfolder)?;
    normalise_text_encoder(&mut ck.weights);
    apply_loras(&mut ck, subfolder, loras)?;
    ClipText::load(&ck.config, &ck.weights, device)
        .with_context(|| format!("loading the text encoder from {}", ck.dir.display()))
}

/// An image encoder (ViT, DINOv2, CLIP vision): a model folder, a `CLIPModel` folder (its vision
/// tower), a diffusers pipeline folder's `image_encoder`, or a folder holding `image_encoder/`
/// (IP-Adapter's layout).
pub fn load_image_encoder(path: &Path, device: &Device) -> Result<Vit> {
    let mut ck = Checkpoint::open(&image_encoder_dir(path), "image_encoder")?;
    normalise_image_encoder(&mut ck.weights);
    Vit::load(&ck.config, &ck.weights, device)
        .with_context(|| format!("loading the image encoder from {}", ck.dir.display()))
}

/// `path/image_encoder` when `path` is not itself a model or pipeline folder but holds one.
pub fn image_encoder_dir(path: &Path) -> PathBuf {
    let sub = path.join("image_encoder");
    if !path.join("config.json").is_file()
        && !path.join("model_index.json").is_file()
        && sub.join("config.json").is_file()
    {
        sub
    } else {
        path.to_path_buf()
    }
}

/// Keeps the vision tower's tensors under their bare names (a `CLIPModel` file also holds the
/// text tower).
pub fn normalise_image_encoder(w: &mut WeightStore) {
    w.retain(|n| {
        !n.starts_with("text_model.")
            && n != "text_projection.weight"
            && n != "logit_scale"
            && !n.ends_with("position_ids")
    });
    w.normalise_names(vit::normalise_name);
}

/// The text tower of a `CLIPModel` folder (config `text_config`, `text_model.*` +
/// `text_projection`), for CLIP-T scores.
pub fn load_clip_text_tower(path: &Path, device: &Device) -> Result<ClipText> {
    let mut ck = Checkpoint::open(path, "text_encoder")?;
    let Some(text) = ck.config.get("text_config").cloned() else {
        bail!(
            "{}: no `text_config`: a CLIP text tower needs a CLIPModel folder (both towers)",
            ck.config.path.display()
        );
    };
    let mut cfg = Config::from_json(&format!("{} (text_config)", ck.config.path.display()), text)?;
    if let Some(p) = ck.config.get("projection_dim") {
        cfg.json.insert("projection_dim".into(), p.clone());
    }
    ck.weights
        .retain(|n| n.starts_with("text_model.") || n == "text_projection.weight");
    normalise_text_encoder(&mut ck.weights);
    if !ck.weights.contains("text_projection.weight") {
        bail!(
            "{}: no `text_projection.weight`: CLIP-T needs the projected text embedding",
            ck.dir.display()
        );
    }
    ClipText::load(&cfg, &ck.weights, device)
        .with_context(|| format!("loading the CLIP text tower from {}", ck.dir.display()))
}

pub fn normalise_text_encoder(w: &mut WeightStore) {
    w.normalise_names(clip_text::normalise_name);
    w.retain(|n| !n.ends_with("position_ids"));
}

/// The one device-and-storage policy of every entry point (the commands, the C ABI, the pairs
/// job): `spec`, with bf16 storage on a GPU when the `component` weights of `model` are mostly
/// bf16 (fp16 would lose a bf16 checkpoint's range), else fp16; the CPU computes in f32 either
/// way. Without a model (the built-in demo), or when its weights cannot be read, a GPU opens in
/// fp16 and loading the model reports the error.
pub fn open_device(spec: &str, model: Option<&Path>, component: &str) -> Result<Device> {
    let bf16 = spec != "cpu" && model.is_some_and(|m| is_bf16(m, component).unwrap_or(false));
    Device::open(spec, bf16)
}

/// Whether a model folder's floating-point weights are bf16 (so a GPU keeps them in bf16).
pub fn is_bf16(path: &Path, subfolder: &str) -> Result<bool> {
    let ck = Checkpoint::open(path, subfolder)?;
    let s = ck.weights.dtype_summary();
    let count = |d| s.get(&d).map(|x| x.1).unwrap_or(0);
    use crate::weights::safetensors::Dtype;
    Ok(count(Dtype::BF16) > count(Dtype::F16) + count(Dtype::F32))
}
