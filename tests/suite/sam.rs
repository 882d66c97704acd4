//! SAM (transformers `SamModel` + `SamProcessor`) against the goldens of
//! tools/fixtures/segment_depth.py (tests/fixtures/golden/segment_depth): fp32 CPU, max abs error
//! ≤ 1e-4; the processor, post-processing and the CLI.

use crate::common::fixtures;
use std::collections::BTreeMap;
use std::path::PathBuf;
use toffee::backend::Device;
use toffee::builtin::sam_config as builtin_config;
use toffee::config::Config;
use toffee::image_proc::sam::SamProcessor;
use toffee::models::sam::{Prompts, Sam};
use toffee::tensor::Tensor;
use toffee::weights::safetensors::{read_all, write_f32};
use toffee::weights::WeightStore;

fn golden(name: &str) -> PathBuf {
    fixtures().join("golden/segment_depth").join(name)
}

fn model_dir() -> PathBuf {
    fixtures().join("segment_depth/sam")
}

fn read(name: &str) -> BTreeMap<String, Tensor> {
    read_all(&golden(name)).unwrap()
}

fn close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    crate::common::assert_close(what, got, want, tol);
}

fn model_case(name: &str, boxes: bool, multimask: bool) {
    let sam = Sam::load_dir(&model_dir(), &Device::Cpu).unwrap();
    let inp = read("sam.in.safetensors");
    let want = read(&format!("{name}.out.safetensors"));
    let px = inp["pixel_values"].to_nhwc();
    let prompts = if boxes {
        Prompts::new(1, None, None, Some(&inp["input_boxes"])).unwrap()
    } else {
        Prompts::new(
            1,
            Some(&inp["input_points"]),
            Some(&inp["input_labels"]),
            None,
        )
        .unwrap()
    };
    let out = sam.forward(&px, &prompts, multimask).unwrap();
    close(
        &format!("{name}/image_embeddings"),
        &out.image_embeddings.to_host().unwrap().to_nchw(),
        &want["image_embeddings"],
        1e-4,
    );
    close(
        &format!("{name}/pred_masks"),
        &out.pred_masks,
        &want["pred_masks"],
        1e-4,
    );
    close(
        &format!("{name}/iou_scores"),
        &out.iou_scores,
        &want["iou_scores"],
        1e-4,
    );
}

#[test]
fn sam_boxes_multimask_true() {
    model_case("sam_boxes_multimask_true", true, true);
}

#[test]
fn sam_boxes_multimask_false() {
    model_case("sam_boxes_multimask_false", true, false);
}

#[test]
fn sam_points_multimask_true() {
    model_case("sam_points_multimask_true", false, true);
}

#[test]
fn sam_points_multimask_false() {
    model_case("sam_points_multimask_false", false, false);
}

fn processor() -> SamProcessor {
    SamProcessor::from_dir(&model_dir()).unwrap()
}

/// An RgbImage from a golden's `rgb` [H, W, 3] tensor.
fn rgb(t: &Tensor) -> image::RgbImage {
    let (h, w) = (t.shape()[0] as u32, t.shape()[1] as u32);
    image::RgbImage::from_raw(w, h, t.data().iter().map(|v| *v as u8).collect()).unwrap()
}

fn case_box(name: &str) -> [f32; 4] {
    let c = crate::common::manifest_case(&golden("manifest.json"), name);
    let b: Vec<f32> = c["box_xyxy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    [b[0], b[1], b[2], b[3]]
}

fn sizes(t: &Tensor) -> (usize, usize) {
    (t.data()[0] as usize, t.data()[1] as usize)
}

#[test]
fn proc_sam_tiny_7x5() {
    let inp = read("proc_sam_tiny_7x5.in.safetensors");
    let want = read("proc_sam_tiny_7x5.out.safetensors");
    let p = processor();
    let got = p.preprocess(&rgb(&inp["rgb"])).unwrap();
    close(
        "proc/pixel_values",
        &got.pixel_values,
        &want["pixel_values"],
        1e-5,
    );
    assert_eq!(got.original_size, sizes(&want["original_sizes"]));
    assert_eq!(got.reshaped_size, sizes(&want["reshaped_input_sizes"]));
    let b = p.rescale_boxes(&[case_box("proc_sam_tiny_7x5")], got.original_size);
    close(
        "proc/input_boxes",
        &Tensor::new(vec![1, 1, 4], b[0].to_vec()),
        &want["input_boxes"],
        1e-5,
    );
}

/// The processor config nested in processor_config.json reads the same as preprocessor_config.json.
#[test]
fn processor_from_nested_processor_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        model_dir().join("processor_config.json"),
        dir.path().join("processor_config.json"),
    )
    .unwrap();
    let a = SamProcessor::from_dir(dir.path()).unwrap();
    let b = processor();
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
    let e = SamProcessor::from_dir(&dir.path().join("nowhere")).unwrap_err();
    assert!(format!("{e:#}").contains("nowhere"), "{e:#}");
    std::fs::write(
        dir.path().join("preprocessor_config.json"),
        r#"{"size": {"longest_edge": "big"}}"#,
    )
    .unwrap();
    let e = format!("{:#}", SamProcessor::from_dir(dir.path()).unwrap_err());
    assert!(
        e.contains("preprocessor_config.json") && e.contains("size"),
        "{e}"
    );
}

