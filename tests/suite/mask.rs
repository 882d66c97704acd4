//! Subject masks (`pipeline::mask`, `toffee mask`): the box and verdict rules, the recipe against
//! its parts (CLIPSeg probabilities resized and thresholded; SAM on the box, best IoU), the CLI
//! on the tiny CLIPSeg / SAM fixtures, and bad input.

use crate::common::{expect_error, fixtures, stderr, stdout, toffee};
use std::path::PathBuf;
use toffee::backend::Device;
use toffee::image_proc::load_rgb8_on_white;
use toffee::image_proc::sam::SamProcessor;
use toffee::models::sam::{segment_boxes, Sam};
use toffee::pipeline::mask::{
    mask_box, probs_at, MaskSettings, MaskVerdict, Segmenter, SubjectMask,
};
use toffee::tensor::Tensor;

fn model(name: &str) -> PathBuf {
    fixtures().join("segment_depth").join(name)
}

fn photo() -> PathBuf {
    fixtures().join("images/photo.jpg")
}

fn coffee() -> PathBuf {
    fixtures().join("images/proc/coffee_41x55.png")
}

fn gray(path: &std::path::Path) -> (u32, u32, Vec<u8>) {
    let img = image::open(path).unwrap().to_luma8();
    (img.width(), img.height(), img.into_raw())
}

#[test]
fn box_is_the_tight_pixel_edge_box() {
    let (w, h) = (5, 4);
    let mut m = vec![false; w * h];
    assert_eq!(mask_box(&m, w, h), None);
    m[w + 1] = true; // (x 1, y 1)
    m[2 * w + 3] = true; // (x 3, y 2)
    assert_eq!(mask_box(&m, w, h), Some([1.0, 1.0, 4.0, 3.0]));
    let all = vec![true; w * h];
    assert_eq!(mask_box(&all, w, h), Some([0.0, 0.0, 5.0, 4.0]));
}

#[test]
fn verdicts_follow_the_area_bounds() {
    let s = MaskSettings::default();
    assert_eq!(MaskVerdict::judge(0.0, &s), MaskVerdict::Empty);
    assert_eq!(MaskVerdict::judge(0.004, &s), MaskVerdict::Empty);
    assert_eq!(MaskVerdict::judge(0.5, &s), MaskVerdict::Ok);
    assert_eq!(MaskVerdict::judge(0.96, &s), MaskVerdict::WholeImage);
    for bad in [
        MaskSettings {
            threshold: 1.0,
            ..s
        },
        MaskSettings {
            threshold: f32::NAN,
            ..s
        },
        MaskSettings {
            min_area: 0.5,
            max_area: 0.4,
            ..s
        },
    ] {
        let e = bad.check("test").unwrap_err().to_string();
        assert!(e.contains("threshold"), "{e}");
    }
}

#[test]
fn probabilities_resize_like_torch_bilinear() {
    // [[0, 1]] -> 4 wide, align_corners=False: 0, .25, .75, 1 on every row.
    let p = Tensor::new(vec![1, 2], vec![0.0, 1.0]);
    let r = probs_at(&p, 4, 2);
    assert_eq!(r, vec![0.0, 0.25, 0.75, 1.0, 0.0, 0.25, 0.75, 1.0]);
}

/// The recipe rebuilt from its parts: CLIPSeg probabilities at the image size, thresholded, and
/// SAM's best mask for their box.
#[test]
fn segmenter_is_clipseg_then_sam_on_the_box() {
    let dev = Device::Cpu;
    let settings = MaskSettings::default();
    let img = load_rgb8_on_white(&photo()).unwrap();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let plain = Segmenter::load(&model("clipseg"), None, settings, &dev).unwrap();
    let text = "a photo of a cat".to_string();
    let m: SubjectMask = plain.segment(&img, &text).unwrap();
    assert_eq!((m.width, m.height), (w, h));
    let probs = plain
        .clipseg
        .probs(&img, std::slice::from_ref(&text))
        .unwrap();
    let want = probs_at(&probs, w, h);
    assert_eq!(m.probs, want);
    let thresholded: Vec<bool> = want.iter().map(|&p| p > 0.5).collect();
    assert_eq!(m.mask, thresholded);
    assert_eq!((m.sam_box, m.sam_iou), (None, None));
    let b = mask_box(&m.mask, w, h).expect("the tiny model marks some pixels at 0.5");

    let with_sam = Segmenter::load(&model("clipseg"), Some(&model("sam")), settings, &dev).unwrap();
    let s = with_sam.segment(&img, &text).unwrap();
    assert_eq!(s.sam_box, Some(b));
    let sam = Sam::load_dir(&model("sam"), &dev).unwrap();
    let proc = SamProcessor::from_dir(&model("sam")).unwrap();
    let out = segment_boxes(&sam, &proc, &img, &[b], true).unwrap();
    let (best, iou) = out[0].best();
    assert_eq!(s.mask, best);
    assert_eq!(s.sam_iou, Some(iou));
    assert_eq!(s.verdict, MaskVerdict::judge(s.area(), &settings));
}

