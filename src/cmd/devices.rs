//! `toffee devices`: the CUDA devices (or why there are none) and this build's GPU targets.

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_: Args) -> Result<()> {
    print!("{}", crate::devices::report());
    Ok(())
}