/// Image file -> processor -> model -> post_process_masks, against transformers end to end.
fn e2e_case(name: &str) {
    let inp = read(&format!("{name}.in.safetensors"));
    let want = read(&format!("{name}.out.safetensors"));
    let p = processor();
    let sam = Sam::load_dir(&model_dir(), &Device::Cpu).unwrap();
    let img = rgb(&inp["rgb"]);
    let pre = p.preprocess(&img).unwrap();
    close(
        &format!("{name}/pixel_values"),
        &pre.pixel_values,
        &inp["pixel_values"],
        1e-5,
    );
    assert_eq!(pre.original_size, sizes(&inp["original_sizes"]));
    assert_eq!(pre.reshaped_size, sizes(&inp["reshaped_input_sizes"]));
    let bx = case_box(name);
    let scaled = p.rescale_boxes(&[bx], pre.original_size);
    let bt = Tensor::new(vec![1, 1, 4], scaled[0].to_vec());
    close(
        &format!("{name}/input_boxes"),
        &bt,
        &inp["input_boxes"],
        1e-5,
    );
    let prompts = Prompts::new(1, None, None, Some(&bt)).unwrap();
    let out = sam
        .forward(&pre.pixel_values.to_nhwc(), &prompts, true)
        .unwrap();
    close(
        &format!("{name}/pred_masks"),
        &out.pred_masks,
        &want["pred_masks"],
        1e-4,
    );
    close(
        &format!("{name}/iou_scores"),
        &out.iou_scores,
        &want["iou_scores"],
        1e-4,
    );
    let logits = p
        .post_process_masks(&out.pred_masks, pre.original_size, pre.reshaped_size)
        .unwrap();
    // [n_boxes, M, H, W], as post_process_masks(...)[0].
    let wl = &want["masks_logits"];
    close(&format!("{name}/masks_logits"), &logits, wl, 1e-4);
    // The same through segment_boxes: binary masks equal where the logit is not within the
    // tolerance of the threshold.
    let got = toffee::models::sam::segment_boxes(&sam, &p, &img, &[bx], true).unwrap();
    assert_eq!(got.len(), 1);
    let g = &got[0];
    assert_eq!(
        (g.width, g.height),
        (img.width() as usize, img.height() as usize)
    );
    let wm = want["masks"].data();
    let plane = g.width * g.height;
    let mut ones = 0;
    for (j, m) in g.masks.iter().enumerate() {
        for (i, &v) in m.iter().enumerate() {
            let k = j * plane + i;
            if wl.data()[k].abs() > 1e-4 {
                assert_eq!(v, wm[k] != 0.0, "{name}: mask {j} pixel {i}");
            }
            ones += v as usize;
        }
    }
    assert!(
        ones > 0 && ones < g.masks.len() * plane,
        "{name}: masks are trivial"
    );
    let best = want["best_index"].data()[0] as usize;
    let (bm, bs) = g.best();
    assert_eq!(bm, g.masks[best].as_slice(), "{name}: best mask");
    assert!((bs - want["iou_scores"].data()[best]).abs() < 1e-4);
}

#[test]
fn e2e_sam_photo() {
    e2e_case("e2e_sam_photo");
}

#[test]
fn e2e_sam_coffee_41x55() {
    e2e_case("e2e_sam_coffee_41x55");
}

#[test]
fn segment_boxes_rejects_bad_boxes() {
    let sam = Sam::load_dir(&model_dir(), &Device::Cpu).unwrap();
    let p = processor();
    let img = image::RgbImage::new(40, 30);
    for (b, what) in [
        ([0.0, 0.0, 41.0, 10.0], "outside"),
        ([-1.0, 0.0, 10.0, 10.0], "outside"),
        ([5.0, 5.0, 5.0, 10.0], "empty"),
        ([f32::NAN, 0.0, 10.0, 10.0], "not finite"),
    ] {
        let e = format!(
            "{:#}",
            toffee::models::sam::segment_boxes(&sam, &p, &img, &[[1.0, 1.0, 9.0, 9.0], b], true)
                .unwrap_err()
        );
        assert!(e.contains("box 1") && e.contains(what), "{b:?}: {e}");
    }
    let ok = toffee::models::sam::segment_boxes(&sam, &p, &img, &[[1.0, 1.0, 40.0, 30.0]], false)
        .unwrap();
    assert_eq!(ok[0].masks.len(), 1);
    assert_eq!(ok[0].masks[0].len(), 40 * 30);
}

