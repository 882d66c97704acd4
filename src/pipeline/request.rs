//! A generation request resolved and checked once, for every entry point: the CLI's txt2img /
//! img2img / inpaint (`generate`), the C ABI's `toffee_generate` (`ffi`) and the pairs job
//! (`dataset::config` checks its draft and Refiner settings here; `dataset::stages` starts the
//! draft with `txt2img_init`). Callers turn files, flags, C structs or config keys into
//! `Settings` (the numbers, with their rules) and a `Spec` (prompts and host images, no model
//! needed); `build` checks it against the loaded generator and makes the `Request` the sampler
//! runs. The rules live here only: sizes, bounds, finiteness, which inputs each mode takes, the
//! default strengths, fitting the images to the output size, Canny.

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

/// How messages name a setting: as the CLI's flag (`--control-scale`), as the C struct's field
/// (`control_scale`) or as the pairs config's key (`draft.controlnet_scale`), so each caller's
/// user reads the name they typed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    Flags,
    Fields,
    /// A section of the pairs config (`draft`, `refine`).
    Config(&'static str),
}

impl Naming {
    /// `field` (the C struct's spelling) as this caller's user typed it.
    pub fn name(self, field: &str) -> String {
        match self {
            Naming::Flags => format!("--{}", field.replace('_', "-")),
            Naming::Fields => field.to_string(),
            Naming::Config(section) => match field {
                "control_scale" => format!("{section}.controlnet_scale"),
                "batch" => "job.batch".into(),
                "width" | "height" => "job.resolution".into(),
                _ => format!("{section}.{field}"),
            },
        }
    }
}

/// The numbers and switches of a request, as every entry point takes them (flags, C fields,
/// config keys); one set of rules (`check`) for all of them.
#[derive(Clone, Debug)]
pub struct Settings {
    pub mode: Mode,
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
    /// None: 0.8 for img2img, 1 for inpainting.
    pub strength: Option<f64>,
    pub control_scale: f32,
    /// Turn the control image into Canny edges first.
    pub canny: bool,
}

impl Settings {
    /// Text-to-image with the usual defaults (one image per prompt, a batch of one).
    pub fn txt2img(steps: usize, guidance: f32, seed: u64) -> Settings {
        Settings {
            mode: Mode::Txt2Img,
            images_per_prompt: 1,
            steps,
            guidance,
            scheduler: None,
            seed,
            batch: 1,
            width: None,
            height: None,
            strength: None,
            control_scale: 1.0,
            canny: false,
        }
    }

    /// The rules that need no model: counts of at least one, every real finite (a NaN slips
    /// through comparisons: a NaN guidance turns guidance off), sizes and counts under the bounds
    /// checked before anything is allocated, the strength in [0, 1] and only where it applies.
    pub fn check(&self, naming: Naming) -> Result<()> {
        let name = |f: &str| naming.name(f);
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
        for (f, v, max) in [
            ("width", self.width.unwrap_or(0), MAX_SIDE),
            ("height", self.height.unwrap_or(0), MAX_SIDE),
            ("steps", self.steps, 10_000),
            ("batch", self.batch, 4_096),
            ("images_per_prompt", self.images_per_prompt, 100_000),
        ] {
            if v > max {
                bail!("{} {v} is larger than {max}", name(f));
            }
        }
        if let Some(s) = self.strength {
            if self.mode == Mode::Txt2Img {
                bail!("{} applies to img2img and inpaint", name("strength"));
            }
            if !(0.0..=1.0).contains(&s) {
                bail!("{} {s} is not in [0, 1]", name("strength"));
            }
        }
        Ok(())
    }
}

/// The largest output side: 16384² RGB in f32 is 3 GiB before a single latent; anything larger
/// is a typo, refused before allocation.
pub const MAX_SIDE: usize = 16_384;

/// What a caller asks for, before the model is consulted.
pub struct Spec {
    pub settings: Settings,
    pub prompts: Vec<String>,
    /// One negative prompt for every prompt.
    pub negative: Option<String>,
    /// img2img / inpaint source, [1, H, W, 3] in [0, 1], and its alpha [1, H, W, 1].
    pub image: Option<Tensor>,
    pub alpha: Option<Tensor>,
    /// [1, H, W, 1], white = change.
    pub mask: Option<Tensor>,
    /// The ControlNet's image, [1, H, W, 3] in [0, 1]; `settings.canny` turns it into edges first.
    pub control: Option<Tensor>,
    pub image_prompts: Vec<ImagePrompt>,
    /// Initial latents, NHWC.
    pub init_latents: Option<Tensor>,
    pub naming: Naming,
}

impl Spec {
    /// `settings` for `prompts`, with no images.
    pub fn new(settings: Settings, prompts: Vec<String>, naming: Naming) -> Spec {
        Spec {
            settings,
            prompts,
            negative: None,
            image: None,
            alpha: None,
            mask: None,
            control: None,
            image_prompts: Vec::new(),
            init_latents: None,
            naming,
        }
    }

    /// The checks that need no model (done before one loads): the settings' rules, the prompt
    /// count, the seeds of every image. Returns the number of images.
    pub fn check(&self) -> Result<usize> {
        let st = &self.settings;
        if self.prompts.is_empty() {
            bail!("no prompt");
        }
        st.check(self.naming)?;
        let total = self
            .prompts
            .len()
            .checked_mul(st.images_per_prompt)
            .filter(|&t| t <= 1_000_000)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{} prompts × {} images per prompt is too many images",
                    self.prompts.len(),
                    st.images_per_prompt
                )
            })?;
        if st.seed.checked_add(total as u64 - 1).is_none() {
            bail!(
                "{} {}: image i uses seed + i, which overflows for {total} images",
                self.naming.name("seed"),
                st.seed
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
    let st = &s.settings;
    let (width, height) = output_size(gen, &s)?;
    if st.canny && gen.controlnet.is_none() {
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
            let image = match st.canny {
                true => canny::canny(&fitted, 100.0, 200.0),
                false => fitted,
            };
            Some(Control {
                image,
                scale: st.control_scale,
            })
        }
        None => None,
    };
    let n = s.prompts.len();
    Ok(Request {
        negative: s.negative.map(|neg| vec![neg; n]),
        prompts: s.prompts,
        images_per_prompt: st.images_per_prompt,
        steps: st.steps,
        guidance: st.guidance,
        width,
        height,
        scheduler: st.scheduler,
        seed: st.seed,
        batch: st.batch,
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
    let st = &s.settings;
    for (field, v) in [("width", st.width), ("height", st.height)] {
        if let Some(v) = v.filter(|&v| v == 0 || v % f != 0) {
            bail!(
                "{} {v} is not a positive multiple of {f}",
                s.naming.name(field)
            );
        }
    }
    let d = gen.default_size;
    Ok(match (st.width, st.height, &s.image) {
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
    match s.settings.mode {
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
            let strength = s.settings.strength.unwrap_or(0.8);
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
                strength: s.settings.strength.unwrap_or(1.0),
            })
        }
    }
}
