//! The pairs job's output format, in one place: the file names of a run folder and of a shard,
//! the record members of a shard's tar, and the JSON written beside them (`job.json`, index lines,
//! stats), and the readers and writers of each: the job (`run`), `merge`, the dataset card and
//! `report` read and write the folder only through here.
//!
//! A run folder holds, per shard i, `pairs-%06d.tar` (WebDataset: the members of one record share
//! its KEY), `pairs-%06d.jsonl` (its index lines) and `pairs-%06d.stats.json` (written last: it
//! marks the shard done); and for the run, `job.json` (what must not change on a resume),
//! `index.jsonl` and `stats.json` (rebuilt from the finished shards), `README.md` (the dataset
//! card) and `report.html`.

use super::config::PairsConfig;
use super::stages::Timings;
use super::writer::write_text;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const JOB_FILE: &str = "job.json";
pub const INDEX_FILE: &str = "index.jsonl";
pub const STATS_FILE: &str = "stats.json";
pub const REPORT_FILE: &str = "report.html";
/// Byte i locked while a run builds shard i (`lock`); empty, hidden, left in place.
pub const LOCK_FILE: &str = ".toffee.lock";
/// The dataset card (`card`).
pub const README_FILE: &str = "README.md";

/// The members of one record in a shard's tar, `KEY.<member>`: the subject and its mask, the
/// target and its mask, the editing pair and the record's JSON (every record has all seven).
pub mod member {
    pub const SUBJECT: &str = "subject.png";
    pub const SUBJECT_MASK: &str = "subject_mask.png";
    pub const TARGET: &str = "target.png";
    pub const TARGET_MASK: &str = "target_mask.png";
    pub const SOURCE: &str = "source.png";
    pub const EDIT_MASK: &str = "edit_mask.png";
    pub const JSON: &str = "json";

    /// Every member, in tar order, with what it holds (the dataset card's table).
    pub const ALL: [(&str, &str); 7] = [
        (SUBJECT, "the subject image, as given (RGB)"),
        (SUBJECT_MASK, "the subject's mask (L, white = subject)"),
        (TARGET, "the subject in the new scene, refined (RGB, the job's resolution)"),
        (TARGET_MASK, "where the subject is in the target (L)"),
        (SOURCE, "the draft before refinement: the editing pair's source (RGB)"),
        (EDIT_MASK, "the dilated target mask the Refiner changed (L)"),
        (JSON, "the record: the index line's fields, the view, the placement, the settings, the models"),
    ];
}

/// `pairs-%06d`, the stem of shard i's files.
pub fn shard_name(i: usize) -> String {
    format!("pairs-{i:06}")
}

/// The files of shard i in a run folder.
pub struct ShardFiles {
    pub tar: PathBuf,
    pub index: PathBuf,
    pub stats: PathBuf,
}

impl ShardFiles {
    pub fn new(dir: &Path, i: usize) -> ShardFiles {
        let name = shard_name(i);
        ShardFiles {
            tar: dir.join(format!("{name}.tar")),
            index: dir.join(format!("{name}.jsonl")),
            stats: dir.join(format!("{name}.stats.json")),
        }
    }
}

/// What a finished run reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    pub records: usize,
    pub kept: usize,
    pub rejected: usize,
    pub rejections: BTreeMap<String, usize>,
    pub skipped_records: usize,
    pub skipped_subjects: BTreeMap<String, usize>,
    pub thresholds: BTreeMap<String, f32>,
    /// Summed per stage over the shards (work, like `work_seconds`).
    pub stage_seconds: Timings,
    /// Elapsed wall time. A shard's: its build time. A run's: the time during which at least one
    /// of its shards was being built (the union of their intervals), so processes working side
    /// by side count once and the gap between a stop and its resumption not at all.
    pub seconds: f64,
    /// Kept records per elapsed hour (`kept / seconds`): the run's real throughput.
    pub pairs_per_hour: f64,
    /// The building time summed over the shards: `seconds` times the processes working at once.
    #[serde(default)]
    pub work_seconds: f64,
    /// Unix time (s) when the shard's building started and finished; a run's first start and last
    /// finish.
    #[serde(default)]
    pub started: f64,
    #[serde(default)]
    pub finished: f64,
    /// The device and its storage type: `cpu (f32)`, `cuda:0 (bf16)`.
    pub device: String,
    /// UNet evaluations (per sample: a CFG step counts 2) spent on these records.
    #[serde(default)]
    pub unet_evaluations: u64,
    /// The run's stats.json only: shards finished so far and in the plan. Until they are equal
    /// the folder is partial (a run in progress, stopped, or one process of several).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards_finished: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards_expected: Option<usize>,
}