#[test]
fn prompt_shapes_are_checked() {
    let pts = Tensor::zeros(vec![1, 2, 3, 2]);
    let e = |r: anyhow::Result<Prompts>| format!("{:#}", r.err().unwrap());
    assert!(e(Prompts::new(2, Some(&pts), None, None)).contains("input_points"));
    let bad_labels = Tensor::zeros(vec![1, 2, 2]);
    assert!(e(Prompts::new(1, Some(&pts), Some(&bad_labels), None)).contains("input_labels"));
    let boxes = Tensor::zeros(vec![1, 3, 4]);
    assert!(e(Prompts::new(1, Some(&pts), None, Some(&boxes))).contains("boxes"));
    assert!(e(Prompts::new(1, None, Some(&bad_labels), None)).contains("input_labels"));
    let nan = Tensor::new(vec![1, 1, 4], vec![f32::NAN, 0.0, 1.0, 1.0]);
    assert!(e(Prompts::new(1, None, None, Some(&nan))).contains("non-finite"));
    // Points and boxes together (one box per point batch) run.
    let sam = Sam::load_dir(&model_dir(), &Device::Cpu).unwrap();
    let inp = read("sam.in.safetensors");
    let two = Tensor::new(vec![1, 2, 1, 2], vec![10.0, 12.0, 44.5, 30.0]);
    let lab = Tensor::new(vec![1, 2, 1], vec![1.0, 0.0]);
    let pr = Prompts::new(1, Some(&two), Some(&lab), Some(&inp["input_boxes"])).unwrap();
    let out = sam
        .forward(&inp["pixel_values"].to_nhwc(), &pr, true)
        .unwrap();
    assert_eq!(out.pred_masks.shape(), [1, 2, 3, 16, 16]);
    assert!(out.pred_masks.data().iter().all(|v| v.is_finite()));
}

#[test]
fn missing_tensor_and_bad_config_are_errors() {
    let dir = model_dir();
    let cfg = Config::read_dir(&dir).unwrap();
    let mut store = toffee::weights::layout::open_weights(&dir).unwrap();
    store.retain(|n| n != "vision_encoder.layers.1.attn.rel_pos_h");
    let e = format!("{:#}", Sam::load(&cfg, &store, &Device::Cpu).err().unwrap());
    assert!(e.contains("vision_encoder.layers.1.attn.rel_pos_h"), "{e}");
    let bad = |patch: serde_json::Value, want: &str| {
        let mut j = builtin_config();
        merge(&mut j, &patch);
        let c = Config::from_json("<sam>/config.json", j).unwrap();
        let e = format!(
            "{:#}",
            Sam::load(&c, &WeightStore::random(1), &Device::Cpu)
                .err()
                .unwrap()
        );
        assert!(e.contains(want), "{patch}: {e}");
    };
    bad(
        serde_json::json!({"prompt_encoder_config": {"image_embedding_size": 5}}),
        "image_embedding_size",
    );
    bad(
        serde_json::json!({"vision_config": {"hidden_size": 1000000}}),
        "hidden_size",
    );
    bad(
        serde_json::json!({"vision_config": {"num_attention_heads": 3}}),
        "num_attention_heads",
    );
    bad(
        serde_json::json!({"mask_decoder_config": {"hidden_act": "mish"}}),
        "hidden_act",
    );
    bad(serde_json::json!({"model_type": "sam2"}), "model_type");
    bad(
        serde_json::json!({"mask_decoder_config": {"hidden_size": 12}}),
        "hidden_size",
    );
}

fn merge(a: &mut serde_json::Value, b: &serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b.clone(),
    }
}

