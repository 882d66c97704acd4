//! The View Generator (Zero1to3 layout) against a PyTorch reference of diffusers' community
//! pipeline (tools/fixtures/zero123.py): cc_projection, the 8-channel UNet with a one-token
//! context, the CLIP preprocessing, and 2-step view generation (DDIM, Euler, no guidance) from an
//! RGBA subject composited on white. fp32 CPU: ≤ 1e-4 per model, ≤ 1e-3 latents, ≤ 2.5/255 image.

use crate::common::{expect_error, fixtures, stderr, toffee};
use serde_json::Value;
use std::collections::VecDeque;
use std::path::PathBuf;
use toffee::backend::Device;
use toffee::cmd::view::prepare_subject;
use toffee::forward::{self, Component};
use toffee::pipeline::noise::NoiseSource;
use toffee::pipeline::view::{Pose, View, ViewGenerator, ViewRequest};
use toffee::tensor::Tensor;
use toffee::weights::safetensors::read_all;

fn golden(name: &str) -> PathBuf {
    fixtures().join("golden/zero123").join(name)
}

fn model() -> ViewGenerator {
    ViewGenerator::load(&fixtures().join("zero123"), &Device::Cpu).unwrap()
}

use crate::common::assert_close;

#[test]
fn cc_projection_matches() {
    let g = model();
    let x = &read_all(&golden("cc_projection.in.safetensors")).unwrap()["x"];
    let want = &read_all(&golden("cc_projection.out.safetensors")).unwrap()["out"];
    let got = toffee::backend::linear(&x.reshape(vec![3, 20]), &g.cc_projection);
    assert_close("cc_projection", &got.reshape(vec![3, 1, 16]), want, 1e-5);
}

#[test]
fn unet_with_eight_channels_and_one_token_matches() {
    let in_path = golden("unet.in.safetensors");
    let inputs = read_all(&in_path).unwrap();
    let want = read_all(&golden("unet.out.safetensors")).unwrap();
    let got = forward::run(
        &fixtures().join("zero123"),
        Component::Unet,
        &inputs,
        &in_path,
        &Device::Cpu,
    )
    .unwrap();
    assert_close("unet", &got[0].1, &want["out"], 1e-4);
}

#[test]
fn clip_preprocessing_and_embedding_match() {
    let g = model();
    let inp = read_all(&golden("clip_preprocess.in.safetensors")).unwrap();
    let want = read_all(&golden("clip_preprocess.out.safetensors")).unwrap();
    let rgb = &inp["rgb"];
    let img = Tensor::new(
        rgb.shape().to_vec(),
        rgb.data().iter().map(|v| v / 255.0).collect(),
    );
    let px = g.clip_preprocess(&img);
    assert_close("pixel_values", &px.to_nchw(), &want["pixel_values"], 1e-4);
    let out = g.image_encoder.forward(&px);
    assert_close(
        "image_embeds",
        &out.image_embeds.unwrap().reshape(vec![1, 1, 16]),
        &want["image_embeds"],
        1e-4,
    );
}

/// Replays a recorded 2-step run; returns (latents, images) NCHW.
fn replay(name: &str, batch_views: Option<usize>) -> (Tensor, Tensor) {
    let case: Value =
        serde_json::from_str(&std::fs::read_to_string(golden(&format!("{name}.json"))).unwrap())
            .unwrap();
    let t = read_all(&golden(&format!("{name}.safetensors"))).unwrap();
    let g = model();
    let subject = prepare_subject(
        &fixtures().join(case["subject_image"].as_str().unwrap()),
        None,
        g.default_size,
    )
    .unwrap();
    // The composite on white is the reference's exactly.
    let want_rgb = &t["subject_rgb"];
    let got_rgb: Vec<f32> = subject.data().iter().map(|v| (v * 255.0).round()).collect();
    assert_eq!(
        got_rgb,
        want_rgb.data(),
        "{name}: subject composited on white"
    );
    let poses: Vec<Pose> = case["poses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Pose {
            polar: p[0].as_f64().unwrap() as f32,
            azimuth: p[1].as_f64().unwrap() as f32,
            radius: p[2].as_f64().unwrap() as f32,
        })
        .collect();
    for (p, want) in poses.iter().zip(case["pose_vectors"].as_array().unwrap()) {
        for (a, b) in p.vector().iter().zip(want.as_array().unwrap()) {
            assert!(
                (a - b.as_f64().unwrap() as f32).abs() < 1e-6,
                "pose vector {p:?}"
            );
        }
    }
    let n = poses.len();
    let req = ViewRequest {
        subjects: vec![subject],
        views: poses
            .into_iter()
            .map(|pose| View { subject: 0, pose })
            .collect(),
        steps: case["steps"].as_u64().unwrap() as usize,
        guidance: case["guidance_scale"].as_f64().unwrap() as f32,
        scheduler: case["scheduler"]["override"]
            .as_str()
            .map(|s| s.parse().unwrap()),
        seed: 0,
        batch: batch_views.unwrap_or(n),
    };
    let noise = &t["noise.0"];
    let run = |tensor_scheduler: bool| {
        let mut g = model();
        g.tensor_scheduler = tensor_scheduler;
        let mut src = NoiseSource::Recorded(VecDeque::from([noise.clone()]));
        let (lat, img) = g
            .run_chunk(&req, 0, n, &mut src, &mut |_, _| {})
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(src.remaining(), 0);
        (lat.to_nchw(), img.to_nchw())
    };
    for ts in [false, true] {
        let (lat, img) = run(ts);
        assert_close(&format!("{name} latents"), &lat, &t["latents"], 1e-3);
        assert_close(&format!("{name} image"), &img, &t["image"], 2.5 / 255.0);
    }
    run(false)
}