#[test]
fn cli_mask_one_image_with_sam() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.png");
    let o = toffee(&[
        "mask",
        "--model",
        model("clipseg").to_str().unwrap(),
        "--sam",
        model("sam").to_str().unwrap(),
        "--image",
        photo().to_str().unwrap(),
        "--text",
        "a photo of a cat",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let line: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let seg = Segmenter::load(
        &model("clipseg"),
        Some(&model("sam")),
        MaskSettings::default(),
        &Device::Cpu,
    )
    .unwrap();
    let want = seg
        .segment(&load_rgb8_on_white(&photo()).unwrap(), "a photo of a cat")
        .unwrap();
    let (w, h, px) = gray(&out);
    assert_eq!((w as usize, h as usize), (want.width, want.height));
    assert_eq!(px, want.to_gray().into_raw());
    assert!(px.iter().all(|&v| v == 0 || v == 255));
    assert_eq!(line["text"], "a photo of a cat");
    assert_eq!(line["box"].as_array().unwrap().len(), 4);
    assert!(line["sam_iou"].is_number());
    assert!((line["area"].as_f64().unwrap() - want.area() as f64).abs() < 1e-6);
    // Nothing but the mask in the folder: no temporary files left behind.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn text_that_matches_nothing_is_reported_not_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("masks");
    // At a threshold no probability reaches, every mask is empty; SAM gets no box.
    let o = toffee(&[
        "mask",
        "--model",
        model("clipseg").to_str().unwrap(),
        "--sam",
        model("sam").to_str().unwrap(),
        "--images",
        photo().to_str().unwrap(),
        coffee().to_str().unwrap(),
        "--text",
        "a teapot",
        "--threshold",
        "0.99999",
        "--out-dir",
        out_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("empty"), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (l, name) in lines.iter().zip(["photo", "coffee_41x55"]) {
        assert_eq!(l["verdict"], "empty");
        assert!(l["box"].is_null());
        let (_, _, px) = gray(&out_dir.join(format!("{name}.png")));
        assert!(px.iter().all(|&v| v == 0));
    }
}

#[test]
fn builtin_models_run_without_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.png");
    let o = toffee(&[
        "mask",
        "--builtin-sam",
        "--image",
        coffee().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let line: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    // The text defaults to the file name as a noun.
    assert_eq!(line["text"], "coffee 41x55");
    let (w, h, _) = gray(&out);
    assert_eq!((w, h), (41, 55));
}

#[test]
fn cli_mask_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.png");
    let (photo, clipseg, sam) = (photo(), model("clipseg"), model("sam"));
    let (photo, clipseg, sam) = (
        photo.to_str().unwrap(),
        clipseg.to_str().unwrap(),
        sam.to_str().unwrap(),
    );
    let out_s = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--sam", sam, "--image", photo, "--out", out_s],
            "--sam needs --model",
        ),
        (
            vec![
                "--model",
                "/nonexistent/clipseg",
                "--image",
                photo,
                "--out",
                out_s,
            ],
            "/nonexistent/clipseg",
        ),
        (
            vec!["--model", clipseg, "--image", photo, "--out", "m.jpg"],
            "PNG",
        ),
        (
            vec![
                "--model",
                clipseg,
                "--image",
                photo,
                "--threshold",
                "1.5",
                "--out",
                out_s,
            ],
            "threshold",
        ),
        (
            vec![
                "--model",
                clipseg,
                "--image",
                "/nonexistent.png",
                "--out",
                out_s,
            ],
            "/nonexistent.png",
        ),
        (
            vec![
                "--model", clipseg, "--image", photo, "--text", " ", "--out", out_s,
            ],
            "--text is empty",
        ),
    ];
    for (args, want) in cases {
        let mut a = vec!["mask"];
        a.extend(args.iter());
        let e = expect_error(&toffee(&a));
        assert!(e.contains(want), "{args:?}: expected `{want}` in: {e}");
    }
    assert!(!out.exists(), "no mask written by a failed run");
}
