//! The CUDA backend against the CPU reference backend: every op on fresh random inputs over
//! several shapes (odd ones included, outputs poisoned with NaN first), every model of the engine
//! core on the fixture goldens' inputs, and 4-step pipelines. fp16 tolerance: relative L2 error
//! < 1e-2; NaN fails. With the `emu` feature every test runs on the software GPU (the same backend
//! code and kernels on the CPU); without it and without a CUDA device every test prints "skipped:
//! no CUDA device" and passes.

mod common;
use common::*;
use std::sync::atomic::Ordering::Relaxed;
use toffee::backend::{self as ops, Activation, Conv2dW, Device, LinearW};
use toffee::forward::{self, Component};
use toffee::pipeline::{Control, Generator, Init};
use toffee::tensor::Tensor;
use toffee::weights::safetensors::read_all;

/// The device under test: the software GPU in a build with the `emu` feature (CI; it must open,
/// nothing skips), else CUDA device 0 when there is one. `TOFFEE_TEST_DEVICE` overrides.
fn gpu() -> Option<Device> {
    let spec = std::env::var("TOFFEE_TEST_DEVICE")
        .unwrap_or_else(|_| if cfg!(feature = "emu") { "emu" } else { "cuda" }.into());
    match Device::open(&spec, false) {
        Ok(d) => {
            d.set_poison(true);
            Some(d)
        }
        Err(e) if spec == "emu" => panic!("the software GPU does not open: {e:#}"),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e:#})");
            None
        }
    }
}

fn rand(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::new(shape.to_vec(), toffee::rng::normal(seed, 17, n))
}

thread_local! {
    /// Every mismatch of the running test: one device run should report all of them, not the first.
    static FAILURES: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn fail(msg: String) {
    eprintln!("FAIL {msg}");
    FAILURES.with(|f| f.borrow_mut().push(msg));
}

/// Records (rather than panics on) a mismatch, so later checks still run.
fn close(what: &str, got: &Tensor, want: &Tensor, dev: &Device) {
    close_tol(what, got, want, dev, 1e-2)
}

/// `close` with relative L2 tolerance `tol`.
fn close_tol(what: &str, got: &Tensor, want: &Tensor, dev: &Device, tol: f64) {
    if let Err(e) = dev.check() {
        return fail(format!("{what}: {e:#}"));
    }
    let got = match got.to_host() {
        Ok(g) => g,
        Err(e) => return fail(format!("{what}: {e:#}")),
    };
    let e = rel_l2(&got, want);
    eprintln!("{what}: rel L2 {e:.2e}");
    if e.is_nan() || e >= tol {
        let w = want.data();
        let head: Vec<String> = w
            .iter()
            .zip(got.data())
            .take(4)
            .map(|(a, b)| format!("{a:.4}/{b:.4}"))
            .collect();
        fail(format!(
            "{what}: relative L2 error {e:e} vs the CPU backend ({} values; CPU/GPU: {})",
            w.len(),
            head.join(" ")
        ));
    }
}

/// Fails the test with every recorded mismatch.
fn finish() {
    let f = FAILURES.with(|f| std::mem::take(&mut *f.borrow_mut()));
    assert!(
        f.is_empty(),
        "{} GPU check(s) failed:\n{}",
        f.len(),
        f.join("\n")
    );
}

/// One `forward` case on the CPU and on a fresh GPU device (a failure, sticky on a Gpu, stays
/// with its case), every output compared.
/// Whether the VAE of a model folder (or the VAE folder itself) sets `force_upcast`.
fn upcast_vae(model: &std::path::Path) -> bool {
    let cfg = [model.join("vae/config.json"), model.join("config.json")]
        .into_iter()
        .find(|p| p.is_file());
    cfg.and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["force_upcast"] == true)
}

fn compare_forward(
    d: &Device,
    name: &str,
    model: &std::path::Path,
    comp: Component,
    inputs: &std::collections::BTreeMap<String, Tensor>,
    in_path: &std::path::Path,
) {
    let cpu = forward::run(model, comp, inputs, in_path, &Device::Cpu).unwrap();
    let d = gpu().unwrap_or(d.clone());
    // A force_upcast VAE runs in bf16 (8 mantissa bits, about 4× fp16's rounding error).
    let vae = matches!(comp, Component::VaeEncode | Component::VaeDecode);
    let tol = if vae && upcast_vae(model) { 4e-2 } else { 1e-2 };
    match forward::run(model, comp, inputs, in_path, &d) {
        Ok(got) => {
            for ((n, g), (_, c)) in got.iter().zip(&cpu) {
                // A handful of values (SAM's IoU score: one number) average no rounding errors
                // away: measured 1.1e-2 on a single score through fp16 (software GPU, 2026-12-06).
                let tol = if c.numel() < 16 { 2.0 * tol } else { tol };
                close_tol(&format!("{name}/{n}"), g, c, &d, tol);
            }
        }
        Err(e) => fail(format!("{name}: {e:#}")),
    }
}

