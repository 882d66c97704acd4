//! Diffusion schedulers built from a diffusers `scheduler/scheduler_config.json`, matching
//! diffusers 0.42.1 step for step: DDIM, Euler, Euler ancestral, DPM++ 2M (Karras) and PNDM.
//!
//! Schedule constants follow diffusers' own float path (see `schedule`); the per-step updates
//! run elementwise in f32 with the coefficients computed the way torch computes them on 0-dim
//! float32 tensors, so results agree to the last bit or two. Tensors are treated as flat
//! arrays, so any layout (NCHW or NHWC latents) works.
//!
//! Usage: `set_timesteps` (or `set_timesteps_img2img`), then for each `i` in
//! `0..timesteps().len()`: run the model on `scale_model_input(x, i)` at `timesteps()[i]`,
//! and `x = step(model_output, i, x, noise)`.

mod device;
mod schedule;

use crate::config::Config;
use crate::tensor::Tensor;
use anyhow::{anyhow, bail, ensure, Context, Result};
use schedule::BetaSchedule;
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The samplers the engine offers; `FromStr`/`Display` use the CLI names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerKind {
    Ddim,
    Euler,
    EulerAncestral,
    /// DPMSolverMultistepScheduler, algorithm_type dpmsolver++, solver_order 2, midpoint.
    DpmPp2m,
    /// DPM++ 2M with use_karras_sigmas.
    DpmPp2mKarras,
    /// PNDMScheduler: PLMS steps, after Runge-Kutta ones unless `skip_prk_steps` (SD1.5's default).
    Pndm,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 6] = [
        Self::Ddim,
        Self::Euler,
        Self::EulerAncestral,
        Self::DpmPp2m,
        Self::DpmPp2mKarras,
        Self::Pndm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::DpmPp2m => "dpmpp-2m",
            Self::DpmPp2mKarras => "dpmpp-2m-karras",
            Self::Pndm => "pndm",
        }
    }

    /// The diffusers class implementing this kind.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Ddim => "DDIMScheduler",
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::DpmPp2m | Self::DpmPp2mKarras => "DPMSolverMultistepScheduler",
            Self::Pndm => "PNDMScheduler",
        }
    }

    fn is_dpm(self) -> bool {
        matches!(self, Self::DpmPp2m | Self::DpmPp2mKarras)
    }

    fn is_euler(self) -> bool {
        matches!(self, Self::Euler | Self::EulerAncestral)
    }

    /// DDIM and PNDM: integer timesteps that index ᾱ directly (no sigmas).
    fn indexes_alphas(self) -> bool {
        matches!(self, Self::Ddim | Self::Pndm)
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|k| k.name()).collect();
                anyhow!(
                    "unknown scheduler `{s}` (expected one of: {})",
                    names.join(", ")
                )
            })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prediction {
    Epsilon,
    V,
    Sample,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spacing {
    Leading,
    Linspace,
    Trailing,
}

pub struct Scheduler {
    kind: SchedulerKind,
    /// The config file, for error messages.
    path: PathBuf,
    prediction: Prediction,
    spacing: Spacing,
    steps_offset: usize,
    num_train: usize,
    beta_schedule: BetaSchedule,
    /// As the class computes it (Euler / DPM pin the last entry to 2^-24 under zero SNR).
    alphas_cumprod: Vec<f32>,
    /// `((1 - ᾱ) / ᾱ)^½` per training timestep (float32, Euler / DPM).
    train_sigmas: Vec<f32>,
    // DDIM
    final_alpha_cumprod: f32,
    clip_range: Option<f32>,
    eta: f32,
    // Euler / DPM
    /// Karras sigmas (`use_karras_sigmas`; DPM: fixed by the kind).
    karras: bool,
    /// Karras range overrides (`sigma_min` / `sigma_max`; for DPM only when inherited from
    /// another class's config, as diffusers keeps unknown keys in `config`).
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    final_sigma_min: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    // Set by `set_timesteps`.
    num_inference_steps: usize,
    timesteps: Vec<f32>,
    /// Euler / DPM: one per timestep plus the final sigma.
    sigmas: Vec<f32>,
    /// img2img: index of the first timestep used.
    begin: usize,
    /// diffusers' `set_begin_index` was called (img2img on Euler / DPM): add_noise then uses the
    /// current step's sigma instead of looking the timestep up.
    begin_index_set: bool,
    steps_done: usize,
    /// DPM++ 2M: the previous step's x0 prediction.
    prev_x0: Option<Tensor>,
    // PNDM (diffusers' `counter` is `steps_done`)
    /// Runge-Kutta warm-up steps: 12, or 0 with `skip_prk_steps`.
    prk_steps: usize,
    /// Model outputs kept for the multistep formula (`ets`; at most 4).
    ets: Vec<Tensor>,
    /// The sample a Runge-Kutta group (or PLMS's first two steps) starts from (`cur_sample`).
    cur_sample: Option<Tensor>,
    /// The Runge-Kutta weighted sum of model outputs so far (`cur_model_output`).
    cur_model_output: Option<Tensor>,
}

/// Reads a string field that must be one of `options`.
fn choice<T: Copy>(cfg: &Config, field: &str, default: &str, options: &[(&str, T)]) -> Result<T> {
    let v = cfg.str_or(field, default)?;
    options
        .iter()
        .find(|(name, _)| *name == v)
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            let names: Vec<_> = options.iter().map(|(n, _)| format!("{n:?}")).collect();
            cfg.unsupported(field, format!("{v:?}"), &names.join(", "))
        })
}

