//! Library halves of the subcommands that read and write files (the CLI and the C ABI call
//! these; `main.rs` only parses arguments).

pub mod convert;
pub mod depth;
pub mod embed;
pub mod mask;
pub mod score;
pub mod view;
