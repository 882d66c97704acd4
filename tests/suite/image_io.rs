//! image_io: loading, masks, fit (against diffusers' resize-and-crop), sizes, ranges, PNG saving and
//! every error path. JPEG and fit goldens come from tools/fixtures/canny_golden.py.

use std::fs;
use std::path::{Path, PathBuf};

use image::{ImageBuffer, Luma, LumaA, Rgb, Rgba};
use toffee::image_io::{
    check_size, fit, from_model_range, load, load_mask, save_png, save_pngs, target_size,
    to_model_range,
};
use toffee::tensor::Tensor;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/images")
        .join(name)
}

/// Deterministic values in [0,1] (a small LCG), no rand dependency.
fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

/// diffusers' `numpy_to_pil` quantisation, written independently: numpy rounds half to even.
fn quantized(v: f32) -> f32 {
    (v.clamp(0.0, 1.0) * 255.0).round_ties_even() / 255.0
}

/// The error's full text (context chain included).
fn err_text<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

/// Files in `dir` (to check that no temporary file was left behind).
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    v.sort();
    v
}

fn rgb_pixel(t: &Tensor, x: usize, y: usize) -> [f32; 3] {
    let (_, _, w, c) = t.dims4();
    let i = (y * w + x) * c;
    [t.data()[i], t.data()[i + 1], t.data()[i + 2]]
}

// ---------------------------------------------------------------------------------------------
// Saving and loading

#[test]
fn save_then_load_gives_the_quantised_input() {
    let dir = tempfile::tempdir().unwrap();
    let (h, w) = (13, 21);
    let mut data = pseudo_random(h * w * 3, 1);
    // Out-of-range values, NaN, and exact .5 cases where half-to-even differs from half-away.
    data[0] = -0.3;
    data[1] = 1.7;
    data[2] = f32::NAN;
    let ties: Vec<f32> = (0..255)
        .map(|k| (k as f32 + 0.5) / 255.0)
        .filter(|x| (x * 255.0).fract() == 0.5)
        .collect();
    assert!(ties.len() > 10, "need exact-.5 cases to test the rounding");
    data[3..3 + ties.len()].copy_from_slice(&ties);
    let img = Tensor::new(vec![1, h, w, 3], data.clone());
    let path = dir.path().join("out.png");
    save_png(&path, &img).unwrap();
    assert_eq!(listing(dir.path()), ["out.png"], "no temporary file left");

    let back = load(&path).unwrap();
    assert!(back.alpha.is_none(), "RGB PNG has no mask");
    assert_eq!(back.rgb.shape(), &[1, h, w, 3]);
    let want: Vec<f32> = data
        .iter()
        .map(|&v| if v.is_nan() { 0.0 } else { quantized(v) })
        .collect();
    assert_eq!(
        back.rgb.max_abs_diff(&Tensor::new(vec![1, h, w, 3], want)),
        0.0
    );
    assert_eq!(&back.rgb.data()[..3], &[0.0, 1.0, 0.0]);
    // e.g. 2.5 -> 2 and 3.5 -> 4, like numpy.
    for (i, &t) in ties.iter().enumerate() {
        let k = (t * 255.0).round_ties_even();
        assert_eq!(back.rgb.data()[3 + i] * 255.0, k, "tie {t}");
    }

    // Saving again over the file replaces it (atomically, via rename).
    save_png(&path, &Tensor::zeros(vec![1, 2, 3, 3])).unwrap();
    assert_eq!(load(&path).unwrap().rgb.shape(), &[1, 2, 3, 3]);
    assert_eq!(listing(dir.path()), ["out.png"]);
}

