//! Normalisation layers shared by the model families, loaded by path prefix.

use crate::backend as ops;
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
