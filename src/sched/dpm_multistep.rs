//! DPMSolverMultistepScheduler as DPM-Solver++(2M) (Lu et al. 2022): x0 prediction, a
//! first-order step on the first step (no history) and at the end (`lower_order_final`), a
//! second-order midpoint step otherwise; optionally Karras sigmas.

use super::{
    alpha_sigma, choice, opt_f64, require_false, require_null, schedule, trailing, Common,
    NoiseForm, Sampler, Spacing,
};
use crate::backend as ops;
use crate::config::Config;
use crate::tensor::Tensor;
use anyhow::Result;
use schedule::BetaSchedule;
use serde_json::Value;

pub(super) struct DpmMultistep {
    /// Karras sigmas: fixed by the kind (dpmpp-2m-karras), not read from the config.
    karras: bool,
    /// Karras range overrides (`sigma_min` / `sigma_max`; only when inherited from another
    /// class's config, as diffusers keeps unknown keys in `config`).
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    final_sigma_min: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    /// The previous step's x0 prediction.
    prev_x0: Option<Tensor>,
}

impl DpmMultistep {
    /// `overridden`: the CLI named the variant, so the config's own solver fields do not apply.
    pub(super) fn new(cfg: &Config, karras: bool, overridden: bool) -> Result<Self> {
        if !overridden {
            if cfg.usize_or("solver_order", 2)? != 2 {
                return Err(cfg.unsupported("solver_order", cfg.usize("solver_order")?, "2"));
            }
            // diffusers maps DEIS / UniPC names onto dpmsolver++ / midpoint itself.
            let algorithms = [("dpmsolver++", ()), ("deis", ())];
            choice(cfg, "algorithm_type", "dpmsolver++", &algorithms)?;
            let solvers = [("midpoint", ()), ("logrho", ()), ("bh1", ()), ("bh2", ())];
            choice(cfg, "solver_type", "midpoint", &solvers)?;
        }
        require_false(cfg, "thresholding")?;
        for field in [
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_lu_lambdas",
            "use_flow_sigmas",
        ] {
            require_false(cfg, field)?;
        }
        require_null(cfg, "variance_type")?;
        match cfg.get("lambda_min_clipped") {
            None => {}
            Some(Value::String(v)) if v == "-Infinity" => {}
            Some(v) => return Err(cfg.unsupported("lambda_min_clipped", v, "-Infinity")),
        }
        let final_sigmas = [("zero", false), ("sigma_min", true)];
        Ok(DpmMultistep {
            karras,
            final_sigma_min: choice(cfg, "final_sigmas_type", "zero", &final_sigmas)?,
            lower_order_final: cfg.bool_or("lower_order_final", true)?,
            euler_at_final: cfg.bool_or("euler_at_final", false)?,
            sigma_min: opt_f64(cfg, "sigma_min")?,
            sigma_max: opt_f64(cfg, "sigma_max")?,
            prev_x0: None,
        })
    }

    /// Constants at schedule index `i`: x_t = c0·x − c1·x0 (first order), whether this step
    /// is forced to first order, and r0 (from the second step on) for the midpoint correction.
    fn coeffs(&self, c: &Common, i: usize) -> (f32, f32, bool, Option<f32>) {
        let n = c.timesteps.len();
        let lower_order_final = i == n - 1
            && (self.euler_at_final || (self.lower_order_final && n < 15) || !self.final_sigma_min);
        let (alpha_s0, sigma_s0) = alpha_sigma(c.sigmas[i]);
        let (alpha_t, sigma_t) = alpha_sigma(c.sigmas[i + 1]);
        // Final σ = 0 gives λ_t = +inf, h = inf, e^-h = 0: the step returns x0 exactly.
        let lambda = |a: f32, s: f32| a.ln() - s.ln();
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda(alpha_t, sigma_t) - lambda_s0;
        let c0 = sigma_t / sigma_s0;
        let c1 = alpha_t * ((-h).exp() - 1.0);
        let r0 = (i > 0).then(|| {
            let (alpha_s1, sigma_s1) = alpha_sigma(c.sigmas[i - 1]);
            (lambda_s0 - lambda(alpha_s1, sigma_s1)) / h
        });
        (c0, c1, lower_order_final, r0)
    }
}

