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

/// The error text of a failed run: exit status 1, no panic, "toffee: error:" prefix.
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
    let mut args = vec![
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--component",
        component,
    ];
    args.extend([
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    args.extend_from_slice(extra);
    toffee(&args)
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
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(manifest).unwrap()).unwrap();
    m["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("{}: no case {name}", manifest.display()))
        .clone()
}