#[test]
fn save_pngs_writes_each_image_of_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let a = Tensor::new(vec![1, 4, 5, 3], pseudo_random(60, 2));
    let b = Tensor::new(vec![1, 4, 5, 3], pseudo_random(60, 3));
    let paths = [dir.path().join("0.png"), dir.path().join("1.png")];
    save_pngs(&paths, &Tensor::cat0(&[&a, &b])).unwrap();
    for (p, t) in paths.iter().zip([a, b]) {
        let want = Tensor::new(t.shape(), t.data().iter().map(|&v| quantized(v)).collect());
        assert_eq!(load(p).unwrap().rgb.max_abs_diff(&want), 0.0);
    }
    // Batch/path count mismatch and wrong shapes are errors naming the file, with nothing written.
    let e = err_text(save_pngs(
        &[dir.path().join("x.png")],
        &Tensor::zeros(vec![2, 4, 5, 3]),
    ));
    assert!(e.contains("x.png") && e.contains("batch of 2"), "{e}");
    let e = err_text(save_png(
        &dir.path().join("y.png"),
        &Tensor::zeros(vec![1, 4, 5, 4]),
    ));
    assert!(e.contains("y.png") && e.contains("[N, H, W, 3]"), "{e}");
    let e = err_text(save_png(
        &dir.path().join("z.png"),
        &Tensor::zeros(vec![4, 5, 3]),
    ));
    assert!(e.contains("z.png"), "{e}");
    assert_eq!(listing(dir.path()), ["0.png", "1.png"]);
}

#[test]
fn rgba_alpha_becomes_the_mask_and_colours_are_not_premultiplied() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = (6u32, 4u32);
    let px = |x: u32, y: u32| {
        Rgba([
            (x * 40) as u8,
            (y * 60) as u8,
            200,
            if x < 3 { 255 } else { (y * 70) as u8 },
        ])
    };
    let path = dir.path().join("subject.png");
    ImageBuffer::from_fn(w, h, px).save(&path).unwrap();
    let img = load(&path).unwrap();
    let alpha = img.alpha.expect("RGBA input has a mask");
    assert_eq!(img.rgb.shape(), &[1, 4, 6, 3]);
    assert_eq!(alpha.shape(), &[1, 4, 6, 1]);
    for y in 0..h {
        for x in 0..w {
            let p = px(x, y).0;
            let i = (y * w + x) as usize;
            assert_eq!(alpha.data()[i], p[3] as f32 / 255.0);
            assert_eq!(
                rgb_pixel(&img.rgb, x as usize, y as usize),
                [p[0], p[1], p[2]].map(|v| v as f32 / 255.0)
            );
        }
    }

    // Gray + alpha: gray replicated, alpha kept.
    let path = dir.path().join("la.png");
    ImageBuffer::from_fn(3, 2, |x, _| LumaA([(x * 100) as u8, 128]))
        .save(&path)
        .unwrap();
    let img = load(&path).unwrap();
    assert_eq!(img.alpha.unwrap().data(), &[128.0 / 255.0; 6]);
    assert_eq!(rgb_pixel(&img.rgb, 2, 1), [200.0 / 255.0; 3]);
}

