//! Diffusion schedulers built from a diffusers `scheduler/scheduler_config.json`, matching
//! diffusers 0.42.1 step for step, one file per scheduler: DDIM (`ddim`), Euler (`euler`),
//! Euler ancestral (`euler_ancestral`), DPM++ 2M with or without Karras sigmas
//! (`dpm_multistep`), PNDM (`pndm`), UniPC (`unipc`), and the few-step samplers of distilled
//! models, LCM (`lcm`) and TCD (`tcd`).
//!
//! Schedule constants follow diffusers' own float path (see `schedule`); the per-step updates
//! run elementwise in f32 with the coefficients computed the way torch computes them on 0-dim
//! float32 tensors, so results agree to the last bit or two. Tensors are treated as flat
//! arrays, so any layout (NCHW or NHWC latents) works. Each scheduler file holds its config
//! checks, its schedule, its elementwise reference `step` and its tensor-op `step_ops` (linear
//! combinations of whole tensors through `backend::lincomb`, so a GPU steps without a host
//! round trip); `tests/suite/sched.rs` checks the reference against diffusers and
//! `tests/suite/sched_ops.rs` the two forms against each other.
//!
//! Usage: `set_timesteps` (or `set_timesteps_img2img`), then for each `i` in
//! `0..timesteps().len()`: run the model on `scale_model_input(x, i)` at `timesteps()[i]`,
//! and `x = step(model_output, i, x, noise)`.
//!
//! A new scheduler is one `SchedulerKind` variant, one file implementing `Sampler`, one `Algo`
//! variant and one golden case in `tools/fixtures/schedulers.py`.

mod ddim;
mod dpm_multistep;
mod euler;
mod euler_ancestral;
mod lcm;
mod pndm;
mod prediction;
mod schedule;
mod tcd;
mod unipc;

use prediction::Prediction;

use crate::backend as ops;
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
    /// UniPCMultistepScheduler: predict_x0, bh1 / bh2, solver order 1 to 3, with the corrector.
    UniPc,
    /// LCMScheduler: multi-step consistency sampling for LCM-distilled models.
    Lcm,
    /// TCDScheduler: trajectory consistency sampling; γ is the pipelines' `eta`.
    Tcd,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 9] = [
        Self::Ddim,
        Self::Euler,
        Self::EulerAncestral,
        Self::DpmPp2m,
        Self::DpmPp2mKarras,
        Self::Pndm,
        Self::UniPc,
        Self::Lcm,
        Self::Tcd,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::DpmPp2m => "dpmpp-2m",
            Self::DpmPp2mKarras => "dpmpp-2m-karras",
            Self::Pndm => "pndm",
            Self::UniPc => "unipc",
            Self::Lcm => "lcm",
            Self::Tcd => "tcd",
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
            Self::UniPc => "UniPCMultistepScheduler",
            Self::Lcm => "LCMScheduler",
            Self::Tcd => "TCDScheduler",
        }
    }

    /// Integer timesteps that index ᾱ directly (no sigmas); these keep ᾱ_T = 0 under zero SNR
    /// and default to "leading" spacing.
    fn indexes_alphas(self) -> bool {
        matches!(self, Self::Ddim | Self::Pndm | Self::Lcm | Self::Tcd)
    }

    /// The class defaults of (beta_start, beta_end, beta_schedule): the distilled-model
    /// schedulers default to Stable Diffusion's, the others to DDPM's.
    fn default_betas(self) -> (f64, f64, &'static str) {
        match self {
            Self::Lcm | Self::Tcd => (0.00085, 0.012, "scaled_linear"),
            _ => (0.0001, 0.02, "linear"),
        }
    }

    /// The kind a config's `_class_name` names (DPM: the Karras variant when the config asks).
    fn from_class(cfg: &Config) -> Result<Self> {
        let class = cfg.str("_class_name")?;
        if class == "DPMSolverMultistepScheduler" && cfg.bool_or("use_karras_sigmas", false)? {
            return Ok(Self::DpmPp2mKarras);
        }
        if let Some(k) = Self::ALL.into_iter().find(|k| k.class_name() == class) {
            return Ok(k);
        }
        let mut classes: Vec<_> = Self::ALL.iter().map(|k| k.class_name()).collect();
        classes.dedup();
        let names: Vec<_> = Self::ALL.iter().map(|k| k.name()).collect();
        Err(cfg.unsupported(
            "_class_name",
            format!("{class:?}"),
            &format!(
                "{}; or choose a scheduler ({}) to use this config's noise schedule with",
                classes.join(", "),
                names.join(", ")
            ),
        ))
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
enum Spacing {
    Leading,
    Linspace,
    Trailing,
}

/// How `add_noise` mixes a clean sample with noise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NoiseForm {
    /// `√ᾱ_t·x + √(1-ᾱ_t)·ε`, ᾱ indexed by the (integer) timestep; the timesteps must index ᾱ.
    Alphas,
    /// `x + σ·ε` with σ from the schedule (Euler kinds).
    Sigma,
    /// `α·x + σ_t·ε`, α = 1/√(σ²+1), σ from the schedule; an unknown timestep takes the last
    /// step's σ (DPM's `index_for_timestep`).
    AlphaSigma,
}