#[test]
fn view_generation_ddim_matches() {
    replay("zero123_ddim", None);
}

#[test]
fn view_generation_euler_matches() {
    replay("zero123_euler", None);
}

#[test]
fn view_generation_without_guidance_matches() {
    replay("zero123_nocfg", None);
}

/// View i uses seed + i: the same views come out whatever the batch size.
#[test]
fn per_view_seeds_do_not_depend_on_the_batch() {
    let g = model();
    let subject = prepare_subject(
        &fixtures().join("zero123/subject.png"),
        None,
        g.default_size,
    )
    .unwrap();
    let views: Vec<View> = [0.0, 90.0, 180.0]
        .iter()
        .map(|&a| View {
            subject: 0,
            pose: Pose {
                polar: 5.0,
                azimuth: a,
                radius: 0.0,
            },
        })
        .collect();
    let run = |batch: usize| {
        let req = ViewRequest {
            subjects: vec![subject.clone()],
            views: views.clone(),
            steps: 2,
            guidance: 3.0,
            scheduler: None,
            seed: 11,
            batch,
        };
        let mut out = Vec::new();
        g.run_batches(&req, &mut |_, _| {}, &mut |_, l, _| {
            out.push(l);
            Ok(())
        })
        .unwrap();
        Tensor::cat0(&out.iter().collect::<Vec<_>>())
    };
    let (a, b) = (run(3), run(1));
    assert!(
        a.max_abs_diff(&b) < 1e-5,
        "batch 3 vs 1: {}",
        a.max_abs_diff(&b)
    );
}

#[test]
fn cli_writes_one_view_per_angle() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("v.png");
    let m = fixtures().join("zero123");
    let img = fixtures().join("zero123/subject.png");
    let o = toffee(&[
        "view",
        "--model",
        m.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--elevation",
        "-10",
        "--azimuth",
        "0,90,180,270",
        "--steps",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for i in 0..4 {
        let p = dir.path().join(format!("v-{i:04}.png"));
        let im = image::open(&p).unwrap();
        assert_eq!((im.width(), im.height()), (64, 64));
    }
}

#[test]
fn view_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("v.png");
    let img = fixtures().join("zero123/subject.png");
    let m = fixtures().join("zero123");
    let run = |model: &str, azimuth: &str, extra: &[&str]| {
        let mut a = vec!["view", "--model", model, "--image", img.to_str().unwrap()];
        a.extend([
            "--elevation",
            "0",
            "--azimuth",
            azimuth,
            "--out",
            out.to_str().unwrap(),
        ]);
        toffee(&[&a[..], extra].concat())
    };
    let args = |model: &str, azimuth: &str| run(model, azimuth, &["--steps", "1"]);
    // A pose out of the usual range is allowed; a non-number is an error.
    let e = crate::common::stderr(&args(m.to_str().unwrap(), "north"));
    assert!(e.contains("north") && !e.contains("panicked"), "{e}");
    assert!(args(m.to_str().unwrap(), "720").status.success());
    // cc_projection missing, or a PyTorch pickle instead of safetensors.
    let copy = dir.path().join("z");
    crate::common::copy_tree(&m, &copy);
    let cc = copy.join("cc_projection");
    std::fs::rename(
        cc.join("diffusion_pytorch_model.safetensors"),
        cc.join("diffusion_pytorch_model.bin"),
    )
    .unwrap();
    let e = expect_error(&args(copy.to_str().unwrap(), "0"));
    assert!(
        e.contains("diffusion_pytorch_model.bin") && e.contains("safetensors"),
        "{e}"
    );
    std::fs::remove_dir_all(&cc).unwrap();
    let e = expect_error(&args(copy.to_str().unwrap(), "0"));
    assert!(e.contains("cc_projection"), "{e}");
    // An image that does not decode.
    let bad = dir.path().join("subject.png");
    std::fs::write(&bad, b"nope").unwrap();
    let e = expect_error(&toffee(&[
        "view",
        "--model",
        m.to_str().unwrap(),
        "--image",
        bad.to_str().unwrap(),
        "--elevation",
        "0",
        "--azimuth",
        "0",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(e.contains("subject.png"), "{e}");
    // Lists of different lengths.
    let e = expect_error(&toffee(&[
        "view",
        "--model",
        m.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--elevation",
        "0,5",
        "--azimuth",
        "0,90,180",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(e.contains("--elevation"), "{e}");
    // Numbers by the rules of every generation request: a NaN guidance would turn guidance off
    // and still write an image (issue 27).
    std::fs::remove_file(&out).unwrap();
    for (extra, want) in [
        (
            ["--guidance", "nan"],
            "--guidance NaN is not a finite number",
        ),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--batch", "100000"], "--batch 100000 is larger than 4096"),
    ] {
        let e = expect_error(&run(m.to_str().unwrap(), "0", &extra));
        assert!(e.contains(want), "{extra:?}: {e}");
        assert!(!out.exists(), "{extra:?}: wrote a view");
    }
}
