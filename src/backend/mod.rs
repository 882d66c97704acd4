//! The operations the models need and nothing more. Models call these functions; they never touch
//! storage directly, so a second backend (CUDA) can sit behind the same names.
//!
//! Today every tensor lives on the host and the CPU reference implementation in `cpu` runs it.

pub mod cpu;

pub use cpu::*;
