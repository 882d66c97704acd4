//! Depth Anything (v1 and v2): transformers' `DepthAnythingForDepthEstimation`, a DINOv2 backbone
//! with a DPT-style neck and a small convolutional head.
//!
//! - Backbone: `Dinov2Backbone` = `vit::Vit` (DINOv2 kind, position embeddings interpolated to any
//!   grid) returning `hidden_states[i]` for every `out_indices` entry (0 = embeddings, i = after
//!   layer i), each through the final `layernorm` when `apply_layernorm`.
//! - Neck, reassemble: CLS dropped, tokens as a [B, H/14, W/14, D] map, 1×1 projection to
//!   `neck_hidden_sizes[i]`, resize by `reassemble_factors[i]` (4 and 2: ConvTranspose2d with
//!   kernel = stride = factor; 1: identity; 0.5: 3×3 conv, stride 2, padding 1), then a 3×3 conv
//!   without bias to `fusion_hidden_size`.
//! - Neck, fusion (deepest first): `fused + residual_unit1(feature)` (from the second layer on),
//!   `residual_unit2`, bilinear `align_corners=True` upsampling (to the next feature's size, ×2 for
//!   the last), 1×1 projection. A residual unit is `x + conv(relu(conv(relu(x))))`.
//! - Head on `fused[head_in_index]`: 3×3 conv (f → f/2), bilinear `align_corners=True` to
//!   (H/14·14, W/14·14), 3×3 conv, ReLU, 1×1 conv to one channel, then ReLU (`relative`) or
//!   Sigmoid (`metric`), times `max_depth` (the relative model multiplies too).
//!
//! Inputs must have both sides a multiple of the patch size (14); the output is predicted_depth
//! [B, H, W] (relative models: affine-invariant inverse depth, larger = nearer; metric models:
//! metres).

use super::nn::ConvTranspose;
use super::vit::{Vit, VitConfig, VitKind};
use crate::backend::{self as ops, Activation, Conv2dW, Device, LinearW};
use crate::config::Config;
use crate::tensor::Tensor;
use crate::weights::{Vb, WeightStore};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// What the head's last activation makes of the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DepthKind {
    /// ReLU · max_depth: relative inverse depth (disparity-like, larger = nearer).
    Relative,
    /// Sigmoid · max_depth: metric depth in metres.
    Metric,
}

/// How one reassemble layer resizes its map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Factor {
    /// ConvTranspose2d, kernel = stride = n.
    Up(usize),
    Identity,
    /// 3×3 Conv2d, stride n, padding 1.
    Down(usize),
}

#[derive(Clone, Debug)]
pub struct DepthAnythingConfig {
    /// The backbone's own config (`backbone_config`).
    pub backbone: VitConfig,
    /// hidden_states indices the neck reads (0 = embeddings), increasing.
    pub out_indices: Vec<usize>,
    pub apply_layernorm: bool,
    pub neck_hidden_sizes: Vec<usize>,
    pub reassemble_factors: Vec<Factor>,
    pub fusion_hidden_size: usize,
    pub head_hidden_size: usize,
    /// Index into the fused maps (Python's negative indices resolved).
    pub head_in_index: usize,
    pub patch_size: usize,
    pub kind: DepthKind,
    pub max_depth: f32,
}

/// Python's `list[i]` index rule for a list of `n`.
fn py_index(i: i64, n: usize) -> Option<usize> {
    let j = if i < 0 { i + n as i64 } else { i };
    (0..n as i64).contains(&j).then_some(j as usize)
}

impl DepthAnythingConfig {
    /// The config and the backbone's sub-config (what `Vit::load` reads).
    pub fn parse(cfg: &Config) -> Result<(DepthAnythingConfig, Config)> {
        let path = cfg.path.display();
        check_supported(cfg)?;
        let (backbone, sub) = parse_backbone(cfg)?;
        let out_indices = parse_out_indices(&sub, backbone.layers)?;
        let (neck_hidden_sizes, reassemble_factors, fusion_hidden_size) =
            parse_neck(cfg, &backbone, &out_indices)?;
        let (head_hidden_size, head_in_index) = parse_head(cfg, out_indices.len())?;
        let patch_size = cfg.usize_or("patch_size", 14)?;
        if patch_size != backbone.patch {
            bail!(
                "{path}: field `patch_size` = {patch_size}, but the backbone's patch_size is {}",
                backbone.patch
            );
        }
        let (kind, max_depth) = parse_depth_kind(cfg)?;
        let c = DepthAnythingConfig {
            apply_layernorm: sub.bool_or("apply_layernorm", true)?,
            backbone,
            out_indices,
            neck_hidden_sizes,
            reassemble_factors,
            fusion_hidden_size,
            head_hidden_size,
            head_in_index,
            patch_size,
            kind,
            max_depth: max_depth as f32,
        };
        Ok((c, sub))
    }
}

