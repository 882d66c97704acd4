//! Canny against OpenCV goldens (tests/fixtures/images, made by tools/fixtures/canny_golden.py with
//! `cv2.Canny(cv2.cvtColor(rgb, RGB2GRAY), low, high)`), plus properties that need no golden.

use std::path::PathBuf;

use toffee::canny::{canny, gray_u8};
use toffee::image_io::load;
use toffee::tensor::Tensor;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/images")
        .join(name)
}

/// A golden gray PNG (edges are 0/255) as 0..=255 bytes.
fn gray_fixture(name: &str) -> (Vec<u8>, usize, usize) {
    let img = load(&fixture(name)).unwrap().rgb;
    let (_, h, w, _) = img.dims4();
    (
        img.data()
            .chunks_exact(3)
            .map(|p| (p[0] * 255.0).round() as u8)
            .collect(),
        w,
        h,
    )
}

/// One channel of a canny output.
fn edge_plane(t: &Tensor) -> Vec<u8> {
    t.data()
        .chunks_exact(3)
        .map(|p| (p[0] * 255.0) as u8)
        .collect()
}

#[test]
fn grayscale_matches_cv2_cvtcolor() {
    for name in ["canny_shapes", "canny_texture"] {
        let rgb = load(&fixture(&format!("{name}.png"))).unwrap().rgb;
        let (want, _, _) = gray_fixture(&format!("{name}.gray.png"));
        assert_eq!(gray_u8(&rgb), want, "{name}");
    }
}

#[test]
fn edges_match_cv2_canny() {
    for name in ["canny_shapes", "canny_texture"] {
        let rgb = load(&fixture(&format!("{name}.png"))).unwrap().rgb;
        for (lo, hi) in [(100, 200), (50, 150)] {
            let (want, w, h) = gray_fixture(&format!("{name}.edges_{lo}_{hi}.png"));
            let got = canny(&rgb, lo as f32, hi as f32);
            assert_eq!(got.shape(), &[1, h, w, 3]);
            // The three channels are the same 0/1 map.
            assert!(got
                .data()
                .chunks_exact(3)
                .all(|p| p[0] == p[1] && p[1] == p[2] && (p[0] == 0.0 || p[0] == 1.0)));
            let got = edge_plane(&got);
            let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            let edges = want.iter().filter(|&&v| v == 255).count();
            println!(
                "{name} {lo}/{hi}: {diff} of {} pixels differ ({edges} edge pixels in cv2)",
                want.len()
            );
            assert!(edges > 100, "golden has too few edges to test anything");
            assert_eq!(
                diff, 0,
                "{name} {lo}/{hi}: {diff} pixels differ from cv2.Canny"
            );
        }
    }
}

#[test]
fn thresholds_swap_and_floor_like_cv2() {
    let rgb = load(&fixture("canny_texture.png")).unwrap().rgb;
    let a = canny(&rgb, 100.0, 200.0);
    assert_eq!(a.data(), canny(&rgb, 200.0, 100.0).data());
    assert_eq!(a.data(), canny(&rgb, 100.9, 200.9).data());
}

#[test]
fn batch_is_per_image() {
    let a = load(&fixture("canny_shapes.png")).unwrap().rgb;
    let blank = Tensor::zeros(a.shape());
    let batch = Tensor::cat0(&[&blank, &a]);
    let out = canny(&batch, 100.0, 200.0);
    assert!(out.narrow0(0, 1).data().iter().all(|&v| v == 0.0));
    assert_eq!(out.narrow0(1, 1).data(), canny(&a, 100.0, 200.0).data());
}

/// A `w`x`h` gray image (in [0,1], as RGB) with value `v(x, y)`.
fn image(w: usize, h: usize, v: impl Fn(usize, usize) -> f32) -> Tensor {
    let v = &v;
    let data = (0..h)
        .flat_map(|y| (0..w).flat_map(move |x| [v(x, y); 3]).collect::<Vec<_>>())
        .collect();
    Tensor::new(vec![1, h, w, 3], data)
}

#[test]
fn blank_and_flat_images_have_no_edges() {
    for v in [0.0, 0.5, 1.0] {
        let out = canny(&image(32, 24, |_, _| v), 100.0, 200.0);
        assert!(out.data().iter().all(|&e| e == 0.0));
    }
}