/// What one scheduler adds to the shared state: its config, schedule and update rule.
trait Sampler {
    /// The (raw) timesteps for `n` steps and, for sigma-based schedulers, one sigma per
    /// timestep plus the final one (else empty).
    fn schedule(&self, c: &Common, n: usize) -> Result<(Vec<f32>, Vec<f32>)>;
    /// The list actually run from the checked raw timesteps (PNDM repeats some).
    fn run_list(&self, _c: &Common, timesteps: Vec<f32>) -> Result<Vec<f32>> {
        Ok(timesteps)
    }
    /// Forgets a previous run's history (`set_timesteps`).
    fn reset(&mut self) {}
    fn noise_form(&self) -> NoiseForm;
    /// Whether `scale_model_input` divides by `√(σ²+1)` (Euler kinds).
    fn scales_input(&self) -> bool {
        false
    }
    fn init_noise_sigma(&self, _c: &Common) -> f32 {
        1.0
    }
    fn needs_step_noise(&self, _c: &Common) -> bool {
        false
    }
    /// Refuses a step the settings made since construction (`set_eta`) do not allow.
    fn check(&self, _c: &Common) -> Result<()> {
        Ok(())
    }
    /// The elementwise reference update at schedule index `i`.
    fn step(
        &mut self,
        c: &Common,
        i: usize,
        m: &Tensor,
        x: &Tensor,
        noise: Option<&Tensor>,
    ) -> Vec<f32>;
    /// The same update as linear combinations of whole tensors, wherever they live.
    fn step_ops(
        &mut self,
        c: &Common,
        i: usize,
        m: &Tensor,
        x: &Tensor,
        noise: Option<&Tensor>,
    ) -> Tensor;
}

/// The state every scheduler shares: the config's noise schedule and the step bookkeeping.
struct Common {
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
    /// The pipelines' `eta` (DDIM's η).
    eta: f32,
    // Set by `set_timesteps`.
    num_inference_steps: usize,
    timesteps: Vec<f32>,
    /// Sigma-based kinds: one per timestep plus the final sigma.
    sigmas: Vec<f32>,
    /// img2img: index of the first timestep used.
    begin: usize,
    /// diffusers' `set_begin_index` was called (img2img on sigma-based kinds): add_noise then
    /// uses the current step's sigma instead of looking the timestep up.
    begin_index_set: bool,
    /// Steps taken since `set_timesteps` (PNDM's `counter`).
    steps_done: usize,
}

impl Common {
    fn log_sigmas(&self) -> Vec<f32> {
        self.train_sigmas.iter().map(|s| s.ln()).collect()
    }

    /// Appends the final sigma (0, or the smallest training sigma) and casts to float32.
    fn with_final_sigma(&self, sigmas: Vec<f64>, final_sigma_min: bool) -> Vec<f32> {
        let last = if final_sigma_min {
            self.train_sigmas[0]
        } else {
            0.0
        };
        sigmas.into_iter().map(|s| s as f32).chain([last]).collect()
    }
}

/// The per-scheduler state, dispatched by enum (no boxing).
enum Algo {
    Ddim(ddim::Ddim),
    Euler(euler::Euler),
    EulerAncestral(euler_ancestral::EulerAncestral),
    Dpm(dpm_multistep::DpmMultistep),
    Pndm(pndm::Pndm),
    UniPc(unipc::UniPc),
    Lcm(lcm::Lcm),
    Tcd(tcd::Tcd),
}

impl Algo {
    fn get(&self) -> &dyn Sampler {
        match self {
            Algo::Ddim(s) => s,
            Algo::Euler(s) => s,
            Algo::EulerAncestral(s) => s,
            Algo::Dpm(s) => s,
            Algo::Pndm(s) => s,
            Algo::UniPc(s) => s,
            Algo::Lcm(s) => s,
            Algo::Tcd(s) => s,
        }
    }

