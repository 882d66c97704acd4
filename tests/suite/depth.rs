//! Depth Anything (relative and metric) against transformers goldens
//! (tests/fixtures/golden/segment_depth, made by tools/fixtures/segment_depth.py): the model at
//! several input sizes, the DPT image processor, post-processing and the whole path from an image;
//! config and input errors; `toffee depth` and `toffee forward --component depth`.
//! fp32 CPU, max abs error ≤ 1e-4 (or relative L2 ≤ 1e-4).

use crate::common::{expect_error, fixtures, rel_l2, stderr, toffee};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use toffee::backend::Device;
use toffee::forward::{self, Component};
use toffee::image_proc::dpt::{post_process_depth_estimation, DptProcessor};
use toffee::models::depth_anything::DepthAnything;
use toffee::pipeline::depth::{estimate_depth, DepthMap};
use toffee::tensor::Tensor;
use toffee::weights::safetensors::read_all;

fn golden(name: &str) -> PathBuf {
    fixtures().join("golden/segment_depth").join(name)
}

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("segment_depth").join(name)
}

fn case(name: &str) -> serde_json::Value {
    crate::common::manifest_case(&golden("manifest.json"), name)
}

fn read(name: &str) -> BTreeMap<String, Tensor> {
    read_all(&golden(name)).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

/// Max abs error ≤ 1e-4, or relative L2 ≤ 1e-4; the golden must not be (near) zero.
fn close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let scale = want.data().iter().fold(0.0f32, |a, v| a.max(v.abs()));
    assert!(scale > 1e-3, "{what}: golden is (near) zero");
    assert!(
        got.data().iter().all(|v| v.is_finite()),
        "{what}: non-finite output"
    );
    let err = got.max_abs_diff(want);
    let rel = rel_l2(got, want);
    eprintln!("{what}: max abs err {err:.3e}, rel L2 {rel:.3e} (golden max |x| {scale:.3})");
    assert!(
        err <= 1e-4 || rel <= 1e-4,
        "{what}: max abs {err:e}, rel L2 {rel:e}"
    );
}

fn rgb(t: &Tensor) -> image::RgbImage {
    let &[h, w, 3] = t.shape() else {
        panic!("rgb shape {:?}", t.shape())
    };
    let bytes = t.data().iter().map(|v| *v as u8).collect();
    image::RgbImage::from_raw(w as u32, h as u32, bytes).unwrap()
}

/// A model case through `forward::run(.., Component::Depth, ..)`.
fn model_case(name: &str) {
    let c = case(name);
    let model = fixtures().join(c["model"].as_str().unwrap());
    let in_path = golden(c["inputs"].as_str().unwrap());
    let inputs = read_all(&in_path).unwrap();
    let want = read(c["outputs"].as_str().unwrap());
    let got = forward::run(&model, Component::Depth, &inputs, &in_path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "predicted_depth");
    close(name, &got[0].1, &want["predicted_depth"]);
}

#[test]
fn relative_28x28_matches_transformers() {
    model_case("depth-anything_28x28");
}

#[test]
fn relative_42x56_interpolates_positions() {
    model_case("depth-anything_42x56");
}

#[test]
fn relative_70x28_interpolates_positions() {
    model_case("depth-anything_70x28");
}

#[test]
fn metric_28x28_matches_transformers() {
    model_case("depth-anything-metric_28x28");
}

#[test]
fn metric_42x56_interpolates_positions() {
    model_case("depth-anything-metric_42x56");
}

#[test]
fn metric_70x28_interpolates_positions() {
    model_case("depth-anything-metric_70x28");
}

/// A `proc_depth_*` case: the processor's pixel_values for the stored RGB.
fn proc_case(name: &str) {
    let c = case(name);
    let proc = DptProcessor::from_dir(&fixtures().join(c["model"].as_str().unwrap())).unwrap();
    let img = rgb(&read(c["inputs"].as_str().unwrap())["rgb"]);
    let want = &read(c["outputs"].as_str().unwrap())["pixel_values"];
    let got = proc.preprocess(&img).unwrap();
    close(name, &got, want);
    let (h, w) = (want.shape()[2], want.shape()[3]);
    assert_eq!(
        proc.output_size(img.height() as usize, img.width() as usize)
            .unwrap(),
        (h, w)
    );
}

