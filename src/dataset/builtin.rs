//! Built-in tiny models for every stage of the pairs job and a few procedurally drawn subjects:
//! `toffee pairs --out demo/` runs end to end on a fresh machine with no files. The weights are
//! random (deterministic), so the pictures and scores mean nothing; the data path is the real one.

use crate::backend::{Device, LinearW};
use crate::builtin::SEED;
use crate::config::Config;
use crate::image_proc::ImageProcessor;
use crate::models::adapter::{Adapter, AdapterKind, Projection, TokenSelection};
use crate::models::clip_text::ClipText;
use crate::models::controlnet::ControlNet;
use crate::models::nn::LayerNorm;
use crate::models::unet::Unet;
use crate::models::vae::Vae;
use crate::models::vit::Vit;
use crate::pipeline::score::{ImageEncoder, Scorer};
use crate::pipeline::view::ViewGenerator;
use crate::tensor::Tensor;
use crate::tokenizer::ClipTokenizer;
use crate::weights::WeightStore;
use anyhow::Result;
use serde_json::json;
use std::path::PathBuf;

fn cfg(name: &str, v: serde_json::Value) -> Result<Config> {
    Config::from_json(&format!("<built-in>/{name}/config.json"), v)
}

fn weights(part: u64) -> WeightStore {
    WeightStore::random(SEED + part)
}

/// A ControlNet for the built-in draft UNet (Canny input at 8× the latent size).
pub fn controlnet(device: &Device) -> Result<ControlNet> {
    let c = cfg(
        "controlnet",
        json!({
            "_class_name": "ControlNetModel", "sample_size": 32, "in_channels": 4,
            "block_out_channels": [32, 64], "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "cross_attention_dim": 32, "attention_head_dim": [2, 4], "norm_num_groups": 8,
            "conditioning_embedding_out_channels": [8, 16, 16, 32]
        }),
    )?;
    ControlNet::load(&c, &weights(10), device)
}

