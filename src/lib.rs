//! toffee: an inference engine for the models that build subject-driven image datasets the Toffee
//! way (Stable-Diffusion-family UNets, ControlNet, VAE, CLIP). See README.md and ../shared/DESIGN.md.

pub mod atomic_file;
pub mod backend;
pub mod bench;
pub mod budget;
pub mod builtin;
pub mod canny;
pub mod cmd;
pub mod config;
pub mod configs;
pub mod dataset;
pub mod devices;
pub mod ffi;
pub mod forward;
pub mod generate;
pub mod image_io;
pub mod image_proc;
pub mod input;
pub mod inspect;
pub mod models;
pub mod pipeline;
pub mod profile;
pub mod rng;
pub mod sched;
/// The tensor type, defined by the backend that stores it (`backend::tensor`).
pub use backend::tensor;
pub mod tokenizer;
pub mod weights;
