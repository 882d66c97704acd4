//! `toffee pairs merge`: checks a finished multi-process run and writes its combined index and
//! stats.

use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    pub dir: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let r = crate::dataset::merge::merge(&a.dir)?;
    eprintln!(
        "{}: {} shards, {} records ({} kept); wrote index.jsonl, stats.json, README.md and report.html",
        a.dir.display(),
        r.shards,
        r.records,
        r.stats.kept
    );
    Ok(())
}