#[test]
fn palette_transparency_becomes_the_mask() {
    // 4x2 palette image, all index 0 (red, transparent) except (1,0) = index 1 (green, opaque).
    let img = load(&fixture("palette_trns.png")).unwrap();
    assert_eq!(
        img.alpha.unwrap().data(),
        &[0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    );
    assert_eq!(rgb_pixel(&img.rgb, 0, 0), [1.0, 0.0, 0.0]);
    assert_eq!(rgb_pixel(&img.rgb, 1, 0), [0.0, 1.0, 0.0]);
}

#[test]
fn grayscale_and_16_bit_pngs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gray.png");
    ImageBuffer::from_fn(5, 3, |x, y| Luma([(x * 50 + y) as u8]))
        .save(&path)
        .unwrap();
    let img = load(&path).unwrap();
    assert!(img.alpha.is_none());
    assert_eq!(img.rgb.shape(), &[1, 3, 5, 3]);
    assert_eq!(rgb_pixel(&img.rgb, 4, 2), [202.0 / 255.0; 3]);

    // 16-bit RGB keeps its precision (1000/65535 is not an 8-bit level).
    let path = dir.path().join("deep.png");
    ImageBuffer::from_fn(2, 2, |x, y| {
        Rgb([1000u16, (x * 30000) as u16, (y * 65535) as u16])
    })
    .save(&path)
    .unwrap();
    let img = load(&path).unwrap();
    assert!((rgb_pixel(&img.rgb, 1, 1)[0] - 1000.0 / 65535.0).abs() < 1e-7);
    assert!((rgb_pixel(&img.rgb, 1, 1)[1] - 30000.0 / 65535.0).abs() < 1e-7);
    assert_eq!(rgb_pixel(&img.rgb, 1, 1)[2], 1.0);

    // 16-bit RGBA: alpha too.
    let path = dir.path().join("deep_rgba.png");
    ImageBuffer::from_fn(2, 1, |x, _| Rgba([0u16, 0, 0, x as u16 * 40000]))
        .save(&path)
        .unwrap();
    let a = load(&path).unwrap().alpha.unwrap();
    assert!((a.data()[1] - 40000.0 / 65535.0).abs() < 1e-7 && a.data()[0] == 0.0);
}

#[test]
fn jpeg_loads_close_to_its_source() {
    let jpg = load(&fixture("photo.jpg")).unwrap();
    assert!(jpg.alpha.is_none());
    assert_eq!(jpg.rgb.shape(), &[1, 30, 40, 3]);
    let mean_diff = |a: &Tensor, b: &Tensor| {
        a.data()
            .iter()
            .zip(b.data())
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / a.numel() as f32
            * 255.0
    };
    // Against what Pillow (libjpeg-turbo) decodes: only IDCT / chroma upsampling rounding differs.
    let pil = load(&fixture("photo.pil_decoded.png")).unwrap().rgb;
    let (mean, max) = (
        mean_diff(&jpg.rgb, &pil),
        jpg.rgb.max_abs_diff(&pil) * 255.0,
    );
    println!("JPEG vs Pillow: mean {mean} levels, max {max}");
    assert!(
        mean < 0.5 && max <= 8.0,
        "JPEG decode differs from Pillow: mean {mean} levels, max {max}"
    );
    // And against the encoder's input (quality 95, 4:2:0 chroma: lossy, mostly at the disc edge).
    let src = load(&fixture("photo.src.png")).unwrap().rgb;
    assert!(mean_diff(&jpg.rgb, &src) < 4.0);

    let gray = load(&fixture("gray.jpg")).unwrap().rgb;
    assert_eq!(gray.shape(), &[1, 30, 40, 3]);
    assert!(gray
        .data()
        .chunks_exact(3)
        .all(|p| p[0] == p[1] && p[1] == p[2]));
}

#[test]
fn jpeg_exif_orientation_is_applied_like_diffusers_load_image() {
    // Orientation 6: the stored 40x30 pixels are shown rotated 90 degrees clockwise (30x40).
    let stored = load(&fixture("photo.jpg")).unwrap().rgb;
    let shown = load(&fixture("photo_exif6.jpg")).unwrap().rgb;
    assert_eq!(shown.shape(), &[1, 40, 30, 3]);
    let (sh, _) = (30, 40);
    let mut worst = 0.0f32;
    for y in 0..40 {
        for x in 0..30 {
            // Rotating clockwise: shown (x, y) comes from stored (y, sh - 1 - x).
            let (a, b) = (rgb_pixel(&shown, x, y), rgb_pixel(&stored, y, sh - 1 - x));
            worst = worst.max((0..3).map(|c| (a[c] - b[c]).abs()).fold(0.0, f32::max));
        }
    }
    // Same encoder input, so only the chroma block alignment differs after rotation.
    assert!(worst < 40.0 / 255.0, "worst {worst}");
}