#[test]
fn ops_match_the_cpu_backend() {
    let Some(d) = gpu() else { return };
    let put = |t: &Tensor| d.put(t.clone());
    // GEMM (odd sizes), with and without bias.
    for (m, k, n) in [(1, 7, 3), (77, 768, 320), (4096, 320, 1280), (13, 40, 2560)] {
        let x = rand(&[m, k], 1);
        let l = LinearW {
            weight: rand(&[n, k], 2),
            bias: (n % 2 == 0).then(|| rand(&[n], 3)),
        };
        let lg = LinearW {
            weight: put(&l.weight),
            bias: l.bias.as_ref().map(put),
        };
        close(
            &format!("linear {m}x{k}x{n}"),
            &ops::linear(&put(&x), &lg),
            &ops::linear(&x, &l),
            &d,
        );
    }
    // Convolutions: 3×3 stride 1 and 2, the VAE's asymmetric pad, 1×1, odd sizes.
    for (n, h, w, ci, co, k, s, p) in [
        (2, 9, 7, 5, 6, 3, 1, 1),
        (1, 16, 12, 32, 64, 3, 2, 1),
        (2, 8, 8, 16, 16, 1, 1, 0),
        (1, 33, 17, 4, 320, 3, 1, 1),
    ] {
        let x = rand(&[n, h, w, ci], 4);
        let (wt, bias) = (rand(&[co, ci, k, k], 5), rand(&[co], 6));
        let mut c = Conv2dW::from_oihw(&wt, Some(bias.clone()), s, p);
        // GPU layouts: [kh,kw,in,out] (im2col GEMM) and cuDNN's KRSC (cuDNN, or transposed GEMM).
        let mut kr = Conv2dW::krsc_from_oihw(&wt, Some(bias), s, p);
        if s == 2 {
            c.pad = [0, 1, 0, 1];
            kr.pad = [0, 1, 0, 1];
        }
        let want = ops::conv2d(&x, &c);
        for (layout, g) in [("khwio", c.clone()), ("krsc", kr)] {
            let cg = Conv2dW {
                weight: put(&g.weight),
                bias: g.bias.as_ref().map(put),
                ..g
            };
            close(
                &format!("conv {layout} {k}x{k}/{s} {h}x{w}x{ci}->{co}"),
                &ops::conv2d(&put(&x), &cg),
                &want,
                &d,
            );
        }
    }
    // Norms.
    for (shape, g) in [
        (vec![2, 8, 8, 32], 8),
        (vec![1, 17, 9, 320], 32),
        (vec![3, 5, 64], 4),
    ] {
        let x = rand(&shape, 7);
        let c = *shape.last().unwrap();
        let (gm, bt) = (rand(&[c], 8), rand(&[c], 9));
        for silu in [false, true] {
            close(
                &format!("group_norm {shape:?} silu={silu}"),
                &ops::group_norm(&put(&x), g, &put(&gm), &put(&bt), 1e-5, silu),
                &ops::group_norm(&x, g, &gm, &bt, 1e-5, silu),
                &d,
            );
        }
        close(
            &format!("layer_norm {shape:?}"),
            &ops::layer_norm(&put(&x), &put(&gm), &put(&bt), 1e-5),
            &ops::layer_norm(&x, &gm, &bt, 1e-5),
            &d,
        );
    }
    // Attention: every head dim, self and cross (77 keys), causal, odd lengths.
    for (dh, heads, lq, lk, causal) in [
        (40, 8, 64, 64, false),
        (40, 2, 33, 77, false),
        (64, 5, 100, 100, false),
        (64, 12, 77, 77, true),
        (80, 4, 257, 77, false),
        (128, 2, 31, 45, false),
        (160, 2, 64, 77, false),
        (160, 1, 1024, 1024, false),
        (40, 1, 16384, 16384, false),
        // No flash kernel for these: the generic path (the SD VAE's single 512-wide head, tiny models).
        (512, 1, 1024, 1024, false),
        (16, 1, 64, 64, false),
        (8, 2, 77, 77, true),
    ] {
        let hd = dh * heads;
        // One sequence for the 16k-token case: its CPU reference holds a 16k × 16k score matrix.
        let b = if lq > 4096 { 1 } else { 2 };
        let (q, k, v) = (
            rand(&[b, lq, hd], 10),
            rand(&[b, lk, hd], 11),
            rand(&[b, lk, hd], 12),
        );
        close(
            &format!("attention d{dh} h{heads} {lq}x{lk} causal={causal}"),
            &ops::attention(&put(&q), &put(&k), &put(&v), heads, causal),
            &ops::attention(&q, &k, &v, heads, causal),
            &d,
        );
    }
    // Elementwise glue.
    let x = rand(&[2, 5, 7, 12], 13);
    let y = rand(&[2, 5, 7, 12], 14);
    let v = rand(&[2, 12], 15);
    let m = Tensor::new(
        vec![2, 5, 7, 1],
        toffee::rng::normal(3, 3, 70)
            .iter()
            .map(|a| (a > &0.0) as u8 as f32)
            .collect(),
    );
    for a in [
        Activation::Silu,
        Activation::Gelu,
        Activation::QuickGelu,
        Activation::Tanh,
    ] {
        close(&format!("{a:?}"), &a.apply(&put(&x)), &a.apply(&x), &d);
        close(
            &format!("glu {a:?}"),
            &ops::glu(&put(&x), a),
            &ops::glu(&x, a),
            &d,
        );
    }
    close(
        "add_scaled",
        &ops::add_scaled(&put(&x), &put(&y), -0.7),
        &ops::add_scaled(&x, &y, -0.7),
        &d,
    );
    close(
        "affine_clamp",
        &ops::affine_clamp(&put(&x), 0.5, 0.5, 0.0, 1.0),
        &ops::affine_clamp(&x, 0.5, 0.5, 0.0, 1.0),
        &d,
    );
    close(
        "add_per_sample_channels",
        &ops::add_per_sample_channels(&put(&x), &put(&v)),
        &ops::add_per_sample_channels(&x, &v),
        &d,
    );
    close(
        "concat_channels",
        &ops::concat_channels(&[&put(&x), &put(&y), &put(&x)]),
        &ops::concat_channels(&[&x, &y, &x]),
        &d,
    );
    close(
        "slice_channels",
        &ops::slice_channels(&put(&x), 3, 5),
        &ops::slice_channels(&x, 3, 5),
        &d,
    );
    close(
        "upsample 2x",
        &ops::upsample_nearest(&put(&x), 10, 14),
        &ops::upsample_nearest(&x, 10, 14),
        &d,
    );
    close(
        "upsample odd",
        &ops::upsample_nearest(&put(&x), 9, 13),
        &ops::upsample_nearest(&x, 9, 13),
        &d,
    );
    close(
        "downsample mask",
        &ops::upsample_nearest(&put(&m), 2, 3),
        &ops::upsample_nearest(&m, 2, 3),
        &d,
    );
    close(
        "mask_mix",
        &ops::mask_mix(&put(&x), &put(&y), &put(&m)),
        &ops::mask_mix(&x, &y, &m),
        &d,
    );
    close(
        "gauss_sample",
        &ops::gauss_sample(&put(&x), &put(&y), &put(&x), 0.18),
        &ops::gauss_sample(&x, &y, &x, 0.18),
        &d,
    );
    close(
        "lincomb",
        &ops::lincomb(&[(&put(&x), 0.3), (&put(&y), -1.2), (&put(&x), 2.0)]),
        &ops::lincomb(&[(&x, 0.3), (&y, -1.2), (&x, 2.0)]),
        &d,
    );
    close(
        "cfg_combine",
        &ops::cfg_combine(&put(&x), 7.5),
        &ops::cfg_combine(&x, 7.5),
        &d,
    );
    let table = rand(&[1000, 24], 16);
    close(
        "gather_rows",
        &ops::gather(&put(&table), &d.put_ids(&[5, 999, 0, 5, 17])),
        &ops::gather(&table, &Device::Cpu.put_ids(&[5, 999, 0, 5, 17])),
        &d,
    );
    let ts = Tensor::new(vec![3], vec![999.0, 500.5, 1.0]);
    for dim in [320, 33] {
        close(
            &format!("timestep_embedding {dim}"),
            &ops::timestep_embedding(&d.put_f32(ts.clone()), dim, true, 0.0),
            &ops::timestep_embedding(&ts, dim, true, 0.0),
            &d,
        );
    }
    // The segmentation / depth models' glue: transposed-conv pixel shuffle, bilinear resizes
    // (both corner rules, up and down, odd sizes), FiLM, ReLU and sigmoid.
    let s2d = rand(&[2, 3, 5, 4 * 6], 18);
    close(
        "depth_to_space",
        &ops::depth_to_space(&put(&s2d), 2),
        &ops::depth_to_space(&s2d, 2),
        &d,
    );
    for (oh, ow, align) in [(10, 14, true), (9, 13, false), (3, 2, false), (11, 3, true)] {
        close(
            &format!("resize_bilinear {oh}x{ow} align {align}"),
            &ops::resize_bilinear(&put(&x), oh, ow, align),
            &ops::resize_bilinear(&x, oh, ow, align),
            &d,
        );
    }
    let (fm, fa) = (rand(&[2, 12], 19), rand(&[2, 12], 20));
    close(
        "film",
        &ops::film(&put(&x), &put(&fm), &put(&fa)),
        &ops::film(&x, &fm, &fa),
        &d,
    );
    for a in [Activation::Relu, Activation::Sigmoid] {
        close(&format!("{a:?}"), &a.apply(&put(&x)), &a.apply(&x), &d);
    }
    close("narrow0", &put(&x).narrow0(1, 1), &x.narrow0(1, 1), &d);
    close(
        "cat0",
        &Tensor::cat0(&[&put(&x), &put(&y)]),
        &Tensor::cat0(&[&x, &y]),
        &d,
    );
    finish();
}

