//! The stages of `Generator::run_chunk`: text conditioning, the initial latents (noise, an
//! img2img start or an inpainting start), and the denoising loop. Every random draw of a chunk
//! comes from the one `NoiseSource` passed down, in diffusers' order: the initial noise (or the
//! image's encoding and its noise), then the ancestral step noise, drawn before the loop.

use super::noise::NoiseSource;
use super::prompt::Embeds;
use super::{
    batch_image, binarise, masked_image, pick_latents, to_model_range, Generator, Init, ModelCall,
    Request,
};
use crate::backend::{self as ops, Device};
use crate::models::controlnet::ControlNet;
use crate::models::unet::guidance_scale_embedding;
use crate::sched::Scheduler;
use crate::tensor::Tensor;
use anyhow::{bail, Context, Result};

/// The text conditioning of a chunk: [uncond; cond] embeddings when guiding, and SDXL's
/// micro-conditioning ids.
pub struct Conditioning {
    pub embeds: Embeds,
    pub time_ids: Option<Tensor>,
}

/// 4-channel inpainting: after each step the unmasked region is replaced by the image latents
/// noised to the next timestep.
pub struct Blend {
    image_latents: Tensor,
    noise: Tensor,
    mask: Tensor,
}

/// Where the loop starts: the latents, and what inpainting adds to every step.
pub struct Start {
    latents: Tensor,
    blend: Option<Blend>,
    /// 9-channel inpainting UNets: the mask and the masked image's latents as extra inputs.
    mask_input: Option<(Tensor, Tensor)>,
}

/// (first image, images, latent (h, w, c), classifier-free guidance) of a chunk.
pub type Chunk = (usize, usize, (usize, usize, usize), bool);

/// On the CPU the scheduler runs its elementwise reference; on a GPU the latents stay on the
/// device and the scheduler updates are linear combinations there (no host round trip).
fn on_device(g: &Generator) -> bool {
    !g.device.is_cpu() || g.tensor_scheduler
}

fn add_noise(on_dev: bool, sched: &Scheduler, x: &Tensor, e: &Tensor, t: f32) -> Result<Tensor> {
    if on_dev {
        sched.add_noise_ops(x, e, t)
    } else {
        sched.add_noise(x, e, t)
    }
}

/// `t` twice along the batch when guiding (uncond and cond rows see the same input).
fn dup(t: &Tensor, cfg: bool) -> Tensor {
    if cfg {
        Tensor::cat0(&[t, t])
    } else {
        t.clone()
    }
}

/// The model inputs after the latents and the timestep, the same at every step, in
/// `model_call`'s order: text context, SDXL's pooled embeds and time ids, the control image, the
/// inpainting mask and masked latents, adapter tokens, LCM's w embedding.
fn fixed_inputs(
    embeds: &Embeds,
    time_ids: Option<&Tensor>,
    control: Option<&Tensor>,
    mask_input: Option<&(Tensor, Tensor)>,
    ip_tokens: &[Tensor],
    w_embed: Option<&Tensor>,
) -> Vec<Tensor> {
    let mut fixed = vec![embeds.context.clone()];
    if let (Some(p), Some(tid)) = (&embeds.pooled, time_ids) {
        fixed.extend([p.clone(), tid.clone()]);
    }
    fixed.extend(control.cloned());
    if let Some((m, ml)) = mask_input {
        fixed.extend([m.clone(), ml.clone()]);
    }
    fixed.extend(ip_tokens.iter().cloned());
    fixed.extend(w_embed.cloned());
    fixed
}

/// Everything the loop needs from the host, uploaded before it: the timesteps (one per UNet
/// row), and the ancestral step noise (drawn now; diffusers draws nothing else after the start
/// either).
fn loop_uploads(
    dev: &Device,
    sched: &Scheduler,
    timesteps: &[f32],
    rows: usize,
    (n, h, w, c): (usize, usize, usize, usize),
    noise: &mut NoiseSource,
) -> Result<(Tensor, Option<Tensor>)> {
    let all_ts = dev.put_f32(Tensor::new(
        vec![timesteps.len() * rows],
        timesteps.iter().flat_map(|&t| vec![t; rows]).collect(),
    ));
    let all_noise = if sched.needs_step_noise() {
        let draws = (0..timesteps.len())
            .map(|_| noise.draw(n, c, h, w))
            .collect::<Result<Vec<_>>>()?;
        Some(dev.put_f32(Tensor::cat0(&draws.iter().collect::<Vec<_>>())))
    } else {
        None
    };
    Ok((all_ts, all_noise))
}

