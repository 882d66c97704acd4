//! The generation commands (`txt2img`, `img2img`, `inpaint`) as the CLI and the C ABI use them:
//! files in, files out. The flags are parsed in `cmd::generate`; the request is checked and
//! built by `pipeline::request`, as for the C ABI and the pairs job.

use crate::image_io;
use crate::pipeline::{image_prompt, request, Generator, ImagePrompt};
use crate::tensor::Tensor;
use crate::weights::safetensors::{read_all, write_f32};
use anyhow::{bail, Context, Result};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use crate::pipeline::request::Mode;

/// Everything a generation command was asked for.
pub struct Options {
    /// The numbers and switches, with the rules every entry point shares.
    pub settings: request::Settings,
    /// None: the built-in demo model.
    pub model: Option<PathBuf>,
    pub prompts: Vec<String>,
    pub prompts_file: Option<PathBuf>,
    pub negative: Option<String>,
    pub out: PathBuf,
    pub controlnet: Option<PathBuf>,
    pub control_image: Option<PathBuf>,
    pub image: Option<PathBuf>,
    pub mask: Option<PathBuf>,
    pub init_latents: Option<PathBuf>,
    pub save_latents: Option<PathBuf>,
    pub progress: bool,
    /// cpu, cuda, cuda:N or emu.
    pub device: String,
    /// Image-prompt adapters (IP-Adapter files or Toffee adapter folders) and their subject
    /// images, paired by position.
    pub adapter: Vec<PathBuf>,
    pub adapter_image: Vec<PathBuf>,
    /// λ on every cross-attention layer: one for all adapters or one each (default: the
    /// adapter's own, 1 for IP-Adapter files).
    pub adapter_scale: Vec<f32>,
    /// The adapters' image encoders (none, or one per adapter), when not found beside them.
    pub adapter_encoder: Vec<PathBuf>,
    /// LoRAs fused into the weights at load.
    pub loras: Vec<crate::weights::lora::LoraSpec>,
}

/// Whether `--out` names a folder: a trailing `/` or an existing directory.
pub fn is_dir_target(out: &Path) -> bool {
    out.as_os_str()
        .to_string_lossy()
        .ends_with(std::path::MAIN_SEPARATOR)
        || out.is_dir()
}

/// Output file names: `out` itself for one image, else `stem-0000.ext`, `stem-0001.ext`, …; in a
/// folder (`--out dir/`), `dir/0000.png`, `dir/0001.png`, ….
pub fn output_paths(out: &Path, n: usize) -> Vec<PathBuf> {
    if is_dir_target(out) {
        return (0..n).map(|i| out.join(format!("{i:04}.png"))).collect();
    }
    if n == 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let ext = out
        .extension()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    (0..n)
        .map(|i| out.with_file_name(format!("{stem}-{i:04}.{ext}")))
        .collect()
}

fn read_prompts(o: &Options) -> Result<Vec<String>> {
    let mut prompts = o.prompts.clone();
    if let Some(f) = &o.prompts_file {
        let text = crate::input::read_to_string(f)
            .with_context(|| format!("{}: cannot read the prompts file", f.display()))?;
        // Editors on Windows start UTF-8 files with a byte-order mark; it is not part of a prompt.
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        prompts.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
        if prompts.is_empty() {
            bail!("{}: no prompts in the file (one per line)", f.display());
        }
    }
    if prompts.is_empty() {
        bail!("no prompt: give --prompt or --prompts-file");
    }
    Ok(prompts)
}

/// Checks that output files can be created before spending minutes on generation: the folder
/// exists (a `dir/` target is created) and a file can be made in it.
pub fn check_writable(paths: &[PathBuf]) -> Result<()> {
    let mut probed: Vec<PathBuf> = Vec::new();
    for p in paths {
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            bail!(
                "cannot write {}: directory {} does not exist",
                p.display(),
                dir.display()
            );
        }
        if p.is_dir() {
            bail!("cannot write {}: it is a directory", p.display());
        }
        if !probed.iter().any(|d| d == dir) {
            let probe = dir.join(format!(".toffee-write-check.{}", std::process::id()));
            std::fs::File::create(&probe).with_context(|| {
                format!(
                    "cannot write {}: no permission to create files in {}",
                    p.display(),
                    dir.display()
                )
            })?;
            let _ = std::fs::remove_file(&probe);
            probed.push(dir.to_path_buf());
        }
    }
    Ok(())
}