    fn get_mut(&mut self) -> &mut dyn Sampler {
        match self {
            Algo::Ddim(s) => s,
            Algo::Euler(s) => s,
            Algo::EulerAncestral(s) => s,
            Algo::Dpm(s) => s,
            Algo::Pndm(s) => s,
            Algo::UniPc(s) => s,
            Algo::Lcm(s) => s,
            Algo::Tcd(s) => s,
        }
    }

    fn new(kind: SchedulerKind, cfg: &Config, c: &Common, overridden: bool) -> Result<Self> {
        use SchedulerKind::*;
        Ok(match kind {
            Ddim => Algo::Ddim(ddim::Ddim::new(cfg, c)?),
            Euler => Algo::Euler(euler::Euler::new(cfg, c)?),
            EulerAncestral => Algo::EulerAncestral(euler_ancestral::EulerAncestral),
            DpmPp2m | DpmPp2mKarras => Algo::Dpm(dpm_multistep::DpmMultistep::new(
                cfg,
                kind == DpmPp2mKarras,
                overridden,
            )?),
            Pndm => Algo::Pndm(pndm::Pndm::new(cfg, c)?),
            UniPc => Algo::UniPc(unipc::UniPc::new(cfg)?),
            Lcm => Algo::Lcm(lcm::Lcm::new(cfg, c)?),
            Tcd => Algo::Tcd(tcd::Tcd::new(cfg, c)?),
        })
    }
}

pub struct Scheduler {
    kind: SchedulerKind,
    c: Common,
    algo: Algo,
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
    let text = crate::input::read_to_string(path)
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
        let kind = match override_kind {
            // The CLI name fixes the DPM variant (diffusers users pass these as from_config kwargs).
            Some(k) => k,
            None => SchedulerKind::from_class(cfg)?,
        };
        let (num_train, beta_schedule, alphas_cumprod, train_sigmas) =
            Self::train_schedule(cfg, kind)?;
        let (prediction, spacing) = Self::parse_prediction_spacing(cfg, kind)?;
        let steps_offset = cfg.usize_or("steps_offset", 0)?;

