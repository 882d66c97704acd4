//! The built-in demo model: a tiny SD1-style pipeline (text encoder, UNet, VAE, DDIM) with
//! random weights made deterministically in code and a byte-level tokenizer. It needs no files,
//! runs end to end on a CPU in seconds, and draws noise-like pictures: it exists to show that the
//! whole path works on a fresh machine, not to make meaningful images.

use crate::backend::Device;
use crate::config::Config;
use crate::models::clip_text::ClipText;
use crate::models::unet::Unet;
use crate::models::vae::Vae;
use crate::pipeline::prompt::TextEncoders;
use crate::pipeline::Generator;
use crate::tokenizer::ClipTokenizer;
use crate::weights::WeightStore;
use anyhow::Result;
use serde_json::json;

pub const SEED: u64 = 0x70FF_EE00;

pub fn generator(device: &Device) -> Result<Generator> {
    let text_cfg = Config::from_json(
        "<built-in>/text_encoder/config.json",
        json!({
            "architectures": ["CLIPTextModel"], "vocab_size": 514, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 513
        }),
    )?;
    let unet_cfg = Config::from_json(
        "<built-in>/unet/config.json",
        json!({
            "_class_name": "UNet2DConditionModel", "sample_size": 32, "in_channels": 4, "out_channels": 4,
            "block_out_channels": [32, 64], "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 32, "attention_head_dim": [2, 4], "norm_num_groups": 8
        }),
    )?;
    let vae_cfg = Config::from_json(
        "<built-in>/vae/config.json",
        json!({
            "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
            "block_out_channels": [16, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "scaling_factor": 0.18215
        }),
    )?;
    let scheduler_config = Config::from_json(
        "<built-in>/scheduler/scheduler_config.json",
        json!({
            "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false,
            "prediction_type": "epsilon"
        }),
    )?;
    let weights = |part: u64| WeightStore::random(SEED + part);
    let unet = Unet::load(&unet_cfg, &weights(1), device)?;
    let vae = Vae::load(&vae_cfg, &weights(2), device)?;
    let g = Generator {
        name: "built-in tiny model (random weights)".into(),
        text: TextEncoders {
            tok: ClipTokenizer::byte_level()?,
            te: ClipText::load(&text_cfg, &weights(0), device)?,
            second: None,
        },
        default_size: 32 * vae.downscale(),
        unet,
        vae,
        controlnet: None,
        scheduler_config,
        force_zeros_for_empty_prompt: false,
        device: device.clone(),
        graphs: crate::pipeline::Graphs::new(device),
        tensor_scheduler: false,
        adapters: Vec::new(),
        evaluations: Default::default(),
    };
    g.check()?;
    Ok(g)
}

/// The built-in CLIPSeg segmenter: `clipseg::builtin_config()` with random weights, the
/// byte-level tokenizer of the built-in generator, and ViTImageProcessor's defaults at the
/// config's image size.
pub fn clipseg_segmenter(device: &Device) -> Result<crate::models::clipseg::ClipSegSegmenter> {
    use crate::models::clipseg::{builtin_config, ClipSeg, ClipSegSegmenter};
    let cfg = Config::from_json("<built-in CLIPSeg>/config.json", builtin_config())?;
    let model = ClipSeg::load(&cfg, &WeightStore::random(SEED + 16), device)?;
    let s = model.image_size();
    let processor = crate::image_proc::ImageProcessor::from_json(
        "<built-in CLIPSeg>/preprocessor_config.json",
        &json!({
            "image_processor_type": "ViTImageProcessor",
            "size": {"height": s, "width": s}
        }),
    )?;
    Ok(ClipSegSegmenter::new(
        model,
        ClipTokenizer::byte_level()?,
        processor,
    ))
}
