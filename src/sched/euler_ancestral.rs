//! EulerAncestralDiscreteScheduler: Euler's schedule, each step going deterministically down
//! to σ_down and adding fresh noise of std σ_up.

use super::euler::{euler_schedule, init_noise_sigma, x0, x0_ops};
use super::{Common, NoiseForm, Sampler};
use crate::backend as ops;
use crate::tensor::Tensor;
use anyhow::Result;

/// No options of its own (no Karras sigmas, final sigma 0).
pub(super) struct EulerAncestral;

/// The split of the step from σ to σ_next: (σ_up, σ_down).
fn ancestral(sigma: f32, next: f32) -> (f32, f32) {
    let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
    (up, (next * next - up * up).sqrt())
}

impl Sampler for EulerAncestral {
    fn schedule(&self, c: &Common, n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok(euler_schedule(c, n, None, false))
    }

    fn noise_form(&self) -> NoiseForm {
        NoiseForm::Sigma
    }

    fn scales_input(&self) -> bool {
        true
    }

    fn init_noise_sigma(&self, c: &Common) -> f32 {
        init_noise_sigma(c)
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
        let (sigma, next) = (c.sigmas[i], c.sigmas[i + 1]);
        let x0 = x0(c, sigma);
        let (m, x) = (m.data(), x.data());
        let noise = noise.expect("checked by needs_step_noise").data();
        let (up, down) = ancestral(sigma, next);
        let dt = down - sigma;
        (0..x.len())
            .map(|j| x[j] + (x[j] - x0(m[j], x[j])) / sigma * dt + noise[j] * up)
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
        let (sigma, next) = (c.sigmas[i], c.sigmas[i + 1]);
        let x0 = x0_ops(c, sigma, m, x);
        let n = noise.expect("checked by needs_step_noise");
        let (up, down) = ancestral(sigma, next);
        let r = (down - sigma) / sigma;
        ops::lincomb(&[(x, 1.0 + r), (&x0, -r), (n, up)])
    }
}
