//! A generation request resolved and checked once, for every entry point: the CLI's txt2img /
//! img2img / inpaint (`generate`), the C ABI's `toffee_generate` (`ffi`) and the pairs job's
//! draft and Refiner (`dataset::stages`). Callers turn files, flags or C structs into a `Spec`
//! (host images, no model needed); `build` checks it against the loaded generator and makes the
//! `Request` the sampler runs. The rules live here only: sizes, bounds, finiteness, which inputs
//! each mode takes, the default strengths, fitting the images to the output size, Canny.

use super::{Control, Generator, ImagePrompt, Init, Request};
use crate::canny;
use crate::image_io;
use crate::sched::SchedulerKind;
use crate::tensor::Tensor;
use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Txt2Img,
    /// From `image` at `strength`; with a mask, only inside it (diffusers' inpainting on this
    /// UNet at the img2img strength).
    Img2Img,
    /// Repaint where the mask is white (or where an RGBA image's alpha is not).
    Inpaint,
}

/// How messages name a setting: as the CLI's flag (`--control-scale`) or as the C struct's field
/// (`control_scale`), so each caller's user reads the name they typed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    Flags,
    Fields,
}

impl Naming {
    fn name(self, field: &str) -> String {
        match self {
            Naming::Flags => format!("--{}", field.replace('_', "-")),
            Naming::Fields => field.to_string(),
        }
    }
}

/// What a caller asks for, before the model is consulted.
pub struct Spec {
    pub mode: Mode,
    pub prompts: Vec<String>,
    /// One negative prompt for every prompt.
    pub negative: Option<String>,
    pub images_per_prompt: usize,
    pub steps: usize,
    pub guidance: f32,
    pub scheduler: Option<SchedulerKind>,
    pub seed: u64,
    pub batch: usize,
    /// Output size; a side not given is the image's (rounded to the VAE's factor) or the model's
    /// default.
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// img2img / inpaint source, [1, H, W, 3] in [0, 1], and its alpha [1, H, W, 1].
    pub image: Option<Tensor>,
    pub alpha: Option<Tensor>,
    /// [1, H, W, 1], white = change.
    pub mask: Option<Tensor>,
    /// None: 0.8 for img2img, 1 for inpainting.
    pub strength: Option<f64>,
    /// The ControlNet's image, [1, H, W, 3] in [0, 1]; `canny` turns it into edges first.
    pub control: Option<Tensor>,
    pub control_scale: f32,
    pub canny: bool,
    pub image_prompts: Vec<ImagePrompt>,
    /// Initial latents, NHWC.
    pub init_latents: Option<Tensor>,
    pub naming: Naming,
}

impl Spec {
    /// A text-to-image spec with the usual defaults (one image per prompt, one batch).
    pub fn txt2img(prompts: Vec<String>, steps: usize, guidance: f32, seed: u64) -> Spec {
        let n = prompts.len();
        Spec {
            mode: Mode::Txt2Img,
            prompts,
            negative: None,
            images_per_prompt: 1,
            steps,
            guidance,
            scheduler: None,
            seed,
            batch: n.max(1),
            width: None,
            height: None,
            image: None,
            alpha: None,
            mask: None,
            strength: None,
            control: None,
            control_scale: 1.0,
            canny: false,
            image_prompts: Vec::new(),
            init_latents: None,
            naming: Naming::Flags,
        }
    }

    /// Upper bounds, checked before anything is allocated.
    fn check_bounds(&self) -> Result<()> {
        for (f, v, max) in [
            ("width", self.width.unwrap_or(0), 16_384),
            ("height", self.height.unwrap_or(0), 16_384),
            ("steps", self.steps, 10_000),
            ("batch", self.batch, 4_096),
            ("images_per_prompt", self.images_per_prompt, 100_000),
        ] {
            if v > max {
                bail!("{} {v} is larger than {max}", self.naming.name(f));
            }
        }
        Ok(())
    }

    /// The checks that need no model (done before one loads): counts, bounds, finiteness, the
    /// seeds of every image. Returns the number of images.
    pub fn check(&self) -> Result<usize> {
        let name = |f: &str| self.naming.name(f);
        if self.prompts.is_empty() {
            bail!("no prompt");
        }
        for (f, v) in [
            ("images_per_prompt", self.images_per_prompt),
            ("batch", self.batch),
            ("steps", self.steps),
        ] {
            if v == 0 {
                bail!("{} must be at least 1", name(f));
            }
        }
        let finite = [
            ("guidance", Some(self.guidance)),
            ("control_scale", Some(self.control_scale)),
            ("strength", self.strength.map(|s| s as f32)),
        ];
        for (f, v) in finite {
            if let Some(v) = v.filter(|v| !v.is_finite()) {
                bail!("{} {v} is not a finite number", name(f));
            }
        }
        self.check_bounds()?;
        if let Some(s) = self.strength {
            if self.mode == Mode::Txt2Img {
                bail!("{} applies to img2img and inpaint", name("strength"));
            }
            if !(0.0..=1.0).contains(&s) {
                bail!("{} {s} is not in [0, 1]", name("strength"));
            }
        }
        let total = self
            .prompts
            .len()
            .checked_mul(self.images_per_prompt)
            .filter(|&t| t <= 1_000_000)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{} prompts × {} images per prompt is too many images",
                    self.prompts.len(),
                    self.images_per_prompt
                )
            })?;
        if self.seed.checked_add(total as u64 - 1).is_none() {
            bail!(
                "{} {}: image i uses seed + i, which overflows for {total} images",
                name("seed"),
                self.seed
            );
        }
        Ok(total)
    }
}

