//! Sampling pipelines: text-to-image with classifier-free guidance, img2img, inpainting (9-channel
//! UNets, and latent blending for 4-channel ones) and ControlNet, for SD1.x, SD2.x and SDXL,
//! matching diffusers' pipelines step for step.

mod denoise;
pub mod depth;
pub mod graph;
pub mod image_prompt;
pub mod mask;
pub mod noise;
pub mod prompt;
pub mod request;
pub mod score;
pub mod view;

use crate::backend::{self as ops, Device};
use crate::config::Config;
use crate::models::adapter::Adapter;
use crate::models::blocks::IpInput;
use crate::models::controlnet::ControlNet;
use crate::models::load::{self, Checkpoint};
use crate::models::unet::{Cond, Unet};
use crate::models::vae::Vae;
use crate::sched::{Scheduler, SchedulerKind};
use crate::tensor::Tensor;
use crate::tokenizer::ClipTokenizer;
use crate::weights::lora::{Lora, LoraSpec};
use crate::weights::single_file::{is_single_file, SingleFile};
use anyhow::{bail, Context, Result};
use denoise::Conditioning;
use graph::StepGraph;
use noise::NoiseSource;
use prompt::{Embeds, TextEncoders};
use std::path::{Path, PathBuf};

/// A loaded generator: text encoder(s), UNet, VAE, scheduler config, optional ControlNet.
pub struct Generator {
    pub name: String,
    pub text: TextEncoders,
    pub unet: Unet,
    pub vae: Vae,
    pub controlnet: Option<ControlNet>,
    pub scheduler_config: Config,
    /// SDXL: a missing negative prompt means zero embeddings rather than encoding "".
    pub force_zeros_for_empty_prompt: bool,
    /// Default image side (unet sample_size × VAE factor).
    pub default_size: usize,
    /// Where the models run.
    pub device: Device,
    /// CUDA graphs of the denoising call and the VAE decode, kept across batches.
    pub graphs: std::sync::Mutex<Graphs>,
    /// Run the scheduler as whole-tensor ops (as on GPUs) even on the CPU: lets the CPU tests
    /// check the GPU loop's logic against diffusers.
    pub tensor_scheduler: bool,
    /// Image-prompt adapters attached to the UNet (their projections; the layer weights live in
    /// the UNet), in attachment order.
    pub adapters: Vec<Adapter>,
    /// UNet evaluations so far, counted per sample (a CFG step of n images counts 2n): what a
    /// pair costs, for `pairs --bench`.
    pub evaluations: std::sync::atomic::AtomicU64,
}

pub struct Graphs {
    text: StepGraph,
    step: StepGraph,
    decode: StepGraph,
}

impl Graphs {
    pub fn new(device: &Device) -> std::sync::Mutex<Graphs> {
        std::sync::Mutex::new(Graphs {
            text: StepGraph::new(device),
            step: StepGraph::new(device),
            decode: StepGraph::new(device),
        })
    }
}

/// How the denoising starts.
pub enum Init {
    /// Pure noise (text-to-image).
    Noise,
    /// img2img: NHWC image in [0, 1], one for all images or one per image.
    Image { image: Tensor, strength: f64 },
    /// Inpainting: image NHWC in [0, 1]; mask NHWC one channel in [0, 1] (1 = repaint).
    Inpaint {
        image: Tensor,
        mask: Tensor,
        strength: f64,
    },
}

pub struct Control {
    /// NHWC conditioning image in [0, 1] at the output size (one for all images).
    pub image: Tensor,
    pub scale: f32,
}

