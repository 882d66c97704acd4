//! LCMScheduler (Luo et al. 2023, latent consistency models): multi-step consistency
//! sampling. Each step maps the sample to the model's consistency estimate
//! `c_skip·x + c_out·x0` and, except on the last step, noises it afresh to the next timestep.
//! The timesteps are a subset of the `original_inference_steps` schedule the model was
//! distilled on; `TCDScheduler` shares them.

use super::{require_false, Common, NoiseForm, Sampler};
use crate::backend as ops;
use crate::config::Config;
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

pub(super) struct Lcm {
    original_steps: usize,
    /// `timestep_scaling`, as float32 (torch multiplies the int64 timestep tensor by it).
    timestep_scaling: f32,
    clip_range: Option<f32>,
}

/// `original_inference_steps` (default 50), checked against the training range.
pub(super) fn original_steps(cfg: &Config, c: &Common) -> Result<usize> {
    let o = cfg.usize_or("original_inference_steps", 50)?;
    if !(1..=c.num_train).contains(&o) {
        let range = format!("1 to num_train_timesteps ({})", c.num_train);
        return Err(cfg.unsupported("original_inference_steps", o, &range));
    }
    Ok(o)
}

/// The LCM / TCD timesteps: the distillation schedule `k·j − 1` (j = 1..=original steps,
/// k = N / original steps), descending, sampled at `floor(linspace(0, len, n, endpoint=False))`.
pub(super) fn timesteps(c: &Common, original_steps: usize, n: usize) -> Result<Vec<f32>> {
    let k = c.num_train / original_steps;
    let len = original_steps;
    ensure!(
        n <= original_steps,
        "{}: {n} inference steps: field `original_inference_steps` = {original_steps} allows at most \
         {original_steps} (the schedule is a subset of the distillation one)",
        c.path.display()
    );
    // numpy's endpoint=False linspace: i · (len / n) in float64.
    let step = len as f64 / n as f64;
    Ok((0..n)
        .map(|i| {
            let j = (i as f64 * step).floor() as usize;
            ((len - j) * k - 1) as f32
        })
        .collect())
}

impl Lcm {
    pub(super) fn new(cfg: &Config, c: &Common) -> Result<Self> {
        require_false(cfg, "thresholding")?;
        let timestep_scaling = cfg.f64_or("timestep_scaling", 10.0)?;
        if !(timestep_scaling.is_finite() && timestep_scaling >= 0.0) {
            return Err(cfg.unsupported("timestep_scaling", timestep_scaling, "a number >= 0"));
        }
        let clip_range = if cfg.bool_or("clip_sample", false)? {
            Some(cfg.f64_or("clip_sample_range", 1.0)? as f32)
        } else {
            None
        };
        Ok(Lcm {
            original_steps: original_steps(cfg, c)?,
            timestep_scaling: timestep_scaling as f32,
            clip_range,
        })
    }

    /// Per step: (ᾱ_t, ᾱ of the next timestep, c_skip, c_out, whether this is the last step).
    fn coeffs(&self, c: &Common, i: usize) -> (f32, f32, f32, f32, bool) {
        let t = c.timesteps[i];
        // The last step keeps its own timestep as the "next" one; it adds no noise anyway.
        let prev = c.timesteps.get(i + 1).copied().unwrap_or(t);
        let (a_t, a_prev) = (
            c.alphas_cumprod[t as usize],
            c.alphas_cumprod[prev as usize],
        );
        // The boundary condition (σ_data = 0.5) in float32, as torch on the int64 timestep.
        let scaled = t * self.timestep_scaling;
        let d = scaled * scaled + 0.25;
        let (c_skip, c_out) = (0.25 / d, scaled / d.sqrt());
        (a_t, a_prev, c_skip, c_out, i == c.num_inference_steps - 1)
    }
}

impl Sampler for Lcm {
    fn schedule(&self, c: &Common, n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((timesteps(c, self.original_steps, n)?, Vec::new()))
    }

    fn noise_form(&self) -> NoiseForm {
        NoiseForm::Alphas
    }

    fn needs_step_noise(&self, _c: &Common) -> bool {
        true
    }

    fn step(
        &mut self,
        c: &Common,
        i: usize,
        m: &Tensor,
        x: &Tensor,
        noise: Option<&Tensor>,
    ) -> Vec<f32> {
        let (a_t, a_prev, c_skip, c_out, last) = self.coeffs(c, i);
        let (sa, sb) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        let (sa_prev, sb_prev) = (a_prev.sqrt(), (1.0 - a_prev).sqrt());
        let (m, x) = (m.data(), x.data());
        let noise = noise.expect("checked by needs_step_noise").data();
        (0..x.len())
            .map(|j| {
                let x0 = c.prediction.x0(m[j], x[j], sa, sb);
                let x0 = self.clip_range.map_or(x0, |r| x0.clamp(-r, r));
                let denoised = c_out * x0 + c_skip * x[j];
                if last {
                    denoised
                } else {
                    sa_prev * denoised + sb_prev * noise[j]
                }
            })
            .collect()
    }

    fn step_ops(
        &mut self,
        c: &Common,
        i: usize,
        m: &Tensor,
        x: &Tensor,
        noise: Option<&Tensor>,
    ) -> Tensor {
        let (a_t, a_prev, c_skip, c_out, last) = self.coeffs(c, i);
        let (x0a, x0b) = c.prediction.x0_coeffs(a_t.sqrt(), (1.0 - a_t).sqrt());
        let mut x0 = ops::lincomb(&[(x, x0a), (m, x0b)]);
        if let Some(r) = self.clip_range {
            x0 = ops::affine_clamp(&x0, 1.0, 0.0, -r, r);
        }
        if last {
            return ops::lincomb(&[(&x0, c_out), (x, c_skip)]);
        }
        let n = noise.expect("checked by needs_step_noise");
        let (sa_prev, sb_prev) = (a_prev.sqrt(), (1.0 - a_prev).sqrt());
        ops::lincomb(&[(&x0, sa_prev * c_out), (x, sa_prev * c_skip), (n, sb_prev)])
    }
}
