//! The CPU reference of the glue ops the segmentation and depth models add, against values torch
//! gives and against the direct definitions (a transposed convolution as a scatter).

use toffee::backend::{self as ops, Activation};
use toffee::models::nn::ConvTranspose;
use toffee::tensor::Tensor;
use toffee::weights::{safetensors, Vb, WeightStore};

fn row(v: &[f32]) -> Tensor {
    Tensor::new(vec![1, 1, v.len(), 1], v.to_vec())
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() < 1e-6,
            "element {i}: {g} vs {w}\n{got:?}\n{want:?}"
        );
    }
}

#[test]
fn bilinear_follows_torch_index_rules() {
    // F.interpolate(torch.tensor([[[[1., 2.]]]]), size=(1, 4), mode="bilinear", align_corners=False)
    let r = ops::resize_bilinear(&row(&[1.0, 2.0]), 1, 4, false);
    assert_close(r.data(), &[1.0, 1.25, 1.75, 2.0]);
    // align_corners=True samples the end points exactly.
    let r = ops::resize_bilinear(&row(&[1.0, 2.0]), 1, 3, true);
    assert_close(r.data(), &[1.0, 1.5, 2.0]);
    // Downscaling without antialias: source 0.5 and 2.5.
    let r = ops::resize_bilinear(&row(&[1.0, 2.0, 3.0, 4.0]), 1, 2, false);
    assert_close(r.data(), &[1.5, 3.5]);
    // Negative source coordinates clamp to 0; the last one clamps to the border.
    let r = ops::resize_bilinear(&row(&[0.0, 1.0, 4.0]), 1, 5, false);
    assert_close(r.data(), &[0.0, 0.4, 1.0, 2.8, 4.0]);
    // Rows and columns are separable and channels independent.
    let x = Tensor::new(vec![1, 2, 2, 2], vec![0., 10., 1., 20., 2., 30., 3., 40.]);
    let r = ops::resize_bilinear(&x, 3, 3, true);
    assert_eq!(r.shape(), [1, 3, 3, 2]);
    let ch0: Vec<f32> = r.data().iter().step_by(2).copied().collect();
    assert_close(&ch0, &[0., 0.5, 1., 1., 1.5, 2., 2., 2.5, 3.]);
    let ch1: Vec<f32> = r.data().iter().skip(1).step_by(2).copied().collect();
    assert_close(&ch1, &[10., 15., 20., 20., 25., 30., 30., 35., 40.]);
}

#[test]
fn conv_transpose_equals_the_scatter_definition() {
    let (n, h, w, cin, cout, k) = (2, 3, 2, 5, 3, 2);
    let wt: Vec<f32> = toffee::rng::normal(7, 1, cin * cout * k * k);
    let bias: Vec<f32> = toffee::rng::normal(7, 2, cout);
    let x: Vec<f32> = toffee::rng::normal(7, 3, n * h * w * cin);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    safetensors::write_f32(
        &path,
        &[
            (
                "up.weight".to_string(),
                Tensor::new(vec![cin, cout, k, k], wt.clone()),
            ),
            ("up.bias".to_string(), Tensor::new(vec![cout], bias.clone())),
        ],
    )
    .unwrap();
    let store = WeightStore::open_file(&path).unwrap();
    let ct = ConvTranspose::load(&Vb::root(&store).pp("up"), cin, cout, k, true).unwrap();
    let got = ct.forward(&Tensor::new(vec![n, h, w, cin], x.clone()));
    assert_eq!(got.shape(), [n, h * k, w * k, cout]);
    // out[b, iy·k + ky, ix·k + kx, co] = Σ_ci x[b, iy, ix, ci]·W[ci, co, ky, kx] + bias[co]
    let (oh, ow) = (h * k, w * k);
    let mut want = vec![0.0f32; n * oh * ow * cout];
    for b in 0..n {
        for iy in 0..h {
            for ix in 0..w {
                for ky in 0..k {
                    for kx in 0..k {
                        for co in 0..cout {
                            let mut s = bias[co];
                            for ci in 0..cin {
                                s += x[((b * h + iy) * w + ix) * cin + ci]
                                    * wt[((ci * cout + co) * k + ky) * k + kx];
                            }
                            want[((b * oh + iy * k + ky) * ow + ix * k + kx) * cout + co] = s;
                        }
                    }
                }
            }
        }
    }
    for (g, w) in got.data().iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "{g} vs {w}");
    }
    // A weight of the wrong shape is an error naming the tensor.
    let err = ConvTranspose::load(&Vb::root(&store).pp("up"), cin, cout, 3, true).unwrap_err();
    assert!(format!("{err:#}").contains("up.weight"), "{err:#}");
}

#[test]
fn film_relu_and_sigmoid() {
    let x = Tensor::new(vec![2, 1, 2], vec![1., -2., 3., 4.]);
    let m = Tensor::new(vec![2, 2], vec![2., 3., -1., 0.5]);
    let a = Tensor::new(vec![2, 2], vec![0.5, 0., 1., -1.]);
    assert_close(ops::film(&x, &m, &a).data(), &[2.5, -6., -2., 1.]);
    assert_close(Activation::Relu.apply(&x).data(), &[1., 0., 3., 4.]);
    let s = Activation::Sigmoid.apply(&Tensor::new(vec![2], vec![0.0, 2.0]));
    assert_close(s.data(), &[0.5, 1.0 / (1.0 + (-2.0f32).exp())]);
    assert_eq!(Activation::parse("relu"), Some(Activation::Relu));
    assert_eq!(Activation::parse("sigmoid"), Some(Activation::Sigmoid));
}

#[test]
fn a_store_view_renames_and_draws_like_the_whole() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/segment_depth/clipseg/model.safetensors");
    let whole = WeightStore::open_file(&dir).unwrap();
    let clip = whole.view("clip.");
    let name = "vision_model.embeddings.class_embedding";
    assert!(clip.contains(name));
    assert!(!clip.contains("decoder.film_mul.weight"));
    assert_eq!(
        clip.get_any(name).unwrap().data(),
        whole.get_any(&format!("clip.{name}")).unwrap().data()
    );
    // A view of a view strips both prefixes.
    assert!(clip
        .view("vision_model.")
        .contains("embeddings.class_embedding"));
    // Random stores: a view synthesises the tensor the whole store would under the full name.
    let r = WeightStore::random(7);
    let shape = [4usize, 3];
    assert_eq!(
        r.view("a.").view("b.").get("w", &shape).unwrap().data(),
        r.get("a.b.w", &shape).unwrap().data()
    );
}

#[test]
fn batches_past_two_to_the_31_elements_are_split() {
    // SDXL VAE decode, 1024², batch 8: the third up block's convolutions at full size have 256
    // channels, 2^28 elements per sample, 2^31 for the batch.
    let per = 1024 * 1024 * 256;
    let c = ops::batch_chunks(8, per, i32::MAX as usize);
    assert!(c.len() > 1);
    assert!(c.iter().all(|&(_, len)| len * per <= i32::MAX as usize));
    assert_eq!(c.iter().map(|&(_, l)| l).sum::<usize>(), 8);
    assert!(c.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0), "{c:?}");
    // Small batches stay whole; a single huge sample is its own chunk.
    assert_eq!(
        ops::batch_chunks(32, 4096, i32::MAX as usize),
        vec![(0, 32)]
    );
    assert_eq!(
        ops::batch_chunks(2, usize::MAX / 4, i32::MAX as usize),
        vec![(0, 1), (1, 1)]
    );
    assert_eq!(ops::batch_chunks(0, 10, i32::MAX as usize), vec![]);
}