/// The tuned kernels (tensor-core flash attention, split GroupNorm, warp LayerNorm, GEMM
/// attention for wide heads, fused epilogues) and the reference kernels (`TOFFEE_KERNELS=
/// reference`) against the CPU on the shapes that stress their edges: tails of the 64-row and
/// key tiles, causal with more keys than queries, padded head dims, group sizes that are not a
/// multiple of the vector width, inputs with a large mean (cancellation in the variance).
#[test]
fn tuned_and_reference_kernels_match_the_cpu_backend() {
    let Some(d) = gpu() else { return };
    let put = |t: &Tensor| d.put(t.clone());
    let offset = |t: Tensor| ops::affine(&t, 0.5, 3.0);
    for reference in [false, true] {
        d.set_reference_kernels(reference);
        let tag = if reference { "reference" } else { "tuned" };
        for dh in [40, 64, 80, 128, 160, 512, 24] {
            for (heads, lq, lk, causal) in [
                (2, 1, 33, false),
                (3, 65, 77, true),
                (1, 130, 65, false),
                (2, 77, 130, true),
            ] {
                if dh == 512 && causal {
                    continue;
                }
                let hd = dh * heads;
                let (q, k, v) = (
                    rand(&[2, lq, hd], 30),
                    rand(&[2, lk, hd], 31),
                    rand(&[2, lk, hd], 32),
                );
                close(
                    &format!("{tag} attention d{dh} h{heads} {lq}x{lk} causal={causal}"),
                    &ops::attention(&put(&q), &put(&k), &put(&v), heads, causal),
                    &ops::attention(&q, &k, &v, heads, causal),
                    &d,
                );
            }
        }
        for (hw, c, groups) in [
            (4096, 320, 32),
            (4096, 320, 8),
            (1000, 128, 32),
            (64, 1280, 32),
            (37, 24, 8),
            (4097, 320, 32),
            (9, 64, 32),
            (50, 32, 32),
            (16, 2560, 32),
        ] {
            let x = offset(rand(&[2, hw, c], 33));
            let (gamma, beta) = (rand(&[c], 34), rand(&[c], 35));
            for silu in [false, true] {
                close(
                    &format!("{tag} group_norm hw{hw} c{c} g{groups} silu={silu}"),
                    &ops::group_norm(&put(&x), groups, &put(&gamma), &put(&beta), 1e-5, silu),
                    &ops::group_norm(&x, groups, &gamma, &beta, 1e-5, silu),
                    &d,
                );
            }
        }
        for (rows, c) in [
            (13, 8),
            (77, 320),
            (5, 768),
            (9, 1032),
            (64, 1280),
            (3, 4096),
            (2, 8192),
            (7, 30),
        ] {
            let x = offset(rand(&[rows, c], 36));
            let (gamma, beta) = (rand(&[c], 37), rand(&[c], 38));
            close(
                &format!("{tag} layer_norm {rows}x{c}"),
                &ops::layer_norm(&put(&x), &put(&gamma), &put(&beta), 1e-5),
                &ops::layer_norm(&x, &gamma, &beta, 1e-5),
                &d,
            );
        }
        // Fused epilogues: 3×3 (cuDNN + conv_epilogue) and 1×1 (cuBLASLt bias + C) convolutions.
        for (k, p) in [(3, 1), (1, 0)] {
            let x = rand(&[2, 9, 7, 16], 39);
            let wt = rand(&[24, 16, k, k], 40);
            // The CPU reference takes [kh, kw, in, out] weights, the GPU cuDNN's KRSC.
            let c = Conv2dW::from_oihw(&wt, Some(rand(&[24], 41)), 1, p);
            let kr = Conv2dW::krsc_from_oihw(&wt, c.bias.clone(), 1, p);
            let cg = Conv2dW {
                weight: put(&kr.weight),
                bias: kr.bias.as_ref().map(put),
                ..kr
            };
            let (temb, res) = (rand(&[2, 24], 42), rand(&[2, 9, 7, 24], 43));
            for (what, ps, r) in [
                ("temb", true, false),
                ("residual", false, true),
                ("both", true, true),
            ] {
                close(
                    &format!("{tag} conv2d_fused {k}x{k} {what}"),
                    &ops::conv2d_fused(
                        &put(&x),
                        &cg,
                        ps.then(|| put(&temb)).as_ref(),
                        r.then(|| put(&res)).as_ref(),
                    ),
                    &ops::conv2d_fused(&x, &c, ps.then_some(&temb), r.then_some(&res)),
                    &d,
                );
            }
        }
        // GEMM + GEGLU: tails in every dimension, k from 8 to 5120, the SD shapes.
        for (m, k, n) in [
            (130, 40, 72),
            (1, 8, 8),
            (257, 328, 136),
            (3, 5120, 8),
            (8192, 320, 1280),
            (512, 1280, 5120),
        ] {
            let x = rand(&[m, k], 48);
            let l = LinearW {
                weight: rand(&[2 * n, k], 49),
                bias: Some(rand(&[2 * n], 50)),
            };
            let lg = LinearW {
                weight: put(&l.weight),
                bias: l.bias.as_ref().map(put),
            };
            close(
                &format!("{tag} linear_geglu {m}x{k}x{n}"),
                &ops::linear_geglu(&put(&x), &lg),
                &ops::linear_geglu(&x, &l),
                &d,
            );
        }
        let x = rand(&[2, 77, 320], 44);
        let l = LinearW {
            weight: rand(&[640, 320], 45),
            bias: Some(rand(&[640], 46)),
        };
        let lg = LinearW {
            weight: put(&l.weight),
            bias: l.bias.as_ref().map(put),
        };
        let r = rand(&[2, 77, 640], 47);
        close(
            &format!("{tag} linear_residual"),
            &ops::linear_residual(&put(&x), &lg, &put(&r)),
            &ops::linear_residual(&x, &l, &r),
            &d,
        );
    }
    d.set_reference_kernels(false);
    finish();
}

