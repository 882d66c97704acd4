//! The View Generator: Zero-1-to-3-family novel views of a subject, sampled as diffusers'
//! community `pipeline_zero1to3.py` does it.
//!
//! - Condition: the CLIP image embedding of the subject (its own preprocessing: the [-1, 1]
//!   image resized to the encoder's size with bicubic, `align_corners=True`, no antialiasing,
//!   then CLIP's mean/std), concatenated with the pose
//!   `[rad(polar), sin(rad(azimuth)), cos(rad(azimuth)), radius]` and projected by
//!   `cc_projection` to one cross-attention token. The unconditional side is zeros after the
//!   projection.
//! - The VAE posterior mode of the subject (unscaled) is concatenated to the noisy latent (8 UNet
//!   input channels); zeros on the unconditional side.
//! - Any scheduler of the engine; view i of a request uses seed + i, so batching does not change
//!   results.

use super::noise::NoiseSource;
use super::request::{Naming, Settings};
use crate::backend::{self as ops, Device, LinearW};
use crate::config::Config;
use crate::image_proc::interp;
use crate::models::blocks::IpInput;
use crate::models::load;
use crate::models::unet::{Cond, Unet};
use crate::models::vae::Vae;
use crate::models::vit::{Vit, VitKind};
use crate::sched::{Scheduler, SchedulerKind};
use crate::tensor::Tensor;
use crate::weights::{layout::open_weights, Vb};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// A camera change relative to the input view, in Zero123's convention.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Pose {
    /// Polar (elevation) change in degrees.
    pub polar: f32,
    /// Azimuth change in degrees.
    pub azimuth: f32,
    /// Camera distance change.
    pub radius: f32,
}

impl Pose {
    /// The 4 numbers appended to the image embedding.
    pub fn vector(&self) -> [f32; 4] {
        let (p, a) = (self.polar.to_radians(), self.azimuth.to_radians());
        [p, a.sin(), a.cos(), self.radius]
    }
}

/// CLIP's normalisation (the community pipeline hard-codes OpenAI's values).
const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
// As written in the pipeline; f32 rounds the last digits.
#[allow(clippy::excessive_precision)]
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// A loaded Zero1to3 pipeline folder.
pub struct ViewGenerator {
    pub dir: PathBuf,
    pub unet: Unet,
    pub vae: Vae,
    pub image_encoder: Vit,
    pub cc_projection: LinearW,
    pub scheduler_config: Config,
    pub device: Device,
    /// Image side the UNet was trained at (sample_size × VAE factor).
    pub default_size: usize,
    /// Run the scheduler as tensor ops even on the CPU (tests of the GPU loop).
    pub tensor_scheduler: bool,
    /// UNet evaluations so far, per sample (see `Generator::evaluations`).
    pub evaluations: std::sync::atomic::AtomicU64,
}

/// One view to render: which subject and which pose.
#[derive(Clone, Copy, Debug)]
pub struct View {
    pub subject: usize,
    pub pose: Pose,
}

pub struct ViewRequest {
    /// Subjects as NHWC [1, H, W, 3] in [0, 1] (8-bit values / 255), already composited on white
    /// and at the output size.
    pub subjects: Vec<Tensor>,
    pub views: Vec<View>,
    pub steps: usize,
    pub guidance: f32,
    pub scheduler: Option<SchedulerKind>,
    pub seed: u64,
    /// Views per UNet batch (before the ×2 of guidance).
    pub batch: usize,
}

impl ViewRequest {
    /// The numbers by the rules every generation request follows (`request::Settings`: counts,
    /// finiteness, bounds), named as `naming` says.
    pub fn check(&self, naming: Naming) -> Result<()> {
        Settings {
            batch: self.batch,
            scheduler: self.scheduler,
            ..Settings::txt2img(self.steps, self.guidance, self.seed)
        }
        .check(naming)
    }
}

