//! `toffee convert FILE --out DIR`: a single-file checkpoint written as a diffusers folder
//! (configs, safetensors weights in their stored dtypes, tokenizers, scheduler config), for users
//! who want one. Tensors are copied byte for byte; only names change (and OpenCLIP's fused q/k/v
//! is split, its projection transposed), so the folder loads to exactly the same model.

use crate::config::Config;
use crate::models::load::Checkpoint;
use crate::weights::safetensors::write_raw;
use crate::weights::single_file::{Family, SingleFile};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// The .safetensors file (SD 1.x / 2.x / XL, a ControlNet or a VAE).
    pub file: PathBuf,
    /// A new (or empty) folder.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let c = convert(&a.file, &a.out).with_context(|| format!("converting {}", a.file.display()))?;
    eprintln!(
        "wrote {} ({}; {} tensors)",
        a.out.display(),
        c.components.join(", "),
        c.tensors
    );
    Ok(())
}

/// What was written.
pub struct Converted {
    pub components: Vec<String>,
    pub tensors: usize,
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)? + "\n";
    crate::weights::safetensors::write_atomic(path, text.as_bytes())
}

fn weights_file(sub: &str) -> &'static str {
    if sub.starts_with("text_encoder") {
        "model.safetensors"
    } else {
        "diffusion_pytorch_model.safetensors"
    }
}

fn config_json(cfg: &Config) -> Value {
    Value::Object(cfg.json.clone())
}

/// Tokenizer files: the config folder's copied, else the built-in vocabulary written out.
fn write_tokenizer(sf: &SingleFile, sub: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    if let Some(cd) = sf.config_dir() {
        let src = cd.join(sub);
        for e in
            std::fs::read_dir(&src).with_context(|| format!("{}: cannot read", src.display()))?
        {
            let e = e?;
            if e.path().is_file() {
                std::fs::copy(e.path(), dir.join(e.file_name()))
                    .with_context(|| format!("copying {}", e.path().display()))?;
            }
        }
        return Ok(());
    }
    let pad = if sub == "tokenizer_2" || sf.family == Family::Sd2 {
        "!"
    } else {
        "<|endoftext|>"
    };
    let (vocab, merges) = crate::tokenizer::builtin_files()?;
    crate::weights::safetensors::write_atomic(&dir.join("vocab.json"), vocab.as_bytes())?;
    crate::weights::safetensors::write_atomic(&dir.join("merges.txt"), merges.as_bytes())?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "CLIPTokenizer",
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "pad_token": pad,
            "model_max_length": 77,
            "do_lower_case": true,
        }),
    )
}

pub fn convert(file: &Path, out: &Path) -> Result<Converted> {
    let sf = SingleFile::open(file)?;
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!(
            "{}: exists and is not empty; give a new folder",
            out.display()
        );
    }
    // Written beside `out` and renamed when complete: a failure (a full disk) leaves no partial
    // folder for the rerun to refuse as "not empty".
    let stage = crate::atomic_file::tmp_path(out);
    let written = write_folder(&sf, file, &stage).and_then(|c| {
        if out.exists() {
            std::fs::remove_dir(out)
                .with_context(|| format!("{}: cannot replace", out.display()))?;
        }
        std::fs::rename(&stage, out)
            .with_context(|| format!("{}: cannot rename into place", out.display()))?;
        Ok(c)
    });
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&stage);
    }
    written
}

/// Every component of `sf` (and a pipeline's other files) into the new folder `out`.
fn write_folder(sf: &SingleFile, file: &Path, out: &Path) -> Result<Converted> {
    let comps = sf.components();
    let pipeline = comps.contains(&"unet");
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let mut tensors = 0;
    for sub in &comps {
        let dir: PathBuf = if pipeline {
            out.join(sub)
        } else {
            out.to_path_buf()
        };
        tensors += write_component(file, sub, &dir)?;
    }
    if pipeline {
        write_pipeline_files(sf, out)?;
    }
    Ok(Converted {
        components: comps.iter().map(|s| s.to_string()).collect(),
        tensors,
    })
}

/// Component `sub` of the single file: its weights and config.json, into `dir`; returns the
/// number of tensors written.
fn write_component(file: &Path, sub: &str, dir: &Path) -> Result<usize> {
    let ck = Checkpoint::open(file, sub)?;
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let raw = ck
        .weights
        .names()
        .map(|n| ck.weights.get_raw(n))
        .collect::<Result<Vec<_>>>()?;
    write_raw(&dir.join(weights_file(sub)), &raw)?;
    write_json(&dir.join("config.json"), &config_json(&ck.config))?;
    Ok(raw.len())
}

/// What a pipeline folder holds besides its models: model_index.json, the scheduler config and
/// the tokenizers.
fn write_pipeline_files(sf: &SingleFile, out: &Path) -> Result<()> {
    let sdxl = sf.family == Family::Sdxl;
    let class = match (sdxl, sf.is_inpaint()) {
        (true, true) => "StableDiffusionXLInpaintPipeline",
        (true, false) => "StableDiffusionXLPipeline",
        (false, true) => "StableDiffusionInpaintPipeline",
        (false, false) => "StableDiffusionPipeline",
    };
    let sched = sf.scheduler_config()?;
    let sched_class = sched.str_or("_class_name", "PNDMScheduler")?.to_string();
    let mut index = json!({
        "_class_name": class,
        "scheduler": ["diffusers", sched_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    });
    if sdxl {
        index["text_encoder_2"] = json!(["transformers", "CLIPTextModelWithProjection"]);
        index["tokenizer_2"] = json!(["transformers", "CLIPTokenizer"]);
        index["force_zeros_for_empty_prompt"] = json!(sf
            .model_index()?
            .bool_or("force_zeros_for_empty_prompt", true)?);
    }
    write_json(&out.join("model_index.json"), &index)?;
    std::fs::create_dir_all(out.join("scheduler"))?;
    write_json(
        &out.join("scheduler/scheduler_config.json"),
        &Value::Object(sched.json),
    )?;
    write_tokenizer(sf, "tokenizer", &out.join("tokenizer"))?;
    if sdxl {
        write_tokenizer(sf, "tokenizer_2", &out.join("tokenizer_2"))?;
    }
    Ok(())
}
