//! The built-in demo model: a tiny SD1-style pipeline (text encoder, UNet, VAE, DDIM) with
//! random weights made deterministically in code and a byte-level tokenizer. It needs no files,
//! runs end to end on a CPU in seconds, and draws noise-like pictures: it exists to show that the
//! whole path works on a fresh machine, not to make meaningful images. Also the other built-in
//! demo models (CLIPSeg, SAM, Depth Anything): their tiny configs live here, not in the model
//! files, so the models know nothing of the demo.

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

/// The tiny pipeline's configs: text encoder, UNet, VAE, scheduler.
fn generator_configs() -> Result<(Config, Config, Config, Config)> {
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
    Ok((text_cfg, unet_cfg, vae_cfg, scheduler_config))
}

pub fn generator(device: &Device) -> Result<Generator> {
    let (text_cfg, unet_cfg, vae_cfg, scheduler_config) = generator_configs()?;
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

/// The built-in tiny random-weight CLIPSeg (and SAM) segmenter: the `mask` command and the pairs
/// demo run without downloads; their masks are arbitrary.
pub fn segmenter(
    with_sam: bool,
    settings: crate::pipeline::mask::MaskSettings,
    device: &Device,
) -> Result<crate::pipeline::mask::Segmenter> {
    Ok(crate::pipeline::mask::Segmenter {
        clipseg: clipseg_segmenter(device)?,
        sam: if with_sam { Some(sam(device)?) } else { None },
        settings,
    })
}

/// The built-in CLIPSeg segmenter: `clipseg_config()` with random weights, the
/// byte-level tokenizer of the built-in generator, and ViTImageProcessor's defaults at the
/// config's image size.
pub fn clipseg_segmenter(device: &Device) -> Result<crate::models::clipseg::ClipSegSegmenter> {
    use crate::models::clipseg::{ClipSeg, ClipSegSegmenter};
    let cfg = Config::from_json("<built-in CLIPSeg>/config.json", clipseg_config())?;
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

/// A tiny CLIPSeg config for the built-in demo (random weights, `WeightStore::random`): the
/// byte-level built-in tokenizer's 514 ids, 64×64 inputs, patch 16 (a 4×4 grid), two
/// decoder steps and the complex transposed convolution (as CIDAS/clipseg-rd64-refined).
pub fn clipseg_config() -> serde_json::Value {
    json!({
        "architectures": ["CLIPSegForImageSegmentation"],
        "model_type": "clipseg",
        "projection_dim": 16,
        "extract_layers": [0, 1],
        "reduce_dim": 16,
        "decoder_num_attention_heads": 2,
        "decoder_intermediate_size": 32,
        "conditional_layer": 0,
        "use_complex_transposed_convolution": true,
        "text_config": {
            "vocab_size": 514, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "bos_token_id": 512, "eos_token_id": 513
        },
        "vision_config": {
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_channels": 3, "image_size": 64, "patch_size": 16,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5
        }
    })
}

/// The built-in tiny SAM (random weights) and a processor for its size.
pub fn sam(
    device: &Device,
) -> Result<(
    crate::models::sam::Sam,
    crate::image_proc::sam::SamProcessor,
)> {
    let name = "<built-in SAM>";
    let cfg = Config::from_json(name, sam_config())?;
    let size = cfg.json["vision_config"]["image_size"].clone();
    let model = crate::models::sam::Sam::load(&cfg, &WeightStore::random(16), device)?;
    let proc = crate::image_proc::sam::SamProcessor::from_json(
        name,
        &json!({
            "size": {"longest_edge": size},
            "pad_size": {"height": size, "width": size},
        }),
    )?;
    Ok((model, proc))
}

/// A tiny random-weight config in the fixture's shape (built-in demo models, tests).
pub fn sam_config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["SamModel"],
        "model_type": "sam",
        "vision_config": {
            "hidden_size": 32, "output_channels": 16, "num_hidden_layers": 3,
            "num_attention_heads": 2, "num_channels": 3, "image_size": 64, "patch_size": 16,
            "hidden_act": "gelu", "layer_norm_eps": 1e-6, "qkv_bias": true, "mlp_ratio": 2.0,
            "mlp_dim": 64, "use_abs_pos": true, "use_rel_pos": true, "window_size": 3,
            "global_attn_indexes": [1], "num_pos_feats": 8
        },
        "prompt_encoder_config": {
            "hidden_size": 16, "image_size": 64, "patch_size": 16, "image_embedding_size": 4,
            "mask_input_channels": 4, "num_point_embeddings": 4, "hidden_act": "gelu",
            "layer_norm_eps": 1e-6
        },
        "mask_decoder_config": {
            "hidden_size": 16, "hidden_act": "relu", "mlp_dim": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "attention_downsample_rate": 2, "num_multimask_outputs": 3,
            "iou_head_depth": 3, "iou_head_hidden_dim": 16, "layer_norm_eps": 1e-6
        }
    })
}

/// The built-in tiny relative Depth Anything (random weights) and a processor for its 28-pixel
/// size.
pub fn depth_anything(
    dev: &Device,
) -> Result<(
    crate::models::depth_anything::DepthAnything,
    crate::image_proc::dpt::DptProcessor,
)> {
    let name = "<built-in Depth Anything>";
    let cfg = Config::from_json(name, depth_anything_config())?;
    let model =
        crate::models::depth_anything::DepthAnything::load(&cfg, &WeightStore::random(14), dev)?;
    let proc = crate::image_proc::dpt::DptProcessor::from_json(
        name,
        &json!({
            "size": {"height": 28, "width": 28}, "keep_aspect_ratio": true,
            "ensure_multiple_of": 14, "resample": 3,
            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]
        }),
    )?;
    Ok((model, proc))
}

/// A tiny relative-depth configuration for the built-in demo (random weights,
/// `WeightStore::random`): DINOv2 hidden 32, 4 layers, 28-pixel training size, the real
/// checkpoints' neck layout (factors 4, 2, 1, 0.5).
pub fn depth_anything_config() -> serde_json::Value {
    json!({
        "architectures": ["DepthAnythingForDepthEstimation"],
        "model_type": "depth_anything",
        "backbone_config": {
            "model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 4,
            "num_attention_heads": 2, "mlp_ratio": 2, "patch_size": 14, "image_size": 28,
            "layer_norm_eps": 1e-6, "out_indices": [1, 2, 3, 4], "apply_layernorm": true,
            "reshape_hidden_states": false
        },
        "neck_hidden_sizes": [8, 12, 16, 24],
        "reassemble_factors": [4, 2, 1, 0.5],
        "reassemble_hidden_size": 32,
        "fusion_hidden_size": 12,
        "head_hidden_size": 8,
        "patch_size": 14,
        "depth_estimation_type": "relative",
        "max_depth": 1
    })
}