impl Generator {
    /// Text conditioning of images `first..first + n` (only this chunk's prompts are encoded: a
    /// prompts file can hold thousands), [uncond; cond] when guiding, on the model device.
    pub(super) fn conditioning(
        &self,
        req: &Request,
        first: usize,
        n: usize,
        cfg: bool,
    ) -> Result<(Embeds, Option<Tensor>)> {
        let mut needed: Vec<usize> = (first..first + n)
            .map(|i| i / req.images_per_prompt)
            .collect();
        needed.dedup();
        let local: Vec<usize> = (first..first + n)
            .map(|i| i / req.images_per_prompt - needed[0])
            .collect();
        let pick = |v: &[String]| needed.iter().map(|&i| v[i].clone()).collect::<Vec<_>>();
        let dev = &self.device;
        let cond = self.encode_text(&pick(&req.prompts))?.gather(&local);
        let embeds = if cfg {
            let uncond = match &req.negative {
                None if self.text.is_sdxl() && self.force_zeros_for_empty_prompt => {
                    cond.zeros_like(dev)
                }
                None => self
                    .encode_text(&vec![String::new(); needed.len()])?
                    .gather(&local),
                Some(neg) => {
                    if neg.len() != req.prompts.len() {
                        bail!(
                            "{} negative prompts for {} prompts",
                            neg.len(),
                            req.prompts.len()
                        );
                    }
                    self.encode_text(&pick(neg))?.gather(&local)
                }
            };
            Embeds {
                context: Tensor::cat0(&[&uncond.context, &cond.context]),
                pooled: match (&uncond.pooled, &cond.pooled) {
                    (Some(a), Some(b)) => Some(Tensor::cat0(&[a, b])),
                    _ => None,
                },
            }
        } else {
            cond
        };
        let rows = if cfg { 2 * n } else { n };
        let time_ids = embeds.pooled.as_ref().map(|_| {
            let (h, w) = (req.height as f32, req.width as f32);
            let one = [h, w, 0.0, 0.0, h, w];
            dev.put_f32(Tensor::new(vec![rows, 6], one.repeat(rows)))
        });
        Ok((embeds, time_ids))
    }

