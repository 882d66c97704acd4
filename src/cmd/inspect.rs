//! `toffee inspect`: what a checkpoint is (family, variant, config, parameters, dtypes, size).

use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A pipeline folder, a model folder or a .safetensors file.
    pub path: PathBuf,
    /// Also build the model, reading and checking every tensor.
    #[arg(long)]
    pub load: bool,
}

pub fn run(a: Args) -> Result<()> {
    let text = crate::inspect::inspect(&a.path, a.load)
        .with_context(|| format!("inspecting {}", a.path.display()))?;
    print!("{text}");
    Ok(())
}
