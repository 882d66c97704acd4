//! LoRA files fused into the weights at load time (no per-step cost): W += s · (α / r) · B·A for
//! each adapted Linear or Conv2d, for the UNet and the text encoders. Layouts: diffusers / PEFT
//! (`unet.<module>.lora_A.weight` / `lora_B.weight`, also the older `.lora.down/.lora.up` and
//! `lora_linear_layer` names; α from the file's `lora_adapter_metadata`, else α = r) and kohya-ss
//! (`lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`, `lora_te_` /
//! `lora_te1_` / `lora_te2_` for the text encoders; UNet modules in diffusers or in the original
//! SGM/LDM naming, as SDXL LoRAs are). A key that matches no weight of the model is an error.

use super::safetensors::SafetensorsFile;
use super::single_file::keys;
use super::WeightStore;
use crate::tensor::Tensor;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// `FILE[:WEIGHT]` as given to `--lora` (weight 1 when omitted).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub scale: f32,
}

impl FromStr for LoraSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        // The weight follows the last ':' only when it parses as a number (paths may hold ':').
        if let Some((p, w)) = s.rsplit_once(':') {
            if let Ok(scale) = w.parse::<f32>() {
                if !scale.is_finite() {
                    bail!("--lora {s}: the weight {w} is not a finite number");
                }
                if p.is_empty() {
                    bail!("--lora {s}: no file before the weight (expected FILE:WEIGHT)");
                }
                return Ok(LoraSpec {
                    path: PathBuf::from(p),
                    scale,
                });
            }
        }
        if s.is_empty() {
            bail!("--lora: an empty path (expected FILE or FILE:WEIGHT)");
        }
        Ok(LoraSpec {
            path: PathBuf::from(s),
            scale: 1.0,
        })
    }
}

/// A LoRA path that is not there is named as a path, before the safetensors reader's generic
/// "cannot open" (which reads as a problem inside a file that exists).
fn check_exists(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "{}: no such file (a LoRA .safetensors file)",
                path.display()
            )
        }
        Ok(m) if m.is_dir() => bail!("{}: a folder, not a LoRA .safetensors file", path.display()),
        _ => Ok(()),
    }
}

/// Which model a LoRA module belongs to (diffusers subfolder names).
pub const COMPONENTS: [&str; 3] = ["unet", "text_encoder", "text_encoder_2"];

/// One adapted module: the low-rank factors and their scale.
#[derive(Clone)]
pub struct Delta {
    /// B: [out, r] (or [out, r, 1, 1] for a conv)
    pub up: Tensor,
    /// A: [r, in] (or [r, in, kh, kw])
    pub down: Tensor,
    /// s · α / r
    pub scale: f32,
}

impl Delta {
    /// s·α/r · B·A, shaped like the weight.
    pub fn product(&self, weight_shape: &[usize]) -> Result<Tensor> {
        let (o, r) = (
            self.up.shape()[0],
            self.up.shape().get(1).copied().unwrap_or(0),
        );
        let dr = self.down.shape()[0];
        let k: usize = self.down.shape()[1..].iter().product();
        if r != dr || self.up.numel() != o * r {
            bail!(
                "LoRA factors do not chain: up {:?}, down {:?}",
                self.up.shape(),
                self.down.shape()
            );
        }
        if weight_shape.iter().product::<usize>() != o * k || weight_shape.first() != Some(&o) {
            bail!(
                "LoRA up {:?} · down {:?} does not fit the weight {:?}: a LoRA for another model?",
                self.up.shape(),
                self.down.shape(),
                weight_shape
            );
        }
        // B·A as a linear layer: rows of B times the columns of A (A transposed is [k, r]).
        let a = self.down.data();
        let mut at = vec![0f32; k * r];
        for i in 0..r {
            for j in 0..k {
                at[j * r + i] = a[i * k + j];
            }
        }
        let l = crate::backend::LinearW {
            weight: Tensor::new(vec![k, r], at),
            bias: None,
        };
        let b = self.up.reshape(vec![o, r]);
        let mut d = crate::backend::cpu::linear(&b, &l);
        for v in d.data_mut() {
            *v *= self.scale;
        }
        Ok(d.reshape(weight_shape.to_vec()))
    }
}

/// Stored names of one module's factors and α, by the module's key in the file.
#[derive(Default)]
struct Factors {
    up: Option<String>,
    down: Option<String>,
    alpha: Option<String>,
}

