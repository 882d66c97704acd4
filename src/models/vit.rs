//! Vision transformers, one family: transformers' `ViTModel` (DINO v1), `Dinov2Model` /
//! `Dinov2WithRegistersModel` and `CLIPVisionModel` / `CLIPVisionModelWithProjection` (also the
//! vision tower of a `CLIPModel` folder). They differ only in a few switches, so one `VitConfig`
//! holds them: where the embeddings are normalised (CLIP's `pre_layrnorm`), layer scale, the MLP
//! (plain or SwiGLU), register tokens, the final norm (sequence-wide or on the pooled CLS only),
//! the pooler and the projection.
//!
//! Layer scale is folded into the output projections at load time (λ·(Wx + b) = (λW)x + λb), and
//! SwiGLU's gate half is moved second, so the forward uses only the backend's existing ops.

use super::nn::LayerNorm;
use crate::backend::{self as ops, Activation, Conv2dW, Device, LinearW};
use crate::config::Config;
use crate::tensor::Tensor;
use crate::weights::{Vb, WeightStore};
use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VitKind {
    /// transformers `ViTModel` (DINO v1 checkpoints such as facebook/dino-vits16).
    Vit,
    /// `Dinov2Model` and `Dinov2WithRegistersModel`.
    Dinov2,
    /// `CLIPVisionModel` / `CLIPVisionModelWithProjection`.
    ClipVision,
}

impl VitKind {
    pub fn class_name(self) -> &'static str {
        match self {
            VitKind::Vit => "ViTModel",
            VitKind::Dinov2 => "Dinov2Model",
            VitKind::ClipVision => "CLIPVisionModel",
        }
    }
}

#[derive(Clone, Debug)]
pub struct VitConfig {
    pub kind: VitKind,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    /// The MLP's hidden width (for SwiGLU: read from the weights, see `Mlp`).
    pub intermediate: usize,
    pub patch: usize,
    pub image_size: usize,
    pub channels: usize,
    pub eps: f64,
    pub act: Activation,
    pub qkv_bias: bool,
    pub layer_scale: bool,
    pub swiglu: bool,
    pub registers: usize,
    /// CLIP's projection width (`visual_projection`), when the checkpoint has one.
    pub projection_dim: Option<usize>,
    /// transformers resizes position embeddings with antialiased bicubic in
    /// `Dinov2WithRegistersModel` and plain bicubic in `Dinov2Model`.
    pub interpolate_antialias: bool,
}

impl VitConfig {
    /// From a transformers config.json: a vision model's own config, or a `CLIPModel` config (its
    /// `vision_config` is used). `model_type` picks the family.
    pub fn parse(cfg: &Config) -> Result<VitConfig> {
        let model_type = cfg.str_or("model_type", "")?;
        match model_type {
            "clip" => {
                let Some(vision) = cfg.get("vision_config").cloned() else {
                    bail!(
                        "{}: a CLIPModel config without `vision_config`",
                        cfg.path.display()
                    );
                };
                let mut sub =
                    Config::from_json(&format!("{} (vision_config)", cfg.path.display()), vision)?;
                // transformers fills `projection_dim` at the top level of a CLIPConfig.
                if let Some(p) = cfg.get("projection_dim") {
                    sub.json.insert("projection_dim".into(), p.clone());
                }
                Self::parse_kind(&sub, VitKind::ClipVision)
            }
            "clip_vision_model" => Self::parse_kind(cfg, VitKind::ClipVision),
            "vit" | "dino" => Self::parse_kind(cfg, VitKind::Vit),
            "dinov2" => Self::parse_kind(cfg, VitKind::Dinov2),
            "dinov2_with_registers" => {
                let mut c = Self::parse_kind(cfg, VitKind::Dinov2)?;
                c.interpolate_antialias = true;
                Ok(c)
            }
            other => Err(cfg.unsupported(
                "model_type",
                other,
                "vit, dinov2, dinov2_with_registers, clip_vision_model, clip",
            )),
        }
    }

