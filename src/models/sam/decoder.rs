//! SAM's mask decoder: the two-way transformer, the upscaling and the hypernetwork and IoU heads.

use super::config::{relu, Act, SamDecoderConfig};
use crate::backend::{self as ops, Activation, Device, LinearW};
use crate::models::nn::LayerNorm;
use crate::tensor::Tensor;
use crate::weights::Vb;
use anyhow::Result;

/// `SamAttention`: projections to hidden / downsample, heads, SDPA, output projection.
struct Attn {
    q: LinearW,
    k: LinearW,
    v: LinearW,
    o: LinearW,
    heads: usize,
}

impl Attn {
    fn load(vb: &Vb, hidden: usize, inner: usize, heads: usize) -> Result<Attn> {
        Ok(Attn {
            q: vb.pp("q_proj").linear(hidden, inner, true)?,
            k: vb.pp("k_proj").linear(hidden, inner, true)?,
            v: vb.pp("v_proj").linear(hidden, inner, true)?,
            o: vb.pp("out_proj").linear(inner, hidden, true)?,
            heads,
        })
    }
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let a = ops::attention(
            &ops::linear(q, &self.q),
            &ops::linear(k, &self.k),
            &ops::linear(v, &self.v),
            self.heads,
            false,
        );
        ops::linear(&a, &self.o)
    }
}

struct TwoWayBlock {
    self_attn: Attn,
    ln1: LayerNorm,
    t2i: Attn,
    ln2: LayerNorm,
    lin1: LinearW,
    lin2: LinearW,
    ln3: LayerNorm,
    ln4: LayerNorm,
    i2t: Attn,
    skip_first_pe: bool,
}

impl TwoWayBlock {
    fn load(vb: &Vb, c: &SamDecoderConfig, first: bool) -> Result<TwoWayBlock> {
        let h = c.hidden;
        let inner = h / c.downsample;
        let ln = |n: &str| LayerNorm::load(&vb.pp(n), h, c.eps);
        Ok(TwoWayBlock {
            self_attn: Attn::load(&vb.pp("self_attn"), h, h, c.heads)?,
            ln1: ln("layer_norm1")?,
            t2i: Attn::load(&vb.pp("cross_attn_token_to_image"), h, inner, c.heads)?,
            ln2: ln("layer_norm2")?,
            lin1: vb.pp("mlp.lin1").linear(h, c.mlp_dim, true)?,
            lin2: vb.pp("mlp.lin2").linear(c.mlp_dim, h, true)?,
            ln3: ln("layer_norm3")?,
            ln4: ln("layer_norm4")?,
            i2t: Attn::load(&vb.pp("cross_attn_image_to_token"), h, inner, c.heads)?,
            skip_first_pe: first,
        })
    }

    /// queries [N, T, C], keys [N, HW, C]; `qpe` the prompt tokens, `kpe` the image positions.
    fn forward(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        qpe: &Tensor,
        kpe: &Tensor,
        act: Act,
    ) -> (Tensor, Tensor) {
        let q = if self.skip_first_pe {
            self.self_attn.forward(queries, queries, queries)
        } else {
            let qq = ops::add(queries, qpe);
            ops::add(queries, &self.self_attn.forward(&qq, &qq, queries))
        };
        let q = self.ln1.forward(&q);
        let kk = ops::add(keys, kpe);
        let q = self.ln2.forward(&ops::add(
            &q,
            &self.t2i.forward(&ops::add(&q, qpe), &kk, keys),
        ));
        let m = ops::linear(&act.apply(&ops::linear(&q, &self.lin1)), &self.lin2);
        let q = self.ln3.forward(&ops::add(&q, &m));
        let k = self.ln4.forward(&ops::add(
            keys,
            &self.i2t.forward(&kk, &ops::add(&q, qpe), &q),
        ));
        (q, k)
    }
}

/// `SamFeedForward`: proj_in, ReLU, (depth − 2) × (layer, ReLU), proj_out.
struct FeedForward {
    proj_in: LinearW,
    layers: Vec<LinearW>,
    proj_out: LinearW,
}

