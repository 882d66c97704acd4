//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// tests/fixtures; TOFFEE_FIXTURES overrides it for test executables run on another machine
/// (tools/device/run.sh), where the build's path does not exist.
pub fn fixtures() -> PathBuf {
    match std::env::var_os("TOFFEE_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}

pub fn golden(name: &str) -> PathBuf {
    fixtures().join("golden").join(name)
}

/// Runs the `toffee` binary.
/// Runs the `toffee` binary (TOFFEE_BIN overrides the path cargo built it at).
pub fn toffee(args: &[&str]) -> Output {
    let bin = std::env::var_os("TOFFEE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_toffee")));
    Command::new(bin)
        .args(args)
        .output()
        .expect("the toffee binary runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Copies a folder tree, following symlinks, so tests can damage the copy.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let dst = to.join(e.file_name());
        if std::fs::metadata(&p).unwrap().is_dir() {
            copy_tree(&p, &dst);
        } else {
            std::fs::copy(&p, &dst).unwrap();
        }
    }
}

/// The 4-step CFG 7.5 request (two prompts, 64², seed 3) the cross-backend and precision tests run.
pub fn pipeline_request(
    init: toffee::pipeline::Init,
    control: Option<toffee::pipeline::Control>,
) -> toffee::pipeline::Request {
    toffee::pipeline::Request {
        prompts: vec!["a cat".into(), "a red car".into()],
        negative: None,
        images_per_prompt: 1,
        steps: 4,
        guidance: 7.5,
        width: 64,
        height: 64,
        scheduler: None,
        seed: 3,
        batch: 2,
        init,
        control,
        init_latents: None,
        image_prompts: Vec::new(),
    }
}

/// A copy of a model folder with every safetensors weight moved by a relative error of up to 2^-11
/// (fp16's unit roundoff; the fixtures are stored in fp16 already, so rounding would change
/// nothing): the size of error a GPU's fp16 storage adds, for measuring how a pipeline grows it.
pub fn fp16_perturbed_copy(from: &Path, to: &Path) {
    copy_tree(from, to);
    let mut stack = vec![to.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "safetensors") {
                let tensors: Vec<(String, toffee::tensor::Tensor)> =
                    toffee::weights::safetensors::read_all(&p)
                        .unwrap()
                        .into_iter()
                        .enumerate()
                        .map(|(i, (k, t))| {
                            let u = toffee::rng::normal(i as u64, 5, t.numel());
                            let data = t
                                .data()
                                .iter()
                                .zip(u)
                                .map(|(v, u)| v * (1.0 + u.clamp(-1.0, 1.0) / 2048.0))
                                .collect();
                            (k, toffee::tensor::Tensor::new(t.shape().to_vec(), data))
                        })
                        .collect();
                toffee::weights::safetensors::write_f32(&p, &tensors).unwrap();
            }
        }
    }
}

