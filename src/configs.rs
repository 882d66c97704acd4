//! The real model configurations the benchmarks use with random weights (the public diffusers /
//! transformers configs of SD1.5, SD2.1 and SDXL base, reduced to the fields the engine reads).

use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Known {
    Sd15,
    Sd21,
    Sdxl,
    /// Zero-1-to-3 (the View Generator): SD1.5's UNet with 8 input channels at 256².
    Zero123,
}

impl Known {
    pub fn name(self) -> &'static str {
        match self {
            Known::Sd15 => "sd15",
            Known::Zero123 => "zero123",
            Known::Sd21 => "sd21",
            Known::Sdxl => "sdxl",
        }
    }

    /// Default image side in pixels.
    pub fn resolution(self) -> usize {
        match self {
            Known::Sd15 => 512,
            Known::Zero123 => 256,
            Known::Sd21 => 768,
            Known::Sdxl => 1024,
        }
    }

    pub fn unet(self) -> Value {
        match self {
            Known::Zero123 => {
                let mut v = Known::Sd15.unet();
                v["in_channels"] = json!(8);
                v["sample_size"] = json!(32);
                v
            }
            Known::Sd15 => json!({
                "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
                "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32
            }),
            Known::Sd21 => json!({
                "_class_name": "UNet2DConditionModel", "sample_size": 96, "in_channels": 4, "out_channels": 4,
                "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "norm_num_groups": 32,
                "use_linear_projection": true, "upcast_attention": true
            }),
            Known::Sdxl => json!({
                "_class_name": "UNet2DConditionModel", "sample_size": 128, "in_channels": 4, "out_channels": 4,
                "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048,
                "attention_head_dim": [5, 10, 20], "norm_num_groups": 32, "use_linear_projection": true,
                "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2816
            }),
        }
    }

    pub fn controlnet(self) -> Value {
        let mut v = self.unet();
        let o = v.as_object_mut().expect("object");
        o.insert("_class_name".into(), json!("ControlNetModel"));
        o.remove("up_block_types");
        o.remove("out_channels");
        o.insert(
            "conditioning_embedding_out_channels".into(),
            json!([16, 32, 96, 256]),
        );
        v
    }

    pub fn vae(self) -> Value {
        json!({
            "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
            "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "scaling_factor": if self == Known::Sdxl { 0.13025 } else { 0.18215 }
        })
    }

    /// The (first) text encoder: CLIP ViT-L/14 for SD1.5 and SDXL, OpenCLIP ViT-H/14 for SD2.1.
    pub fn text_encoder(self) -> Value {
        match self {
            Known::Sd15 | Known::Sdxl | Known::Zero123 => json!({
                "architectures": ["CLIPTextModel"], "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
                "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
                "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 2
            }),
            Known::Sd21 => json!({
                "architectures": ["CLIPTextModel"], "vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096,
                "num_hidden_layers": 23, "num_attention_heads": 16, "max_position_embeddings": 77,
                "hidden_act": "gelu", "layer_norm_eps": 1e-5, "eos_token_id": 2
            }),
        }
    }
}

/// Image encoders the pairs job runs, by their public configs (random weights).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KnownVision {
    /// facebook/dinov2-base: ViT-B/14 with layer scale (the filter's DINO score, the Refiner's tokens).
    Dinov2B14,
    /// openai/clip-vit-large-patch14's vision tower with projection (IP-Adapter, CLIP-I/CLIP-T).
    ClipL14,
}

impl KnownVision {
    pub fn name(self) -> &'static str {
        match self {
            KnownVision::Dinov2B14 => "dinov2-b14",
            KnownVision::ClipL14 => "clip-l14",
        }
    }

    /// The input side the processor produces (224 for both).
    pub fn resolution(self) -> usize {
        224
    }

    pub fn config(self) -> Value {
        match self {
            KnownVision::Dinov2B14 => json!({
                "model_type": "dinov2", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                "mlp_ratio": 4, "patch_size": 14, "image_size": 518, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
                "layerscale_value": 1.0, "use_swiglu_ffn": false, "qkv_bias": true
            }),
            KnownVision::ClipL14 => json!({
                "model_type": "clip_vision_model", "architectures": ["CLIPVisionModelWithProjection"],
                "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                "patch_size": 14, "image_size": 224, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                "projection_dim": 768
            }),
        }
    }
}
