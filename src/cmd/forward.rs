//! `toffee forward`: one model on named tensors from a safetensors file, outputs to another (the
//! harness the fixture goldens are compared through).

use crate::forward::{run_with_adapters, Component};
use crate::models::load::open_device;
use crate::weights::safetensors::{read_all, write_f32};
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A diffusers pipeline folder or a model folder (config.json + safetensors).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, value_enum)]
    pub component: Component,
    /// safetensors file with the input tensors.
    #[arg(long)]
    pub inputs: PathBuf,
    /// safetensors file to write the outputs to (written atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// cpu, cuda or cuda:N (builds with the `cuda` feature), emu (the software GPU, feature `emu`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Image-prompt adapter (IP-Adapter .safetensors file or Toffee adapter folder) attached
    /// to the UNet; repeat for several. Inputs ip_image_embeds.{i}, ip_scale.{i} or
    /// ip_layer_scales.{i}.
    #[arg(long)]
    pub adapter: Vec<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let device = open_device(&a.device, Some(&a.model), a.component.subfolder())?;
    let tensors = read_all(&a.inputs)?;
    let outputs = run_with_adapters(
        &a.model,
        a.component,
        &tensors,
        &a.inputs,
        &device,
        &a.adapter,
    )?;
    write_f32(&a.out, &outputs)?;
    let names: Vec<&str> = outputs.iter().map(|(n, _)| n.as_str()).collect();
    eprintln!("wrote {} ({})", a.out.display(), names.join(", "));
    Ok(())
}
