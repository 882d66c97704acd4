//! CLIPSegForImageSegmentation against transformers 5.23 goldens (tests/fixtures/golden/
//! segment_depth, made by tools/fixtures/segment_depth.py): every output of the four logits cases
//! (fp32 CPU, max abs error ≤ 1e-4), the image processor, image file → probabilities, the CLI, and
//! the errors.

use crate::common::{expect_error, fixtures, forward_at, stderr, toffee};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use toffee::backend::Device;
use toffee::builtin::clipseg_config as builtin_config;
use toffee::config::Config;
use toffee::forward::{self, Component};
use toffee::models::clipseg::{ClipSeg, ClipSegSegmenter};
use toffee::tensor::Tensor;
use toffee::weights::safetensors::{read_all, write_f32};
use toffee::weights::WeightStore;

fn golden(name: &str) -> PathBuf {
    fixtures().join("golden/segment_depth").join(name)
}

fn case(name: &str) -> serde_json::Value {
    crate::common::manifest_case(&golden("manifest.json"), name)
}

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("segment_depth").join(name)
}

fn ids_of(t: &Tensor) -> Vec<Vec<u32>> {
    let l = t.shape()[1];
    t.data()
        .chunks(l)
        .map(|r| r.iter().map(|&v| v as u32).collect())
        .collect()
}

fn rgb_of(t: &Tensor) -> image::RgbImage {
    let (h, w) = (t.shape()[0] as u32, t.shape()[1] as u32);
    image::RgbImage::from_raw(w, h, t.data().iter().map(|&v| v as u8).collect()).unwrap()
}