/// Checks `s` against `gen` and makes the request: the output size, the initial state of each
/// mode, the control image.
pub fn build(gen: &Generator, s: Spec) -> Result<Request> {
    s.check()?;
    let name = |f: &str| s.naming.name(f);
    let (width, height) = output_size(gen, &s)?;
    if s.canny && gen.controlnet.is_none() {
        bail!(
            "{} prepares a ControlNet image: it needs a ControlNet and a control image",
            name("canny")
        );
    }
    let init = initial_state(gen, &s, width, height)?;
    check_control(gen, s.control.is_some(), s.naming)?;
    let control = match s.control {
        Some(c) => {
            let fitted = image_io::fit(&c, width, height);
            let image = match s.canny {
                true => canny::canny(&fitted, 100.0, 200.0),
                false => fitted,
            };
            Some(Control {
                image,
                scale: s.control_scale,
            })
        }
        None => None,
    };
    let n = s.prompts.len();
    Ok(Request {
        negative: s.negative.map(|neg| vec![neg; n]),
        prompts: s.prompts,
        images_per_prompt: s.images_per_prompt,
        steps: s.steps,
        guidance: s.guidance,
        width,
        height,
        scheduler: s.scheduler,
        seed: s.seed,
        batch: s.batch,
        init,
        control,
        init_latents: s.init_latents,
        image_prompts: s.image_prompts,
    })
}

/// A control image goes with a ControlNet, and a ControlNet needs one (callers that load the
/// image from a file check this first, so a file is not read for nothing).
pub fn check_control(gen: &Generator, given: bool, naming: Naming) -> Result<()> {
    let name = naming.name("control_image");
    match (given, gen.controlnet.is_some()) {
        (true, false) => bail!(
            "{name} needs a ControlNet ({}, or a pipeline folder with a controlnet/ component)",
            naming.name("controlnet")
        ),
        (false, true) => bail!("a ControlNet is loaded: give {name}"),
        _ => Ok(()),
    }
}

/// The size asked for, else the source image's rounded to the VAE's factor, else the model's.
fn output_size(gen: &Generator, s: &Spec) -> Result<(usize, usize)> {
    let f = gen.vae.downscale();
    for (field, v) in [("width", s.width), ("height", s.height)] {
        if let Some(v) = v.filter(|&v| v == 0 || v % f != 0) {
            bail!(
                "{} {v} is not a positive multiple of {f}",
                s.naming.name(field)
            );
        }
    }
    let d = gen.default_size;
    Ok(match (s.width, s.height, &s.image) {
        (None, None, Some(img)) => {
            let (_, h, w, _) = img.dims4();
            if w < f || h < f {
                bail!(
                    "{} is {w}x{h} pixels: each side must be at least {f}",
                    s.naming.name("image")
                );
            }
            image_io::target_size(w, h, f)
        }
        (None, None, None) => (d, d),
        (w, h, _) => (w.unwrap_or(d), h.unwrap_or(d)),
    })
}

/// Text-to-image from nothing for `n` samples of w×h: noise, or for an inpainting-style UNet
/// (ToffeeNet) diffusers' inpainting with an all-white mask over an empty source.
pub fn txt2img_init(gen: &Generator, n: usize, w: usize, h: usize) -> Init {
    if gen.unet.config.in_channels == 2 * gen.vae.latent_channels + 1 {
        Init::Inpaint {
            image: Tensor::zeros(vec![n, h, w, 3]),
            mask: Tensor::new(vec![n, h, w, 1], vec![1.0; n * h * w]),
            strength: 1.0,
        }
    } else {
        Init::Noise
    }
}

/// Where sampling starts in each mode.
fn initial_state(gen: &Generator, s: &Spec, w: usize, h: usize) -> Result<Init> {
    let name = |f: &str| s.naming.name(f);
    let fit = |t: &Tensor| image_io::fit(t, w, h);
    match s.mode {
        Mode::Txt2Img => {
            if s.image.is_some() || s.mask.is_some() {
                bail!(
                    "txt2img takes no {} or {} (use img2img or inpaint)",
                    name("image"),
                    name("mask")
                );
            }
            Ok(txt2img_init(gen, 1, w, h))
        }
        Mode::Img2Img => {
            let Some(image) = &s.image else {
                bail!("img2img needs {}", name("image"));
            };
            let strength = s.strength.unwrap_or(0.8);
            Ok(match &s.mask {
                Some(m) => Init::Inpaint {
                    image: fit(image),
                    mask: fit(m),
                    strength,
                },
                None => Init::Image {
                    image: fit(image),
                    strength,
                },
            })
        }
        Mode::Inpaint => {
            let Some(image) = &s.image else {
                bail!("inpaint needs {}", name("image"));
            };
            let mask = match (&s.mask, &s.alpha) {
                (Some(m), _) => fit(m),
                // An RGBA image's alpha is the subject: keep it, repaint the rest.
                (None, Some(a)) => {
                    let keep = fit(a);
                    let repaint = keep.data().iter().map(|v| 1.0 - v).collect();
                    Tensor::new(keep.shape().to_vec(), repaint)
                }
                (None, None) => bail!(
                    "inpaint needs {} (white = repaint) or an RGBA {} whose alpha marks what to keep",
                    name("mask"),
                    name("image")
                ),
            };
            Ok(Init::Inpaint {
                image: fit(image),
                mask,
                strength: s.strength.unwrap_or(1.0),
            })
        }
    }
}
