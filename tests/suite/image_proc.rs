//! Parity of `toffee::image_proc` with Pillow 13 and transformers 5.23's PIL-backed image
//! processors, against the goldens `tools/fixtures/image_proc.py` writes into
//! `tests/fixtures/images/proc` (see `versions.json` there for the exact versions).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::RgbImage;
use toffee::image_proc::{
    load_rgb8, load_rgb8_on_white, resize_rgb8, ImageProcessor, ProcessorKind, Resample,
};
use toffee::weights::WeightStore;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/proc")
}

struct Fixtures {
    goldens: WeightStore,
    /// image name -> file name
    images: BTreeMap<String, String>,
    resize: Vec<String>,
    pixel_values: Vec<String>,
}

fn fixtures() -> Fixtures {
    let d = dir();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("versions.json")).unwrap()).unwrap();
    let strings = |k: &str| -> Vec<String> {
        meta[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    Fixtures {
        goldens: WeightStore::open_file(&d.join("goldens.safetensors")).unwrap(),
        images: meta["images"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect(),
        resize: strings("resize"),
        pixel_values: strings("pixel_values"),
    }
}

fn is_jpeg(file: &str) -> bool {
    file.ends_with(".jpg")
}

/// A u8 [H, W, 3] golden as an RgbImage.
fn golden_rgb(fx: &Fixtures, name: &str) -> RgbImage {
    let t = fx.goldens.get_any(name).unwrap();
    let s = t.shape();
    assert_eq!((s.len(), s[2]), (3, 3), "{name}: shape {s:?}");
    let data = t.data().iter().map(|&v| v as u8).collect();
    RgbImage::from_raw(s[1] as u32, s[0] as u32, data).unwrap()
}

/// The RGB pixels Pillow resized: the golden `rgb/<name>` where there is one (so JPEG decoding does
/// not enter the resize checks), else the plain RGB PNG itself (which decodes exactly).
fn source(fx: &Fixtures, name: &str) -> RgbImage {
    let key = format!("rgb/{name}");
    if fx.goldens.contains(&key) {
        golden_rgb(fx, &key)
    } else {
        load_rgb8(&dir().join(&fx.images[name])).unwrap()
    }
}

fn max_abs_diff(a: &[u8], b: &[u8]) -> (u8, usize) {
    let diffs = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y));
    (
        diffs.clone().max().unwrap_or(0),
        diffs.filter(|&d| d > 0).count(),
    )
}

#[test]
fn rgb_conversion_matches_pillow() {
    let fx = fixtures();
    let mut checked = 0;
    for (name, file) in &fx.images {
        let got = load_rgb8(&dir().join(file)).unwrap();
        let key = format!("rgb/{name}");
        if !fx.goldens.contains(&key) {
            continue;
        }
        let want = golden_rgb(&fx, &key);
        assert_eq!(got.dimensions(), want.dimensions(), "{file}");
        let (max, n) = max_abs_diff(got.as_raw(), want.as_raw());
        if is_jpeg(file) {
            // Different JPEG decoders (the `image` crate's zune-jpeg vs Pillow's libjpeg-turbo)
            // round the IDCT and the 4:2:0 chroma upsampling differently: up to 3 levels here.
            assert!(
                max <= 3,
                "{file}: JPEG decode differs by up to {max} levels at {n} samples"
            );
        } else {
            assert_eq!(
                (max, n),
                (0, 0),
                "{file}: differs from Image.open().convert(\"RGB\")"
            );
        }
        checked += 1;
    }
    assert!(checked >= 9, "only {checked} conversions checked");
}