/// Random weights (built-in demo models) with a second shape: no relative positions, window 2
/// (no padding), two global layers, one multimask output.
#[test]
fn random_weights_second_config() {
    let mut j = builtin_config();
    merge(
        &mut j,
        &serde_json::json!({
            "vision_config": {"use_rel_pos": false, "window_size": 2,
                              "global_attn_indexes": [0, 2], "mlp_dim": null, "mlp_ratio": 1.5},
            "mask_decoder_config": {"num_multimask_outputs": 1, "iou_head_depth": 2}
        }),
    );
    let c = Config::from_json("<sam>/config.json", j).unwrap();
    let sam = Sam::load(&c, &WeightStore::random(3), &Device::Cpu).unwrap();
    assert_eq!(sam.config.vision.mlp_dim, 48);
    let px = Tensor::new(
        vec![2, 64, 64, 3],
        (0..2 * 64 * 64 * 3)
            .map(|i| ((i % 97) as f32 / 48.0) - 1.0)
            .collect(),
    );
    let boxes = Tensor::new(
        vec![2, 1, 4],
        vec![1.0, 2.0, 30.0, 40.0, 10.0, 10.0, 60.0, 50.0],
    );
    let pr = Prompts::new(2, None, None, Some(&boxes)).unwrap();
    let out = sam.forward(&px, &pr, true).unwrap();
    assert_eq!(out.pred_masks.shape(), [2, 1, 1, 16, 16]);
    assert_eq!(out.iou_scores.shape(), [2, 1, 1]);
    assert!(out.pred_masks.data().iter().all(|v| v.is_finite()));
    // The two images differ, so their masks do.
    let (a, b) = out.pred_masks.data().split_at(256);
    assert!(a.iter().zip(b).any(|(x, y)| x != y));
    // Batch independence: image 1 alone gives the same masks.
    let one = Prompts::new(1, None, None, Some(&boxes.narrow0(1, 1))).unwrap();
    let o1 = sam.forward(&px.narrow0(1, 1), &one, true).unwrap();
    let d = o1
        .pred_masks
        .data()
        .iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(d < 1e-5, "batch dependence {d}");
    // Wrong input size is an error naming pixel_values.
    let e = format!(
        "{:#}",
        sam.forward(&Tensor::zeros(vec![1, 32, 32, 3]), &one, true)
            .err()
            .unwrap()
    );
    assert!(e.contains("pixel_values"), "{e}");
}

/// `toffee forward --component sam` on the given inputs (from sam.in.safetensors, plus extras):
/// the process output and the path it wrote to, inside `dir`.
fn forward_cli(
    dir: &std::path::Path,
    keys: &[&str],
    extra: &[(&str, Tensor)],
) -> (std::process::Output, PathBuf) {
    let inp = read("sam.in.safetensors");
    let mut tensors: Vec<(String, Tensor)> = keys
        .iter()
        .map(|k| (k.to_string(), inp[*k].clone()))
        .collect();
    tensors.extend(extra.iter().map(|(k, t)| (k.to_string(), t.clone())));
    let in_path = dir.join("in.safetensors");
    write_f32(&in_path, &tensors).unwrap();
    let out = dir.join("out.safetensors");
    let o = crate::common::forward_at(&model_dir(), "sam", &in_path, &out, &[]);
    (o, out)
}

#[test]
fn cli_forward_component_sam() {
    let dir = tempfile::tempdir().unwrap();
    let (o, out) = forward_cli(
        dir.path(),
        &["pixel_values", "input_boxes"],
        &[("multimask_output", Tensor::scalar(0.0))],
    );
    assert!(o.status.success(), "{}", crate::common::stderr(&o));
    let got = read_all(&out).unwrap();
    let want = read("sam_boxes_multimask_false.out.safetensors");
    for n in ["pred_masks", "iou_scores", "image_embeddings"] {
        close(&format!("cli/{n}"), &got[n], &want[n], 1e-4);
    }
    // Missing pixel_values: a clean error naming it.
    let (o, _) = forward_cli(dir.path(), &["input_boxes"], &[]);
    let e = crate::common::expect_error(&o);
    assert!(e.contains("pixel_values"), "{e}");
}

/// `forward --component sam` with point prompts and the default multimask_output (true).
#[test]
fn cli_forward_component_sam_points() {
    let dir = tempfile::tempdir().unwrap();
    let (o, out) = forward_cli(
        dir.path(),
        &["pixel_values", "input_points", "input_labels"],
        &[],
    );
    assert!(o.status.success(), "{}", crate::common::stderr(&o));
    let got = read_all(&out).unwrap();
    let want = read("sam_points_multimask_true.out.safetensors");
    for n in ["pred_masks", "iou_scores"] {
        close(&format!("cli-points/{n}"), &got[n], &want[n], 1e-4);
    }
}