/// Autotuned plans (`TOFFEE_AUTOTUNE=1`): GEMMs (with bias and residual epilogues) and cuDNN
/// convolutions on shapes first planned while tuning give the CPU's results, on the tuning call
/// (which runs each candidate on the real operands) and on the next.
#[test]
fn autotuned_plans_match_the_cpu_backend() {
    let Some(d) = gpu() else { return };
    d.set_autotune(true);
    let put = |t: &Tensor| d.put(t.clone());
    for (m, k, n) in [(333, 96, 200), (4096, 320, 640)] {
        let x = rand(&[m, k], 60);
        let l = LinearW {
            weight: rand(&[n, k], 61),
            bias: Some(rand(&[n], 62)),
        };
        let lg = LinearW {
            weight: put(&l.weight),
            bias: l.bias.as_ref().map(put),
        };
        let r = rand(&[m, n], 63);
        for call in 0..2 {
            close(
                &format!("autotuned linear {m}x{k}x{n} call {call}"),
                &ops::linear(&put(&x), &lg),
                &ops::linear(&x, &l),
                &d,
            );
            close(
                &format!("autotuned linear_residual {m}x{k}x{n} call {call}"),
                &ops::linear_residual(&put(&x), &lg, &put(&r)),
                &ops::linear_residual(&x, &l, &r),
                &d,
            );
        }
    }
    let x = rand(&[2, 19, 23, 48], 64);
    let wt = rand(&[40, 48, 3, 3], 65);
    let c = Conv2dW::from_oihw(&wt, Some(rand(&[40], 66)), 1, 1);
    let kr = Conv2dW::krsc_from_oihw(&wt, c.bias.clone(), 1, 1);
    let cg = Conv2dW {
        weight: put(&kr.weight),
        bias: kr.bias.as_ref().map(put),
        ..kr
    };
    for call in 0..2 {
        close(
            &format!("autotuned conv3x3 call {call}"),
            &ops::conv2d(&put(&x), &cg),
            &ops::conv2d(&x, &c),
            &d,
        );
    }
    d.set_autotune(false);
    finish();
}

#[test]
fn models_match_the_cpu_backend() {
    let Some(d) = gpu() else { return };
    for case in &manifest_cases(&golden("manifest.json")) {
        let name = case["name"].as_str().unwrap();
        let model = fixtures().join(case["model"].as_str().unwrap());
        let comp = match case["component"].as_str().unwrap() {
            "unet" => Component::Unet,
            "controlnet" => Component::Controlnet,
            "vae-encode" => Component::VaeEncode,
            "vae-decode" => Component::VaeDecode,
            _ => Component::TextEncoder,
        };
        let in_path = golden(case["inputs"].as_str().unwrap());
        let inputs = read_all(&in_path).unwrap();
        compare_forward(&d, name, &model, comp, &inputs, &in_path);
    }
    finish();
}

/// Every image-encoder golden input (tests/fixtures/golden/vision) through the GPU against the
/// CPU backend, interpolated position embeddings included.
#[test]
fn image_encoders_match_the_cpu_backend() {
    let Some(d) = gpu() else { return };
    let root = fixtures().join("golden/vision");
    for case in &manifest_cases(&root.join("manifest.json")) {
        let name = case["name"].as_str().unwrap();
        let model = fixtures().join(case["model"].as_str().unwrap());
        let in_path = root.join(case["inputs"].as_str().unwrap());
        let mut inputs = read_all(&in_path).unwrap();
        inputs.retain(|k, _| k == "pixel_values");
        if name == "dino-vit_interp" {
            inputs.insert("interpolate_pos_encoding".into(), Tensor::scalar(1.0));
        }
        let comp = Component::ImageEncoder;
        compare_forward(&d, name, &model, comp, &inputs, &in_path);
    }
    finish();
}

/// A captured graph's temporaries stay its own (issue 13, defect 1): tensors allocated eagerly
/// after the capture keep their values across replays, and replays stay right.
#[test]
fn graph_scratch_is_never_handed_to_eager_tensors() {
    let Some(d) = gpu() else { return };
    let mut g = toffee::pipeline::graph::StepGraph::new(&d);
    let f = |v: &[Tensor]| -> anyhow::Result<Vec<Tensor>> {
        // `t` is a temporary dropped inside the captured call.
        let t = ops::scale(&v[0], 2.0);
        let u = ops::add(&t, &v[0]);
        Ok(vec![ops::silu(&u)])
    };
    let x = d.put(rand(&[8, 4096], 1));
    let want = f(std::slice::from_ref(&x)).unwrap()[0].to_host().unwrap();
    for _ in 0..2 {
        g.run("k", std::slice::from_ref(&x), f).unwrap(); // eager, then captured
    }
    let eager: Vec<Tensor> = (0..4).map(|i| d.put(rand(&[8, 4096], 10 + i))).collect();
    let eager_host: Vec<Tensor> = eager.iter().map(|t| t.to_host().unwrap()).collect();
    for _ in 0..3 {
        let out = g.run("k", std::slice::from_ref(&x), f).unwrap();
        close("graph replay", &out[0], &want, &d);
    }
    for (e, h) in eager.iter().zip(&eager_host) {
        close("eager tensor after replays", e, h, &d);
    }
    finish();
}

/// A `force_upcast` VAE (the SDXL fixture's) runs in bf16 on an fp16 device (issue 13, defect 2):
/// latents large enough that fp16 overflows (±65504) in the decoder still decode to finite
/// values matching the CPU. Then the pipeline's decode graph, replayed: eager, captured, and two
/// replays on fresh latents each match the CPU.
#[test]
fn upcast_vae_and_decode_graph_replays() {
    let Some(d) = gpu() else { return };
    let dir = fixtures().join("sdxl");
    let gpu_gen = Generator::load(&dir, None, &d).unwrap();
    let cpu_gen = Generator::load(&dir, None, &Device::Cpu).unwrap();
    if gpu_gen.vae.storage() != "bf16" {
        fail(format!(
            "force_upcast VAE stores {} on an fp16 device",
            gpu_gen.vae.storage()
        ));
    }
    let lat = rand(&[1, 8, 8, 4], 7);
    let big = ops::scale(&lat, 1e5);
    let want = cpu_gen.vae.decode(&big).unwrap();
    // f32 in, as the scheduler's latents are: 1e5 is past fp16's range before the VAE's cast.
    let got = gpu_gen.vae.decode(&d.put_f32(big.clone())).unwrap();
    // bf16 keeps 8 mantissa bits: about 4× fp16's rounding error per op.
    if let Err(e) = d.check() {
        fail(format!("upcast decode: {e:#}"));
    } else {
        let e = rel_l2(&got.to_host().unwrap(), &want);
        eprintln!("upcast decode of 1e5-scaled latents: rel L2 {e:.2e}");
        if e.is_nan() || e >= 4e-2 {
            fail(format!("upcast decode: relative L2 error {e:e}"));
        }
    }
    for i in 0..4 {
        let lat = rand(&[2, 8, 8, 4], 20 + i);
        let want = cpu_gen.decode(&lat).unwrap();
        match gpu_gen.decode(&lat) {
            Ok(got) => {
                let e = rel_l2(&got, &want);
                eprintln!("decode graph call {i}: rel L2 {e:.2e}");
                if e.is_nan() || e >= 4e-2 {
                    fail(format!("decode graph call {i}: relative L2 error {e:e}"));
                }
            }
            Err(e) => fail(format!("decode graph call {i}: {e:#}")),
        }
    }
    finish();
}