impl Stats {
    /// The totals of shards' stats: counts and work summed, elapsed time from their intervals.
    pub fn total(shards: &[Stats]) -> Stats {
        let mut t = Stats::default();
        for s in shards {
            t.add(s);
        }
        // Differences of Unix times carry their rounding (multiples of 2^-22 s): milliseconds.
        t.seconds = (elapsed(shards.iter().map(|s| (s.started, s.finished))) * 1e3).round() / 1e3;
        t.started = shards
            .iter()
            .map(|s| s.started)
            .reduce(f64::min)
            .unwrap_or(0.0);
        t.finished = shards.iter().map(|s| s.finished).fold(0.0, f64::max);
        t.pairs_per_hour = per_hour(t.kept, t.seconds);
        t
    }

    fn add(&mut self, o: &Stats) {
        self.records += o.records;
        self.kept += o.kept;
        self.rejected += o.rejected;
        self.skipped_records += o.skipped_records;
        for (k, v) in &o.rejections {
            *self.rejections.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.skipped_subjects {
            *self.skipped_subjects.entry(k.clone()).or_default() += v;
        }
        self.stage_seconds.add(&o.stage_seconds);
        self.unet_evaluations += o.unet_evaluations;
        self.work_seconds += o.work_seconds;
        self.thresholds = o.thresholds.clone();
        if self.device.is_empty() {
            self.device = o.device.clone();
        }
    }
}

/// `kept` per hour of `seconds` (0 for no time).
pub fn per_hour(kept: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        kept as f64 / seconds * 3600.0
    } else {
        0.0
    }
}

/// The length of the union of time intervals `[start, end]`.
pub fn elapsed(intervals: impl Iterator<Item = (f64, f64)>) -> f64 {
    let mut v: Vec<(f64, f64)> = intervals.filter(|(a, b)| b > a).collect();
    v.sort_by(|x, y| x.0.total_cmp(&y.0));
    let mut total = 0.0;
    let mut cur: Option<(f64, f64)> = None;
    for (a, b) in v {
        cur = match cur {
            Some((s, e)) if a <= e => Some((s, e.max(b))),
            Some((s, e)) => {
                total += e - s;
                Some((a, b))
            }
            None => Some((a, b)),
        };
    }
    total + cur.map_or(0.0, |(s, e)| e - s)
}

/// Now, in Unix seconds.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The version of the records' format and of their seeds and keys. 2: seeds below 2^53 (so keys
/// changed too), typed index lines, one member set per record. A folder of another version is
/// another job: resuming it would mix two schemes.
pub const FORMAT_VERSION: u32 = 2;

/// The part of a run that must not change between a run and its resumption (`job.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JobFile {
    /// `FORMAT_VERSION` of the run (job files without it are version 1).
    #[serde(default = "format_v1")]
    pub format: u32,
    pub toffee_version: String,
    pub config: PairsConfig,
    pub subjects: String,
    pub subject_names_digest: String,
    pub records: usize,
    pub shards: usize,
    pub keep_rejected: bool,
}

fn format_v1() -> u32 {
    1
}

/// The job file of a run folder.
pub fn read_job(dir: &Path) -> Result<JobFile> {
    let p = dir.join(JOB_FILE);
    let text = crate::input::read_to_string(&p)
        .with_context(|| format!("{}: cannot read (not a pairs output folder?)", p.display()))?;
    let job: JobFile =
        serde_json::from_str(&text).with_context(|| format!("{}: not a job file", p.display()))?;
    job.check()
        .with_context(|| format!("{}: a damaged job file", p.display()))?;
    Ok(job)
}

/// The most shards a job may have: a run lists its shards' files one by one, so a damaged
/// job.json claiming 10^12 must not make a merge or a report walk them.
pub const MAX_SHARDS: usize = 10_000_000;

impl JobFile {
    /// The counts agree with each other (as a run writes them) and are bounded.
    fn check(&self) -> Result<()> {
        let size = self.config.job.shard_size;
        if size == 0 || self.records.div_ceil(size) != self.shards {
            anyhow::bail!(
                "{} records in shards of {size} are not {} shards",
                self.records,
                self.shards
            );
        }
        if self.shards > MAX_SHARDS {
            anyhow::bail!("{} shards, more than {MAX_SHARDS}", self.shards);
        }
        Ok(())
    }
}

/// One line of index.jsonl. Every line has every field, one JSON type each (loaders infer one
/// column type): `shard` is "" for a record not written to a tar (rejected, without
/// `--keep-rejected`), `reason` "" for a kept record; `seed` is below 2^53.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IndexLine {
    pub key: String,
    pub shard: String,
    pub subject: String,
    pub prompt: String,
    pub template: String,
    pub taxonomy: String,
    pub seed: u64,
    pub scores: crate::pipeline::score::Scores,
    pub kept: bool,
    pub reason: String,
    pub edit: bool,
}