pub struct Request {
    pub prompts: Vec<String>,
    /// None: no negative prompt (SD: "", SDXL: zeros when the model says so); else one per prompt.
    pub negative: Option<Vec<String>>,
    pub images_per_prompt: usize,
    pub steps: usize,
    pub guidance: f32,
    pub width: usize,
    pub height: usize,
    pub scheduler: Option<SchedulerKind>,
    pub seed: u64,
    /// Images per UNet batch (before the ×2 of guidance).
    pub batch: usize,
    pub init: Init,
    pub control: Option<Control>,
    /// Starting noise for every image (NHWC latents, unscaled), like diffusers' `latents`.
    pub init_latents: Option<Tensor>,
    /// One per attached adapter (`Generator::attach_adapter`), in the same order.
    pub image_prompts: Vec<ImagePrompt>,
}

/// The image condition of one adapter: what its projection takes (IP-Adapter: image embeddings
/// [R, D] or [R, images, D]; Plus / Toffee: hidden states [R, tokens, D]) for the conditional side
/// and for the unconditional side of guidance, with R = 1 (shared by every image of the request)
/// or R = every image of the request (one subject each, as the pairs job batches records), and λ
/// per cross-attention layer (`Unet::cross_attention_layers` values).
pub struct ImagePrompt {
    pub positive: Tensor,
    pub negative: Tensor,
    pub scales: Vec<f32>,
}

impl Request {
    pub fn total_images(&self) -> usize {
        self.prompts.len() * self.images_per_prompt
    }
}

pub struct Output {
    /// Final latents before VAE decoding, NHWC, all images.
    pub latents: Tensor,
    /// Decoded images NHWC in [0, 1].
    pub images: Tensor,
}

/// What a pipeline needs besides its models: a diffusers folder's model index, tokenizers and
/// scheduler config, or a single-file checkpoint's (from its config folder or built in).
struct PipelineParts {
    path: PathBuf,
    model_index: Config,
    single: Option<SingleFile>,
}

impl PipelineParts {
    fn open(path: &Path) -> Result<PipelineParts> {
        if is_single_file(path) {
            let sf = SingleFile::open(path)?;
            sf.check_complete()?;
            if !sf.components().contains(&"unet") {
                bail!(
                    "{}: a {} file, not a full Stable Diffusion checkpoint (UNet, VAE and text encoders)",
                    path.display(),
                    sf.family.describe()
                );
            }
            return Ok(PipelineParts {
                path: path.to_path_buf(),
                model_index: sf.model_index()?,
                single: Some(sf),
            });
        }
        if !path.is_dir() {
            bail!("{}: model folder not found", path.display());
        }
        let model_index = Config::read(&path.join("model_index.json"))
            .with_context(|| format!("{}: not a diffusers pipeline folder", path.display()))?;
        Ok(PipelineParts {
            path: path.to_path_buf(),
            model_index,
            single: None,
        })
    }

    fn tokenizer(&self, sub: &str) -> Result<ClipTokenizer> {
        match &self.single {
            Some(sf) => sf.tokenizer(sub),
            None => ClipTokenizer::from_dir(&self.path.join(sub)),
        }
    }

    fn has_second_encoder(&self) -> bool {
        match &self.single {
            Some(sf) => sf.components().contains(&"text_encoder_2"),
            None => self.path.join("text_encoder_2").is_dir(),
        }
    }

    fn scheduler_config(&self) -> Result<Config> {
        match &self.single {
            Some(sf) => sf.scheduler_config(),
            None => crate::sched::read_config(&self.path.join("scheduler/scheduler_config.json")),
        }
    }
}

/// The UNet's `sample_size` (in latents) of the pipeline at `path`, read before any weight
/// loads: it makes the default image side of every request without a size, so a config claiming
/// an absurd one (2^40) is an error here, naming it, instead of an abort when the images are
/// allocated. Returns it and the config's path.
pub(crate) fn sample_size(path: &Path, fallback: usize) -> Result<(usize, PathBuf)> {
    let ckpt = Checkpoint::open(path, "unet")?;
    let side = ckpt.config.usize_or("sample_size", fallback)?;
    if side == 0 || side > request::MAX_SIDE {
        bail!(
            "{}: the unet's sample_size {side} is not 1 to {}",
            ckpt.config.path.display(),
            request::MAX_SIDE
        );
    }
    Ok((side, ckpt.config.path))
}

