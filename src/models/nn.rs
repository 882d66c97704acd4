//! Normalisation layers shared by the model families, loaded by path prefix.

use crate::backend::{self as ops, LinearW};
use crate::tensor::Tensor;
use crate::weights::Vb;
use anyhow::Result;

#[derive(Clone, Debug)]
pub struct GroupNorm {
    pub gamma: Tensor,
    pub beta: Tensor,
    pub groups: usize,
    pub eps: f32,
}

impl GroupNorm {
    pub fn load(vb: &Vb, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if !channels.is_multiple_of(groups) {
            anyhow::bail!(
                "{}: {channels} channels cannot be split into {groups} groups (norm_num_groups)",
                vb.prefix()
            );
        }
        Ok(GroupNorm {
            gamma: vb.get("weight", &[channels])?,
            beta: vb.get("bias", &[channels])?,
            groups,
            eps: eps as f32,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        ops::group_norm(x, self.groups, &self.gamma, &self.beta, self.eps, false)
    }
    pub fn forward_silu(&self, x: &Tensor) -> Tensor {
        ops::group_norm(x, self.groups, &self.gamma, &self.beta, self.eps, true)
    }
}

#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub gamma: Tensor,
    pub beta: Tensor,
    pub eps: f32,
}

impl LayerNorm {
    pub fn load(vb: &Vb, channels: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            gamma: vb.get("weight", &[channels])?,
            beta: vb.get("bias", &[channels])?,
            eps: eps as f32,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        ops::layer_norm(x, &self.gamma, &self.beta, self.eps)
    }
}

/// torch's `ConvTranspose2d(cin, cout, kernel_size=k, stride=k)` (no padding) on NHWC: with the
/// kernel equal to the stride every output pixel has exactly one input pixel, so it is a GEMM to
/// k·k·cout channels followed by a pixel shuffle — no scatter-add, and the GEMM is the backend's.
#[derive(Clone, Debug)]
pub struct ConvTranspose {
    /// [k·k·cout, cin], output channel (ky·k + kx)·cout + co; the bias repeated per (ky, kx).
    lin: LinearW,
    k: usize,
}

impl ConvTranspose {
    pub fn load(vb: &Vb, cin: usize, cout: usize, k: usize, bias: bool) -> Result<Self> {
        let w = vb
            .store()
            .get(&format!("{}.weight", vb.prefix()), &[cin, cout, k, k])?;
        let w = w.data();
        let rows = k * k * cout;
        let mut weight = vec![0.0f32; rows * cin];
        for ci in 0..cin {
            for co in 0..cout {
                for kk in 0..k * k {
                    weight[(kk * cout + co) * cin + ci] = w[(ci * cout + co) * k * k + kk];
                }
            }
        }
        let bias = if bias {
            let b = vb.store().get(&format!("{}.bias", vb.prefix()), &[cout])?;
            Some(Tensor::new(vec![rows], b.data().repeat(k * k)))
        } else {
            None
        };
        let lin = vb.put_linear(LinearW {
            weight: Tensor::new(vec![rows, cin], weight),
            bias,
        });
        Ok(ConvTranspose { lin, k })
    }

    /// [N, H, W, cin] → [N, H·k, W·k, cout].
    pub fn forward(&self, x: &Tensor) -> Tensor {
        ops::depth_to_space(&ops::linear(x, &self.lin), self.k)
    }
}
