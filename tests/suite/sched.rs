//! Schedulers against diffusers goldens (tests/fixtures/golden/sched, made by
//! tools/fixtures/schedulers.py): timesteps exactly, everything else within 1e-5 (abs + rel).

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use toffee::sched::{Scheduler, SchedulerKind};
use toffee::tensor::Tensor;
use toffee::weights::safetensors::read_all;

const TOL: f32 = 1e-5;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden/sched")
}

fn manifest() -> Value {
    serde_json::from_str(&std::fs::read_to_string(golden_dir().join("cases.json")).unwrap())
        .unwrap()
}

/// Largest |got - want| / (1 + |want|); fails above TOL.
fn check_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0.0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / (1.0 + w.abs());
        assert!(
            err <= TOL,
            "{what}[{i}]: got {g}, diffusers {w} (err {err:e})"
        );
        worst = worst.max(err);
    }
    if worst > 0.0 {
        eprintln!("{what}: max err {worst:.2e}");
    }
}

/// Integral timesteps exactly; fractional ones (Euler Karras: `_sigma_to_t` on numpy's float32
/// log, which is not correctly rounded) to within a few f32 ulps.
fn check_timesteps(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: {got:?} vs diffusers {want:?}"
    );
    for (g, w) in got.iter().zip(want) {
        let ok = if w.fract() == 0.0 {
            g == w
        } else {
            (g - w).abs() <= 1e-6 * w.abs()
        };
        assert!(ok, "{what}: {got:?} vs diffusers {want:?}");
        if g != w {
            eprintln!("{what}: {g} vs diffusers {w}");
        }
    }
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Row `i` of a per-step stack [n, ...].
fn row(t: &Tensor, i: usize) -> Tensor {
    t.narrow0(i, 1).reshape(&t.shape()[1..])
}

fn build(case: &Value) -> Scheduler {
    let kind = case["override"]
        .as_str()
        .map(|k| k.parse::<SchedulerKind>().unwrap());
    let mut s =
        Scheduler::from_config(&golden_dir().join(case["config"].as_str().unwrap()), kind).unwrap();
    assert_eq!(
        s.kind().class_name(),
        case["class_name"],
        "{}: class",
        case["name"]
    );
    s.set_eta(case["eta"].as_f64().unwrap() as f32);
    s
}

/// The pipelines' denoising loop from `sample`, checked against the golden at every step.
fn run_chain(
    name: &str,
    s: &mut Scheduler,
    t: &BTreeMap<String, Tensor>,
    sample: &Tensor,
    prefix: &str,
) {
    let mut x = sample.clone();
    for i in 0..s.timesteps().len() {
        let scaled = s.scale_model_input(&x, i).unwrap();
        match t.get(&format!("{prefix}scaled")) {
            Some(want) => check_close(
                &format!("{name}: {prefix}scaled[{i}]"),
                scaled.data(),
                row(want, i).data(),
            ),
            None => assert_eq!(
                scaled.data(),
                x.data(),
                "{name}: scale_model_input changed the sample"
            ),
        }
        let noise = t.get("noise").map(|n| row(n, i));
        assert_eq!(
            s.needs_step_noise(),
            noise.is_some(),
            "{name}: needs_step_noise"
        );
        x = s
            .step(&row(&t["model_output"], i), i, &x, noise.as_ref())
            .unwrap();
        check_close(
            &format!("{name}: {prefix}prev[{i}]"),
            x.data(),
            row(&t[&format!("{prefix}prev")], i).data(),
        );
    }
}

