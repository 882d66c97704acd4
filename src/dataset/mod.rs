//! The pairs job: subjects in, WebDataset shards of (subject, target, prompt, masks) records
//! out — resumable, and sharded across processes and GPUs.
//!
//! The shard is the unit of work, resume and scale-out. Shard i holds records
//! `i·shard_size ..` of a plan every process computes identically (`plan`); process p of N builds
//! the shards with i mod N = p. A shard's tar is written under a temporary name and renamed when
//! complete, then its index lines (`pairs-%06d.jsonl`), then its stats (`pairs-%06d.stats.json`),
//! whose presence marks the shard done. A killed run leaves at most temporary files; a rerun
//! skips the finished shards and redoes the rest, so nothing is lost and nothing is written twice.
//! A run claims its unfinished shards first (`lock`), so two runs never build one shard.

pub mod builtin;
pub mod card;
pub mod check;
pub mod config;
pub mod format;
pub mod job;
pub mod lock;
pub mod merge;
pub mod plan;
pub mod progress;
pub mod report;
pub mod run;
pub mod shard;
pub mod stages;
pub mod writer;

pub use job::Options;
pub use run::{run, Summary};

/// Rebuilds what a run folder says about itself from its finished shards: index.jsonl and
/// stats.json, the dataset card and the report page. The page never fails the run (a warning).
pub fn write_summaries(
    out: &std::path::Path,
    job: &format::JobFile,
) -> anyhow::Result<format::Stats> {
    let stats = format::write_totals(out, job.shards)?;
    card::write_card(out, job, &stats)?;
    if let Err(e) = report::write_report(out, &out.join(format::REPORT_FILE)) {
        eprintln!(
            "toffee: warning: {} not written: {e:#}",
            format::REPORT_FILE
        );
    }
    Ok(stats)
}

/// A pairs run that failed before any work: the config, subjects, slice, output folder, devices or
/// models (`toffee pairs` exits 2: rerunning will not help). Other failures are a shard's (exit 1:
/// a rerun resumes). Its message is the inner error's, context chain included.
#[derive(Debug)]
pub struct SetupError(pub anyhow::Error);

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for SetupError {}

/// Whether `e` is (or wraps) a `SetupError`.
pub fn is_setup_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<SetupError>())
}
