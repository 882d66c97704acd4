//! `toffee bench`: calls per second of one model on random inputs (random weights of a known
//! configuration, or a model folder).

use crate::bench::{Options, Source};
use crate::forward::Component;
use crate::models::load::open_device;
use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// sd15, sd21, sdxl, zero123, dinov2-b14, clip-l14 (random weights) or a pipeline / model folder.
    #[arg(long)]
    pub config: Source,
    #[arg(long, value_enum)]
    pub component: Component,
    #[arg(long, default_value_t = 1, allow_negative_numbers = true, value_parser = super::count::<usize>)]
    pub batch: usize,
    /// Image side in pixels (default: the configuration's native size).
    #[arg(long, allow_negative_numbers = true, value_parser = super::count::<usize>)]
    pub resolution: Option<usize>,
    /// cpu, cuda, cuda:N or emu.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value_t = 10, allow_negative_numbers = true, value_parser = super::count::<usize>)]
    pub iters: usize,
    #[arg(long, default_value_t = 3, allow_negative_numbers = true, value_parser = super::count::<usize>)]
    pub warmup: usize,
    /// One JSON object instead of a line of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let model = match &a.config {
        Source::Dir(p) => Some(p.as_path()),
        Source::Known(_) | Source::KnownVision(_) => None,
    };
    let device = open_device(&a.device, model, a.component.subfolder())?;
    let opts = Options {
        source: a.config,
        component: a.component,
        batch: a.batch,
        resolution: a.resolution,
        iters: a.iters,
        warmup: a.warmup,
    };
    let r = crate::bench::run(&opts, &device)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} {} batch {} at {}px on {}: {:.3} ms/call, {:.2} calls/s",
            r.config, r.component, r.batch, r.resolution, r.device, r.ms_per_call, r.calls_per_s
        );
    }
    Ok(())
}
