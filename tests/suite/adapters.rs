//! Image-prompt adapters against diffusers 0.42.1 (tests/fixtures/golden/adapters, made by
//! tools/fixtures/adapters.py): the image projections (IP-Adapter, IP-Adapter-Plus) and the UNet
//! with decoupled image cross-attention (one or two adapters, several images, per-layer scales,
//! λ = 0), fp32 CPU, max abs error ≤ 1e-4; bad input.

use crate::common::{expect_error, fixtures, forward_at, stderr};
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
    crate::common::manifest_case(&golden("manifest.json"), name)
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    crate::common::assert_close(what, got, want, 1e-4);
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
    // The plain UNet takes no adapter inputs (`forward` refuses inputs it would ignore).
    let mut plain_inputs = inputs.clone();
    plain_inputs.retain(|name, _| !name.starts_with("ip_"));
    let plain = forward::run(
        &model,
        Component::Unet,
        &plain_inputs,
        &in_path,
        &Device::Cpu,
    )
    .unwrap();
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

/// `toffee txt2img|img2img|inpaint --adapter F --adapter-image S`: the subject is encoded by the
/// adapter's image encoder; λ = 0 gives the plain pipeline's image exactly.
fn gen_args<'a>(mode: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        mode,
        "--prompt",
        "a photo of a cat",
        "--steps",
        "2",
        "--seed",
        "3",
        "--out",
        out,
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn cli_generation_with_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("sd1");
    let enc = fixtures().join("vision/clip-vision-proj");
    let subject = fixtures().join("vision/images/img0_37x53.png");
    let (m, e, s) = (
        model.to_str().unwrap(),
        enc.to_str().unwrap(),
        subject.to_str().unwrap(),
    );
    let run = |name: &str, mode: &str, extra: &[&str]| -> Vec<u8> {
        let out = dir.path().join(format!("{name}.png"));
        let mut args = gen_args(mode, out.to_str().unwrap(), &["--model", m]);
        args.extend_from_slice(extra);
        let o = crate::common::toffee(&args);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        image::open(&out).unwrap().to_rgb8().into_raw()
    };
    let plain = run("plain", "txt2img", &[]);
    for ad in [
        "ip-adapter-sd1.safetensors",
        "ip-adapter-plus-sd1.safetensors",
    ] {
        let a = fixtures().join("adapters").join(ad);
        let a = a.to_str().unwrap();
        let with = run(
            ad,
            "txt2img",
            &["--adapter", a, "--adapter-image", s, "--adapter-encoder", e],
        );
        assert_ne!(with, plain, "{ad}: the adapter changes the image");
        let zero = run(
            &format!("{ad}-0"),
            "txt2img",
            &[
                "--adapter",
                a,
                "--adapter-image",
                s,
                "--adapter-encoder",
                e,
                "--adapter-scale",
                "0",
            ],
        );
        assert_eq!(zero, plain, "{ad}: λ = 0 is the plain pipeline");
    }
    // img2img (the Refiner pass) restricted to a mask, and inpainting, with an adapter.
    let src = dir.path().join("src.png");
    image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, 90])
    })
    .save(&src)
    .unwrap();
    let mask = dir.path().join("mask.png");
    image::GrayImage::from_fn(64, 64, |x, _| image::Luma([if x < 32 { 255 } else { 0 }]))
        .save(&mask)
        .unwrap();
    let a = fixtures().join("adapters/ip-adapter-sd1.safetensors");
    let ad = [
        "--adapter",
        a.to_str().unwrap(),
        "--adapter-image",
        s,
        "--adapter-encoder",
        e,
    ];
    let i2i = run(
        "i2i",
        "img2img",
        &[&["--image", src.to_str().unwrap()][..], &ad].concat(),
    );
    let i2i_masked = run(
        "i2i-mask",
        "img2img",
        &[
            &[
                "--image",
                src.to_str().unwrap(),
                "--mask",
                mask.to_str().unwrap(),
            ][..],
            &ad,
        ]
        .concat(),
    );
    assert_ne!(i2i, i2i_masked, "--mask changes img2img");
    run(
        "inpaint",
        "inpaint",
        &[
            &[
                "--image",
                src.to_str().unwrap(),
                "--mask",
                mask.to_str().unwrap(),
            ][..],
            &ad,
        ]
        .concat(),
    );
}

#[test]
fn cli_adapter_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.png");
    let model = fixtures().join("sd1");
    let enc = fixtures().join("vision/clip-vision-proj");
    let a = fixtures().join("adapters/ip-adapter-sd1.safetensors");
    let (m, e, o) = (
        model.to_str().unwrap(),
        enc.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    // No subject image.
    let err = expect_error(&crate::common::toffee(&gen_args(
        "txt2img",
        o,
        &["--model", m, "--adapter", a.to_str().unwrap()],
    )));
    assert!(err.contains("--adapter-image"), "{err}");
    // A subject image that does not decode.
    let bad = dir.path().join("subject.png");
    std::fs::write(&bad, b"garbage").unwrap();
    let err = expect_error(&crate::common::toffee(&gen_args(
        "txt2img",
        o,
        &[
            "--model",
            m,
            "--adapter",
            a.to_str().unwrap(),
            "--adapter-image",
            bad.to_str().unwrap(),
            "--adapter-encoder",
            e,
        ],
    )));
    assert!(err.contains("subject.png"), "{err}");
    // The SDXL adapter on the SD1 pipeline.
    let sdxl = fixtures().join("adapters/ip-adapter-sdxl.safetensors");
    let img = fixtures().join("vision/images/img0_37x53.png");
    let err = expect_error(&crate::common::toffee(&gen_args(
        "txt2img",
        o,
        &[
            "--model",
            m,
            "--adapter",
            sdxl.to_str().unwrap(),
            "--adapter-image",
            img.to_str().unwrap(),
            "--adapter-encoder",
            e,
        ],
    )));
    assert!(
        err.contains("ip-adapter-sdxl.safetensors") && err.contains("another UNet"),
        "{err}"
    );
    // No encoder beside the adapter and none given.
    let err = expect_error(&crate::common::toffee(&gen_args(
        "txt2img",
        o,
        &[
            "--model",
            m,
            "--adapter",
            a.to_str().unwrap(),
            "--adapter-image",
            img.to_str().unwrap(),
        ],
    )));
    assert!(err.contains("--adapter-encoder"), "{err}");
    assert!(!out.exists());
}

