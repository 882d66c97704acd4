//! Image-prompt adapters against diffusers 0.42.1 (tests/fixtures/golden/adapters, made by
//! tools/fixtures/adapters.py): the image projections (IP-Adapter, IP-Adapter-Plus) and the UNet
//! with decoupled image cross-attention (one or two adapters, several images, per-layer scales,
//! λ = 0), fp32 CPU, max abs error ≤ 1e-4; bad input.

mod common;

use common::{expect_error, fixtures, forward_at, stderr};
use std::path::PathBuf;
use toffee::backend::Device;
use toffee::forward::{self, Component};
use toffee::models::adapter::Adapter;
use toffee::tensor::Tensor;
use toffee::weights::safetensors::read_all;

fn golden(name: &str) -> PathBuf {
    fixtures().join("golden/adapters").join(name)
}

fn manifest_case(name: &str) -> serde_json::Value {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden("manifest.json")).unwrap()).unwrap();
    m["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name}"))
        .clone()
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let scale = want.data().iter().fold(0.0f32, |a, v| a.max(v.abs()));
    assert!(scale > 1e-3, "{what}: golden is (near) zero");
    let err = got.max_abs_diff(want);
    eprintln!("{what}: max abs err {err:.3e} (golden max |x| {scale:.3})");
    assert!(err <= 1e-4, "{what}: max abs error {err:e} > 1e-4");
}

fn proj_case(name: &str) {
    let case = manifest_case(name);
    let a = Adapter::load(
        &fixtures().join(case["adapter"].as_str().unwrap()),
        &Device::Cpu,
    )
    .unwrap();
    let x = &read_all(&golden(&format!("{name}.in.safetensors"))).unwrap()["image_embeds"];
    let want =
        &read_all(&golden(&format!("{name}.out.safetensors"))).unwrap()["image_prompt_embeds"];
    let got = a.project(x).unwrap();
    assert_close(name, &got.reshape(want.shape().to_vec()), want);
}

fn unet_case(name: &str) {
    let case = manifest_case(name);
    let model = fixtures().join(case["model"].as_str().unwrap());
    let adapters: Vec<PathBuf> = case["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| fixtures().join(a.as_str().unwrap()))
        .collect();
    let in_path = golden(&format!("{name}.in.safetensors"));
    let inputs = read_all(&in_path).unwrap();
    let want = read_all(&golden(&format!("{name}.out.safetensors"))).unwrap();
    let got = forward::run_with_adapters(
        &model,
        Component::Unet,
        &inputs,
        &in_path,
        &Device::Cpu,
        &adapters,
    )
    .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    assert_eq!(
        got.len(),
        want.len(),
        "{name}: outputs {:?}",
        got.iter().map(|g| &g.0).collect::<Vec<_>>()
    );
    for (n, t) in &got {
        assert_close(&format!("{name}/{n}"), t, &want[n]);
    }
}

macro_rules! cases {
    ($f:ident: $($name:ident),* $(,)?) => { $( #[test] fn $name() { $f(stringify!($name)); } )* };
}

cases!(proj_case: sd1_plain_proj, sd1_plus_proj, sdxl_plain_proj, sdxl_plus_proj);
cases!(
    unet_case: sd1_unet_ip,
    sd1_unet_ip_plus,
    sdxl_unet_ip,
    sdxl_unet_ip_plus,
    sd1_unet_ip_two,
    sd1_unet_ip_2img,
    sd1_unet_ip_layers,
    sdxl_unet_ip_layers,
);

/// λ = 0 is the plain UNet exactly (diffusers skips the branch; so do we).
#[test]
fn sd1_unet_ip_scale0_equals_the_plain_unet() {
    unet_case("sd1_unet_ip_scale0");
    let in_path = golden("sd1_unet_ip_scale0.in.safetensors");
    let inputs = read_all(&in_path).unwrap();
    let model = fixtures().join("sd1");
    let plain = forward::run(&model, Component::Unet, &inputs, &in_path, &Device::Cpu).unwrap();
    let ip = forward::run_with_adapters(
        &model,
        Component::Unet,
        &inputs,
        &in_path,
        &Device::Cpu,
        &[fixtures().join("adapters/ip-adapter-sd1.safetensors")],
    )
    .unwrap();
    assert_eq!(plain[0].1.data(), ip[0].1.data());
}

#[test]
fn cli_forward_with_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let ad = fixtures().join("adapters/ip-adapter-sd1.safetensors");
    let o = forward_at(
        &fixtures().join("sd1"),
        "unet",
        &golden("sd1_unet_ip.in.safetensors"),
        &out,
        &["--adapter", ad.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let got = read_all(&out).unwrap();
    let want = read_all(&golden("sd1_unet_ip.out.safetensors")).unwrap();
    assert_close("cli", &got["out"], &want["out"]);
}

#[test]
fn adapter_for_another_unet_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    // The SDXL adapter on the SD1 UNet.
    let ad = fixtures().join("adapters/ip-adapter-sdxl.safetensors");
    let e = expect_error(&forward_at(
        &fixtures().join("sd1"),
        "unet",
        &golden("sd1_unet_ip.in.safetensors"),
        &out,
        &["--adapter", ad.to_str().unwrap()],
    ));
    assert!(
        e.contains("ip-adapter-sdxl.safetensors") && e.contains("another UNet"),
        "{e}"
    );
    assert!(!out.exists());
    // Embeddings of the wrong width.
    let mut inputs = read_all(&golden("sd1_unet_ip.in.safetensors")).unwrap();
    inputs.insert("ip_image_embeds.0".into(), Tensor::zeros(vec![2, 1, 7]));
    let bad = dir.path().join("bad.safetensors");
    let named: Vec<(String, Tensor)> = inputs.into_iter().collect();
    toffee::weights::safetensors::write_f32(&bad, &named).unwrap();
    let ad = fixtures().join("adapters/ip-adapter-sd1.safetensors");
    let e = expect_error(&forward_at(
        &fixtures().join("sd1"),
        "unet",
        &bad,
        &out,
        &["--adapter", ad.to_str().unwrap()],
    ));
    assert!(
        e.contains("ip_image_embeds.0") && e.contains("[2, 1, 7]"),
        "{e}"
    );
    // Not an adapter file.
    let e = expect_error(&forward_at(
        &fixtures().join("sd1"),
        "unet",
        &golden("sd1_unet_ip.in.safetensors"),
        &out,
        &[
            "--adapter",
            fixtures()
                .join("sd1/unet/diffusion_pytorch_model.safetensors")
                .to_str()
                .unwrap(),
        ],
    ));
    assert!(e.contains("ip_adapter.1.to_k_ip"), "{e}");
}