        let c = Common {
            path: cfg.path.clone(),
            prediction,
            spacing,
            steps_offset,
            num_train,
            beta_schedule,
            alphas_cumprod,
            train_sigmas,
            eta: 0.0,
            num_inference_steps: 0,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            begin: 0,
            begin_index_set: false,
            steps_done: 0,
        };
        let algo = Algo::new(kind, cfg, &c, override_kind.is_some())?;
        Ok(Scheduler { kind, c, algo })
    }

    /// The training noise schedule: (num_train_timesteps, beta_schedule, ᾱ_t, σ_t), one ᾱ and σ
    /// per training timestep.
    fn train_schedule(
        cfg: &Config,
        kind: SchedulerKind,
    ) -> Result<(usize, BetaSchedule, Vec<f32>, Vec<f32>)> {
        let num_train = cfg.usize_or("num_train_timesteps", 1000)?;
        // A schedule is num_train floats per table: bound it before allocating.
        if !(2..=100_000).contains(&num_train) {
            return Err(cfg.unsupported("num_train_timesteps", num_train, "2 to 100000"));
        }
        let (start, end, beta_default) = kind.default_betas();
        let (beta_start, beta_end) = (
            cfg.f64_or("beta_start", start)?,
            cfg.f64_or("beta_end", end)?,
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
            beta_default,
            &[
                ("linear", BetaSchedule::Linear),
                ("scaled_linear", BetaSchedule::ScaledLinear),
                ("squaredcos_cap_v2", BetaSchedule::SquaredcosCapV2),
            ],
        )?;
        require_null(cfg, "trained_betas")?;
        let mut betas = schedule::betas(beta_schedule, beta_start, beta_end, num_train);
        // PNDMScheduler has no `rescale_betas_zero_snr`; from_config drops it.
        let zero_snr =
            kind != SchedulerKind::Pndm && cfg.bool_or("rescale_betas_zero_snr", false)?;
        if zero_snr {
            betas = schedule::rescale_zero_terminal_snr(&betas);
        }
        let mut alphas_cumprod = schedule::alphas_cumprod(&betas);
        if zero_snr && !kind.indexes_alphas() {
            // Sigma-based kinds avoid an infinite last sigma; DDIM keeps ᾱ = 0.
            *alphas_cumprod.last_mut().unwrap() = 2f32.powi(-24);
        }
        let train_sigmas = alphas_cumprod
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect();
        Ok((num_train, beta_schedule, alphas_cumprod, train_sigmas))
    }

    /// (prediction_type, timestep_spacing), each limited to what `kind` supports.
    fn parse_prediction_spacing(
        cfg: &Config,
        kind: SchedulerKind,
    ) -> Result<(Prediction, Spacing)> {
        use SchedulerKind::*;
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
        Ok((prediction, spacing))
    }

    pub fn kind(&self) -> SchedulerKind {
        self.kind
    }

    /// Training-time ᾱ_t (index = training timestep).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.c.alphas_cumprod
    }

    /// The pipelines' `eta`: DDIM's η (0 is deterministic DDIM) and TCD's γ (0 is
    /// deterministic, at most 1); with η > 0 `step` needs noise. Ignored by the other kinds, as
    /// diffusers pipelines pass `eta` only to schedulers taking it.
    pub fn set_eta(&mut self, eta: f32) {
        self.c.eta = eta;
    }

    /// Whether `step` needs a standard-normal noise tensor (Euler ancestral, LCM, DDIM and TCD
    /// with η > 0). LCM and TCD add none on the last step but take one there too.
    pub fn needs_step_noise(&self) -> bool {
        self.algo.get().needs_step_noise(&self.c)
    }

    /// Builds the schedule for `n` denoising steps and resets the stepping state. PNDM runs
    /// more steps than `n`: `n + 1` (PLMS: the second timestep repeats) or `n + 9` (with its
    /// Runge-Kutta warm-up; needs `n >= 4`).
    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let path = self.c.path.display();
        ensure!(
            (1..=self.c.num_train).contains(&n),
            "{path}: {n} inference steps: must be between 1 and num_train_timesteps ({})",
            self.c.num_train
        );
        let (timesteps, sigmas) = self.algo.get().schedule(&self.c, n)?;
        // numpy's arange can make the trailing spacing one step too long, ending at timestep -1.
        ensure!(
            timesteps.len() == n,
            "{path}: field `timestep_spacing` = \"trailing\" gives {} timesteps for {n} steps in diffusers \
             (numpy arange rounding, last timestep {}); choose another step count",
            timesteps.len(),
            timesteps.last().copied().unwrap_or_default()
        );
        if self.indexes_alphas() {
            // DDIM / PNDM index ᾱ by timestep (leading + steps_offset reaches num_train at n = num_train).
            ensure!(
                timesteps
                    .iter()
                    .all(|&t| t >= 0.0 && (t as usize) < self.c.num_train),
                "{path}: {} timesteps for {n} steps leave 0..{} (steps_offset {})",
                self.kind.class_name(),
                self.c.num_train,
                self.c.steps_offset
            );
        }
        let timesteps = self.algo.get().run_list(&self.c, timesteps)?;
        self.c.num_inference_steps = n;
        self.c.timesteps = timesteps;
        self.c.sigmas = sigmas;
        self.c.begin = 0;
        self.c.begin_index_set = false;
        self.c.steps_done = 0;
        self.algo.get_mut().reset();
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
        self.c.begin = t_start;
        // DDIM / PNDM have no set_begin_index in diffusers; their add_noise indexes ᾱ by timestep.
        self.c.begin_index_set = !self.indexes_alphas();
        Ok(self.c.timesteps[t_start])
    }

    /// The timesteps to run, in order (model inputs); DDIM / DPM / PNDM ones are integers.
    pub fn timesteps(&self) -> &[f32] {
        &self.c.timesteps[self.c.begin.min(self.c.timesteps.len())..]
    }

    /// Euler / DPM: the sigma of each timestep in `timesteps()` plus the final one (empty for
    /// DDIM / PNDM).
    pub fn sigmas(&self) -> &[f32] {
        &self.c.sigmas[self.c.begin.min(self.c.sigmas.len())..]
    }

    /// The factor the pipelines multiply fresh standard-normal latents by.
    pub fn init_noise_sigma(&self) -> f32 {
        self.algo.get().init_noise_sigma(&self.c)
    }

    /// Euler kinds' model-input divisor `√(σ² + 1)` at `step`; None for the others.
    fn input_scale(&self, step: usize) -> Result<Option<f32>> {
        if !self.algo.get().scales_input() {
            return Ok(None);
        }
        let sigma = self.sigmas()[..self.timesteps().len()]
            .get(step)
            .copied()
            .ok_or_else(|| {
                anyhow!("scale_model_input: step {step} out of range (set_timesteps first?)")
            })?;
        Ok(Some((sigma * sigma + 1.0).sqrt()))
    }

    /// The model input for step `step`: Euler kinds divide by `sqrt(σ² + 1)`, others return
    /// the sample unchanged.
    pub fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        Ok(match self.input_scale(step)? {
            None => sample.clone(),
            Some(scale) => Tensor::new(
                sample.shape(),
                sample.data().iter().map(|x| x / scale).collect(),
            ),
        })
    }

    /// `scale_model_input` on tensors anywhere.
    pub fn scale_model_input_ops(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        Ok(match self.input_scale(step)? {
            None => sample.clone(),
            Some(scale) => ops::scale(sample, 1.0 / scale),
        })
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
            !self.c.timesteps.is_empty(),
            "scheduler step before set_timesteps"
        );
        ensure!(
            step == self.c.steps_done && step < self.timesteps().len(),
            "scheduler step {step} out of order: expected step {} of {}",
            self.c.steps_done,
            self.timesteps().len()
        );
        ensure!(
            model_output.shape() == sample.shape(),
            "scheduler step: model output {:?} and sample {:?} differ in shape",
            model_output.shape(),
            sample.shape()
        );
        self.algo.get().check(&self.c)?;
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
        let noise = self.check_step(model_output, step, sample, noise)?;
        let i = self.c.begin + step;
        let out = self
            .algo
            .get_mut()
            .step(&self.c, i, model_output, sample, noise);
        self.c.steps_done += 1;
        Ok(Tensor::new(sample.shape(), out))
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
        let i = self.c.begin + step;
        let out = self
            .algo
            .get_mut()
            .step_ops(&self.c, i, model_output, sample, noise);
        self.c.steps_done += 1;
        Ok(out)
    }

    /// `add_noise`'s (a, b) in `a·original + b·noise` at `timestep`.
    fn add_noise_coeffs(&self, timestep: f32) -> Result<(f32, f32)> {
        Ok(match self.algo.get().noise_form() {
            NoiseForm::Alphas => {
                let a = self.c.alphas_cumprod[self.train_index(timestep)?];
                (a.sqrt(), (1.0 - a).sqrt())
            }
            NoiseForm::Sigma => (1.0, self.c.sigmas[self.noise_index(timestep)?]),
            NoiseForm::AlphaSigma => alpha_sigma(self.c.sigmas[self.noise_index(timestep)?]),
        })
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
        let (a, b) = self.add_noise_coeffs(timestep)?;
        // Written out per form so the float32 expressions stay those diffusers evaluates.
        let out: Vec<f32> = match self.algo.get().noise_form() {
            NoiseForm::Sigma => x.iter().zip(e).map(|(x, e)| x + e * b).collect(),
            _ => x.iter().zip(e).map(|(x, e)| a * x + b * e).collect(),
        };
        Ok(Tensor::new(original.shape(), out))
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
        let (a, b) = self.add_noise_coeffs(timestep)?;
        Ok(ops::lincomb(&[(original, a), (noise, b)]))
    }

    fn indexes_alphas(&self) -> bool {
        self.algo.get().noise_form() == NoiseForm::Alphas
    }

    /// The training timestep `timestep` names, for add_noise by ᾱ.
    fn train_index(&self, timestep: f32) -> Result<usize> {
        let t = timestep as usize;
        ensure!(
            timestep >= 0.0 && t as f32 == timestep && t < self.c.num_train,
            "add_noise: {} timestep {timestep} is not an integer in 0..{}",
            self.kind.class_name(),
            self.c.num_train
        );
        Ok(t)
    }

    fn describe(&self) -> String {
        format!("{} ({})", self.kind, self.c.path.display())
    }

    /// diffusers' add_noise index: begin index + steps taken, or a timestep lookup.
    fn noise_index(&self, timestep: f32) -> Result<usize> {
        let c = &self.c;
        ensure!(!c.timesteps.is_empty(), "add_noise before set_timesteps");
        if c.begin_index_set {
            return Ok(c.begin + c.steps_done);
        }
        let hits: Vec<usize> = (0..c.timesteps.len())
            .filter(|&i| c.timesteps[i] == timestep)
            .collect();
        match hits[..] {
            [] if self.algo.get().noise_form() == NoiseForm::AlphaSigma => {
                Ok(c.timesteps.len() - 1)
            }
            [] => bail!(
                "add_noise: timestep {timestep} is not in the {} schedule",
                self.describe()
            ),
            [i] => Ok(i),
            [_, i, ..] => Ok(i),
        }
    }
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
