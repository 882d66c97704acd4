//! UniPCMultistepScheduler (Zhao et al. 2023) with `predict_x0` (UniPC on data predictions):
//! a predictor of order up to `solver_order` (B(h) = e^h − 1 for bh2, h for bh1), and from the
//! second step on the corrector, which refines the sample the previous step predicted with the
//! model output at it before the next prediction. Timesteps and sigmas are DPM-Solver's.

use super::dpm_multistep::dpm_schedule;
use super::Sampler;
use super::{alpha_sigma, choice, opt_f64, require_false, require_null, Common, NoiseForm};
use crate::backend as ops;
use crate::config::Config;
use crate::tensor::Tensor;
use anyhow::Result;
use serde_json::Value;

pub(super) struct UniPc {
    solver_order: usize,
    /// solver_type "bh1" (B(h) = h); else bh2 (diffusers maps midpoint / heun / logrho to it).
    bh1: bool,
    lower_order_final: bool,
    karras: bool,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    final_sigma_min: bool,
    /// The x0 predictions of the last `solver_order` steps, oldest first (`model_outputs`).
    outputs: Vec<Tensor>,
    /// The sample the previous step started from (after its correction), for the corrector.
    last_sample: Option<Tensor>,
    /// The previous predictor's order, which the corrector reuses.
    this_order: usize,
    /// Steps taken, capped at `solver_order` (`lower_order_nums`).
    lower_order_nums: usize,
}

/// Rejects the settings this UniPC does not implement: noise predictions, a disabled corrector,
/// a solver_p, thresholding and the other sigma schedules.
fn reject_unsupported(cfg: &Config) -> Result<()> {
    if !cfg.bool_or("predict_x0", true)? {
        return Err(cfg.unsupported("predict_x0", false, "true"));
    }
    match cfg.get("disable_corrector") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(v) => return Err(cfg.unsupported("disable_corrector", v, "[]")),
    }
    require_null(cfg, "solver_p")?;
    require_false(cfg, "thresholding")?;
    for field in [
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "use_flow_sigmas",
        "use_dynamic_shifting",
    ] {
        require_false(cfg, field)?;
    }
    Ok(())
}

impl UniPc {
    pub(super) fn new(cfg: &Config) -> Result<Self> {
        let solver_order = cfg.usize_or("solver_order", 2)?;
        if !(1..=3).contains(&solver_order) {
            return Err(cfg.unsupported("solver_order", solver_order, "1, 2 or 3"));
        }
        let solvers = [
            ("bh1", true),
            ("bh2", false),
            ("midpoint", false),
            ("heun", false),
            ("logrho", false),
        ];
        let bh1 = choice(cfg, "solver_type", "bh2", &solvers)?;
        reject_unsupported(cfg)?;
        let final_sigmas = [("zero", false), ("sigma_min", true)];
        let final_sigma_min = choice(cfg, "final_sigmas_type", "zero", &final_sigmas)?;
        let lower_order_final = cfg.bool_or("lower_order_final", true)?;
        let karras = cfg.bool_or("use_karras_sigmas", false)?;
        // Settings for which diffusers' last step is NaN: bh1's B(h) = h is -inf on a step to
        // sigma 0 (times a zero residual); a Karras schedule ending at sigma_min repeats its
        // last sigma (h = 0), which only the first-order update survives.
        if bh1 && !final_sigma_min {
            return Err(cfg.unsupported(
                "solver_type",
                "\"bh1\" with final_sigmas_type \"zero\"",
                "\"bh2\", or final_sigmas_type \"sigma_min\"",
            ));
        }
        if karras && final_sigma_min && !lower_order_final && solver_order > 1 {
            return Err(cfg.unsupported(
                "lower_order_final",
                "false with Karras sigmas ending at sigma_min",
                "true",
            ));
        }
        Ok(UniPc {
            solver_order,
            bh1,
            lower_order_final,
            karras,
            final_sigma_min,
            sigma_min: opt_f64(cfg, "sigma_min")?,
            sigma_max: opt_f64(cfg, "sigma_max")?,
            outputs: Vec::new(),
            last_sample: None,
            this_order: 0,
            lower_order_nums: 0,
        })
    }