/// Splits a LoRA tensor name into (component, module key as written, part).
fn split_key(name: &str) -> Option<(&'static str, String, &'static str)> {
    const PARTS: [(&str, &str); 9] = [
        (".lora_A.weight", "down"),
        (".lora_B.weight", "up"),
        (".lora_down.weight", "down"),
        (".lora_up.weight", "up"),
        (".lora.down.weight", "down"),
        (".lora.up.weight", "up"),
        (".lora_linear_layer.down.weight", "down"),
        (".lora_linear_layer.up.weight", "up"),
        (".alpha", "alpha"),
    ];
    let (stem, part) = PARTS
        .iter()
        .find_map(|(suf, p)| name.strip_suffix(suf).map(|s| (s, *p)))?;
    let prefixes: [(&str, &str); 8] = [
        ("unet.", "unet"),
        ("text_encoder_2.", "text_encoder_2"),
        ("text_encoder.", "text_encoder"),
        ("lora_unet_", "unet"),
        ("lora_te1_", "text_encoder"),
        ("lora_te2_", "text_encoder_2"),
        ("lora_te_", "text_encoder"),
        ("te_", "text_encoder"),
    ];
    let (comp, module) = prefixes
        .iter()
        .find_map(|(p, c)| stem.strip_prefix(p).map(|m| (*c, m.to_string())))?;
    Some((comp, module, part))
}

/// A LoRA file, read (it is small) and grouped by module.
pub struct Lora {
    pub path: PathBuf,
    pub scale: f32,
    file: SafetensorsFile,
    modules: BTreeMap<(&'static str, String), Factors>,
    /// Per component, α from diffusers' `lora_adapter_metadata` (PEFT `lora_alpha`,
    /// `alpha_pattern` by module), when present.
    peft_alpha: HashMap<String, PeftAlpha>,
}

impl Lora {
    pub fn open(spec: &LoraSpec) -> Result<Lora> {
        let path = &spec.path;
        check_exists(path)?;
        let file = SafetensorsFile::open(path)?;
        let modules = group_modules(path, &file)?;
        let peft_alpha = peft_metadata(path)?;
        Ok(Lora {
            path: path.clone(),
            scale: spec.scale,
            file,
            modules,
            peft_alpha,
        })
    }

    /// Whether the file adapts `component`.
    pub fn touches(&self, component: &str) -> bool {
        self.modules.keys().any(|(c, _)| *c == component)
    }