fn run_case(name: &str) {
    let m = manifest();
    let case = m["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name}"));
    let n = case["steps"].as_u64().unwrap() as usize;
    let t = read_all(&golden_dir().join(case["tensors"].as_str().unwrap())).unwrap();

    let mut s = build(case);
    s.set_timesteps(n).unwrap();
    check_timesteps(
        &format!("{name}: timesteps"),
        s.timesteps(),
        &f32s(&case["timesteps"]),
    );
    match &case["sigmas"] {
        Value::Null => assert!(s.sigmas().is_empty()),
        sigmas => check_close(&format!("{name}: sigmas"), s.sigmas(), &f32s(sigmas)),
    }
    let init = case["init_noise_sigma"].as_f64().unwrap() as f32;
    check_close(
        &format!("{name}: init_noise_sigma"),
        &[s.init_noise_sigma()],
        &[init],
    );
    run_chain(name, &mut s, &t, &t["sample"], "");

    for (k, ts) in case["add_noise_timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let mut s = build(case);
        s.set_timesteps(n).unwrap();
        // Our own copy of a fractional (Karras) timestep, which may differ from diffusers' in an ulp.
        let want = ts.as_f64().unwrap() as f32;
        let ts = s
            .timesteps()
            .iter()
            .copied()
            .find(|t| (t - want).abs() <= 1e-6 * want.abs())
            .unwrap_or(want);
        let got = s
            .add_noise(&t["add_noise.original"], &t["add_noise.noise"], ts)
            .unwrap();
        check_close(
            &format!("{name}: add_noise({ts})"),
            got.data(),
            t[&format!("add_noise.{k}")].data(),
        );
    }

    for entry in case["img2img"].as_array().unwrap() {
        let strength = entry["strength"].as_f64().unwrap();
        let mut s = build(case);
        let start = s.set_timesteps_img2img(n, strength).unwrap();
        let what = format!("{name}: img2img {strength} timesteps");
        check_timesteps(
            &what,
            &[start],
            &[entry["latent_timestep"].as_f64().unwrap() as f32],
        );
        check_timesteps(&what, s.timesteps(), &f32s(&entry["timesteps"]));
        let noised = s
            .add_noise(&t["img2img.init"], &t["img2img.noise"], start)
            .unwrap();
        check_close(
            &format!("{name}: img2img {strength} noised"),
            noised.data(),
            t[&format!("img2img.{strength}.noised")].data(),
        );
        if entry["chain"] == true {
            run_chain(name, &mut s, &t, &noised, "img2img.");
        }
    }
}