/// ‖a − b‖ / ‖b‖ over host tensors; NaN anywhere is infinite error.
pub fn rel_l2(a: &toffee::tensor::Tensor, b: &toffee::tensor::Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.data().iter().zip(b.data()) {
        if x.is_nan() || y.is_nan() {
            return f64::INFINITY;
        }
        num += ((x - y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

/// How much a pipeline run grows fp16-sized weight error, measured on the CPU: the relative
/// error of `req`'s latents or images (the worse) with perturbed weights over that of one UNet
/// call on the golden
/// input (`<model>_unet.in.safetensors`), both against the f32 weights. Returns (one call's
/// error, growth). The GPU tests scale their pipeline tolerance by the growth.
pub fn fp16_error_growth(
    model: &Path,
    controlnet: Option<&Path>,
    req: &toffee::pipeline::Request,
) -> (f64, f64) {
    use toffee::backend::Device;
    use toffee::pipeline::Generator;
    let dir = tempfile::tempdir().unwrap();
    let rounded = dir.path().join("model");
    fp16_perturbed_copy(model, &rounded);
    let name = model.file_name().unwrap().to_str().unwrap();
    let unet_in = golden(&format!("{name}_unet.in.safetensors"));
    let inputs = toffee::weights::safetensors::read_all(&unet_in).unwrap();
    let call = |m: &Path| {
        toffee::forward::run(
            &m.join("unet"),
            toffee::forward::Component::Unet,
            &inputs,
            &unet_in,
            &Device::Cpu,
        )
        .unwrap()
        .remove(0)
        .1
    };
    let e_call = rel_l2(&call(&rounded), &call(model));
    let run = |m: &Path| {
        Generator::load(m, controlnet, &Device::Cpu)
            .unwrap()
            .run(req, &mut |_, _| {})
            .unwrap()
    };
    let (got, want) = (run(&rounded), run(model));
    // The worse of the latents and the decoded images.
    let e_run = rel_l2(&got.latents, &want.latents).max(rel_l2(&got.images, &want.images));
    (e_call, e_run / e_call)
}

/// The error text of a failed run: exit status 1, no panic, "toffee: error:" prefix.
/// A `pairs` setup error: exit status 2 (a shard's failure is 1), no panic, the usual prefix.
pub fn expect_setup_error(o: &Output) -> String {
    let e = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "expected a setup error, got {:?}; stderr: {e}",
        o.status
    );
    assert!(!e.contains("panicked"), "panicked: {e}");
    assert!(e.starts_with("toffee: error:"), "{e}");
    e
}

pub fn expect_error(o: &Output) -> String {
    let e = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected a clean failure, got {:?}; stderr: {e}",
        o.status
    );
    assert!(!e.contains("panicked"), "panicked: {e}");
    assert!(e.starts_with("toffee: error:"), "{e}");
    e
}

/// `toffee forward --model MODEL --component C --inputs IN --out OUT` plus `extra` arguments.
pub fn forward_at(
    model: &Path,
    component: &str,
    inputs: &Path,
    out: &Path,
    extra: &[&str],
) -> Output {
    let mut args = forward_args(model, component, inputs, out);
    args.extend_from_slice(extra);
    toffee(&args)
}

/// `toffee txt2img --model MODEL --prompt x --out OUT EXTRA...`.
pub fn txt2img_at(model: &str, out: &str, extra: &[&str]) -> Output {
    toffee(
        &[
            &["txt2img", "--model", model, "--prompt", "x", "--out", out][..],
            extra,
        ]
        .concat(),
    )
}

/// The arguments of `toffee forward` on `model`'s `component` with `inputs`, writing `out`.
pub fn forward_args<'a>(
    model: &'a Path,
    component: &'a str,
    inputs: &'a Path,
    out: &'a Path,
) -> Vec<&'a str> {
    vec![
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--component",
        component,
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]
}

/// Asserts `got` matches `want` within `tol` max abs error, and that the golden is not (near)
/// zero, which would test nothing.
pub fn assert_close(
    what: &str,
    got: &toffee::tensor::Tensor,
    want: &toffee::tensor::Tensor,
    tol: f32,
) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let scale = want.data().iter().fold(0.0f32, |a, v| a.max(v.abs()));
    assert!(scale > 1e-3, "{what}: golden is (near) zero");
    let err = got.max_abs_diff(want);
    eprintln!("{what}: max abs err {err:.3e} (golden max |x| {scale:.3})");
    assert!(err <= tol, "{what}: max abs error {err:e} > {tol:e}");
}

/// The case `name` of a golden manifest.json (`{"cases": [{"name": …}, …]}`).
pub fn manifest_case(manifest: &Path, name: &str) -> serde_json::Value {
    manifest_cases(manifest)
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("{}: no case {name}", manifest.display()))
}

/// Every case of a golden manifest.json.
pub fn manifest_cases(manifest: &Path) -> Vec<serde_json::Value> {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(manifest).unwrap()).unwrap();
    m["cases"].as_array().unwrap().clone()
}