    fn parse_kind(cfg: &Config, kind: VitKind) -> Result<VitConfig> {
        cfg.check_sizes(&[
            ("hidden_size", 16384),
            ("intermediate_size", 65536),
            ("num_hidden_layers", 256),
            ("num_attention_heads", 1024),
            ("image_size", 8192),
            ("patch_size", 1024),
            ("num_channels", 64),
            ("num_register_tokens", 1024),
            ("projection_dim", 16384),
        ])?;
        let hidden = cfg.usize("hidden_size")?;
        let heads = cfg.usize("num_attention_heads")?;
        let layers = cfg.usize("num_hidden_layers")?;
        let (default_act, default_eps, default_image) = match kind {
            VitKind::Vit => ("gelu", 1e-12, 224),
            VitKind::Dinov2 => ("gelu", 1e-6, 518),
            VitKind::ClipVision => ("quick_gelu", 1e-5, 224),
        };
        let act_name = cfg.str_or("hidden_act", default_act)?;
        let act = match Activation::parse(act_name) {
            Some(a @ (Activation::Gelu | Activation::QuickGelu | Activation::Silu)) => a,
            _ => return Err(cfg.unsupported("hidden_act", act_name, "gelu, quick_gelu, silu")),
        };
        if heads == 0 || !hidden.is_multiple_of(heads) {
            bail!(
                "{}: hidden_size {hidden} is not divisible by num_attention_heads {heads}",
                cfg.path.display()
            );
        }
        let patch = cfg.usize_or("patch_size", if kind == VitKind::Dinov2 { 14 } else { 16 })?;
        let image_size = cfg.usize_or("image_size", default_image)?;
        if patch == 0 || image_size < patch {
            bail!(
                "{}: image_size {image_size} holds no {patch}-pixel patch",
                cfg.path.display()
            );
        }
        let intermediate = match kind {
            VitKind::Dinov2 => {
                let ratio = cfg.f64_or("mlp_ratio", 4.0)?;
                (hidden as f64 * ratio) as usize
            }
            _ => cfg.usize("intermediate_size")?,
        };
        let swiglu = kind == VitKind::Dinov2 && cfg.bool_or("use_swiglu_ffn", false)?;
        if kind == VitKind::Vit {
            let pooler_act = cfg.str_or("pooler_act", "tanh")?;
            if pooler_act != "tanh" {
                return Err(cfg.unsupported("pooler_act", pooler_act, "tanh"));
            }
        }
        Ok(VitConfig {
            kind,
            hidden,
            layers,
            heads,
            intermediate,
            patch,
            image_size,
            channels: cfg.usize_or("num_channels", 3)?,
            eps: cfg.eps_or("layer_norm_eps", default_eps)?,
            act,
            qkv_bias: kind == VitKind::ClipVision || cfg.bool_or("qkv_bias", true)?,
            layer_scale: kind == VitKind::Dinov2,
            swiglu,
            registers: if kind == VitKind::Dinov2 {
                cfg.usize_or("num_register_tokens", 0)?
            } else {
                0
            },
            projection_dim: if kind == VitKind::ClipVision {
                cfg.opt_usize("projection_dim")?
            } else {
                None
            },
            interpolate_antialias: false,
        })
    }

    /// Patches along one side at the training size.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch
    }
}

/// Strips the prefixes checkpoints put in front of the vision model's own names: `vit.` (ViT
/// classifiers), `dinov2.`, and `vision_model.` (CLIP vision; `visual_projection` stays as is).
pub fn normalise_name(name: &str) -> Option<String> {
    ["vision_model.", "vit.", "dinov2."]
        .iter()
        .find_map(|p| name.strip_prefix(p))
        .map(String::from)
}

enum Mlp {
    Plain {
        fc1: LinearW,
        fc2: LinearW,
    },
    /// DINOv2's SwiGLU: `weights_in` with its halves swapped so `glu` gates with the second half.
    SwiGlu {
        w_in: LinearW,
        w_out: LinearW,
    },
}

/// One pre-norm encoder block; the names are per family (`names()`).
struct Layer {
    ln1: LayerNorm,
    q: LinearW,
    k: LinearW,
    v: LinearW,
    /// With DINOv2's `layer_scale1` folded in.
    o: LinearW,
    ln2: LayerNorm,
    /// With DINOv2's `layer_scale2` folded in.
    mlp: Mlp,
}

/// Where the per-family tensors of one layer live.
struct LayerNames {
    ln1: &'static str,
    ln2: &'static str,
    q: &'static str,
    k: &'static str,
    v: &'static str,
    o: &'static str,
    fc1: &'static str,
    fc2: &'static str,
}