#[test]
fn processor_tall_45x130() {
    proc_case("proc_depth_tall_45x130");
}

#[test]
fn processor_tiny_7x5_takes_the_scale_closer_to_one() {
    proc_case("proc_depth_tiny_7x5");
    // Not a lower bound: a lower-bound resize would give 42x28 (W x H).
    let proc = DptProcessor::from_dir(&model_dir("depth-anything")).unwrap();
    assert_eq!(proc.resized_size(5, 7).unwrap(), (14, 28));
}

/// An `e2e_*` case: image -> pixel_values -> predicted_depth -> depth at the image size, step by
/// step and through `estimate_depth`.
fn e2e_case(name: &str) {
    let c = case(name);
    let dir = fixtures().join(c["model"].as_str().unwrap());
    let inputs = read(c["inputs"].as_str().unwrap());
    let want = read(c["outputs"].as_str().unwrap());
    let img = rgb(&inputs["rgb"]);
    let proc = DptProcessor::from_dir(&dir).unwrap();
    let model = DepthAnything::load_dir(&dir, &Device::Cpu).unwrap();
    let pixels = proc.preprocess(&img).unwrap();
    close(
        &format!("{name}/pixel_values"),
        &pixels,
        &inputs["pixel_values"],
    );
    let pred = model.forward(&pixels.to_nhwc());
    close(
        &format!("{name}/predicted_depth"),
        &pred,
        &want["predicted_depth"],
    );
    let (h, w) = (img.height() as usize, img.width() as usize);
    let depth = post_process_depth_estimation(&pred, &[(h, w)]).unwrap();
    close(&format!("{name}/depth"), &depth[0], &want["depth"]);
    let maps = estimate_depth(&model, &proc, std::slice::from_ref(&img)).unwrap();
    assert_eq!((maps[0].height, maps[0].width), (h, w));
    close(
        &format!("{name}/estimate_depth"),
        &Tensor::new(vec![h, w], maps[0].data.clone()),
        &want["depth"],
    );
}

#[test]
fn e2e_relative_photo() {
    e2e_case("e2e_depth-anything_photo");
}

#[test]
fn e2e_relative_coffee_41x55() {
    e2e_case("e2e_depth-anything_coffee_41x55");
}

#[test]
fn e2e_metric_photo() {
    e2e_case("e2e_depth-anything-metric_photo");
}

#[test]
fn e2e_metric_coffee_41x55() {
    e2e_case("e2e_depth-anything-metric_coffee_41x55");
}

#[test]
fn estimate_depth_batches_mixed_sizes_like_one_at_a_time() {
    let dir = model_dir("depth-anything");
    let proc = DptProcessor::from_dir(&dir).unwrap();
    let model = DepthAnything::load_dir(&dir, &Device::Cpu).unwrap();
    let photo = rgb(&read("e2e_depth_photo.in.safetensors")["rgb"]);
    let coffee = rgb(&read("e2e_depth_coffee_41x55.in.safetensors")["rgb"]);
    let imgs = vec![photo.clone(), coffee.clone(), photo.clone()];
    let all = estimate_depth(&model, &proc, &imgs).unwrap();
    assert_eq!(all.len(), 3);
    for (img, got) in imgs.iter().zip(&all) {
        let one = &estimate_depth(&model, &proc, std::slice::from_ref(img)).unwrap()[0];
        assert_eq!(
            (got.width, got.height),
            (img.width() as usize, img.height() as usize)
        );
        let d = got
            .data
            .iter()
            .zip(&one.data)
            .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(d < 1e-5, "batched vs single: {d}");
    }
}

