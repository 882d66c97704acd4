//! The generation commands (`txt2img`, `img2img`, `inpaint`) as the CLI and the C ABI use them:
//! files in, files out. Argument parsing lives in main.rs; all behaviour lives here.

use crate::canny;
use crate::image_io;
use crate::models::adapter::Adapter;
use crate::pipeline::{image_prompt, Control, Generator, ImagePrompt, Init, Request};
use crate::sched::SchedulerKind;
use crate::tensor::Tensor;
use crate::weights::safetensors::{read_all, write_f32};
use anyhow::{bail, Context, Result};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Txt2Img,
    Img2Img,
    Inpaint,
}

/// Everything a generation command was asked for.
pub struct Options {
    pub mode: Mode,
    /// None: the built-in demo model.
    pub model: Option<PathBuf>,
    pub prompts: Vec<String>,
    pub prompts_file: Option<PathBuf>,
    pub negative: Option<String>,
    pub images_per_prompt: usize,
    pub steps: usize,
    pub guidance: f32,
    pub scheduler: Option<SchedulerKind>,
    pub seed: u64,
    pub batch: usize,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub out: PathBuf,
    pub controlnet: Option<PathBuf>,
    pub control_image: Option<PathBuf>,
    pub control_scale: f32,
    pub canny: bool,
    pub strength: Option<f64>,
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
        let text = std::fs::read_to_string(f)
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

fn load_image_fit(
    path: &Path,
    size: Option<(usize, usize)>,
    multiple: usize,
) -> Result<(image_io::LoadedImage, usize, usize)> {
    let img = image_io::load(path)?;
    let (_, h, w, _) = img.rgb.dims4();
    image_io::check_size(path, w, h, multiple)?;
    let (tw, th) = size.unwrap_or_else(|| image_io::target_size(w, h, multiple));
    let rgb = image_io::fit(&img.rgb, tw, th);
    let alpha = img.alpha.map(|a| image_io::fit(&a, tw, th));
    Ok((image_io::LoadedImage { rgb, alpha }, tw, th))
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
    if o.adapter_image.len() != n {
        bail!(
            "{n} --adapter but {} --adapter-image: give each adapter its subject image (in the same order)",
            o.adapter_image.len()
        );
    }
    if o.adapter_scale.len() > 1 && o.adapter_scale.len() != n {
        bail!("--adapter-scale: give one for all adapters or one per adapter ({n})");
    }
    if !o.adapter_encoder.is_empty() && o.adapter_encoder.len() != n {
        bail!("--adapter-encoder: give none or one per adapter ({n})");
    }
    let layers = gen.unet.cross_attention_layers();
    let mut prompts = Vec::new();
    for (i, path) in o.adapter.iter().enumerate() {
        let adapter = Adapter::load(path, &gen.device)?;
        let enc = image_prompt::load_encoder(
            &adapter,
            o.adapter_encoder.get(i).map(|p| p.as_path()),
            &gen.device,
        )?;
        let image = crate::image_proc::load_rgb8_on_white(&o.adapter_image[i])?;
        let scale = match o.adapter_scale.len() {
            0 => adapter.default_scale,
            1 => o.adapter_scale[0],
            _ => o.adapter_scale[i],
        };
        prompts.push(image_prompt::image_prompt(
            &adapter, &enc, &image, scale, layers,
        )?);
        gen.attach_adapter(adapter)?;
    }
    Ok(prompts)
}

pub struct Summary {
    pub paths: Vec<PathBuf>,
    pub seconds: f64,
}

pub fn run(o: &Options) -> Result<Summary> {
    let prompts = read_prompts(o)?;
    if o.images_per_prompt == 0 || o.batch == 0 || o.steps == 0 {
        bail!("--images-per-prompt, --batch and --steps must be at least 1");
    }
    for (flag, v) in [
        ("--guidance", Some(o.guidance)),
        ("--control-scale", Some(o.control_scale)),
        ("--strength", o.strength.map(|s| s as f32)),
    ]
    .into_iter()
    .chain(
        o.adapter_scale
            .iter()
            .map(|&s| ("--adapter-scale", Some(s))),
    ) {
        if let Some(v) = v.filter(|v| !v.is_finite()) {
            bail!("{flag} {v} is not a finite number");
        }
    }
    for (flag, v, max) in [
        ("--width", o.width.unwrap_or(0), 16_384),
        ("--height", o.height.unwrap_or(0), 16_384),
        ("--steps", o.steps, 10_000),
        ("--batch", o.batch, 4_096),
        ("--images-per-prompt", o.images_per_prompt, 100_000),
    ] {
        if v > max {
            bail!("{flag} {v} is larger than {max}");
        }
    }
    let total = prompts
        .len()
        .checked_mul(o.images_per_prompt)
        .filter(|&t| t <= 1_000_000)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{} prompts × {} images per prompt is too many images",
                prompts.len(),
                o.images_per_prompt
            )
        })?;
    if o.seed.checked_add(total as u64 - 1).is_none() {
        bail!(
            "--seed {}: image i uses seed + i, which overflows for {total} images",
            o.seed
        );
    }
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
    let mut gen = match &o.model {
        Some(m) => {
            let device = crate::models::load::open_device(&o.device, Some(m), "unet")?;
            Generator::load_with_loras(m, o.controlnet.as_deref(), &o.loras, &device)?
        }
        None => {
            if !o.loras.is_empty() {
                bail!("--lora needs --model (a LoRA is made for one base model)");
            }
            if o.controlnet.is_some() {
                bail!("--controlnet needs --model (the built-in demo model has no ControlNet)");
            }
            crate::builtin::generator(&crate::models::load::open_device(&o.device, None, "")?)?
        }
    };
    let f = gen.vae.downscale();
    for (name, v) in [("--width", o.width), ("--height", o.height)] {
        if let Some(v) = v {
            if v == 0 || v % f != 0 {
                bail!("{name} {v} is not a positive multiple of {f}");
            }
        }
    }
    let user_size = match (o.width, o.height) {
        (None, None) => None,
        (w, h) => Some((w.unwrap_or(gen.default_size), h.unwrap_or(gen.default_size))),
    };
    if o.canny && gen.controlnet.is_none() {
        bail!("--canny prepares a ControlNet image: it needs a ControlNet (--controlnet) and --control-image");
    }
    let image_prompts = attach_adapters(o, &mut gen)?;
    let (init, width, height) = match o.mode {
        Mode::Txt2Img => {
            if o.image.is_some() || o.mask.is_some() {
                bail!("txt2img takes no --image or --mask (use img2img or inpaint)");
            }
            let (w, h) = user_size.unwrap_or((gen.default_size, gen.default_size));
            let c = gen.vae.latent_channels;
            if gen.unet.config.in_channels == 2 * c + 1 {
                // An inpainting-style UNet (ToffeeNet) generating from nothing: the whole image is
                // the mask and the source is empty, diffusers' inpainting with an all-white mask.
                (
                    Init::Inpaint {
                        image: Tensor::zeros(vec![1, h, w, 3]),
                        mask: Tensor::new(vec![1, h, w, 1], vec![1.0; h * w]),
                        strength: 1.0,
                    },
                    w,
                    h,
                )
            } else {
                (Init::Noise, w, h)
            }
        }
        Mode::Img2Img => {
            let path = o.image.as_ref().context("img2img needs --image")?;
            let (img, w, h) = load_image_fit(path, user_size, f)?;
            let strength = o.strength.unwrap_or(0.8);
            match &o.mask {
                // Change only inside the mask: diffusers' inpainting on this UNet (latent blending
                // for 4-channel UNets) at the img2img strength.
                Some(m) => (
                    Init::Inpaint {
                        image: img.rgb,
                        mask: image_io::fit(&image_io::load_mask(m)?, w, h),
                        strength,
                    },
                    w,
                    h,
                ),
                None => (
                    Init::Image {
                        image: img.rgb,
                        strength,
                    },
                    w,
                    h,
                ),
            }
        }
        Mode::Inpaint => {
            let path = o.image.as_ref().context("inpaint needs --image")?;
            let (img, w, h) = load_image_fit(path, user_size, f)?;
            let mask = match (&o.mask, img.alpha) {
                (Some(m), _) => {
                    let m_img = image_io::load_mask(m)?;
                    image_io::fit(&m_img, w, h)
                }
                // An RGBA image's alpha is the subject: keep it, repaint the rest.
                (None, Some(a)) => Tensor::new(a.shape().to_vec(), a.data().iter().map(|v| 1.0 - v).collect()),
                (None, None) => bail!("inpaint needs --mask (white = repaint) or an RGBA --image whose alpha marks what to keep"),
            };
            (
                Init::Inpaint {
                    image: img.rgb,
                    mask,
                    strength: o.strength.unwrap_or(1.0),
                },
                w,
                h,
            )
        }
    };
    if let Some(s) = o.strength {
        if o.mode == Mode::Txt2Img {
            bail!("--strength applies to img2img and inpaint");
        }
        if !(0.0..=1.0).contains(&s) {
            bail!("--strength {s} is not in [0, 1]");
        }
    }
    let control = match (&o.control_image, gen.controlnet.is_some()) {
        (Some(p), true) => {
            let img = image_io::load(p)?;
            let (_, ih, iw, _) = img.rgb.dims4();
            image_io::check_size(p, iw, ih, 1)?;
            let fitted = image_io::fit(&img.rgb, width, height);
            let image = if o.canny { canny::canny(&fitted, 100.0, 200.0) } else { fitted };
            Some(Control { image, scale: o.control_scale })
        }
        (Some(_), false) => bail!("--control-image needs --controlnet (or a pipeline folder with a controlnet/ component)"),
        (None, true) => bail!("a ControlNet is loaded: give --control-image"),
        (None, false) => None,
    };
    let init_latents = match &o.init_latents {
        None => None,
        Some(p) => {
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
            Some(l.to_nhwc())
        }
    };
    let req = Request {
        negative: o.negative.as_ref().map(|n| vec![n.clone(); prompts.len()]),
        prompts,
        images_per_prompt: o.images_per_prompt,
        steps: o.steps,
        guidance: o.guidance,
        width,
        height,
        scheduler: o.scheduler,
        seed: o.seed,
        batch: o.batch,
        init,
        control,
        init_latents,
        image_prompts,
    };
    let start = Instant::now();
    let show = o.progress && std::io::stderr().is_terminal();
    let mut done_batches = 0;
    let batches = total.div_ceil(o.batch);
    let mut progress = |step: usize, steps: usize| {
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
    };
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