#[test]
fn format_comes_from_the_content_not_the_extension() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("really_a_jpeg.png");
    fs::copy(fixture("photo.jpg"), &path).unwrap();
    assert_eq!(load(&path).unwrap().rgb.shape(), &[1, 30, 40, 3]);
}

#[test]
fn bad_files_give_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.png");
    let e = err_text(load(&missing));
    assert!(
        e.contains("missing.png") && e.contains("No such file"),
        "{e}"
    );

    let random = dir.path().join("random.png");
    fs::write(
        &random,
        (0..500u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let e = err_text(load(&random));
    assert!(
        e.contains("random.png") && e.contains("not a PNG or JPEG"),
        "{e}"
    );

    let empty = dir.path().join("empty.jpg");
    fs::write(&empty, b"").unwrap();
    let e = err_text(load(&empty));
    assert!(e.contains("empty.jpg") && e.contains("empty"), "{e}");

    // A valid PNG cut in half, and one with a corrupted pixel-data byte (bad checksum).
    let good = fs::read(fixture("canny_texture.png")).unwrap();
    let truncated = dir.path().join("truncated.png");
    fs::write(&truncated, &good[..good.len() / 2]).unwrap();
    let e = err_text(load(&truncated));
    assert!(
        e.contains("truncated.png") && e.contains("cannot decode"),
        "{e}"
    );
    let mut bad = good.clone();
    let n = bad.len();
    bad[n / 2] ^= 0x55;
    let corrupt = dir.path().join("corrupt.png");
    fs::write(&corrupt, &bad).unwrap();
    let e = err_text(load(&corrupt));
    assert!(
        e.contains("corrupt.png") && e.contains("cannot decode"),
        "{e}"
    );

    let jpeg = fs::read(fixture("photo.jpg")).unwrap();
    let truncated = dir.path().join("truncated.jpg");
    fs::write(&truncated, &jpeg[..jpeg.len() / 3]).unwrap();
    let e = err_text(load(&truncated));
    assert!(
        e.contains("truncated.jpg") && e.contains("cannot decode"),
        "{e}"
    );

    // A supported magic number of a format that is compiled out (GIF).
    let gif = dir.path().join("anim.gif");
    fs::write(&gif, b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").unwrap();
    let e = err_text(load(&gif));
    assert!(e.contains("anim.gif"), "{e}");

    // A directory is not an image.
    let e = err_text(load(dir.path()));
    assert!(e.contains(&dir.path().display().to_string()), "{e}");

    // load_mask shares the error paths.
    let e = err_text(load_mask(&missing));
    assert!(e.contains("missing.png"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Masks

#[test]
fn mask_is_pil_luminance_and_ignores_alpha() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mask.png");
    let colours = [
        [255u8, 0, 0, 255],
        [0, 255, 0, 255],
        [0, 0, 255, 0],
        [255, 255, 255, 0],
        [0, 0, 0, 255],
        [10, 200, 37, 9],
    ];
    ImageBuffer::from_fn(colours.len() as u32, 1, |x, _| Rgba(colours[x as usize]))
        .save(&path)
        .unwrap();
    let m = load_mask(&path).unwrap();
    assert_eq!(m.shape(), &[1, 1, 6, 1]);
    // PIL: Image.new("RGB", ...).convert("L") of these colours.
    let pil_l = [76.0, 150.0, 29.0, 255.0, 0.0, 125.0];
    assert_eq!(m.data(), pil_l.map(|v: f32| v / 255.0));

    // A gray mask: its level, exactly (16-bit too).
    let path = dir.path().join("mask16.png");
    ImageBuffer::from_fn(2, 1, |x, _| Luma([x as u16 * 32768]))
        .save(&path)
        .unwrap();
    assert_eq!(load_mask(&path).unwrap().data(), &[0.0, 32768.0 / 65535.0]);
}

// ---------------------------------------------------------------------------------------------
// Sizes, ranges, fit

#[test]
fn target_size_rounds_down_and_small_images_are_errors() {
    assert_eq!(target_size(513, 767, 8), (512, 760));
    assert_eq!(target_size(512, 512, 8), (512, 512));
    assert_eq!(target_size(15, 8, 8), (8, 8));
    assert_eq!(target_size(100, 70, 64), (64, 64));
    assert!(check_size(Path::new("ok.png"), 8, 8, 8).is_ok());
    let e = err_text(check_size(Path::new("dir/tiny.png"), 7, 300, 8));
    assert!(
        e.contains("dir/tiny.png") && e.contains("7x300") && e.contains("too small"),
        "{e}"
    );
    assert!(check_size(Path::new("thin.png"), 300, 5, 8).is_err());

    // From a real file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("small.png");
    save_png(&path, &Tensor::zeros(vec![1, 4, 20, 3])).unwrap();
    let (_, h, w, _) = load(&path).unwrap().rgb.dims4();
    let e = err_text(check_size(&path, w, h, 8));
    assert!(e.contains("small.png") && e.contains("20x4"), "{e}");
}

#[test]
fn model_range_round_trip_and_clamp() {
    let t = Tensor::new(vec![1, 1, 2, 3], vec![0.0, 0.25, 0.5, 0.75, 1.0, 0.1]);
    let m = to_model_range(&t);
    assert_eq!(m.data(), &[-1.0, -0.5, 0.0, 0.5, 1.0, 0.1 * 2.0 - 1.0]);
    assert!(from_model_range(&m).max_abs_diff(&t) < 1e-7);
    // Decoder output outside [-1,1] is clamped like diffusers' denormalize.
    let out = from_model_range(&Tensor::new(vec![3], vec![-1.5, 1.2, 0.0]));
    assert_eq!(out.data(), &[0.0, 1.0, 0.5]);
}

#[test]
fn fit_matches_diffusers_resize_and_crop() {
    // Golden: VaeImageProcessor().resize(pil, h, w, resize_mode="crop") on 8-bit images; PIL rounds
    // to 8 bits after each pass, fit keeps f32, so allow one level after quantising ours.
    let src = load(&fixture("fit_src.png")).unwrap().rgb;
    for (w, h) in [(24, 24), (48, 80), (96, 40)] {
        let want = load(&fixture(&format!("fit_src.crop_{w}x{h}.png")))
            .unwrap()
            .rgb;
        let got = fit(&src, w, h);
        assert_eq!(got.shape(), &[1, h, w, 3]);
        let got = Tensor::new(
            got.shape(),
            got.data().iter().map(|&v| quantized(v)).collect(),
        );
        let diff = got.max_abs_diff(&want) * 255.0;
        let off = got
            .data()
            .iter()
            .zip(want.data())
            .filter(|(a, b)| a != b)
            .count();
        println!(
            "fit {w}x{h}: max {diff} levels, {off} of {} values differ",
            got.numel()
        );
        assert!(
            diff <= 1.0 + 1e-3,
            "fit {w}x{h}: {diff} levels from diffusers"
        );
    }
}

/// `w`x`h` RGB image: red left 20%, blue right 20%, green between, with a white marker square.
fn bands(w: usize, h: usize, marker: (usize, usize, usize)) -> Tensor {
    let (mx, my, ms) = marker;
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let p = if (mx..mx + ms).contains(&x) && (my..my + ms).contains(&y) {
                [1.0, 1.0, 1.0]
            } else if x * 5 < w {
                [1.0, 0.0, 0.0]
            } else if x * 5 >= w * 4 {
                [0.0, 0.0, 1.0]
            } else {
                [0.0, 1.0, 0.0]
            };
            data.extend(p);
        }
    }
    Tensor::new(vec![1, h, w, 3], data)
}

fn transpose_hw(t: &Tensor) -> Tensor {
    let (n, h, w, c) = t.dims4();
    let mut out = vec![0.0; t.numel()];
    for b in 0..n {
        for y in 0..h {
            for x in 0..w {
                let (s, d) = (((b * h + y) * w + x) * c, ((b * w + x) * h + y) * c);
                out[d..d + c].copy_from_slice(&t.data()[s..s + c]);
            }
        }
    }
    Tensor::new(vec![n, w, h, c], out)
}

#[test]
fn fit_covers_and_centre_crops_non_square_inputs() {
    // 200x100 -> 64x64: resized to 128x64, columns 32..96 kept = source columns 50..150, so the
    // red/blue 20% bands are cut away entirely. Marker: source 90..110 -> output ~25.6..38.4.
    let wide = bands(200, 100, (90, 40, 20));
    let out = fit(&wide, 64, 64);
    assert_eq!(out.shape(), &[1, 64, 64, 3]);
    let is = |p: [f32; 3], q: [f32; 3]| (0..3).all(|c| (p[c] - q[c]).abs() < 0.02);
    for (x, y) in [(0, 0), (63, 0), (0, 63), (63, 63), (5, 32), (58, 32)] {
        assert!(
            is(rgb_pixel(&out, x, y), [0.0, 1.0, 0.0]),
            "green at ({x},{y}): {:?}",
            rgb_pixel(&out, x, y)
        );
    }
    for (x, y) in [(28, 28), (32, 32), (35, 35)] {
        assert!(is(rgb_pixel(&out, x, y), [1.0; 3]), "marker at ({x},{y})");
    }
    assert!(
        is(rgb_pixel(&out, 22, 32), [0.0, 1.0, 0.0])
            && is(rgb_pixel(&out, 41, 32), [0.0, 1.0, 0.0])
    );

    // The tall input is the transpose: the same result transposed (up to the pass order, which
    // matters where the clamp between the passes cuts ringing).
    let tall = fit(&transpose_hw(&wide), 64, 64);
    assert!(tall.max_abs_diff(&transpose_hw(&out)) < 0.05);

    // Wide into a wide target with upscaling: 30x20 -> 96x48 (resized 96x64, rows 8..56 kept).
    let small = bands(30, 20, (11, 6, 8));
    let out = fit(&small, 96, 48);
    assert_eq!(out.shape(), &[1, 48, 96, 3]);
    assert!(
        is(rgb_pixel(&out, 47, 23), [1.0; 3]),
        "marker at the centre: {:?}",
        rgb_pixel(&out, 47, 23)
    );
    assert!(
        is(rgb_pixel(&out, 0, 0), [1.0, 0.0, 0.0]) && is(rgb_pixel(&out, 95, 47), [0.0, 0.0, 1.0])
    );

    // Same size: unchanged. Any channel count and batch: per image and channel.
    assert_eq!(fit(&small, 30, 20).data(), small.data());
    let one = Tensor::new(
        vec![2, 20, 30, 1],
        small
            .data()
            .chunks_exact(3)
            .map(|p| p[1])
            .chain(small.data().chunks_exact(3).map(|p| p[0]))
            .collect(),
    );
    let out1 = fit(&one, 96, 48);
    assert_eq!(out1.shape(), &[2, 48, 96, 1]);
    let green: Vec<f32> = out.data().chunks_exact(3).map(|p| p[1]).collect();
    let red: Vec<f32> = out.data().chunks_exact(3).map(|p| p[0]).collect();
    assert_eq!(&out1.data()[..48 * 96], &green[..]);
    assert_eq!(&out1.data()[48 * 96..], &red[..]);
    // Lanczos ringing stays inside [0,1].
    assert!(out.data().iter().all(|v| (0.0..=1.0).contains(v)));
}

// ---------------------------------------------------------------------------------------------
// Unwritable outputs

#[test]
fn unwritable_outputs_give_errors_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let img = Tensor::new(vec![1, 8, 8, 3], pseudo_random(192, 4));

    // Inside a directory that does not exist.
    let path = dir.path().join("no/such/dir/out.png");
    let e = err_text(save_png(&path, &img));
    assert!(
        e.contains("no/such/dir/out.png") && e.contains("No such file"),
        "{e}"
    );
    assert!(listing(dir.path()).is_empty());

    // Onto an existing directory: the PNG is fully written to the temporary file, then the rename
    // fails; the temporary file must be removed (this exercises the cleanup path even as root).
    let target = dir.path().join("taken.png");
    fs::create_dir(&target).unwrap();
    let e = err_text(save_png(&target, &img));
    assert!(e.contains("taken.png"), "{e}");
    assert_eq!(listing(dir.path()), ["taken.png"]);
    assert!(listing(&target).is_empty());

    // A path with no file name.
    assert!(err_text(save_png(&dir.path().join(".."), &img)).contains(".."));

    // A read-only directory (root ignores permissions, so only checked as another user).
    use std::os::unix::fs::PermissionsExt;
    let ro = dir.path().join("ro");
    fs::create_dir(&ro).unwrap();
    fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).unwrap();
    if unsafe { libc::geteuid() } != 0 {
        let e = err_text(save_png(&ro.join("out.png"), &img));
        assert!(
            e.contains("ro/out.png") && e.contains("ermission denied"),
            "{e}"
        );
        assert!(listing(&ro).is_empty());
    } else {
        eprintln!("running as root: read-only directory case skipped");
    }
    fs::set_permissions(&ro, fs::Permissions::from_mode(0o755)).unwrap();
}

