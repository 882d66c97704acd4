//! Image encoders (ViT / DINO v1, DINOv2 with and without registers and SwiGLU, CLIP vision,
//! CLIPModel) against transformers goldens (tests/fixtures/golden/vision, made by
//! tools/fixtures/vision.py): fp32 CPU, max abs error ≤ 1e-4; embeddings from the folders'
//! image processors; scores against torch cosines; the CLI.

use crate::common::{expect_error, fixtures, stderr, toffee};
use std::collections::BTreeMap;
use std::path::PathBuf;
use toffee::backend::Device;
use toffee::forward::{self, Component};
use toffee::tensor::Tensor;
use toffee::weights::safetensors::read_all;

fn vision_golden(name: &str) -> PathBuf {
    fixtures().join("golden/vision").join(name)
}

fn manifest_case(name: &str) -> serde_json::Value {
    crate::common::manifest_case(&vision_golden("manifest.json"), name)
}

fn check_outputs(
    name: &str,
    got: &[(String, Tensor)],
    want: &BTreeMap<String, Tensor>,
    names: &[String],
) {
    let mut worst = 0.0f32;
    for n in names {
        let Some((_, t)) = got.iter().find(|(g, _)| g == n) else {
            panic!(
                "{name}: no output `{n}` (got {:?})",
                got.iter().map(|g| &g.0).collect::<Vec<_>>()
            );
        };
        let w = &want[n];
        assert_eq!(t.shape(), w.shape(), "{name}/{n}: shape");
        let scale = w.data().iter().fold(0.0f32, |a, v| a.max(v.abs()));
        assert!(scale > 1e-3, "{name}/{n}: golden is (near) zero");
        let err = t.max_abs_diff(w);
        eprintln!("{name}/{n}: max abs err {err:.3e} (golden max |x| {scale:.3})");
        worst = worst.max(err);
    }
    assert!(worst <= 1e-4, "{name}: max abs error {worst:e} > 1e-4");
}

