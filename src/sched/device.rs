//! The scheduler updates as linear combinations of whole tensors (`backend::lincomb`), so they run
//! where the latents live — on a GPU inside the denoising loop without a host round trip. The
//! elementwise host versions in mod.rs stay the reference; `tests/sched.rs` checks both agree.

use super::{alpha_sigma, ancestral, Prediction, Scheduler, SchedulerKind};
use crate::backend as ops;
use crate::tensor::Tensor;
use anyhow::{anyhow, ensure, Result};

impl Scheduler {
    /// `x0 = a·x + b·m` for the model output `m` at sample `x`, with (α, σ)-style coefficients.
    fn x0_coeffs(&self, sa: f32, sb: f32) -> (f32, f32) {
        match self.prediction {
            Prediction::Epsilon => (1.0 / sa, -sb / sa),
            Prediction::Sample => (0.0, 1.0),
            Prediction::V => (sa, -sb),
        }
    }

    /// `step` on tensors anywhere (host or device), as linear combinations.
    pub fn step_ops(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let noise = self.check_step(model_output, step, sample, noise)?;
        let i = self.begin + step;
        let (m, x) = (model_output, sample);
        let out = match self.kind {
            SchedulerKind::Ddim => {
                let (sa, sb, sa_prev, dir, std) = self.ddim_coeffs(i);
                let (x0a, x0b) = self.x0_coeffs(sa, sb);
                let (ea, eb) = match self.prediction {
                    Prediction::Epsilon => (0.0, 1.0),
                    Prediction::Sample => (1.0 / sb, -sa / sb),
                    Prediction::V => (sb, sa),
                };
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
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
                let (x0a, x0b) = match self.prediction {
                    Prediction::Epsilon => (1.0, -sigma),
                    Prediction::V => (
                        1.0 / (sigma * sigma + 1.0),
                        -sigma / (sigma * sigma + 1.0).sqrt(),
                    ),
                    Prediction::Sample => (0.0, 1.0),
                };
                let x0 = ops::lincomb(&[(x, x0a), (m, x0b)]);
                match (self.kind, noise) {
                    (SchedulerKind::EulerAncestral, Some(n)) => {
                        let (up, down) = ancestral(sigma, next);
                        let r = (down - sigma) / sigma;
                        ops::lincomb(&[(x, 1.0 + r), (&x0, -r), (n, up)])
                    }
                    _ => {
                        let r = (next - sigma) / sigma;
                        ops::lincomb(&[(x, 1.0 + r), (&x0, -r)])
                    }
                }
            }
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras => {
                let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
                let (x0a, x0b) = self.x0_coeffs(alpha_s0, sigma_s0);
                let x0 = ops::lincomb(&[(x, x0a), (m, x0b)]);
                let (c0, c1, lower_order_final, r0) = self.dpm_coeffs(i);
                let out = match self.prev_x0.take() {
                    Some(prev) if !lower_order_final => {
                        let hk = 0.5 * c1 / r0.expect("a previous step");
                        ops::lincomb(&[(x, c0), (&x0, -c1 - hk), (&prev, hk)])
                    }
                    _ => ops::lincomb(&[(x, c0), (&x0, -c1)]),
                };
                self.prev_x0 = Some(x0);
                out
            }
            SchedulerKind::Pndm => {
                let mix = |terms: &[(&Tensor, f32)], div: f32, mul: f32| {
                    let terms: Vec<_> = terms.iter().map(|&(t, c)| (t, c / div * mul)).collect();
                    ops::lincomb(&terms)
                };
                let (t, prev, x, e) = self.pndm_plan(i, m, x, mix);
                let (sa, sb, sc, diff, denom) = self.pndm_coeffs(t, prev);
                let c = diff / denom;
                match self.prediction {
                    // v → ε: √ᾱ_t·v + √(1-ᾱ_t)·x.
                    Prediction::V => ops::lincomb(&[(&x, sc - c * sb), (&e, -c * sa)]),
                    _ => ops::lincomb(&[(&x, sc), (&e, -c)]),
                }
            }
        };
        self.steps_done += 1;
        Ok(out)
    }

    /// `add_noise` on tensors anywhere: `a·original + b·noise`.
    pub fn add_noise_ops(
        &self,
        original: &Tensor,
        noise: &Tensor,
        timestep: f32,
    ) -> Result<Tensor> {
        ensure!(
            original.shape() == noise.shape(),
            "add_noise: {:?} vs noise {:?}",
            original.shape(),
            noise.shape()
        );
        let (a, b) = if self.kind.indexes_alphas() {
            let ac = self.alphas_cumprod[self.train_index(timestep)?];
            (ac.sqrt(), (1.0 - ac).sqrt())
        } else {
            let sigma = self.sigmas[self.noise_index(timestep)?];
            if self.kind.is_euler() {
                (1.0, sigma)
            } else {
                alpha_sigma(sigma)
            }
        };
        Ok(ops::lincomb(&[(original, a), (noise, b)]))
    }

    /// `scale_model_input` on tensors anywhere.
    pub fn scale_model_input_ops(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        if !self.kind.is_euler() {
            return Ok(sample.clone());
        }
        let sigma = self.sigmas()[..self.timesteps().len()]
            .get(step)
            .copied()
            .ok_or_else(|| {
                anyhow!("scale_model_input: step {step} out of range (set_timesteps first?)")
            })?;
        Ok(ops::scale(sample, 1.0 / (sigma * sigma + 1.0).sqrt()))
    }
}