/// `what` written to `paths` so far, for an error that happens part-way: exactly which files
/// exist (the first few named).
pub fn written_report(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "no image was written".into();
    }
    let shown: Vec<String> = paths
        .iter()
        .take(5)
        .map(|p| p.display().to_string())
        .collect();
    format!(
        "{} image(s) were written before the error: {}{}",
        paths.len(),
        shown.join(", "),
        if paths.len() > 5 {
            format!(", … {}", paths.last().unwrap().display())
        } else {
            String::new()
        }
    )
}

/// Loads each `--adapter` and its image encoder, encodes its `--adapter-image` once, and attaches
/// it to the generator's UNet. Adapters pair with images, scales and encoders by position.
fn attach_adapters(o: &Options, gen: &mut Generator) -> Result<Vec<ImagePrompt>> {
    let n = o.adapter.len();
    if n == 0 {
        if !o.adapter_image.is_empty()
            || !o.adapter_scale.is_empty()
            || !o.adapter_encoder.is_empty()
        {
            bail!("--adapter-image, --adapter-scale and --adapter-encoder need --adapter");
        }
        return Ok(Vec::new());
    }
    if o.model.is_none() {
        bail!("--adapter needs --model (the built-in demo model takes no adapter)");
    }
    let naming = request::Naming::Flags;
    image_prompt::check_adapter_inputs(n, o.adapter_image.len(), &o.adapter_scale, naming)?;
    let encoders = image_prompt::attach_adapters(gen, &o.adapter, &o.adapter_encoder, naming)?;
    let images = o
        .adapter_image
        .iter()
        .map(|p| crate::image_proc::load_rgb8_on_white(p))
        .collect::<Result<Vec<_>>>()?;
    image_prompt::adapter_prompts(gen, &encoders, &images, &o.adapter_scale, naming)
}

pub struct Summary {
    pub paths: Vec<PathBuf>,
    pub seconds: f64,
}

/// The request as the flags give it; the images are loaded later (`load_inputs`).
fn spec(o: &Options, prompts: Vec<String>) -> request::Spec {
    request::Spec {
        negative: o.negative.clone(),
        ..request::Spec::new(o.settings.clone(), prompts, request::Naming::Flags)
    }
}

/// The output file names, checked writable (a `dir/` target is created), before any model loads.
fn prepare_outputs(o: &Options, total: usize) -> Result<Vec<PathBuf>> {
    if is_dir_target(&o.out) && !o.out.is_dir() {
        std::fs::create_dir_all(&o.out)
            .with_context(|| format!("{}: cannot create the output folder", o.out.display()))?;
    }
    let paths = output_paths(&o.out, total);
    check_writable(&paths)?;
    let stale = image_io::remove_stale_temporaries(&paths);
    if stale > 0 {
        eprintln!("toffee: removed {stale} temporary file(s) left by an earlier interrupted run");
    }
    image_io::check_output_format(&paths[0])?;
    if let Some(p) = &o.save_latents {
        check_writable(std::slice::from_ref(p))?;
    }
    Ok(paths)
}

/// `model` (with its ControlNet and LoRAs) on the device the checkpoint asks for
/// (`open_device`), or the built-in demo model: the CLI's and the Python engine's loading.
pub fn load_generator(
    model: Option<&Path>,
    device: &str,
    controlnet: Option<&Path>,
    loras: &[crate::weights::lora::LoraSpec],
    naming: request::Naming,
) -> Result<Generator> {
    let needs_model = |what: &str, why: &str| {
        anyhow::anyhow!(
            "{} needs {} ({why})",
            naming.name(what),
            naming.name("model")
        )
    };
    match model {
        Some(m) => {
            let device = crate::models::load::open_device(device, Some(m), "unet")?;
            Generator::load_with_loras(m, controlnet, loras, &device)
        }
        None => {
            if !loras.is_empty() {
                return Err(needs_model("lora", "a LoRA is made for one base model"));
            }
            if controlnet.is_some() {
                return Err(needs_model(
                    "controlnet",
                    "the built-in demo model has no ControlNet",
                ));
            }
            crate::builtin::generator(&crate::models::load::open_device(device, None, "")?)
        }
    }
}