/// A copy of the relative fixture folder with `edit` applied to its config.json.
fn edited(tmp: &Path, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let dir = tmp.join("model");
    crate::common::copy_tree(&model_dir("depth-anything"), &dir);
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    dir
}

fn load_err(edit: impl Fn(&mut serde_json::Value)) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let dir = edited(tmp.path(), edit);
    match DepthAnything::load_dir(&dir, &Device::Cpu) {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

/// A config key and how to break it.
type ConfigBreak = (&'static str, Box<dyn Fn(&mut serde_json::Value)>);

#[test]
fn config_errors_name_the_key() {
    let cases: Vec<ConfigBreak> = vec![
        (
            "reassemble_factors",
            Box::new(|v| v["reassemble_factors"] = serde_json::json!([4, 2, 1, 3])),
        ),
        (
            "depth_estimation_type",
            Box::new(|v| v["depth_estimation_type"] = "absolute".into()),
        ),
        (
            "neck_hidden_sizes",
            Box::new(|v| v["neck_hidden_sizes"] = serde_json::json!([8, 12, 16])),
        ),
        (
            "out_indices",
            Box::new(|v| v["backbone_config"]["out_indices"] = serde_json::json!([3, 2, 1, 4])),
        ),
        (
            "out_features",
            Box::new(|v| {
                v["backbone_config"]["out_features"] =
                    serde_json::json!(["stage1", "stage2", "stage3", "stage9"])
            }),
        ),
        (
            "backbone_config",
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("backbone_config");
            }),
        ),
        (
            "model_type",
            Box::new(|v| v["backbone_config"]["model_type"] = "swinv2".into()),
        ),
        (
            "reassemble_hidden_size",
            Box::new(|v| v["reassemble_hidden_size"] = 48.into()),
        ),
        ("head_in_index", Box::new(|v| v["head_in_index"] = 7.into())),
        (
            "fusion_hidden_size",
            Box::new(|v| v["fusion_hidden_size"] = 1_000_000.into()),
        ),
        (
            "hidden_size",
            Box::new(|v| v["backbone_config"]["hidden_size"] = 1_000_000_000.into()),
        ),
    ];
    for (key, edit) in cases {
        let e = load_err(edit);
        eprintln!("{key}: {e}");
        assert!(e.contains(key), "{key}: {e}");
        assert!(e.contains("config.json"), "{key}: {e}");
    }
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    // A config whose neck is wider than the stored weights.
    let dir = edited(tmp.path(), |v| v["fusion_hidden_size"] = 16.into());
    let e = format!(
        "{:#}",
        DepthAnything::load_dir(&dir, &Device::Cpu).err().unwrap()
    );
    assert!(e.contains("neck."), "{e}");
}

#[test]
fn forward_rejects_sizes_not_a_multiple_of_14() {
    let tmp = tempfile::tempdir().unwrap();
    let in_path = tmp.path().join("in.safetensors");
    let mut m = BTreeMap::new();
    m.insert(
        "pixel_values".to_string(),
        Tensor::zeros(vec![1, 3, 30, 28]),
    );
    let e = forward::run(
        &model_dir("depth-anything"),
        Component::Depth,
        &m,
        &in_path,
        &Device::Cpu,
    )
    .err()
    .unwrap();
    let e = format!("{e:#}");
    assert!(e.contains("multiple of the 14-pixel patch"), "{e}");
    assert!(e.contains("in.safetensors"), "{e}");
    m.insert(
        "pixel_values".to_string(),
        Tensor::zeros(vec![1, 4, 28, 28]),
    );
    let e = format!(
        "{:#}",
        forward::run(
            &model_dir("depth-anything"),
            Component::Depth,
            &m,
            &in_path,
            &Device::Cpu
        )
        .err()
        .unwrap()
    );
    assert!(e.contains("channels"), "{e}");
}

