//! PNDMScheduler (Liu et al. 2022): pseudo linear multistep (PLMS) steps, after 12
//! Runge-Kutta ones unless `skip_prk_steps` (SD1.5's default). PLMS repeats the second
//! timestep; diffusers' `counter` is the shared `steps_done`.

use super::{ddim, Common, NoiseForm, Prediction, Sampler};
use crate::backend as ops;
use crate::config::Config;
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

pub(super) struct Pndm {
    /// ᾱ "before" the last step: 1, or that of timestep 0 (`set_alpha_to_one`).
    final_alpha_cumprod: f32,
    /// Runge-Kutta warm-up steps: 12, or 0 with `skip_prk_steps`.
    prk_steps: usize,
    /// Model outputs kept for the multistep formula (`ets`; at most 4).
    ets: Vec<Tensor>,
    /// The sample a Runge-Kutta group (or PLMS's first two steps) starts from (`cur_sample`).
    cur_sample: Option<Tensor>,
    /// The Runge-Kutta weighted sum of model outputs so far (`cur_model_output`).
    cur_model_output: Option<Tensor>,
}

/// 1/k of a Python float constant, rounded to float32 as torch does.
fn recip(k: f64) -> f32 {
    (1.0 / k) as f32
}

impl Pndm {
    pub(super) fn new(cfg: &Config, c: &Common) -> Result<Self> {
        // Unlike DDIM, set_alpha_to_one defaults to false.
        let final_alpha_cumprod = if cfg.bool_or("set_alpha_to_one", false)? {
            1.0
        } else {
            c.alphas_cumprod[0]
        };
        let prk_steps = if cfg.bool_or("skip_prk_steps", false)? {
            0
        } else {
            12
        };
        Ok(Pndm {
            final_alpha_cumprod,
            prk_steps,
            ets: Vec::new(),
            cur_sample: None,
            cur_model_output: None,
        })
    }

    /// The bookkeeping of diffusers' PNDM `step` (`step_prk` / `step_plms`), shared by `step`
    /// and `step_ops`: updates the history and returns what `_get_prev_sample` takes — the
    /// timestep, the previous timestep (negative: before the first), the sample and the model
    /// output. `mix(terms, div, mul)` forms `mul · (Σ cₖ·tₖ / div)` where the tensors live.
    fn plan<F>(
        &mut self,
        c: &Common,
        i: usize,
        m: &Tensor,
        x: &Tensor,
        mix: F,
    ) -> (usize, i64, Tensor, Tensor)
    where
        F: Fn(&[(&Tensor, f32)], f32, f32) -> Tensor,
    {
        if c.steps_done < self.prk_steps {
            self.plan_prk(c, i, m, x, mix)
        } else {
            self.plan_plms(c, i, m, x, mix)
        }
    }

    /// [`Self::plan`] for a Runge-Kutta warm-up step.
    fn plan_prk<F>(
        &mut self,
        c: &Common,
        i: usize,
        m: &Tensor,
        x: &Tensor,
        mix: F,
    ) -> (usize, i64, Tensor, Tensor)
    where
        F: Fn(&[(&Tensor, f32)], f32, f32) -> Tensor,
    {
        let counter = c.steps_done;
        let r = (c.num_train / c.num_inference_steps) as i64;
        let t = c.timesteps[i] as i64;
        // Four evaluations per step, all from the group's first sample and timestep (taken
        // by `counter` from the full list, also in img2img), to the passed timestep or half
        // a step below it; the last uses the weighted sum of the four outputs.
        let prev = t - if counter.is_multiple_of(2) { r / 2 } else { 0 };
        let e = match (counter % 4, self.cur_model_output.take()) {
            (0, _) => {
                self.cur_model_output = Some(mix(&[(m, recip(6.0))], 1.0, 1.0));
                self.ets.push(m.clone());
                self.cur_sample = Some(x.clone());
                m.clone()
            }
            (3, Some(acc)) => mix(&[(&acc, 1.0), (m, recip(6.0))], 1.0, 1.0),
            (_, Some(acc)) => {
                self.cur_model_output = Some(mix(&[(&acc, 1.0), (m, recip(3.0))], 1.0, 1.0));
                m.clone()
            }
            (_, None) => unreachable!("the sum starts at counter % 4 == 0"),
        };
        let start = c.timesteps[counter / 4 * 4] as usize;
        let sample = self.cur_sample.clone().expect("set at counter % 4 == 0");
        (start, prev, sample, e)
    }

    /// [`Self::plan`] for a PLMS step.
    fn plan_plms<F>(
        &mut self,
        c: &Common,
        i: usize,
        m: &Tensor,
        x: &Tensor,
        mix: F,
    ) -> (usize, i64, Tensor, Tensor)
    where
        F: Fn(&[(&Tensor, f32)], f32, f32) -> Tensor,
    {
        let counter = c.steps_done;
        let r = (c.num_train / c.num_inference_steps) as i64;
        let t = c.timesteps[i] as i64;
        // PLMS: Adams-Bashforth over the last four model outputs. The second step redoes the
        // first from its sample with the two outputs averaged, keeping no history; it starts
        // N/n above the passed (repeated) timestep, which under linspace / trailing spacing is
        // not the first timestep (999 → 888 is redone as 988 → 888).
        let (mut t, mut prev) = (t, t - r);
        if counter == 1 {
            (t, prev) = (t + r, t);
        } else {
            if self.ets.len() > 3 {
                self.ets.remove(0);
            }
            self.ets.push(m.clone());
        }
        let e = &self.ets;
        let (sample, eps) = match e.len() {
            1 if counter == 0 => {
                self.cur_sample = Some(x.clone());
                (x.clone(), m.clone())
            }
            1 => (
                self.cur_sample.take().expect("set at counter 0"),
                mix(&[(m, 1.0), (&e[0], 1.0)], 2.0, 1.0),
            ),
            2 => (x.clone(), mix(&[(&e[1], 3.0), (&e[0], -1.0)], 2.0, 1.0)),
            3 => {
                let terms = [(&e[2], 23.0), (&e[1], -16.0), (&e[0], 5.0)];
                (x.clone(), mix(&terms, 12.0, 1.0))
            }
            _ => {
                let terms = [(&e[3], 55.0), (&e[2], -59.0), (&e[1], 37.0), (&e[0], -9.0)];
                (x.clone(), mix(&terms, 1.0, recip(24.0)))
            }
        };
        (t as usize, prev, sample, eps)
    }