/// Depth Anything (relative and metric, three input sizes each) on the GPU against the CPU.
#[test]
fn depth_models_match_the_cpu_backend() {
    let Some(d) = gpu() else { return };
    let root = fixtures().join("golden/segment_depth");
    let cases = manifest_cases(&root.join("manifest.json"));
    let depth = cases.iter().filter(|c| {
        let n = c["name"].as_str().unwrap();
        n.starts_with("depth-anything")
    });
    for case in depth {
        let name = case["name"].as_str().unwrap();
        let model = fixtures().join(case["model"].as_str().unwrap());
        let in_path = root.join(case["inputs"].as_str().unwrap());
        let inputs = read_all(&in_path).unwrap();
        let comp = Component::Depth;
        compare_forward(&d, name, &model, comp, &inputs, &in_path);
    }
    finish();
}

/// CLIPSeg (tests/fixtures/golden/segment_depth): every logits case (simple and complex heads,
/// interpolated position embeddings) through `forward --component clipseg` on the GPU against the
/// CPU, every output; then image + prompts → probabilities through the segmenter.
#[test]
fn clipseg_matches_the_cpu_backend() {
    let Some(d) = gpu() else { return };
    let root = fixtures().join("golden/segment_depth");
    let comp = Component::Clipseg;
    for case in &manifest_cases(&root.join("manifest.json")) {
        let name = case["name"].as_str().unwrap();
        if case["class"] != "CLIPSegForImageSegmentation" || !name.contains("_logits") {
            continue;
        }
        let model = fixtures().join(case["model"].as_str().unwrap());
        let in_path = root.join(case["inputs"].as_str().unwrap());
        let inputs = read_all(&in_path).unwrap();
        compare_forward(&d, name, &model, comp, &inputs, &in_path);
    }
    use toffee::models::clipseg::ClipSegSegmenter;
    let dir = fixtures().join("segment_depth/clipseg");
    let img = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8 * 6, y as u8 * 8, 90]));
    let prompts = vec!["a photo of a cat".to_string(), "a red square".into()];
    let cpu = ClipSegSegmenter::from_dir(&dir, &Device::Cpu)
        .unwrap()
        .probs(&img, &prompts)
        .unwrap();
    let d = gpu().unwrap_or(d.clone());
    match ClipSegSegmenter::from_dir(&dir, &d).and_then(|s| s.probs(&img, &prompts)) {
        Ok(got) => close("clipseg probs", &got, &cpu, &d),
        Err(e) => fail(format!("clipseg probs: {e:#}")),
    }
    finish();
}

/// The UNet with IP-Adapter / Toffee adapters attached (golden inputs) on the GPU against the CPU.
#[test]
fn adapters_match_the_cpu_backend() {
    let Some(d) = gpu() else { return };
    for dir in ["golden/adapters", "golden/toffee"] {
        let root = fixtures().join(dir);
        for case in &manifest_cases(&root.join("manifest.json")) {
            if case["kind"] != "unet" {
                continue;
            }
            let name = case["name"].as_str().unwrap();
            let model = fixtures().join(
                case.get("unet")
                    .and_then(|u| u.as_str())
                    .or(case["model"].as_str())
                    .unwrap(),
            );
            let adapters: Vec<std::path::PathBuf> = match case.get("adapters") {
                Some(a) => a
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| fixtures().join(a.as_str().unwrap()))
                    .collect(),
                None => vec![fixtures().join(case["adapter"].as_str().unwrap())],
            };
            let in_path = root.join(case["inputs"].as_str().unwrap());
            let mut inputs = read_all(&in_path).unwrap();
            if let Some(t) = inputs.remove("image_tokens") {
                inputs.insert("ip_image_embeds".into(), t);
            }
            let run = |dev: &Device| {
                forward::run_with_adapters(
                    &model,
                    Component::Unet,
                    &inputs,
                    &in_path,
                    dev,
                    &adapters,
                )
            };
            let cpu = run(&Device::Cpu).unwrap();
            let d = gpu().unwrap_or(d.clone());
            match run(&d) {
                Ok(got) => {
                    for ((n, g), (_, c)) in got.iter().zip(&cpu) {
                        close(&format!("{name}/{n}"), g, c, &d);
                    }
                }
                Err(e) => fail(format!("{name}: {e:#}")),
            }
        }
    }
    finish();
}

/// The View Generator's 2-step DDIM golden run (recorded noise) on the GPU against the CPU.
#[test]
fn view_generation_matches_the_cpu_backend() {
    use toffee::pipeline::noise::NoiseSource;
    use toffee::pipeline::view::{Pose, View, ViewGenerator, ViewRequest};
    let Some(d) = gpu() else { return };
    let dir = fixtures().join("zero123");
    let t = read_all(&fixtures().join("golden/zero123/zero123_ddim.safetensors")).unwrap();
    let run = |dev: &Device| -> anyhow::Result<(Tensor, Tensor)> {
        let g = ViewGenerator::load(&dir, dev)?;
        let subject =
            toffee::cmd::view::prepare_subject(&dir.join("subject.png"), None, g.default_size)?;
        let req = ViewRequest {
            subjects: vec![subject],
            views: [(0.0, 0.0, 0.0), (15.0, 90.0, 0.2), (-10.0, 210.0, -0.1)]
                .iter()
                .map(|&(polar, azimuth, radius)| View {
                    subject: 0,
                    pose: Pose {
                        polar,
                        azimuth,
                        radius,
                    },
                })
                .collect(),
            steps: 2,
            guidance: 3.0,
            scheduler: None,
            seed: 0,
            batch: 3,
        };
        let mut src =
            NoiseSource::Recorded(std::collections::VecDeque::from([t["noise.0"].clone()]));
        g.run_chunk(&req, 0, 3, &mut src, &mut |_, _| {})
    };
    let (cl, ci) = run(&Device::Cpu).unwrap();
    match run(&d) {
        Ok((gl, gi)) => {
            close("zero123 latents", &gl, &cl, &d);
            close("zero123 images", &gi, &ci, &d);
        }
        Err(e) => fail(format!("zero123: {e:#}")),
    }
    finish();
}

/// (name, model, controlnet, scheduler override, init, control)
type Case<'a> = (
    &'a str,
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    Init,
    Option<Control>,
);