fn names(kind: VitKind) -> LayerNames {
    match kind {
        VitKind::Vit => LayerNames {
            ln1: "layernorm_before",
            ln2: "layernorm_after",
            q: "attention.attention.query",
            k: "attention.attention.key",
            v: "attention.attention.value",
            o: "attention.output.dense",
            fc1: "intermediate.dense",
            fc2: "output.dense",
        },
        VitKind::Dinov2 => LayerNames {
            ln1: "norm1",
            ln2: "norm2",
            q: "attention.attention.query",
            k: "attention.attention.key",
            v: "attention.attention.value",
            o: "attention.output.dense",
            fc1: "mlp.fc1",
            fc2: "mlp.fc2",
        },
        VitKind::ClipVision => LayerNames {
            ln1: "layer_norm1",
            ln2: "layer_norm2",
            q: "self_attn.q_proj",
            k: "self_attn.k_proj",
            v: "self_attn.v_proj",
            o: "self_attn.out_proj",
            fc1: "mlp.fc1",
            fc2: "mlp.fc2",
        },
    }
}

/// Multiplies a host linear layer's outputs by `scale` (one value per output feature).
fn fold_scale(mut l: LinearW, scale: &[f32]) -> LinearW {
    let inp = l.weight.shape()[1];
    for (row, s) in l.weight.data_mut().chunks_mut(inp).zip(scale) {
        row.iter_mut().for_each(|w| *w *= s);
    }
    if let Some(b) = l.bias.as_mut() {
        b.data_mut()
            .iter_mut()
            .zip(scale)
            .for_each(|(b, s)| *b *= s);
    }
    l
}

/// Swaps the two halves of a linear layer's outputs.
fn swap_halves(mut l: LinearW) -> LinearW {
    let (out, inp) = (l.weight.shape()[0], l.weight.shape()[1]);
    let half = out / 2 * inp;
    let w = l.weight.data_mut();
    let first: Vec<f32> = w[..half].to_vec();
    w.copy_within(half.., 0);
    w[half..].copy_from_slice(&first);
    if let Some(b) = l.bias.as_mut() {
        let b = b.data_mut();
        let first: Vec<f32> = b[..out / 2].to_vec();
        b.copy_within(out / 2.., 0);
        b[out / 2..].copy_from_slice(&first);
    }
    l
}

impl Layer {
    fn load(vb: &Vb, c: &VitConfig) -> Result<Layer> {
        let n = names(c.kind);
        let d = c.hidden;
        let eps = c.eps;
        let scale = |name: &str| -> Result<Option<Vec<f32>>> {
            if !c.layer_scale {
                return Ok(None);
            }
            let t = vb
                .store()
                .get(&format!("{}.{name}.lambda1", vb.prefix()), &[d])?;
            Ok(Some(t.into_vec()))
        };
        let scaled = |l: LinearW, s: Option<Vec<f32>>| match s {
            Some(s) => fold_scale(l, &s),
            None => l,
        };
        let o = scaled(vb.pp(n.o).linear_host(d, d, true)?, scale("layer_scale1")?);
        let s2 = scale("layer_scale2")?;
        let mlp = if c.swiglu {
            let w_in_vb = vb.pp("mlp.weights_in");
            let w_name = format!("{}.weight", w_in_vb.prefix());
            let Some((info, _)) = w_in_vb.store().info(&w_name) else {
                bail!("missing tensor `{w_name}`");
            };
            let out2 = info.shape.first().copied().unwrap_or(0);
            if out2 == 0 || !out2.is_multiple_of(2) {
                bail!(
                    "`{}.weight`: {out2} output features cannot be split into SwiGLU halves",
                    w_in_vb.prefix()
                );
            }
            let h = out2 / 2;
            Mlp::SwiGlu {
                w_in: vb.put_linear(swap_halves(w_in_vb.linear_host(d, out2, true)?)),
                w_out: vb.put_linear(scaled(
                    vb.pp("mlp.weights_out").linear_host(h, d, true)?,
                    s2,
                )),
            }
        } else {
            Mlp::Plain {
                fc1: vb.pp(n.fc1).linear(d, c.intermediate, true)?,
                fc2: vb.put_linear(scaled(
                    vb.pp(n.fc2).linear_host(c.intermediate, d, true)?,
                    s2,
                )),
            }
        };
        Ok(Layer {
            ln1: LayerNorm::load(&vb.pp(n.ln1), d, eps)?,
            q: vb.pp(n.q).linear(d, d, c.qkv_bias)?,
            k: vb.pp(n.k).linear(d, d, c.qkv_bias)?,
            v: vb.pp(n.v).linear(d, d, c.qkv_bias)?,
            o: vb.put_linear(o),
            ln2: LayerNorm::load(&vb.pp(n.ln2), d, eps)?,
            mlp,
        })
    }