/// CRC-32 (PNG chunks).
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A 70-byte PNG claiming 65500×65500 pixels (12 GB decoded) is refused before anything is allocated.
#[test]
fn decompression_bombs_are_refused_before_decoding() {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(65500u32.to_be_bytes());
    ihdr.extend(65500u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    png.extend((13u32).to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc32(&ihdr).to_be_bytes());
    let mut idat = b"IDAT".to_vec();
    idat.extend([0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    png.extend((8u32).to_be_bytes());
    png.extend(&idat);
    png.extend(crc32(&idat).to_be_bytes());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bomb.png");
    std::fs::write(&p, &png).unwrap();
    let e = format!("{:#}", load(&p).err().expect("refused"));
    assert!(
        e.contains("bomb.png")
            && e.contains("65500x65500")
            && e.contains("TOFFEE_MAX_IMAGE_PIXELS"),
        "{e}"
    );
}

/// Issue 24: the pairs job scored 8-bit images made with another rounding rule (half away from
/// zero) than its PNGs (ties to even), so a score could be of pixels one step off from the image in
/// the shard. Both now come from `image_io::to_u8`: on every exact tie, NaN and out-of-range
/// values, the pixels handed to the scorer equal the shard PNG's.
#[test]
fn the_pixels_scored_are_the_pixels_in_the_shard() {
    let mut v = vec![f32::NAN, -0.25, 1.5, 0.0, 1.0];
    // For each k, the floats near (k + 0.5) / 255 whose product with 255 is exactly k + 0.5.
    let mut ties = 0;
    for k in 0..255 {
        let want = k as f32 + 0.5;
        let start = want / 255.0;
        for d in -4i32..=4 {
            let x = f32::from_bits((start.to_bits() as i32 + d) as u32);
            if x * 255.0 == want {
                v.push(x);
                ties += 1;
            }
        }
    }
    assert!(ties > 100, "only {ties} exact ties found");
    while !v.len().is_multiple_of(3) {
        v.push(0.5);
    }
    let t = Tensor::new(vec![1, 1, v.len() / 3, 3], v.clone());
    let png = toffee::dataset::writer::png_bytes(&t).unwrap();
    let written = image::load_from_memory(&png).unwrap().to_rgb8().into_raw();
    let scored = toffee::image_io::to_rgb8(&t).into_raw();
    assert_eq!(scored, written);
    // The old rule differs on the ties: this test tells the two apart.
    let away: Vec<u8> = v
        .iter()
        .map(|x| (x.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    assert_ne!(away, written);
}
