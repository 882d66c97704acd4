//! transformers' `CLIPSegForImageSegmentation` (CIDAS/clipseg-rd64-refined and the like): a CLIP
//! vision tower and a CLIP text tower (the same code as `vit.rs` and `clip_text.rs`, loaded from
//! `clip.vision_model.*` / `clip.text_model.*` through `WeightStore::view`) and a small decoder.
//!
//! The decoder, as transformers 5.23's `CLIPSegDecoder` computes it:
//! - activations = vision `hidden_states[i + 1]` for i in `extract_layers` (after `pre_layrnorm`,
//!   without `post_layernorm`), taken deepest first;
//! - step k: `out = reduces[k](act) (+ out)`; at k == `conditional_layer` FiLM with the projected
//!   text embedding (`film_mul(cond) * out + film_add(cond)`); then decoder layer k;
//! - a decoder layer is a CLIP encoder layer with the norms moved AFTER the residual adds
//!   (post-norm), width `reduce_dim`, `decoder_num_attention_heads` heads, MLP
//!   `decoder_intermediate_size`, LayerNorm eps = the vision tower's `layer_norm_eps`, and
//!   **always ReLU**: transformers overwrites the activation with "relu" and never reads the
//!   config's `decoder_hidden_act` (so neither do we);
//! - CLS dropped, the tokens form a g×g map (square only: transformers reshapes with
//!   g = int(sqrt(tokens)) and fails on other grids), then a transposed convolution: one
//!   `ConvTranspose2d(reduce_dim, 1, k = s = patch)`, or with `use_complex_transposed_convolution`
//!   Conv3×3 → ReLU → ConvT(rd, rd/2, k = s = patch/4) → ReLU → ConvT(rd/2, 1, k = s = patch/4).
//!
//! Position embeddings are always interpolated for other input sizes (bicubic, as transformers'
//! `interpolate_pos_encoding=True` default in `CLIPSegForImageSegmentation.forward`).

use super::clip_text::ClipText;
use super::load::{normalise_image_encoder, normalise_text_encoder};
use super::nn::{ConvTranspose, LayerNorm};
use super::vit::Vit;
use crate::backend::{self as ops, Activation, Conv2dW, Device, LinearW};
use crate::config::Config;
use crate::image_proc::ImageProcessor;
use crate::tensor::Tensor;
use crate::tokenizer::ClipTokenizer;
use crate::weights::layout::open_weights;
use crate::weights::{Vb, WeightStore};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;

/// The decoder's own fields of a CLIPSeg config.json (the towers parse their sub-configs).
#[derive(Clone, Debug)]
struct DecoderConfig {
    extract_layers: Vec<usize>,
    reduce_dim: usize,
    heads: usize,
    intermediate: usize,
    conditional_layer: usize,
    complex: bool,
    projection_dim: usize,
}

impl DecoderConfig {
    fn parse(cfg: &Config, vision_layers: usize, patch: usize) -> Result<DecoderConfig> {
        cfg.check_sizes(&[
            ("reduce_dim", 16384),
            ("decoder_num_attention_heads", 1024),
            ("decoder_intermediate_size", 65536),
            ("projection_dim", 16384),
            ("conditional_layer", 1024),
        ])?;
        let file = cfg.path.display();
        let extract_layers = match cfg.get("extract_layers") {
            None => vec![3, 6, 9],
            Some(_) => cfg.usize_list("extract_layers")?,
        };
        if extract_layers.is_empty() {
            bail!("{file}: field `extract_layers` is empty (the decoder needs at least one layer)");
        }
        if let Some(bad) = extract_layers.iter().find(|&&i| i >= vision_layers) {
            bail!(
                "{file}: field `extract_layers` names layer {bad}, but the vision tower has \
                 {vision_layers} layers (0..{vision_layers})"
            );
        }
        let c = DecoderConfig {
            extract_layers,
            reduce_dim: cfg.usize_or("reduce_dim", 64)?,
            heads: cfg.usize_or("decoder_num_attention_heads", 4)?,
            intermediate: cfg.usize_or("decoder_intermediate_size", 2048)?,
            // Past the last step FiLM is never applied, as in transformers' loop.
            conditional_layer: cfg.usize_or("conditional_layer", 0)?,
            complex: cfg.bool_or("use_complex_transposed_convolution", false)?,
            projection_dim: cfg.usize_or("projection_dim", 512)?,
        };
        if c.reduce_dim == 0 || c.heads == 0 || !c.reduce_dim.is_multiple_of(c.heads) {
            bail!(
                "{file}: reduce_dim {} is not divisible by decoder_num_attention_heads {}",
                c.reduce_dim,
                c.heads
            );
        }
        if c.complex && (patch < 4 || c.reduce_dim < 2) {
            bail!(
                "{file}: use_complex_transposed_convolution needs patch_size ≥ 4 and reduce_dim ≥ 2 \
                 (got {patch} and {})",
                c.reduce_dim
            );
        }
        Ok(c)
    }
}