/// `sample` latents (from `config`) × the VAE's `factor`: the default image side, bounded like a
/// requested one.
pub(crate) fn default_side(config: &Path, sample: usize, factor: usize) -> Result<usize> {
    sample
        .checked_mul(factor)
        .filter(|&s| s <= request::MAX_SIDE)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{}: the unet's sample_size × the VAE's factor is {sample} × {factor} pixels, \
                 over {}",
                config.display(),
                request::MAX_SIDE
            )
        })
}

impl Generator {
    /// Refuses a batch of `n` images of w×h at `guidance` whose lower bound (`generation_floor`
    /// on `device`, where it will run: the pairs job's `--check` builds its models on the CPU
    /// from shapes alone) is over the memory budget.
    pub fn check_budget(
        &self,
        device: &Device,
        n: usize,
        (w, h): (usize, usize),
        guidance: f32,
    ) -> Result<()> {
        // LCM UNets take guidance as an embedding: one batch whatever its value (see run_chunk).
        let guided = guidance > 1.0 && self.unet.config.time_cond_proj_dim.is_none();
        let floor = generation_floor(&self.unet.config, &self.vae, device, (n, w, h), guided);
        crate::budget::check(floor, || format!("a batch of {n} image(s) of {w}×{h}"))
    }
}

/// A lower bound of the bytes a batch of `n` images at w×h holds at once (`budget`): the
/// decoded images on the host; on the CPU also the UNet's first-level skip activation while its
/// first attention layer holds score matrices, and the VAE's decoding.
pub(crate) fn generation_floor(
    unet: &crate::models::unet::UnetConfig,
    vae: &Vae,
    device: &Device,
    (n, w, h): (usize, usize, usize),
    guided: bool,
) -> u64 {
    let images = crate::budget::f32_bytes(&[n, h, w, 3]);
    let f = vae.downscale();
    let samples = if guided { 2 * n } else { n };
    images
        .max(unet_floor(unet, device, samples, (h / f, w / f)))
        .max(vae.decode_floor(n, h, w))
}

/// A lower bound of the bytes one UNet call on `samples` latents of lh×lw holds at once on the
/// CPU: its first-level skip activation while its first attention layer holds score matrices.
pub fn unet_floor(
    unet: &crate::models::unet::UnetConfig,
    device: &Device,
    samples: usize,
    (lh, lw): (usize, usize),
) -> u64 {
    if !device.is_cpu() {
        return 0;
    }
    let skip = crate::budget::f32_bytes(&[samples, lh, lw, unet.block_out_channels[0]]);
    let scores = unet.down_attn.iter().position(|&a| a).map_or(0, |i| {
        let t = (lh >> i) * (lw >> i);
        let heads = unet.heads.get(i).copied().unwrap_or(1);
        crate::budget::attention_scores(samples.saturating_mul(heads), t, t)
    });
    skip.saturating_add(scores)
}

impl Generator {
    /// A diffusers pipeline folder or a single-file checkpoint, optionally with a ControlNet folder (or the pipeline's own).
    pub fn load(path: &Path, controlnet: Option<&Path>, device: &Device) -> Result<Generator> {
        Self::load_with_loras(path, controlnet, &[], device)
    }

