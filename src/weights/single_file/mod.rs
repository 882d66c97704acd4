//! Single-file checkpoints in the original layouts (LDM for SD 1.x / 2.x, SGM for SDXL; the
//! `.safetensors` files A1111 and ComfyUI load), read as the diffusers components they hold:
//! tensors renamed (and OpenCLIP's fused q/k/v split) by `keys`, memory-mapped like any other
//! checkpoint, configs from a config folder named by the sidecar file or inferred from the shapes
//! (`infer`).
//!
//! The sidecar is `<file stem>.toffee.json` next to the file:
//! `{"config": DIR, "prediction_type": "v_prediction", "scaling_factor": 0.13025}` (all optional;
//! DIR, relative to the sidecar, is a diffusers pipeline or model folder whose configs, tokenizers
//! and scheduler config are used instead of the inferred ones, as diffusers' `config=`).

pub mod infer;
pub mod keys;

use super::safetensors::SafetensorsFile;
use super::WeightStore;
use crate::config::Config;
use anyhow::{anyhow, bail, Context, Result};
use infer::Shapes;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// What kind of checkpoint a single file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Sd1,
    Sd2,
    Sdxl,
    ControlNet,
    Vae,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "sd1",
            Family::Sd2 => "sd2",
            Family::Sdxl => "sdxl",
            Family::ControlNet => "controlnet",
            Family::Vae => "vae",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Family::Sd1 => "Stable Diffusion 1.x (LDM layout, OpenAI CLIP-L text encoder)",
            Family::Sd2 => "Stable Diffusion 2.x (LDM layout, OpenCLIP ViT-H text encoder)",
            Family::Sdxl => "Stable Diffusion XL (SGM layout, CLIP-L + OpenCLIP bigG)",
            Family::ControlNet => "ControlNet (LDM layout)",
            Family::Vae => "AutoencoderKL (LDM layout)",
        }
    }
}

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const CLIP_SD1: &str = "cond_stage_model.transformer.";
const OPENCLIP_SD2: &str = "cond_stage_model.model.";
const CLIP_SDXL: &str = "conditioner.embedders.0.transformer.";
const OPENCLIP_SDXL: &str = "conditioner.embedders.1.model.";
const CONTROL: &str = "control_model.";

/// The sidecar file's fields.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sidecar {
    pub config: Option<PathBuf>,
    pub prediction_type: Option<String>,
    pub scaling_factor: Option<f64>,
}

pub struct SingleFile {
    pub path: PathBuf,
    pub family: Family,
    shapes: Shapes,
    /// The sidecar's path and contents, when there is one.
    pub sidecar: Option<(PathBuf, Sidecar)>,
}

/// Whether `path` names a single safetensors file (not a folder).
pub fn is_single_file(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

pub fn sidecar_path(path: &Path) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!("{stem}.toffee.json"))
}

fn sub_shapes(all: &Shapes, prefix: &str) -> Shapes {
    all.iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone())))
        .collect()
}

