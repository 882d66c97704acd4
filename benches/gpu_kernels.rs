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

    // GroupNorm + SiLU, SD1.5 level 1 at batch 32 (fp16: 2 bytes read + 2 written per element).
    let x = put(rand(&[32, 64, 64, 320], 1));
    let (gm, bt) = (put(rand(&[320], 2)), put(rand(&[320], 3)));
    g.throughput(Throughput::Bytes(4 * 32 * 64 * 64 * 320));
    g.bench_function("group_norm_silu 32x64x64x320 (bytes)", |b| {
        b.iter(|| {
            ops::group_norm(&x, 32, &gm, &bt, 1e-5, true);
            sync()
        })
    });

    // GEMM: SD1.5 feed-forward input projection at batch 2 (8192 tokens × 320 → 2560).
    let t = put(rand(&[8192, 320], 4));
    let l = LinearW {
        weight: put(rand(&[2560, 320], 5)),
        bias: Some(put(rand(&[2560], 6))),
    };
    g.throughput(Throughput::Elements(2 * 8192 * 320 * 2560));
    g.bench_function("gemm 8192x320x2560 (flop)", |b| {
        b.iter(|| {
            ops::linear(&t, &l);
            sync()
        })
    });

    // Convolution 3×3, 320 → 320 at 64×64, batch 2.
    let xc = put(rand(&[2, 64, 64, 320], 7));
    let mut cw = Conv2dW::from_oihw(&rand(&[320, 320, 3, 3], 8), Some(rand(&[320], 9)), 1, 1);
    cw.weight = put(cw.weight);
    cw.bias = cw.bias.map(put);
    g.throughput(Throughput::Elements(2 * 2 * 64 * 64 * 320 * 320 * 9));
    g.bench_function("conv3x3 2x64x64x320->320 (flop)", |b| {
        b.iter(|| {
            ops::conv2d(&xc, &cw);
            sync()
        })
    });

    // Attention per head dim: self-attention at the level that uses it, batch 2.
    for (dh, heads, l) in [
        (40, 8, 4096),
        (80, 8, 1024),
        (160, 8, 256),
        (64, 10, 4096),
        (64, 20, 1024),
        (128, 4, 4096),
    ] {
        let hd = dh * heads;
        let q = put(rand(&[2, l, hd], 10));
        g.throughput(Throughput::Elements((4 * 2 * l * l * hd) as u64));
        g.bench_function(format!("attention d{dh} h{heads} L{l} (flop)"), |b| {
            b.iter(|| {
                ops::attention(&q, &q, &q, heads, false);
                sync()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