    /// `load` with LoRAs fused into the UNet and text encoder weights (in order, each with its
    /// own weight).
    pub fn load_with_loras(
        path: &Path,
        controlnet: Option<&Path>,
        loras: &[LoraSpec],
        device: &Device,
    ) -> Result<Generator> {
        let parts = PipelineParts::open(path)?;
        let (sample, unet_config) = sample_size(path, 64)?;
        let loras = loras.iter().map(Lora::open).collect::<Result<Vec<_>>>()?;
        if !parts.has_second_encoder() {
            if let Some(l) = loras.iter().find(|l| l.touches("text_encoder_2")) {
                bail!(
                    "{}: adapts a second text encoder (SDXL), which {} does not have: a LoRA for another model",
                    l.path.display(),
                    path.display()
                );
            }
        }
        let tok = parts.tokenizer("tokenizer")?;
        let te = load::load_text_encoder_with(path, "text_encoder", device, &loras)?;
        let second = if parts.has_second_encoder() {
            Some((
                parts.tokenizer("tokenizer_2")?,
                load::load_text_encoder_with(path, "text_encoder_2", device, &loras)?,
            ))
        } else {
            None
        };
        let unet = load::load_unet_with(path, device, &loras)?;
        let vae = load::load_vae(path, device)?;
        let cn = match controlnet {
            Some(p) => Some(load::load_controlnet(p, device)?),
            None if path.join("controlnet").is_dir() => Some(load::load_controlnet(path, device)?),
            None => None,
        };
        let scheduler_config = parts.scheduler_config()?;
        let default_size = default_side(&unet_config, sample, vae.downscale())?;
        let g = Generator {
            name: path.display().to_string(),
            force_zeros_for_empty_prompt: parts
                .model_index
                .bool_or("force_zeros_for_empty_prompt", true)?,
            default_size,
            text: TextEncoders { tok, te, second },
            unet,
            vae,
            controlnet: cn,
            scheduler_config,
            device: device.clone(),
            graphs: Graphs::new(device),
            tensor_scheduler: false,
            adapters: Vec::new(),
            evaluations: Default::default(),
        };
        g.check()?;
        Ok(g)
    }

    /// Consistency between the parts, so a mismatched folder fails at load time, not mid-run.
    pub fn check(&self) -> Result<()> {
        let ctx = self.text.te.hidden + self.text.second.as_ref().map(|s| s.1.hidden).unwrap_or(0);
        let want = self.unet.config.cross_attention_dim[0];
        if ctx != want {
            bail!("{}: the text encoder(s) give {ctx}-wide embeddings, the UNet's cross_attention_dim is {want}", self.name);
        }
        if self.unet.config.text_time.is_some() && self.text.second.is_none() {
            bail!("{}: the UNet needs SDXL text_time conditioning but the pipeline has no text_encoder_2", self.name);
        }
        if let Some(cn) = &self.controlnet {
            if cn.config.cross_attention_dim[0] != want
                || cn.config.text_time.is_some() != self.unet.config.text_time.is_some()
            {
                bail!(
                    "{}: the ControlNet was made for another UNet: cross_attention_dim {}, SDXL conditioning {}; the UNet of {}: cross_attention_dim {want}, SDXL conditioning {}",
                    cn.origin.display(),
                    cn.config.cross_attention_dim[0],
                    cn.config.text_time.is_some(),
                    self.name,
                    self.unet.config.text_time.is_some(),
                );
            }
        }
        Ok(())
    }

    /// Attaches an image-prompt adapter to the UNet (errors name the adapter when it was made
    /// for another UNet).
    pub fn attach_adapter(&mut self, mut adapter: Adapter) -> Result<()> {
        adapter.attach(&mut self.unet)?;
        self.adapters.push(adapter);
        Ok(())
    }