/// A switch the engine implements only in its default (off) position.
fn require_false(cfg: &Config, field: &str) -> Result<()> {
    if cfg.bool_or(field, false)? {
        return Err(cfg.unsupported(field, true, "false"));
    }
    Ok(())
}

fn require_null(cfg: &Config, field: &str) -> Result<()> {
    match cfg.get(field) {
        None => Ok(()),
        Some(v) => Err(cfg.unsupported(field, v, "null")),
    }
}

fn opt_f64(cfg: &Config, field: &str) -> Result<Option<f64>> {
    cfg.get(field).map(|_| cfg.f64_or(field, 0.0)).transpose()
}

/// diffusers writes `float("-inf")` (DPM's `lambda_min_clipped`) as a bare `-Infinity`, which
/// is not JSON; quote `-Infinity` / `Infinity` / `NaN` outside strings so serde can read them.
fn quote_non_finite(text: &str) -> String {
    let (b, mut out) = (text.as_bytes(), Vec::with_capacity(text.len() + 16));
    let (mut i, mut in_str, mut escaped) = (0, false, false);
    'outer: while i < b.len() {
        let c = b[i];
        if in_str {
            (in_str, escaped) = (escaped || c != b'"', !escaped && c == b'\\');
        } else if c == b'"' {
            in_str = true;
        } else {
            for tok in ["-Infinity", "Infinity", "NaN"] {
                if b[i..].starts_with(tok.as_bytes()) {
                    out.extend_from_slice(format!("\"{tok}\"").as_bytes());
                    i += tok.len();
                    continue 'outer;
                }
            }
        }
        out.push(c);
        i += 1;
    }
    String::from_utf8(out).expect("only ASCII inserted at ASCII positions")
}

/// Reads a scheduler config like `Config::read`, but also accepts the bare `-Infinity` that
/// diffusers writes for DPM's `lambda_min_clipped` (`Config::read` rejects such files).
pub fn read_config(path: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let json: Value = serde_json::from_str(&quote_non_finite(&text))
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let Value::Object(json) = json else {
        bail!("{}: expected a JSON object", path.display())
    };
    Ok(Config {
        path: path.to_path_buf(),
        json,
    })
}

impl Scheduler {
    /// Reads a `scheduler_config.json`. `override_kind` picks another scheduler while keeping
    /// the config's beta schedule, prediction type, spacing etc., as
    /// `XScheduler.from_config(config)` does (fields the target class lacks are ignored, fields
    /// missing from the file take the target class's defaults).
    pub fn from_config(path: &Path, override_kind: Option<SchedulerKind>) -> Result<Self> {
        Self::from_config_json(&read_config(path)?, override_kind)
    }