/// Every field of an index line with what it means (the dataset card's table; a test checks the
/// list against `IndexLine`).
pub const INDEX_FIELDS: [(&str, &str); 11] = [
    (
        "key",
        "16 hex digits from (subject, prompt, seed): the record's name in its shard",
    ),
    (
        "shard",
        "the tar holding the record; \"\" when it was not written (rejected)",
    ),
    ("subject", "the subject's name"),
    ("prompt", "the prompt the target was drawn from"),
    ("template", "the prompt template"),
    (
        "taxonomy",
        "the template's kind: background, style, colour or texture",
    ),
    ("seed", "the record's seed (an integer below 2^53)"),
    ("scores", "dino, clip_i, clip_t: raw cosines in [-1, 1]"),
    ("kept", "whether every filter threshold passed"),
    (
        "reason",
        "the first threshold that failed; \"\" for a kept record",
    ),
    (
        "edit",
        "whether source.png and edit_mask.png are an editing pair to train on (kept records)",
    ),
];

/// The lines of an index file (`index.jsonl` or a shard's); errors name the file and line.
pub fn read_index(path: &Path) -> Result<Vec<IndexLine>> {
    let text = crate::input::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}: line {}: not a valid record", path.display(), i + 1))
        })
        .collect()
}

/// A stats file (a shard's or the run's).
pub fn read_stats(path: &Path) -> Result<Stats> {
    let text = crate::input::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a stats file", path.display()))
}

/// Calls `f(key, member, entry)` for every file in a shard's tar, in order, with WebDataset's
/// split of a name: KEY is the base name up to its first dot. Errors name the shard.
pub fn for_each_member(
    tar_path: &Path,
    mut f: impl FnMut(&str, &str, &mut tar::Entry<'_, std::io::BufReader<std::fs::File>>) -> Result<()>,
) -> Result<()> {
    let corrupt = || format!("{}: corrupt shard", tar_path.display());
    let file = crate::input::open(tar_path)
        .with_context(|| format!("{}: cannot read", tar_path.display()))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    for entry in archive.entries().with_context(corrupt)? {
        let mut entry = entry.with_context(corrupt)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .with_context(corrupt)?
            .to_string_lossy()
            .into_owned();
        let base = name.rsplit('/').next().unwrap_or_default();
        if let Some((key, member)) = base.split_once('.') {
            let (key, member) = (key.to_string(), member.to_string());
            f(&key, &member, &mut entry)?;
        }
    }
    Ok(())
}

/// A record's `KEY.json` in its shard: the index line's fields (same names, same values) and how
/// the record was made. Serialized from this struct, not through `serde_json::Value`, so f32s
/// print as in index.jsonl (0.8, not 0.800000011920929).
#[derive(Serialize)]
pub struct RecordJson<'a> {
    pub key: &'a str,
    pub subject: &'a str,
    pub category: &'a str,
    pub prompt: &'a str,
    pub template: &'a str,
    pub taxonomy: &'a str,
    pub seed: u64,
    pub view: ViewJson,
    pub placement: PlacementJson,
    pub scores: crate::pipeline::score::Scores,
    pub kept: bool,
    pub reason: &'a str,
    pub edit: bool,
    pub settings: SettingsJson<'a>,
    pub models: &'a serde_json::Value,
}

/// The camera change of a record: `applied` false (and zeros) when no new view was made.
#[derive(Serialize)]
pub struct ViewJson {
    pub applied: bool,
    pub elevation: f32,
    pub azimuth: f32,
    pub radius: f32,
}

#[derive(Serialize)]
pub struct PlacementJson {
    pub x: usize,
    pub y: usize,
    pub width: usize,
    pub height: usize,
}

#[derive(Serialize)]
pub struct SettingsJson<'a> {
    pub draft: &'a super::config::Draft,
    pub refine: &'a super::config::Refine,
    pub view: &'a super::config::ViewStage,
    pub place: &'a super::config::Place,
    pub filter: &'a super::config::Filter,
    pub resolution: usize,
}

/// JSON lines of `values`.
pub fn jsonl<T: serde::Serialize>(values: &[T]) -> Result<String> {
    let mut s = Vec::new();
    for v in values {
        serde_json::to_writer(&mut s, v)?;
        s.write_all(b"\n")?;
    }
    Ok(String::from_utf8(s)?)
}

/// Rebuilds index.jsonl and stats.json from every finished shard in the folder (atomic writes;
/// processes of a job array may all do it, the last one sees the most).
pub fn write_totals(out: &Path, shards: usize) -> Result<Stats> {
    let mut done = Vec::new();
    let mut index = String::new();
    for i in 0..shards {
        let f = ShardFiles::new(out, i);
        if !f.stats.is_file() {
            continue;
        }
        done.push(read_stats(&f.stats)?);
        index.push_str(
            &crate::input::read_to_string(&f.index)
                .with_context(|| format!("{}: cannot read", f.index.display()))?,
        );
    }
    let mut stats = Stats::total(&done);
    stats.shards_finished = Some(done.len());
    stats.shards_expected = Some(shards);
    write_text(&out.join(INDEX_FILE), &index)?;
    write_text(
        &out.join(STATS_FILE),
        &serde_json::to_string_pretty(&stats)?,
    )?;
    Ok(stats)
}