/// A sub-config of a CLIPSeg config (`text_config` / `vision_config`) with the CLIPSeg class
/// defaults filled in for the fields it leaves out, in the form the CLIP loaders read.
fn sub_config(cfg: &Config, key: &str, defaults: Value, extra: Value) -> Result<Config> {
    let file = cfg.path.display();
    let mut json = match cfg.get(key) {
        Some(Value::Object(m)) => m.clone(),
        Some(v) => bail!("{file}: field `{key}` must be an object, got {v}"),
        None => bail!("{file}: field `{key}` is missing (a CLIPSeg config has both towers)"),
    };
    for (k, v) in defaults.as_object().expect("object").iter() {
        if json.get(k).is_none_or(Value::is_null) {
            json.insert(k.clone(), v.clone());
        }
    }
    for (k, v) in extra.as_object().expect("object").iter() {
        json.insert(k.clone(), v.clone());
    }
    Config::from_json(&format!("{file} ({key})"), Value::Object(json))
}

/// `CLIPSegDecoderLayer`: a CLIP encoder layer, post-norm, ReLU MLP.
struct DecoderLayer {
    q: LinearW,
    k: LinearW,
    v: LinearW,
    o: LinearW,
    ln1: LayerNorm,
    fc1: LinearW,
    fc2: LinearW,
    ln2: LayerNorm,
}

impl DecoderLayer {
    fn load(vb: &Vb, d: usize, inter: usize, eps: f64) -> Result<DecoderLayer> {
        let a = vb.pp("self_attn");
        Ok(DecoderLayer {
            q: a.pp("q_proj").linear(d, d, true)?,
            k: a.pp("k_proj").linear(d, d, true)?,
            v: a.pp("v_proj").linear(d, d, true)?,
            o: a.pp("out_proj").linear(d, d, true)?,
            ln1: LayerNorm::load(&vb.pp("layer_norm1"), d, eps)?,
            fc1: vb.pp("mlp.fc1").linear(d, inter, true)?,
            fc2: vb.pp("mlp.fc2").linear(inter, d, true)?,
            ln2: LayerNorm::load(&vb.pp("layer_norm2"), d, eps)?,
        })
    }

    fn forward(&self, x: &Tensor, heads: usize) -> Tensor {
        let (q, k, v) = (
            ops::linear(x, &self.q),
            ops::linear(x, &self.k),
            ops::linear(x, &self.v),
        );
        let a = ops::linear(&ops::attention(&q, &k, &v, heads, false), &self.o);
        let x = self.ln1.forward(&ops::add(x, &a));
        let m = ops::linear(
            &Activation::Relu.apply(&ops::linear(&x, &self.fc1)),
            &self.fc2,
        );
        self.ln2.forward(&ops::add(&x, &m))
    }
}

/// `decoder.transposed_convolution`.
enum Upsample {
    Simple(ConvTranspose),
    Complex(Box<ComplexHead>),
}

/// `use_complex_transposed_convolution`: `transposed_convolution.{0, 2, 4}`.
struct ComplexHead {
    conv: Conv2dW,
    up1: ConvTranspose,
    up2: ConvTranspose,
}

impl Upsample {
    /// [B, g, g, rd] → [B, H, W, 1].
    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Upsample::Simple(t) => t.forward(x),
            Upsample::Complex(h) => {
                let x = Activation::Relu.apply(&ops::conv2d(x, &h.conv));
                let x = Activation::Relu.apply(&h.up1.forward(&x));
                h.up2.forward(&x)
            }
        }
    }
}

