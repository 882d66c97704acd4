//! `toffee report`: a self-contained HTML page about a pairs output folder.

use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    pub dir: PathBuf,
    #[arg(long, default_value = "report.html")]
    pub out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let r = crate::dataset::report::write_report(&a.dir, &a.out)?;
    eprintln!("wrote {} ({r:?})", a.out.display());
    Ok(())
}
