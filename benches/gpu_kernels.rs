//! The CUDA kernels at SD1.5 / SDXL shapes, in the units that bound them: TFLOP/s for GEMM,
//! convolution and attention, GB/s for GroupNorm (read + write). Each iteration waits for the GPU.
//! Without a CUDA device (or without the `cuda` feature) it prints why and measures nothing.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use toffee::backend::{self as ops, Conv2dW, Device, LinearW};
use toffee::tensor::Tensor;

fn rand(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::new(shape.to_vec(), toffee::rng::normal(seed, 0, n))
}

fn bench(c: &mut Criterion) {
    let d = match Device::open("cuda", false) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e:#})");
            return;
        }
    };
    let put = |t: Tensor| d.put(t);
    let mut g = c.benchmark_group("gpu");
    g.sample_size(20);
    let sync = || d.synchronize().expect("GPU work completes");

    let x = put(rand(&[32, 64, 64, 320], 1));
    let (gm, bt) = (put(rand(&[320], 2)), put(rand(&[320], 3)));
    let rows = put(rand(&[2 * 4096, 320], 11));
    let t = put(rand(&[8192, 320], 4));
    let l = LinearW {
        weight: put(rand(&[2560, 320], 5)),
        bias: Some(put(rand(&[2560], 6))),
    };
    let xc = put(rand(&[2, 64, 64, 320], 7));
    // KRSC weights: the layout cuDNN takes (OIHW → [kh, kw, in, out] would measure im2col).
    let mut cw = Conv2dW::krsc_from_oihw(&rand(&[320, 320, 3, 3], 8), Some(rand(&[320], 9)), 1, 1);
    cw.weight = put(cw.weight);
    cw.bias = cw.bias.map(put);
    let temb = put(rand(&[2, 320], 12));
    // Every kernel with a reference twin runs both ways: `tuned/…` against `reference/…`.
    for reference in [false, true] {
        d.set_reference_kernels(reference);
        let tag = if reference { "reference" } else { "tuned" };
        // GroupNorm + SiLU, SD1.5 level 1 at batch 32 (fp16: 2 bytes read + 2 written per element).
        g.throughput(Throughput::Bytes(4 * 32 * 64 * 64 * 320));
        g.bench_function(format!("{tag}/group_norm_silu 32x64x64x320 (bytes)"), |b| {
            b.iter(|| {
                ops::group_norm(&x, 32, &gm, &bt, 1e-5, true);
                sync()
            })
        });
        // LayerNorm over 8192 tokens of 320 (SD1.5 level 1, batch 2).
        g.throughput(Throughput::Bytes(4 * 8192 * 320));
        g.bench_function(format!("{tag}/layer_norm 8192x320 (bytes)"), |b| {
            b.iter(|| {
                ops::layer_norm(&rows, &gm, &bt, 1e-5);
                sync()
            })
        });
        // A resnet's first convolution with its time embedding: cuDNN + one epilogue pass
        // (tuned) or cuDNN + bias pass + embedding pass (reference).
        g.throughput(Throughput::Elements(2 * 2 * 64 * 64 * 320 * 320 * 9));
        g.bench_function(format!("{tag}/conv3x3+temb 2x64x64x320->320 (flop)"), |b| {
            b.iter(|| {
                ops::conv2d_fused(&xc, &cw, Some(&temb), None);
                sync()
            })
        });
        // The feed-forward input projection + GEGLU, SD1.5 level 1 at batch 2: one fused kernel
        // (tuned) or cuBLASLt + a GEGLU pass (reference).
        let ff = LinearW {
            weight: put(rand(&[2560, 320], 13)),
            bias: Some(put(rand(&[2560], 14))),
        };
        g.throughput(Throughput::Elements(2 * 8192 * 320 * 2560));
        g.bench_function(format!("{tag}/linear_geglu 8192x320x1280 (flop)"), |b| {
            b.iter(|| {
                ops::linear_geglu(&t, &ff);
                sync()
            })
        });
        // Attention per head dim: self-attention at the level that uses it, batch 2; the VAE's
        // 512-wide single head at 64×64 (SD1.5 512² decode), batch 1.
        for (dh, heads, l, n) in [
            (40, 8, 4096, 2),
            (80, 8, 1024, 2),
            (160, 8, 256, 2),
            (64, 10, 4096, 2),
            (64, 20, 1024, 2),
            (128, 4, 4096, 2),
            (512, 1, 4096, 1),
        ] {
            let hd = dh * heads;
            let q = put(rand(&[n, l, hd], 10));
            g.throughput(Throughput::Elements((4 * n * l * l * hd) as u64));
            g.bench_function(format!("{tag}/attention d{dh} h{heads} L{l} (flop)"), |b| {
                b.iter(|| {
                    ops::attention(&q, &q, &q, heads, false);
                    sync()
                })
            });
        }
    }
    d.set_reference_kernels(false);

    // GEMM: SD1.5 feed-forward input projection at batch 2 (8192 tokens × 320 → 2560).
    g.throughput(Throughput::Elements(2 * 8192 * 320 * 2560));
    g.bench_function("gemm 8192x320x2560 (flop)", |b| {
        b.iter(|| {
            ops::linear(&t, &l);
            sync()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
