//! Noise-schedule arithmetic, reproducing the exact float path diffusers takes: betas and
//! alphas_cumprod are torch float32 tensors, timestep spacings are numpy float64 arrays,
//! sigma interpolation is `np.interp` in float64, Karras sigmas are float64 numpy.

/// How betas are laid out over the training timesteps (`beta_schedule`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    /// Glide cosine schedule (`betas_for_alpha_bar`, max beta 0.999).
    SquaredcosCapV2,
}

/// `torch.linspace(start, end, n, dtype=float32)` as torch's (AVX2/AVX512) CPU kernel computes
/// it: the step in float32, the first half counted up from `start`, the second half down from
/// `end`, each entry one fused multiply-add (the kernel is compiled with FP contraction; plain
/// multiply-then-add differs from torch in the last bit for ~15% of the betas).
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    (0..n)
        .map(|i| {
            if i < n / 2 {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - i - 1) as f32, end)
            }
        })
        .collect()
}

/// `torch.cumprod` of a float32 tensor: the CPU kernel accumulates in float64.
fn cumprod(alphas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    alphas
        .iter()
        .map(|&a| {
            acc *= a as f64;
            acc as f32
        })
        .collect()
}

pub fn betas(schedule: BetaSchedule, beta_start: f64, beta_end: f64, n: usize) -> Vec<f32> {
    match schedule {
        BetaSchedule::Linear => torch_linspace_f32(beta_start, beta_end, n),
        BetaSchedule::ScaledLinear => torch_linspace_f32(beta_start.sqrt(), beta_end.sqrt(), n)
            .into_iter()
            .map(|b| b * b)
            .collect(),
        BetaSchedule::SquaredcosCapV2 => {
            // Python floats, then torch.tensor(..., float32).
            let alpha_bar = |t: f64| {
                let c = ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
                c * c
            };
            (0..n)
                .map(|i| {
                    let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                    (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                })
                .collect()
        }
    }
}

/// `rescale_zero_terminal_snr` (arXiv 2305.08891, Algorithm 1) on float32 betas.
pub fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt: Vec<f32> = cumprod(&alphas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt[0], sqrt[sqrt.len() - 1]);
    let scale = first / (first - last);
    for s in &mut sqrt {
        *s -= last;
        *s *= scale;
    }
    let bar: Vec<f32> = sqrt.iter().map(|s| s * s).collect();
    (0..bar.len())
        .map(|i| 1.0 - if i == 0 { bar[0] } else { bar[i] / bar[i - 1] })
        .collect()
}

pub fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    cumprod(&betas.iter().map(|b| 1.0 - b).collect::<Vec<_>>())
}

/// `np.linspace(start, stop, num)`: `i * step + start` in float64, the last entry set to `stop`.
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// `np.arange(start, 0, -step)` for a float step: length `ceil(-start / -step)`, entries
/// `start + i * delta` with `delta = (start - step) - start`. The length can come out one too
/// long (e.g. 1000 / 61), which the trailing spacing then turns into a timestep of -1.
pub fn np_arange_down(start: f64, step: f64) -> Vec<f64> {
    let len = ((0.0 - start) / -step).ceil().max(0.0) as usize;
    let second = start + -step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, np.arange(len(fp)), fp)` in float64 (numpy's `arr_interp`).
pub fn np_interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x < 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    let (y0, y1) = (fp[j] as f64, fp[j + 1] as f64);
    if j as f64 == x {
        return y0;
    }
    let slope = y1 - y0; // xp spacing is 1
    let y = slope * (x - j as f64) + y0;
    if !y.is_nan() {
        return y;
    }
    let y = slope * (x - (j + 1) as f64) + y1;
    if y.is_nan() && y0 == y1 {
        y0
    } else {
        y
    }
}

/// Karras et al. (2022) sigmas, rho 7: float64 numpy in diffusers' `_convert_to_karras`.
pub fn karras(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of `sigma`, interpolating
/// log-sigmas. `log_sigmas` is `np.log` of the float32 training sigmas (float32); the bracket
/// width `low - high` is a float32 subtraction, the rest float64.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // Last index whose log-sigma is <= log_sigma (0 when none), kept below the final index.
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len() - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo as f64 - log_sigma) / (lo - hi) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}