    /// As `from_config`, for a config already read with `read_config`.
    pub fn from_config_json(cfg: &Config, override_kind: Option<SchedulerKind>) -> Result<Self> {
        use SchedulerKind::*;
        let kind = match override_kind {
            // The CLI name fixes the DPM variant (diffusers users pass these as from_config kwargs).
            Some(k) => k,
            None => match cfg.str("_class_name")? {
                "DDIMScheduler" => Ddim,
                "EulerDiscreteScheduler" => Euler,
                "EulerAncestralDiscreteScheduler" => EulerAncestral,
                "DPMSolverMultistepScheduler" if cfg.bool_or("use_karras_sigmas", false)? => DpmPp2mKarras,
                "DPMSolverMultistepScheduler" => DpmPp2m,
                "PNDMScheduler" => Pndm,
                other => {
                    return Err(cfg.unsupported(
                        "_class_name",
                        format!("{other:?}"),
                        "DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, \
                         DPMSolverMultistepScheduler, PNDMScheduler; or choose a scheduler (ddim, euler, \
                         euler-a, dpmpp-2m, dpmpp-2m-karras, pndm) to use this config's noise schedule with",
                    ))
                }
            },
        };

        let num_train = cfg.usize_or("num_train_timesteps", 1000)?;
        // A schedule is num_train floats per table: bound it before allocating.
        if !(2..=100_000).contains(&num_train) {
            return Err(cfg.unsupported("num_train_timesteps", num_train, "2 to 100000"));
        }
        let (beta_start, beta_end) = (
            cfg.f64_or("beta_start", 0.0001)?,
            cfg.f64_or("beta_end", 0.02)?,
        );
        for (field, v) in [("beta_start", beta_start), ("beta_end", beta_end)] {
            if !(v > 0.0 && v < 1.0) {
                return Err(cfg.unsupported(field, v, "a number in (0, 1)"));
            }
        }
        if beta_end < beta_start {
            return Err(cfg.unsupported("beta_end", beta_end, "beta_start or more"));
        }
        let beta_schedule = choice(
            cfg,
            "beta_schedule",
            "linear",
            &[
                ("linear", BetaSchedule::Linear),
                ("scaled_linear", BetaSchedule::ScaledLinear),
                ("squaredcos_cap_v2", BetaSchedule::SquaredcosCapV2),
            ],
        )?;
        require_null(cfg, "trained_betas")?;
        let mut betas = schedule::betas(beta_schedule, beta_start, beta_end, num_train);
        // PNDMScheduler has no `rescale_betas_zero_snr`; from_config drops it.
        let zero_snr = kind != Pndm && cfg.bool_or("rescale_betas_zero_snr", false)?;
        if zero_snr {
            betas = schedule::rescale_zero_terminal_snr(&betas);
        }
        let mut alphas_cumprod = schedule::alphas_cumprod(&betas);
        if zero_snr && !kind.indexes_alphas() {
            // Euler / DPM avoid an infinite last sigma; DDIM keeps ᾱ = 0.
            *alphas_cumprod.last_mut().unwrap() = 2f32.powi(-24);
        }
        let train_sigmas = alphas_cumprod
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect();

        let predictions: &[(&str, Prediction)] = match kind {
            // diffusers raises NotImplementedError (PNDM: ValueError) for "sample" here.
            EulerAncestral | Pndm => &[
                ("epsilon", Prediction::Epsilon),
                ("v_prediction", Prediction::V),
            ],
            _ => &[
                ("epsilon", Prediction::Epsilon),
                ("v_prediction", Prediction::V),
                ("sample", Prediction::Sample),
            ],
        };
        let prediction = choice(cfg, "prediction_type", "epsilon", predictions)?;
        let spacing = choice(
            cfg,
            "timestep_spacing",
            if kind.indexes_alphas() {
                "leading"
            } else {
                "linspace"
            },
            &[
                ("leading", Spacing::Leading),
                ("linspace", Spacing::Linspace),
                ("trailing", Spacing::Trailing),
            ],
        )?;
        let steps_offset = cfg.usize_or("steps_offset", 0)?;

        let mut s = Scheduler {
            kind,
            path: cfg.path.clone(),
            prediction,
            spacing,
            steps_offset,
            num_train,
            beta_schedule,
            final_alpha_cumprod: 1.0,
            clip_range: None,
            eta: 0.0,
            alphas_cumprod,
            train_sigmas,
            karras: kind == DpmPp2mKarras,
            sigma_min: None,
            sigma_max: None,
            final_sigma_min: false,
            lower_order_final: true,
            euler_at_final: false,
            num_inference_steps: 0,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            begin: 0,
            begin_index_set: false,
            steps_done: 0,
            prev_x0: None,
            prk_steps: 0,
            ets: Vec::new(),
            cur_sample: None,
            cur_model_output: None,
        };
        let final_sigmas = [("zero", false), ("sigma_min", true)];
        match kind {
            Ddim => {
                require_false(cfg, "thresholding")?;
                // ᾱ "before" the last step: 1, or that of timestep 0.
                if !cfg.bool_or("set_alpha_to_one", true)? {
                    s.final_alpha_cumprod = s.alphas_cumprod[0];
                }
                if cfg.bool_or("clip_sample", true)? {
                    s.clip_range = Some(cfg.f64_or("clip_sample_range", 1.0)? as f32);
                }
            }
            Euler => {
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
                if continuous && prediction == Prediction::V {
                    return Err(cfg.unsupported(
                        "timestep_type",
                        "\"continuous\" with v_prediction",
                        "\"discrete\"",
                    ));
                }
                s.final_sigma_min = choice(cfg, "final_sigmas_type", "zero", &final_sigmas)?;
                s.karras = cfg.bool_or("use_karras_sigmas", false)?;
            }
            EulerAncestral => {}
            Pndm => {
                // Unlike DDIM, set_alpha_to_one defaults to false.
                if !cfg.bool_or("set_alpha_to_one", false)? {
                    s.final_alpha_cumprod = s.alphas_cumprod[0];
                }
                if !cfg.bool_or("skip_prk_steps", false)? {
                    s.prk_steps = 12;
                }
            }
            DpmPp2m | DpmPp2mKarras => {
                if override_kind.is_none() {
                    if cfg.usize_or("solver_order", 2)? != 2 {
                        return Err(cfg.unsupported(
                            "solver_order",
                            cfg.usize("solver_order")?,
                            "2",
                        ));
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
                s.final_sigma_min = choice(cfg, "final_sigmas_type", "zero", &final_sigmas)?;
                s.lower_order_final = cfg.bool_or("lower_order_final", true)?;
                s.euler_at_final = cfg.bool_or("euler_at_final", false)?;
            }
        }
        if kind == Euler || kind.is_dpm() {
            s.sigma_min = opt_f64(cfg, "sigma_min")?;
            s.sigma_max = opt_f64(cfg, "sigma_max")?;
        }
        Ok(s)
    }

    pub fn kind(&self) -> SchedulerKind {
        self.kind
    }

    /// Training-time ᾱ_t (index = training timestep).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// DDIM's η (the pipelines' `eta`): 0 is deterministic DDIM; with η > 0 `step` needs noise.
    /// Ignored by the other kinds, as diffusers pipelines pass `eta` only to schedulers taking it.
    pub fn set_eta(&mut self, eta: f32) {
        self.eta = eta;
    }

    /// Whether `step` needs a standard-normal noise tensor (Euler ancestral, DDIM with η > 0).
    pub fn needs_step_noise(&self) -> bool {
        self.kind == SchedulerKind::EulerAncestral
            || (self.kind == SchedulerKind::Ddim && self.eta > 0.0)
    }

    /// Builds the schedule for `n` denoising steps and resets the stepping state. PNDM runs
    /// more steps than `n`: `n + 1` (PLMS: the second timestep repeats) or `n + 9` (with its
    /// Runge-Kutta warm-up; needs `n >= 4`).
    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let path = self.path.display();
        ensure!(
            (1..=self.num_train).contains(&n),
            "{path}: {n} inference steps: must be between 1 and num_train_timesteps ({})",
            self.num_train
        );
        let (timesteps, sigmas) = match self.kind {
            SchedulerKind::Ddim | SchedulerKind::Pndm => (self.ddim_timesteps(n), Vec::new()),
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => self.euler_schedule(n),
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras => self.dpm_schedule(n),
        };
        // numpy's arange can make the trailing spacing one step too long, ending at timestep -1.
        ensure!(
            timesteps.len() == n,
            "{path}: field `timestep_spacing` = \"trailing\" gives {} timesteps for {n} steps in diffusers \
             (numpy arange rounding, last timestep {}); choose another step count",
            timesteps.len(),
            timesteps.last().copied().unwrap_or_default()
        );
        if self.kind.indexes_alphas() {
            // DDIM / PNDM index ᾱ by timestep (leading + steps_offset reaches num_train at n = num_train).
            ensure!(
                timesteps
                    .iter()
                    .all(|&t| t >= 0.0 && (t as usize) < self.num_train),
                "{path}: {} timesteps for {n} steps leave 0..{} (steps_offset {})",
                self.kind.class_name(),
                self.num_train,
                self.steps_offset
            );
        }
        let timesteps = if self.kind == SchedulerKind::Pndm {
            self.pndm_timesteps(timesteps)?
        } else {
            timesteps
        };
        self.num_inference_steps = n;
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.begin = 0;
        self.begin_index_set = false;
        self.steps_done = 0;
        self.prev_x0 = None;
        self.ets.clear();
        self.cur_sample = None;
        self.cur_model_output = None;
        Ok(())
    }

    /// img2img: the schedule for `n` steps, keeping only its last `strength` part as diffusers'
    /// img2img pipelines do (`get_timesteps`). Returns the timestep to noise the init latents
    /// to (`add_noise`); `timesteps()` then lists only the remaining steps. `strength` is f64
    /// because diffusers truncates `n * strength` in float64 (n = 10, strength 0.7 keeps 7
    /// steps; in f32 it would keep 6).
    pub fn set_timesteps_img2img(&mut self, n: usize, strength: f64) -> Result<f32> {
        ensure!(
            (0.0..=1.0).contains(&strength),
            "img2img strength {strength} is not in [0, 1]"
        );
        self.set_timesteps(n)?;
        let init_timestep = ((n as f64 * strength) as usize).min(n);
        // As the inpainting pipeline checks (PNDM would still have its final step left).
        ensure!(
            init_timestep >= 1,
            "img2img strength {strength} with {n} steps leaves no denoising step (need n * strength >= 1)"
        );
        // `scheduler.order` is 1 for every kind here, PNDM included: its img2img skips `n - init`
        // entries of its longer list, so the repeated timestep or the Runge-Kutta steps shift.
        let t_start = n - init_timestep;
        self.begin = t_start;
        // DDIM / PNDM have no set_begin_index in diffusers; their add_noise indexes ᾱ by timestep.
        self.begin_index_set = !self.kind.indexes_alphas();
        Ok(self.timesteps[t_start])
    }

    /// The timesteps to run, in order (model inputs); DDIM / DPM / PNDM ones are integers.
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps[self.begin.min(self.timesteps.len())..]
    }