    /// Sets the scheduler's timesteps and draws the starting latents for `req.init`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn initial_latents(
        &self,
        req: &Request,
        first: usize,
        n: usize,
        (h, w, c): (usize, usize, usize),
        cfg: bool,
        sched: &mut Scheduler,
        noise: &mut NoiseSource,
    ) -> Result<Start> {
        let dev = &self.device;
        let on_dev = on_device(self);
        let plain = |latents| Start {
            latents,
            blend: None,
            mask_input: None,
        };
        match &req.init {
            Init::Noise => {
                sched.set_timesteps(req.steps)?;
                let x = match &req.init_latents {
                    Some(l) => pick_latents(l, first, n, (h, w, c))?,
                    None => noise.draw(n, c, h, w)?,
                };
                Ok(plain(ops::scale(&dev.put_f32(x), sched.init_noise_sigma())))
            }
            Init::Image { image, strength } => {
                if req.init_latents.is_some() {
                    bail!("--init-latents applies to txt2img and inpainting; img2img starts from the image");
                }
                let t0 = sched.set_timesteps_img2img(req.steps, *strength)?;
                let image = batch_image(image, n, req)?;
                let x0 = self.encode_sample(&to_model_range(&image), noise)?;
                let e = dev.put_f32(noise.draw(n, c, h, w)?);
                Ok(plain(add_noise(on_dev, sched, &x0, &e, t0)?))
            }
            Init::Inpaint {
                image,
                mask,
                strength,
            } => self.inpaint_start(
                req,
                (first, n, (h, w, c), cfg),
                image,
                mask,
                *strength,
                sched,
                noise,
            ),
        }
    }

    /// The inpainting start: 9-channel UNets get the mask and the masked image as inputs,
    /// 4-channel ones blend the unmasked region back after every step.
    #[allow(clippy::too_many_arguments)]
    fn inpaint_start(
        &self,
        req: &Request,
        (first, n, (h, w, c), cfg): Chunk,
        image: &Tensor,
        mask: &Tensor,
        strength: f64,
        sched: &mut Scheduler,
        noise: &mut NoiseSource,
    ) -> Result<Start> {
        let dev = &self.device;
        let t0 = sched.set_timesteps_img2img(req.steps, strength)?;
        let image = to_model_range(&batch_image(image, n, req)?);
        let mask = binarise(&batch_image(mask, n, req)?);
        let nine = self.unet.config.in_channels == 2 * c + 1;
        if !nine && self.unet.config.in_channels != c {
            bail!(
                "inpainting needs a {c}- or {}-channel UNet; this one takes {}",
                2 * c + 1,
                self.unet.config.in_channels
            );
        }
        let full = strength >= 1.0;
        // diffusers encodes the unmasked image only when it blends (4 channels) or starts from it.
        let image_latents = if !nine || (!full && req.init_latents.is_none()) {
            Some(self.encode_sample(&image, noise)?)
        } else {
            None
        };
        let (x, e) = match &req.init_latents {
            Some(l) => {
                let e = dev.put_f32(pick_latents(l, first, n, (h, w, c))?);
                (ops::scale(&e, sched.init_noise_sigma()), e)
            }
            None => {
                let e = dev.put_f32(noise.draw(n, c, h, w)?);
                let x = if full {
                    ops::scale(&e, sched.init_noise_sigma())
                } else {
                    let x0 = image_latents
                        .as_ref()
                        .expect("encoded when not full strength");
                    add_noise(on_device(self), sched, x0, &e, t0)?
                };
                (x, e)
            }
        };
        let masked = masked_image(&image, &mask);
        let masked_latents = self.encode_sample(&masked, noise)?;
        let small_mask = ops::upsample_nearest(&mask, h, w);
        Ok(if nine {
            Start {
                latents: x,
                blend: None,
                mask_input: Some((
                    dev.put(dup(&small_mask, cfg)),
                    dev.put(dup(&masked_latents.to_host()?, cfg)),
                )),
            }
        } else {
            Start {
                latents: x,
                blend: Some(Blend {
                    image_latents: image_latents.expect("encoded for 4-channel UNets"),
                    noise: e,
                    mask: dev.put_f32(small_mask),
                }),
                mask_input: None,
            }
        })
    }

    /// The denoising loop from `start`; returns the final latents on the host.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn denoise(
        &self,
        req: &Request,
        (first, n, (h, w, c), cfg): Chunk,
        cond: Conditioning,
        start: Start,
        sched: &mut Scheduler,
        noise: &mut NoiseSource,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let dev: &Device = &self.device;
        let on_dev = on_device(self);
        let rows = if cfg { 2 * n } else { n };
        let control: Option<(&ControlNet, Tensor, f32)> = match (&req.control, &self.controlnet) {
            (None, _) => None,
            (Some(_), None) => bail!("a control image was given but no ControlNet is loaded"),
            (Some(c), Some(net)) => {
                Some((net, dev.put(batch_image(&c.image, rows, req)?), c.scale))
            }
        };
        let ip_tokens = self.image_tokens(req, first, n, cfg)?;
        let w_embed = self
            .unet
            .config
            .time_cond_proj_dim
            .map(|d| dev.put(guidance_scale_embedding(req.guidance, d, rows)));
        let Conditioning { embeds, time_ids } = cond;
        let Start {
            mut latents,
            blend,
            mask_input,
        } = start;
        let call = ModelCall {
            w_embed: w_embed.is_some(),
            pooled: embeds.pooled.is_some(),
            control: control.as_ref().map(|(net, _, s)| (*net, *s)),
            mask: mask_input.is_some(),
            guidance: if cfg { Some(req.guidance) } else { None },
            ip_scales: req.image_prompts.iter().map(|p| p.scales.clone()).collect(),
        };
        let key = call.graph_key();
        let mut graphs = self.graphs.lock().unwrap_or_else(|e| e.into_inner());
        let timesteps = sched.timesteps().to_vec();
        let (all_ts, all_noise) = loop_uploads(dev, sched, &timesteps, rows, (n, h, w, c), noise)?;
        let fixed = fixed_inputs(
            &embeds,
            time_ids.as_ref(),
            control.as_ref().map(|c| &c.1),
            mask_input.as_ref(),
            &ip_tokens,
            w_embed.as_ref(),
        );
        for i in 0..timesteps.len() {
            let _step = tracing::info_span!("step", i).entered();
            let x2 = dup(&latents, cfg);
            let x_in = if on_dev {
                dev.put_same(&sched.scale_model_input_ops(&x2, i)?)
            } else {
                sched.scale_model_input(&x2, i)?
            };
            let mut inputs = vec![x_in, all_ts.narrow0(i * rows, rows)];
            inputs.extend(fixed.iter().cloned());
            let pred = graphs
                .step
                .run(&key, &inputs, |v| {
                    self.model_call(&call, v).map(|t| vec![t])
                })?
                .remove(0);
            // Counted here, not in model_call: a captured call runs once and is replayed after.
            self.evaluations
                .fetch_add(rows as u64, std::sync::atomic::Ordering::Relaxed);
            let step_noise = all_noise.as_ref().map(|a| a.narrow0(i * n, n));
            latents = if on_dev {
                sched.step_ops(&dev.put_f32_same(&pred), i, &latents, step_noise.as_ref())?
            } else {
                sched.step(&pred, i, &latents, step_noise.as_ref())?
            };
            if let Some(b) = &blend {
                let proper = if i + 1 < timesteps.len() {
                    add_noise(on_dev, sched, &b.image_latents, &b.noise, timesteps[i + 1])?
                } else {
                    b.image_latents.clone()
                };
                latents = ops::mask_mix(&proper, &latents, &b.mask);
            }
            progress(i + 1, timesteps.len());
        }
        drop(graphs);
        dev.check().with_context(|| {
            format!(
                "denoising a batch of {n} image(s) ({rows} UNet rows) at {}x{}",
                req.width, req.height
            )
        })?;
        latents.to_host()
    }
}