fn dinov2_config() -> serde_json::Value {
    json!({"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "mlp_ratio": 2, "patch_size": 8, "image_size": 32, "layer_norm_eps": 1e-6})
}

/// A tiny DINOv2 with BitImageProcessor-style preprocessing at 32².
pub fn dino(device: &Device) -> Result<ImageEncoder> {
    let model = Vit::load(&cfg("dino", dinov2_config())?, &weights(11), device)?;
    let processor = ImageProcessor::from_json(
        "<built-in>/dino/preprocessor_config.json",
        &json!({"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 36},
                "crop_size": {"height": 32, "width": 32}, "resample": 3,
                "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}),
    )?;
    Ok(ImageEncoder {
        model,
        processor,
        dir: PathBuf::from("<built-in>/dino"),
    })
}

fn clip_vision(device: &Device) -> Result<Vit> {
    Vit::load(
        &cfg(
            "clip/vision",
            json!({"model_type": "clip_vision_model", "architectures": ["CLIPVisionModelWithProjection"],
                   "hidden_size": 32, "intermediate_size": 64,
                   "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 8, "image_size": 32,
                   "projection_dim": 16}),
        )?,
        &weights(12),
        device,
    )
}

/// Tiny CLIP towers (byte-level tokenizer, like the built-in draft model's).
pub fn scorer(device: &Device) -> Result<Scorer> {
    let clip = ImageEncoder {
        model: clip_vision(device)?,
        processor: ImageProcessor::from_json(
            "<built-in>/clip/preprocessor_config.json",
            &json!({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
                    "crop_size": {"height": 32, "width": 32}}),
        )?,
        dir: PathBuf::from("<built-in>/clip"),
    };
    let text = ClipText::load(
        &cfg(
            "clip/text",
            json!({"architectures": ["CLIPTextModelWithProjection"], "vocab_size": 514, "hidden_size": 32,
                   "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "max_position_embeddings": 77, "hidden_act": "quick_gelu", "eos_token_id": 513,
                   "projection_dim": 16}),
        )?,
        &weights(13),
        device,
    )?;
    Ok(Scorer::new(
        dino(device)?,
        clip,
        text,
        ClipTokenizer::byte_level()?,
    ))
}

/// A random weight matrix [out, in] ~ N(0, 1/in) from the built-in seed.
fn linear(part: u64, inp: usize, out: usize, bias: bool, device: &Device) -> LinearW {
    let w = crate::rng::normal(SEED + part, 0, out * inp)
        .into_iter()
        .map(|v| v / (inp as f32).sqrt())
        .collect();
    LinearW {
        weight: device.put(Tensor::new(vec![out, inp], w)),
        bias: bias.then(|| {
            device.put(Tensor::new(
                vec![out],
                crate::rng::normal(SEED + part, 1, out)
                    .iter()
                    .map(|v| 0.02 * v)
                    .collect(),
            ))
        }),
    }
}

/// A Toffee adapter (linear projection of all DINO tokens) for `unet`, random weights.
pub fn refiner_adapter(unet: &mut Unet, device: &Device) -> Result<Adapter> {
    let d = 32;
    let cross = unet.config.cross_attention_dim[0];
    let layers = unet
        .cross_attention_dims()
        .into_iter()
        .enumerate()
        .map(|(i, (q, _))| {
            let p = 100 + 2 * i as u64;
            (
                linear(p, cross, q, false, device),
                linear(p + 1, cross, q, false, device),
            )
        })
        .collect();
    Ok(Adapter {
        kind: AdapterKind::Toffee,
        source: PathBuf::from("<built-in>/refiner-adapter"),
        projection: Projection::PerToken {
            proj: linear(99, d, cross, true, device),
            norm: LayerNorm {
                gamma: device.put(Tensor::new(vec![cross], vec![1.0; cross])),
                beta: device.put(Tensor::zeros(vec![cross])),
                eps: 1e-5,
            },
        },
        layers,
        image_embed_dim: d,
        cross_dim: cross,
        tokens: None,
        default_scale: 0.8,
        selection: Some(TokenSelection {
            output: "last_hidden_state".into(),
            patch_only: false,
            prefix: 1,
        }),
        image_encoder: None,
    })
}

/// A tiny Zero123-shaped View Generator sharing the draft model's VAE layout.
pub fn view_generator(device: &Device) -> Result<ViewGenerator> {
    let unet = Unet::load(
        &cfg(
            "view/unet",
            json!({"_class_name": "UNet2DConditionModel", "sample_size": 16, "in_channels": 8, "out_channels": 4,
                   "block_out_channels": [32, 64], "layers_per_block": 1,
                   "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                   "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                   "cross_attention_dim": 32, "attention_head_dim": [2, 4], "norm_num_groups": 8}),
        )?,
        &weights(14),
        device,
    )?;
    let vae = Vae::load(
        &cfg(
            "view/vae",
            json!({"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
                   "block_out_channels": [16, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
                   "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
                   "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
                   "scaling_factor": 0.18215}),
        )?,
        &weights(2),
        device,
    )?;
    Ok(ViewGenerator {
        dir: PathBuf::from("<built-in>/view"),
        default_size: 16 * vae.downscale(),
        unet,
        vae,
        image_encoder: clip_vision(device)?,
        cc_projection: linear(98, 16 + 4, 32, true, device),
        scheduler_config: cfg(
            "view/scheduler",
            json!({"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                   "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
                   "set_alpha_to_one": false, "clip_sample": false, "prediction_type": "epsilon"}),
        )?,
        device: device.clone(),
        tensor_scheduler: false,
        evaluations: Default::default(),
    })
}

/// The built-in subjects' names and nouns.
pub const SUBJECTS: [(&str, &str); 3] = [
    ("red_ball", "ball"),
    ("green_cup", "cup"),
    ("blue_star", "toy"),
];

/// Subject `i` drawn procedurally at 96²: RGB in [0, 1] on a gray background, and its mask
/// (soft-edged).
pub fn subject(i: usize) -> (Tensor, Tensor) {
    let s = 96usize;
    let mut rgb = vec![0.5f32; s * s * 3];
    let mut mask = vec![0.0f32; s * s];
    for y in 0..s {
        for x in 0..s {
            let (fx, fy) = (x as f32 / s as f32 - 0.5, y as f32 / s as f32 - 0.5);
            let r = (fx * fx + fy * fy).sqrt();
            let angle = fy.atan2(fx);
            let (inside, colour): (f32, [f32; 3]) = match i % 3 {
                // A shaded ball.
                0 => (0.36 - r, [0.9 - r, 0.15, 0.1 + 0.3 * fx.abs()]),
                // A cup: a rectangle with a handle ring.
                1 => {
                    let body = (0.22 - fx.abs()).min(0.3 - fy.abs());
                    let handle = 0.05 - (((fx - 0.26).powi(2) + fy.powi(2)).sqrt() - 0.1).abs();
                    (body.max(handle), [0.1, 0.7 - 0.4 * fy, 0.2])
                }
                // A five-pointed star.
                _ => (0.2 + 0.12 * (5.0 * angle).cos() - r, [0.15, 0.25, 0.85 - r]),
            };
            let a = (inside * s as f32 / 2.0).clamp(0.0, 1.0);
            let p = y * s + x;
            mask[p] = a;
            for c in 0..3 {
                rgb[p * 3 + c] = rgb[p * 3 + c] * (1.0 - a) + colour[c].clamp(0.0, 1.0) * a;
            }
        }
    }
    (
        Tensor::new(vec![1, s, s, 3], rgb),
        Tensor::new(vec![1, s, s, 1], mask),
    )
}