impl FeedForward {
    fn load(vb: &Vb, inp: usize, hidden: usize, out: usize, depth: usize) -> Result<Self> {
        Ok(FeedForward {
            proj_in: vb.pp("proj_in").linear(inp, hidden, true)?,
            layers: (0..depth - 2)
                .map(|i| vb.pp(format!("layers.{i}")).linear(hidden, hidden, true))
                .collect::<Result<_>>()?,
            proj_out: vb.pp("proj_out").linear(hidden, out, true)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = relu(&ops::linear(x, &self.proj_in));
        for l in &self.layers {
            h = relu(&ops::linear(&h, l));
        }
        ops::linear(&h, &self.proj_out)
    }
}

/// torch ConvTranspose2d(kernel_size=k, stride=k) on NHWC: a linear layer to k·k·Cout channels
/// per input pixel, then a pixel shuffle (`gather`).
struct ConvT {
    lin: LinearW,
    k: usize,
    cout: usize,
}

impl ConvT {
    fn load(vb: &Vb, cin: usize, cout: usize, k: usize) -> Result<ConvT> {
        let w = vb
            .store()
            .get(&format!("{}.weight", vb.prefix()), &[cin, cout, k, k])?;
        let b = vb.store().get(&format!("{}.bias", vb.prefix()), &[cout])?;
        let (w, b) = (w.data(), b.data());
        let rows = k * k * cout;
        let mut lw = vec![0.0f32; rows * cin];
        let mut lb = vec![0.0f32; rows];
        for ci in 0..cin {
            for co in 0..cout {
                for p in 0..k * k {
                    lw[(p * cout + co) * cin + ci] = w[(ci * cout + co) * k * k + p];
                }
            }
        }
        for p in 0..k * k {
            lb[p * cout..(p + 1) * cout].copy_from_slice(b);
        }
        Ok(ConvT {
            lin: vb.put_linear(LinearW {
                weight: Tensor::new(vec![rows, cin], lw),
                bias: Some(Tensor::new(vec![rows], lb)),
            }),
            k,
            cout,
        })
    }
    fn forward(&self, x: &Tensor, dev: &Device) -> Tensor {
        let (n, h, w, _) = x.dims4();
        let k = self.k;
        let y = ops::linear(x, &self.lin).reshape(vec![n * h * w * k * k, self.cout]);
        let (oh, ow) = (h * k, w * k);
        let mut idx = Vec::with_capacity(n * oh * ow);
        for b in 0..n {
            for oy in 0..oh {
                for ox in 0..ow {
                    let src = (b * h + oy / k) * w + ox / k;
                    idx.push((src * k * k + (oy % k) * k + ox % k) as u32);
                }
            }
        }
        ops::gather(&y, &dev.put_ids(&idx)).reshape(vec![n, oh, ow, self.cout])
    }
}

pub(super) struct MaskDecoder {
    /// [1 + masks, C] host: the IoU token, then the mask tokens.
    output_tokens: Tensor,
    layers: Vec<TwoWayBlock>,
    final_attn: Attn,
    final_ln: LayerNorm,
    up1: ConvT,
    up_ln: LayerNorm,
    up2: ConvT,
    hyper: Vec<FeedForward>,
    iou_head: FeedForward,
}

impl MaskDecoder {
    pub(super) fn load(vb: &Vb, c: &SamDecoderConfig) -> Result<MaskDecoder> {
        let h = c.hidden;
        let m = c.multimask_outputs + 1;
        let iou = vb.store().get("mask_decoder.iou_token.weight", &[1, h])?;
        let masks = vb.store().get("mask_decoder.mask_tokens.weight", &[m, h])?;
        let t = vb.pp("transformer");
        Ok(MaskDecoder {
            output_tokens: Tensor::cat0(&[&iou, &masks]),
            layers: (0..c.layers)
                .map(|i| TwoWayBlock::load(&t.pp(format!("layers.{i}")), c, i == 0))
                .collect::<Result<_>>()?,
            final_attn: Attn::load(
                &t.pp("final_attn_token_to_image"),
                h,
                h / c.downsample,
                c.heads,
            )?,
            // nn.LayerNorm(hidden_size): torch's default eps, not the config's.
            final_ln: LayerNorm::load(&t.pp("layer_norm_final_attn"), h, 1e-5)?,
            up1: ConvT::load(&vb.pp("upscale_conv1"), h, h / 4, 2)?,
            up_ln: LayerNorm::load(&vb.pp("upscale_layer_norm"), h / 4, 1e-6)?,
            up2: ConvT::load(&vb.pp("upscale_conv2"), h / 4, h / 8, 2)?,
            hyper: (0..m)
                .map(|i| {
                    FeedForward::load(
                        &vb.pp(format!("output_hypernetworks_mlps.{i}")),
                        h,
                        h,
                        h / 8,
                        3,
                    )
                })
                .collect::<Result<_>>()?,
            iou_head: FeedForward::load(
                &vb.pp("iou_prediction_head"),
                h,
                c.iou_hidden,
                m,
                c.iou_depth,
            )?,
        })
    }
    /// The decoder's query tokens [N, T, C] on the device: IoU + mask tokens, then the prompt
    /// tokens (none when the sparse embeddings sum to 0, as transformers decides).
    pub(super) fn query_tokens(
        &self,
        sparse: &Tensor,
        nn: usize,
        ch: usize,
        dev: &Device,
    ) -> Tensor {
        let use_sparse = sparse.data().iter().sum::<f32>() != 0.0;
        let st = if use_sparse { sparse.shape()[2] } else { 0 };
        let out_tokens = self.output_tokens.data();
        let t = out_tokens.len() / ch + st;
        let mut tokens = Vec::with_capacity(nn * t * ch);
        for i in 0..nn {
            tokens.extend_from_slice(out_tokens);
            if use_sparse {
                tokens.extend_from_slice(&sparse.data()[i * st * ch..(i + 1) * st * ch]);
            }
        }
        dev.put(Tensor::new(vec![nn, t, ch], tokens))
    }

    /// The two-way transformer and the final token-to-image attention: (normalised queries
    /// [N, T, C], keys [N, HW, C]).
    pub(super) fn transformer(
        &self,
        qpe: &Tensor,
        mut keys: Tensor,
        kpe: &Tensor,
        act: Act,
    ) -> (Tensor, Tensor) {
        let mut queries = qpe.clone();
        for l in &self.layers {
            (queries, keys) = l.forward(&queries, &keys, qpe, kpe, act);
        }
        let a = self
            .final_attn
            .forward(&ops::add(&queries, qpe), &ops::add(&keys, kpe), &keys);
        (self.final_ln.forward(&ops::add(&queries, &a)), keys)
    }

    /// Upscaled embeddings [N, 4g, 4g, C/8] of the image keys [N, g, g, C].
    pub(super) fn upscale(&self, keys: &Tensor, dev: &Device) -> Tensor {
        let up = self.up1.forward(keys, dev);
        let up = Activation::Gelu.apply(&self.up_ln.forward(&up));
        Activation::Gelu.apply(&self.up2.forward(&up, dev))
    }

    /// Mask logits [N, M, HW] (host) of the `picked` mask tokens: each token's hypernetwork
    /// output dotted with the upscaled embeddings `up`; `queries` is [N, T·C].
    pub(super) fn mask_logits(
        &self,
        queries: &Tensor,
        up: &Tensor,
        picked: &[usize],
        ch: usize,
    ) -> Result<Vec<f32>> {
        let nn = queries.shape()[0];
        let (hw, c8) = (up.shape()[1] * up.shape()[2], ch / 8);
        let hyper: Vec<Tensor> = picked
            .iter()
            .map(|&i| {
                let tok = ops::slice_channels(queries, (1 + i) * ch, ch);
                self.hyper[i].forward(&tok)
            })
            .collect();
        let hyper = ops::concat_channels(&hyper.iter().collect::<Vec<_>>());
        let m = picked.len();
        let mut masks = vec![0.0f32; nn * m * hw];
        for i in 0..nn {
            let w = LinearW {
                weight: hyper.narrow0(i, 1).reshape(vec![m, c8]),
                bias: None,
            };
            let r = ops::linear(&up.narrow0(i, 1).reshape(vec![hw, c8]), &w).to_host()?;
            // [HW, M] -> [M, HW]
            for (p, row) in r.data().chunks(m).enumerate() {
                for (j, v) in row.iter().enumerate() {
                    masks[(i * m + j) * hw + p] = *v;
                }
            }
        }
        Ok(masks)
    }

    /// The predicted IoU [N, M] (host) of the `picked` of all `m_all` masks.
    pub(super) fn iou_scores(
        &self,
        queries: &Tensor,
        picked: &[usize],
        ch: usize,
        m_all: usize,
    ) -> Result<Vec<f32>> {
        let iou = self
            .iou_head
            .forward(&ops::slice_channels(queries, 0, ch))
            .to_host()?;
        Ok(iou
            .data()
            .chunks(m_all)
            .flat_map(|r| picked.iter().map(|&j| r[j]).collect::<Vec<_>>())
            .collect())
    }
}
