//! `toffee pairs merge DIR`: checks a finished multi-process run (every shard of the plan done,
//! every record indexed once, no key twice, every shard holding exactly the records its index
//! places there with every member once) and writes the
//! combined index.jsonl, stats.json, dataset card and report.

use super::format::{for_each_member, member, read_index, read_job, IndexLine, ShardFiles, Stats};
use anyhow::{bail, Result};
use std::collections::{BTreeMap, BTreeSet};
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
        let files = ShardFiles::new(dir, i);
        let index = read_index(&files.index)?;
        for (n, line) in index.iter().enumerate() {
            if !keys.insert(line.key.clone()) {
                bail!(
                    "{}:{}: key {} appears twice in the run",
                    files.index.display(),
                    n + 1,
                    line.key
                );
            }
        }
        check_shard(&files, i, &index)?;
        lines += index.len();
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
    let missing: Vec<usize> = (0..shards)
        .filter(|&i| !ShardFiles::new(dir, i).stats.is_file())
        .collect();
    if !missing.is_empty() {
        let named: Vec<String> = missing
            .iter()
            .take(5)
            .map(|&i| super::format::shard_name(i))
            .collect();
        bail!(
            "{}: {} of {} shards are not finished ({}{}); rerun the job (it resumes) before merging",
            dir.display(),
            missing.len(),
            shards,
            named.join(", "),
            if missing.len() > 5 { ", …" } else { "" }
        );
    }
    Ok(())
}

/// A shard's tar holds exactly the records its index places there, each with every member once
/// (a shard that wrote no record has no tar).
fn check_shard(files: &ShardFiles, i: usize, index: &[IndexLine]) -> Result<()> {
    let tp = &files.tar;
    let mut in_tar: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    if tp.exists() {
        for_each_member(tp, |key, m, _| {
            if !in_tar
                .entry(key.to_string())
                .or_default()
                .insert(m.to_string())
            {
                bail!("{}: record {key} has member {m} twice", tp.display());
            }
            Ok(())
        })?;
    }
    let name = format!("{}.tar", super::format::shard_name(i));
    let want: BTreeSet<String> = member::ALL.iter().map(|(m, _)| m.to_string()).collect();
    for line in index.iter().filter(|l| !l.shard.is_empty()) {
        if line.shard != name {
            bail!(
                "{}: record {} is placed in {}, not in this shard",
                files.index.display(),
                line.key,
                line.shard
            );
        }
        match in_tar.remove(&line.key) {
            None => bail!(
                "{}: record {} is indexed but not in the shard",
                tp.display(),
                line.key
            ),
            Some(got) if got != want => bail!(
                "{}: record {} has members {:?}; a record has {:?}",
                tp.display(),
                line.key,
                got,
                want
            ),
            Some(_) => {}
        }
    }
    if let Some(key) = in_tar.keys().next() {
        bail!(
            "{}: record {key} is in the shard but not in its index (a record of another job?)",
            tp.display()
        );
    }
    Ok(())
}
