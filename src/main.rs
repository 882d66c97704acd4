//! The `toffee` command line: thin over the library.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use toffee::forward::{self, Component};

#[derive(Parser)]
#[command(
    name = "toffee",
    version,
    about = "Inference engine for Toffee-style subject-driven dataset construction"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one model on named tensors (diffusers' NCHW layout) and write its outputs.
    Forward {
        /// A diffusers pipeline folder or a model folder (config.json + safetensors).
        #[arg(long)]
        model: PathBuf,
        #[arg(long, value_enum)]
        component: Component,
        /// safetensors file with the input tensors.
        #[arg(long)]
        inputs: PathBuf,
        /// safetensors file to write the outputs to (written atomically).
        #[arg(long)]
        out: PathBuf,
        /// cpu (the CUDA backend is not built yet).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Describe a checkpoint: family, variant, config, parameter count, dtypes and size.
    Inspect {
        /// A pipeline folder, a model folder or a .safetensors file.
        path: PathBuf,
        /// Also build the model, reading and checking every tensor.
        #[arg(long)]
        load: bool,
    },
}

fn check_device(device: &str) -> Result<()> {
    match device {
        "cpu" => Ok(()),
        d if d == "cuda" || d.starts_with("cuda:") => {
            bail!("device `{d}`: this build has no CUDA backend yet; use --device cpu")
        }
        d => bail!("unknown device `{d}` (expected cpu)"),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Forward {
            model,
            component,
            inputs,
            out,
            device,
        } => {
            check_device(&device)?;
            let tensors = toffee::weights::safetensors::read_all(&inputs)?;
            let outputs = forward::run(&model, component, &tensors, &inputs)?;
            toffee::weights::safetensors::write_f32(&out, &outputs)?;
            let names: Vec<&str> = outputs.iter().map(|(n, _)| n.as_str()).collect();
            eprintln!("wrote {} ({})", out.display(), names.join(", "));
            Ok(())
        }
        Cmd::Inspect { path, load } => {
            let text = toffee::inspect::inspect(&path, load)
                .with_context(|| format!("inspecting {}", path.display()))?;
            print!("{text}");
            Ok(())
        }
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("toffee: error: {e:#}");
        std::process::exit(1);
    }
}