/// Integer timesteps (`lambda_min_clipped` -inf, so the full training range) and their sigmas
/// (shared with UniPC, which rounds Karras timesteps under every beta schedule).
pub(super) fn dpm_schedule(
    c: &Common,
    n: usize,
    karras: Option<(Option<f64>, Option<f64>)>,
    final_sigma_min: bool,
    round_cosine: bool,
) -> (Vec<f32>, Vec<f32>) {
    let nt = c.num_train;
    let mut ts: Vec<f64> = match c.spacing {
        // n + 1 points, the last (0) dropped.
        Spacing::Linspace => schedule::np_linspace(0.0, (nt - 1) as f64, n + 1)[1..]
            .iter()
            .rev()
            .map(|t| t.round_ties_even())
            .collect(),
        Spacing::Leading => (1..=n)
            .rev()
            .map(|i| (i * (nt / (n + 1)) + c.steps_offset) as f64)
            .collect(),
        Spacing::Trailing => trailing(nt, n),
    };
    let sigmas = if let Some((sigma_min, sigma_max)) = karras {
        let (lo, hi) = (c.train_sigmas[0] as f64, c.train_sigmas[nt - 1] as f64);
        let sigmas = schedule::karras(sigma_min.unwrap_or(lo), sigma_max.unwrap_or(hi), n);
        let log_sigmas = c.log_sigmas();
        let cosine = !round_cosine && c.beta_schedule == BetaSchedule::SquaredcosCapV2;
        // Rounded, except for DPM's cosine schedule; then truncated by the cast to int64.
        ts = sigmas
            .iter()
            .map(|&s| schedule::sigma_to_t(s, &log_sigmas))
            .map(|t| if cosine { t } else { t.round_ties_even() }.trunc())
            .collect();
        sigmas
    } else {
        ts.iter()
            .map(|&t| schedule::np_interp(t, &c.train_sigmas))
            .collect()
    };
    (
        ts.into_iter().map(|t| t as f32).collect(),
        c.with_final_sigma(sigmas, final_sigma_min),
    )
}

impl Sampler for DpmMultistep {
    fn schedule(&self, c: &Common, n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let karras = self.karras.then_some((self.sigma_min, self.sigma_max));
        Ok(dpm_schedule(c, n, karras, self.final_sigma_min, false))
    }

    fn reset(&mut self) {
        self.prev_x0 = None;
    }

    fn noise_form(&self) -> NoiseForm {
        NoiseForm::AlphaSigma
    }

    fn step(
        &mut self,
        c: &Common,
        i: usize,
        model_output: &Tensor,
        x: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Vec<f32> {
        let (m, x) = (model_output.data(), x.data());
        let (alpha_s0, sigma_s0) = alpha_sigma(c.sigmas[i]);
        let x0: Vec<f32> = (0..x.len())
            .map(|j| c.prediction.x0(m[j], x[j], alpha_s0, sigma_s0))
            .collect();
        let (c0, c1, lower_order_final, r0) = self.coeffs(c, i);
        let out = match self.prev_x0.take() {
            Some(prev) if !lower_order_final => {
                let (k, half) = (1.0 / r0.expect("a previous step"), 0.5 * c1);
                let m1 = prev.data();
                (0..x.len())
                    .map(|j| c0 * x[j] - c1 * x0[j] - half * (k * (x0[j] - m1[j])))
                    .collect()
            }
            _ => (0..x.len()).map(|j| c0 * x[j] - c1 * x0[j]).collect(),
        };
        self.prev_x0 = Some(Tensor::new(model_output.shape(), x0));
        out
    }

    fn step_ops(
        &mut self,
        c: &Common,
        i: usize,
        m: &Tensor,
        x: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Tensor {
        let (alpha_s0, sigma_s0) = alpha_sigma(c.sigmas[i]);
        let (x0a, x0b) = c.prediction.x0_coeffs(alpha_s0, sigma_s0);
        let x0 = ops::lincomb(&[(x, x0a), (m, x0b)]);
        let (c0, c1, lower_order_final, r0) = self.coeffs(c, i);
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
}
