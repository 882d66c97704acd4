//! The Toffee adapter (Refiner / ToffeeNet layout, docs/models.md) against its PyTorch reference
//! module (tools/toffee_adapter, goldens by tools/fixtures/toffee.py): the projections (linear,
//! Resampler; all tokens or patch tokens), from a subject image through the DINO encoder, and the
//! ToffeeNet / Refiner UNets with the adapter attached. fp32 CPU, max abs error ≤ 1e-4.

use crate::common::{expect_error, fixtures};
use std::path::PathBuf;
use toffee::backend::Device;
use toffee::forward::{self, Component};
use toffee::models::adapter::Adapter;
use toffee::pipeline::image_prompt::{image_prompt, load_encoder};
use toffee::tensor::Tensor;
use toffee::weights::safetensors::read_all;

fn golden(name: &str) -> PathBuf {
    fixtures().join("golden/toffee").join(name)
}

fn case(name: &str) -> serde_json::Value {
    crate::common::manifest_case(&golden("manifest.json"), name)
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    crate::common::assert_close(what, got, want, 1e-4);
}

fn adapter(c: &serde_json::Value) -> Adapter {
    Adapter::load(
        &fixtures().join(c["adapter"].as_str().unwrap()),
        &Device::Cpu,
    )
    .unwrap()
}

/// Selected tokens → image_prompt_embeds.
fn proj(name: &str) {
    let c = case(name);
    let a = adapter(&c);
    let inp = read_all(&golden(&format!("{name}.in.safetensors"))).unwrap();
    let out = read_all(&golden(&format!("{name}.out.safetensors"))).unwrap();
    let tokens = inp.get("image_tokens").or(out.get("image_tokens")).unwrap();
    assert_close(
        name,
        &a.project(tokens).unwrap(),
        &out["image_prompt_embeds"],
    );
}

/// Subject PNG → processor → DINO → token selection → projection.
fn embed(name: &str) {
    let c = case(name);
    let a = adapter(&c);
    let enc = load_encoder(
        &a,
        Some(&fixtures().join(c["image_encoder"].as_str().unwrap())),
        &Device::Cpu,
    )
    .unwrap();
    let img =
        toffee::image_proc::load_rgb8(&fixtures().join(c["image"].as_str().unwrap())).unwrap();
    let inp = read_all(&golden(&format!("{name}.in.safetensors"))).unwrap();
    let out = read_all(&golden(&format!("{name}.out.safetensors"))).unwrap();
    let px = enc.pixel_values(std::slice::from_ref(&img));
    let want_px = inp.get("pixel_values").or(out.get("pixel_values")).unwrap();
    assert!(px.max_abs_diff(want_px) <= 1e-5, "{name}: pixel_values");
    let p = image_prompt(&a, &enc, &img, 1.0, 11).unwrap();
    assert_close(
        &format!("{name}/image_tokens"),
        &p.positive,
        &out["image_tokens"],
    );
    assert_close(
        &format!("{name}/embeds"),
        &a.project(&p.positive).unwrap(),
        &out["image_prompt_embeds"],
    );
}

/// The UNet with the adapter attached (`forward --adapter`, the tokens given as ip_image_embeds).
fn unet(name: &str) {
    let c = case(name);
    let in_path = golden(&format!("{name}.in.safetensors"));
    let mut inputs = read_all(&in_path).unwrap();
    let tokens = inputs.remove("image_tokens").unwrap();
    inputs.insert("ip_image_embeds".into(), tokens);
    let want = read_all(&golden(&format!("{name}.out.safetensors"))).unwrap();
    let model = fixtures().join(c["unet"].as_str().unwrap());
    let ad = fixtures().join(c["adapter"].as_str().unwrap());
    let got = forward::run_with_adapters(
        &model,
        Component::Unet,
        &inputs,
        &in_path,
        &Device::Cpu,
        &[ad],
    )
    .unwrap();
    assert_close(&format!("{name}/out"), &got[0].1, &want["out"]);
    let e = &got[1].1;
    let (b, n, t, d) = (e.shape()[0], e.shape()[1], e.shape()[2], e.shape()[3]);
    assert_close(
        &format!("{name}/embeds"),
        &e.reshape(vec![b, n * t, d]),
        &want["image_prompt_embeds"],
    );
}

