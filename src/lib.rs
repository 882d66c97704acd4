//! toffee: an inference engine for the models that build subject-driven image datasets the Toffee
//! way (Stable-Diffusion-family UNets, ControlNet, VAE, CLIP). See README.md and ../shared/DESIGN.md.

pub mod backend;
pub mod canny;
pub mod config;
pub mod forward;
pub mod image_io;
pub mod inspect;
pub mod models;
pub mod tensor;
pub mod tokenizer;
pub mod weights;