impl ViewGenerator {
    pub fn load(dir: &Path, device: &Device) -> Result<ViewGenerator> {
        let index = dir.join("model_index.json");
        Config::read(&index).with_context(|| {
            format!(
                "{}: not a diffusers pipeline folder (Zero1to3)",
                dir.display()
            )
        })?;
        let (sample, unet_config) = super::sample_size(dir, 32)?;
        let unet = load::load_unet(dir, device)?;
        let vae = load::load_vae(dir, device)?;
        let image_encoder = load::load_image_encoder(&dir.join("image_encoder"), device)?;
        if image_encoder.config.kind != VitKind::ClipVision
            || image_encoder.config.projection_dim.is_none()
        {
            bail!(
                "{}: the View Generator needs a CLIPVisionModelWithProjection image encoder",
                dir.join("image_encoder").display()
            );
        }
        let cc_projection = load_cc_projection(dir, device)?;
        let embed = image_encoder.config.projection_dim.unwrap_or(0);
        let c = &unet.config;
        if cc_projection.in_features() != embed + 4
            || cc_projection.out_features() != c.cross_attention_dim[0]
        {
            bail!(
                "{}: cc_projection maps {} → {}, but the image embedding is {embed}-wide (+4 pose values) and the UNet's cross_attention_dim is {}",
                dir.join("cc_projection").display(),
                cc_projection.in_features(),
                cc_projection.out_features(),
                c.cross_attention_dim[0]
            );
        }
        if c.in_channels != 2 * vae.latent_channels {
            bail!(
                "{}: a View Generator UNet takes the noisy latent and the image latent ({} channels), this one {}",
                dir.join("unet").display(),
                2 * vae.latent_channels,
                c.in_channels
            );
        }
        let scheduler_config =
            crate::sched::read_config(&dir.join("scheduler/scheduler_config.json"))?;
        Ok(ViewGenerator {
            dir: dir.to_path_buf(),
            default_size: super::default_side(&unet_config, sample, vae.downscale())?,
            unet,
            vae,
            image_encoder,
            cc_projection,
            scheduler_config,
            device: device.clone(),
            tensor_scheduler: false,
            evaluations: Default::default(),
        })
    }

    /// The community pipeline's CLIP input: [N, H, W, 3] in [0, 1] → [N, S, S, 3] normalised
    /// (S = the encoder's image size), on the host.
    pub fn clip_preprocess(&self, images: &Tensor) -> Tensor {
        let s = self.image_encoder.config.image_size;
        let (n, h, w, _) = images.dims4();
        let mut out = vec![0.0f32; n * s * s * 3];
        for b in 0..n {
            for c in 0..3 {
                // x = u8 / 127.5 − 1, as the pipeline converts PIL images.
                let plane: Vec<f32> = (0..h * w)
                    .map(|p| {
                        let v = (images.data()[(b * h * w + p) * 3 + c] * 255.0).round();
                        v / 127.5 - 1.0
                    })
                    .collect();
                let r = interp::bicubic_align_corners(&plane, h, w, s, s);
                for (p, v) in r.into_iter().enumerate() {
                    out[(b * s * s + p) * 3 + c] = ((v + 1.0) / 2.0 - CLIP_MEAN[c]) / CLIP_STD[c];
                }
            }
        }
        Tensor::new(vec![n, s, s, 3], out)
    }

    /// cc_projection(image embedding ⊕ pose) for each view: [B, 1, cross] on the device.
    pub fn condition(&self, images: &Tensor, poses: &[Pose]) -> Result<Tensor> {
        let b = poses.len();
        if images.shape()[0] != b {
            bail!("{} images for {b} poses", images.shape()[0]);
        }
        let dev = &self.device;
        let out = self
            .image_encoder
            .forward(&dev.put(self.clip_preprocess(images)));
        let emb = out
            .image_embeds
            .expect("checked at load: projected encoder");
        let pose = Tensor::new(vec![b, 4], poses.iter().flat_map(|p| p.vector()).collect());
        let x = ops::concat_channels(&[&emb, &dev.put(pose)]);
        let cross = self.cc_projection.out_features();
        Ok(ops::linear(&x, &self.cc_projection).reshape(vec![b, 1, cross]))
    }

    /// The unscaled VAE posterior mode of `images` ([N, H, W, 3] in [0, 1]).
    pub fn image_latents(&self, images: &Tensor) -> Result<Tensor> {
        let x = Tensor::new(
            images.shape().to_vec(),
            images
                .data()
                .iter()
                .map(|v| (v * 255.0).round() / 127.5 - 1.0)
                .collect(),
        );
        Ok(self.vae.encode(&self.device.put(x))?.0)
    }