impl SingleFile {
    pub fn open(path: &Path) -> Result<SingleFile> {
        let f = SafetensorsFile::open(path)?;
        let shapes: Shapes = f
            .tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.shape.clone()))
            .collect();
        drop(f);
        let family = detect(&shapes).with_context(|| format!("{}", path.display()))?;
        let sc = sidecar_path(path);
        let sidecar = if sc.is_file() {
            let text = crate::input::read_to_string(&sc)
                .with_context(|| format!("{}: cannot read", sc.display()))?;
            let s: Sidecar = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a valid sidecar", sc.display()))?;
            Some((sc, s))
        } else {
            None
        };
        Ok(SingleFile {
            path: path.to_path_buf(),
            family,
            shapes,
            sidecar,
        })
    }

    fn has(&self, prefix: &str) -> bool {
        self.shapes.keys().any(|k| k.starts_with(prefix))
    }

    /// The config folder the sidecar names, resolved against the sidecar's folder.
    pub fn config_dir(&self) -> Option<PathBuf> {
        let (path, s) = self.sidecar.as_ref()?;
        let dir = s.config.as_ref()?;
        Some(path.parent().unwrap_or(Path::new(".")).join(dir))
    }

    /// The components this file holds, by diffusers subfolder name.
    pub fn components(&self) -> Vec<&'static str> {
        match self.family {
            Family::ControlNet => vec!["controlnet"],
            Family::Vae => vec!["vae"],
            Family::Sdxl => vec!["unet", "vae", "text_encoder", "text_encoder_2"],
            Family::Sd1 | Family::Sd2 => vec!["unet", "vae", "text_encoder"],
        }
    }

    /// Every component of the family is present (a file missing its VAE fails here, before
    /// anything is loaded, naming what is missing).
    pub fn check_complete(&self) -> Result<()> {
        for c in self.components() {
            self.prefix_of(c)?;
        }
        Ok(())
    }

    /// Whether the UNet takes the 9-channel inpainting input.
    pub fn is_inpaint(&self) -> bool {
        self.shapes
            .get(&format!("{UNET}input_blocks.0.0.weight"))
            .is_some_and(|s| s.get(1) == Some(&9))
    }

    fn prefix_of(&self, sub: &str) -> Result<&'static str> {
        let p = match (self.family, sub) {
            (Family::Sd1 | Family::Sd2 | Family::Sdxl, "unet") => UNET,
            (Family::Sd1 | Family::Sd2 | Family::Sdxl, "vae") => VAE,
            (Family::Vae, "vae") => {
                if self.has(VAE) {
                    VAE
                } else {
                    ""
                }
            }
            (Family::Sd1, "text_encoder") => CLIP_SD1,
            (Family::Sd2, "text_encoder") => OPENCLIP_SD2,
            (Family::Sdxl, "text_encoder") => CLIP_SDXL,
            (Family::Sdxl, "text_encoder_2") => OPENCLIP_SDXL,
            (Family::ControlNet, "controlnet") => {
                if self.has(CONTROL) {
                    CONTROL
                } else {
                    ""
                }
            }
            _ => bail!(
                "{}: a {} single file has no `{sub}` component (it holds {})",
                self.path.display(),
                self.family.describe(),
                self.components().join(", ")
            ),
        };
        if !p.is_empty() && !self.has(p) {
            bail!(
                "{}: no `{sub}` in this {} file: no tensors under `{p}`",
                self.path.display(),
                self.family.name()
            );
        }
        Ok(p)
    }

    /// A component's config: from the sidecar's config folder, else inferred; sidecar overrides
    /// applied on top.
    pub fn config(&self, sub: &str) -> Result<Config> {
        let prefix = self.prefix_of(sub)?;
        let s = sub_shapes(&self.shapes, prefix);
        let mut cfg = match self.config_dir() {
            Some(dir) => {
                let d = super::layout::component_dir(&dir, sub)
                    .with_context(|| format!("the config folder of {}", self.path.display()))?;
                Config::read_dir(&d)?
            }
            None => {
                let what = format!(
                    "{} ({sub}, inferred from the tensor shapes)",
                    self.path.display()
                );
                let v = self.infer(sub, &s).with_context(|| {
                    format!(
                        "{}: cannot infer the `{sub}` config of this {} file (tensors under `{prefix}`)",
                        self.path.display(),
                        self.family.name()
                    )
                })?;
                Config::from_json(&what, v)?
            }
        };
        if sub == "vae" {
            if let Some(f) = self.sidecar.as_ref().and_then(|s| s.1.scaling_factor) {
                cfg.json.insert("scaling_factor".into(), json!(f));
            }
        }
        Ok(cfg)
    }

    fn infer(&self, sub: &str, s: &Shapes) -> Result<Value> {
        let fam = self.family.name();
        match sub {
            "unet" => infer::unet_config(s, fam),
            "vae" => infer::vae_config(s, fam, self.is_inpaint()),
            "controlnet" => infer::controlnet_config(s, &hint_convs(s)),
            "text_encoder" if self.family == Family::Sd2 => infer::open_clip_config(s, true),
            "text_encoder_2" => infer::open_clip_config(s, false),
            "text_encoder" => infer::clip_config(s),
            _ => bail!("no component `{sub}`"),
        }
    }

    /// A component's weights under diffusers names, memory-mapped from the file.
    pub fn weights(&self, sub: &str, cfg: &Config) -> Result<WeightStore> {
        let prefix = self.prefix_of(sub)?;
        let s = sub_shapes(&self.shapes, prefix);
        let names: Vec<&str> = s.keys().map(|k| k.as_str()).collect();
        let map = match sub {
            "unet" | "controlnet" => {
                let u = infer::unet_shape(&s, sub == "unet")?;
                keys::unet(&names, u.layers, &u.up_attn, &hint_convs(&s))
            }
            "vae" => keys::vae(&names, infer::vae_levels(&s)),
            "text_encoder" if self.family != Family::Sd2 => keys::clip_hf(&names),
            _ => {
                let width = s
                    .get("token_embedding.weight")
                    .and_then(|v| v.get(1).copied())
                    .ok_or_else(|| anyhow!("missing tensor `{prefix}token_embedding.weight`"))?;
                let layers = cfg.usize("num_hidden_layers")?;
                keys::open_clip(&names, width, layers, sub == "text_encoder_2")
            }
        }
        .map_err(|e| anyhow!("{}: `{sub}` under `{prefix}`: {e}", self.path.display()))?;
        // Errors about a tensor use diffusers' name for it: say so, and where the file keeps them.
        let origin = format!(
            "{} ({sub}, tensors under `{prefix}` read by their diffusers names)",
            self.path.display()
        );
        WeightStore::open_mapped(
            &self.path,
            &origin,
            map.into_iter()
                .map(|(d, stored, op)| (d, format!("{prefix}{stored}"), op)),
        )
    }

    /// The prediction type the sidecar declares, if any.
    pub fn prediction_type(&self) -> Option<&str> {
        self.sidecar.as_ref()?.1.prediction_type.as_deref()
    }

    /// The scheduler config: the config folder's, else the family's released default (what
    /// diffusers downloads for the family), with the sidecar's prediction type.
    pub fn scheduler_config(&self) -> Result<Config> {
        let mut cfg = match self.config_dir() {
            Some(dir) => crate::sched::read_config(&dir.join("scheduler/scheduler_config.json"))?,
            None => {
                let v = builtin_scheduler(self.family, self.is_inpaint());
                Config::from_json(
                    &format!("{} (built-in scheduler config)", self.path.display()),
                    v,
                )?
            }
        };
        if let Some(p) = self.prediction_type() {
            if !matches!(p, "epsilon" | "v_prediction" | "sample") {
                bail!(
                    "{}: prediction_type {p:?} is not epsilon, v_prediction or sample",
                    self.sidecar.as_ref().unwrap().0.display()
                );
            }
            cfg.json.insert("prediction_type".into(), json!(p));
        }
        Ok(cfg)
    }

    /// The tokenizer for `text_encoder` ("tokenizer") or `text_encoder_2` ("tokenizer_2"): the
    /// config folder's, else the built-in CLIP vocabulary with the family's padding (OpenCLIP
    /// tokenizers pad with `!`, OpenAI's with `<|endoftext|>`).
    pub fn tokenizer(&self, sub: &str) -> Result<crate::tokenizer::ClipTokenizer> {
        if let Some(dir) = self.config_dir() {
            return crate::tokenizer::ClipTokenizer::from_dir(&dir.join(sub));
        }
        let open_clip = sub == "tokenizer_2" || self.family == Family::Sd2;
        crate::tokenizer::ClipTokenizer::builtin(if open_clip { "!" } else { "<|endoftext|>" })
    }

    /// `model_index.json`'s settings that matter (SDXL's force_zeros_for_empty_prompt).
    pub fn model_index(&self) -> Result<Config> {
        if let Some(dir) = self.config_dir() {
            let p = dir.join("model_index.json");
            if p.is_file() {
                return Config::read(&p);
            }
        }
        Config::from_json(
            &format!("{} (built-in model index)", self.path.display()),
            json!({"force_zeros_for_empty_prompt": true}),
        )
    }

    /// Tensors the file holds outside every component this family reads (EMA copies, schedule
    /// buffers, ...): reported by `inspect`, never loaded.
    pub fn unused_tensors(&self) -> usize {
        let prefixes: Vec<&str> = self
            .components()
            .iter()
            .filter_map(|c| self.prefix_of(c).ok())
            .collect();
        if prefixes.contains(&"") {
            return 0;
        }
        self.shapes
            .keys()
            .filter(|k| !prefixes.iter().any(|p| k.starts_with(p)))
            .count()
    }
}