    fn forward(&self, x: &Tensor, heads: usize, act: Activation) -> Tensor {
        let h = self.ln1.forward(x);
        let (q, k, v) = (
            ops::linear(&h, &self.q),
            ops::linear(&h, &self.k),
            ops::linear(&h, &self.v),
        );
        let a = ops::linear(&ops::attention(&q, &k, &v, heads, false), &self.o);
        let x = ops::add(x, &a);
        let h = self.ln2.forward(&x);
        let m = match &self.mlp {
            Mlp::Plain { fc1, fc2 } => ops::linear(&act.apply(&ops::linear(&h, fc1)), fc2),
            Mlp::SwiGlu { w_in, w_out } => {
                ops::linear(&ops::glu(&ops::linear(&h, w_in), Activation::Silu), w_out)
            }
        };
        ops::add(&x, &m)
    }
}

/// What follows the last layer.
enum Head {
    /// ViT: LayerNorm over the sequence, then (optionally) dense + tanh on the CLS token.
    Vit {
        norm: LayerNorm,
        pooler: Option<LinearW>,
    },
    /// DINOv2: LayerNorm over the sequence; the pooled output is the normalised CLS token.
    Dinov2 { norm: LayerNorm },
    /// CLIP: the sequence is returned as is; LayerNorm on the CLS token, then the projection.
    Clip {
        post_norm: LayerNorm,
        projection: Option<LinearW>,
    },
}

/// A loaded vision transformer.
pub struct Vit {
    pub config: VitConfig,
    patch_embed: Conv2dW,
    /// [1, D]
    cls: Tensor,
    /// [R, D] register tokens (DINOv2 with registers).
    registers: Option<Tensor>,
    /// [1 + N, D] at the training grid, on the device, and the f32 host copy that
    /// other input sizes are interpolated from.
    pos: Tensor,
    pos_host: Tensor,
    pre_norm: Option<LayerNorm>,
    layers: Vec<Layer>,
    head: Head,
    device: Device,
    /// Inputs of other sizes get interpolated position embeddings: always for DINOv2, on request
    /// for ViT and CLIP (transformers' `interpolate_pos_encoding=True`).
    interpolate: bool,
}

/// transformers' outputs, for a batch of B images of T = 1 + registers + patches tokens.
pub struct VitOutput {
    /// [B, T, D]
    pub last_hidden_state: Tensor,
    /// hidden_states[-2]: the input of the last layer (IP-Adapter-Plus consumes it). [B, T, D]
    pub penultimate_hidden_state: Tensor,
    /// [B, D] (ViT with a pooler, DINOv2, CLIP).
    pub pooler_output: Option<Tensor>,
    /// [B, P] (projected CLIP models).
    pub image_embeds: Option<Tensor>,
}

impl VitOutput {
    /// The embedding the similarity scores compare: the projected embedding for CLIP (the pooled
    /// one without a projection), the normalised CLS token for DINO v1 / v2.
    pub fn embedding(&self, kind: VitKind) -> Tensor {
        match kind {
            VitKind::ClipVision => self
                .image_embeds
                .clone()
                .or_else(|| self.pooler_output.clone())
                .expect("CLIP always pools"),
            VitKind::Vit | VitKind::Dinov2 => cls_token(&self.last_hidden_state),
        }
    }
}

/// Token 0 of every sequence: [B, T, D] -> [B, D].
fn cls_token(x: &Tensor) -> Tensor {
    let (b, t, d) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    ops::slice_channels(&x.reshape(vec![b, t * d]), 0, d)
}