#[test]
fn resize_matches_pillow_exactly() {
    let fx = fixtures();
    let mut sources = BTreeMap::new();
    let mut failures = Vec::new();
    for key in &fx.resize {
        // resize/<image>/<filter>/<W>x<H>
        let parts: Vec<&str> = key.split('/').collect();
        let (name, code, size) = (parts[1], parts[2], parts[3]);
        let filter = Resample::from_pil(code.parse().unwrap()).unwrap();
        let (w, h) = size.split_once('x').unwrap();
        let (w, h): (u32, u32) = (w.parse().unwrap(), h.parse().unwrap());
        let src = sources
            .entry(name.to_string())
            .or_insert_with(|| source(&fx, name));
        let got = resize_rgb8(src, w, h, filter);
        let want = golden_rgb(&fx, key);
        assert_eq!(got.dimensions(), want.dimensions(), "{key}");
        let (max, n) = max_abs_diff(got.as_raw(), want.as_raw());
        if n > 0 {
            failures.push(format!(
                "{key} ({filter:?}): {n} samples differ, by up to {max}"
            ));
        }
    }
    assert!(
        fx.resize.len() >= 100,
        "only {} resize goldens",
        fx.resize.len()
    );
    assert!(
        failures.is_empty(),
        "not bit-identical to Pillow:\n{}",
        failures.join("\n")
    );
}

#[test]
fn resize_edge_cases_do_not_panic() {
    let img = RgbImage::from_pixel(5, 4, image::Rgb([10, 200, 30]));
    for code in 0..6 {
        let f = Resample::from_pil(code).unwrap();
        assert_eq!(resize_rgb8(&img, 0, 3, f).dimensions(), (0, 3));
        assert_eq!(
            resize_rgb8(&RgbImage::new(0, 0), 3, 2, f).as_raw(),
            &vec![0; 18]
        );
        // A flat image stays flat under every filter (the coefficients sum to one).
        assert!(resize_rgb8(&img, 13, 1, f)
            .pixels()
            .all(|p| p.0 == [10, 200, 30]));
        assert_eq!(resize_rgb8(&img, 5, 4, f), img);
    }
    assert_eq!(Resample::from_pil(6), None);
}

/// Largest |got - want| (NaN counts as infinite), with the position of the worst value.
fn max_err(got: &[f32], want: &[f32]) -> (f32, usize) {
    got.iter()
        .zip(want)
        .enumerate()
        // NaN counts as an infinite error.
        .map(|(i, (a, b))| ((a - b).abs(), i))
        .map(|(e, i)| (if e.is_nan() { f32::INFINITY } else { e }, i))
        .fold((0.0, 0), |m, x| if x.0 > m.0 { x } else { m })
}