/// A loaded `CLIPSegForImageSegmentation`.
pub struct ClipSeg {
    vision: Vit,
    text: ClipText,
    decoder: DecoderConfig,
    reduces: Vec<LinearW>,
    film_mul: LinearW,
    film_add: LinearW,
    layers: Vec<DecoderLayer>,
    upsample: Upsample,
    device: Device,
}

/// transformers' `CLIPSegImageSegmentationOutput` fields, on the model's device.
pub struct ClipSegOutput {
    /// [B, H, W] (the channel squeezed), H = W = grid · patch (· 1 for the complex head: grid ·
    /// (patch / 4)²).
    pub logits: Tensor,
    /// text_projection(text pooled output at the first EOS), not normalised: [B, projection_dim].
    pub conditional_embeddings: Tensor,
    /// visual_projection(post_layernorm(CLS)) (the decoder does not use it): [B, projection_dim].
    pub pooled_output: Tensor,
    /// vision hidden_states[extract_layers[j] + 1], in `extract_layers` order: [B, 1 + g², D].
    pub activations: Vec<Tensor>,
}

impl ClipSeg {
    /// From a CLIPSeg config.json (`model_type` "clipseg") and its weights (`clip.vision_model.*`,
    /// `clip.visual_projection`, `clip.text_model.*`, `clip.text_projection`, `decoder.*`).
    pub fn load(cfg: &Config, store: &WeightStore, device: &Device) -> Result<ClipSeg> {
        let model_type = cfg.str_or("model_type", "")?;
        if model_type != "clipseg" {
            return Err(cfg.unsupported("model_type", model_type, "clipseg"));
        }
        let projection = cfg.usize_or("projection_dim", 512)?;
        let vision_cfg = sub_config(
            cfg,
            "vision_config",
            json!({
                "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5
            }),
            // CLIPSeg's CLIP always has its projections.
            json!({
                "model_type": "clip_vision_model",
                "architectures": ["CLIPVisionModelWithProjection"],
                "projection_dim": projection
            }),
        )?;
        let text_cfg = sub_config(
            cfg,
            "text_config",
            json!({
                "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
                "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
                "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 49407
            }),
            json!({
                "architectures": ["CLIPTextModelWithProjection"],
                "projection_dim": projection
            }),
        )?;
        let origin = store.origin.display().to_string();
        let mut vstore = store.view("clip.");
        normalise_image_encoder(&mut vstore);
        let mut vision = Vit::load(&vision_cfg, &vstore, device)
            .with_context(|| format!("{origin}: the vision tower (`clip.vision_model.*`)"))?;
        if vision.config.projection_dim.is_none() {
            bail!("{origin}: missing tensor `clip.visual_projection.weight`");
        }
        vision.set_interpolate_pos_encoding(true);
        let mut tstore = store.view("clip.");
        tstore.retain(|n| n.starts_with("text_model.") || n == "text_projection.weight");
        normalise_text_encoder(&mut tstore);
        let text = ClipText::load(&text_cfg, &tstore, device)
            .with_context(|| format!("{origin}: the text tower (`clip.text_model.*`)"))?;

        let vc = &vision.config;
        let dc = DecoderConfig::parse(cfg, vc.layers, vc.patch)?;
        let vb = Vb::root_on(store, device).pp("decoder");
        let (rd, eps) = (dc.reduce_dim, vc.eps);
        let reduces = (0..dc.extract_layers.len())
            .map(|i| vb.pp(format!("reduces.{i}")).linear(vc.hidden, rd, true))
            .collect::<Result<Vec<_>>>()?;
        let layers = (0..dc.extract_layers.len())
            .map(|i| DecoderLayer::load(&vb.pp(format!("layers.{i}")), rd, dc.intermediate, eps))
            .collect::<Result<Vec<_>>>()?;
        let tc = vb.pp("transposed_convolution");
        let upsample = if dc.complex {
            let k = vc.patch / 4;
            Upsample::Complex(Box::new(ComplexHead {
                conv: tc.pp("0").conv2d(rd, rd, 3, 1, 1)?,
                up1: ConvTranspose::load(&tc.pp("2"), rd, rd / 2, k, true)?,
                up2: ConvTranspose::load(&tc.pp("4"), rd / 2, 1, k, true)?,
            }))
        } else {
            Upsample::Simple(ConvTranspose::load(&tc, rd, 1, vc.patch, true)?)
        };
        Ok(ClipSeg {
            film_mul: vb.pp("film_mul").linear(dc.projection_dim, rd, true)?,
            film_add: vb.pp("film_add").linear(dc.projection_dim, rd, true)?,
            reduces,
            layers,
            upsample,
            decoder: dc,
            vision,
            text,
            device: device.clone(),
        })
    }