    /// The projected image tokens of every adapter for `n` images, [uncond; cond] rows when
    /// guiding; each prompt is projected once per batch.
    fn image_tokens(
        &self,
        req: &Request,
        first: usize,
        n: usize,
        guided: bool,
    ) -> Result<Vec<Tensor>> {
        if req.image_prompts.len() != self.adapters.len() {
            bail!(
                "{} image prompt(s) for {} attached adapter(s)",
                req.image_prompts.len(),
                self.adapters.len()
            );
        }
        let layers = self.unet.cross_attention_layers();
        let dev = &self.device;
        let mut out = Vec::new();
        for (a, p) in self.adapters.iter().zip(&req.image_prompts) {
            if p.scales.len() != layers {
                bail!(
                    "{}: {} scales for {layers} cross-attention layers",
                    a.source.display(),
                    p.scales.len()
                );
            }
            // One row shared by every image, or one row per image of the request.
            let project = |t: &Tensor, side: &str| -> Result<Tensor> {
                let rows = t.shape().first().copied().unwrap_or(0);
                let x = if rows == 1 {
                    t.clone()
                } else if rows == req.total_images() {
                    t.narrow0(first, n)
                } else {
                    bail!(
                        "{}: the {side} image condition has {rows} rows; expected 1 (shared) or {} (one per image)",
                        a.source.display(),
                        req.total_images()
                    );
                };
                let tokens = a.project(&dev.put(x)).with_context(|| {
                    format!("{}: the {side} image condition", a.source.display())
                })?;
                Ok(if rows == 1 {
                    Tensor::cat0(&vec![&tokens; n])
                } else {
                    tokens
                })
            };
            let pos = project(&p.positive, "positive")?;
            out.push(if guided {
                let neg = project(&p.negative, "negative")?;
                Tensor::cat0(&[&neg, &pos])
            } else {
                pos
            });
        }
        Ok(out)
    }

    fn make_scheduler(&self, kind: Option<SchedulerKind>) -> Result<Scheduler> {
        Scheduler::from_config_json(&self.scheduler_config, kind)
    }

    /// Runs a request with per-image seeds (seed + image index), `batch` images at a time.
    /// `progress(step, steps)` is called after every denoising step of every batch.
    pub fn run(&self, req: &Request, progress: &mut dyn FnMut(usize, usize)) -> Result<Output> {
        let mut lat = Vec::new();
        let mut img = Vec::new();
        self.run_batches(req, progress, &mut |_, o| {
            lat.push(o.latents);
            img.push(o.images);
            Ok(())
        })?;
        Ok(Output {
            latents: Tensor::cat0(&lat.iter().collect::<Vec<_>>()),
            images: Tensor::cat0(&img.iter().collect::<Vec<_>>()),
        })
    }

    /// Like `run`, but hands each batch (its first image index and its output) to `done` as soon
    /// as it is finished, so long runs keep memory flat and write results as they go.
    pub fn run_batches(
        &self,
        req: &Request,
        progress: &mut dyn FnMut(usize, usize),
        done: &mut dyn FnMut(usize, Output) -> Result<()>,
    ) -> Result<()> {
        let total = req.total_images();
        if let Some(l) = &req.init_latents {
            // More latents than images would be silently ignored; fewer cannot start the run.
            if l.shape().first() != Some(&total) {
                bail!(
                    "init latents hold {} images' noise ({:?}), but {total} images are requested",
                    l.shape().first().copied().unwrap_or(0),
                    l.shape()
                );
            }
        }
        let batch = req.batch.max(1);
        let mut start = 0;
        while start < total {
            let n = batch.min(total - start);
            let seeds = (start..start + n)
                .map(|i| req.seed.wrapping_add(i as u64)) // overflow refused by the commands
                .collect();
            let mut noise = NoiseSource::seeded(seeds);
            let o = self.run_chunk(req, start, n, &mut noise, progress)?;
            done(start, o)?;
            start += n;
        }
        Ok(())
    }