#[test]
fn builtin_config_runs_with_random_weights() {
    let cfg = toffee::config::Config::from_json(
        "<built-in depth>",
        toffee::builtin::depth_anything_config(),
    )
    .unwrap();
    let store = toffee::weights::WeightStore::random(5);
    let model = DepthAnything::load(&cfg, &store, &Device::Cpu).unwrap();
    model.check_input(42, 28, 3).unwrap();
    let x = Tensor::new(
        vec![2, 42, 28, 3],
        toffee::rng::normal(1, 2, 2 * 42 * 28 * 3),
    );
    let y = model.forward(&x);
    assert_eq!(y.shape(), [2, 42, 28]);
    assert!(y.data().iter().all(|v| v.is_finite() && *v >= 0.0));
}

#[test]
fn depth_map_encodings() {
    let m = DepthMap {
        width: 3,
        height: 1,
        data: vec![0.5, 1.0, 70.0],
    };
    assert_eq!(m.to_u16_normalised(), vec![0, 471, 65535]);
    assert_eq!(m.to_u16_millimetres(), vec![500, 1000, 65535]);
    assert_eq!(m.to_u8_normalised(), vec![0, 2, 255]);
    let flat = DepthMap {
        width: 2,
        height: 1,
        data: vec![3.0, 3.0],
    };
    assert_eq!(flat.to_u16_normalised(), vec![0, 0]);
    let tmp = tempfile::tempdir().unwrap();
    let e = format!(
        "{:#}",
        m.save_png16(&tmp.path().join("no/such/dir/d.png"))
            .err()
            .unwrap()
    );
    assert!(e.contains("d.png"), "{e}");
}

fn read_png16(p: &Path) -> (usize, usize, Vec<u16>) {
    match image::open(p).unwrap() {
        image::DynamicImage::ImageLuma16(b) => {
            (b.width() as usize, b.height() as usize, b.into_raw())
        }
        other => panic!("{}: not 16-bit gray: {:?}", p.display(), other.color()),
    }
}

fn photo() -> PathBuf {
    fixtures().join("images/photo.jpg")
}

fn coffee() -> PathBuf {
    fixtures().join("images/proc/coffee_41x55.png")
}

/// What the library computes for `path` with the model at `dir`.
fn library_map(dir: &Path, path: &Path) -> DepthMap {
    let proc = DptProcessor::from_dir(dir).unwrap();
    let model = DepthAnything::load_dir(dir, &Device::Cpu).unwrap();
    let img = toffee::image_proc::load_rgb8_on_white(path).unwrap();
    estimate_depth(&model, &proc, &[img]).unwrap().remove(0)
}