/// A box outside the 64×64 input frame, a non-scalar multimask_output and a NaN coordinate are
/// clean CLI errors naming the inputs file and the tensor; no output file is left behind.
#[test]
fn cli_sam_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let inp = read("sam.in.safetensors");
    let in_path = dir.path().join("in.safetensors");
    let out = dir.path().join("out.safetensors");
    let cases: [(&str, Tensor, Option<Tensor>, &str); 3] = [
        (
            "input_boxes",
            Tensor::new(vec![1, 1, 4], vec![10.0, 10.0, 70.0, 20.0]),
            None,
            "outside",
        ),
        (
            "input_boxes",
            Tensor::new(vec![1, 1, 4], vec![10.0, f32::NAN, 30.0, 20.0]),
            None,
            "non-finite",
        ),
        (
            "multimask_output",
            Tensor::new(vec![2], vec![1.0, 1.0]),
            Some(inp["input_boxes"].clone()),
            "scalar",
        ),
    ];
    for (name, t, boxes, what) in cases {
        let mut v = vec![("pixel_values".to_string(), inp["pixel_values"].clone())];
        if let Some(b) = boxes {
            v.push(("input_boxes".into(), b));
        }
        v.push((name.into(), t));
        write_f32(&in_path, &v).unwrap();
        let o = crate::common::forward_at(&model_dir(), "sam", &in_path, &out, &[]);
        let e = crate::common::expect_error(&o);
        assert!(
            e.contains("in.safetensors") && e.contains(name) && e.contains(what),
            "{name}/{what}: {e}"
        );
        assert!(!out.exists(), "no output file after a failure");
    }
}

/// A damaged copy of the fixture folder: the CLI's errors name the file and the tensor / field.
#[test]
fn cli_sam_damaged_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("sam");
    crate::common::copy_tree(&model_dir(), &model);
    let weights = model.join("model.safetensors");
    let mut t: Vec<_> = read_all(&weights).unwrap().into_iter().collect();
    t.retain(|(k, _)| k != "mask_decoder.iou_prediction_head.proj_out.bias");
    write_f32(&weights, &t).unwrap();
    let out = dir.path().join("out.safetensors");
    let inp = read("sam.in.safetensors");
    let case = dir.path().join("in.safetensors");
    write_f32(
        &case,
        &[
            ("pixel_values".into(), inp["pixel_values"].clone()),
            ("input_boxes".into(), inp["input_boxes"].clone()),
        ],
    )
    .unwrap();
    let o = crate::common::forward_at(&model, "sam", &case, &out, &[]);
    let e = crate::common::expect_error(&o);
    assert!(
        e.contains("mask_decoder.iou_prediction_head.proj_out.bias")
            && e.contains("model.safetensors"),
        "{e}"
    );
    assert!(!out.exists());
    let cfg_path = model.join("config.json");
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    j["vision_config"]["hidden_act"] = "swish-ish".into();
    std::fs::write(&cfg_path, j.to_string()).unwrap();
    let o = crate::common::forward_at(&model, "sam", &case, &out, &[]);
    let e = crate::common::expect_error(&o);
    assert!(
        e.contains("config.json") && e.contains("hidden_act") && e.contains("swish-ish"),
        "{e}"
    );
    assert!(!out.exists());
}

/// `builtin_config()` with `WeightStore::random` (the built-in demo model): loads, runs, and is
/// a function of the seed.
#[test]
fn builtin_config_with_random_weights() {
    let c = Config::from_json("<builtin sam>/config.json", builtin_config()).unwrap();
    let run = |seed: u64| {
        let sam = Sam::load(&c, &WeightStore::random(seed), &Device::Cpu).unwrap();
        assert_eq!(sam.input_size(), 64);
        let inp = read("sam.in.safetensors");
        let pr = Prompts::new(1, None, None, Some(&inp["input_boxes"])).unwrap();
        sam.forward(&inp["pixel_values"].to_nhwc(), &pr, true)
            .unwrap()
    };
    let (a, b, c2) = (run(7), run(7), run(8));
    assert_eq!(a.pred_masks.shape(), [1, 2, 3, 16, 16]);
    assert_eq!(a.iou_scores.shape(), [1, 2, 3]);
    assert!(a.pred_masks.data().iter().all(|v| v.is_finite()));
    assert!(a.pred_masks.data().iter().any(|v| *v != 0.0));
    assert_eq!(a.pred_masks.data(), b.pred_masks.data());
    assert_ne!(a.pred_masks.data(), c2.pred_masks.data());
}

/// `bench --component sam` is not supported yet: a clean error, not a panic.
#[test]
fn bench_component_sam_is_a_clean_error() {
    let e = crate::common::expect_error(&crate::common::toffee(&[
        "bench",
        "--config",
        model_dir().to_str().unwrap(),
        "--component",
        "sam",
    ]));
    assert!(e.contains("--component sam"), "{e}");
}
