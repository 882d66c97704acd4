//! From a path on disk to a loaded model: folder resolution, config, weights and the name
//! normalisations each family needs.

use super::clip_text::{self, ClipText};
use super::controlnet::ControlNet;
use super::unet::Unet;
use super::vae::{self, Vae};
use crate::backend::Device;
use crate::config::Config;
use crate::weights::layout::{component_dir, open_weights};
use crate::weights::WeightStore;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// A model folder's config and weights.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: Config,
    pub weights: WeightStore,
}

impl Checkpoint {
    /// `path` is a pipeline folder (the `subfolder` component is used) or a model folder.
    pub fn open(path: &Path, subfolder: &str) -> Result<Checkpoint> {
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

pub fn load_unet(path: &Path, device: &Device) -> Result<Unet> {
    let ck = Checkpoint::open(path, "unet")?;
    Unet::load(&ck.config, &ck.weights, device)
        .with_context(|| format!("loading the UNet from {}", ck.dir.display()))
}

pub fn load_controlnet(path: &Path, device: &Device) -> Result<ControlNet> {
    let ck = Checkpoint::open(path, "controlnet")?;
    ControlNet::load(&ck.config, &ck.weights, device)
        .with_context(|| format!("loading the ControlNet from {}", ck.dir.display()))
}

pub fn load_vae(path: &Path, device: &Device) -> Result<Vae> {
    let mut ck = Checkpoint::open(path, "vae")?;
    ck.weights.normalise_names(vae::normalise_legacy_name);
    Vae::load(&ck.config, &ck.weights, device)
        .with_context(|| format!("loading the VAE from {}", ck.dir.display()))
}

/// `subfolder` is "text_encoder" or "text_encoder_2".
pub fn load_text_encoder(path: &Path, subfolder: &str, device: &Device) -> Result<ClipText> {
    let mut ck = Checkpoint::open(path, subfolder)?;
    normalise_text_encoder(&mut ck.weights);
    ClipText::load(&ck.config, &ck.weights, device)
        .with_context(|| format!("loading the text encoder from {}", ck.dir.display()))
}

pub fn normalise_text_encoder(w: &mut WeightStore) {
    w.normalise_names(clip_text::normalise_name);
    w.retain(|n| !n.ends_with("position_ids"));
}

/// Whether a model folder's floating-point weights are bf16 (so a GPU keeps them in bf16).
pub fn is_bf16(path: &Path, subfolder: &str) -> Result<bool> {
    let ck = Checkpoint::open(path, subfolder)?;
    let s = ck.weights.dtype_summary();
    let count = |d| s.get(&d).map(|x| x.1).unwrap_or(0);
    use crate::weights::safetensors::Dtype;
    Ok(count(Dtype::BF16) > count(Dtype::F16) + count(Dtype::F32))
}