macro_rules! golden_cases {
    ($($name:ident),* $(,)?) => {
        $( #[test] fn $name() { run_case(stringify!($name)); } )*
        #[test]
        fn every_golden_case_has_a_test() {
            let m = manifest();
            let names: Vec<&str> = m["cases"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
            assert_eq!(names, [$(stringify!($name)),*]);
        }
    };
}

golden_cases!(
    ddim_sd1,
    ddim_sd1_eta,
    ddim_sd2_v,
    ddim_linear_clip_linspace,
    ddim_trailing_zsnr_v,
    ddim_from_pndm,
    ddim_from_sdxl,
    euler_sdxl,
    euler_linspace,
    euler_trailing_v_zsnr,
    euler_sd2_v,
    euler_karras,
    euler_karras_range_sample,
    euler_a_sd1,
    euler_a_sd2_v,
    euler_a_linspace,
    dpmpp_2m_sd1,
    dpmpp_2m_karras_sd1_25,
    dpmpp_2m_karras_sdxl,
    dpmpp_2m_v_linspace,
    dpmpp_2m_trailing_sigma_min_20,
    dpmpp_2m_cos_sample,
    pndm_sd15,
    pndm_sd15_25,
    pndm_v_linspace,
    pndm_trailing_alpha_one,
    pndm_prk_sd1,
    pndm_prk_sd1_4,
    pndm_prk_sd2_v,
    pndm_prk_trailing_zsnr_v,
    unipc_sd1,
    unipc_from_sdxl,
    unipc_o3,
    unipc_o1_trailing,
    unipc_bh1_sigma_min,
    unipc_karras_v,
    unipc_sigma_min_o3,
    lcm_sd15_4,
    lcm_sd15_8,
    lcm_o100_ts5_v_clip_6,
    lcm_from_sd1,
    tcd_gamma03_4,
    tcd_gamma0_4,
    tcd_sd2_v_gamma07_6,
);

#[test]
fn alphas_cumprod_per_beta_schedule() {
    let want = read_all(&golden_dir().join("schedules.safetensors")).unwrap();
    assert_eq!(want.len(), 4);
    for (config, ac) in &want {
        let path = golden_dir().join(format!("configs/{config}.json"));
        let s = Scheduler::from_config(&path, Some(SchedulerKind::Ddim)).unwrap();
        check_close(
            &format!("{config}: alphas_cumprod"),
            s.alphas_cumprod(),
            ac.data(),
        );
    }
}

#[test]
fn kind_names_round_trip() {
    for k in SchedulerKind::ALL {
        assert_eq!(k.to_string().parse::<SchedulerKind>().unwrap(), k);
    }
    let err = "dpm++".parse::<SchedulerKind>().unwrap_err().to_string();
    assert!(
        err.contains("dpm++") && err.contains("dpmpp-2m-karras"),
        "{err}"
    );
}

/// The repository's pipeline fixtures load with every scheduler and run a few steps.
#[test]
fn fixture_pipelines_load_with_every_kind() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for model in ["sd1", "sd2", "sdxl"] {
        let path = root.join(model).join("scheduler/scheduler_config.json");
        let native = Scheduler::from_config(&path, None).unwrap();
        assert!(matches!(
            native.kind(),
            SchedulerKind::Ddim | SchedulerKind::Euler
        ));
        for kind in SchedulerKind::ALL {
            let mut s = Scheduler::from_config(&path, Some(kind)).unwrap();
            assert_eq!(s.kind(), kind);
            s.set_timesteps(4).unwrap();
            let mut x = Tensor::new(
                [1, 2, 2, 4],
                (0..16).map(|i| i as f32 / 8.0 - 1.0).collect(),
            );
            let noise = s.needs_step_noise().then(|| x.clone());
            for i in 0..4 {
                let eps = s.scale_model_input(&x, i).unwrap();
                x = s.step(&eps, i, &x, noise.as_ref()).unwrap();
            }
            assert!(x.data().iter().all(|v| v.is_finite()), "{model}/{kind}");
        }
    }
}

/// The pipeline overrides fix the DPM variant whatever the config's own DPM settings.
#[test]
fn dpm_override_replaces_variant() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(golden_dir().join("configs/dpm_v_linspace.json")).unwrap();
    let base =
        Scheduler::from_config(&golden_dir().join("configs/dpm_v_linspace.json"), None).unwrap();
    let variant = text
        .replace(
            "\"use_karras_sigmas\": false",
            "\"use_karras_sigmas\": true",
        )
        .replace(
            "\"algorithm_type\": \"dpmsolver++\"",
            "\"algorithm_type\": \"sde-dpmsolver++\"",
        )
        .replace("\"solver_order\": 2", "\"solver_order\": 3");
    let path = dir.path().join("scheduler_config.json");
    std::fs::write(&path, variant).unwrap();
    assert!(Scheduler::from_config(&path, None).is_err());
    let mut plain = Scheduler::from_config(&path, Some(SchedulerKind::DpmPp2m)).unwrap();
    let mut karras = Scheduler::from_config(&path, Some(SchedulerKind::DpmPp2mKarras)).unwrap();
    let mut base = base;
    for s in [&mut plain, &mut karras, &mut base] {
        s.set_timesteps(10).unwrap();
    }
    assert_eq!(plain.timesteps(), base.timesteps());
    assert_eq!(plain.sigmas(), base.sigmas());
    assert_ne!(karras.timesteps(), base.timesteps());
}

fn write_config(dir: &Path, json: &str) -> PathBuf {
    let path = dir.join("scheduler_config.json");
    std::fs::write(&path, json).unwrap();
    path
}