#[test]
fn rectangle_edges_where_expected() {
    // White rectangle covering x in 10..30, y in 8..20 on black. The Sobel magnitude is largest on
    // the two pixels straddling each side; OpenCV's NMS (`>` before, `>=` after along the gradient)
    // keeps the first of them: the outside column/row on the left/top, the inside one on the
    // right/bottom.
    let (w, h) = (40, 28);
    let out = canny(
        &image(w, h, |x, y| {
            ((10..30).contains(&x) && (8..20).contains(&y)) as u8 as f32
        }),
        100.0,
        200.0,
    );
    let e = edge_plane(&out);
    let edge = |x: usize, y: usize| e[y * w + x] == 255;
    for y in 9..19 {
        assert!(edge(9, y) && edge(29, y), "left/right sides at y={y}");
        assert!(
            !edge(10, y) && !edge(30, y) && !edge(8, y),
            "sides are one pixel thick at y={y}"
        );
    }
    for x in 11..29 {
        assert!(edge(x, 7) && edge(x, 19), "top/bottom sides at x={x}");
        assert!(
            !edge(x, 8) && !edge(x, 20) && !edge(x, 6),
            "top/bottom one pixel thick at x={x}"
        );
    }
    // Nothing far from the rectangle.
    for y in 0..h {
        for x in 0..w {
            if !(7..=20).contains(&y) || !(8..=30).contains(&x) {
                assert!(!edge(x, y), "stray edge at ({x},{y})");
            }
        }
    }
}

#[test]
fn thresholds_are_monotone() {
    let rgb = load(&fixture("canny_texture.png")).unwrap().rgb;
    let count = |lo: f32, hi: f32| {
        canny(&rgb, lo, hi)
            .data()
            .iter()
            .filter(|&&v| v == 1.0)
            .count()
    };
    let c = [
        count(20.0, 60.0),
        count(50.0, 150.0),
        count(100.0, 200.0),
        count(200.0, 400.0),
        count(2000.0, 3000.0),
    ];
    assert!(c.windows(2).all(|p| p[0] >= p[1]), "{c:?}");
    assert!(c[0] > c[3] && c[4] == 0, "{c:?}");
    // Raising only `low` cannot add edges either.
    assert!(count(50.0, 200.0) >= count(100.0, 200.0));
}

/// Edge map as rows of `#` (edge) and `.`.
fn ascii(t: &Tensor, w: usize) -> Vec<String> {
    edge_plane(t)
        .chunks(w)
        .map(|r| {
            r.iter()
                .map(|&v| if v == 255 { '#' } else { '.' })
                .collect()
        })
        .collect()
}

#[test]
fn hysteresis_follows_weak_edges_from_strong_ones() {
    // Black left half; right of x = 10 the image is 255 in the top 4 rows and 64 below. Sobel gives
    // |dx| = 4 * 255 = 1020 (strong) on the top of the vertical step and 4 * 64 = 256 (weak) below it;
    // the NMS keeps column 9 (`>` towards the left, `>=` towards the right). With low 100 / high 500
    // the weak part survives only through its 8-connection to the strong part. Expected maps are
    // cv2.Canny's output for the same uint8 image.
    let (w, h) = (20, 16);
    let with_strong_end = image(w, h, |x, y| {
        if x < 10 {
            0.0
        } else if y < 4 {
            1.0
        } else {
            64.0 / 255.0
        }
    });
    let top = [
        ".........#..........",
        ".........#..........",
        ".........#..........",
        "..........##########",
        "..........#.........",
    ];
    let mut want: Vec<&str> = top.to_vec();
    want.extend([".........#.........."; 11]);
    assert_eq!(ascii(&canny(&with_strong_end, 100.0, 500.0), w), want);
    // Low above the weak magnitude: only the strong part remains.
    let mut want: Vec<&str> = top.to_vec();
    want.extend(["...................."; 11]);
    assert_eq!(ascii(&canny(&with_strong_end, 300.0, 500.0), w), want);

    let weak_only = image(w, h, |x, _| if x < 10 { 0.0 } else { 64.0 / 255.0 });
    let count = |t: &Tensor| edge_plane(t).iter().filter(|&&v| v == 255).count();
    assert_eq!(
        count(&canny(&weak_only, 100.0, 500.0)),
        0,
        "no strong pixel, no edge"
    );
    assert_eq!(
        count(&canny(&weak_only, 100.0, 255.0)),
        h,
        "256 > high 255: strong, one pixel thick"
    );
}
