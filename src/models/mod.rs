//! The model families: each is config + weights -> forward, built on `backend` ops.

pub mod adapter;
pub mod blocks;
pub mod clip_text;
pub mod clipseg;
pub mod controlnet;
pub mod depth_anything;
pub mod load;
pub mod nn;
pub mod sam;
pub mod unet;
pub mod vae;
pub mod vit;