#[test]
fn pixel_values_match_transformers() {
    let fx = fixtures();
    // Group by config: pv/<config>/<image> and pvraw/<config>/<image>.
    let mut by_config: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for key in &fx.pixel_values {
        let parts: Vec<&str> = key.split('/').collect();
        by_config
            .entry((parts[0].to_string(), parts[1].to_string()))
            .or_default()
            .push(parts[2].to_string());
    }
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for ((kind, config), images) in &by_config {
        let proc = ImageProcessor::from_dir(&dir().join("configs").join(config)).unwrap();
        let (h, w) = proc.output_size();
        let loaded: Vec<RgbImage> = images
            .iter()
            .map(|im| {
                let path = dir().join(&fx.images[im]);
                if kind == "pvraw" {
                    load_rgb8_on_white(&path).unwrap()
                } else {
                    load_rgb8(&path).unwrap()
                }
            })
            .collect();
        // The batch and the single-image paths must agree.
        let batch = proc.pixel_values(&loaded);
        assert_eq!(batch.shape(), &[images.len(), 3, h, w], "{config}");
        for (i, (im, img)) in images.iter().zip(&loaded).enumerate() {
            let key = format!("{kind}/{config}/{im}");
            let want = fx.goldens.get_any(&key).unwrap();
            assert_eq!(want.shape(), &[3, h, w], "{key}: output size");
            let got = proc.preprocess(img);
            assert_eq!(
                &batch.data()[i * 3 * h * w..(i + 1) * 3 * h * w],
                &got[..],
                "{key}"
            );
            let (err, at) = max_err(&got, want.data());
            // PNG inputs: the same u8 pixels as Pillow, so only f32 rounding could differ. The
            // JPEG decodes up to 3 levels differently (see above), which the resize averages down
            // to 2 levels at most here: allow 2 levels, in normalised units.
            let tol = if is_jpeg(&fx.images[im]) {
                let std = proc
                    .image_std()
                    .iter()
                    .cloned()
                    .fold(f32::INFINITY, f32::min);
                2.0 / 255.0 / std + 1e-5
            } else {
                1e-5
            };
            report.push(format!("{key}: max abs err {err:.2e}"));
            if err > tol {
                failures.push(format!(
                    "{key}: max abs err {err} at index {at} (got {}, want {}) > {tol}",
                    got[at],
                    want.data()[at]
                ));
            }
        }
    }
    println!("{}", report.join("\n"));
    assert!(
        fx.pixel_values.len() >= 30,
        "only {} goldens",
        fx.pixel_values.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn config_fields() {
    let p = ImageProcessor::from_dir(&dir().join("configs/dinov2")).unwrap();
    assert_eq!(p.kind(), ProcessorKind::Bit);
    assert_eq!(p.output_size(), (28, 28));
    assert_eq!(p.image_mean(), [0.485, 0.456, 0.406]);
    assert_eq!(p.resample(), Resample::Bicubic);
    let p = ImageProcessor::from_dir(&dir().join("configs/dino_v1")).unwrap();
    assert_eq!((p.kind(), p.output_size()), (ProcessorKind::Vit, (24, 24)));
    assert_eq!(p.resample(), Resample::Bilinear);
    let p = ImageProcessor::from_dir(&dir().join("configs/vit_hw_lanczos")).unwrap();
    // Class defaults: IMAGENET_STANDARD mean, (height, width) order.
    assert_eq!((p.output_size(), p.image_mean()), ((18, 26), [0.5; 3]));
    let p = ImageProcessor::from_dir(&dir().join("configs/clip_legacy")).unwrap();
    assert_eq!((p.kind(), p.output_size()), (ProcessorKind::Clip, (24, 24)));
    assert_eq!(p.pixel_values(&[]).shape(), &[0, 3, 24, 24]);
}

fn write_config(dir: &Path, json: &str) -> PathBuf {
    let path = dir.join("preprocessor_config.json");
    std::fs::write(&path, json).unwrap();
    path
}

#[test]
fn errors_name_the_file_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nowhere");
    let e = format!("{:#}", ImageProcessor::from_dir(&missing).unwrap_err());
    assert!(
        e.contains(
            &missing
                .join("preprocessor_config.json")
                .display()
                .to_string()
        ),
        "{e}"
    );

    let cases = [
        (
            r#"{"image_processor_type": "CLIPImageProcessor", "resample": 7}"#,
            "`resample`",
        ),
        (
            r#"{"image_processor_type": "CLIPImageProcessor", "resample": "bicubic"}"#,
            "`resample`",
        ),
        (
            r#"{"image_processor_type": "SamImageProcessor"}"#,
            "`image_processor_type`",
        ),
        (
            r#"{"feature_extractor_type": "DeiTFeatureExtractor"}"#,
            "`feature_extractor_type`",
        ),
        (r#"{"size": 224}"#, "image_processor_type"),
        (
            r#"{"image_processor_type": "ViTImageProcessor", "size": {"max_height": 9, "max_width": 9}}"#,
            "`size`",
        ),
        (
            r#"{"image_processor_type": "ViTImageProcessor", "size": 0}"#,
            "`size`",
        ),
        (
            r#"{"image_processor_type": "ViTImageProcessor", "image_mean": [0.5, 0.5]}"#,
            "`image_mean`",
        ),
        (
            r#"{"image_processor_type": "ViTImageProcessor", "do_resize": "yes"}"#,
            "`do_resize`",
        ),
        (
            r#"{"image_processor_type": "ViTImageProcessor", "do_pad": true}"#,
            "`do_pad`",
        ),
        (
            r#"{"image_processor_type": "CLIPImageProcessor", "crop_size": {"shortest_edge": 3}}"#,
            "`crop_size`",
        ),
        (
            r#"{"image_processor_type": "BitImageProcessor", "do_center_crop": false}"#,
            "`size`",
        ),
        (r#"[1, 2]"#, "JSON object"),
        (r#"{"image_processor_type": "#, "not valid JSON"),
    ];
    for (json, field) in cases {
        let path = write_config(tmp.path(), json);
        let e = format!("{:#}", ImageProcessor::from_file(&path).unwrap_err());
        assert!(e.contains(&path.display().to_string()), "{json}: {e}");
        assert!(e.contains(field), "{json}: expected {field} in: {e}");
    }

    // Null fields take the class defaults, like transformers.
    let path = write_config(
        tmp.path(),
        r#"{"image_processor_type": "CLIPImageProcessorFast", "crop_size": null, "resample": null}"#,
    );
    let p = ImageProcessor::from_file(&path).unwrap();
    assert_eq!(
        (p.output_size(), p.resample()),
        ((224, 224), Resample::Bicubic)
    );

    // Images that do not decode.
    let bad = tmp.path().join("broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let empty = tmp.path().join("empty.jpg");
    std::fs::write(&empty, b"").unwrap();
    let text = tmp.path().join("notes.png");
    std::fs::write(&text, b"hello").unwrap();
    for path in [&bad, &empty, &text, &tmp.path().join("absent.png")] {
        for e in [
            load_rgb8(path).unwrap_err(),
            load_rgb8_on_white(path).unwrap_err(),
        ] {
            let e = format!("{e:#}");
            assert!(e.contains(&path.display().to_string()), "{e}");
        }
    }
}

#[test]
fn degenerate_images_do_not_panic() {
    let p = ImageProcessor::from_dir(&dir().join("configs/clip_legacy")).unwrap();
    let (h, w) = p.output_size();
    // An empty image gives normalised black.
    let black = p.preprocess(&RgbImage::new(0, 5));
    assert_eq!(black.len(), 3 * h * w);
    assert_eq!(black[0], (0.0 - p.image_mean()[0]) / p.image_std()[0]);
    // A very thin image: its shortest-edge resize would be 32 x 640000 pixels; only the crop is
    // computed.
    let thin = RgbImage::from_pixel(20000, 1, image::Rgb([50, 100, 150]));
    let start = std::time::Instant::now();
    let v = p.preprocess(&thin);
    assert_eq!(v.len(), 3 * h * w);
    assert!(start.elapsed().as_secs_f64() < 2.0);
}

/// The processor resizes only the crop window (`resize_window`); it must equal a full
/// `resize_rgb8` followed by transformers' centre crop (zero padding outside the image), for every
/// filter, both pass orders, crops inside and outside the resized image.
#[test]
fn cropped_resize_equals_full_resize_then_crop() {
    let tmp = tempfile::tempdir().unwrap();
    let img = RgbImage::from_fn(23, 17, |x, y| {
        image::Rgb([
            (x * 11 % 256) as u8,
            (y * 15) as u8,
            ((x * y * 7 + 3) % 256) as u8,
        ])
    });
    for code in 0..6 {
        let filter = Resample::from_pil(code).unwrap();
        for (rh, rw) in [(9, 31), (8, 23), (17, 40), (17, 23), (5, 5), (30, 11)] {
            for (ch, cw) in [(4, 6), (9, 31), (12, 40), (3, 3), (20, 2)] {
                let cfg = format!(
                    r#"{{"image_processor_type": "ViTImageProcessor", "size": {{"height": {rh}, "width": {rw}}},
                        "resample": {code}, "do_center_crop": true, "crop_size": [{ch}, {cw}],
                        "do_rescale": false, "do_normalize": false}}"#
                );
                let p = ImageProcessor::from_file(&write_config(tmp.path(), &cfg)).unwrap();
                let got = p.preprocess(&img);
                let full = resize_rgb8(&img, rw, rh, filter);
                let (top, left) = (
                    (rh as i64 - ch as i64).div_euclid(2),
                    (rw as i64 - cw as i64).div_euclid(2),
                );
                let mut want = vec![0f32; 3 * ch * cw];
                for c in 0..3 {
                    for i in 0..ch {
                        for j in 0..cw {
                            let (y, x) = (i as i64 + top, j as i64 + left);
                            if (0..rh as i64).contains(&y) && (0..rw as i64).contains(&x) {
                                want[(c * ch + i) * cw + j] =
                                    full.get_pixel(x as u32, y as u32)[c] as f32;
                            }
                        }
                    }
                }
                assert_eq!(got, want, "{filter:?} resize {rw}x{rh} crop {cw}x{ch}");
            }
        }
    }
}

#[test]
fn resample_codes_round_trip() {
    for code in 0..6 {
        assert_eq!(Resample::from_pil(code).unwrap().pil_code(), code);
    }
}

/// The rescale and normalise fields follow one rule in the CLIP/ViT, DPT and SAM processors: a
/// zero `image_std` is refused only when normalising, a single number stands for all three
/// channels, and a pixel becomes `(v * rescale_factor - mean) / std`.
#[test]
fn rescale_and_normalise_follow_one_rule_in_every_processor() {
    use toffee::image_proc::dpt::DptProcessor;
    use toffee::image_proc::sam::SamProcessor;
    let json = |class: &str, extra: &str| -> serde_json::Value {
        serde_json::from_str(&format!(
            r#"{{"image_processor_type": "{class}", {resize} "do_center_crop": false,
                 "do_pad": false, "rescale_factor": 0.5 {extra}}}"#,
            // The CLIP/ViT processor needs one output size; the others keep the image's.
            resize = match class {
                "ViTImageProcessor" => r#""size": {"height": 2, "width": 2},"#,
                _ => r#""do_resize": false,"#,
            }
        ))
        .unwrap()
    };
    let img = RgbImage::from_pixel(2, 2, image::Rgb([10, 20, 30]));
    // Channel values of `img` through each processor.
    let values = |class: &str, extra: &str| -> Result<Vec<f32>, String> {
        let v = json(class, extra);
        let name = format!("{class}.json");
        let t = match class {
            "DPTImageProcessor" => DptProcessor::from_json(&name, &v)
                .and_then(|p| p.pixel_values(std::slice::from_ref(&img)))
                .map(|t| t.data().to_vec()),
            "SamImageProcessor" => SamProcessor::from_json(&name, &v)
                .and_then(|p| p.preprocess(&img))
                .map(|s| s.pixel_values.data().to_vec()),
            _ => ImageProcessor::from_json(&name, &v).map(|p| p.preprocess(&img)),
        };
        t.map_err(|e| format!("{e:#}"))
            .map(|d| [0, 4, 8].map(|i| d[i]).to_vec())
    };
    for class in [
        "ViTImageProcessor",
        "DPTImageProcessor",
        "SamImageProcessor",
    ] {
        let e = values(class, r#", "image_std": [1, 0, 1]"#).unwrap_err();
        assert!(
            e.contains(&format!("{class}.json")) && e.contains("`image_std`") && e.contains("0"),
            "{class}: {e}"
        );
        let got = values(class, r#", "image_std": 0, "do_normalize": false"#).unwrap();
        assert_eq!(got, [5.0, 10.0, 15.0], "{class}");
        let got = values(class, r#", "image_mean": 1, "image_std": [1, 2, 4]"#).unwrap();
        assert_eq!(got, [4.0, 4.5, 3.5], "{class}");
    }
}
