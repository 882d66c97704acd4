//! Where the pipelines' Gaussian noise comes from: per-image seeded streams (the same image for a
//! seed whatever the batch size) or, for parity tests, tensors recorded from diffusers.

use crate::rng;
use crate::tensor::Tensor;
use anyhow::{bail, Result};
use std::collections::VecDeque;

pub enum NoiseSource {
    /// One seed per image of the current chunk; the k-th draw of an image uses stream k.
    Seeded { seeds: Vec<u64>, draws: u64 },
    /// Tensors in diffusers' order of `randn_tensor` calls (NCHW); a batch-1 tensor is shared by
    /// every image, as diffusers does when it encodes one init image for a whole batch.
    Recorded(VecDeque<Tensor>),
}

impl NoiseSource {
    pub fn seeded(seeds: Vec<u64>) -> Self {
        NoiseSource::Seeded { seeds, draws: 0 }
    }

    /// Standard normal noise for `n` images of logical shape (c, h, w), returned NHWC.
    pub fn draw(&mut self, n: usize, c: usize, h: usize, w: usize) -> Result<Tensor> {
        match self {
            NoiseSource::Seeded { seeds, draws } => {
                if seeds.len() != n {
                    bail!("noise for {n} images requested from {} seeds", seeds.len());
                }
                let per = c * h * w;
                let mut data = Vec::with_capacity(n * per);
                for &s in seeds.iter() {
                    data.extend(rng::normal(s, *draws, per));
                }
                *draws += 1;
                // Generated in the logical NCHW order so the values do not depend on memory layout.
                Ok(Tensor::new(vec![n, c, h, w], data).to_nhwc())
            }
            NoiseSource::Recorded(q) => {
                let Some(t) = q.pop_front() else {
                    bail!("recorded noise exhausted: the pipeline draws more often than diffusers did")
                };
                let s = t.shape().to_vec();
                if s.len() != 4 || s[1..] != [c, h, w] || (s[0] != n && s[0] != 1) {
                    bail!("recorded noise has shape {s:?}, the pipeline asks for [{n}, {c}, {h}, {w}]: draw order differs from diffusers");
                }
                let t = t.to_nhwc();
                Ok(if s[0] == n {
                    t
                } else {
                    Tensor::cat0(&vec![&t; n])
                })
            }
        }
    }

    /// Remaining recorded tensors (0 for seeded sources), to check a replay consumed everything.
    pub fn remaining(&self) -> usize {
        match self {
            NoiseSource::Seeded { .. } => 0,
            NoiseSource::Recorded(q) => q.len(),
        }
    }
}