fn hint_convs(s: &Shapes) -> Vec<usize> {
    let mut v: Vec<usize> = s
        .keys()
        .filter_map(|k| k.strip_prefix("input_hint_block."))
        .filter(|r| r.ends_with(".weight"))
        .filter_map(|r| r.split('.').next()?.parse().ok())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The scheduler configs of the released checkpoints diffusers falls back to for each family
/// (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 (v-prediction) or
/// -2-inpainting (epsilon), stabilityai/stable-diffusion-xl-base-1.0); SD 2.x 512 "base" files
/// need `"prediction_type": "epsilon"` in their sidecar, as nothing in the file says so.
fn builtin_scheduler(family: Family, inpaint: bool) -> Value {
    let mut v = json!({
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "clip_sample": false,
    });
    match family {
        Family::Sdxl => {
            v["_class_name"] = json!("EulerDiscreteScheduler");
            v["interpolation_type"] = json!("linear");
            v["prediction_type"] = json!("epsilon");
            v["timestep_spacing"] = json!("leading");
            v["use_karras_sigmas"] = json!(false);
        }
        Family::Sd2 => {
            v["_class_name"] = json!("DDIMScheduler");
            v["prediction_type"] = json!(if inpaint { "epsilon" } else { "v_prediction" });
        }
        _ => v["_class_name"] = json!("PNDMScheduler"),
    }
    v
}

/// The family from the tensor names, or an error saying what was looked for and what is missing.
fn detect(s: &Shapes) -> Result<Family> {
    let has = |p: &str| s.keys().any(|k| k.starts_with(p));
    let unet = has(UNET);
    let conds = [
        (CLIP_SD1, Family::Sd1),
        (OPENCLIP_SD2, Family::Sd2),
        (CLIP_SDXL, Family::Sdxl),
        (OPENCLIP_SDXL, Family::Sdxl),
    ];
    let present: Vec<&(&str, Family)> = conds.iter().filter(|(p, _)| has(p)).collect();
    if unet {
        return pipeline_family(s, &present);
    }
    if !present.is_empty() {
        bail!(
            "holds a text encoder but no UNet (`{UNET}*`): not a full Stable Diffusion checkpoint"
        );
    }
    if has(&format!("{CONTROL}input_hint_block.")) || has("input_hint_block.") {
        return Ok(Family::ControlNet);
    }
    if has(&format!("{VAE}encoder.down.")) || has("encoder.down.") {
        return Ok(Family::Vae);
    }
    if has("down_blocks.") || has("text_model.") || has("encoder.down_blocks.") {
        bail!("has diffusers / transformers tensor names: give its folder (config.json + weights), not the file");
    }
    bail!(
        "not a recognised single-file checkpoint: looked for `{UNET}*` (SD 1.x / 2.x / XL), \
         `{CONTROL}input_hint_block.*` (ControlNet) and `encoder.down.*` (VAE)"
    )
}

/// The family of a file with a UNet, from its text encoders (`present`, by prefix): exactly one
/// family's, complete, and matching whether the UNet takes SDXL's size conditioning.
fn pipeline_family(s: &Shapes, present: &[&(&str, Family)]) -> Result<Family> {
    let has = |p: &str| s.keys().any(|k| k.starts_with(p));
    let fams: std::collections::BTreeSet<&str> = present.iter().map(|(_, f)| f.name()).collect();
    if fams.len() > 1 {
        bail!(
            "mixes text encoders of different families ({}): not one checkpoint",
            present
                .iter()
                .map(|(p, _)| format!("`{p}*`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let Some(&&(_, fam)) = present.first() else {
        bail!(
            "holds a UNet (`{UNET}*`) but no text encoder: looked for `{CLIP_SD1}*` (SD 1.x), \
             `{OPENCLIP_SD2}*` (SD 2.x) and `{CLIP_SDXL}*` + `{OPENCLIP_SDXL}*` (SDXL)"
        );
    };
    if fam == Family::Sdxl && !(has(CLIP_SDXL) && has(OPENCLIP_SDXL)) {
        bail!(
            "has one SDXL text encoder of two: needs `{CLIP_SDXL}*` and `{OPENCLIP_SDXL}*` \
             (SDXL refiner files, with only the OpenCLIP encoder, are not supported)"
        );
    }
    // Any label_emb tensor means SDXL's size conditioning: one without its first weight is a
    // missing tensor, not a family mix-up.
    let uses_time_ids = has(&format!("{UNET}label_emb."));
    let first = format!("{UNET}label_emb.0.0.weight");
    if uses_time_ids && !s.contains_key(&first) {
        bail!("missing tensor `{first}`");
    }
    if (fam == Family::Sdxl) != uses_time_ids {
        bail!(
            "the UNet {} SDXL's size conditioning (`{UNET}label_emb.*`) but the text encoder is {}: \
             mixed families",
            if uses_time_ids { "has" } else { "lacks" },
            fam.describe()
        );
    }
    Ok(fam)
}