    /// A model folder: config.json + model.safetensors (or a sharded index).
    pub fn load_dir(dir: &Path, device: &Device) -> Result<ClipSeg> {
        if !dir.is_dir() {
            bail!(
                "{}: expected a CLIPSeg model folder (config.json + model.safetensors)",
                dir.display()
            );
        }
        let cfg = Config::read_dir(dir)?;
        let store = open_weights(dir)?;
        ClipSeg::load(&cfg, &store, device)
            .with_context(|| format!("loading CLIPSeg from {}", dir.display()))
    }

    /// The vision tower's training size (`vision_config.image_size`).
    pub fn image_size(&self) -> usize {
        self.vision.config.image_size
    }

    /// `ids`: one token sequence per image (all the same length, e.g. 77 padded with EOS);
    /// `pixels`: [B, 3, S, S] NCHW f32 as the image processor makes it (host or device). Any
    /// square size of at least one patch works (position embeddings are interpolated); a
    /// non-square patch grid is an error, as in transformers.
    pub fn forward(&self, ids: &[Vec<u32>], pixels: &Tensor) -> Result<ClipSegOutput> {
        let _span = tracing::info_span!("clipseg").entered();
        let vc = &self.vision.config;
        if pixels.rank() != 4 {
            bail!(
                "pixel_values: shape {:?}; expected [B, {}, H, W]",
                pixels.shape(),
                vc.channels
            );
        }
        let (b, c, h, w) = pixels.dims4();
        if c != vc.channels {
            bail!(
                "pixel_values: {c} channels (shape {:?}); the model takes {}",
                pixels.shape(),
                vc.channels
            );
        }
        if b == 0 || ids.len() != b {
            bail!(
                "input_ids: {} token sequences for {b} images; CLIPSeg takes one prompt per image",
                ids.len()
            );
        }
        if h < vc.patch || w < vc.patch {
            bail!(
                "pixel_values: {h}x{w} is smaller than one {}-pixel patch",
                vc.patch
            );
        }
        let (gh, gw) = (h / vc.patch, w / vc.patch);
        if gh != gw {
            bail!(
                "pixel_values: {h}x{w} images make a {gh}x{gw} patch grid; CLIPSeg takes square \
                 inputs (its decoder reshapes the tokens to a square, as transformers does)"
            );
        }
        self.vision.check_input(h, w)?;
        let text = self.text.forward(ids)?;
        let cond = text
            .text_embeds
            .ok_or_else(|| anyhow!("the CLIPSeg text tower has no projection"))?;
        let nhwc = self.device.put(pixels.to_host()?.to_nhwc());
        let dc = &self.decoder;
        let keep: Vec<usize> = dc.extract_layers.iter().map(|i| i + 1).collect();
        let (vout, activations) = self.vision.forward_hidden(&nhwc, &keep);
        let pooled = vout
            .image_embeds
            .ok_or_else(|| anyhow!("the CLIPSeg vision tower has no projection"))?;
        let logits = self.decode(&activations, &cond, b, gh);
        Ok(ClipSegOutput {
            logits,
            conditional_embeddings: cond,
            pooled_output: pooled,
            activations,
        })
    }

