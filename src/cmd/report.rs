//! `toffee report`: a self-contained HTML page about a pairs output folder.

use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    pub dir: PathBuf,
    /// Where the page goes (default: DIR/report.html, beside the data it shows).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let out = a
        .out
        .unwrap_or_else(|| a.dir.join(crate::dataset::format::REPORT_FILE));
    let r = crate::dataset::report::write_report(&a.dir, &out)?;
    eprintln!(
        "wrote {} ({} KiB): {} records, {} kept, {} rejected; {} shown with {} thumbnails",
        out.display(),
        r.bytes.div_ceil(1024),
        r.records,
        r.kept,
        r.rejected,
        r.shown,
        r.images
    );
    if let Some((done, all)) = r.shards.filter(|(d, a)| d < a) {
        eprintln!(
            "toffee: warning: partial: {done} of {all} shards finished (rerun the job, or merge once every process is done)"
        );
    }
    if !r.missing_shards.is_empty() {
        eprintln!(
            "toffee: warning: {} shard(s) named by the index but not in the folder: {}",
            r.missing_shards.len(),
            r.missing_shards.join(", ")
        );
    }
    Ok(())
}