#[test]
fn cli_depth_single_image() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("d.png");
    let dir = model_dir("depth-anything");
    let o = toffee(&[
        "depth",
        "--model",
        dir.to_str().unwrap(),
        "--image",
        photo().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (w, h, px) = read_png16(&out);
    let want = library_map(&dir, &photo());
    assert_eq!((w, h), (want.width, want.height));
    assert_eq!((w, h), (40, 30));
    assert_eq!(px, want.to_u16_normalised());
    assert!(px.contains(&0) && px.contains(&65535));
    let preview = image::open(tmp.path().join("d.preview.png")).unwrap();
    assert_eq!(
        preview.as_luma8().unwrap().as_raw(),
        &want.to_u8_normalised()
    );
    // No temporary files left behind.
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn cli_depth_batched_metric_in_millimetres() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    let dir = model_dir("depth-anything-metric");
    let o = toffee(&[
        "depth",
        "--model",
        dir.to_str().unwrap(),
        "--images",
        photo().to_str().unwrap(),
        coffee().to_str().unwrap(),
        "--out-dir",
        out_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for (img, name) in [(photo(), "photo"), (coffee(), "coffee_41x55")] {
        let (w, h, px) = read_png16(&out_dir.join(format!("{name}.png")));
        let want = library_map(&dir, &img);
        assert_eq!((w, h), (want.width, want.height));
        assert_eq!(px, want.to_u16_millimetres());
        // Sigmoid · 20 m: strictly between 0 and 20000 mm.
        assert!(px.iter().all(|&v| v > 0 && v < 20000), "{name}");
        assert!(out_dir.join(format!("{name}.preview.png")).is_file());
    }
}

#[test]
fn cli_depth_folder_input() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = tmp.path().join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    std::fs::copy(photo(), imgs.join("a.jpg")).unwrap();
    std::fs::copy(coffee(), imgs.join("b.png")).unwrap();
    std::fs::write(imgs.join("notes.txt"), "not an image").unwrap();
    let out_dir = tmp.path().join("out");
    let dir = model_dir("depth-anything");
    let o = toffee(&[
        "depth",
        "--model",
        dir.to_str().unwrap(),
        "--images",
        imgs.to_str().unwrap(),
        "--out-dir",
        out_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (_, _, px) = read_png16(&out_dir.join("b.png"));
    assert_eq!(px, library_map(&dir, &coffee()).to_u16_normalised());
    assert!(out_dir.join("a.png").is_file());
}

#[test]
fn cli_depth_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir("depth-anything");
    let bad = tmp.path().join("bad.png");
    std::fs::write(&bad, b"not a png at all").unwrap();
    let out = tmp.path().join("d.png");
    let e = expect_error(&toffee(&[
        "depth",
        "--model",
        dir.to_str().unwrap(),
        "--image",
        bad.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(e.contains("bad.png"), "{e}");
    assert!(!out.exists());
    let e = expect_error(&toffee(&[
        "depth",
        "--model",
        dir.to_str().unwrap(),
        "--image",
        tmp.path().join("missing.jpg").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(e.contains("missing.jpg"), "{e}");
    let e = expect_error(&toffee(&[
        "depth",
        "--model",
        dir.to_str().unwrap(),
        "--image",
        photo().to_str().unwrap(),
        "--out",
        tmp.path().join("d.jpg").to_str().unwrap(),
    ]));
    assert!(e.contains("d.jpg"), "{e}");
    let e = expect_error(&toffee(&[
        "depth",
        "--model",
        tmp.path().to_str().unwrap(),
        "--image",
        photo().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn cli_forward_component_depth() {
    let tmp = tempfile::tempdir().unwrap();
    let c = case("depth-anything-metric_42x56");
    let in_path = golden(c["inputs"].as_str().unwrap());
    let out = tmp.path().join("out.safetensors");
    let o = crate::common::forward_at(
        &model_dir("depth-anything-metric"),
        "depth",
        &in_path,
        &out,
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let got = read_all(&out).unwrap();
    let want = read(c["outputs"].as_str().unwrap());
    close(
        "forward --component depth",
        &got["predicted_depth"],
        &want["predicted_depth"],
    );
}

#[test]
fn cli_depth_builtin_model_without_a_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("d.png");
    let o = toffee(&[
        "depth",
        "--image",
        coffee().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (w, h, px) = read_png16(&out);
    assert_eq!((w, h), (41, 55));
    // Min–max normalised: both ends are present.
    assert!(px.contains(&0) && px.contains(&65535));
    assert!(tmp.path().join("d.preview.png").is_file());
}

/// A depth map feeds a depth ControlNet as its control image: the 16-bit gray file loads as RGB
/// in [0, 1] with the full 16-bit precision in every channel.
#[test]
fn depth_png_loads_as_a_control_image() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("d.png");
    let o = toffee(&[
        "depth",
        "--model",
        model_dir("depth-anything").to_str().unwrap(),
        "--image",
        coffee().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (w, h, px) = read_png16(&out);
    let img = toffee::image_io::load(&out).unwrap();
    assert_eq!(img.rgb.dims4(), (1, h, w, 3));
    assert!(img.alpha.is_none());
    for (i, p) in img.rgb.data().chunks_exact(3).enumerate() {
        let want = px[i] as f32 / 65535.0;
        assert!(p.iter().all(|&v| v == want), "pixel {i}: {p:?} vs {want}");
    }
}