    /// `CLIPSegDecoder.forward`: activations [B, 1 + g², D] (extract_layers order), the
    /// conditional embeddings [B, P] → logits [B, H, W].
    fn decode(&self, activations: &[Tensor], cond: &Tensor, b: usize, g: usize) -> Tensor {
        let dc = &self.decoder;
        let rd = dc.reduce_dim;
        let mul = ops::linear(cond, &self.film_mul);
        let add = ops::linear(cond, &self.film_add);
        let mut out: Option<Tensor> = None;
        let steps = activations
            .iter()
            .rev()
            .zip(&self.reduces)
            .zip(&self.layers);
        for (k, ((act, reduce), layer)) in steps.enumerate() {
            let r = ops::linear(act, reduce);
            let mut x = match out {
                Some(prev) => ops::add(&r, &prev),
                None => r,
            };
            if k == dc.conditional_layer {
                x = ops::film(&x, &mul, &add);
            }
            out = Some(layer.forward(&x, dc.heads));
        }
        let x = out.expect("at least one decoder step (checked at load)");
        let t = x.shape()[1];
        let tokens = ops::slice_channels(&x.reshape(vec![b, t * rd]), rd, (t - 1) * rd);
        let y = self.upsample.forward(&tokens.reshape(vec![b, g, g, rd]));
        let (_, oh, ow, _) = y.dims4();
        y.reshape(vec![b, oh, ow])
    }
}

/// Text-prompted segmentation: the model with the folder's tokenizer and image processor
/// (transformers' `CLIPSegProcessor`).
pub struct ClipSegSegmenter {
    pub model: ClipSeg,
    pub tokenizer: ClipTokenizer,
    pub processor: ImageProcessor,
}

impl ClipSegSegmenter {
    /// A CLIPSeg folder: config.json + weights, the tokenizer files, and the image processor from
    /// `preprocessor_config.json` or else `processor_config.json`'s nested `image_processor`
    /// (transformers 5's `CLIPSegProcessor.save_pretrained` layout).
    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self> {
        let model = ClipSeg::load_dir(dir, device)?;
        let tokenizer = ClipTokenizer::from_dir(dir)?;
        let processor = processor_from_dir(dir)?;
        Ok(ClipSegSegmenter {
            model,
            tokenizer,
            processor,
        })
    }

    /// A segmenter from its parts (the built-in demo's: `crate::builtin::clipseg_segmenter`).
    pub fn new(model: ClipSeg, tokenizer: ClipTokenizer, processor: ImageProcessor) -> Self {
        ClipSegSegmenter {
            model,
            tokenizer,
            processor,
        }
    }

    /// sigmoid(logits) for one image and each of `texts` (tokenised with padding to the
    /// tokenizer's max length, 77): [T, S, S] on the host, at the model's input size (the
    /// processor's output size; resizing to the image is the caller's).
    pub fn probs(&self, img: &image::RgbImage, texts: &[String]) -> Result<Tensor> {
        if texts.is_empty() {
            bail!("CLIPSeg: no prompts to segment");
        }
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let ids = self.tokenizer.encode_batch(&refs)?;
        let px = self.processor.pixel_values(std::slice::from_ref(img));
        let pixels = Tensor::cat0(&vec![&px; texts.len()]);
        let out = self.model.forward(&ids, &pixels)?;
        let probs = Activation::Sigmoid.apply(&out.logits).to_host()?;
        self.model.device.check()?;
        Ok(probs)
    }
}

/// `dir/preprocessor_config.json`, else the `image_processor` object of
/// `dir/processor_config.json`.
fn processor_from_dir(dir: &Path) -> Result<ImageProcessor> {
    let pre = dir.join("preprocessor_config.json");
    if pre.is_file() {
        return ImageProcessor::from_file(&pre);
    }
    let proc_path = dir.join("processor_config.json");
    if !proc_path.is_file() {
        bail!(
            "{}: no image processor config (preprocessor_config.json or processor_config.json)",
            dir.display()
        );
    }
    let p = proc_path.display();
    let text =
        crate::input::read_to_string(&proc_path).with_context(|| format!("{p}: cannot read"))?;
    let value: Value =
        serde_json::from_str(&text).with_context(|| format!("{p}: not valid JSON"))?;
    let Some(ip) = value.get("image_processor") else {
        bail!("{p}: no `image_processor` object");
    };
    ImageProcessor::from_json(&format!("{p} (image_processor)"), ip)
}