/// The model type, size limits and backbone kind this module reproduces.
fn check_supported(cfg: &Config) -> Result<()> {
    let model_type = cfg.str_or("model_type", "depth_anything")?;
    if model_type != "depth_anything" {
        return Err(cfg.unsupported("model_type", model_type, "depth_anything"));
    }
    cfg.check_sizes(&[
        ("neck_hidden_sizes", 65536),
        ("reassemble_hidden_size", 65536),
        ("fusion_hidden_size", 65536),
        ("head_hidden_size", 65536),
        ("patch_size", 1024),
    ])?;
    if cfg.bool_or("use_timm_backbone", false)? {
        return Err(cfg.unsupported(
            "use_timm_backbone",
            true,
            "false (a DINOv2 backbone_config)",
        ));
    }
    Ok(())
}

/// The DINOv2 backbone's config and the `backbone_config` sub-config it came from.
fn parse_backbone(cfg: &Config) -> Result<(VitConfig, Config)> {
    let path = cfg.path.display();
    let Some(bj) = cfg.get("backbone_config").cloned() else {
        bail!("{path}: no `backbone_config` (Depth Anything needs its DINOv2 backbone's config)");
    };
    let sub = Config::from_json(&format!("{path} (backbone_config)"), bj)?;
    let bt = sub.str_or("model_type", "")?;
    if bt != "dinov2" {
        return Err(sub.unsupported("model_type", bt, "dinov2"));
    }
    let backbone = VitConfig::parse(&sub)?;
    debug_assert_eq!(backbone.kind, VitKind::Dinov2);
    Ok((backbone, sub))
}

/// (neck_hidden_sizes, reassemble_factors, fusion_hidden_size), one size and factor per backbone
/// output.
fn parse_neck(
    cfg: &Config,
    backbone: &VitConfig,
    out_indices: &[usize],
) -> Result<(Vec<usize>, Vec<Factor>, usize)> {
    let path = cfg.path.display();
    let n = out_indices.len();
    let neck_hidden_sizes = cfg.usize_list("neck_hidden_sizes")?;
    if neck_hidden_sizes.len() != n || neck_hidden_sizes.contains(&0) {
        bail!(
            "{path}: field `neck_hidden_sizes` = {neck_hidden_sizes:?}: expected {n} positive \
             sizes, one per backbone output (out_indices {out_indices:?})"
        );
    }
    let reassemble_factors = parse_factors(cfg, n)?;
    let reassemble = cfg.usize_or("reassemble_hidden_size", backbone.hidden)?;
    if reassemble != backbone.hidden {
        bail!(
            "{path}: field `reassemble_hidden_size` = {reassemble}, but the backbone's \
             hidden_size is {}",
            backbone.hidden
        );
    }
    let fusion_hidden_size = cfg.usize_or("fusion_hidden_size", 64)?;
    if fusion_hidden_size < 2 {
        bail!("{path}: field `fusion_hidden_size` = {fusion_hidden_size}: the head halves it, so at least 2");
    }
    Ok((neck_hidden_sizes, reassemble_factors, fusion_hidden_size))
}

/// (head_hidden_size, head_in_index) for `n` fused maps.
fn parse_head(cfg: &Config, n: usize) -> Result<(usize, usize)> {
    let path = cfg.path.display();
    let head_hidden_size = cfg.usize_or("head_hidden_size", 32)?;
    if head_hidden_size == 0 {
        bail!("{path}: field `head_hidden_size` must be positive");
    }
    let head_in = match cfg.get("head_in_index") {
        None => -1,
        Some(v) => v.as_i64().ok_or_else(|| {
            anyhow::anyhow!("{path}: field `head_in_index` must be an integer, got {v}")
        })?,
    };
    let Some(head_in_index) = py_index(head_in, n) else {
        bail!("{path}: field `head_in_index` = {head_in} is outside the {n} fused maps");
    };
    Ok((head_hidden_size, head_in_index))
}