/// C ABI options: a 2-step 64² txt2img with `prompt` and `seed`.
pub fn gen_options(prompt: &std::ffi::CString, seed: u64) -> toffee::ffi::toffee_generate_options {
    toffee::ffi::toffee_generate_options {
        size: std::mem::size_of::<toffee::ffi::toffee_generate_options>() as u32,
        mode: 0,
        prompt: prompt.as_ptr(),
        negative_prompt: std::ptr::null(),
        num_images: 1,
        steps: 2,
        guidance: 7.5,
        seed,
        width: 64,
        height: 64,
        scheduler: std::ptr::null(),
        init_image: std::ptr::null(),
        mask: std::ptr::null(),
        strength: 0.0,
        control_image: std::ptr::null(),
        control_scale: 1.0,
        adapter_image: std::ptr::null(),
        adapter_scale: -1.0,
    }
}

/// C ABI engine options: every path null (the built-in models, the CPU).
pub fn engine_options() -> toffee::ffi::toffee_engine_options {
    toffee::ffi::toffee_engine_options {
        size: std::mem::size_of::<toffee::ffi::toffee_engine_options>() as u32,
        device: std::ptr::null(),
        model: std::ptr::null(),
        controlnet: std::ptr::null(),
        adapter: std::ptr::null(),
        adapter_encoder: std::ptr::null(),
        view_model: std::ptr::null(),
        dino: std::ptr::null(),
        clip: std::ptr::null(),
    }
}

/// A `forward --inputs` file at `dir/name` holding `tensors` (f32).
pub fn forward_inputs(
    dir: &Path,
    name: &str,
    tensors: Vec<(&str, toffee::tensor::Tensor)>,
) -> PathBuf {
    let p = dir.join(name);
    let t: Vec<(String, toffee::tensor::Tensor)> =
        tensors.into_iter().map(|(n, t)| (n.into(), t)).collect();
    toffee::weights::safetensors::write_f32(&p, &t).unwrap();
    p
}

/// A tensor of `shape` with every element `v`.
pub fn filled(shape: Vec<usize>, v: f32) -> toffee::tensor::Tensor {
    let n = shape.iter().product();
    toffee::tensor::Tensor::new(shape, vec![v; n])
}

/// A tmpfs of `size` (`160k`, `1m`) mounted at a new folder `dir/small`, for full-disk tests;
/// None (and a "skipped" line) where mounting needs a root this process is not.
pub fn small_tmpfs(dir: &Path, size: &str) -> Option<PathBuf> {
    let mnt = dir.join("small");
    std::fs::create_dir(&mnt).unwrap();
    let opt = format!("size={size}");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &opt, "tmpfs", mnt.to_str().unwrap()])
        .output()
        .is_ok_and(|o| o.status.success());
    if !mounted {
        eprintln!("skipped: cannot mount a small tmpfs here (needs root)");
        return None;
    }
    Some(mnt)
}

/// proptest's settings: `default` cases, or `PROPTEST_CASES`; no failure files written.
pub fn proptest_cases(default: u32) -> proptest::test_runner::Config {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    proptest::test_runner::Config {
        cases: n,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    }
}

/// Runs toffee under `ulimit -v 8G` (a shared node's limit) with `env` added and no inherited
/// TOFFEE_MEMORY_BUDGET; returns (exit code, stderr, the child's own peak RSS in bytes).
pub fn toffee_bounded(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, u64) {
    use std::io::Read;
    let bin = std::env::var_os("TOFFEE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_toffee")));
    let mut cmd = std::process::Command::new("bash");
    cmd.arg("-c")
        .arg("ulimit -v 8388608 && exec \"$0\" \"$@\"")
        .arg(bin)
        .args(args)
        .env_remove("TOFFEE_MEMORY_BUDGET")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    #[allow(clippy::zombie_processes)] // reaped by wait4 below
    let mut child = cmd.spawn().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let mut status = 0;
    // Safety: wait4 fills one int and one struct. wait4 (not Child::wait) gives this child's
    // own peak RSS, not the maximum over every child of the test process; it reaps the child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert_eq!(pid, child.id() as i32);
    let code = if libc::WIFEXITED(status) {
        Some(libc::WEXITSTATUS(status))
    } else {
        None
    };
    (code, err, ru.ru_maxrss as u64 * 1024)
}