    /// Renders every view of `req`, `batch` at a time; `done(first, latents, images)` gets each
    /// batch as it finishes (host NHWC; images in [0, 1]).
    pub fn run_batches(
        &self,
        req: &ViewRequest,
        progress: &mut dyn FnMut(usize, usize),
        done: &mut dyn FnMut(usize, Tensor, Tensor) -> Result<()>,
    ) -> Result<()> {
        req.check(Naming::Fields)?;
        let batch = req.batch;
        let mut start = 0;
        while start < req.views.len() {
            let n = batch.min(req.views.len() - start);
            let seeds = (start..start + n)
                .map(|i| req.seed.wrapping_add(i as u64))
                .collect();
            let mut noise = NoiseSource::seeded(seeds);
            let (lat, img) = self.run_chunk(req, start, n, &mut noise, progress)?;
            done(start, lat, img)?;
            start += n;
        }
        Ok(())
    }

    /// Refuses a batch of `n` views of w×h at `guidance` over the memory budget on `device`
    /// (`Generator::check_budget`'s rule).
    pub fn check_budget(
        &self,
        device: &Device,
        n: usize,
        (w, h): (usize, usize),
        guidance: f32,
    ) -> Result<()> {
        let c = &self.unet.config;
        let floor = super::generation_floor(c, &self.vae, device, (n, w, h), guidance > 1.0);
        crate::budget::check(floor, || format!("a batch of {n} view(s) of {w}×{h}"))
    }