#[test]
fn pipelines_match_the_cpu_backend() {
    let Some(d) = gpu() else { return };
    let g = read_all(&golden("pipelines/sd1_inpaint_4ch.safetensors")).unwrap();
    let image = g["init_image"].to_nhwc();
    let mask = g["mask_image"].to_nhwc();
    let control = read_all(&golden("pipelines/sd1_controlnet_ddim.safetensors")).unwrap()
        ["control_image"]
        .to_nhwc();
    let cases: Vec<Case> = vec![
        ("sd1 txt2img ddim", "sd1", None, None, Init::Noise, None),
        (
            "sd1 txt2img dpm++ karras",
            "sd1",
            None,
            Some("dpmpp-2m-karras"),
            Init::Noise,
            None,
        ),
        (
            "sd1 txt2img euler-a",
            "sd1",
            None,
            Some("euler-a"),
            Init::Noise,
            None,
        ),
        (
            "sd1 txt2img pndm",
            "sd1",
            None,
            Some("pndm"),
            Init::Noise,
            None,
        ),
        (
            "sd1 txt2img unipc",
            "sd1",
            None,
            Some("unipc"),
            Init::Noise,
            None,
        ),
        (
            "sd1 txt2img lcm",
            "sd1",
            None,
            Some("lcm"),
            Init::Noise,
            None,
        ),
        (
            "sd1 txt2img tcd",
            "sd1",
            None,
            Some("tcd"),
            Init::Noise,
            None,
        ),
        ("sd2 txt2img v-pred", "sd2", None, None, Init::Noise, None),
        ("sdxl txt2img", "sdxl", None, None, Init::Noise, None),
        (
            "sd1 controlnet",
            "sd1",
            Some("controlnet-sd1"),
            None,
            Init::Noise,
            Some(Control {
                image: control.clone(),
                scale: 0.8,
            }),
        ),
        (
            "sd1 img2img",
            "sd1",
            None,
            None,
            Init::Image {
                image: image.clone(),
                strength: 0.75,
            },
            None,
        ),
        (
            "sd1 inpaint 4ch",
            "sd1",
            None,
            None,
            Init::Inpaint {
                image: image.clone(),
                mask: mask.clone(),
                strength: 1.0,
            },
            None,
        ),
    ];
    for (name, model, cn, sched, init, ctl) in cases {
        let cn = cn.map(|c| fixtures().join(c));
        let cpu = Generator::load(&fixtures().join(model), cn.as_deref(), &Device::Cpu).unwrap();
        let d = gpu().unwrap_or(d.clone());
        let mut req = pipeline_request(init, ctl);
        req.scheduler = sched.map(|s| s.parse().unwrap());
        let want = cpu.run(&req, &mut |_, _| {}).unwrap();
        // One model call is held to 1e-2; a run gets that times how much this very run grows
        // fp16-sized error, measured on the CPU (tests/precision.rs), never less.
        let (_, growth) = fp16_error_growth(&fixtures().join(model), cn.as_deref(), &req);
        let tol = 1e-2 * growth.max(1.0);
        eprintln!("{name}: fp16 error growth {growth:.2}×, tolerance {tol:.1e}");
        // Twice: the second run replays the CUDA graphs the first one captured.
        let got = Generator::load(&fixtures().join(model), cn.as_deref(), &d).and_then(|g| {
            let first = g.run(&req, &mut |_, _| {})?;
            let second = g.run(&req, &mut |_, _| {})?;
            Ok((first, second, g.evaluations.load(Relaxed)))
        });
        match got {
            Ok((first, second, evaluations)) => {
                // Replayed graphs count too (issue 23: the counter sat inside the captured call).
                let cpu_evaluations = cpu.evaluations.load(Relaxed);
                if evaluations != 2 * cpu_evaluations {
                    fail(format!(
                        "{name}: {evaluations} UNet evaluations counted over two runs, \
                         the CPU counts {cpu_evaluations} per run"
                    ));
                }
                close_tol(
                    &format!("{name} latents"),
                    &first.latents,
                    &want.latents,
                    &d,
                    tol,
                );
                close_tol(
                    &format!("{name} images"),
                    &first.images,
                    &want.images,
                    &d,
                    tol,
                );
                close_tol(
                    &format!("{name} latents (graph replay)"),
                    &second.latents,
                    &want.latents,
                    &d,
                    tol,
                );
            }
            Err(e) => fail(format!("{name}: {e:#}")),
        }
    }
    // A single-file checkpoint with a LoRA fused at load: the GPU sees ordinary weights.
    let file = fixtures().join("single_file/sd1.safetensors");
    let loras = [toffee::weights::lora::LoraSpec {
        path: fixtures().join("lora/sd1-peft.safetensors"),
        scale: 0.8,
    }];
    let req = pipeline_request(Init::Noise, None);
    let want = Generator::load_with_loras(&file, None, &loras, &Device::Cpu)
        .and_then(|g| g.run(&req, &mut |_, _| {}))
        .unwrap();
    match Generator::load_with_loras(&file, None, &loras, &d)
        .and_then(|g| g.run(&req, &mut |_, _| {}))
    {
        Ok(got) => close(
            "single file + LoRA latents",
            &got.latents,
            &want.latents,
            &d,
        ),
        Err(e) => fail(format!("single file + LoRA: {e:#}")),
    }
    finish();
}