/// A logits case through `forward::run` (the CLI's path): every golden output, nothing extra.
fn run_case(name: &str) {
    let c = case(name);
    let model = fixtures().join(c["model"].as_str().unwrap());
    let in_path = golden(c["inputs"].as_str().unwrap());
    let inputs = read_all(&in_path).unwrap();
    let want = read_all(&golden(c["outputs"].as_str().unwrap())).unwrap();
    let got = forward::run(&model, Component::Clipseg, &inputs, &in_path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let got: BTreeMap<String, Tensor> = got.into_iter().collect();
    let names: Vec<&str> = c["output_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        got.keys().map(String::as_str).collect::<Vec<_>>(),
        names,
        "{name}: output names"
    );
    for n in names {
        crate::common::assert_close(&format!("{name}/{n}"), &got[n], &want[n], 1e-4);
    }
}

#[test]
fn logits_simple_head() {
    run_case("clipseg_logits");
}

#[test]
fn logits_complex_head_three_steps_film_at_step_1() {
    run_case("clipseg-b_logits");
}

#[test]
fn logits_interpolated_up_to_64() {
    run_case("clipseg_logits_64");
}

#[test]
fn logits_interpolated_down_to_32_complex_head() {
    run_case("clipseg-b_logits_32");
}

/// The library API on the same golden: one prompt per image, NCHW pixels, activations in
/// `extract_layers` order.
#[test]
fn library_forward_matches_the_golden() {
    let model = ClipSeg::load_dir(&model_dir("clipseg-b"), &Device::Cpu).unwrap();
    assert_eq!(model.image_size(), 48);
    let inputs = read_all(&golden("clipseg_logits.in.safetensors")).unwrap();
    let want = read_all(&golden("clipseg-b_logits.out.safetensors")).unwrap();
    let o = model
        .forward(&ids_of(&inputs["input_ids"]), &inputs["pixel_values"])
        .unwrap();
    crate::common::assert_close("logits", &o.logits, &want["logits"], 1e-4);
    assert_eq!(o.activations.len(), 3);
    for (j, a) in o.activations.iter().enumerate() {
        crate::common::assert_close(
            &format!("activations.{j}"),
            a,
            &want[&format!("activations.{j}")],
            1e-4,
        );
    }
}

#[test]
fn processor_from_either_config_file() {
    let c = case("proc_clipseg_tall_45x130");
    let inputs = read_all(&golden(c["inputs"].as_str().unwrap())).unwrap();
    let want = read_all(&golden(c["outputs"].as_str().unwrap())).unwrap();
    let img = rgb_of(&inputs["rgb"]);
    assert_eq!((img.width(), img.height()), (45, 130));
    let dir = model_dir("clipseg");
    let seg = ClipSegSegmenter::from_dir(&dir, &Device::Cpu).unwrap();
    let px = seg.processor.pixel_values(std::slice::from_ref(&img));
    crate::common::assert_close("pixel_values", &px, &want["pixel_values"], 1e-5);
    // Without preprocessor_config.json: processor_config.json's nested `image_processor`.
    let tmp = tempfile::tempdir().unwrap();
    crate::common::copy_tree(&dir, tmp.path());
    std::fs::remove_file(tmp.path().join("preprocessor_config.json")).unwrap();
    let seg2 = ClipSegSegmenter::from_dir(tmp.path(), &Device::Cpu).unwrap();
    let px2 = seg2.processor.pixel_values(std::slice::from_ref(&img));
    assert_eq!(px2.data(), px.data());
    // Neither file: an error naming the folder.
    std::fs::remove_file(tmp.path().join("processor_config.json")).unwrap();
    let e = format!(
        "{:#}",
        ClipSegSegmenter::from_dir(tmp.path(), &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(e.contains("preprocessor_config.json"), "{e}");
    assert!(e.contains(&tmp.path().display().to_string()), "{e}");
}

/// Image file → processor + tokenizer → model → sigmoid, as the golden's CLIPSegProcessor call.
#[test]
fn e2e_photo_probabilities() {
    let c = case("e2e_clipseg_photo");
    let inputs = read_all(&golden(c["inputs"].as_str().unwrap())).unwrap();
    let want = read_all(&golden(c["outputs"].as_str().unwrap())).unwrap();
    let seg = ClipSegSegmenter::from_dir(&model_dir("clipseg"), &Device::Cpu).unwrap();
    let prompts: Vec<String> = c["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    // The tokenizer and processor on their own first, so a failure says which stage.
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let ids = seg.tokenizer.encode_batch(&refs).unwrap();
    assert_eq!(ids, ids_of(&inputs["input_ids"]));
    let img = rgb_of(&inputs["rgb"]);
    let px = seg.processor.pixel_values(std::slice::from_ref(&img));
    crate::common::assert_close("pixel_values", &px, &inputs["pixel_values"], 1e-5);
    let probs = seg.probs(&img, &prompts).unwrap();
    crate::common::assert_close("probs", &probs, &want["probs"], 1e-4);
    // From the image file itself: our JPEG decoder is not Pillow's libjpeg (pixels differ by a
    // few levels), so only close.
    let file = fixtures().join(c["image"].as_str().unwrap());
    let decoded = toffee::image_proc::load_rgb8(&file).unwrap();
    assert_eq!(decoded.dimensions(), img.dimensions());
    let from_file = seg.probs(&decoded, &prompts).unwrap();
    crate::common::assert_close("probs (decoded here)", &from_file, &want["probs"], 2e-2);
    assert!(seg.probs(&img, &[]).is_err());
}

#[test]
fn non_square_input_is_an_error() {
    let model = ClipSeg::load_dir(&model_dir("clipseg"), &Device::Cpu).unwrap();
    let inputs = read_all(&golden("clipseg_logits.in.safetensors")).unwrap();
    let ids = ids_of(&inputs["input_ids"]);
    let px = Tensor::zeros(vec![2, 3, 48, 64]);
    let e = format!("{:#}", model.forward(&ids, &px).err().unwrap());
    assert!(e.contains("48x64") && e.contains("square"), "{e}");
    // Prompts and images must pair up.
    let px = Tensor::zeros(vec![1, 3, 48, 48]);
    let e = format!("{:#}", model.forward(&ids, &px).err().unwrap());
    assert!(
        e.contains("input_ids") && e.contains("2 token sequences"),
        "{e}"
    );
    // Through the CLI: exit 1, the inputs file named, no output written.
    let tmp = tempfile::tempdir().unwrap();
    let in_path = tmp.path().join("in.safetensors");
    write_f32(
        &in_path,
        &[
            ("input_ids".into(), inputs["input_ids"].clone()),
            ("pixel_values".into(), Tensor::zeros(vec![2, 3, 48, 64])),
        ],
    )
    .unwrap();
    let out = tmp.path().join("out.safetensors");
    let e = expect_error(&forward_at(
        &model_dir("clipseg"),
        "clipseg",
        &in_path,
        &out,
        &[],
    ));
    assert!(e.contains("in.safetensors") && e.contains("square"), "{e}");
    assert!(!out.exists());
}

/// Rewrites `dir/config.json` with `edit` applied.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn load_error(dir: &Path) -> String {
    format!("{:#}", ClipSeg::load_dir(dir, &Device::Cpu).err().unwrap())
}

#[test]
fn bad_config_and_missing_tensors_name_the_file_and_the_thing() {
    let src = model_dir("clipseg-b");
    let fresh = || {
        let t = tempfile::tempdir().unwrap();
        crate::common::copy_tree(&src, t.path());
        t
    };
    // A decoder tensor missing from the weights file.
    let t = fresh();
    let st = t.path().join("model.safetensors");
    let store = WeightStore::open_file(&st).unwrap();
    let kept: Vec<(String, Tensor)> = store
        .names()
        .filter(|n| *n != "decoder.film_mul.weight")
        .map(|n| (n.to_string(), store.get_any(n).unwrap()))
        .collect();
    drop(store);
    write_f32(&st, &kept).unwrap();
    let e = load_error(t.path());
    assert!(
        e.contains("model.safetensors") && e.contains("decoder.film_mul.weight"),
        "{e}"
    );
    // A vision-tower tensor missing: the tower is named.
    let t = fresh();
    let st = t.path().join("model.safetensors");
    let store = WeightStore::open_file(&st).unwrap();
    let kept: Vec<(String, Tensor)> = store
        .names()
        .filter(|n| *n != "clip.vision_model.pre_layrnorm.weight")
        .map(|n| (n.to_string(), store.get_any(n).unwrap()))
        .collect();
    drop(store);
    write_f32(&st, &kept).unwrap();
    let e = load_error(t.path());
    assert!(
        e.contains("model.safetensors")
            && e.contains("clip.vision_model")
            && e.contains("pre_layrnorm.weight"),
        "{e}"
    );
    // extract_layers past the vision tower.
    let t = fresh();
    edit_config(t.path(), |v| {
        v["extract_layers"] = serde_json::json!([0, 9])
    });
    let e = load_error(t.path());
    assert!(
        e.contains("config.json") && e.contains("extract_layers"),
        "{e}"
    );
    // A wrong model_type.
    let t = fresh();
    edit_config(t.path(), |v| v["model_type"] = "clip".into());
    let e = load_error(t.path());
    assert!(e.contains("config.json") && e.contains("model_type"), "{e}");
    // reduce_dim not matching the stored decoder.
    let t = fresh();
    edit_config(t.path(), |v| v["reduce_dim"] = 24.into());
    let e = load_error(t.path());
    assert!(
        e.contains("model.safetensors") && e.contains("decoder.reduces.0"),
        "{e}"
    );
    // No vision_config.
    let t = fresh();
    edit_config(t.path(), |v| {
        v.as_object_mut().unwrap().remove("vision_config");
    });
    let e = load_error(t.path());
    assert!(
        e.contains("config.json") && e.contains("vision_config"),
        "{e}"
    );
    // Not a folder.
    let e = load_error(&src.join("nope"));
    assert!(e.contains("nope"), "{e}");
}

/// transformers' decoder never reads `decoder_hidden_act` (it is always ReLU): changing it
/// changes nothing.
#[test]
fn decoder_hidden_act_is_ignored_like_transformers() {
    let t = tempfile::tempdir().unwrap();
    crate::common::copy_tree(&model_dir("clipseg"), t.path());
    edit_config(t.path(), |v| v["decoder_hidden_act"] = "gelu".into());
    let a = ClipSeg::load_dir(t.path(), &Device::Cpu).unwrap();
    let inputs = read_all(&golden("clipseg_logits.in.safetensors")).unwrap();
    let want = read_all(&golden("clipseg_logits.out.safetensors")).unwrap();
    let o = a
        .forward(&ids_of(&inputs["input_ids"]), &inputs["pixel_values"])
        .unwrap();
    crate::common::assert_close("logits", &o.logits, &want["logits"], 1e-4);
}

/// The built-in demo config with random weights, and the fixture's config with random weights
/// (simple head): both run, give finite probabilities of the model's size, and are deterministic.
#[test]
fn builtin_and_random_weights_run() {
    let seg = toffee::builtin::clipseg_segmenter(&Device::Cpu).unwrap();
    let s = seg.model.image_size();
    assert_eq!(s, builtin_config()["vision_config"]["image_size"]);
    let img = image::RgbImage::from_fn(37, 23, |x, y| image::Rgb([x as u8 * 6, y as u8 * 9, 77]));
    let prompts = vec!["a cat".to_string(), "the sky".into(), "".into()];
    let p = seg.probs(&img, &prompts).unwrap();
    assert_eq!(p.shape(), [3, s, s]);
    assert!(p
        .data()
        .iter()
        .all(|v| v.is_finite() && (0.0..=1.0).contains(v)));
    let spread = p
        .data()
        .iter()
        .fold(0.0f32, |m, v| m.max((v - p.data()[0]).abs()));
    assert!(spread > 1e-4, "constant output");
    let again = toffee::builtin::clipseg_segmenter(&Device::Cpu)
        .unwrap()
        .probs(&img, &prompts)
        .unwrap();
    assert_eq!(p.data(), again.data());

    let cfg = Config::read(&model_dir("clipseg").join("config.json")).unwrap();
    let m = ClipSeg::load(&cfg, &WeightStore::random(5), &Device::Cpu).unwrap();
    let ids = vec![vec![49406, 320, 49407, 49407]];
    let o = m.forward(&ids, &Tensor::zeros(vec![1, 3, 40, 40])).unwrap();
    assert_eq!(o.logits.shape(), [1, 40, 40]);
    assert_eq!(o.activations.len(), 2);
    assert!(o.logits.data().iter().all(|v| v.is_finite()));
}

#[test]
fn cli_forward_writes_every_output() {
    let c = case("clipseg_logits");
    let in_path = golden(c["inputs"].as_str().unwrap());
    let want = read_all(&golden(c["outputs"].as_str().unwrap())).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let o = forward_at(&model_dir("clipseg"), "clipseg", &in_path, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = read_all(&out).unwrap();
    assert_eq!(got.len(), want.len());
    for (n, w) in &want {
        crate::common::assert_close(&format!("cli/{n}"), &got[n], w, 1e-4);
    }
    // Missing input: named.
    let only_px = tmp.path().join("px.safetensors");
    let inputs = read_all(&in_path).unwrap();
    write_f32(
        &only_px,
        &[("pixel_values".into(), inputs["pixel_values"].clone())],
    )
    .unwrap();
    let e = expect_error(&forward_at(
        &model_dir("clipseg"),
        "clipseg",
        &only_px,
        &tmp.path().join("o2.safetensors"),
        &[],
    ));
    assert!(
        e.contains("px.safetensors") && e.contains("input_ids"),
        "{e}"
    );
    // No benchmark for it yet: a clear error.
    let dir = model_dir("clipseg");
    let e = expect_error(&toffee(&[
        "bench",
        "--config",
        dir.to_str().unwrap(),
        "--component",
        "clipseg",
    ]));
    assert!(e.contains("clipseg") && e.contains("no benchmark"), "{e}");
}
