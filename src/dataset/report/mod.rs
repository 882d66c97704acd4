//! The pairs report: one self-contained HTML page about a `toffee pairs` output folder.
//!
//! It reads only the files the job writes (`stats.json`, `index.jsonl`, the `pairs-%06d.tar` shards
//! and their `pairs-%06d.stats.json`, `job.json`), never a model, so it runs anywhere, also on a
//! folder whose job is still running. Everything is inline: thumbnails are base64 PNG data URIs,
//! charts are SVG, the CSS sits in a `<style>`, and there is no script (a Content-Security-Policy
//! forbids any). The page opens offline and can be archived or mailed alone.
//!
//! What it shows: the totals; score histograms over every scored record with the thresholds;
//! rejection reasons, skipped subjects and the taxonomy mix; each stage's share of the time; a
//! contact sheet of kept and one of rejected records, sampled deterministically (at most
//! [`MAX_KEPT_SHOWN`] + [`MAX_REJECTED_SHOWN`]) with thumbnails of at most [`THUMB_PX`] pixels, so
//! a run of a million pairs still gives a page of a few megabytes; and the shards, where a missing
//! one is listed as missing rather than failing the report.

mod read;
mod render;

use super::format::IndexLine;
use read::{read_shard, shard_of, Run, Thumbs};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use anyhow::Result;

/// Thumbnails are downscaled so that their long side is at most this many pixels.
pub const THUMB_PX: u32 = 128;
/// At most this many kept records on the contact sheet.
pub const MAX_KEPT_SHOWN: usize = 48;
/// At most this many rejected records on the contact sheet.
pub const MAX_REJECTED_SHOWN: usize = 24;
/// The fill of histogram bars at or above the threshold (#1b9e77), for tests that look at pixels.
pub const HISTOGRAM_BAR_RGB: [u8; 3] = [0x1b, 0x9e, 0x77];
const BAR_PASS: &str = "#1b9e77";
const BAR_FAIL: &str = "#b9c6c2";
const THRESHOLD_STROKE: &str = "#c0392b";
const HIST_BINS: usize = 30;
/// A shard member larger than this is not an image the job wrote.
const MAX_MEMBER_BYTES: u64 = 256 << 20;
const MAX_SHARD_ROWS: usize = 200;
const SCORES: [(&str, &str); 3] = [("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T")];
const STAGE_COLOURS: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// What [`write_report`] put on the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportSummary {
    /// Records in `index.jsonl`.
    pub records: usize,
    /// Of those, kept.
    pub kept: usize,
    /// Of those, rejected.
    pub rejected: usize,
    /// Records shown on the two contact sheets.
    pub shown: usize,
    /// Thumbnails embedded in the page.
    pub images: usize,
    /// Shards that `index.jsonl` or a shard stats file names but that are not in the folder.
    pub missing_shards: Vec<String>,
    /// Size of the page in bytes.
    pub bytes: usize,
    /// (finished, expected) shards, from stats.json: the folder is partial while they differ.
    pub shards: Option<(usize, usize)>,
}

/// Reads the pairs output folder `dir` and writes the report page to `out` (temporary file, fsync,
/// rename). Errors name the file: a missing or unreadable `index.jsonl` / `stats.json`, a bad JSON
/// line (with its line number), a corrupt shard or an undecodable image in one.
pub fn write_report(dir: &Path, out: &Path) -> Result<ReportSummary> {
    let run = Run::load(dir)?;
    let kept = sample_sheet(&run.records, true, MAX_KEPT_SHOWN);
    let rejected = sample_sheet(&run.records, false, MAX_REJECTED_SHOWN);
    let mut wanted: BTreeMap<&str, HashSet<&str>> = BTreeMap::new();
    for r in kept.iter().chain(&rejected) {
        if let Some(shard) = shard_of(r) {
            wanted.entry(shard).or_default().insert(&r.key);
        }
    }
    let mut thumbs = HashMap::new();
    for (shard, keys) in &wanted {
        let path = dir.join(shard);
        if path.is_file() {
            thumbs.extend(read_shard(&path, keys)?);
        }
    }
    let images = thumbs.values().map(|t: &Thumbs| t.len()).sum();
    let page = render::render(&run, &kept, &rejected, &thumbs);
    crate::weights::safetensors::write_atomic(out, page.as_bytes())?;
    let kept_n = run.records.iter().filter(|r| r.kept).count();
    Ok(ReportSummary {
        records: run.records.len(),
        kept: kept_n,
        rejected: run.records.len() - kept_n,
        shown: kept.len() + rejected.len(),
        images,
        missing_shards: run.missing_shards(),
        bytes: page.len(),
        shards: run.stats.shards_finished.zip(run.stats.shards_expected),
    })
}

// ---------------------------------------------------------------------------------------------
// Choosing what the contact sheets show

/// Up to `cap` kept (or rejected) records, spread evenly over the groups (taxonomy for kept
/// records, rejection reason for rejected ones) and, within a group, evenly over the index order.
/// Rejected records are taken from those written to shards when there are any (`--keep-rejected`),
/// so the sheet has pictures; otherwise from all of them, shown without pictures.
fn sample_sheet(records: &[IndexLine], kept: bool, cap: usize) -> Vec<&IndexLine> {
    let mut pool: Vec<(usize, &IndexLine)> = records
        .iter()
        .enumerate()
        .filter(|(_, r)| r.kept == kept)
        .collect();
    if pool.iter().any(|(_, r)| shard_of(r).is_some()) {
        pool.retain(|(_, r)| shard_of(r).is_some());
    }
    let group = |r: &IndexLine| match kept {
        true => r.taxonomy.clone(),
        false => r.reason.clone(),
    };
    let mut groups: BTreeMap<String, Vec<(usize, &IndexLine)>> = BTreeMap::new();
    for (i, r) in pool {
        groups.entry(group(r)).or_default().push((i, r));
    }
    let quotas = round_robin_quotas(&groups.values().map(Vec::len).collect::<Vec<_>>(), cap);
    let mut chosen: Vec<(usize, &IndexLine)> = Vec::new();
    for (members, quota) in groups.values().zip(quotas) {
        chosen.extend(evenly_spaced(members.len(), quota).map(|j| members[j]));
    }
    chosen.sort_by_key(|(i, _)| *i);
    chosen.into_iter().map(|(_, r)| r).collect()
}

/// Hands out `cap` places one group at a time, skipping exhausted groups.
fn round_robin_quotas(sizes: &[usize], cap: usize) -> Vec<usize> {
    let mut quotas = vec![0; sizes.len()];
    let mut left = cap.min(sizes.iter().sum());
    while left > 0 {
        for (q, &n) in quotas.iter_mut().zip(sizes) {
            if left > 0 && *q < n {
                *q += 1;
                left -= 1;
            }
        }
    }
    quotas
}

/// `k` distinct indices spread evenly over `0..n` (all of them when k ≥ n).
fn evenly_spaced(n: usize, k: usize) -> impl Iterator<Item = usize> {
    let k = k.min(n);
    (0..k).map(move |j| (2 * j + 1) * n / (2 * k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_spread_over_groups_and_stay_in_bounds() {
        assert_eq!(round_robin_quotas(&[1, 10, 10], 6), vec![1, 3, 2]);
        assert_eq!(round_robin_quotas(&[2, 1], 10), vec![2, 1]);
        assert_eq!(evenly_spaced(10, 2).collect::<Vec<_>>(), vec![2, 7]);
        assert_eq!(evenly_spaced(3, 5).collect::<Vec<_>>(), vec![0, 1, 2]);
    }
}