    /// Views `first..first+n` with noise from `noise` (diffusers' order: the initial latents,
    /// then step noise for ancestral schedulers). Returns (latents, images), host NHWC.
    pub fn run_chunk(
        &self,
        req: &ViewRequest,
        first: usize,
        n: usize,
        noise: &mut NoiseSource,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(Tensor, Tensor)> {
        let views = &req.views[first..first + n];
        let (h, w) = self.subject_size(req, views)?;
        self.check_budget(&self.device, n, (w, h), req.guidance)?;
        let images = Tensor::cat0(
            &views
                .iter()
                .map(|v| &req.subjects[v.subject])
                .collect::<Vec<_>>(),
        );
        let poses: Vec<Pose> = views.iter().map(|v| v.pose).collect();
        let (context, img_lat) = self.conditioning(&images, &poses, req.guidance > 1.0)?;
        let mut sched = Scheduler::from_config_json(&self.scheduler_config, req.scheduler)?;
        sched.set_timesteps(req.steps)?;
        let f = self.vae.downscale();
        let shape = (n, self.vae.latent_channels, h / f, w / f);
        let latents = self.denoise(req, &mut sched, shape, noise, &context, &img_lat, progress)?;
        self.decode(latents)
    }

    /// The one size of the batch's subjects (each an RGB image with sides that are multiples of
    /// the VAE's factor).
    fn subject_size(&self, req: &ViewRequest, views: &[View]) -> Result<(usize, usize)> {
        let f = self.vae.downscale();
        let mut size = None;
        for v in views {
            let Some(s) = req.subjects.get(v.subject) else {
                bail!(
                    "view of subject {} but only {} subjects",
                    v.subject,
                    req.subjects.len()
                );
            };
            let (b, h, w, c) = s.dims4();
            if b != 1 || c != 3 || h % f != 0 || w % f != 0 || h == 0 || w == 0 {
                bail!("subject {}: expected one RGB image with sides that are multiples of {f}, got {:?}", v.subject, s.shape());
            }
            if size.is_some_and(|sz| sz != (h, w)) {
                bail!("the subjects of one batch must have one size");
            }
            size = Some((h, w));
        }
        size.context("no view to make")
    }

    /// The cross-attention context (CLIP ⊕ pose through cc_projection) and the subject's latents
    /// concatenated to the UNet input; under guidance, zeros for both first.
    fn conditioning(
        &self,
        images: &Tensor,
        poses: &[Pose],
        guided: bool,
    ) -> Result<(Tensor, Tensor)> {
        let dev = &self.device;
        let cond = self.condition(images, poses)?;
        let img_lat = self.image_latents(images)?;
        Ok(if guided {
            let zc = dev.put(Tensor::zeros(cond.shape().to_vec()));
            let zl = dev.put(Tensor::zeros(img_lat.shape().to_vec()));
            (Tensor::cat0(&[&zc, &cond]), Tensor::cat0(&[&zl, &img_lat]))
        } else {
            (cond, img_lat)
        })
    }

    /// The sampling loop from noise: returns the final latents, host NHWC, checked finite.
    #[allow(clippy::too_many_arguments)]
    fn denoise(
        &self,
        req: &ViewRequest,
        sched: &mut Scheduler,
        (n, c, lh, lw): (usize, usize, usize, usize),
        noise: &mut NoiseSource,
        context: &Tensor,
        img_lat: &Tensor,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let dev = &self.device;
        let guided = req.guidance > 1.0;
        let rows = if guided { 2 * n } else { n };
        let on_dev = !dev.is_cpu() || self.tensor_scheduler;
        let mut latents = ops::scale(
            &dev.put_f32(noise.draw(n, c, lh, lw)?),
            sched.init_noise_sigma(),
        );
        let timesteps = sched.timesteps().to_vec();
        let step_noise = if sched.needs_step_noise() {
            let draws = (0..timesteps.len())
                .map(|_| noise.draw(n, c, lh, lw))
                .collect::<Result<Vec<_>>>()?;
            Some(dev.put_f32(Tensor::cat0(&draws.iter().collect::<Vec<_>>())))
        } else {
            None
        };
        let no_ip: [IpInput; 0] = [];
        for (i, &t) in timesteps.iter().enumerate() {
            let x2 = if guided {
                Tensor::cat0(&[&latents, &latents])
            } else {
                latents.clone()
            };
            let x_in = if on_dev {
                dev.put_same(&sched.scale_model_input_ops(&x2, i)?)
            } else {
                sched.scale_model_input(&x2, i)?
            };
            let x_in = ops::concat_channels(&[&x_in, img_lat]);
            let ts = dev.put_f32(Tensor::new(vec![rows], vec![t; rows]));
            let cond = Cond {
                timesteps: &ts,
                context,
                text_time: None,
                ip: &no_ip,
                timestep_cond: None,
            };
            let pred = self.unet.forward(&x_in, &cond, None, None)?;
            self.evaluations
                .fetch_add(x_in.shape()[0] as u64, std::sync::atomic::Ordering::Relaxed);
            let pred = if guided {
                ops::cfg_combine(&pred, req.guidance)
            } else {
                pred
            };
            let e = step_noise.as_ref().map(|a| a.narrow0(i * n, n));
            latents = if on_dev {
                sched.step_ops(&dev.put_f32_same(&pred), i, &latents, e.as_ref())?
            } else {
                sched.step(&pred, i, &latents, e.as_ref())?
            };
            progress(i + 1, timesteps.len());
        }
        dev.check()?;
        let latents = latents.to_host()?;
        super::check_finite(&latents, "the view latents", timesteps.len())?;
        Ok(latents)
    }

    /// (latents, images in [0, 1]), host NHWC.
    fn decode(&self, latents: Tensor) -> Result<(Tensor, Tensor)> {
        let dev = &self.device;
        let x = ops::scale(
            &dev.put(latents.clone()),
            1.0 / self.vae.scaling_factor as f32,
        );
        let decoded = self.vae.decode(&x)?;
        let images = ops::affine_clamp(&decoded, 0.5, 0.5, 0.0, 1.0);
        dev.check()?;
        Ok((latents, images.to_host()?))
    }
}

/// `cc_projection/`: a Linear (`projection.weight`, `projection.bias`) in safetensors.
fn load_cc_projection(dir: &Path, device: &Device) -> Result<LinearW> {
    let sub = dir.join("cc_projection");
    if !sub.is_dir() {
        bail!(
            "{}: missing: a Zero1to3 pipeline needs its cc_projection folder",
            sub.display()
        );
    }
    for bin in ["diffusion_pytorch_model.bin", "pytorch_model.bin"] {
        if sub.join(bin).is_file() && !sub.join("diffusion_pytorch_model.safetensors").is_file() {
            bail!(
                "{}: PyTorch pickles are not read; convert it once with \
                 `python -c \"import torch, safetensors.torch as st; st.save_file(torch.load('{bin}'), 'diffusion_pytorch_model.safetensors')\"` \
                 in that folder",
                sub.join(bin).display()
            );
        }
    }
    let store = open_weights(&sub)?;
    let Some((info, _)) = store.info("projection.weight") else {
        bail!("{}: no tensor `projection.weight`", sub.display());
    };
    if info.shape.len() != 2 {
        bail!(
            "{}: `projection.weight` has shape {:?}, expected [out, in]",
            sub.display(),
            info.shape
        );
    }
    let (out, inp) = (info.shape[0], info.shape[1]);
    Vb::root_on(&store, device)
        .pp("projection")
        .linear(inp, out, true)
}
