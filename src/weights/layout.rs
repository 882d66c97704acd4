//! Where a component's config and weights live on disk: diffusers pipeline folders
//! (model_index.json + one subfolder per component) or standalone model folders (config.json + weights).

use super::WeightStore;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// The model folder for `subfolder` ("unet", "vae", "text_encoder", …) of what the user named:
/// a pipeline folder's subfolder, or the folder itself when it is a standalone model.
pub fn component_dir(path: &Path, subfolder: &str) -> Result<PathBuf> {
    if !path.exists() {
        bail!("{}: no such file or directory", path.display());
    }
    if !path.is_dir() {
        bail!(
            "{}: expected a model folder (config.json + weights) or a diffusers pipeline folder",
            path.display()
        );
    }
    if path.join("model_index.json").is_file() {
        let sub = path.join(subfolder);
        if !sub.join("config.json").is_file() {
            bail!(
                "{}: pipeline folder has no `{subfolder}` component ({} missing)",
                path.display(),
                sub.join("config.json").display()
            );
        }
        return Ok(sub);
    }
    if path.join("config.json").is_file() {
        return Ok(path.to_path_buf());
    }
    bail!("{}: neither a diffusers pipeline folder (model_index.json) nor a model folder (config.json)", path.display())
}

const SINGLE: &[&str] = &[
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
];

/// The weights of a model folder: one safetensors file or a sharded set with its index.
pub fn open_weights(dir: &Path) -> Result<WeightStore> {
    for name in SINGLE {
        let index = dir.join(format!("{name}.index.json"));
        if index.is_file() {
            return WeightStore::open_index(&index);
        }
        let file = dir.join(name);
        if file.is_file() {
            return WeightStore::open_file(&file);
        }
    }
    let others: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if let Some(f) = others.iter().find(|f| f.ends_with(".safetensors")) {
        return WeightStore::open_file(&dir.join(f));
    }
    if others
        .iter()
        .any(|f| f.ends_with(".bin") || f.ends_with(".ckpt") || f.ends_with(".pt"))
    {
        bail!("{}: only pickled PyTorch weights (.bin/.ckpt) found; toffee reads safetensors only (convert with `safetensors`' convert script)", dir.display());
    }
    bail!(
        "{}: no safetensors weights (looked for {} and *.safetensors.index.json)",
        dir.display(),
        SINGLE.join(", ")
    )
}