impl Vit {
    pub fn load(cfg: &Config, store: &WeightStore, device: &Device) -> Result<Vit> {
        let c = VitConfig::parse(cfg)?;
        let vb = Vb::root_on(store, device);
        let d = c.hidden;
        let (patch_embed, cls, pos_host, pre_norm) = Self::load_embeddings(&c, &vb, store)?;
        let registers = Self::load_registers(&c, store, device)?;
        let layer_prefix = match c.kind {
            VitKind::ClipVision => "encoder.layers",
            _ => "encoder.layer",
        };
        let layers = (0..c.layers)
            .map(|i| Layer::load(&vb.pp(format!("{layer_prefix}.{i}")), &c))
            .collect::<Result<Vec<_>>>()?;
        let head = match c.kind {
            VitKind::Vit => Head::Vit {
                norm: LayerNorm::load(&vb.pp("layernorm"), d, c.eps)?,
                pooler: if store.contains("pooler.dense.weight") {
                    let p = cfg.usize_or("pooler_output_size", d)?;
                    Some(vb.pp("pooler.dense").linear(d, p, true)?)
                } else {
                    None
                },
            },
            VitKind::Dinov2 => Head::Dinov2 {
                norm: LayerNorm::load(&vb.pp("layernorm"), d, c.eps)?,
            },
            VitKind::ClipVision => Head::Clip {
                post_norm: LayerNorm::load(&vb.pp("post_layernorm"), d, c.eps)?,
                // As transformers builds it: the WithProjection class has one (so synthesised
                // weights get one too); other configs have one when the checkpoint holds it.
                projection: if store.contains("visual_projection.weight")
                    || names_class(cfg, "CLIPVisionModelWithProjection")
                {
                    let p = c.projection_dim.unwrap_or(d);
                    Some(vb.pp("visual_projection").linear(d, p, false)?)
                } else {
                    None
                },
            },
        };
        let config = Self::config_for_head(c, &head);
        Ok(Vit {
            patch_embed,
            cls: device.put(cls),
            registers,
            pos: device.put(pos_host.clone()),
            pos_host,
            pre_norm,
            layers,
            head,
            device: device.clone(),
            interpolate: config.kind == VitKind::Dinov2,
            config,
        })
    }

    /// (patch_embed, cls [1, D], position embeddings [1 + N, D] on the host, CLIP's pre-norm).
    fn load_embeddings(
        c: &VitConfig,
        vb: &Vb,
        store: &WeightStore,
    ) -> Result<(Conv2dW, Tensor, Tensor, Option<LayerNorm>)> {
        let d = c.hidden;
        let n = c.grid() * c.grid();
        match c.kind {
            VitKind::Vit | VitKind::Dinov2 => {
                let e = vb.pp("embeddings");
                Ok((
                    e.pp("patch_embeddings.projection")
                        .conv2d(c.channels, d, c.patch, c.patch, 0)?,
                    store
                        .get("embeddings.cls_token", &[1, 1, d])?
                        .reshape(vec![1, d]),
                    store
                        .get("embeddings.position_embeddings", &[1, 1 + n, d])?
                        .reshape(vec![1 + n, d]),
                    None,
                ))
            }
            VitKind::ClipVision => {
                let e = vb.pp("embeddings");
                Ok((
                    e.pp("patch_embedding")
                        .conv2d_bias(c.channels, d, c.patch, c.patch, 0, false)?,
                    store
                        .get("embeddings.class_embedding", &[d])?
                        .reshape(vec![1, d]),
                    store.get("embeddings.position_embedding.weight", &[1 + n, d])?,
                    Some(LayerNorm::load(&vb.pp("pre_layrnorm"), d, c.eps)?),
                ))
            }
        }
    }

    /// DINOv2's register tokens [R, D] on the device, when the config has any.
    fn load_registers(
        c: &VitConfig,
        store: &WeightStore,
        device: &Device,
    ) -> Result<Option<Tensor>> {
        let d = c.hidden;
        if c.registers > 0 {
            Ok(Some(
                device.put(
                    store
                        .get("embeddings.register_tokens", &[1, c.registers, d])?
                        .reshape(vec![c.registers, d]),
                ),
            ))
        } else {
            Ok(None)
        }
    }

