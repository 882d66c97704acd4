//! Every model against diffusers/transformers goldens (tests/fixtures, made by tools/fixtures):
//! fp32 on the CPU backend, max abs error ≤ 1e-4.

use std::path::{Path, PathBuf};
use toffee::forward::{self, Component};
use toffee::weights::safetensors::read_all;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn component(s: &str, model: &str) -> Component {
    match s {
        "unet" => Component::Unet,
        "controlnet" => Component::Controlnet,
        "vae-encode" => Component::VaeEncode,
        "vae-decode" => Component::VaeDecode,
        "text-encoder" if model.ends_with("text_encoder_2") => Component::TextEncoder,
        "text-encoder" => Component::TextEncoder,
        other => panic!("manifest names unknown component {other}"),
    }
}

fn run_case(name: &str) {
    let root = fixtures();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("golden/manifest.json")).unwrap())
            .unwrap();
    let case = manifest["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name}"));
    let model = case["model"].as_str().unwrap();
    let comp = component(case["component"].as_str().unwrap(), model);
    let in_path = root.join("golden").join(case["inputs"].as_str().unwrap());
    let inputs = read_all(&in_path).unwrap();
    let want = read_all(&root.join("golden").join(case["outputs"].as_str().unwrap())).unwrap();
    let got = forward::run(
        &root.join(model),
        comp,
        &inputs,
        &in_path,
        &toffee::backend::Device::Cpu,
    )
    .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    assert_eq!(
        got.len(),
        want.len(),
        "{name}: output names {:?} vs golden {:?}",
        got.iter().map(|g| &g.0).collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    let mut worst = 0.0f32;
    for (n, t) in &got {
        let w = want
            .get(n)
            .unwrap_or_else(|| panic!("{name}: golden has no `{n}`"));
        assert_eq!(t.shape(), w.shape(), "{name}/{n}: shape");
        let scale = w.data().iter().fold(0.0f32, |a, v| a.max(v.abs()));
        assert!(
            scale > 1e-3,
            "{name}/{n}: golden is (near) zero; the fixture tests nothing"
        );
        let err = t.max_abs_diff(w);
        eprintln!("{name}/{n}: max abs err {err:.3e} (golden max |x| {scale:.3})");
        worst = worst.max(err);
    }
    assert!(worst <= 1e-4, "{name}: max abs error {worst:e} > 1e-4");
}

macro_rules! cases {
    ($($name:ident),* $(,)?) => { $( #[test] fn $name() { run_case(stringify!($name)); } )* };
}

cases!(
    sd1_unet,
    sd1_unet_nonsquare,
    sd1_unet_oddsize,
    sd1_unet_controlres,
    sd2_unet,
    sdxl_unet,
    sdxl_unet_controlres,
    unet_inpaint,
    unet_8ch,
    sd1_controlnet,
    sdxl_controlnet,
    sd1_vae_encode,
    sd1_vae_encode_nonsquare,
    sd1_vae_decode,
    sd1_vae_decode_nonsquare,
    sdxl_vae_decode,
    vae_legacy_decode,
    sd1_text_encoder,
    sd2_text_encoder,
    sdxl_text_encoder,
    sdxl_text_encoder_2,
);