macro_rules! cases {
    ($f:ident: $($name:ident),* $(,)?) => { $( #[test] fn $name() { $f(stringify!($name)); } )* };
}

cases!(proj: linear_proj, resampler_proj, refiner_proj);
cases!(embed: linear_embed, resampler_embed, refiner_embed);
cases!(unet: toffeenet_unet_linear, toffeenet_unet_resampler, refiner_unet);

#[test]
fn config_errors_name_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("toffee/adapter-linear");
    for (field, value, want) in [
        ("tokens", "\"some\"", "tokens"),
        ("projection", "\"mlp\"", "projection"),
        (
            "image_encoder_output",
            "\"pooler_output\"",
            "image_encoder_output",
        ),
        ("colour", "1", "unknown field `colour`"),
    ] {
        let d = dir.path().join(field);
        crate::common::copy_tree(&src, &d);
        let p = d.join("adapter_config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v[field] = serde_json::from_str(value).unwrap();
        std::fs::write(&p, v.to_string()).unwrap();
        let e = format!("{:#}", Adapter::load(&d, &Device::Cpu).err().unwrap());
        assert!(
            e.contains("adapter_config.json") && e.contains(want),
            "{field}: {e}"
        );
    }
    let d = dir.path().join("missing");
    std::fs::create_dir(&d).unwrap();
    let e = format!("{:#}", Adapter::load(&d, &Device::Cpu).err().unwrap());
    assert!(e.contains("adapter_config.json"), "{e}");
}

/// ToffeeNet through the CLI: generation (txt2img on the 9-channel UNet: full-mask convention),
/// editing (inpaint) and the Refiner pass (img2img --mask on the SD2 UNet), subject from a PNG.
#[test]
fn cli_toffeenet_generation_editing_and_refiner() {
    let dir = tempfile::tempdir().unwrap();
    let net = fixtures().join("toffee/toffeenet");
    let ad = fixtures().join("toffee/adapter-linear");
    let subject = fixtures().join("toffee/subject.png");
    let run = |args: &[&str]| {
        let o = crate::common::toffee(args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            crate::common::stderr(&o)
        );
    };
    let out = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let (g, g0, plain) = (out("gen.png"), out("gen0.png"), out("plain.png"));
    let base = [
        "txt2img",
        "--model",
        net.to_str().unwrap(),
        "--prompt",
        "a toy on a beach",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
    ];
    let with_ad = [
        "--adapter",
        ad.to_str().unwrap(),
        "--adapter-image",
        subject.to_str().unwrap(),
    ];
    run(&[&base[..], &with_ad, &["--out", &g]].concat());
    run(&[&base[..], &with_ad, &["--adapter-scale", "0", "--out", &g0]].concat());
    run(&[&base[..], &["--out", &plain]].concat());
    let img = |p: &str| image::open(p).unwrap().to_rgb8().into_raw();
    assert_eq!(img(&g0), img(&plain), "λ = 0 is the plain ToffeeNet");
    assert_ne!(img(&g), img(&plain));
    // Editing: inpaint with the subject.
    let mask = dir.path().join("mask.png");
    image::GrayImage::from_fn(64, 64, |x, y| {
        image::Luma([if (16..48).contains(&x) && (16..48).contains(&y) {
            255
        } else {
            0
        }])
    })
    .save(&mask)
    .unwrap();
    let e = out("edit.png");
    run(&[
        "inpaint",
        "--model",
        net.to_str().unwrap(),
        "--prompt",
        "a toy",
        "--steps",
        "2",
        "--image",
        &g,
        "--mask",
        mask.to_str().unwrap(),
        "--out",
        &e,
        "--adapter",
        ad.to_str().unwrap(),
        "--adapter-image",
        subject.to_str().unwrap(),
    ]);
    // The Refiner pass on a draft: SD2 + the DINO v1 refiner adapter, restricted to the mask.
    let r = out("refined.png");
    let refiner = fixtures().join("toffee/refiner-adapter");
    run(&[
        "img2img",
        "--model",
        fixtures().join("sd2").to_str().unwrap(),
        "--prompt",
        "a toy",
        "--steps",
        "4",
        "--strength",
        "0.5",
        "--image",
        &g,
        "--mask",
        mask.to_str().unwrap(),
        "--out",
        &r,
        "--adapter",
        refiner.to_str().unwrap(),
        "--adapter-image",
        subject.to_str().unwrap(),
    ]);
    // An SD1 IP-Adapter does not fit ToffeeNet's SD2-layout UNet (other block widths).
    let sd1 = fixtures().join("adapters/ip-adapter-sd1.safetensors");
    let enc = fixtures().join("vision/clip-vision-proj");
    let args = [
        "--adapter",
        sd1.to_str().unwrap(),
        "--adapter-image",
        subject.to_str().unwrap(),
        "--adapter-encoder",
        enc.to_str().unwrap(),
        "--out",
        &out("x.png"),
    ];
    let bad = expect_error(&crate::common::toffee(&[&base[..], &args].concat()));
    assert!(
        bad.contains("ip-adapter-sd1.safetensors") && bad.contains("another UNet"),
        "{bad}"
    );
}

/// ToffeeNet generation with its optional depth ControlNet through the CLI.
#[test]
fn cli_toffeenet_with_depth_controlnet() {
    let dir = tempfile::tempdir().unwrap();
    let depth = dir.path().join("depth.png");
    image::GrayImage::from_fn(64, 64, |x, y| image::Luma([((x + y) * 2) as u8]))
        .save(&depth)
        .unwrap();
    let out = dir.path().join("g.png");
    let net = fixtures().join("toffee/toffeenet");
    let cn = fixtures().join("toffee/depth-controlnet");
    let ad = fixtures().join("toffee/adapter-resampler");
    let subject = fixtures().join("toffee/subject.png");
    let o = crate::common::toffee(&[
        "txt2img",
        "--model",
        net.to_str().unwrap(),
        "--prompt",
        "a toy in a room",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--controlnet",
        cn.to_str().unwrap(),
        "--control-image",
        depth.to_str().unwrap(),
        "--adapter",
        ad.to_str().unwrap(),
        "--adapter-image",
        subject.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", crate::common::stderr(&o));
    assert_eq!(image::open(&out).unwrap().width(), 64);
}

/// The adapter error of `dir` (a Toffee adapter folder or an IP-Adapter file), as printed.
fn load_error(dir: &std::path::Path) -> String {
    format!("{:#}", Adapter::load(dir, &Device::Cpu).err().unwrap())
}

/// `src`'s tensors, plus `extra` (a tensor no adapter reads), written to `to`.
fn with_extra_tensor(src: &std::path::Path, to: &std::path::Path, extra: &str) {
    let mut t: Vec<(String, Tensor)> = read_all(src).unwrap().into_iter().collect();
    t.push((extra.into(), Tensor::new(vec![2], vec![0.5, 0.5])));
    toffee::weights::safetensors::write_f32(to, &t).unwrap();
}

/// Tensors that contradict adapter_config.json (the other projection, Resampler numbers that do
/// not match) or that no part of the adapter reads are errors naming the file and the field or
/// tensor, not silently ignored (issue 27).
#[test]
fn tensors_contradicting_the_config_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let linear = fixtures().join("toffee/adapter-linear");
    let resampler = fixtures().join("toffee/adapter-resampler");
    // config "linear", tensors of a Resampler, and the reverse
    for (cfg_from, file_from, want) in [
        (&linear, &resampler, "image_proj.latents"),
        (&resampler, &linear, "image_proj.proj.weight"),
    ] {
        let d = dir.path().join(format!("swap-{want}"));
        crate::common::copy_tree(cfg_from, &d);
        std::fs::copy(
            file_from.join("adapter.safetensors"),
            d.join("adapter.safetensors"),
        )
        .unwrap();
        let e = load_error(&d);
        assert!(
            e.contains("adapter_config.json") && e.contains("projection") && e.contains(want),
            "{e}"
        );
    }
    // Resampler numbers the tensors contradict, and a `resampler` on the linear projection
    for (src, field, value, want) in [
        (&resampler, "num_tokens", "6", "num_tokens"),
        (
            &resampler,
            "resampler",
            r#"{"depth": 3, "dim_head": 64, "heads": 2, "hidden_dims": 64, "ff_mult": 4}"#,
            "resampler.depth",
        ),
        (
            &resampler,
            "resampler",
            r#"{"depth": 4, "dim_head": 32, "heads": 2, "hidden_dims": 64, "ff_mult": 4}"#,
            "resampler.heads",
        ),
        (
            &resampler,
            "resampler",
            r#"{"depth": 4, "dim_head": 64, "heads": 2, "hidden_dims": 64}"#,
            "resampler.ff_mult",
        ),
        (&resampler, "image_embed_dim", "48", "image_embed_dim"),
        (
            &linear,
            "resampler",
            r#"{"depth": 4, "dim_head": 64, "heads": 2, "hidden_dims": 64, "ff_mult": 4}"#,
            "resampler",
        ),
    ] {
        let d = dir.path().join(format!("field-{want}"));
        crate::common::copy_tree(src, &d);
        let p = d.join("adapter_config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v[field] = serde_json::from_str(value).unwrap();
        std::fs::write(&p, v.to_string()).unwrap();
        let e = load_error(&d);
        assert!(
            e.contains("adapter_config.json") && e.contains(want),
            "{want}: {e}"
        );
    }
    // an extra tensor, in a Toffee folder and in a public IP-Adapter file
    let d = dir.path().join("extra");
    crate::common::copy_tree(&linear, &d);
    with_extra_tensor(
        &linear.join("adapter.safetensors"),
        &d.join("adapter.safetensors"),
        "image_proj.extra.weight",
    );
    let e = load_error(&d);
    assert!(
        e.contains("adapter.safetensors") && e.contains("unknown tensor `image_proj.extra.weight`"),
        "{e}"
    );
    let public = dir.path().join("ip-adapter.safetensors");
    with_extra_tensor(
        &fixtures().join("adapters/ip-adapter-sd1.safetensors"),
        &public,
        "image_proj.latents",
    );
    let e = load_error(&public);
    assert!(
        e.contains("ip-adapter.safetensors") && e.contains("unknown tensor `image_proj.latents`"),
        "{e}"
    );
}