    /// The config as loaded: a CLIP model's `projection_dim` is that of the projection it has.
    fn config_for_head(mut config: VitConfig, head: &Head) -> VitConfig {
        if let Head::Clip {
            projection: Some(p),
            ..
        } = head
        {
            config.projection_dim = Some(p.out_features());
        } else if config.kind == VitKind::ClipVision {
            config.projection_dim = None;
        }
        config
    }

    /// transformers' `interpolate_pos_encoding` forward flag (DINOv2 always interpolates).
    pub fn set_interpolate_pos_encoding(&mut self, on: bool) {
        self.interpolate = on || self.config.kind == VitKind::Dinov2;
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether an input of `h`×`w` pixels is accepted: the training size always; other sizes of
    /// at least one patch when the position embeddings are interpolated (DINOv2, or on request).
    pub fn check_input(&self, h: usize, w: usize) -> Result<()> {
        let c = &self.config;
        let s = c.image_size;
        if h == s && w == s {
            return self.check_memory(1, h, w);
        }
        if !self.interpolate {
            bail!(
                "pixel_values: {h}x{w} images, but this {} takes {s}x{s} (its image_size) unless \
                 its position embeddings are interpolated (interpolate_pos_encoding)",
                c.kind.class_name()
            );
        }
        if h < c.patch || w < c.patch {
            bail!(
                "pixel_values: {h}x{w} is smaller than one {}-pixel patch",
                c.patch
            );
        }
        self.check_memory(1, h, w)
    }

    /// Refuses `n` images of h×w whose pixels, or on the CPU whose hidden states and attention
    /// scores, would exceed the memory budget (`budget`: a lower bound, checked before any of
    /// it is allocated).
    pub fn check_memory(&self, n: usize, h: usize, w: usize) -> Result<()> {
        use crate::budget::{attention_scores, check, f32_bytes};
        let c = &self.config;
        let pixels = f32_bytes(&[n, h, w, c.channels]);
        let floor = if self.device().is_cpu() {
            let t = (h / c.patch) * (w / c.patch) + 1 + c.registers;
            let hidden = f32_bytes(&[n, t, c.hidden]);
            pixels.max(hidden.saturating_add(attention_scores(n.saturating_mul(c.heads), t, t)))
        } else {
            pixels
        };
        check(floor, || {
            format!("{} on {n} image(s) of {w}×{h}", c.kind.class_name())
        })
    }

    /// pixel_values as NHWC [B, H, W, C] on the model's device (`check_input` first).
    pub fn forward(&self, pixels: &Tensor) -> VitOutput {
        self.forward_hidden(pixels, &[]).0
    }

    /// `forward`, also returning transformers' `hidden_states[i]` for every i in `keep`, in that
    /// order: 0 is the embeddings (after CLIP's `pre_layrnorm`), i the output of layer i, without
    /// the final norm. Indices past the last layer are a caller's bug (configs are checked first).
    pub fn forward_hidden(&self, pixels: &Tensor, keep: &[usize]) -> (VitOutput, Vec<Tensor>) {
        let _span = tracing::info_span!("image_encoder").entered();
        assert!(
            keep.iter().all(|&i| i <= self.layers.len()),
            "hidden state {keep:?} of {} layers",
            self.layers.len()
        );
        let c = &self.config;
        let (b, h, w, _) = pixels.dims4();
        let (gh, gw) = (h / c.patch, w / c.patch);
        let n = gh * gw;
        let d = c.hidden;
        let patches = ops::conv2d(pixels, &self.patch_embed).reshape(vec![b, n * d]);
        let cls = Tensor::cat0(&vec![&self.cls; b]);
        let tokens = ops::concat_channels(&[&cls, &patches]).reshape(vec![b, 1 + n, d]);
        let pos = self.position_embeddings(gh, gw);
        let mut x = ops::add(
            &tokens,
            &Tensor::cat0(&vec![&pos; b]).reshape(vec![b, 1 + n, d]),
        );
        if let Some(r) = &self.registers {
            let flat = x.reshape(vec![b, (1 + n) * d]);
            let regs = Tensor::cat0(&vec![r; b]).reshape(vec![b, c.registers * d]);
            let parts = [
                &ops::slice_channels(&flat, 0, d),
                &regs,
                &ops::slice_channels(&flat, d, n * d),
            ];
            x = ops::concat_channels(&parts).reshape(vec![b, 1 + c.registers + n, d]);
        }
        if let Some(norm) = &self.pre_norm {
            x = norm.forward(&x);
        }
        let mut kept: Vec<Option<Tensor>> = vec![None; keep.len()];
        let mut record = |i: usize, x: &Tensor| {
            for (slot, _) in kept.iter_mut().zip(keep).filter(|(_, &k)| k == i) {
                *slot = Some(x.clone());
            }
        };
        record(0, &x);
        let mut penultimate = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == self.layers.len() {
                penultimate = x.clone();
            }
            x = layer.forward(&x, c.heads, c.act);
            record(i + 1, &x);
        }
        let kept = kept.into_iter().map(|t| t.expect("recorded")).collect();
        (self.head_forward(x, penultimate), kept)
    }