/// Errors name the file and (where one is at fault) the field.
#[test]
fn config_errors_name_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let sd = r#""beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012"#;
    let cases: &[(&str, Option<SchedulerKind>, &str)] = &[
        (
            r#"{"_class_name": "LMSDiscreteScheduler"}"#,
            None,
            "_class_name",
        ),
        // diffusers' PNDM raises ValueError at the first step for anything else.
        (
            r#"{"_class_name": "PNDMScheduler", "prediction_type": "sample"}"#,
            None,
            "prediction_type",
        ),
        (
            r#"{"_class_name": "DDIMScheduler", "prediction_type": "sample"}"#,
            Some(SchedulerKind::Pndm),
            "prediction_type",
        ),
        (
            r#"{"_class_name": "PNDMScheduler", "skip_prk_steps": "yes"}"#,
            None,
            "skip_prk_steps",
        ),
        (r#"{"beta_schedule": "linear"}"#, None, "_class_name"),
        (
            r#"{"_class_name": "DDIMScheduler", "prediction_type": "foo"}"#,
            None,
            "prediction_type",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "bar"}"#,
            None,
            "timestep_spacing",
        ),
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}"#,
            None,
            "algorithm_type",
        ),
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}"#,
            None,
            "solver_order",
        ),
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "solver_type": "heun"}"#,
            None,
            "solver_type",
        ),
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -5.1}"#,
            None,
            "lambda_min_clipped",
        ),
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "variance_type": "learned_range"}"#,
            None,
            "variance_type",
        ),
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "use_lu_lambdas": true}"#,
            None,
            "use_lu_lambdas",
        ),
        (
            r#"{"_class_name": "DDIMScheduler", "beta_schedule": "sigmoid"}"#,
            None,
            "beta_schedule",
        ),
        (
            r#"{"_class_name": "DDIMScheduler", "thresholding": true}"#,
            None,
            "thresholding",
        ),
        (
            r#"{"_class_name": "DDIMScheduler", "trained_betas": [0.1, 0.2]}"#,
            None,
            "trained_betas",
        ),
        (
            r#"{"_class_name": "DDIMScheduler", "steps_offset": -1}"#,
            None,
            "steps_offset",
        ),
        (
            r#"{"_class_name": "DDIMScheduler", "clip_sample": "yes"}"#,
            None,
            "clip_sample",
        ),
        (
            r#"{"_class_name": "DDIMScheduler", "num_train_timesteps": 1}"#,
            None,
            "num_train_timesteps",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "interpolation_type": "log_linear"}"#,
            None,
            "interpolation_type",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "use_exponential_sigmas": true}"#,
            None,
            "use_exponential_sigmas",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "final_sigmas_type": "one"}"#,
            None,
            "final_sigmas_type",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "sigma_min": "small"}"#,
            None,
            "sigma_min",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "timestep_type": "continuous", "prediction_type": "v_prediction"}"#,
            None,
            "timestep_type",
        ),
        // Euler ancestral has no "sample" prediction in diffusers, even when overridden to.
        (
            r#"{"_class_name": "DDIMScheduler", "prediction_type": "sample"}"#,
            Some(SchedulerKind::EulerAncestral),
            "prediction_type",
        ),
        (
            r#"{"_class_name": "LCMScheduler", "original_inference_steps": 2000}"#,
            None,
            "original_inference_steps",
        ),
        (
            r#"{"_class_name": "LCMScheduler", "thresholding": true}"#,
            None,
            "thresholding",
        ),
        (
            r#"{"_class_name": "UniPCMultistepScheduler", "predict_x0": false}"#,
            None,
            "predict_x0",
        ),
        (
            r#"{"_class_name": "UniPCMultistepScheduler", "solver_order": 4}"#,
            None,
            "solver_order",
        ),
        (
            r#"{"_class_name": "UniPCMultistepScheduler", "disable_corrector": [0]}"#,
            None,
            "disable_corrector",
        ),
        // diffusers' last step is NaN with bh1 down to sigma 0.
        (
            r#"{"_class_name": "UniPCMultistepScheduler", "solver_type": "bh1"}"#,
            None,
            "solver_type",
        ),
        // An override still validates the fields its class reads.
        (
            r#"{"_class_name": "PNDMScheduler", "timestep_spacing": "bar"}"#,
            Some(SchedulerKind::Ddim),
            "timestep_spacing",
        ),
    ];
    for (json, kind, field) in cases {
        let json = json.replacen('{', &format!("{{{sd}, "), 1);
        let path = write_config(dir.path(), &json);
        let err = match Scheduler::from_config(&path, *kind) {
            Ok(_) => panic!("{json}: accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains(&path.display().to_string()),
            "{json}: error does not name the file: {err}"
        );
        assert!(
            err.contains(&format!("`{field}`")),
            "{json}: error does not name `{field}`: {err}"
        );
    }
    // Not JSON at all / missing file.
    let path = write_config(dir.path(), "{\"_class_name\": ");
    let err = format!("{:#}", Scheduler::from_config(&path, None).err().unwrap());
    assert!(
        err.contains(&path.display().to_string()) && err.contains("not valid JSON"),
        "{err}"
    );
    let missing = dir.path().join("nope.json");
    let err = format!(
        "{:#}",
        Scheduler::from_config(&missing, None).err().unwrap()
    );
    assert!(err.contains("nope.json"), "{err}");
}