    /// Images `first..first+n` of the request, drawing noise from `noise` in diffusers' order.
    pub fn run_chunk(
        &self,
        req: &Request,
        first: usize,
        n: usize,
        noise: &mut NoiseSource,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Output> {
        let _span = tracing::info_span!("generate", batch = n).entered();
        let f = self.vae.downscale();
        if !req.width.is_multiple_of(f)
            || !req.height.is_multiple_of(f)
            || req.width == 0
            || req.height == 0
        {
            bail!(
                "width and height must be positive multiples of {f} (got {}×{})",
                req.width,
                req.height
            );
        }
        let shape = (req.height / f, req.width / f, self.vae.latent_channels);
        // LCM-distilled UNets take the guidance scale as an embedding instead, in one batch
        // (LatentConsistencyModelPipeline): no classifier-free guidance whatever its value.
        let cfg = req.guidance > 1.0 && self.unet.config.time_cond_proj_dim.is_none();
        self.check_budget(&self.device, n, (req.width, req.height), req.guidance)?;
        let (embeds, time_ids) = self.conditioning(req, first, n, cfg)?;
        let mut sched = self.make_scheduler(req.scheduler)?;
        let start = self.initial_latents(req, first, n, shape, cfg, &mut sched, noise)?;
        let latents = self.denoise(
            req,
            (first, n, shape, cfg),
            Conditioning { embeds, time_ids },
            start,
            &mut sched,
            noise,
            progress,
        )?;
        let steps = sched.timesteps().len();
        check_finite(&latents, "the latents after denoising", steps)?;
        let images = self.decode(&latents)?;
        check_finite(&images, "the decoded images", steps)?;
        Ok(Output { latents, images })
    }

    /// Text embeddings of `prompts`, the encoders replayed from a CUDA graph on GPUs.
    fn encode_text(&self, prompts: &[String]) -> Result<Embeds> {
        let _span = tracing::info_span!("encode_text").entered();
        let v = self.text.indices(prompts)?;
        let b = prompts.len();
        let mut graphs = self.graphs.lock().unwrap_or_else(|e| e.into_inner());
        let out = graphs.text.run("text", &v, |v| Ok(self.text.embed(v, b)))?;
        Ok(Embeds::from_outputs(out))
    }

    /// ControlNet + UNet (+ guidance) on `v` = [x_in, timesteps, context, (pooled, time_ids)?,
    /// (control image)?, (mask, masked latents)?, adapter tokens…], in that order.
    fn model_call(&self, call: &ModelCall, v: &[Tensor]) -> Result<Tensor> {
        let mut k = 3;
        let mut next = || {
            k += 1;
            &v[k - 1]
        };
        let text_time = if call.pooled {
            Some((next(), next()))
        } else {
            None
        };
        let image = call.control.map(|_| next());
        let mask = if call.mask {
            Some((next(), next()))
        } else {
            None
        };
        let ip: Vec<IpInput> = call
            .ip_scales
            .iter()
            .map(|scales| IpInput {
                tokens: next().clone(),
                scales: scales.clone(),
            })
            .collect();
        let timestep_cond = if call.w_embed { Some(next()) } else { None };
        let cond = Cond {
            timesteps: &v[1],
            context: &v[2],
            text_time,
            ip: &ip,
            timestep_cond,
        };
        let residuals = match (call.control, image) {
            (Some((net, scale)), Some(im)) => Some(net.forward(&v[0], &cond, im, scale)?),
            _ => None,
        };
        let unet_in = match mask {
            Some((m, ml)) => ops::concat_channels(&[&v[0], m, ml]),
            None => v[0].clone(),
        };
        let res = residuals.as_ref().map(|r| (r.down.as_slice(), &r.mid));
        let pred = self.unet.forward(&unet_in, &cond, res, None)?;
        Ok(match call.guidance {
            Some(g) => ops::cfg_combine(&pred, g),
            None => pred,
        })
    }

    /// VAE posterior sample × scaling factor, as diffusers' `retrieve_latents(..., "sample")`;
    /// host image in, latents out where the scheduler works (host, or f32 on the GPU).
    fn encode_sample(&self, image: &Tensor, noise: &mut NoiseSource) -> Result<Tensor> {
        let dev = &self.device;
        let (mean, logvar) = self.vae.encode(&dev.put(image.clone()))?;
        let (n, h, w, c) = mean.dims4();
        let e = dev.put(noise.draw(n, c, h, w)?);
        let x = ops::gauss_sample(&mean, &logvar, &e, self.vae.scaling_factor as f32);
        dev.check()?;
        Ok(dev.put_f32_same(&x))
    }

    /// Host latents → host images in [0, 1] (a CUDA graph per shape on GPUs).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let x = self
            .device
            .put(ops::scale(latents, 1.0 / self.vae.scaling_factor as f32));
        let mut graphs = self.graphs.lock().unwrap_or_else(|e| e.into_inner());
        let img = graphs
            .decode
            .run("decode", &[x], |v| {
                Ok(vec![ops::affine_clamp(
                    &self.vae.decode(&v[0])?,
                    0.5,
                    0.5,
                    0.0,
                    1.0,
                )])
            })?
            .remove(0);
        self.device.check()?;
        img.to_host()
    }
}

