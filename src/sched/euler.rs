//! EulerDiscreteScheduler (Karras et al. 2022, Algorithm 2 with s_churn = 0): float32
//! timesteps, sigmas interpolated from the training sigmas, optionally Karras-spaced. The
//! schedule, x0 prediction and `init_noise_sigma` are shared with `euler_ancestral`.

use super::{
    choice, opt_f64, require_false, schedule, trailing, Common, NoiseForm, Prediction, Sampler,
    Spacing,
};
use crate::backend as ops;
use crate::config::Config;
use crate::tensor::Tensor;
use anyhow::Result;

pub(super) struct Euler {
    /// `use_karras_sigmas`.
    karras: bool,
    /// Karras range overrides (`sigma_min` / `sigma_max`).
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    /// `final_sigmas_type` "sigma_min" (else "zero").
    final_sigma_min: bool,
}

impl Euler {
    pub(super) fn new(cfg: &Config, c: &Common) -> Result<Self> {
        choice(cfg, "interpolation_type", "linear", &[("linear", ())])?;
        require_false(cfg, "use_exponential_sigmas")?;
        require_false(cfg, "use_beta_sigmas")?;
        // "continuous" changes the timesteps only for v-prediction.
        let continuous = choice(
            cfg,
            "timestep_type",
            "discrete",
            &[("discrete", false), ("continuous", true)],
        )?;
        if continuous && c.prediction == Prediction::V {
            return Err(cfg.unsupported(
                "timestep_type",
                "\"continuous\" with v_prediction",
                "\"discrete\"",
            ));
        }
        let final_sigmas = [("zero", false), ("sigma_min", true)];
        Ok(Euler {
            final_sigma_min: choice(cfg, "final_sigmas_type", "zero", &final_sigmas)?,
            karras: cfg.bool_or("use_karras_sigmas", false)?,
            sigma_min: opt_f64(cfg, "sigma_min")?,
            sigma_max: opt_f64(cfg, "sigma_max")?,
        })
    }
}

/// Euler (ancestral): float32 timesteps, sigmas interpolated from the training sigmas; with
/// `karras` = Some((sigma_min, sigma_max)) overrides, Karras sigmas.
pub(super) fn euler_schedule(
    c: &Common,
    n: usize,
    karras: Option<(Option<f64>, Option<f64>)>,
    final_sigma_min: bool,
) -> (Vec<f32>, Vec<f32>) {
    let nt = c.num_train;
    let mut ts: Vec<f32> = match c.spacing {
        Spacing::Linspace => schedule::np_linspace(0.0, (nt - 1) as f64, n)
            .iter()
            .rev()
            .map(|&t| t as f32)
            .collect(),
        Spacing::Leading => (0..n)
            .rev()
            .map(|i| (i * (nt / n)) as f32 + c.steps_offset as f32)
            .collect(),
        Spacing::Trailing => trailing(nt, n).into_iter().map(|t| t as f32).collect(),
    };
    let mut sigmas: Vec<f64> = ts
        .iter()
        .map(|&t| schedule::np_interp(t as f64, &c.train_sigmas))
        .collect();
    if let Some((sigma_min, sigma_max)) = karras {
        // Unlike DPM, the Karras range is that of the spaced schedule, not the training one.
        let (lo, hi) = (sigmas[sigmas.len() - 1], sigmas[0]);
        sigmas = schedule::karras(sigma_min.unwrap_or(lo), sigma_max.unwrap_or(hi), n);
        let log_sigmas = c.log_sigmas();
        ts = sigmas
            .iter()
            .map(|&s| schedule::sigma_to_t(s, &log_sigmas) as f32)
            .collect();
    }
    (ts, c.with_final_sigma(sigmas, final_sigma_min))
}

/// Euler kinds' `init_noise_sigma`: the largest sigma, as σ or `√(σ²+1)` by spacing.
pub(super) fn init_noise_sigma(c: &Common) -> f32 {
    // Before set_timesteps diffusers holds the training sigmas (plus 0).
    let sigmas = if c.sigmas.is_empty() {
        &c.train_sigmas
    } else {
        &c.sigmas
    };
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match c.spacing {
        Spacing::Leading => (max * max + 1.0).sqrt(),
        Spacing::Linspace | Spacing::Trailing => max,
    }
}

/// The x0 prediction at σ, elementwise: `x0(model_output, sample)`.
pub(super) fn x0(c: &Common, sigma: f32) -> impl Fn(f32, f32) -> f32 {
    let v_scale = -sigma / (sigma * sigma + 1.0).sqrt();
    let v_div = sigma * sigma + 1.0;
    let prediction = c.prediction;
    move |m, x| match prediction {
        Prediction::Epsilon => x - sigma * m,
        Prediction::V => m * v_scale + x / v_div,
        Prediction::Sample => m,
    }
}

/// The x0 prediction at σ as a tensor: `a·x + b·m`.
pub(super) fn x0_ops(c: &Common, sigma: f32, m: &Tensor, x: &Tensor) -> Tensor {
    let (x0a, x0b) = match c.prediction {
        Prediction::Epsilon => (1.0, -sigma),
        Prediction::V => (
            1.0 / (sigma * sigma + 1.0),
            -sigma / (sigma * sigma + 1.0).sqrt(),
        ),
        Prediction::Sample => (0.0, 1.0),
    };
    ops::lincomb(&[(x, x0a), (m, x0b)])
}

impl Sampler for Euler {
    fn schedule(&self, c: &Common, n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let karras = self.karras.then_some((self.sigma_min, self.sigma_max));
        Ok(euler_schedule(c, n, karras, self.final_sigma_min))
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

    fn step(
        &mut self,
        c: &Common,
        i: usize,
        m: &Tensor,
        x: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Vec<f32> {
        let (sigma, next) = (c.sigmas[i], c.sigmas[i + 1]);
        let x0 = x0(c, sigma);
        let (m, x) = (m.data(), x.data());
        // s_churn = 0: sigma_hat = sigma.
        let dt = next - sigma;
        (0..x.len())
            .map(|j| x[j] + (x[j] - x0(m[j], x[j])) / sigma * dt)
            .collect()
    }

    fn step_ops(
        &mut self,
        c: &Common,
        i: usize,
        m: &Tensor,
        x: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Tensor {
        let (sigma, next) = (c.sigmas[i], c.sigmas[i + 1]);
        let x0 = x0_ops(c, sigma, m, x);
        let r = (next - sigma) / sigma;
        ops::lincomb(&[(x, 1.0 + r), (&x0, -r)])
    }
}
