//! `toffee pairs merge DIR`: checks a finished multi-process run (every shard of the plan done,
//! every record indexed once, no key twice, every kept record in its shard) and writes the
//! combined index.jsonl, stats.json, dataset card and report.

use super::format::{read_job, IndexLine, ShardFiles, Stats};
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::path::Path;

pub struct MergeReport {
    pub shards: usize,
    pub records: usize,
    pub stats: Stats,
}

pub fn merge(dir: &Path) -> Result<MergeReport> {
    let job = read_job(dir)?;
    let missing: Vec<String> = (0..job.shards)
        .filter(|&i| !ShardFiles::new(dir, i).stats.is_file())
        .map(super::format::shard_name)
        .collect();
    if !missing.is_empty() {
        bail!(
            "{}: {} of {} shards are not finished ({}{}); rerun the job (it resumes) before merging",
            dir.display(),
            missing.len(),
            job.shards,
            missing.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
            if missing.len() > 5 { ", …" } else { "" }
        );
    }
    let mut keys = BTreeSet::new();
    let mut lines = 0;
    for i in 0..job.shards {
        let ShardFiles {
            tar: tp, index: ip, ..
        } = ShardFiles::new(dir, i);
        let text = std::fs::read_to_string(&ip)
            .with_context(|| format!("{}: cannot read", ip.display()))?;
        // A shard that wrote no record has no tar; then no index line may place one in it.
        let in_tar = if tp.exists() {
            tar_keys(&tp)?
        } else {
            BTreeSet::new()
        };
        for (n, l) in text.lines().enumerate() {
            let line: IndexLine = serde_json::from_str(l)
                .with_context(|| format!("{}:{}: bad index line", ip.display(), n + 1))?;
            if !keys.insert(line.key.clone()) {
                bail!(
                    "{}:{}: key {} appears twice in the run",
                    ip.display(),
                    n + 1,
                    line.key
                );
            }
            if !line.shard.is_empty() && !in_tar.contains(&line.key) {
                bail!(
                    "{}: record {} is indexed but not in the shard",
                    tp.display(),
                    line.key
                );
            }
            lines += 1;
        }
    }
    let stats = super::write_summaries(dir, &job)?;
    if lines + stats.skipped_records != job.records {
        bail!(
            "{}: the shards hold {} records (+{} skipped) but the plan has {}",
            dir.display(),
            lines,
            stats.skipped_records,
            job.records
        );
    }
    Ok(MergeReport {
        shards: job.shards,
        records: lines,
        stats,
    })
}

/// The record keys of a shard's tar (its `KEY.json` members).
fn tar_keys(tp: &Path) -> Result<BTreeSet<String>> {
    let mut keys = BTreeSet::new();
    let mut ar = tar::Archive::new(
        std::fs::File::open(tp).with_context(|| format!("{}: cannot open", tp.display()))?,
    );
    for e in ar
        .entries()
        .with_context(|| format!("{}: not a tar file", tp.display()))?
    {
        let e = e.with_context(|| format!("{}: corrupt", tp.display()))?;
        let p = e.path()?.to_string_lossy().into_owned();
        if let Some(k) = p.strip_suffix(".json") {
            keys.insert(k.to_string());
        }
    }
    Ok(keys)
}