/// The image files the flags name, read and checked (sizes, the pixel limit) into the spec.
fn load_inputs(o: &Options, spec: &mut request::Spec, multiple: usize) -> Result<()> {
    if let Some(path) = &o.image {
        let img = image_io::load(path)?;
        let (_, h, w, _) = img.rgb.dims4();
        image_io::check_size(path, w, h, multiple)?;
        spec.image = Some(img.rgb);
        spec.alpha = img.alpha;
    }
    if let Some(m) = &o.mask {
        spec.mask = Some(image_io::load_mask(m)?);
    }
    if let Some(p) = &o.control_image {
        let img = image_io::load(p)?;
        let (_, ih, iw, _) = img.rgb.dims4();
        image_io::check_size(p, iw, ih, 1)?;
        spec.control = Some(img.rgb);
    }
    if let Some(p) = &o.init_latents {
        let mut t = read_all(p)?;
        let l = t
            .remove("latents")
            .with_context(|| format!("{}: no tensor named `latents`", p.display()))?;
        if l.rank() != 4 {
            bail!(
                "{}: `latents` has shape {:?}; expected [N, C, H, W]",
                p.display(),
                l.shape()
            );
        }
        // A NaN would only surface after the run as "the model produces NaN": name the file.
        if let Some(i) = l.data().iter().position(|v| !v.is_finite()) {
            bail!(
                "{}: `latents` holds a non-finite value ({}) at element {i} (--init-latents)",
                p.display(),
                l.data()[i]
            );
        }
        spec.init_latents = Some(l.to_nhwc());
    }
    Ok(())
}

/// A one-line progress bar on stderr (`show`): batch k of `batches`, step i of n.
fn progress_bar(show: bool, batches: usize) -> impl FnMut(usize, usize) {
    let mut done_batches = 0;
    move |step: usize, steps: usize| {
        if show {
            let width = 30;
            let filled = width * step / steps.max(1);
            eprint!(
                "\rbatch {}/{batches} [{}{}] step {step}/{steps}",
                done_batches + 1,
                "=".repeat(filled),
                " ".repeat(width - filled)
            );
            if step == steps {
                done_batches += 1;
                eprintln!();
            }
            let _ = std::io::stderr().flush();
        }
    }
}

pub fn run(o: &Options) -> Result<Summary> {
    let mut spec = spec(o, read_prompts(o)?);
    for &v in &o.adapter_scale {
        if !v.is_finite() {
            bail!("--adapter-scale {v} is not a finite number");
        }
    }
    let total = spec.check()?;
    let paths = prepare_outputs(o, total)?;
    let mut gen = load_generator(
        o.model.as_deref(),
        &o.device,
        o.controlnet.as_deref(),
        &o.loras,
        request::Naming::Flags,
    )?;
    spec.image_prompts = attach_adapters(o, &mut gen)?;
    request::check_control(&gen, o.control_image.is_some(), request::Naming::Flags)?;
    load_inputs(o, &mut spec, gen.vae.downscale())?;
    let req = request::build(&gen, spec)?;
    let start = Instant::now();
    let show = o.progress && std::io::stderr().is_terminal();
    let mut progress = progress_bar(show, paths.len().div_ceil(o.settings.batch));
    // Each batch's PNGs are written as soon as it is done; the latents (small) are kept for
    // --save-latents, written at the end.
    let mut latents = Vec::new();
    let mut written: Vec<PathBuf> = Vec::new();
    let run = gen.run_batches(&req, &mut progress, &mut |first, out| {
        let n = out.images.shape()[0];
        let batch = &paths[first..first + n];
        let saved = image_io::save_pngs(batch, &out.images);
        // save_pngs writes through temporaries and renames: whatever exists is complete.
        written.extend(batch.iter().filter(|p| p.is_file()).cloned());
        saved?;
        if o.save_latents.is_some() {
            latents.push(out.latents);
        }
        Ok(())
    });
    if let Err(e) = run {
        return Err(e.context(written_report(&written)));
    }
    if let Some(p) = &o.save_latents {
        let all = Tensor::cat0(&latents.iter().collect::<Vec<_>>());
        write_f32(p, &[("latents".into(), all.to_nchw())]).with_context(|| {
            format!(
                "all {} images were written; the latents were not",
                paths.len()
            )
        })?;
    }
    Ok(Summary {
        paths,
        seconds: start.elapsed().as_secs_f64(),
    })
}
