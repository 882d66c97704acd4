//! CPU reference backend throughput for the ops that dominate a UNet call. The CPU backend is
//! the correctness reference, not the product; these numbers show where its time goes.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use toffee::backend::{self as ops, Conv2dW, LinearW};
use toffee::tensor::Tensor;

fn rand(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::new(shape.to_vec(), toffee::rng::normal(seed, 0, n))
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu");
    g.sample_size(10);
    // SD1.5 first-level conv: 320 → 320 channels, 3×3, 64×64 latent, batch 1.
    let x = rand(&[1, 64, 64, 320], 1);
    let conv = Conv2dW::from_oihw(&rand(&[320, 320, 3, 3], 2), Some(rand(&[320], 3)), 1, 1);
    g.throughput(Throughput::Elements(2 * 64 * 64 * 320 * 320 * 9));
    g.bench_function("conv3x3_320_64x64 (flop)", |b| {
        b.iter(|| ops::conv2d(&x, &conv))
    });
    // SD1.5 feed-forward GEMM: 4096 tokens × 320 → 2560 (GEGLU input).
    let t = rand(&[4096, 320], 4);
    let l = LinearW {
        weight: rand(&[2560, 320], 5),
        bias: Some(rand(&[2560], 6)),
    };
    g.throughput(Throughput::Elements(2 * 4096 * 320 * 2560));
    g.bench_function("linear_4096x320x2560 (flop)", |b| {
        b.iter(|| ops::linear(&t, &l))
    });
    // SD1.5 level-1 self-attention: 4096 tokens, 8 heads of 40.
    let q = rand(&[1, 4096, 320], 7);
    g.throughput(Throughput::Elements(4 * 4096 * 4096 * 320));
    g.bench_function("attention_4096_8x40 (flop)", |b| {
        b.iter(|| ops::attention(&q, &q, &q, 8, false))
    });
    // GroupNorm + SiLU on the same activation: bytes read + written.
    let gamma = rand(&[320], 8);
    g.throughput(Throughput::Bytes(2 * 4 * 64 * 64 * 320));
    g.bench_function("group_norm_silu_64x64x320 (bytes)", |b| {
        b.iter(|| ops::group_norm(&x, 32, &gamma, &gamma, 1e-5, true))
    });
    g.finish();
}

/// The image encoders of the filter stage at their real configurations (random weights), one
/// 224² image: DINOv2-B/14 (256 patches) and CLIP ViT-L/14's vision tower.
fn encoders(c: &mut Criterion) {
    use toffee::configs::KnownVision;
    let mut g = c.benchmark_group("cpu_encoders");
    g.sample_size(10);
    for k in [KnownVision::Dinov2B14, KnownVision::ClipL14] {
        let cfg = toffee::config::Config::from_json(k.name(), k.config()).unwrap();
        let store = toffee::weights::WeightStore::random(7);
        let vit = toffee::models::vit::Vit::load(&cfg, &store, &ops::Device::Cpu).unwrap();
        let x = rand(&[1, 224, 224, 3], 9);
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("{} 224² (images)", k.name()), |b| {
            b.iter(|| vit.forward(&x).last_hidden_state)
        });
    }
    g.finish();
}

criterion_group!(benches, bench, encoders);
criterion_main!(benches);
