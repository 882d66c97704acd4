//! What the UNet predicts (diffusers' `prediction_type`: ε, v or the sample) and how every
//! scheduler turns that output into the predicted original sample and noise.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Prediction {
    Epsilon,
    V,
    Sample,
}

impl Prediction {
    /// diffusers' `pred_original_sample` and `pred_epsilon` of model output `m` at sample
    /// `x = a·x0 + s·ε` (a = √ᾱ or the flow's alpha, s = √(1-ᾱ) or sigma): one rule for every
    /// scheduler that converts the output elementwise.
    pub(super) fn x0_eps(self, m: f32, x: f32, a: f32, s: f32) -> (f32, f32) {
        match self {
            Prediction::Epsilon => ((x - s * m) / a, m),
            Prediction::Sample => (m, (x - a * m) / s),
            Prediction::V => (a * x - s * m, a * m + s * x),
        }
    }

    /// `pred_original_sample` alone (the first of `x0_eps`).
    pub(super) fn x0(self, m: f32, x: f32, a: f32, s: f32) -> f32 {
        match self {
            Prediction::Epsilon => (x - s * m) / a,
            Prediction::Sample => m,
            Prediction::V => a * x - s * m,
        }
    }

    /// (ea, eb) with `pred_epsilon = ea·x + eb·m`: `x0_eps`'s second half as the coefficients
    /// of a linear combination (the device path).
    pub(super) fn eps_coeffs(self, a: f32, s: f32) -> (f32, f32) {
        match self {
            Prediction::Epsilon => (0.0, 1.0),
            Prediction::Sample => (1.0 / s, -a / s),
            Prediction::V => (s, a),
        }
    }

    /// (x0a, x0b) with `pred_original_sample = x0a·x + x0b·m`: `x0` as the coefficients of a
    /// linear combination (the device path).
    pub(super) fn x0_coeffs(self, a: f32, s: f32) -> (f32, f32) {
        match self {
            Prediction::Epsilon => (1.0 / a, -s / a),
            Prediction::Sample => (0.0, 1.0),
            Prediction::V => (a, -s),
        }
    }
}