/// What one denoising model call consists of.
struct ModelCall<'a> {
    pooled: bool,
    /// LCM-distilled UNet: the guidance-scale embedding is the last input.
    w_embed: bool,
    control: Option<(&'a ControlNet, f32)>,
    mask: bool,
    guidance: Option<f32>,
    /// λ per cross-attention layer, one list per attached adapter.
    ip_scales: Vec<Vec<f32>>,
}

impl ModelCall<'_> {
    /// The step graph's cache key: what changes the captured work besides the input shapes.
    fn graph_key(&self) -> String {
        format!(
            "{:?} {} {:?} {:?}",
            self.guidance,
            self.mask,
            self.control.map(|c| c.1),
            self.ip_scales
        )
    }
}

fn to_model_range(t: &Tensor) -> Tensor {
    Tensor::new(
        t.shape().to_vec(),
        t.data().iter().map(|v| 2.0 * v - 1.0).collect(),
    )
}

/// A run whose numbers went non-finite (fp16 overflow, a broken checkpoint) stops with an error
/// instead of writing a black image. One pass over a host tensor per batch.
pub fn check_finite(t: &Tensor, what: &str, steps: usize) -> Result<()> {
    if let Some(i) = t.data().iter().position(|v| !v.is_finite()) {
        bail!(
            "{what} hold a non-finite value ({} at element {i}) after {steps} steps: the model or its inputs produce NaN/inf",
            t.data()[i]
        );
    }
    Ok(())
}

/// diffusers' mask processor: values ≥ 0.5 become 1, the rest 0.
fn binarise(t: &Tensor) -> Tensor {
    Tensor::new(
        t.shape().to_vec(),
        t.data()
            .iter()
            .map(|v| if *v >= 0.5 { 1.0 } else { 0.0 })
            .collect(),
    )
}

/// image · (mask < 0.5), image in [-1, 1].
fn masked_image(image: &Tensor, mask: &Tensor) -> Tensor {
    let c = image.last_dim();
    let out = image
        .data()
        .chunks(c)
        .zip(mask.data())
        .flat_map(|(px, m)| px.iter().map(move |v| if *m < 0.5 { *v } else { 0.0 }))
        .collect();
    Tensor::new(image.shape().to_vec(), out)
}

/// A [1, H, W, C] image repeated for `n` images (or already [n, H, W, C]), at the request size.
fn batch_image(t: &Tensor, n: usize, req: &Request) -> Result<Tensor> {
    let (b, h, w, _) = t.dims4();
    if (h, w) != (req.height, req.width) {
        bail!(
            "image is {w}×{h}, the request is {}×{}",
            req.width,
            req.height
        );
    }
    match b {
        1 => Ok(Tensor::cat0(&vec![t; n])),
        _ if b == n => Ok(t.clone()),
        _ => bail!("{b} images given for a batch of {n}"),
    }
}

fn pick_latents(
    l: &Tensor,
    first: usize,
    n: usize,
    (h, w, c): (usize, usize, usize),
) -> Result<Tensor> {
    let s = l.shape();
    if s.len() != 4 || s[1..] != [h, w, c] || s[0] < first + n {
        bail!(
            "init latents have shape {:?} (NHWC); {} images of {h}×{w}×{c} are needed",
            s,
            first + n
        );
    }
    Ok(l.narrow0(first, n))
}
