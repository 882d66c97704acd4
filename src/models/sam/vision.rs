//! SAM's ViT image encoder: windowed and global attention with decomposed relative positions,
//! then a conv neck.

use super::config::SamVisionConfig;
use crate::backend::{self as ops, Conv2dW, Device, LinearW};
use crate::models::nn::LayerNorm;
use crate::tensor::Tensor;
use crate::weights::Vb;
use anyhow::{bail, Result};

/// transformers' `get_rel_pos` table resize: `F.interpolate(mode="linear", align_corners=False)`
/// of a [L, D] table to `n` rows (identity when L == n).
pub fn resize_rel_pos(table: &Tensor, n: usize) -> Tensor {
    let (l, d) = (table.shape()[0], table.shape()[1]);
    if l == n {
        return table.clone();
    }
    let src = table.data();
    let scale = l as f32 / n as f32;
    let mut out = vec![0.0f32; n * d];
    for (i, row) in out.chunks_mut(d).enumerate() {
        let x = ((i as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (x as usize).min(l - 1);
        let i1 = (i0 + 1).min(l - 1);
        let t = x - i0 as f32;
        for (c, o) in row.iter_mut().enumerate() {
            *o = (1.0 - t) * src[i0 * d + c] + t * src[i1 * d + c];
        }
    }
    Tensor::new(vec![n, d], out)
}

struct VisionLayer {
    ln1: LayerNorm,
    qkv: LinearW,
    proj: LinearW,
    /// Resized to 2·S − 1 rows for this layer's token grid S (window or whole grid).
    rel: Option<(Tensor, Tensor)>,
    ln2: LayerNorm,
    lin1: LinearW,
    lin2: LinearW,
    /// 0: global attention.
    window: usize,
}

impl VisionLayer {
    fn load(vb: &Vb, c: &SamVisionConfig, window: usize) -> Result<VisionLayer> {
        let d = c.hidden;
        let hd = d / c.heads;
        let side = if window == 0 {
            c.image_size / c.patch
        } else {
            window
        };
        let rel = if c.use_rel_pos {
            let a = vb.pp("attn");
            let table = |name: &str| -> Result<Tensor> {
                let full = format!("{}.{name}", a.prefix());
                // The stored table may have any length (resized below); without one (get's
                // error names it, synthesised weights are drawn) the length the layer uses.
                let shape = a
                    .store()
                    .shape(&full)
                    .unwrap_or_else(|| vec![2 * side - 1, hd]);
                if shape.len() != 2 || shape[1] != hd || shape[0] == 0 {
                    bail!("`{full}` has shape {shape:?}; expected [rows, {hd}]");
                }
                let t = a.store().get(&full, &shape)?;
                Ok(vb.device().put(resize_rel_pos(&t, 2 * side - 1)))
            };
            Some((table("rel_pos_h")?, table("rel_pos_w")?))
        } else {
            None
        };
        Ok(VisionLayer {
            ln1: LayerNorm::load(&vb.pp("layer_norm1"), d, c.eps)?,
            qkv: vb.pp("attn.qkv").linear(d, 3 * d, c.qkv_bias)?,
            proj: vb.pp("attn.proj").linear(d, d, true)?,
            rel,
            ln2: LayerNorm::load(&vb.pp("layer_norm2"), d, c.eps)?,
            lin1: vb.pp("mlp.lin1").linear(d, c.mlp_dim, true)?,
            lin2: vb.pp("mlp.lin2").linear(c.mlp_dim, d, true)?,
            window,
        })
    }

    /// x: [B, g, g, D] NHWC.
    fn forward(&self, x: &Tensor, c: &SamVisionConfig, dev: &Device) -> Tensor {
        let (b, gh, gw, d) = x.dims4();
        let h = self.ln1.forward(x);
        let (tokens, side_h, side_w) = if self.window > 0 {
            let ws = self.window;
            let idx = window_rows(b, gh, gw, ws);
            let flat = h.reshape(vec![b * gh * gw, d]);
            let zero = dev.put(Tensor::zeros(vec![1, d]));
            let table = Tensor::cat0(&[&flat, &zero]);
            let n = idx.len() / (ws * ws);
            let t = ops::gather(&table, &dev.put_ids(&idx)).reshape(vec![n, ws * ws, d]);
            (t, ws, ws)
        } else {
            (h.reshape(vec![b, gh * gw, d]), gh, gw)
        };
        let qkv = ops::linear(&tokens, &self.qkv);
        let (q, k, v) = (
            ops::slice_channels(&qkv, 0, d),
            ops::slice_channels(&qkv, d, d),
            ops::slice_channels(&qkv, 2 * d, d),
        );
        let a = match &self.rel {
            Some((rh, rw)) => ops::rel_pos_attention(&q, &k, &v, c.heads, (side_h, side_w), rh, rw),
            None => ops::attention(&q, &k, &v, c.heads, false),
        };
        let a = ops::linear(&a, &self.proj);
        let a = if self.window > 0 {
            let idx = unwindow_rows(b, gh, gw, self.window);
            let n = a.shape()[0] * a.shape()[1];
            ops::gather(&a.reshape(vec![n, d]), &dev.put_ids(&idx)).reshape(vec![b, gh, gw, d])
        } else {
            a.reshape(vec![b, gh, gw, d])
        };
        let x = ops::add(x, &a);
        let m = ops::linear(
            &c.act.apply(&ops::linear(&self.ln2.forward(&x), &self.lin1)),
            &self.lin2,
        );
        ops::add(&x, &m)
    }
}

/// Rows of `[B·gh·gw + 1, D]` (the last row zero) that make the ws×ws windows of a zero-padded
/// grid, window by window in (batch, window row, window column) order: transformers'
/// `window_partition`.
fn window_rows(b: usize, gh: usize, gw: usize, ws: usize) -> Vec<u32> {
    let (nh, nw) = (gh.div_ceil(ws), gw.div_ceil(ws));
    let zero = (b * gh * gw) as u32;
    let mut idx = Vec::with_capacity(b * nh * nw * ws * ws);
    for bi in 0..b {
        for wy in 0..nh {
            for wx in 0..nw {
                for iy in 0..ws {
                    for ix in 0..ws {
                        let (y, x) = (wy * ws + iy, wx * ws + ix);
                        idx.push(if y < gh && x < gw {
                            ((bi * gh + y) * gw + x) as u32
                        } else {
                            zero
                        });
                    }
                }
            }
        }
    }
    idx
}

/// The inverse of `window_rows`: for every grid token, its row among the windows' tokens
/// (`window_unpartition`, padding dropped).
fn unwindow_rows(b: usize, gh: usize, gw: usize, ws: usize) -> Vec<u32> {
    let (nh, nw) = (gh.div_ceil(ws), gw.div_ceil(ws));
    let mut idx = Vec::with_capacity(b * gh * gw);
    for bi in 0..b {
        for y in 0..gh {
            for x in 0..gw {
                let win = (bi * nh + y / ws) * nw + x / ws;
                idx.push((win * ws * ws + (y % ws) * ws + x % ws) as u32);
            }
        }
    }
    idx
}

pub(super) struct VisionEncoder {
    patch_embed: Conv2dW,
    /// [1, g, g, D]
    pos: Option<Tensor>,
    layers: Vec<VisionLayer>,
    neck_conv1: Conv2dW,
    neck_ln1: LayerNorm,
    neck_conv2: Conv2dW,
    neck_ln2: LayerNorm,
}

impl VisionEncoder {
    pub(super) fn load(vb: &Vb, c: &SamVisionConfig) -> Result<VisionEncoder> {
        let g = c.image_size / c.patch;
        let d = c.hidden;
        let layers = (0..c.layers)
            .map(|i| {
                let w = if c.global_attn_indexes.contains(&i) {
                    0
                } else {
                    c.window
                };
                VisionLayer::load(&vb.pp(format!("layers.{i}")), c, w)
            })
            .collect::<Result<Vec<_>>>()?;
        let oc = c.output_channels;
        // SamLayerNorm's default eps (the neck builds it without the config's).
        let neck_eps = 1e-6;
        Ok(VisionEncoder {
            patch_embed: vb
                .pp("patch_embed.projection")
                .conv2d(c.channels, d, c.patch, c.patch, 0)?,
            pos: if c.use_abs_pos {
                Some(vb.get("pos_embed", &[1, g, g, d])?)
            } else {
                None
            },
            layers,
            neck_conv1: vb.pp("neck.conv1").conv2d_bias(d, oc, 1, 1, 0, false)?,
            neck_ln1: LayerNorm::load(&vb.pp("neck.layer_norm1"), oc, neck_eps)?,
            neck_conv2: vb.pp("neck.conv2").conv2d_bias(oc, oc, 3, 1, 1, false)?,
            neck_ln2: LayerNorm::load(&vb.pp("neck.layer_norm2"), oc, neck_eps)?,
        })
    }

    /// pixels [B, S, S, C] -> image embeddings [B, g, g, output_channels].
    pub(super) fn forward(&self, pixels: &Tensor, c: &SamVisionConfig, dev: &Device) -> Tensor {
        let b = pixels.shape()[0];
        let mut x = ops::conv2d(pixels, &self.patch_embed);
        if let Some(p) = &self.pos {
            x = ops::add(&x, &Tensor::cat0(&vec![p; b]));
        }
        for l in &self.layers {
            x = l.forward(&x, c, dev);
        }
        let x = self.neck_ln1.forward(&ops::conv2d(&x, &self.neck_conv1));
        self.neck_ln2.forward(&ops::conv2d(&x, &self.neck_conv2))
    }
}