/// h94/IP-Adapter's layout: `models/image_encoder/` beside `models/ip-adapter*.safetensors`.
#[test]
fn adapter_encoder_is_found_beside_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    crate::common::copy_tree(
        &fixtures().join("vision/clip-vision-proj"),
        &models.join("image_encoder"),
    );
    let file = models.join("ip-adapter_sd15.safetensors");
    std::fs::copy(
        fixtures().join("adapters/ip-adapter-sd1.safetensors"),
        &file,
    )
    .unwrap();
    let a = Adapter::load(&file, &Device::Cpu).unwrap();
    let found = toffee::pipeline::image_prompt::encoder_dir(&a, None).unwrap();
    assert_eq!(found, models.join("image_encoder"));
    // The SDXL `*_vit-h` files in sdxl_models/ read models/image_encoder (ViT-H), not the
    // ViT-bigG encoder beside them.
    let sdxl = dir.path().join("sdxl_models");
    crate::common::copy_tree(
        &fixtures().join("vision/clip-vision"),
        &sdxl.join("image_encoder"),
    );
    for (name, want) in [
        (
            "ip-adapter-plus_sdxl_vit-h.safetensors",
            models.join("image_encoder"),
        ),
        (
            "ip-adapter-plus_sdxl.safetensors",
            sdxl.join("image_encoder"),
        ),
    ] {
        let file = sdxl.join(name);
        std::fs::copy(
            fixtures().join("adapters/ip-adapter-plus-sdxl.safetensors"),
            &file,
        )
        .unwrap();
        let a = Adapter::load(&file, &Device::Cpu).unwrap();
        let found = toffee::pipeline::image_prompt::encoder_dir(&a, None).unwrap();
        assert_eq!(found, want, "{name}");
    }
    let out = dir.path().join("o.png");
    let img = fixtures().join("vision/images/img1_64x40.png");
    let o = crate::common::toffee(&gen_args(
        "txt2img",
        out.to_str().unwrap(),
        &[
            "--model",
            fixtures().join("sd1").to_str().unwrap(),
            "--adapter",
            file.to_str().unwrap(),
            "--adapter-image",
            img.to_str().unwrap(),
        ],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn inspect_describes_adapters() {
    for (p, want) in [
        ("adapters/ip-adapter-sd1.safetensors", "IP-Adapter (ImageProjection): image features 16-wide → tokens 16 (4 per image), 11 cross-attention layers"),
        ("adapters/ip-adapter-plus-sdxl.safetensors", "IP-Adapter-Plus (Resampler): image features 24-wide → tokens 32 (5 per image)"),
        ("toffee/adapter-resampler", "Toffee adapter"),
    ] {
        let o = crate::common::toffee(&["inspect", fixtures().join(p).to_str().unwrap()]);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success(), "{p}: {}", stderr(&o));
        assert!(text.contains(want), "{p}: {text}");
    }
    let o = crate::common::toffee(&[
        "inspect",
        fixtures()
            .join("toffee/adapter-resampler")
            .to_str()
            .unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("patch tokens of `penultimate_hidden_state`")
    );
}

/// Two adapters at once from the CLI, each with its own subject and scale.
#[test]
fn cli_two_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.png");
    let enc = fixtures().join("vision/clip-vision-proj");
    let (a, b) = (
        fixtures().join("adapters/ip-adapter-sd1.safetensors"),
        fixtures().join("adapters/ip-adapter-plus-sd1.safetensors"),
    );
    let (s1, s2) = (
        fixtures().join("vision/images/img0_37x53.png"),
        fixtures().join("vision/images/img2_50x50.png"),
    );
    let p = |x: &PathBuf| x.to_str().unwrap().to_string();
    let args = [
        "--model".to_string(),
        p(&fixtures().join("sd1")),
        "--adapter".into(),
        p(&a),
        "--adapter-image".into(),
        p(&s1),
        "--adapter-encoder".into(),
        p(&enc),
        "--adapter-scale".into(),
        "0.5".into(),
        "--adapter".into(),
        p(&b),
        "--adapter-image".into(),
        p(&s2),
        "--adapter-encoder".into(),
        p(&enc),
        "--adapter-scale".into(),
        "0.8".into(),
    ];
    let o_str = p(&out);
    let mut all = gen_args("txt2img", &o_str, &[]);
    all.extend(args.iter().map(|s| s.as_str()));
    let o = crate::common::toffee(&all);
    assert!(o.status.success(), "{}", stderr(&o));
    // Images and adapters must pair up.
    let mut bad = gen_args("txt2img", &o_str, &[]);
    bad.extend(args[..10].iter().map(|s| s.as_str()));
    bad.extend(["--adapter", b.to_str().unwrap()]);
    let e = expect_error(&crate::common::toffee(&bad));
    assert!(e.contains("--adapter-image"), "{e}");
}