/// (depth_estimation_type, max_depth).
fn parse_depth_kind(cfg: &Config) -> Result<(DepthKind, f64)> {
    let path = cfg.path.display();
    let kind_name = cfg.str_or("depth_estimation_type", "relative")?;
    let kind = match kind_name {
        "relative" => DepthKind::Relative,
        "metric" => DepthKind::Metric,
        other => return Err(cfg.unsupported("depth_estimation_type", other, "relative, metric")),
    };
    let max_depth = cfg.f64_or("max_depth", 1.0)?;
    if !(max_depth.is_finite() && max_depth > 0.0) {
        bail!("{path}: field `max_depth` = {max_depth}: expected a positive number");
    }
    Ok((kind, max_depth))
}

/// The backbone's `out_indices` / `out_features` (stage names "stem", "stage1", …), as transformers
/// aligns them: either alone, or both naming the same stages; neither = the last stage. Negative
/// indices count from the end. They must be increasing (transformers requires stage order).
fn parse_out_indices(sub: &Config, layers: usize) -> Result<Vec<usize>> {
    let path = sub.path.display();
    let stages = layers + 1;
    let from_indices = match sub.get("out_indices") {
        None => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|v| {
                    v.as_i64().and_then(|i| py_index(i, stages)).ok_or_else(|| {
                        anyhow::anyhow!(
                            "{path}: field `out_indices`: {v} is not a stage index (0..={layers})"
                        )
                    })
                })
                .collect::<Result<Vec<usize>>>()?,
        ),
        Some(v) => bail!("{path}: field `out_indices` must be a list, got {v}"),
    };
    let from_features = match sub.get("out_features") {
        None => None,
        Some(_) => Some(
            sub.str_list("out_features")?
                .iter()
                .map(|s| match s.as_str() {
                    "stem" => Ok(0),
                    s => s
                        .strip_prefix("stage")
                        .and_then(|n| n.parse::<usize>().ok())
                        .filter(|&n| (1..=layers).contains(&n))
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "{path}: field `out_features`: `{s}` is not a stage (stem, \
                                 stage1 … stage{layers})"
                            )
                        }),
                })
                .collect::<Result<Vec<usize>>>()?,
        ),
    };
    let idx = match (from_indices, from_features) {
        (Some(a), Some(b)) if a != b => {
            bail!("{path}: `out_indices` {a:?} and `out_features` name different stages ({b:?})")
        }
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) => vec![layers],
    };
    if idx.is_empty() || idx.windows(2).any(|w| w[0] >= w[1]) {
        bail!("{path}: field `out_indices` = {idx:?}: expected increasing stage indices");
    }
    Ok(idx)
}

fn parse_factors(cfg: &Config, n: usize) -> Result<Vec<Factor>> {
    let path = cfg.path.display();
    let list = match cfg.get("reassemble_factors") {
        None => vec![4.0, 2.0, 1.0, 0.5],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_f64().ok_or_else(|| {
                    anyhow::anyhow!("{path}: field `reassemble_factors`: {v} is not a number")
                })
            })
            .collect::<Result<Vec<f64>>>()?,
        Some(v) => bail!("{path}: field `reassemble_factors` must be a list, got {v}"),
    };
    if list.len() != n {
        bail!(
            "{path}: field `reassemble_factors` has {} entries, expected one per backbone output ({n})",
            list.len()
        );
    }
    list.iter()
        .map(|&f| {
            Ok(if f == 4.0 {
                Factor::Up(4)
            } else if f == 2.0 {
                Factor::Up(2)
            } else if f == 1.0 {
                Factor::Identity
            } else if f == 0.5 {
                Factor::Down(2)
            } else {
                return Err(cfg.unsupported("reassemble_factors", f, "4, 2, 1, 0.5"));
            })
        })
        .collect()
}

/// Strips the `backbone.` prefix, so the DINOv2 tensors have the names `Vit::load` reads; `neck.*`
/// and `head.*` keep theirs.
pub fn normalise_name(name: &str) -> Option<String> {
    name.strip_prefix("backbone.").map(String::from)
}

/// One reassemble layer's resize.
enum Resize {
    Identity,
    Up(ConvTranspose),
    Down(Conv2dW),
}

struct Reassemble {
    projection: LinearW,
    resize: Resize,
}

