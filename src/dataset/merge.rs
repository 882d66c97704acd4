//! `toffee pairs merge DIR`: checks a finished multi-process run (every shard of the plan done,
//! every record indexed once, no key twice, every kept record in its shard) and writes the
//! combined index.jsonl, stats.json, dataset card and report.

use super::format::{for_each_member, read_index, read_job, ShardFiles, Stats};
use anyhow::{bail, Result};
use std::collections::BTreeSet;
use std::path::Path;

pub struct MergeReport {
    pub shards: usize,
    pub records: usize,
    pub stats: Stats,
}

pub fn merge(dir: &Path) -> Result<MergeReport> {
    let job = read_job(dir)?;
    check_finished(dir, job.shards)?;
    let mut keys = BTreeSet::new();
    let mut lines = 0;
    for i in 0..job.shards {
        let ShardFiles {
            tar: tp, index: ip, ..
        } = ShardFiles::new(dir, i);
        // A shard that wrote no record has no tar; then no index line may place one in it.
        let in_tar = if tp.exists() {
            tar_keys(&tp)?
        } else {
            BTreeSet::new()
        };
        for (n, line) in read_index(&ip)?.into_iter().enumerate() {
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

/// Every shard of the plan has its stats file (is finished).
fn check_finished(dir: &Path, shards: usize) -> Result<()> {
    let missing: Vec<String> = (0..shards)
        .filter(|&i| !ShardFiles::new(dir, i).stats.is_file())
        .map(super::format::shard_name)
        .collect();
    if !missing.is_empty() {
        bail!(
            "{}: {} of {} shards are not finished ({}{}); rerun the job (it resumes) before merging",
            dir.display(),
            missing.len(),
            shards,
            missing.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
            if missing.len() > 5 { ", …" } else { "" }
        );
    }
    Ok(())
}

/// The record keys of a shard's tar (its `KEY.json` members).
fn tar_keys(tp: &Path) -> Result<BTreeSet<String>> {
    let mut keys = BTreeSet::new();
    for_each_member(tp, |key, member, _| {
        if member == super::format::member::JSON {
            keys.insert(key.to_string());
        }
        Ok(())
    })?;
    Ok(keys)
}