    /// The family's final LayerNorm over a sequence (`layernorm` of ViT / DINOv2, CLIP's
    /// `post_layernorm`): what a DINOv2 backbone with `apply_layernorm` does to each feature map.
    pub fn final_norm(&self, x: &Tensor) -> Tensor {
        match &self.head {
            Head::Vit { norm, .. } | Head::Dinov2 { norm } => norm.forward(x),
            Head::Clip { post_norm, .. } => post_norm.forward(x),
        }
    }

    fn head_forward(&self, x: Tensor, penultimate: Tensor) -> VitOutput {
        match &self.head {
            Head::Vit { norm, pooler } => {
                let last = norm.forward(&x);
                let pooled = pooler
                    .as_ref()
                    .map(|p| Activation::Tanh.apply(&ops::linear(&cls_token(&last), p)));
                VitOutput {
                    last_hidden_state: last,
                    penultimate_hidden_state: penultimate,
                    pooler_output: pooled,
                    image_embeds: None,
                }
            }
            Head::Dinov2 { norm } => {
                let last = norm.forward(&x);
                VitOutput {
                    pooler_output: Some(cls_token(&last)),
                    last_hidden_state: last,
                    penultimate_hidden_state: penultimate,
                    image_embeds: None,
                }
            }
            Head::Clip {
                post_norm,
                projection,
            } => {
                let pooled = post_norm.forward(&cls_token(&x));
                VitOutput {
                    image_embeds: projection.as_ref().map(|p| ops::linear(&pooled, p)),
                    pooler_output: Some(pooled),
                    last_hidden_state: x,
                    penultimate_hidden_state: penultimate,
                }
            }
        }
    }

    /// [1 + gh·gw, D] position embeddings for a gh×gw patch grid: the stored ones at the training
    /// grid, else interpolated (DINOv2) on the host.
    fn position_embeddings(&self, gh: usize, gw: usize) -> Tensor {
        let g = self.config.grid();
        if gh == g && gw == g {
            return self.pos.clone();
        }
        let c = &self.config;
        self.device.put(interpolate_positions(
            &self.pos_host,
            g,
            gh,
            gw,
            c.interpolate_antialias,
        ))
    }
}

/// DINOv2's `interpolate_pos_encoding`: the patch part of `pos` [1 + g², D] resized from g×g to
/// gh×gw (torch bicubic, align_corners=False), the CLS row kept.
pub fn interpolate_positions(
    pos: &Tensor,
    g: usize,
    gh: usize,
    gw: usize,
    antialias: bool,
) -> Tensor {
    let d = pos.shape()[1];
    let rows = pos.data();
    let mut out = vec![0.0f32; (1 + gh * gw) * d];
    out[..d].copy_from_slice(&rows[..d]);
    for ch in 0..d {
        let plane: Vec<f32> = (0..g * g).map(|p| rows[(1 + p) * d + ch]).collect();
        let r = crate::image_proc::interp::bicubic(&plane, g, g, gh, gw, antialias);
        for (p, v) in r.into_iter().enumerate() {
            out[(1 + p) * d + ch] = v;
        }
    }
    Tensor::new(vec![1 + gh * gw, d], out)
}

/// Whether the config's `architectures` names `class`.
fn names_class(cfg: &Config, class: &str) -> bool {
    cfg.get("architectures")
        .and_then(|a| a.as_array())
        .is_some_and(|a| a.iter().any(|v| v.as_str() == Some(class)))
}