/// `-Infinity` (as diffusers writes DPM's lambda_min_clipped) parses, also next to tricky strings.
#[test]
fn non_finite_literals_in_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        r#"{"_class_name": "DPMSolverMultistepScheduler", "note": "say \"NaN\" -Infinity", "lambda_min_clipped": -Infinity}"#,
    );
    Scheduler::from_config(&path, None).unwrap();
    // What diffusers' save_config writes for DPM, which `Config::read` rejects.
    let dpm = golden_dir().join("configs/dpm_v_linspace.json");
    assert!(toffee::config::Config::read(&dpm).is_err());
    let cfg = toffee::sched::read_config(&dpm).unwrap();
    Scheduler::from_config_json(&cfg, None).unwrap();
    let path = write_config(
        dir.path(),
        r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": NaN}"#,
    );
    let err = format!("{:#}", Scheduler::from_config(&path, None).err().unwrap());
    assert!(err.contains("`lambda_min_clipped`"), "{err}");
}

#[test]
fn step_count_errors() {
    let path = golden_dir().join("configs/sd1_ddim.json");
    for kind in SchedulerKind::ALL {
        let mut s = Scheduler::from_config(&path, Some(kind)).unwrap();
        for n in [0, 1001] {
            let err = format!("{:#}", s.set_timesteps(n).unwrap_err());
            assert!(
                err.contains("sd1_ddim.json") && err.contains("inference steps"),
                "{kind} {n}: {err}"
            );
        }
        // LCM / TCD take at most original_inference_steps (50 by default).
        if matches!(kind, SchedulerKind::Lcm | SchedulerKind::Tcd) {
            let err = format!("{:#}", s.set_timesteps(51).unwrap_err());
            assert!(
                err.contains("sd1_ddim.json") && err.contains("`original_inference_steps`"),
                "{kind}: {err}"
            );
            s.set_timesteps(50).unwrap();
            s.set_timesteps(1).unwrap();
            assert_eq!(s.timesteps(), [999.0]);
            continue;
        }
        // leading + steps_offset 1 would index ᾱ[1000] for DDIM / PNDM; the others interpolate.
        let indexes_alphas = matches!(kind, SchedulerKind::Ddim | SchedulerKind::Pndm);
        assert_eq!(s.set_timesteps(1000).is_ok(), !indexes_alphas, "{kind}");
        if indexes_alphas {
            let err = format!("{:#}", s.set_timesteps(1000).unwrap_err());
            assert!(err.contains("leave 0..1000"), "{kind}: {err}");
        }
        if kind == SchedulerKind::Pndm {
            // This config lacks skip_prk_steps: PNDM's Runge-Kutta warm-up, 4 steps at least.
            let err = format!("{:#}", s.set_timesteps(3).unwrap_err());
            assert!(
                err.contains("sd1_ddim.json") && err.contains("`skip_prk_steps`"),
                "{err}"
            );
            s.set_timesteps(4).unwrap();
            assert_eq!(s.timesteps().len(), 13);
            continue;
        }
        s.set_timesteps(1).unwrap();
        assert_eq!(s.timesteps().len(), 1);
    }
    // numpy's arange makes 62 trailing timesteps for 61 steps, the last one -1.
    let path = golden_dir().join("configs/euler_trailing_v_zsnr.json");
    let mut s = Scheduler::from_config(&path, None).unwrap();
    let err = format!("{:#}", s.set_timesteps(61).unwrap_err());
    assert!(
        err.contains("`timestep_spacing`") && err.contains("62 timesteps"),
        "{err}"
    );
    s.set_timesteps(60).unwrap();
}