    /// The update from schedule index `s0` (sample `x`, x0 prediction `outputs[last]`) to `t`
    /// as scalars, in the float32 order of diffusers' `multistep_uni_{p,c}_bh_update`:
    /// `x_t = a·x − b·m0 − c·(Σₖ ρₖ·(mₖ − m0)/rₖ [+ ρ_last·(model_t − m0)])`. `hist[k]` is the
    /// schedule index of the k-th earlier output. Returns (a, b, c, r, ρ); with `corrector`, ρ
    /// has one weight more than r (that of `model_t`).
    fn coeffs(
        &self,
        c: &Common,
        s0: usize,
        t: usize,
        hist: &[usize],
        corrector: bool,
    ) -> (f32, f32, f32, Vec<f32>, Vec<f32>) {
        let lambda = |i: usize| {
            let (a, s) = alpha_sigma(c.sigmas[i]);
            (a, s, a.ln() - s.ln())
        };
        let (alpha_t, sigma_t, lambda_t) = lambda(t);
        let (_, sigma_s0, lambda_s0) = lambda(s0);
        let h = lambda_t - lambda_s0;
        let rks: Vec<f32> = hist
            .iter()
            .map(|&i| (lambda(i).2 - lambda_s0) / h)
            .collect();
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let b_h = if self.bh1 { hh } else { hh.exp_m1() };
        let order = hist.len() + 1;
        let mut b = Vec::with_capacity(order);
        let mut factorial = 1u32;
        for i in 1..=order as u32 {
            b.push(h_phi_k * factorial as f32 / b_h);
            factorial *= i + 1;
            h_phi_k = h_phi_k / hh - (1.0 / factorial as f64) as f32;
        }
        // R[i][j] = rks_j^i with rks = r ++ [1].
        let all: Vec<f32> = rks.iter().copied().chain([1.0]).collect();
        let rows = |n: usize| -> Vec<Vec<f32>> {
            (0..n)
                .map(|i| all[..n].iter().map(|r| r.powi(i as i32)).collect())
                .collect()
        };
        let rhos = if corrector {
            if order == 1 {
                vec![0.5]
            } else {
                solve(rows(order), b)
            }
        } else {
            match order {
                1 => Vec::new(),
                2 => vec![0.5],
                _ => solve(rows(order - 1), b[..order - 1].to_vec()),
            }
        };
        (
            sigma_t / sigma_s0,
            alpha_t * h_phi_1,
            alpha_t * b_h,
            rks,
            rhos,
        )
    }

    /// Schedule indexes of the outputs before the newest (k = 1..order) when the newest is `s0`.
    fn history(s0: usize, order: usize) -> Vec<usize> {
        (1..order).map(|k| s0 - k).collect()
    }

    /// The x0 prediction at schedule index `i`, elementwise (`convert_model_output`).
    fn x0(c: &Common, i: usize, m: &[f32], x: &[f32]) -> Vec<f32> {
        let (alpha, sigma) = alpha_sigma(c.sigmas[i]);
        (0..x.len())
            .map(|j| c.prediction.x0(m[j], x[j], alpha, sigma))
            .collect()
    }

    /// The bookkeeping of diffusers' `step` around the two updates: `correct(self, order)`
    /// gives the corrected sample, `predict(self, sample, order)` the next one.
    fn advance(&mut self, c: &Common, i: usize, x0: Tensor, sample: Tensor) -> (Tensor, usize) {
        // Pushes x0 and picks this step's predictor order.
        if self.outputs.len() == self.solver_order {
            self.outputs.remove(0);
        }
        self.outputs.push(x0);
        let order = if self.lower_order_final {
            self.solver_order.min(c.timesteps.len() - i)
        } else {
            self.solver_order
        };
        self.this_order = order.min(self.lower_order_nums + 1);
        self.last_sample = Some(sample.clone());
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        (sample, self.this_order)
    }
}

/// `torch.linalg.solve` for the small UniPC systems: Gaussian elimination with partial
/// pivoting in float32 (LAPACK's getrf / getrs).
fn solve(mut a: Vec<Vec<f32>>, mut b: Vec<f32>) -> Vec<f32> {
    let n = b.len();
    for k in 0..n {
        let p = (k..n)
            .max_by(|&i, &j| a[i][k].abs().total_cmp(&a[j][k].abs()).then(j.cmp(&i)))
            .expect("a non-empty system");
        a.swap(k, p);
        b.swap(k, p);
        let inv = 1.0 / a[k][k];
        let pivot = a[k].clone();
        for i in k + 1..n {
            let l = a[i][k] * inv;
            for (aij, pj) in a[i][k + 1..].iter_mut().zip(&pivot[k + 1..]) {
                *aij -= l * pj;
            }
            b[i] -= l * b[k];
        }
    }
    for k in (0..n).rev() {
        b[k] /= a[k][k];
        for i in 0..k {
            b[i] -= b[k] * a[i][k];
        }
    }
    b
}

/// Σ cᵢ·tᵢ over any number of tensors, four at a time.
fn lincomb_any(terms: &[(&Tensor, f32)]) -> Tensor {
    let mut acc = ops::lincomb(&terms[..terms.len().min(4)]);
    for chunk in terms[terms.len().min(4)..].chunks(3) {
        let mut next = vec![(&acc, 1.0)];
        next.extend_from_slice(chunk);
        acc = ops::lincomb(&next);
    }
    acc
}