impl Reassemble {
    fn load(vb: &Vb, d: usize, c: usize, f: Factor) -> Result<Reassemble> {
        let resize = match f {
            Factor::Identity => Resize::Identity,
            Factor::Up(k) => Resize::Up(ConvTranspose::load(&vb.pp("resize"), c, c, k, true)?),
            Factor::Down(s) => Resize::Down(vb.pp("resize").conv2d(c, c, 3, s, 1)?),
        };
        Ok(Reassemble {
            projection: vb.pp("projection").linear(d, c, true)?,
            resize,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = ops::linear(x, &self.projection);
        match &self.resize {
            Resize::Identity => x,
            Resize::Up(t) => t.forward(&x),
            Resize::Down(c) => ops::conv2d(&x, c),
        }
    }
}

/// `DepthAnythingPreActResidualLayer`: x + conv2(relu(conv1(relu(x)))).
struct ResidualUnit {
    conv1: Conv2dW,
    conv2: Conv2dW,
}

impl ResidualUnit {
    fn load(vb: &Vb, f: usize) -> Result<ResidualUnit> {
        Ok(ResidualUnit {
            conv1: vb.pp("convolution1").conv2d(f, f, 3, 1, 1)?,
            conv2: vb.pp("convolution2").conv2d(f, f, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = ops::conv2d(&Activation::Relu.apply(x), &self.conv1);
        let h = ops::conv2d(&Activation::Relu.apply(&h), &self.conv2);
        ops::add(x, &h)
    }
}

/// `DepthAnythingFeatureFusionLayer`.
struct Fusion {
    /// Unused (and not loaded) in the first layer, which has no residual input.
    residual1: Option<ResidualUnit>,
    residual2: ResidualUnit,
    projection: LinearW,
}

impl Fusion {
    fn load(vb: &Vb, f: usize, first: bool) -> Result<Fusion> {
        Ok(Fusion {
            residual1: if first {
                None
            } else {
                Some(ResidualUnit::load(&vb.pp("residual_layer1"), f)?)
            },
            residual2: ResidualUnit::load(&vb.pp("residual_layer2"), f)?,
            projection: vb.pp("projection").linear(f, f, true)?,
        })
    }

    /// `x` the previous fused map (or the deepest feature), `residual` this level's feature,
    /// `size` the next level's (height, width) (None: twice `x`'s).
    fn forward(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        size: Option<(usize, usize)>,
    ) -> Tensor {
        let (_, h, w, _) = x.dims4();
        let mut x = x.clone();
        if let (Some(r), Some(unit)) = (residual, &self.residual1) {
            // transformers resizes a mismatched residual (bilinear, align_corners=False); with
            // the supported factors the sizes always agree.
            let r = if r.shape() == x.shape() {
                r.clone()
            } else {
                ops::resize_bilinear(r, h, w, false)
            };
            x = ops::add(&x, &unit.forward(&r));
        }
        let x = self.residual2.forward(&x);
        let (oh, ow) = size.unwrap_or((2 * h, 2 * w));
        ops::linear(&ops::resize_bilinear(&x, oh, ow, true), &self.projection)
    }
}

/// `DepthAnythingDepthEstimationHead`.
struct Head {
    conv1: Conv2dW,
    conv2: Conv2dW,
    conv3: LinearW,
}

/// A loaded Depth Anything model.
pub struct DepthAnything {
    pub config: DepthAnythingConfig,
    backbone: Vit,
    reassemble: Vec<Reassemble>,
    /// `neck.convs`: 3×3, no bias, to the fusion width.
    convs: Vec<Conv2dW>,
    fusion: Vec<Fusion>,
    head: Head,
    device: Device,
}

impl DepthAnything {
    /// From a config and weights whose names have the `backbone.` prefix stripped
    /// ([`normalise_name`]; `load_dir` does it).
    pub fn load(cfg: &Config, store: &WeightStore, device: &Device) -> Result<DepthAnything> {
        let (c, sub) = DepthAnythingConfig::parse(cfg)?;
        if store.contains("backbone.embeddings.cls_token") {
            bail!(
                "{}: the weights still carry the `backbone.` prefix; normalise them with \
                 depth_anything::normalise_name (DepthAnything::load_dir does)",
                store.origin.display()
            );
        }
        let backbone = Vit::load(&sub, store, device).context("the DINOv2 backbone")?;
        let vb = Vb::root_on(store, device);
        let neck = vb.pp("neck");
        let (d, f) = (c.backbone.hidden, c.fusion_hidden_size);
        let reassemble = c
            .neck_hidden_sizes
            .iter()
            .zip(&c.reassemble_factors)
            .enumerate()
            .map(|(i, (&ch, &fac))| {
                Reassemble::load(&neck.pp(format!("reassemble_stage.layers.{i}")), d, ch, fac)
            })
            .collect::<Result<Vec<_>>>()?;
        let convs = c
            .neck_hidden_sizes
            .iter()
            .enumerate()
            .map(|(i, &ch)| {
                neck.pp(format!("convs.{i}"))
                    .conv2d_bias(ch, f, 3, 1, 1, false)
            })
            .collect::<Result<Vec<_>>>()?;
        let fusion = (0..c.neck_hidden_sizes.len())
            .map(|i| Fusion::load(&neck.pp(format!("fusion_stage.layers.{i}")), f, i == 0))
            .collect::<Result<Vec<_>>>()?;
        let hv = vb.pp("head");
        let head = Head {
            conv1: hv.pp("conv1").conv2d(f, f / 2, 3, 1, 1)?,
            conv2: hv.pp("conv2").conv2d(f / 2, c.head_hidden_size, 3, 1, 1)?,
            conv3: hv.pp("conv3").linear(c.head_hidden_size, 1, true)?,
        };
        Ok(DepthAnything {
            config: c,
            backbone,
            reassemble,
            convs,
            fusion,
            head,
            device: device.clone(),
        })
    }

    /// A model folder (config.json + safetensors, transformers' `save_pretrained` layout).
    pub fn load_dir(dir: &Path, device: &Device) -> Result<DepthAnything> {
        let cfg = Config::read_dir(dir)?;
        let mut store = crate::weights::layout::open_weights(dir)?;
        store.normalise_names(normalise_name);
        Self::load(&cfg, &store, device)
            .with_context(|| format!("loading Depth Anything from {}", dir.display()))
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the model predicts metric depth (metres) rather than relative inverse depth.
    pub fn is_metric(&self) -> bool {
        self.config.kind == DepthKind::Metric
    }

    /// Whether pixel_values of `h`×`w` (and `channels`) are accepted: both sides positive
    /// multiples of the patch size.
    pub fn check_input(&self, h: usize, w: usize, channels: usize) -> Result<()> {
        let p = self.config.patch_size;
        let want = self.config.backbone.channels;
        if channels != want {
            bail!("pixel_values: {channels} channels; the model takes {want}");
        }
        if h < p || w < p || !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            bail!(
                "pixel_values: {h}x{w} (height x width) is not a multiple of the {p}-pixel patch \
                 on both sides; Depth Anything takes sizes like {}x{} (its image processor \
                 resizes to multiples of {p})",
                (h / p).max(1) * p,
                (w / p).max(1) * p
            );
        }
        self.backbone.check_input(h, w)
    }

    /// pixel_values NHWC [B, H, W, C] on the model's device (`check_input` first) ->
    /// predicted_depth [B, H, W].
    pub fn forward(&self, pixels: &Tensor) -> Tensor {
        let _span = tracing::info_span!("depth_anything").entered();
        let c = &self.config;
        let (b, h, w, _) = pixels.dims4();
        let p = c.patch_size;
        let (gh, gw) = (h / p, w / p);
        let (_, hidden) = self.backbone.forward_hidden(pixels, &c.out_indices);
        let feats: Vec<Tensor> = hidden
            .iter()
            .zip(self.reassemble.iter().zip(&self.convs))
            .map(|(hs, (r, conv))| {
                let hs = if c.apply_layernorm {
                    self.backbone.final_norm(hs)
                } else {
                    hs.clone()
                };
                let d = hs.last_dim();
                let n = gh * gw;
                let tokens = ops::slice_channels(&hs.reshape(vec![b, (1 + n) * d]), d, n * d)
                    .reshape(vec![b, gh, gw, d]);
                ops::conv2d(&r.forward(&tokens), conv)
            })
            .collect();
        let n = feats.len();
        let mut fused: Vec<Tensor> = Vec::with_capacity(n);
        for (i, layer) in self.fusion.iter().enumerate() {
            let feat = &feats[n - 1 - i];
            let size = (i + 1 < n).then(|| {
                let next = feats[n - 2 - i].shape();
                (next[1], next[2])
            });
            let out = match fused.last() {
                None => layer.forward(feat, None, size),
                Some(prev) => layer.forward(prev, Some(feat), size),
            };
            fused.push(out);
        }
        let x = ops::conv2d(&fused[c.head_in_index], &self.head.conv1);
        let x = ops::resize_bilinear(&x, gh * p, gw * p, true);
        let x = Activation::Relu.apply(&ops::conv2d(&x, &self.head.conv2));
        let x = ops::linear(&x, &self.head.conv3);
        let x = match c.kind {
            DepthKind::Relative => Activation::Relu.apply(&x),
            DepthKind::Metric => Activation::Sigmoid.apply(&x),
        };
        ops::scale(&x, c.max_depth).reshape(vec![b, gh * p, gw * p])
    }
}