#[test]
fn misuse_is_an_error_not_a_panic() {
    let x = Tensor::zeros([1, 4, 2, 2]);
    let path = golden_dir().join("configs/sd1_ddim.json");

    let mut s = Scheduler::from_config(&path, Some(SchedulerKind::DpmPp2m)).unwrap();
    assert!(
        s.step(&x, 0, &x, None).is_err(),
        "step before set_timesteps"
    );
    assert!(
        s.add_noise(&x, &x, 901.0).is_err(),
        "add_noise before set_timesteps"
    );
    s.set_timesteps(10).unwrap();
    assert!(s.step(&x, 1, &x, None).is_err(), "out of order");
    assert!(
        s.step(&Tensor::zeros([1, 4, 2, 3]), 0, &x, None).is_err(),
        "shape mismatch"
    );
    assert!(
        s.add_noise(&x, &Tensor::zeros([4]), 901.0).is_err(),
        "add_noise shape mismatch"
    );
    assert!(s.scale_model_input(&x, 10).is_ok(), "DPM does not scale");
    for i in 0..10 {
        s.step(&x, i, &x, None).unwrap();
    }
    assert!(s.step(&x, 10, &x, None).is_err(), "past the end");
    // DPM falls back to the last sigma for an unknown timestep, as diffusers does.
    s.add_noise(&x, &x, 5.0).unwrap();

    let mut s = Scheduler::from_config(&path, Some(SchedulerKind::EulerAncestral)).unwrap();
    s.set_timesteps(10).unwrap();
    assert!(s.scale_model_input(&x, 10).is_err());
    assert!(
        s.step(&x, 0, &x, None).is_err(),
        "ancestral step without noise"
    );
    assert!(
        s.step(&x, 0, &x, Some(&Tensor::zeros([2]))).is_err(),
        "noise shape"
    );
    assert!(
        s.add_noise(&x, &x, 900.0).is_err(),
        "Euler add_noise at a timestep not in the schedule"
    );
    s.step(&x, 0, &x, Some(&x)).unwrap();

    let mut s = Scheduler::from_config(&path, None).unwrap();
    s.set_timesteps(10).unwrap();
    assert!(!s.needs_step_noise());
    s.set_eta(1.0);
    assert!(s.needs_step_noise());
    assert!(
        s.step(&x, 0, &x, None).is_err(),
        "DDIM eta > 0 without noise"
    );
    for t in [0.5, -1.0, 1000.0, f32::NAN] {
        assert!(s.add_noise(&x, &x, t).is_err(), "DDIM add_noise at {t}");
    }
    for strength in [0.0, 0.05, -0.1, 1.5, f64::NAN] {
        assert!(
            s.set_timesteps_img2img(10, strength).is_err(),
            "strength {strength}"
        );
    }
    assert_eq!(s.set_timesteps_img2img(10, 1.0).unwrap(), 901.0);
    assert_eq!(s.timesteps().len(), 10);
}

