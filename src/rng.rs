//! Reproducible Gaussian noise: Philox4x32-10 (counter-based, so element i of stream (seed, s)
//! is the same on any device and in any batch) with the Box–Muller transform.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

fn philox(mut c: [u32; 4], mut k: [u32; 2]) -> [u32; 4] {
    for _ in 0..10 {
        let p0 = M0 as u64 * c[0] as u64;
        let p1 = M1 as u64 * c[2] as u64;
        c = [
            (p1 >> 32) as u32 ^ c[1] ^ k[0],
            p1 as u32,
            (p0 >> 32) as u32 ^ c[3] ^ k[1],
            p0 as u32,
        ];
        k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
    }
    c
}

/// Standard normal values of stream `stream` under `seed`: `fill` writes elements `offset..`.
pub fn normal_fill(seed: u64, stream: u64, offset: u64, out: &mut [f32]) {
    let key = [seed as u32, (seed >> 32) as u32];
    let mut i = 0;
    while i < out.len() {
        let idx = offset + i as u64;
        let block = idx / 4;
        let r = philox(
            [
                block as u32,
                (block >> 32) as u32,
                stream as u32,
                (stream >> 32) as u32,
            ],
            key,
        );
        let u = |x: u32| (x as f64 + 0.5) / 4294967296.0;
        let (r1, r2) = ((-2.0 * u(r[0]).ln()).sqrt(), (-2.0 * u(r[2]).ln()).sqrt());
        let (a1, a2) = (
            std::f64::consts::TAU * u(r[1]),
            std::f64::consts::TAU * u(r[3]),
        );
        let vals = [r1 * a1.cos(), r1 * a1.sin(), r2 * a2.cos(), r2 * a2.sin()];
        let start = (idx % 4) as usize;
        for v in &vals[start..] {
            if i >= out.len() {
                break;
            }
            out[i] = *v as f32;
            i += 1;
        }
    }
}

/// `n` standard normal values (filled in parallel: counter-based, so the result does not depend
/// on the split).
pub fn normal(seed: u64, stream: u64, n: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let mut v = vec![0.0; n];
    v.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, c)| normal_fill(seed, stream, (i * CHUNK) as u64, c));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_look_normal() {
        let v = normal(42, 0, 200_000);
        let mean = v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
        let tail = v.iter().filter(|x| x.abs() > 3.0).count() as f64 / v.len() as f64;
        assert!((tail - 0.0027).abs() < 0.001, "P(|x|>3) = {tail}");
    }

    #[test]
    fn offsets_and_streams() {
        let full = normal(7, 3, 37);
        let mut part = vec![0.0; 30];
        normal_fill(7, 3, 7, &mut part);
        assert_eq!(&full[7..], &part[..]);
        assert_ne!(normal(7, 4, 8), normal(7, 3, 8));
        assert_ne!(normal(8, 3, 8), normal(7, 3, 8));
    }
}