#[test]
fn cli_runs_on_the_gpu() {
    let Some(d) = gpu() else { return };
    // The CLI's spelling of the device under test: `emu` or `cuda:0`.
    let spec = d.name();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let o = forward_at(
        &fixtures().join("sd1"),
        "unet",
        &golden("sd1_unet.in.safetensors"),
        &out,
        &["--device", &spec],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let got = read_all(&out).unwrap();
    let want = read_all(&golden("sd1_unet.out.safetensors")).unwrap();
    let e = rel_l2(&got["out"], &want["out"]);
    assert!(e < 1e-2, "forward --device {spec}: rel L2 {e:e}");
    let png = dir.path().join("x.png");
    let o = toffee(&[
        "txt2img",
        "--prompt",
        "a cat",
        "--steps",
        "4",
        "--device",
        &spec,
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(png.exists());
    let o = toffee(&["devices"]);
    assert!(stdout(&o).contains(&format!("{spec}:")), "{}", stdout(&o));
}

/// SAM on the GPU against the CPU backend: the rel_pos_attention op over several grids (odd,
/// non-square, SAM-B's 14×14 window and a 32×32 global grid), the four sam_* goldens' inputs
/// through `forward --component sam`, and the built-in random-weight config at batch 2.
#[test]
fn sam_matches_the_cpu_backend() {
    let Some(d) = gpu() else { return };
    let put = |t: &Tensor| d.put(t.clone());
    for (b, gh, gw, heads, dh) in [
        (2, 3, 3, 2, 16),
        (1, 5, 7, 3, 8),
        (1, 14, 14, 12, 64),
        (1, 32, 32, 12, 64),
    ] {
        let l = gh * gw;
        let (q, k, v) = (
            rand(&[b, l, heads * dh], 41),
            rand(&[b, l, heads * dh], 42),
            rand(&[b, l, heads * dh], 43),
        );
        let (rh, rw) = (rand(&[2 * gh - 1, dh], 44), rand(&[2 * gw - 1, dh], 45));
        close(
            &format!("rel_pos_attention b{b} {gh}x{gw} h{heads} d{dh}"),
            &ops::rel_pos_attention(
                &put(&q),
                &put(&k),
                &put(&v),
                heads,
                (gh, gw),
                &put(&rh),
                &put(&rw),
            ),
            &ops::rel_pos_attention(&q, &k, &v, heads, (gh, gw), &rh, &rw),
            &d,
        );
    }
    let model = fixtures().join("segment_depth/sam");
    let in_path = golden("segment_depth/sam.in.safetensors");
    let all = read_all(&in_path).unwrap();
    for (name, keys, multimask) in [
        ("sam_boxes_multimask_true", &["input_boxes"][..], 1.0),
        ("sam_boxes_multimask_false", &["input_boxes"][..], 0.0),
        (
            "sam_points_multimask_true",
            &["input_points", "input_labels"][..],
            1.0,
        ),
        (
            "sam_points_multimask_false",
            &["input_points", "input_labels"][..],
            0.0,
        ),
    ] {
        let mut inputs = all.clone();
        inputs.retain(|k, _| k == "pixel_values" || keys.contains(&k.as_str()));
        inputs.insert("multimask_output".into(), Tensor::scalar(multimask));
        compare_forward(&d, name, &model, Component::Sam, &inputs, &in_path);
    }
    let cfg = toffee::config::Config::from_json(
        "<builtin sam>/config.json",
        toffee::builtin::sam_config(),
    )
    .unwrap();
    let store = toffee::weights::WeightStore::random(5);
    let px = rand(&[2, 64, 64, 3], 46);
    let boxes = Tensor::new(
        vec![2, 2, 4],
        vec![
            1.0, 2.0, 30.0, 40.0, 20.0, 5.0, 60.0, 50.0, 10.0, 10.0, 60.0, 50.0, 0.0, 0.0, 64.0,
            64.0,
        ],
    );
    let pr = toffee::models::sam::Prompts::new(2, None, None, Some(&boxes)).unwrap();
    let run = |dev: &Device| -> anyhow::Result<toffee::models::sam::SamOutput> {
        let sam = toffee::models::sam::Sam::load(&cfg, &store, dev)?;
        sam.forward(&dev.put(px.clone()), &pr, true)
    };
    let cpu = run(&Device::Cpu).unwrap();
    let d = gpu().unwrap_or(d.clone());
    match run(&d) {
        Ok(g) => {
            close("sam builtin/pred_masks", &g.pred_masks, &cpu.pred_masks, &d);
            close("sam builtin/iou_scores", &g.iou_scores, &cpu.iou_scores, &d);
            close(
                "sam builtin/image_embeddings",
                &g.image_embeddings,
                &cpu.image_embeddings,
                &d,
            );
        }
        Err(e) => fail(format!("sam builtin: {e:#}")),
    }
    finish();
}

/// What real graph capture forbids fails on the device, and leaves it usable: synchronising
/// (which invalidates the capture), reading device memory on the host. An allocation that runs out
/// of memory while capturing is a recoverable error, not a synchronisation.
#[cfg(feature = "gpu")]
#[test]
fn capture_rules_hold() {
    let Some(d) = gpu() else { return };
    let Device::Gpu(g) = &d else { unreachable!() };
    let x = d.put(rand(&[4, 64], 1));
    g.begin_capture().unwrap();
    let y = ops::silu(&x);
    let synced = g.synchronize();
    let end = g.end_capture();
    if synced.is_ok() || end.is_ok() {
        fail(format!(
            "synchronising while capturing: {synced:?}; end of capture: {:?}",
            end.map(|_| ())
        ));
    }
    // Synchronising was refused and recorded: the device stays failed, as a GPU's would.
    drop(y);
    let Some(d2) = gpu() else { return };
    let Device::Gpu(g2) = &d2 else { unreachable!() };
    let x = d2.put(rand(&[4, 64], 1));
    g2.begin_capture().unwrap();
    let host = x.to_host();
    let _ = g2.end_capture();
    if host.is_ok() {
        fail("a device tensor was read on the host while capturing".into());
    }
    let Some(d3) = gpu() else { return };
    let Device::Gpu(g3) = &d3 else { unreachable!() };
    g3.begin_capture().unwrap();
    // More than the device has: fails at once, without trimming (which would synchronise).
    let huge = g3.alloc(1 << 46, toffee::backend::cuda::DType::F16);
    drop(huge);
    let e = g3
        .end_capture()
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    if !e.contains("out of memory") || e.contains("synchronis") {
        fail(format!("out of memory while capturing: {e}"));
    }
    match d3.recover() {
        Ok(true) => {
            let x = d3.put(rand(&[4, 64], 2));
            close(
                "after recovering",
                &ops::silu(&x),
                &ops::silu(&rand(&[4, 64], 2)),
                &d3,
            );
        }
        other => fail(format!(
            "recovering after out of memory while capturing: {other:?}"
        )),
    }
    finish();
}

/// Every place the backend splits work at a device limit — batch slices for grid.y (flash and
/// materialised attention, SAM's relative-position attention, GroupNorm), row slices for
/// gemm_geglu's grid.y, batch chunks for convolutions past the elements one call may index
/// (through cuDNN, im2col and 1×1 GEMMs, with fused epilogues) — run on a software GPU opened with
/// tiny limits, tuned and reference kernels, against the CPU backend. A GPU reaches those paths
/// only at sizes CI cannot run (65536 samples, 2^31 elements); without the splitting, the launches
/// and library calls here are refused and the comparisons fail.
#[cfg(feature = "emu")]
#[test]
fn work_splits_at_the_device_limits() {
    use toffee::backend::cuda::{DType, Gpu, Limits};
    let limits = Limits {
        grid_yz: 4,
        call_elems: 3100,
    };
    // A device for each case: a refused launch is sticky and would fail every later case.
    let fresh = |reference: bool| {
        let d = Device::Gpu(Gpu::open_emu(limits, DType::F16).expect("the software GPU opens"));
        d.set_poison(true);
        d.set_reference_kernels(reference);
        d
    };
    for reference in [false, true] {
        let tag = if reference { "reference" } else { "tuned" };
        // 5 samples × 3 heads: 15 grid.y blocks, run one sample at a time.
        for (dh, causal) in [(64, false), (64, true), (24, false), (24, true)] {
            let (q, k, v) = (
                rand(&[5, 9, 3 * dh], 90),
                rand(&[5, 11, 3 * dh], 91),
                rand(&[5, 11, 3 * dh], 92),
            );
            let d = fresh(reference);
            let put = |t: &Tensor| d.put(t.clone());
            close(
                &format!("{tag} attention d{dh} causal={causal}, grid.y 15 > 4"),
                &ops::attention(&put(&q), &put(&k), &put(&v), 3, causal),
                &ops::attention(&q, &k, &v, 3, causal),
                &d,
            );
        }
        let (q, k, v) = (
            rand(&[3, 6, 32], 93),
            rand(&[3, 6, 32], 94),
            rand(&[3, 6, 32], 95),
        );
        let (rh, rw) = (rand(&[3, 16], 96), rand(&[5, 16], 97));
        let d = fresh(reference);
        let put = |t: &Tensor| d.put(t.clone());
        close(
            &format!("{tag} rel_pos_attention, grid.y 6 > 4"),
            &ops::rel_pos_attention(
                &put(&q),
                &put(&k),
                &put(&v),
                2,
                (2, 3),
                &put(&rh),
                &put(&rw),
            ),
            &ops::rel_pos_attention(&q, &k, &v, 2, (2, 3), &rh, &rw),
            &d,
        );
        let x = ops::affine(&rand(&[9, 10, 32], 98), 0.5, 3.0);
        let (gamma, beta) = (rand(&[32], 99), rand(&[32], 100));
        let d = fresh(reference);
        let put = |t: &Tensor| d.put(t.clone());
        close(
            &format!("{tag} group_norm, 9 samples > 4"),
            &ops::group_norm(&put(&x), 8, &put(&gamma), &put(&beta), 1e-5, true),
            &ops::group_norm(&x, 8, &gamma, &beta, 1e-5, true),
            &d,
        );
        // 600 rows: 5 tiles of 128 in grid.y, run as 512 + 88 rows.
        let d = fresh(reference);
        let put = |t: &Tensor| d.put(t.clone());
        let x = rand(&[600, 16], 101);
        let l = LinearW {
            weight: rand(&[16, 16], 102),
            bias: Some(rand(&[16], 103)),
        };
        let lg = LinearW {
            weight: put(&l.weight),
            bias: l.bias.as_ref().map(put),
        };
        close(
            &format!("{tag} linear_geglu, 600 rows"),
            &ops::linear_geglu(&put(&x), &lg),
            &ops::linear_geglu(&x, &l),
            &d,
        );
        // 4 samples of 9×7: 1008 input and 1512 output elements each (2 a call), an im2col
        // buffer of 9072 (1 a call, and over the limit even then: one sample is the floor).
        let x = rand(&[4, 9, 7, 16], 104);
        let temb = rand(&[4, 24], 105);
        for (k, pad) in [(3, [1, 1, 1, 1]), (3, [0, 1, 0, 1]), (1, [0; 4])] {
            let (ho, wo) = (9 + pad[0] + pad[1] + 1 - k, 7 + pad[2] + pad[3] + 1 - k);
            let res = rand(&[4, ho, wo, 24], 106);
            let d = fresh(reference);
            let put = |t: &Tensor| d.put(t.clone());
            let wt = rand(&[24, 16, k, k], 107);
            let mut c = Conv2dW::from_oihw(&wt, Some(rand(&[24], 108)), 1, 0);
            let mut kr = Conv2dW::krsc_from_oihw(&wt, c.bias.clone(), 1, 0);
            c.pad = pad;
            kr.pad = pad;
            let cg = Conv2dW {
                weight: put(&kr.weight),
                bias: kr.bias.as_ref().map(put),
                ..kr
            };
            close(
                &format!("{tag} conv2d_fused {k}x{k} pad {pad:?}, 4 samples"),
                &ops::conv2d_fused(&put(&x), &cg, Some(&put(&temb)), Some(&put(&res))),
                &ops::conv2d_fused(&x, &c, Some(&temb), Some(&res)),
                &d,
            );
        }
    }
    finish();
}

/// `path` rewritten with every tensor stored as bf16 (a bf16 checkpoint, as many are released).
fn to_bf16(path: &std::path::Path) {
    let tensors = read_all(path).unwrap();
    let (mut header, mut data) = (serde_json::Map::new(), Vec::new());
    for (name, t) in &tensors {
        let start = data.len();
        for v in t.data() {
            data.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
        }
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": t.shape(), "data_offsets": [start, data.len()]}),
        );
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

/// One device-and-storage policy (issue 24): a bf16 checkpoint runs in bf16 on a GPU from every
/// entry point. The pairs job opened its devices in fp16 whatever the checkpoint.
#[test]
fn bf16_checkpoints_run_in_bf16_everywhere() {
    use toffee::models::load::open_device;
    let Some(d) = gpu() else { return };
    let spec = d.name();
    let tmp = tempfile::tempdir().unwrap();
    let bf16 = tmp.path().join("sd1-bf16");
    copy_tree(&fixtures().join("sd1"), &bf16);
    to_bf16(&bf16.join("unet/diffusion_pytorch_model.safetensors"));
    let storage =
        |model: Option<&std::path::Path>| open_device(&spec, model, "unet").unwrap().storage();
    assert_eq!(storage(Some(&bf16)), "bf16");
    assert_eq!(storage(Some(&fixtures().join("sd1"))), "f16");
    assert_eq!(storage(None), "f16");
    assert_eq!(
        open_device("cpu", Some(&bf16), "unet").unwrap().storage(),
        "f32"
    );
    let mut cfg = toffee::dataset::config::PairsConfig::default();
    cfg.models.draft = Some(bf16.clone());
    let devices = toffee::dataset::run::open_devices(&[spec.clone(), spec], &cfg).unwrap();
    assert!(devices.iter().all(|d| d.storage() == "bf16"));
    // And the pipeline loads there, in bf16.
    let gen = toffee::pipeline::Generator::load(&bf16, None, &devices[0]).unwrap();
    assert_eq!(gen.vae.storage(), "bf16");
}

/// The C ABI opens the device under test (`emu` or `cuda:0`) and generates with the built-in
/// model: an image close to the CPU engine's (fp16 against f32: mean pixel difference under 3 of
/// 255).
#[test]
fn c_abi_generates_on_the_device() {
    use std::ffi::CString;
    use toffee::ffi::*;
    let Some(d) = gpu() else { return };
    let spec = CString::new(d.name()).unwrap();
    let prompt = CString::new("a cat").unwrap();
    let run = |device: *const std::ffi::c_char| -> Vec<u8> {
        let o = toffee_engine_options {
            device,
            ..engine_options()
        };
        let mut e = std::ptr::null_mut();
        // Safety: valid options and out-pointer; the engine is closed below.
        let s = unsafe { toffee_engine_open(&o, &mut e) };
        assert_eq!(s, toffee_status::TOFFEE_OK, "open on {d:?}");
        let g = gen_options(&prompt, 5);
        let mut buf = vec![0u8; 64 * 64 * 3];
        // Safety: a buffer of the size the options ask for.
        let s = unsafe { toffee_generate_into(e, &g, buf.as_mut_ptr(), buf.len()) };
        assert_eq!(s, toffee_status::TOFFEE_OK, "generate on {d:?}");
        // Safety: opened above, closed once.
        unsafe { toffee_engine_close(e) };
        buf
    };
    let got = run(spec.as_ptr());
    let want = run(std::ptr::null());
    let mean = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .sum::<f64>()
        / got.len() as f64;
    eprintln!("C ABI on {}: mean pixel difference {mean:.3}", d.name());
    assert!(
        mean < 3.0,
        "C ABI on {}: mean pixel difference {mean}",
        d.name()
    );
}