/// A manifest case through `forward --component image-encoder` (vision outputs only; the CLIP
/// text tower is checked separately).
fn run_case(name: &str) {
    let case = manifest_case(name);
    let model = fixtures().join(case["model"].as_str().unwrap());
    let in_path = vision_golden(case["inputs"].as_str().unwrap());
    let mut inputs = read_all(&in_path).unwrap();
    inputs.retain(|k, _| k == "pixel_values");
    if name == "dino-vit_interp" {
        inputs.insert("interpolate_pos_encoding".into(), Tensor::scalar(1.0));
    }
    let want = read_all(&vision_golden(case["outputs"].as_str().unwrap())).unwrap();
    let got = forward::run(
        &model,
        Component::ImageEncoder,
        &inputs,
        &in_path,
        &Device::Cpu,
    )
    .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let names: Vec<String> = case["output_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .filter(|n| !matches!(n.as_str(), "text_embeds" | "logits_per_image"))
        .collect();
    assert_eq!(
        got.len(),
        names.len(),
        "{name}: outputs {:?} vs {names:?}",
        got.iter().map(|g| &g.0).collect::<Vec<_>>()
    );
    check_outputs(name, &got, &want, &names);
}

macro_rules! cases {
    ($($fn:ident => $name:literal),* $(,)?) => { $( #[test] fn $fn() { run_case($name); } )* };
}

cases!(
    dino_vit => "dino-vit",
    dino_vit_interpolated => "dino-vit_interp",
    dino_vit_prefixed_no_pooler => "dino-vit-prefixed",
    dinov2 => "dinov2",
    dinov2_interpolated_up => "dinov2_interp",
    dinov2_interpolated_down => "dinov2_interp_down",
    dinov2_swiglu => "dinov2-swiglu",
    dinov2_registers => "dinov2-reg",
    dinov2_registers_interpolated_up => "dinov2-reg_interp",
    dinov2_registers_interpolated_down => "dinov2-reg_interp_down",
    clip_vision_unprefixed => "clip-vision",
    clip_vision_projection_prefixed => "clip-vision-proj",
    clip_model_vision_tower => "clip",
);

/// The CLIPModel's text tower: projected `text_embeds` of the golden's input_ids.
#[test]
fn clip_model_text_tower() {
    let path = vision_golden("clip.in.safetensors");
    let inputs = read_all(&path).unwrap();
    let want = read_all(&vision_golden("clip.out.safetensors")).unwrap();
    let te =
        toffee::models::load::load_clip_text_tower(&fixtures().join("vision/clip"), &Device::Cpu)
            .unwrap();
    let ids = &inputs["input_ids"];
    let l = ids.shape()[1];
    let rows: Vec<Vec<u32>> = ids
        .data()
        .chunks(l)
        .map(|r| r.iter().map(|v| *v as u32).collect())
        .collect();
    let out = te.forward(&rows).unwrap();
    check_outputs(
        "clip/text",
        &[("text_embeds".into(), out.text_embeds.unwrap())],
        &want,
        &["text_embeds".into()],
    );
}

fn images() -> Vec<PathBuf> {
    ["img0_37x53.png", "img1_64x40.png", "img2_50x50.png"]
        .iter()
        .map(|n| fixtures().join("vision/images").join(n))
        .collect()
}

/// `toffee embed` on the committed PNGs: pixel_values from the folder's processor and the
/// outputs, against the processor + model in transformers.
fn embed_case(name: &str) {
    let case = manifest_case(&format!("{name}.embed"));
    let want = read_all(&vision_golden(case["outputs"].as_str().unwrap())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("emb.safetensors");
    let model = fixtures().join(case["model"].as_str().unwrap());
    let mut args = vec!["embed", "--model", model.to_str().unwrap(), "--images"];
    let imgs = images();
    args.extend(imgs.iter().map(|p| p.to_str().unwrap()));
    args.extend(["--out", out.to_str().unwrap()]);
    let o = toffee(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = read_all(&out).unwrap();
    let px = &got["pixel_values"];
    let err = px.max_abs_diff(&want["pixel_values"]);
    assert!(err <= 1e-5, "{name}: pixel_values max abs err {err}");
    let names: Vec<String> = case["output_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .filter(|n| !matches!(n.as_str(), "text_embeds" | "logits_per_image"))
        .collect();
    let got: Vec<(String, Tensor)> = got
        .into_iter()
        .filter(|(k, _)| k != "pixel_values")
        .collect();
    assert_eq!(got.len(), names.len(), "{name}: outputs");
    check_outputs(&format!("{name}.embed"), &got, &want, &names);
}

#[test]
fn embed_dino_vit() {
    embed_case("dino-vit");
}
#[test]
fn embed_dinov2() {
    embed_case("dinov2");
}
#[test]
fn embed_dinov2_registers() {
    embed_case("dinov2-reg");
}
#[test]
fn embed_clip_vision() {
    embed_case("clip-vision");
}
#[test]
fn embed_clip_model() {
    embed_case("clip");
}

fn scores_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(vision_golden("scores.json")).unwrap()).unwrap()
}

/// DINO / CLIP-I / CLIP-T cosines of the library's encoders against torch's, on the pairs of
/// committed images that scores.json lists.
#[test]
fn scores_match_torch_cosines() {
    use toffee::pipeline::score::{cosine, ImageEncoder};
    let s = scores_json();
    let imgs: Vec<image::RgbImage> = images()
        .iter()
        .map(|p| toffee::image_proc::load_rgb8(p).unwrap())
        .collect();
    let pairs: Vec<(usize, usize)> = s["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_u64().unwrap() as usize,
                p[1].as_u64().unwrap() as usize,
            )
        })
        .collect();
    for (key, field) in [("dino-vit", "dino"), ("dinov2", "dino"), ("clip", "clip_i")] {
        let enc = ImageEncoder::load(
            &fixtures().join(s["models"][key]["model"].as_str().unwrap()),
            &Device::Cpu,
        )
        .unwrap();
        let e = enc.embed(&imgs).unwrap();
        for (k, &(a, b)) in pairs.iter().enumerate() {
            let want = s["models"][key][field][k].as_f64().unwrap() as f32;
            let got = cosine(&e[a], &e[b]);
            assert!(
                (got - want).abs() < 1e-5,
                "{key} {field} pair {k}: {got} vs {want}"
            );
        }
    }
    let scorer = toffee::pipeline::score::Scorer::load(
        &fixtures().join("vision/dinov2"),
        &fixtures().join("vision/clip"),
        &Device::Cpu,
    )
    .unwrap();
    let prompts: Vec<&str> = s["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let text = scorer.text_embeddings(&prompts).unwrap();
    let img_e = scorer.clip.embed(&imgs).unwrap();
    for (i, e) in img_e.iter().enumerate() {
        for (j, t) in text.iter().enumerate() {
            let want = s["models"]["clip"]["clip_t"][i][j].as_f64().unwrap() as f32;
            let got = cosine(e, t);
            assert!(
                (got - want).abs() < 1e-5,
                "clip_t [{i}][{j}]: {got} vs {want}"
            );
        }
    }
}

fn score_args<'a>(extra: &[&'a str], dino: &'a str, clip: &'a str) -> Vec<&'a str> {
    let mut v = vec!["score", "--dino", dino, "--clip", clip];
    v.extend_from_slice(extra);
    v
}