/// TCD's γ is the pipelines' eta, which diffusers asserts is in [0, 1].
#[test]
fn tcd_gamma_out_of_range_is_an_error() {
    let path = golden_dir().join("configs/tcd.json");
    let mut s = Scheduler::from_config(&path, None).unwrap();
    assert_eq!(s.kind(), SchedulerKind::Tcd);
    s.set_timesteps(4).unwrap();
    let x = Tensor::zeros([1, 4, 2, 2]);
    s.set_eta(1.5);
    let err = format!("{:#}", s.step(&x, 0, &x, Some(&x)).unwrap_err());
    assert!(err.contains("tcd.json") && err.contains("gamma"), "{err}");
    s.set_eta(1.0);
    s.step(&x, 0, &x, Some(&x)).unwrap();
}

/// SD1.5's own config runs as PNDM without an override; schedule edge cases and misuse.
#[test]
fn pndm_from_sd15_config() {
    let path = golden_dir().join("configs/sd15_pndm.json");
    let mut s = Scheduler::from_config(&path, None).unwrap();
    assert_eq!(s.kind(), SchedulerKind::Pndm);
    assert_eq!(s.init_noise_sigma(), 1.0);
    assert!(!s.needs_step_noise());
    // PLMS repeats the second timestep; one step has nothing to repeat.
    s.set_timesteps(2).unwrap();
    assert_eq!(s.timesteps(), [501.0, 1.0, 1.0]);
    s.set_timesteps(1).unwrap();
    assert_eq!(s.timesteps(), [1.0]);
    let x = Tensor::new(
        [1, 4, 2, 2],
        (0..16).map(|i| i as f32 / 8.0 - 1.0).collect(),
    );
    assert_eq!(s.scale_model_input(&x, 0).unwrap().data(), x.data());
    // The only step goes below timestep 0: to ᾱ_0, as set_alpha_to_one is false.
    let out = s.step(&x, 0, &x, None).unwrap();
    assert!(out.data().iter().all(|v| v.is_finite()));
    assert!(s.step(&x, 1, &out, None).is_err(), "past the end");

    // An override and the native class agree; every kind loads from this config.
    let mut named = Scheduler::from_config(&path, Some(SchedulerKind::Pndm)).unwrap();
    named.set_timesteps(10).unwrap();
    s.set_timesteps(10).unwrap();
    assert_eq!(named.timesteps(), s.timesteps());
    for kind in SchedulerKind::ALL {
        let mut k = Scheduler::from_config(&path, Some(kind)).unwrap();
        assert_eq!(k.kind(), kind);
        k.set_timesteps(10).unwrap();
    }

    // img2img skips n - n·strength entries of the 11: the repeat comes later, or not at all.
    assert_eq!(s.set_timesteps_img2img(10, 1.0).unwrap(), 901.0);
    assert_eq!(s.timesteps().len(), 11);
    // One step's worth keeps two: the second redoes the first, ending at timestep 1, not 0.
    assert_eq!(s.set_timesteps_img2img(10, 0.1).unwrap(), 101.0);
    assert_eq!(s.timesteps(), [101.0, 1.0]);
    assert!(s.set_timesteps_img2img(10, 0.05).is_err(), "no step left");
    for t in [0.5, -1.0, 1000.0] {
        assert!(s.add_noise(&x, &x, t).is_err(), "add_noise at {t}");
    }
    // add_noise takes any training timestep, as DDIM's does.
    s.add_noise(&x, &x, 999.0).unwrap();
}