    /// Euler / DPM: the sigma of each timestep in `timesteps()` plus the final one (empty for
    /// DDIM / PNDM).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas[self.begin.min(self.sigmas.len())..]
    }

    /// The factor the pipelines multiply fresh standard-normal latents by.
    pub fn init_noise_sigma(&self) -> f32 {
        if !self.kind.is_euler() {
            return 1.0;
        }
        // Before set_timesteps diffusers holds the training sigmas (plus 0).
        let sigmas = if self.sigmas.is_empty() {
            &self.train_sigmas
        } else {
            &self.sigmas
        };
        let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        match self.spacing {
            Spacing::Leading => (max * max + 1.0).sqrt(),
            Spacing::Linspace | Spacing::Trailing => max,
        }
    }

    /// The model input for step `step`: Euler kinds divide by `sqrt(σ² + 1)`, others return
    /// the sample unchanged.
    pub fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        if !self.kind.is_euler() {
            return Ok(sample.clone());
        }
        let sigma = self.sigmas()[..self.timesteps().len()]
            .get(step)
            .copied()
            .ok_or_else(|| {
                anyhow!("scale_model_input: step {step} out of range (set_timesteps first?)")
            })?;
        let scale = (sigma * sigma + 1.0).sqrt();
        Ok(Tensor::new(
            sample.shape(),
            sample.data().iter().map(|x| x / scale).collect(),
        ))
    }

    /// The checks every step shares; returns the step noise when this scheduler needs one.
    fn check_step<'a>(
        &self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        noise: Option<&'a Tensor>,
    ) -> Result<Option<&'a Tensor>> {
        ensure!(
            !self.timesteps.is_empty(),
            "scheduler step before set_timesteps"
        );
        ensure!(
            step == self.steps_done && step < self.timesteps().len(),
            "scheduler step {step} out of order: expected step {} of {}",
            self.steps_done,
            self.timesteps().len()
        );
        ensure!(
            model_output.shape() == sample.shape(),
            "scheduler step: model output {:?} and sample {:?} differ in shape",
            model_output.shape(),
            sample.shape()
        );
        if !self.needs_step_noise() {
            return Ok(None);
        }
        let n = noise.ok_or_else(|| anyhow!("{} needs a step noise tensor", self.describe()))?;
        ensure!(
            n.shape() == sample.shape(),
            "step noise {:?} vs sample {:?}",
            n.shape(),
            sample.shape()
        );
        Ok(Some(n))
    }

    /// One denoising step: `sample` at `timesteps()[step]` → the sample at the next timestep.
    /// Steps must run in order (DPM++ 2M and PNDM keep earlier model outputs). `noise` (standard
    /// normal, same shape) is required when `needs_step_noise()`, else ignored.
    pub fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let noise = self
            .check_step(model_output, step, sample, noise)?
            .map(|n| n.data());
        let i = self.begin + step;
        let (m, x) = (model_output.data(), sample.data());
        let out = match self.kind {
            SchedulerKind::Ddim => self.ddim_step(i, m, x, noise),
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => self.euler_step(i, m, x, noise),
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras => {
                self.dpm_step(i, model_output, x)
            }
            SchedulerKind::Pndm => {
                let (t, prev, x, e) = self.pndm_plan(i, model_output, sample, mix);
                self.pndm_prev_sample(t, prev, x.data(), e.data())
            }
        };
        self.steps_done += 1;
        Ok(Tensor::new(sample.shape(), out))
    }

    /// Noises `original` to `timestep` (forward diffusion) as the scheduler's `add_noise`:
    /// DDIM / PNDM `√ᾱ_t·x + √(1-ᾱ_t)·ε`; Euler `x + σ·ε`; DPM `α·x + σ_t·ε` with α = 1/√(σ²+1).
    /// Euler / DPM take σ from the schedule: after `set_timesteps_img2img` (diffusers'
    /// begin index) that of the current step, ignoring `timestep`; otherwise that of `timestep`
    /// looked up in `timesteps()` (the second match when it repeats; DPM falls back to the
    /// last step when absent, Euler fails).
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f32) -> Result<Tensor> {
        ensure!(
            original.shape() == noise.shape(),
            "add_noise: {:?} vs noise {:?}",
            original.shape(),
            noise.shape()
        );
        let (x, e) = (original.data(), noise.data());
        let out: Vec<f32> = if self.kind.indexes_alphas() {
            let a = self.alphas_cumprod[self.train_index(timestep)?];
            let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
            x.iter().zip(e).map(|(x, e)| sa * x + sb * e).collect()
        } else {
            let sigma = self.sigmas[self.noise_index(timestep)?];
            if self.kind.is_euler() {
                x.iter().zip(e).map(|(x, e)| x + e * sigma).collect()
            } else {
                let (a, s) = alpha_sigma(sigma);
                x.iter().zip(e).map(|(x, e)| a * x + s * e).collect()
            }
        };
        Ok(Tensor::new(original.shape(), out))
    }

    /// The training timestep `timestep` names, for DDIM / PNDM's add_noise.
    fn train_index(&self, timestep: f32) -> Result<usize> {
        let t = timestep as usize;
        ensure!(
            timestep >= 0.0 && t as f32 == timestep && t < self.num_train,
            "add_noise: {} timestep {timestep} is not an integer in 0..{}",
            self.kind.class_name(),
            self.num_train
        );
        Ok(t)
    }

    fn describe(&self) -> String {
        format!("{} ({})", self.kind, self.path.display())
    }

    /// diffusers' add_noise index: begin index + steps taken, or a timestep lookup.
    fn noise_index(&self, timestep: f32) -> Result<usize> {
        ensure!(!self.timesteps.is_empty(), "add_noise before set_timesteps");
        if self.begin_index_set {
            return Ok(self.begin + self.steps_done);
        }
        let hits: Vec<usize> = (0..self.timesteps.len())
            .filter(|&i| self.timesteps[i] == timestep)
            .collect();
        match hits[..] {
            [] if self.kind.is_dpm() => Ok(self.timesteps.len() - 1),
            [] => bail!(
                "add_noise: timestep {timestep} is not in the {} schedule",
                self.describe()
            ),
            [i] => Ok(i),
            [_, i, ..] => Ok(i),
        }
    }

    fn ddim_timesteps(&self, n: usize) -> Vec<f32> {
        let nt = self.num_train;
        let ts: Vec<f64> = match self.spacing {
            Spacing::Linspace => schedule::np_linspace(0.0, (nt - 1) as f64, n)
                .iter()
                .rev()
                .map(|t| t.round_ties_even())
                .collect(),
            Spacing::Leading => (0..n)
                .rev()
                .map(|i| (i * (nt / n) + self.steps_offset) as f64)
                .collect(),
            Spacing::Trailing => trailing(nt, n),
        };
        ts.into_iter().map(|t| t as f32).collect()
    }

    /// Euler (ancestral): float32 timesteps, sigmas interpolated from the training sigmas.
    fn euler_schedule(&self, n: usize) -> (Vec<f32>, Vec<f32>) {
        let nt = self.num_train;
        let mut ts: Vec<f32> = match self.spacing {
            Spacing::Linspace => schedule::np_linspace(0.0, (nt - 1) as f64, n)
                .iter()
                .rev()
                .map(|&t| t as f32)
                .collect(),
            Spacing::Leading => (0..n)
                .rev()
                .map(|i| (i * (nt / n)) as f32 + self.steps_offset as f32)
                .collect(),
            Spacing::Trailing => trailing(nt, n).into_iter().map(|t| t as f32).collect(),
        };
        let mut sigmas: Vec<f64> = ts
            .iter()
            .map(|&t| schedule::np_interp(t as f64, &self.train_sigmas))
            .collect();
        if self.karras {
            // Unlike DPM, the Karras range is that of the spaced schedule, not the training one.
            let (lo, hi) = (sigmas[sigmas.len() - 1], sigmas[0]);
            sigmas = schedule::karras(
                self.sigma_min.unwrap_or(lo),
                self.sigma_max.unwrap_or(hi),
                n,
            );
            let log_sigmas = self.log_sigmas();
            ts = sigmas
                .iter()
                .map(|&s| schedule::sigma_to_t(s, &log_sigmas) as f32)
                .collect();
        }
        (ts, self.with_final_sigma(sigmas))
    }

    /// DPM: integer timesteps (`lambda_min_clipped` -inf, so the full training range).
    fn dpm_schedule(&self, n: usize) -> (Vec<f32>, Vec<f32>) {
        let nt = self.num_train;
        let mut ts: Vec<f64> = match self.spacing {
            // n + 1 points, the last (0) dropped.
            Spacing::Linspace => schedule::np_linspace(0.0, (nt - 1) as f64, n + 1)[1..]
                .iter()
                .rev()
                .map(|t| t.round_ties_even())
                .collect(),
            Spacing::Leading => (1..=n)
                .rev()
                .map(|i| (i * (nt / (n + 1)) + self.steps_offset) as f64)
                .collect(),
            Spacing::Trailing => trailing(nt, n),
        };
        let sigmas = if self.karras {
            let (lo, hi) = (
                self.train_sigmas[0] as f64,
                self.train_sigmas[nt - 1] as f64,
            );
            let sigmas = schedule::karras(
                self.sigma_min.unwrap_or(lo),
                self.sigma_max.unwrap_or(hi),
                n,
            );
            let log_sigmas = self.log_sigmas();
            let cosine = self.beta_schedule == BetaSchedule::SquaredcosCapV2;
            // Rounded, except for the cosine schedule; then truncated by the cast to int64.
            ts = sigmas
                .iter()
                .map(|&s| schedule::sigma_to_t(s, &log_sigmas))
                .map(|t| if cosine { t } else { t.round_ties_even() }.trunc())
                .collect();
            sigmas
        } else {
            ts.iter()
                .map(|&t| schedule::np_interp(t, &self.train_sigmas))
                .collect()
        };
        (
            ts.into_iter().map(|t| t as f32).collect(),
            self.with_final_sigma(sigmas),
        )
    }

    fn log_sigmas(&self) -> Vec<f32> {
        self.train_sigmas.iter().map(|s| s.ln()).collect()
    }

    /// Appends the final sigma (0, or the smallest training sigma) and casts to float32.
    fn with_final_sigma(&self, sigmas: Vec<f64>) -> Vec<f32> {
        let last = if self.final_sigma_min {
            self.train_sigmas[0]
        } else {
            0.0
        };
        sigmas.into_iter().map(|s| s as f32).chain([last]).collect()
    }

    /// DDIM's step constants at schedule index `i`: (√ᾱ_t, √(1-ᾱ_t), √ᾱ_prev, direction weight, noise std).
    pub(super) fn ddim_coeffs(&self, i: usize) -> (f32, f32, f32, f32, f32) {
        let t = self.timesteps[i] as usize;
        // diffusers steps back by N / n whatever the spacing.
        let prev = t as i64 - (self.num_train / self.num_inference_steps) as i64;
        let a_t = self.alphas_cumprod[t];
        let a_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha_cumprod
        };
        let b_t = 1.0 - a_t;
        let variance = ((1.0 - a_prev) / b_t) * (1.0 - a_t / a_prev);
        let std = self.eta * variance.sqrt();
        let dir = (1.0 - a_prev - std * std).sqrt();
        (a_t.sqrt(), b_t.sqrt(), a_prev.sqrt(), dir, std)
    }

    fn ddim_step(&self, i: usize, m: &[f32], x: &[f32], noise: Option<&[f32]>) -> Vec<f32> {
        let (sa, sb, sa_prev, dir, std) = self.ddim_coeffs(i);
        (0..x.len())
            .map(|j| {
                let (m, x) = (m[j], x[j]);
                let (x0, eps) = match self.prediction {
                    Prediction::Epsilon => ((x - sb * m) / sa, m),
                    Prediction::Sample => (m, (x - sa * m) / sb),
                    Prediction::V => (sa * x - sb * m, sa * m + sb * x),
                };
                let x0 = self.clip_range.map_or(x0, |r| x0.clamp(-r, r));
                let prev = sa_prev * x0 + dir * eps;
                match noise {
                    Some(n) => prev + std * n[j],
                    None => prev,
                }
            })
            .collect()
    }

    fn euler_step(&self, i: usize, m: &[f32], x: &[f32], noise: Option<&[f32]>) -> Vec<f32> {
        let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
        let v_scale = -sigma / (sigma * sigma + 1.0).sqrt();
        let v_div = sigma * sigma + 1.0;
        let x0 = |m: f32, x: f32| match self.prediction {
            Prediction::Epsilon => x - sigma * m,
            Prediction::V => m * v_scale + x / v_div,
            Prediction::Sample => m,
        };
        match (self.kind, noise) {
            // Ancestral: step deterministically down to σ_down, then add noise of std σ_up.
            (SchedulerKind::EulerAncestral, Some(noise)) => {
                let (up, down) = ancestral(sigma, next);
                let dt = down - sigma;
                (0..x.len())
                    .map(|j| x[j] + (x[j] - x0(m[j], x[j])) / sigma * dt + noise[j] * up)
                    .collect()
            }
            _ => {
                // s_churn = 0: sigma_hat = sigma.
                let dt = next - sigma;
                (0..x.len())
                    .map(|j| x[j] + (x[j] - x0(m[j], x[j])) / sigma * dt)
                    .collect()
            }
        }
    }

    /// DPM++ 2M constants at schedule index `i`: x_t = c0·x − c1·x0 (first order), whether this
    /// step is forced to first order, and r0 (from the second step on) for the midpoint correction.
    pub(super) fn dpm_coeffs(&self, i: usize) -> (f32, f32, bool, Option<f32>) {
        let n = self.timesteps.len();
        let lower_order_final = i == n - 1
            && (self.euler_at_final || (self.lower_order_final && n < 15) || !self.final_sigma_min);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        // Final σ = 0 gives λ_t = +inf, h = inf, e^-h = 0: the step returns x0 exactly.
        let lambda = |a: f32, s: f32| a.ln() - s.ln();
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda(alpha_t, sigma_t) - lambda_s0;
        let c0 = sigma_t / sigma_s0;
        let c1 = alpha_t * ((-h).exp() - 1.0);
        let r0 = (i > 0).then(|| {
            let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
            (lambda_s0 - lambda(alpha_s1, sigma_s1)) / h
        });
        (c0, c1, lower_order_final, r0)
    }

    /// DPM-Solver++(2M): x0 prediction, then a first-order step on the first step (no history)
    /// and at the end (lower_order_final), a second-order midpoint step otherwise.
    fn dpm_step(&mut self, i: usize, model_output: &Tensor, x: &[f32]) -> Vec<f32> {
        let m = model_output.data();
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let x0: Vec<f32> = (0..x.len())
            .map(|j| match self.prediction {
                Prediction::Epsilon => (x[j] - sigma_s0 * m[j]) / alpha_s0,
                Prediction::Sample => m[j],
                Prediction::V => alpha_s0 * x[j] - sigma_s0 * m[j],
            })
            .collect();
        let (c0, c1, lower_order_final, r0) = self.dpm_coeffs(i);
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

    /// PNDM's run list from the descending `ts` (diffusers' `_timesteps` reversed). PLMS repeats
    /// the second timestep: its second step redoes the first from the same sample. The
    /// Runge-Kutta warm-up runs 12 steps over the last four timesteps and the midpoints of the
    /// first three (`t + N/n/2`, four evaluations each), then PLMS from the fourth timestep on.
    fn pndm_timesteps(&self, ts: Vec<f32>) -> Result<Vec<f32>> {
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
            self.path.display()
        );
        let h = (self.num_train / n / 2) as f32;
        let p = [ts[0], ts[1] + h, ts[1], ts[2] + h, ts[2], ts[3] + h, ts[3]];
        let mut out = vec![p[0]];
        for q in &p[1..6] {
            out.extend([q, q]);
        }
        out.push(p[6]);
        out.extend_from_slice(&ts[3..]);
        Ok(out)
    }

    /// The bookkeeping of diffusers' PNDM `step` (`step_prk` / `step_plms`), shared by `step`
    /// and `step_ops`: updates the history and returns what `_get_prev_sample` takes — the
    /// timestep, the previous timestep (negative: before the first), the sample and the model
    /// output. `mix(terms, div, mul)` forms `mul · (Σ cₖ·tₖ / div)` where the tensors live.
    fn pndm_plan<F>(
        &mut self,
        i: usize,
        m: &Tensor,
        x: &Tensor,
        mix: F,
    ) -> (usize, i64, Tensor, Tensor)
    where
        F: Fn(&[(&Tensor, f32)], f32, f32) -> Tensor,
    {
        let counter = self.steps_done;
        let r = (self.num_train / self.num_inference_steps) as i64;
        let t = self.timesteps[i] as i64;
        // Python float constants, rounded to float32 as torch does.
        let recip = |k: f64| (1.0 / k) as f32;
        if counter < self.prk_steps {
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
            let start = self.timesteps[counter / 4 * 4] as usize;
            let sample = self.cur_sample.clone().expect("set at counter % 4 == 0");
            return (start, prev, sample, e);
        }
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
    fn pndm_coeffs(&self, t: usize, prev: i64) -> (f32, f32, f32, f32, f32) {
        let a_t = self.alphas_cumprod[t];
        let a_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize]
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
    fn pndm_prev_sample(&self, t: usize, prev: i64, x: &[f32], e: &[f32]) -> Vec<f32> {
        let (sa, sb, sc, diff, denom) = self.pndm_coeffs(t, prev);
        x.iter()
            .zip(e)
            .map(|(&x, &e)| {
                let e = match self.prediction {
                    Prediction::V => sa * e + sb * x,
                    _ => e,
                };
                sc * x - diff * e / denom
            })
            .collect()
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

/// Euler ancestral's split of the step from σ to σ_next: (σ_up, σ_down).
pub(super) fn ancestral(sigma: f32, next: f32) -> (f32, f32) {
    let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
    (up, (next * next - up * up).sqrt())
}

/// (α_t, σ_t) of a sigma: α = 1/√(σ²+1), σ_t = σ·α (as DPM's `_sigma_to_alpha_sigma_t`).
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let a = 1.0 / (sigma * sigma + 1.0).sqrt();
    (a, sigma * a)
}

/// Trailing spacing: `round(np.arange(num_train, 0, -num_train / n)) - 1`.
fn trailing(num_train: usize, n: usize) -> Vec<f64> {
    schedule::np_arange_down(num_train as f64, num_train as f64 / n as f64)
        .into_iter()
        .map(|t| t.round_ties_even() - 1.0)
        .collect()
}