/// `toffee score` prints the same numbers as the library, and a whole-image mask changes
/// nothing but the crop; --pairs writes one line per record in order.
#[test]
fn score_cli_single_and_pairs() {
    let s = scores_json();
    let dino = fixtures().join("vision/dinov2");
    let clip = fixtures().join("vision/clip");
    let (d, c) = (dino.to_str().unwrap(), clip.to_str().unwrap());
    let imgs = images();
    let (a, b) = (imgs[0].to_str().unwrap(), imgs[1].to_str().unwrap());
    let o = toffee(&score_args(
        &[
            "--subject",
            a,
            "--target",
            b,
            "--prompt",
            "a photo of a cat",
            "--json",
        ],
        d,
        c,
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let close = |x: &serde_json::Value, y: &serde_json::Value| {
        (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-5
    };
    assert!(close(&v["dino"], &s["models"]["dinov2"]["dino"][0]), "{v}");
    assert!(
        close(&v["clip_i"], &s["models"]["clip"]["clip_i"][0]),
        "{v}"
    );
    assert!(
        close(&v["clip_t"], &s["models"]["clip"]["clip_t"][1][0]),
        "{v}"
    );

    let dir = tempfile::tempdir().unwrap();
    for (i, p) in imgs.iter().enumerate() {
        std::fs::copy(p, dir.path().join(format!("{i}.png"))).unwrap();
    }
    let jsonl = dir.path().join("pairs.jsonl");
    std::fs::write(
        &jsonl,
        "{\"subject\": \"0.png\", \"target\": \"1.png\", \"prompt\": \"a photo of a cat\"}\n\
         \n\
         {\"subject\": \"1.png\", \"target\": \"2.png\", \"prompt\": \"a red square on a blue background\"}\n\
         {\"subject\": \"0.png\", \"target\": \"2.png\", \"prompt\": \"a photo of a cat\"}\n",
    )
    .unwrap();
    let out = dir.path().join("scored.jsonl");
    let o = toffee(&score_args(
        &[
            "--pairs",
            jsonl.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--batch",
            "2",
        ],
        d,
        c,
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[1]["subject"], "1.png");
    // pairs in scores.json: (0,1), (0,2), (1,2).
    assert!(close(&lines[0]["dino"], &s["models"]["dinov2"]["dino"][0]));
    assert!(close(&lines[1]["dino"], &s["models"]["dinov2"]["dino"][2]));
    assert!(close(
        &lines[2]["clip_i"],
        &s["models"]["clip"]["clip_i"][1]
    ));
    assert!(close(
        &lines[1]["clip_t"],
        &s["models"]["clip"]["clip_t"][2][1]
    ));
}

/// The masked variant: bounding box on a square canvas of the encoder's mean colour.
#[test]
fn masked_variant_crops_to_the_mask_and_fills_outside() {
    use toffee::pipeline::score::{cut_to_mask, Mask};
    let img = image::RgbImage::from_fn(10, 6, |x, y| image::Rgb([x as u8 * 20, y as u8 * 40, 7]));
    let mut values = vec![0.0; 60];
    // A 3-wide, 2-high box at (4, 1) with one hole.
    for (x, y) in [(4, 1), (5, 1), (6, 1), (4, 2), (6, 2)] {
        values[y * 10 + x] = 1.0;
    }
    let m = Mask {
        width: 10,
        height: 6,
        values,
    };
    let out = cut_to_mask(&img, &m, [1, 2, 3], "test").unwrap();
    assert_eq!(out.dimensions(), (3, 3));
    // Rows: padding row on top ((3 - 2) / 2 = 0 → box at the top), then the box.
    assert_eq!(out.get_pixel(0, 0).0, [80, 40, 7]);
    assert_eq!(out.get_pixel(1, 1).0, [1, 2, 3], "the hole is filled");
    assert_eq!(out.get_pixel(2, 1).0, [120, 80, 7]);
    assert_eq!(out.get_pixel(0, 2).0, [1, 2, 3], "padding is filled");
    let empty = Mask {
        width: 10,
        height: 6,
        values: vec![0.0; 60],
    };
    let e = cut_to_mask(&img, &empty, [0; 3], "subject.png")
        .unwrap_err()
        .to_string();
    assert!(e.contains("subject.png") && e.contains("empty"), "{e}");
    let wrong = Mask {
        width: 5,
        height: 6,
        values: vec![1.0; 30],
    };
    let e = cut_to_mask(&img, &wrong, [0; 3], "subject.png")
        .unwrap_err()
        .to_string();
    assert!(e.contains("5x6") && e.contains("10x6"), "{e}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.png");
    std::fs::write(&bad, b"not a png").unwrap();
    let model = fixtures().join("vision/dinov2");
    let out = dir.path().join("o.safetensors");
    let e = expect_error(&toffee(&[
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--images",
        bad.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(e.contains("bad.png"), "{e}");
    assert!(!out.exists());

    // A folder without preprocessor_config.json.
    let copy = dir.path().join("noproc");
    crate::common::copy_tree(&model, &copy);
    std::fs::remove_file(copy.join("preprocessor_config.json")).unwrap();
    let img = images()[0].clone();
    let e = expect_error(&toffee(&[
        "embed",
        "--model",
        copy.to_str().unwrap(),
        "--images",
        img.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(
        e.contains("preprocessor_config.json") && e.contains("noproc"),
        "{e}"
    );

    // A mask of the wrong size.
    let mask = dir.path().join("mask.png");
    image::GrayImage::from_pixel(5, 5, image::Luma([255]))
        .save(&mask)
        .unwrap();
    let clip = fixtures().join("vision/clip");
    let e = expect_error(&toffee(&score_args(
        &[
            "--subject",
            img.to_str().unwrap(),
            "--target",
            img.to_str().unwrap(),
            "--subject-mask",
            mask.to_str().unwrap(),
            "--prompt",
            "x",
        ],
        model.to_str().unwrap(),
        clip.to_str().unwrap(),
    )));
    assert!(e.contains("5x5") && e.contains("37x53"), "{e}");

    // A non-training size for a model that does not interpolate.
    let inputs = dir.path().join("in.safetensors");
    toffee::weights::safetensors::write_f32(
        &inputs,
        &[("pixel_values".into(), Tensor::zeros(vec![1, 3, 16, 16]))],
    )
    .unwrap();
    let e = expect_error(&crate::common::forward_at(
        &fixtures().join("vision/clip-vision"),
        "image-encoder",
        &inputs,
        &out,
        &[],
    ));
    assert!(e.contains("16x16") && e.contains("32x32"), "{e}");

    // CLIP given as --dino.
    let e = expect_error(&toffee(&score_args(
        &[
            "--subject",
            img.to_str().unwrap(),
            "--target",
            img.to_str().unwrap(),
            "--prompt",
            "x",
        ],
        clip.to_str().unwrap(),
        clip.to_str().unwrap(),
    )));
    assert!(e.contains("--dino"), "{e}");
}

#[test]
fn inspect_describes_vision_models() {
    for (dir, want) in [
        ("vision/dinov2-reg", "4 register tokens"),
        ("vision/dinov2-swiglu", "SwiGLU"),
        ("vision/clip", "with the CLIP text tower"),
        ("vision/clip-vision-proj", "projection_dim 16"),
        ("vision/dino-vit", "patch size 8"),
    ] {
        let p = fixtures().join(dir);
        let o = toffee(&["inspect", p.to_str().unwrap(), "--load"]);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success(), "{dir}: {}", stderr(&o));
        assert!(
            text.contains(want) && text.contains("loaded: ok"),
            "{dir}: {text}"
        );
        assert!(text.contains("parameters"), "{text}");
    }
}

#[test]
fn bench_runs_image_encoders() {
    for dir in ["vision/dinov2", "vision/clip"] {
        let p = fixtures().join(dir);
        let o = toffee(&[
            "bench",
            "--config",
            p.to_str().unwrap(),
            "--component",
            "image-encoder",
            "--batch",
            "2",
            "--iters",
            "1",
            "--warmup",
            "1",
            "--json",
        ]);
        assert!(o.status.success(), "{dir}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["component"], "image-encoder");
        assert!(v["calls_per_s"].as_f64().unwrap() > 0.0);
    }
    // An SD configuration has no image encoder.
    let e = expect_error(&toffee(&[
        "bench",
        "--config",
        "sd15",
        "--component",
        "image-encoder",
    ]));
    assert!(e.contains("dinov2-b14"), "{e}");
}
