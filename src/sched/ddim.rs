//! DDIMScheduler (Song et al. 2020): deterministic for η = 0, with fresh noise of std
//! η·σ_t otherwise.

use super::{require_false, trailing, Common, NoiseForm, Sampler, Spacing};
use crate::backend as ops;
use crate::config::Config;
use crate::tensor::Tensor;
use anyhow::Result;

pub(super) struct Ddim {
    /// ᾱ "before" the last step: 1, or that of timestep 0 (`set_alpha_to_one`).
    final_alpha_cumprod: f32,
    clip_range: Option<f32>,
}

impl Ddim {
    pub(super) fn new(cfg: &Config, c: &Common) -> Result<Self> {
        require_false(cfg, "thresholding")?;
        let final_alpha_cumprod = if cfg.bool_or("set_alpha_to_one", true)? {
            1.0
        } else {
            c.alphas_cumprod[0]
        };
        let clip_range = if cfg.bool_or("clip_sample", true)? {
            Some(cfg.f64_or("clip_sample_range", 1.0)? as f32)
        } else {
            None
        };
        Ok(Ddim {
            final_alpha_cumprod,
            clip_range,
        })
    }

    /// DDIM's step constants at schedule index `i`: (√ᾱ_t, √(1-ᾱ_t), √ᾱ_prev, direction weight, noise std).
    fn coeffs(&self, c: &Common, i: usize) -> (f32, f32, f32, f32, f32) {
        let t = c.timesteps[i] as usize;
        // diffusers steps back by N / n whatever the spacing.
        let prev = t as i64 - (c.num_train / c.num_inference_steps) as i64;
        let a_t = c.alphas_cumprod[t];
        let a_prev = if prev >= 0 {
            c.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha_cumprod
        };
        let b_t = 1.0 - a_t;
        let variance = ((1.0 - a_prev) / b_t) * (1.0 - a_t / a_prev);
        let std = c.eta * variance.sqrt();
        let dir = (1.0 - a_prev - std * std).sqrt();
        (a_t.sqrt(), b_t.sqrt(), a_prev.sqrt(), dir, std)
    }
}

/// Integer timesteps indexing ᾱ (DDIM, and PNDM before its repeats).
pub(super) fn timesteps(c: &Common, n: usize) -> Vec<f32> {
    let nt = c.num_train;
    let ts: Vec<f64> = match c.spacing {
        Spacing::Linspace => super::schedule::np_linspace(0.0, (nt - 1) as f64, n)
            .iter()
            .rev()
            .map(|t| t.round_ties_even())
            .collect(),
        Spacing::Leading => (0..n)
            .rev()
            .map(|i| (i * (nt / n) + c.steps_offset) as f64)
            .collect(),
        Spacing::Trailing => trailing(nt, n),
    };
    ts.into_iter().map(|t| t as f32).collect()
}

impl Sampler for Ddim {
    fn schedule(&self, c: &Common, n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((timesteps(c, n), Vec::new()))
    }

    fn noise_form(&self) -> NoiseForm {
        NoiseForm::Alphas
    }

    fn needs_step_noise(&self, c: &Common) -> bool {
        c.eta > 0.0
    }

    fn step(
        &mut self,
        c: &Common,
        i: usize,
        m: &Tensor,
        x: &Tensor,
        noise: Option<&Tensor>,
    ) -> Vec<f32> {
        let (sa, sb, sa_prev, dir, std) = self.coeffs(c, i);
        let (m, x, noise) = (m.data(), x.data(), noise.map(|n| n.data()));
        (0..x.len())
            .map(|j| {
                let (m, x) = (m[j], x[j]);
                let (x0, eps) = c.prediction.x0_eps(m, x, sa, sb);
                let x0 = self.clip_range.map_or(x0, |r| x0.clamp(-r, r));
                let prev = sa_prev * x0 + dir * eps;
                match noise {
                    Some(n) => prev + std * n[j],
                    None => prev,
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
        let (sa, sb, sa_prev, dir, std) = self.coeffs(c, i);
        let (x0a, x0b) = c.prediction.x0_coeffs(sa, sb);
        let (ea, eb) = c.prediction.eps_coeffs(sa, sb);
        let mut x0 = ops::lincomb(&[(x, x0a), (m, x0b)]);
        if let Some(r) = self.clip_range {
            x0 = ops::affine_clamp(&x0, 1.0, 0.0, -r, r);
        }
        let eps = ops::lincomb(&[(x, ea), (m, eb)]);
        match noise {
            Some(n) => ops::lincomb(&[(&x0, sa_prev), (&eps, dir), (n, std)]),
            None => ops::lincomb(&[(&x0, sa_prev), (&eps, dir)]),
        }
    }
}
