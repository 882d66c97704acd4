//! TCDScheduler (Zheng et al. 2024, trajectory consistency distillation): LCM's timesteps;
//! each step predicts the sample at the intermediate timestep `s = ⌊(1−γ)·t_next⌋` and, for
//! γ > 0, noises it forward to `t_next` with fresh noise. γ is the pipelines' `eta` (diffusers
//! passes `eta` to `TCDScheduler.step`); γ = 0 is deterministic. The last step goes to s = 0,
//! so the result is the sample at timestep 0, not x0.

use super::lcm;
use super::{Common, NoiseForm, Sampler};
use crate::backend as ops;
use crate::config::Config;
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

pub(super) struct Tcd {
    original_steps: usize,
}

impl Tcd {
    pub(super) fn new(cfg: &Config, c: &Common) -> Result<Self> {
        Ok(Tcd {
            original_steps: lcm::original_steps(cfg, c)?,
        })
    }

    /// (√ᾱ_t, √(1-ᾱ_t), √ᾱ_s, √(1-ᾱ_s), the noise step's (√(ᾱ_next/ᾱ_s), √(1-ᾱ_next/ᾱ_s)) or
    /// None when it adds no noise).
    #[allow(clippy::type_complexity)]
    fn coeffs(&self, c: &Common, i: usize) -> (f32, f32, f32, f32, Option<(f32, f32)>) {
        let gamma = c.eta;
        let t = c.timesteps[i] as usize;
        let prev = c.timesteps.get(i + 1).map_or(0, |&t| t as usize);
        // torch: the Python float (1 - eta) times the int64 tensor, in float32, floored.
        let s = (((1.0 - gamma as f64) as f32) * prev as f32).floor() as usize;
        let (a_t, a_prev, a_s) = (
            c.alphas_cumprod[t],
            c.alphas_cumprod[prev],
            c.alphas_cumprod[s],
        );
        let last = i == c.num_inference_steps - 1;
        let noise = (gamma > 0.0 && !last).then(|| {
            let r = a_prev / a_s;
            (r.sqrt(), (1.0 - r).sqrt())
        });
        (
            a_t.sqrt(),
            (1.0 - a_t).sqrt(),
            a_s.sqrt(),
            (1.0 - a_s).sqrt(),
            noise,
        )
    }
}

impl Sampler for Tcd {
    fn schedule(&self, c: &Common, n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((lcm::timesteps(c, self.original_steps, n)?, Vec::new()))
    }

    fn noise_form(&self) -> NoiseForm {
        NoiseForm::Alphas
    }

    fn needs_step_noise(&self, c: &Common) -> bool {
        c.eta > 0.0
    }

    fn check(&self, c: &Common) -> Result<()> {
        ensure!(
            (0.0..=1.0).contains(&c.eta),
            "{}: TCD's gamma (eta) {} is not in [0, 1]",
            c.path.display(),
            c.eta
        );
        Ok(())
    }

    fn step(
        &mut self,
        c: &Common,
        i: usize,
        m: &Tensor,
        x: &Tensor,
        noise: Option<&Tensor>,
    ) -> Vec<f32> {
        let (sa, sb, sa_s, sb_s, renoise) = self.coeffs(c, i);
        let (m, x, noise) = (m.data(), x.data(), noise.map(|n| n.data()));
        (0..x.len())
            .map(|j| {
                let (m, x) = (m[j], x[j]);
                let (x0, eps) = c.prediction.x0_eps(m, x, sa, sb);
                let noised = sa_s * x0 + sb_s * eps;
                match (renoise, noise) {
                    (Some((a, b)), Some(n)) => a * noised + b * n[j],
                    _ => noised,
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
        let (sa, sb, sa_s, sb_s, renoise) = self.coeffs(c, i);
        let (x0a, x0b) = c.prediction.x0_coeffs(sa, sb);
        let (ea, eb) = c.prediction.eps_coeffs(sa, sb);
        let x0 = ops::lincomb(&[(x, x0a), (m, x0b)]);
        let eps = ops::lincomb(&[(x, ea), (m, eb)]);
        match (renoise, noise) {
            (Some((a, b)), Some(n)) => ops::lincomb(&[(&x0, a * sa_s), (&eps, a * sb_s), (n, b)]),
            _ => ops::lincomb(&[(&x0, sa_s), (&eps, sb_s)]),
        }
    }
}