    /// `_get_prev_sample`'s float32 scalars for `t` → `prev`: (√ᾱ_t, √(1-ᾱ_t), the sample
    /// coefficient √(ᾱ_prev/ᾱ_t), ᾱ_prev - ᾱ_t, the model output's denominator).
    fn coeffs(&self, c: &Common, t: usize, prev: i64) -> (f32, f32, f32, f32, f32) {
        let a_t = c.alphas_cumprod[t];
        let a_prev = if prev >= 0 {
            c.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha_cumprod
        };
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        (
            a_t.sqrt(),
            b_t.sqrt(),
            (a_prev / a_t).sqrt(),
            a_prev - a_t,
            denom,
        )
    }

    /// PNDM's `_get_prev_sample` (formula 9 of the paper), elementwise.
    fn prev_sample(&self, c: &Common, t: usize, prev: i64, x: &[f32], e: &[f32]) -> Vec<f32> {
        let (sa, sb, sc, diff, denom) = self.coeffs(c, t, prev);
        x.iter()
            .zip(e)
            .map(|(&x, &e)| {
                let e = match c.prediction {
                    Prediction::V => sa * e + sb * x,
                    _ => e,
                };
                sc * x - diff * e / denom
            })
            .collect()
    }
}

impl Sampler for Pndm {
    fn schedule(&self, c: &Common, n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((ddim::timesteps(c, n), Vec::new()))
    }

    /// PNDM's run list from the descending `ts` (diffusers' `_timesteps` reversed). PLMS repeats
    /// the second timestep: its second step redoes the first from the same sample. The
    /// Runge-Kutta warm-up runs 12 steps over the last four timesteps and the midpoints of the
    /// first three (`t + N/n/2`, four evaluations each), then PLMS from the fourth timestep on.
    fn run_list(&self, c: &Common, ts: Vec<f32>) -> Result<Vec<f32>> {
        let n = ts.len();
        if self.prk_steps == 0 {
            let mut plms = ts;
            if n >= 2 {
                plms.insert(1, plms[1]);
            }
            return Ok(plms);
        }
        ensure!(
            n >= 4,
            "{}: {n} inference steps: field `skip_prk_steps` = false (PNDM's Runge-Kutta warm-up) \
             needs at least 4",
            c.path.display()
        );
        let h = (c.num_train / n / 2) as f32;
        let p = [ts[0], ts[1] + h, ts[1], ts[2] + h, ts[2], ts[3] + h, ts[3]];
        let mut out = vec![p[0]];
        for q in &p[1..6] {
            out.extend([q, q]);
        }
        out.push(p[6]);
        out.extend_from_slice(&ts[3..]);
        Ok(out)
    }

    fn reset(&mut self) {
        self.ets.clear();
        self.cur_sample = None;
        self.cur_model_output = None;
    }

    fn noise_form(&self) -> NoiseForm {
        NoiseForm::Alphas
    }

    fn step(
        &mut self,
        c: &Common,
        i: usize,
        m: &Tensor,
        x: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Vec<f32> {
        let (t, prev, x, e) = self.plan(c, i, m, x, mix);
        self.prev_sample(c, t, prev, x.data(), e.data())
    }

    fn step_ops(
        &mut self,
        c: &Common,
        i: usize,
        m: &Tensor,
        x: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Tensor {
        let mix = |terms: &[(&Tensor, f32)], div: f32, mul: f32| {
            let terms: Vec<_> = terms.iter().map(|&(t, c)| (t, c / div * mul)).collect();
            ops::lincomb(&terms)
        };
        let (t, prev, x, e) = self.plan(c, i, m, x, mix);
        let (sa, sb, sc, diff, denom) = self.coeffs(c, t, prev);
        let k = diff / denom;
        match c.prediction {
            // v → ε: √ᾱ_t·v + √(1-ᾱ_t)·x.
            Prediction::V => ops::lincomb(&[(&x, sc - k * sb), (&e, -k * sa)]),
            _ => ops::lincomb(&[(&x, sc), (&e, -k)]),
        }
    }
}

/// `mul · (Σ cₖ·tₖ / div)` elementwise in float32, in the order torch evaluates PNDM's sums.
fn mix(terms: &[(&Tensor, f32)], div: f32, mul: f32) -> Tensor {
    let mut out: Vec<f32> = terms[0].0.data().iter().map(|v| terms[0].1 * v).collect();
    for (t, c) in &terms[1..] {
        for (o, v) in out.iter_mut().zip(t.data()) {
            *o += c * v;
        }
    }
    let out = out.into_iter().map(|v| mul * (v / div)).collect();
    Tensor::new(terms[0].0.shape(), out)
}