impl Sampler for UniPc {
    fn schedule(&self, c: &Common, n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let karras = self.karras.then_some((self.sigma_min, self.sigma_max));
        // Unlike DPM, UniPC rounds Karras timesteps also under the cosine schedule and ends a
        // Karras schedule with sigma_min = the last Karras sigma.
        let (ts, mut sigmas) = dpm_schedule(c, n, karras, self.final_sigma_min, true);
        if self.karras && self.final_sigma_min {
            sigmas[n] = sigmas[n - 1];
        }
        Ok((ts, sigmas))
    }

    fn reset(&mut self) {
        self.outputs.clear();
        self.last_sample = None;
        self.this_order = 0;
        self.lower_order_nums = 0;
    }

    fn noise_form(&self) -> NoiseForm {
        NoiseForm::AlphaSigma
    }

    fn step(
        &mut self,
        c: &Common,
        i: usize,
        m: &Tensor,
        x: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Vec<f32> {
        let x0 = UniPc::x0(c, i, m.data(), x.data());
        let mut sample = x.data().to_vec();
        if let (true, Some(last)) = (i > 0, self.last_sample.as_ref()) {
            let hist = UniPc::history(i - 1, self.this_order);
            let (a, b, cc, rks, rhos) = self.coeffs(c, i - 1, i, &hist, true);
            let n = self.outputs.len();
            let m0 = self.outputs[n - 1].data();
            let last = last.data();
            sample = (0..x0.len())
                .map(|j| {
                    let mut corr = 0.0;
                    for (k, r) in rks.iter().enumerate() {
                        corr += rhos[k] * ((self.outputs[n - 2 - k].data()[j] - m0[j]) / r);
                    }
                    let d1_t = x0[j] - m0[j];
                    (a * last[j] - b * m0[j]) - cc * (corr + rhos[rks.len()] * d1_t)
                })
                .collect();
        }
        let shape = x.shape();
        let (sample, order) =
            self.advance(c, i, Tensor::new(shape, x0), Tensor::new(shape, sample));
        let hist = UniPc::history(i, order);
        let (a, b, cc, rks, rhos) = self.coeffs(c, i, i + 1, &hist, false);
        let n = self.outputs.len();
        let m0 = self.outputs[n - 1].data();
        let x = sample.data();
        (0..x.len())
            .map(|j| {
                let x_t = a * x[j] - b * m0[j];
                if rks.is_empty() {
                    return x_t;
                }
                let mut res = 0.0;
                for (k, r) in rks.iter().enumerate() {
                    res += rhos[k] * ((self.outputs[n - 2 - k].data()[j] - m0[j]) / r);
                }
                x_t - cc * res
            })
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
        let (alpha, sigma) = alpha_sigma(c.sigmas[i]);
        let (x0a, x0b) = c.prediction.x0_coeffs(alpha, sigma);
        let x0 = ops::lincomb(&[(x, x0a), (m, x0b)]);
        let mut sample = x.clone();
        if let (true, Some(last)) = (i > 0, self.last_sample.as_ref()) {
            let hist = UniPc::history(i - 1, self.this_order);
            let (a, b, cc, rks, rhos) = self.coeffs(c, i - 1, i, &hist, true);
            let n = self.outputs.len();
            // x = a·last − b·m0 − cc·(Σₖ ρₖ/rₖ·(mₖ − m0) + ρ·(x0 − m0)).
            let rho_t = rhos[rks.len()];
            let mut m0_coef = -b + cc * rho_t;
            let mut terms = vec![(last, a), (&x0, -cc * rho_t)];
            for (k, r) in rks.iter().enumerate() {
                let w = cc * rhos[k] / r;
                terms.push((&self.outputs[n - 2 - k], -w));
                m0_coef += w;
            }
            terms.push((&self.outputs[n - 1], m0_coef));
            sample = lincomb_any(&terms);
        }
        let (sample, order) = self.advance(c, i, x0, sample);
        let hist = UniPc::history(i, order);
        let (a, b, cc, rks, rhos) = self.coeffs(c, i, i + 1, &hist, false);
        let n = self.outputs.len();
        let mut m0_coef = -b;
        let mut terms = vec![(&sample, a)];
        for (k, r) in rks.iter().enumerate() {
            let w = cc * rhos[k] / r;
            terms.push((&self.outputs[n - 2 - k], -w));
            m0_coef += w;
        }
        terms.push((&self.outputs[n - 1], m0_coef));
        lincomb_any(&terms)
    }
}