    /// The deltas this LoRA adds to `component`'s weights, by the weight names `store` uses.
    /// `ldm` maps diffusers UNet module names to their SGM/LDM names (for kohya files written in
    /// that naming); every module must match a weight of the store.
    pub fn deltas(
        &self,
        component: &str,
        store: &WeightStore,
        ldm: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Vec<(String, Delta)>> {
        let lookup = module_lookup(store, ldm);
        let mut out = Vec::new();
        let mut missing = Vec::new();
        for ((c, m), f) in &self.modules {
            if *c != component {
                continue;
            }
            let Some(weight) = lookup.get(m) else {
                missing.push(m.clone());
                continue;
            };
            out.push((weight.clone(), self.delta(component, m, f)?));
        }
        if !missing.is_empty() {
            bail!(
                "{}: {} {component} module(s) match no weight of the model (a LoRA for another model?): {}",
                self.path.display(),
                missing.len(),
                missing.iter().take(4).cloned().collect::<Vec<_>>().join(", ")
            );
        }
        Ok(out)
    }

    /// The delta of module `m` of `component`, read from its factors.
    fn delta(&self, component: &str, m: &str, f: &Factors) -> Result<Delta> {
        let read =
            |n: &Option<String>| -> Result<Tensor> { self.file.read_f32(n.as_deref().unwrap()) };
        let (up, down) = (read(&f.up)?, read(&f.down)?);
        let rank = down.shape()[0];
        if rank == 0 {
            bail!("{}: `{m}` has rank 0", self.path.display());
        }
        let (alpha, rs) = self.alpha(component, m, f, rank)?;
        // rsLoRA scales by α/√r instead of α/r.
        let denom = if rs {
            (rank as f32).sqrt()
        } else {
            rank as f32
        };
        if !alpha.is_finite() {
            bail!(
                "{}: `{m}`: alpha {alpha} is not finite",
                self.path.display()
            );
        }
        Ok(Delta {
            up,
            down,
            scale: self.scale * alpha / denom,
        })
    }

    /// Module `m`'s α and whether it is rsLoRA: the file's `.alpha` tensor, else the PEFT
    /// metadata of `component`, else α = r.
    fn alpha(&self, component: &str, m: &str, f: &Factors, rank: usize) -> Result<(f32, bool)> {
        Ok(match (&f.alpha, self.peft_alpha.get(component)) {
            (Some(a), _) => {
                let t = self.file.read_f32(a)?;
                let v = *t
                    .data()
                    .first()
                    .ok_or_else(|| anyhow!("{}: `{a}` is empty", self.path.display()))?;
                (v, false)
            }
            (None, Some(p)) => (
                p.pattern
                    .iter()
                    .find(|(k, _)| m == k.as_str() || m.ends_with(&format!(".{k}")))
                    .map(|(_, v)| *v)
                    .unwrap_or(p.alpha),
                p.rslora,
            ),
            (None, None) => (rank as f32, false),
        })
    }
}

/// Every way a module of `store` may be written, → the store's weight name.
fn module_lookup(
    store: &WeightStore,
    ldm: &dyn Fn(&str) -> Option<String>,
) -> HashMap<String, String> {
    let mut lookup: HashMap<String, String> = HashMap::new();
    for w in store.names() {
        let Some(module) = w.strip_suffix(".weight") else {
            continue;
        };
        let mut forms = vec![module.to_string(), format!("text_model.{module}")];
        if let Some(l) = ldm(module) {
            forms.push(l);
        }
        for f in forms {
            lookup.insert(f.replace('.', "_"), w.to_string());
            lookup.insert(f, w.to_string());
        }
    }
    lookup
}

/// The file's tensors grouped by (component, module); every tensor must be a LoRA factor.
fn group_modules(
    path: &Path,
    file: &SafetensorsFile,
) -> Result<BTreeMap<(&'static str, String), Factors>> {
    let mut modules: BTreeMap<(&'static str, String), Factors> = BTreeMap::new();
    let mut unknown = Vec::new();
    for name in file.tensors.keys() {
        if name.ends_with("dora_scale") || name.contains(".lora_magnitude_vector") {
            bail!("{}: `{name}`: DoRA LoRAs are not supported", path.display());
        }
        match split_key(name) {
            Some((c, m, part)) => {
                let f = modules.entry((c, m)).or_default();
                let slot = match part {
                    "up" => &mut f.up,
                    "down" => &mut f.down,
                    _ => &mut f.alpha,
                };
                *slot = Some(name.clone());
            }
            None => unknown.push(name.clone()),
        }
    }
    if !unknown.is_empty() {
        bail!(
            "{}: {} tensor(s) are not LoRA factors of a UNet or text encoder (e.g. {})",
            path.display(),
            unknown.len(),
            unknown
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if modules.is_empty() {
        bail!("{}: no LoRA tensors", path.display());
    }
    check_pairs(path, &modules)?;
    Ok(modules)
}

/// Every module must have both its up and its down factor.
fn check_pairs(path: &Path, modules: &BTreeMap<(&'static str, String), Factors>) -> Result<()> {
    for ((c, m), f) in modules {
        if f.up.is_none() || f.down.is_none() {
            bail!(
                "{}: {c} module `{m}` has {} but not {}",
                path.display(),
                if f.up.is_some() {
                    "an up factor"
                } else {
                    "a down factor"
                },
                if f.up.is_some() {
                    "its down factor"
                } else {
                    "its up factor"
                }
            );
        }
    }
    Ok(())
}

/// PEFT's α settings of one component.
struct PeftAlpha {
    alpha: f32,
    pattern: HashMap<String, f32>,
    rslora: bool,
}

/// diffusers writes PEFT's LoraConfig of each component into the safetensors metadata, as JSON
/// with keys `<component>.<field>` (`unet.lora_alpha`, `text_encoder.alpha_pattern`, …).
fn peft_metadata(path: &Path) -> Result<HashMap<String, PeftAlpha>> {
    let meta = super::safetensors::metadata(path)?;
    let Some(text) = meta.get("lora_adapter_metadata") else {
        return Ok(HashMap::new());
    };
    let v: serde_json::Value = serde_json::from_str(text)
        .with_context(|| format!("{}: `lora_adapter_metadata` is not JSON", path.display()))?;
    let mut out = HashMap::new();
    for comp in COMPONENTS {
        let get = |k: &str| v.get(format!("{comp}.{k}"));
        let Some(alpha) = get("lora_alpha").and_then(|a| a.as_f64()) else {
            continue;
        };
        if get("use_dora").and_then(|d| d.as_bool()) == Some(true) {
            bail!("{}: {comp}: DoRA LoRAs are not supported", path.display());
        }
        let pattern = get("alpha_pattern")
            .and_then(|p| p.as_object())
            .map(|o| {
                o.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_f64()? as f32)))
                    .collect()
            })
            .unwrap_or_default();
        let rslora = get("use_rslora").and_then(|d| d.as_bool()) == Some(true);
        out.insert(
            comp.to_string(),
            PeftAlpha {
                alpha: alpha as f32,
                pattern,
                rslora,
            },
        );
    }
    Ok(out)
}

/// The UNet's diffusers module names in SGM/LDM naming, for kohya files that use it.
pub fn unet_ldm_namer(store: &WeightStore) -> impl Fn(&str) -> Option<String> {
    let names: Vec<String> = store.names().map(String::from).collect();
    let layers = (0..)
        .take_while(|i| {
            names
                .iter()
                .any(|n| n.starts_with(&format!("down_blocks.0.resnets.{i}.")))
        })
        .count();
    let up_attn: Vec<bool> = (0..)
        .take_while(|b| {
            names
                .iter()
                .any(|n| n.starts_with(&format!("up_blocks.{b}.")))
        })
        .map(|b| {
            names
                .iter()
                .any(|n| n.starts_with(&format!("up_blocks.{b}.attentions.")))
        })
        .collect();
    move |module: &str| keys::unet_to_ldm(module, layers, &up_attn)
}
