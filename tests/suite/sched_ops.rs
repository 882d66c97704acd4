//! The tensor-level scheduler updates (`step_ops`, used on GPUs) agree with the elementwise
//! reference (`step`, checked against diffusers in tests/sched.rs).

use std::path::Path;
use toffee::sched::{Scheduler, SchedulerKind};
use toffee::tensor::Tensor;

fn rand(seed: u64, n: usize, scale: f32) -> Tensor {
    Tensor::new(
        vec![1, 4, 4, n / 16],
        toffee::rng::normal(seed, 0, n)
            .into_iter()
            .map(|v| v * scale)
            .collect(),
    )
}

/// Runs `step` and `step_ops` side by side over a 6-step schedule (img2img with `strength`).
fn check(cfg: &Path, kind: SchedulerKind, strength: Option<f64>) {
    check_eta(cfg, kind, strength, 0.0)
}

fn check_eta(cfg: &Path, kind: SchedulerKind, strength: Option<f64>, eta: f32) {
    let what = format!("{} {kind} strength {strength:?} eta {eta}", cfg.display());
    let mut a = Scheduler::from_config(cfg, Some(kind)).unwrap();
    let mut b = Scheduler::from_config(cfg, Some(kind)).unwrap();
    a.set_eta(eta);
    b.set_eta(eta);
    let t0 = match strength {
        None => {
            a.set_timesteps(6).unwrap();
            b.set_timesteps(6).unwrap();
            None
        }
        Some(s) => {
            a.set_timesteps_img2img(6, s).unwrap();
            Some(b.set_timesteps_img2img(6, s).unwrap())
        }
    };
    let mut xa = rand(1, 64, a.init_noise_sigma());
    if let Some(t) = t0 {
        let e = rand(9, 64, 1.0);
        let x0 = rand(8, 64, 1.0);
        xa = a.add_noise(&x0, &e, t).unwrap();
        let xb = b.add_noise_ops(&x0, &e, t).unwrap();
        assert!(xa.max_abs_diff(&xb) < 1e-5, "{what}: add_noise");
    }
    let mut xb = xa.clone();
    for i in 0..a.timesteps().len() {
        let sa = a.scale_model_input(&xa, i).unwrap();
        let sb = b.scale_model_input_ops(&xb, i).unwrap();
        let scale = sa.data().iter().fold(1.0f32, |s, v| s.max(v.abs()));
        assert!(
            sa.max_abs_diff(&sb) <= 1e-5 * scale,
            "{what}: scale_model_input"
        );
        let m = rand(100 + i as u64, 64, 1.0);
        let noise = a.needs_step_noise().then(|| rand(200 + i as u64, 64, 1.0));
        xa = a.step(&m, i, &xa, noise.as_ref()).unwrap();
        xb = b.step_ops(&m, i, &xb, noise.as_ref()).unwrap();
        let scale = xa.data().iter().fold(1.0f32, |s, v| s.max(v.abs()));
        let err = xa.max_abs_diff(&xb);
        assert!(
            err <= 1e-5 * scale,
            "{what}: step {i}: {err:e} (scale {scale})"
        );
    }
}

#[test]
fn step_ops_matches_step() {
    for model in ["sd1", "sd2", "sdxl"] {
        let cfg = crate::common::fixtures()
            .join(model)
            .join("scheduler/scheduler_config.json");
        for kind in SchedulerKind::ALL {
            for strength in [None, Some(0.6)] {
                check(&cfg, kind, strength);
            }
        }
    }
}

/// PNDM's PLMS-only configs (the fixtures' DDIM configs give its Runge-Kutta warm-up), with
/// epsilon and v-prediction; img2img at 0.3 starts past the repeated timestep.
#[test]
fn pndm_step_ops_matches_step() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden/sched/configs");
    for config in ["sd15_pndm", "pndm_v_linspace"] {
        let cfg = golden.join(format!("{config}.json"));
        for strength in [None, Some(0.6), Some(0.3)] {
            check(&cfg, SchedulerKind::Pndm, strength);
        }
    }
}

/// The new schedulers' golden configs: UniPC orders 1 to 3 (bh1, Karras, sigma_min end),
/// LCM with clipping and v-prediction, TCD with γ > 0 (step noise) and DDIM with η > 0.
#[test]
fn few_step_and_unipc_step_ops_match_step() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden/sched/configs");
    let cases: &[(&str, SchedulerKind, f32)] = &[
        ("unipc_o3", SchedulerKind::UniPc, 0.0),
        ("unipc_o1_trailing", SchedulerKind::UniPc, 0.0),
        ("unipc_bh1_sigma_min", SchedulerKind::UniPc, 0.0),
        ("unipc_karras_v", SchedulerKind::UniPc, 0.0),
        ("unipc_sigma_min_o3", SchedulerKind::UniPc, 0.0),
        ("lcm_o100_ts5_v_clip", SchedulerKind::Lcm, 0.0),
        ("tcd", SchedulerKind::Tcd, 0.3),
        ("sd2_ddim_v", SchedulerKind::Tcd, 1.0),
        ("sd1_ddim", SchedulerKind::Ddim, 0.7),
    ];
    for &(config, kind, eta) in cases {
        let cfg = golden.join(format!("{config}.json"));
        for strength in [None, Some(0.6)] {
            check_eta(&cfg, kind, strength, eta);
        }
    }
}
