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

use super::format::{self, member};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use image::codecs::png::{CompressionType, FilterType as PngFilter, PngEncoder};
use image::DynamicImage;
use serde::Deserialize;
use serde_json::{Map, Value};

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
const STAGES: [&str; 6] = ["load", "view", "draft", "refine", "score", "write"];
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
        if let Some(shard) = &r.shard {
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
    let page = render(&run, &kept, &rejected, &thumbs);
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
    })
}

// ---------------------------------------------------------------------------------------------
// Reading the folder

/// One line of `index.jsonl`. Only `key` and `kept` are required; the rest shows as "—" if absent.
#[derive(Debug, Clone, Deserialize)]
struct Record {
    key: String,
    #[serde(default, deserialize_with = "empty_as_none")]
    shard: Option<String>,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    taxonomy: Option<String>,
    #[serde(default)]
    seed: Option<Value>,
    #[serde(default)]
    scores: Option<Scores>,
    kept: bool,
    #[serde(default, deserialize_with = "empty_as_none")]
    reason: Option<String>,
    #[serde(default)]
    edit: Option<bool>,
}

/// "" (the format's "none", see `format::IndexLine`) and null both read as absent.
fn empty_as_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v: Option<String> = Option::deserialize(d)?;
    Ok(v.filter(|s| !s.is_empty()))
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Scores {
    #[serde(default)]
    dino: Option<f64>,
    #[serde(default)]
    clip_i: Option<f64>,
    #[serde(default)]
    clip_t: Option<f64>,
}

impl Record {
    fn score(&self, name: &str) -> Option<f64> {
        let s = self.scores.as_ref()?;
        match name {
            "dino" => s.dino,
            "clip_i" => s.clip_i,
            "clip_t" => s.clip_t,
            _ => None,
        }
        .filter(|v| v.is_finite())
    }
}

/// A shard as the folder and the index see it.
#[derive(Debug, Default)]
struct Shard {
    /// Size of the tar, `None` when it is not in the folder.
    bytes: Option<u64>,
    /// Its `.stats.json` (written once the shard is committed).
    stats: Option<Value>,
    /// Records `index.jsonl` places in it.
    indexed: usize,
}

struct Run {
    dir: String,
    stats: Map<String, Value>,
    job: Option<Map<String, Value>>,
    records: Vec<Record>,
    shards: BTreeMap<String, Shard>,
}

impl Run {
    fn load(dir: &Path) -> Result<Run> {
        let stats = read_json_object(&dir.join(format::STATS_FILE))?;
        let records = read_index(&dir.join(format::INDEX_FILE))?;
        let job_path = dir.join(format::JOB_FILE);
        let job = match job_path.exists() {
            true => Some(read_json_object(&job_path)?),
            false => None,
        };
        let shards = scan_shards(dir, &records)?;
        Ok(Run {
            dir: dir.display().to_string(),
            stats,
            job,
            records,
            shards,
        })
    }

    fn missing_shards(&self) -> Vec<String> {
        self.shards
            .iter()
            // A done shard that wrote no record has no tar, and that is not missing.
            .filter(|(_, s)| s.bytes.is_none() && (s.indexed > 0 || s.stats.is_none()))
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn stat(&self, key: &str) -> Option<f64> {
        self.stats.get(key).and_then(Value::as_f64)
    }

    fn threshold(&self, score: &str) -> Option<f64> {
        self.stats.get("thresholds")?.get(score)?.as_f64()
    }
}

fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    match serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?
    {
        Value::Object(map) => Ok(map),
        _ => bail!("{}: expected a JSON object", path.display()),
    }
}

fn read_index(path: &Path) -> Result<Vec<Record>> {
    let file = File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut records = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let n = i + 1;
        let line = line.with_context(|| format!("{}: line {n}: cannot read", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let record: Record = serde_json::from_str(&line)
            .with_context(|| format!("{}: line {n}: not a valid record", path.display()))?;
        if let Some(shard) = &record.shard {
            if !is_plain_file_name(shard) {
                bail!(
                    "{}: line {n}: shard {shard:?} is not a file name",
                    path.display()
                );
            }
        }
        records.push(record);
    }
    Ok(records)
}

/// The shard field names a file inside the folder; anything else would read outside it.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\'])
}

/// Every shard the folder holds (`pairs-*.tar`, `pairs-*.stats.json`) or the index names.
fn scan_shards(dir: &Path, records: &[Record]) -> Result<BTreeMap<String, Shard>> {
    let mut shards: BTreeMap<String, Shard> = BTreeMap::new();
    let listing =
        std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?;
    for entry in listing {
        let entry = entry.with_context(|| format!("{}: cannot list", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("pairs-") {
            continue;
        }
        if let Some(stem) = name.strip_suffix(".stats.json") {
            let stats = read_json_object(&entry.path())?;
            shards.entry(format!("{stem}.tar")).or_default().stats = Some(Value::Object(stats));
        } else if name.ends_with(".tar") {
            let meta = entry
                .metadata()
                .with_context(|| format!("{}: cannot stat", entry.path().display()))?;
            shards.entry(name).or_default().bytes = Some(meta.len());
        }
    }
    for shard in records.iter().filter_map(|r| r.shard.as_ref()) {
        shards.entry(shard.clone()).or_default().indexed += 1;
    }
    Ok(shards)
}

/// The thumbnails of one record, by role.
type Thumbs = BTreeMap<Role, Thumb>;

struct Thumb {
    uri: String,
    width: u32,
    height: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Subject,
    Source,
    Target,
    SubjectMask,
    TargetMask,
}

impl Role {
    const ALL: [Role; 5] = [
        Role::Subject,
        Role::Source,
        Role::Target,
        Role::SubjectMask,
        Role::TargetMask,
    ];

    fn suffix(self) -> &'static str {
        match self {
            Role::Subject => member::SUBJECT,
            Role::Source => member::SOURCE,
            Role::Target => member::TARGET,
            Role::SubjectMask => member::SUBJECT_MASK,
            Role::TargetMask => member::TARGET_MASK,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Role::Subject => "subject",
            Role::Source => "source",
            Role::Target => "target",
            Role::SubjectMask => "subject mask",
            Role::TargetMask => "target mask",
        }
    }

    fn is_mask(self) -> bool {
        matches!(self, Role::SubjectMask | Role::TargetMask)
    }
}

/// Reads the images of `keys` from one shard (WebDataset: `KEY.role.png`) as thumbnails.
fn read_shard(path: &Path, keys: &HashSet<&str>) -> Result<HashMap<String, Thumbs>> {
    let corrupt = || format!("{}: corrupt shard", path.display());
    let file = File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut archive = tar::Archive::new(BufReader::new(file));
    let mut found: HashMap<String, Thumbs> = HashMap::new();
    for entry in archive.entries_with_seek().with_context(corrupt)? {
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
        let Some((key, suffix)) = base.split_once('.') else {
            continue;
        };
        let Some(role) = Role::ALL.into_iter().find(|r| r.suffix() == suffix) else {
            continue;
        };
        if !keys.contains(key) {
            continue;
        }
        let size = entry.size();
        if size > MAX_MEMBER_BYTES {
            bail!(
                "{}: member {name}: {size} bytes is too large for an image",
                path.display()
            );
        }
        let mut bytes = Vec::with_capacity(size as usize);
        entry
            .read_to_end(&mut bytes)
            .with_context(|| format!("{}: corrupt shard: member {name}", path.display()))?;
        let thumb = thumbnail(&bytes, role.is_mask())
            .with_context(|| format!("{}: member {name}", path.display()))?;
        found
            .entry(key.to_string())
            .or_default()
            .insert(role, thumb);
    }
    Ok(found)
}

/// Decodes an image, downscales it to at most [`THUMB_PX`] on the long side and re-encodes it as a
/// PNG data URI (masks as 8-bit grey, which compresses to almost nothing).
fn thumbnail(bytes: &[u8], mask: bool) -> Result<Thumb> {
    let img = image::load_from_memory(bytes).context("cannot decode the image")?;
    let (width, height) = (img.width(), img.height());
    let img = match width.max(height) > THUMB_PX {
        true => img.resize(THUMB_PX, THUMB_PX, image::imageops::FilterType::Triangle),
        false => img,
    };
    let img = if mask {
        DynamicImage::ImageLuma8(img.to_luma8())
    } else if img.color().has_alpha() {
        DynamicImage::ImageRgba8(img.to_rgba8())
    } else {
        DynamicImage::ImageRgb8(img.to_rgb8())
    };
    let mut png = Vec::new();
    let encoder =
        PngEncoder::new_with_quality(&mut png, CompressionType::Best, PngFilter::Adaptive);
    img.write_with_encoder(encoder)
        .context("cannot encode the thumbnail")?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    Ok(Thumb {
        uri: format!("data:image/png;base64,{b64}"),
        width,
        height,
    })
}

// ---------------------------------------------------------------------------------------------
// Choosing what the contact sheets show

/// Up to `cap` kept (or rejected) records, spread evenly over the groups (taxonomy for kept
/// records, rejection reason for rejected ones) and, within a group, evenly over the index order.
/// Rejected records are taken from those written to shards when there are any (`--keep-rejected`),
/// so the sheet has pictures; otherwise from all of them, shown without pictures.
fn sample_sheet(records: &[Record], kept: bool, cap: usize) -> Vec<&Record> {
    let mut pool: Vec<(usize, &Record)> = records
        .iter()
        .enumerate()
        .filter(|(_, r)| r.kept == kept)
        .collect();
    if pool.iter().any(|(_, r)| r.shard.is_some()) {
        pool.retain(|(_, r)| r.shard.is_some());
    }
    let group = |r: &Record| match kept {
        true => r.taxonomy.clone().unwrap_or_default(),
        false => r.reason.clone().unwrap_or_default(),
    };
    let mut groups: BTreeMap<String, Vec<(usize, &Record)>> = BTreeMap::new();
    for (i, r) in pool {
        groups.entry(group(r)).or_default().push((i, r));
    }
    let quotas = round_robin_quotas(&groups.values().map(Vec::len).collect::<Vec<_>>(), cap);
    let mut chosen: Vec<(usize, &Record)> = Vec::new();
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

// ---------------------------------------------------------------------------------------------
// The page

const CSS: &str = r#"
body{font:14px/1.45 "DejaVu Sans","Liberation Sans",Helvetica,Arial,sans-serif;margin:24px 32px;color:#1d232a;background:#fff}
h1{font-size:24px;margin:0}
h2{font-size:17px;margin:30px 0 10px;padding-bottom:4px;border-bottom:1px solid #dde2e6}
.sub{color:#5b6670;font-size:12.5px;margin:2px 0 14px;word-break:break-all}
.totals{display:flex;flex-wrap:wrap;gap:10px}
.tot{border:1px solid #dde2e6;border-radius:6px;padding:7px 14px;min-width:104px}
.tot b{display:block;font-size:20px}
.tot span{color:#5b6670;font-size:12px}
.warn{background:#fff5e6;border:1px solid #f0b45a;border-radius:6px;padding:8px 12px;margin:12px 0}
.row{display:flex;flex-wrap:wrap;gap:18px 36px;align-items:flex-start}
figure{margin:0}
figcaption{font-size:12px;color:#5b6670}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #dde2e6;padding:3px 9px;text-align:right}
th:first-child,td:first-child{text-align:left}
th{background:#f3f5f7}
tr.missing td{background:#fdecea}
.legend{display:flex;flex-wrap:wrap;gap:4px 16px;font-size:12.5px;margin-top:6px}
.sw{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(580px,1fr));gap:12px}
.card{border:1px solid #dde2e6;border-radius:6px;padding:8px 10px}
.card.rej{background:#fcf8f7;border-color:#ecd3cf}
.strip{display:flex;gap:6px}
.strip figure{text-align:center}
.strip figcaption{font-size:10.5px}
img.t,.none{width:104px;height:104px;object-fit:contain;background:#eceff1;display:block}
.none{display:flex;align-items:center;justify-content:center;font-size:11px;color:#8a949c;text-align:center}
.prompt{margin:6px 0 2px;font-size:13.5px}
.meta{color:#5b6670;font-size:12px}
.fail{color:#b3261e;font-weight:bold}
.note{color:#5b6670;font-size:12.5px}
"#;

fn render(
    run: &Run,
    kept: &[&Record],
    rejected: &[&Record],
    thumbs: &HashMap<String, Thumbs>,
) -> String {
    let mut h = String::with_capacity(1 << 20);
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n");
    h.push_str("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">\n");
    h.push_str("<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\n");
    h.push_str("<title>toffee pairs report</title>\n<style>");
    h.push_str(CSS);
    h.push_str("</style></head>\n<body>\n");
    render_header(&mut h, run);
    render_histograms(&mut h, run);
    render_tables(&mut h, run);
    render_stages(&mut h, run);
    let missing: HashSet<String> = run.missing_shards().into_iter().collect();
    let n_kept = run.records.iter().filter(|r| r.kept).count();
    let kept_title = format!("Kept pairs ({} of {} shown)", kept.len(), n_kept);
    render_sheet(&mut h, run, &kept_title, kept, thumbs, &missing);
    let rej_title = format!(
        "Rejected pairs ({} of {} shown)",
        rejected.len(),
        run.records.len() - n_kept
    );
    render_sheet(&mut h, run, &rej_title, rejected, thumbs, &missing);
    render_shards(&mut h, run);
    h.push_str("</body></html>\n");
    h
}

fn render_header(h: &mut String, run: &Run) {
    let index_kept = run.records.iter().filter(|r| r.kept).count();
    let records = run.stat("records").unwrap_or(run.records.len() as f64);
    let kept = run.stat("kept").unwrap_or(index_kept as f64);
    let rejected = run.stat("rejected").unwrap_or(records - kept);
    let ratio = if records > 0.0 {
        format!("{:.1}%", 100.0 * kept / records)
    } else {
        "—".into()
    };
    let job = |k: &str| run.job.as_ref().and_then(|j| j.get(k)).map(value_text);
    let shards = job("num_shards")
        .or_else(|| job("shards"))
        .unwrap_or_else(|| run.shards.len().to_string());
    let device = run
        .stats
        .get("device")
        .map(value_text)
        .unwrap_or_else(|| "—".into());
    let _ = writeln!(h, "<h1>toffee pairs report</h1>");
    let version = job("toffee_version")
        .map(|v| format!(" · toffee {}", esc(&v)))
        .unwrap_or_default();
    let _ = writeln!(h, "<div class=\"sub\">{}{version}</div>", esc(&run.dir));
    h.push_str("<div class=\"totals\">\n");
    let tiles = [
        ("records", count_text(records)),
        ("kept", count_text(kept)),
        ("rejected", count_text(rejected)),
        ("kept ratio", ratio),
        (
            "pairs / hour",
            run.stat("pairs_per_hour")
                .map(count_text)
                .unwrap_or_else(|| "—".into()),
        ),
        ("device", device),
        (
            "wall time",
            run.stat("seconds")
                .map(duration_text)
                .unwrap_or_else(|| "—".into()),
        ),
        // Summed over the shards: more than the wall time when processes worked side by side.
        (
            "work time",
            run.stat("work_seconds")
                .map(duration_text)
                .unwrap_or_else(|| "—".into()),
        ),
        ("shards", shards),
    ];
    for (label, value) in tiles {
        let _ = writeln!(
            h,
            "<div class=\"tot\"><b>{}</b><span>{label}</span></div>",
            esc(&value)
        );
    }
    h.push_str("</div>\n");
    if let (Some(done), Some(all)) = (run.stat("shards_finished"), run.stat("shards_expected")) {
        if done < all {
            let _ = writeln!(
                h,
                "<div class=\"warn\"><b>Partial: {} of {} shards finished.</b> The numbers below \
                 cover the finished shards only (a run in progress or stopped: rerun it; one \
                 process of several: merge when all are done).</div>",
                count_text(done),
                count_text(all)
            );
        }
    }
    if records != run.records.len() as f64 {
        let _ = writeln!(
            h,
            "<div class=\"warn\">index.jsonl lists {} records; stats.json counts {} (a job still running, or an unmerged folder).</div>",
            run.records.len(),
            count_text(records)
        );
    }
    let missing = run.missing_shards();
    if !missing.is_empty() {
        let names: Vec<String> = missing.iter().map(|m| esc(m)).collect();
        let _ = writeln!(
            h,
            "<div class=\"warn\"><b>{} missing shard{}:</b> {} — named by index.jsonl or a shard stats file, but not in the folder; their records are shown without pictures.</div>",
            missing.len(),
            if missing.len() == 1 { "" } else { "s" },
            names.join(", ")
        );
    }
}

fn render_histograms(h: &mut String, run: &Run) {
    h.push_str("<h2>Scores</h2>\n<div class=\"row\">\n");
    for (key, label) in SCORES {
        let values: Vec<f64> = run.records.iter().filter_map(|r| r.score(key)).collect();
        h.push_str(&histogram_svg(label, &values, run.threshold(key)));
    }
    h.push_str(
        "</div>\n<p class=\"note\">All scored records in index.jsonl, kept and rejected. \
        Raw cosines; bars below the threshold are grey.</p>\n",
    );
}

/// A histogram of `values` as inline SVG, with the threshold as a dashed vertical line.
fn histogram_svg(label: &str, values: &[f64], threshold: Option<f64>) -> String {
    let (w, ht) = (380.0, 190.0);
    let (left, right, top, bottom) = (34.0, 12.0, 36.0, 30.0);
    let (pw, ph) = (w - left - right, ht - top - bottom);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<figure><svg width=\"{w}\" height=\"{ht}\" viewBox=\"0 0 {w} {ht}\" role=\"img\" aria-label=\"{label} histogram\">"
    );
    let _ = writeln!(
        s,
        "<text x=\"{left}\" y=\"14\" font-size=\"13\" font-weight=\"bold\">{label}</text>"
    );
    if values.is_empty() {
        let _ = writeln!(s, "<text x=\"{left}\" y=\"{}\" font-size=\"12\" fill=\"#5b6670\">no scored records</text>", top + ph / 2.0);
    } else {
        let (lo, hi) = histogram_range(values, threshold);
        let mut bins = [0usize; HIST_BINS];
        for &v in values {
            let b = ((v - lo) / (hi - lo) * HIST_BINS as f64).floor();
            bins[(b.max(0.0) as usize).min(HIST_BINS - 1)] += 1;
        }
        let max = *bins.iter().max().unwrap_or(&1) as f64;
        let bw = pw / HIST_BINS as f64;
        let x_of = |v: f64| left + (v - lo) / (hi - lo) * pw;
        for (i, &n) in bins.iter().enumerate().filter(|(_, n)| **n > 0) {
            let centre = lo + (i as f64 + 0.5) / HIST_BINS as f64 * (hi - lo);
            let fill = match threshold {
                Some(t) if centre < t => BAR_FAIL,
                _ => BAR_PASS,
            };
            let bh = (n as f64 / max * ph).max(1.0);
            let _ = writeln!(
                s,
                "<rect class=\"bar\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{fill}\"><title>{n}</title></rect>",
                left + i as f64 * bw + 0.5,
                top + ph - bh,
                (bw - 1.0).max(0.5),
                bh
            );
        }
        let base = top + ph;
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\" stroke=\"#5b6670\"/>",
            left + pw
        );
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"end\" fill=\"#5b6670\">{max}</text>", left - 4.0, top + 8.0);
        for v in [lo, (lo + hi) / 2.0, hi] {
            let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\" fill=\"#5b6670\">{v:.2}</text>", x_of(v), base + 13.0);
        }
        if let Some(t) = threshold {
            let x = x_of(t);
            let _ = writeln!(
                s,
                "<line class=\"threshold\" data-threshold=\"{t:.3}\" x1=\"{x:.1}\" y1=\"{}\" x2=\"{x:.1}\" y2=\"{base}\" stroke=\"{THRESHOLD_STROKE}\" stroke-width=\"2\" stroke-dasharray=\"5 3\"/>",
                top - 4.0
            );
            // The label sits above the bars, between the title line and the plot.
            let anchor = if x > left + pw * 0.7 { "end" } else { "start" };
            let dx = if anchor == "end" { -4.0 } else { 4.0 };
            let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{}\" font-size=\"10.5\" text-anchor=\"{anchor}\" fill=\"{THRESHOLD_STROKE}\">threshold {t:.3}</text>", x + dx, top - 8.0);
        }
    }
    s.push_str("</svg>");
    let below = threshold.map(|t| values.iter().filter(|&&v| v < t).count());
    let caption = match below {
        Some(b) => format!("{} scored · {} below the threshold", values.len(), b),
        None => format!("{} scored · no threshold in stats.json", values.len()),
    };
    let _ = writeln!(s, "<figcaption>{caption}</figcaption></figure>");
    s
}

/// The x range: the values and the threshold, padded a little; never empty.
fn histogram_range(values: &[f64], threshold: Option<f64>) -> (f64, f64) {
    let mut lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let mut hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if let Some(t) = threshold.filter(|t| t.is_finite()) {
        lo = lo.min(t);
        hi = hi.max(t);
    }
    let pad = ((hi - lo) * 0.04).max(0.02);
    (lo - pad, hi + pad)
}

fn render_tables(h: &mut String, run: &Run) {
    h.push_str("<h2>Rejections and skipped subjects</h2>\n<div class=\"row\">\n");
    let mut from_index = Map::new();
    for r in run.records.iter().filter(|r| !r.kept) {
        let reason = r.reason.clone().unwrap_or_else(|| "(none)".into());
        let n = from_index.get(&reason).and_then(Value::as_u64).unwrap_or(0);
        from_index.insert(reason, Value::from(n + 1));
    }
    let rejections = run.stats.get("rejections").and_then(Value::as_object);
    let rejections = ordered_counts(
        rejections.unwrap_or(&from_index),
        &["dino", "clip_i", "clip_t"],
    );
    let total: f64 = rejections.iter().map(|(_, n)| n).sum();
    h.push_str("<table><tr><th>rejected by</th><th>records</th><th>share</th></tr>\n");
    for (reason, n) in &rejections {
        let share = if total > 0.0 {
            format!("{:.1}%", 100.0 * n / total)
        } else {
            "—".into()
        };
        let name = SCORES
            .iter()
            .find(|(k, _)| k == reason)
            .map(|(_, l)| l.to_string())
            .unwrap_or_else(|| reason.clone());
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{share}</td></tr>",
            esc(&name),
            count_text(*n)
        );
    }
    h.push_str("</table>\n");
    let skipped = run.stats.get("skipped_subjects").and_then(Value::as_object);
    h.push_str("<table><tr><th>skipped</th><th>count</th></tr>\n");
    if skipped.is_none() {
        h.push_str("<tr><td>not in stats.json</td><td>—</td></tr>\n");
    }
    for (why, n) in skipped
        .map(|m| ordered_counts(m, &["unreadable", "mask_size"]))
        .unwrap_or_default()
    {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td></tr>",
            esc(&format!("subjects: {}", why.replace('_', " "))),
            count_text(n)
        );
    }
    if let Some(n) = run.stat("skipped_records") {
        let _ = writeln!(
            h,
            "<tr><td>records: skipped</td><td>{}</td></tr>",
            count_text(n)
        );
    }
    h.push_str("</table>\n");
    render_taxonomy(h, run);
    h.push_str("</div>\n");
}

/// Counts in `first` order, then any other keys in the file's order.
fn ordered_counts(map: &Map<String, Value>, first: &[&str]) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = first
        .iter()
        .map(|k| {
            (
                k.to_string(),
                map.get(*k).and_then(Value::as_f64).unwrap_or(0.0),
            )
        })
        .collect();
    for (k, v) in map.iter().filter(|(k, _)| !first.contains(&k.as_str())) {
        out.push((k.clone(), v.as_f64().unwrap_or(0.0)));
    }
    out
}

fn render_taxonomy(h: &mut String, run: &Run) {
    let mut rows: BTreeMap<String, [usize; 3]> = BTreeMap::new();
    for r in &run.records {
        let row = rows
            .entry(r.taxonomy.clone().unwrap_or_else(|| "—".into()))
            .or_default();
        row[0] += 1;
        row[1] += r.kept as usize;
        row[2] += (r.kept && r.edit == Some(true)) as usize;
    }
    h.push_str("<table><tr><th>taxonomy</th><th>records</th><th>kept</th><th>kept %</th><th>kept with edit pair</th></tr>\n");
    for (taxonomy, [n, kept, edit]) in rows {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{n}</td><td>{kept}</td><td>{:.1}%</td><td>{edit}</td></tr>",
            esc(&taxonomy),
            100.0 * kept as f64 / n.max(1) as f64
        );
    }
    h.push_str("</table>\n");
}

fn render_stages(h: &mut String, run: &Run) {
    h.push_str("<h2>Time per stage</h2>\n");
    let stages = run.stats.get("stage_seconds").and_then(Value::as_object);
    let stages: Vec<(String, f64)> = stages
        .map(|m| ordered_counts(m, &STAGES))
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, s)| s.is_finite() && *s > 0.0)
        .collect();
    let total: f64 = stages.iter().map(|(_, s)| s).sum();
    if total <= 0.0 {
        h.push_str("<p class=\"note\">No stage timings in stats.json.</p>\n");
        return;
    }
    let (w, ht) = (900.0, 30.0);
    let _ = writeln!(h, "<svg width=\"{w}\" height=\"{ht}\" viewBox=\"0 0 {w} {ht}\" role=\"img\" aria-label=\"time per stage\">");
    let mut x = 0.0;
    let mut legend = String::new();
    for (i, (stage, secs)) in stages.iter().enumerate() {
        let colour = STAGE_COLOURS[i % STAGE_COLOURS.len()];
        let share = secs / total;
        let sw = share * w;
        let name = esc(stage);
        let _ = writeln!(h, "<rect class=\"stage\" x=\"{x:.1}\" y=\"0\" width=\"{sw:.1}\" height=\"{ht}\" fill=\"{colour}\"><title>{name}: {:.1}%</title></rect>", share * 100.0);
        if sw > 70.0 {
            let _ = writeln!(
                h,
                "<text x=\"{:.1}\" y=\"19\" font-size=\"12\" fill=\"#fff\">{name} {:.0}%</text>",
                x + 6.0,
                share * 100.0
            );
        }
        let _ = write!(legend, "<span><span class=\"sw\" style=\"background:{colour}\"></span>{name} {:.1}% ({})</span>", share * 100.0, duration_text(*secs));
        x += sw;
    }
    h.push_str("</svg>\n");
    let _ = writeln!(h, "<div class=\"legend\">{legend}</div>");
    let _ = writeln!(
        h,
        "<p class=\"note\">Shares of the summed stage time ({}).</p>",
        duration_text(total)
    );
}

fn render_sheet(
    h: &mut String,
    run: &Run,
    title: &str,
    records: &[&Record],
    thumbs: &HashMap<String, Thumbs>,
    missing: &HashSet<String>,
) {
    let _ = writeln!(h, "<h2>{}</h2>", esc(title));
    if records.is_empty() {
        h.push_str("<p class=\"note\">None.</p>\n");
        return;
    }
    if records.iter().all(|r| r.shard.is_none()) {
        h.push_str("<p class=\"note\">Their images were not written (run with --keep-rejected to keep them in the shards).</p>\n");
    }
    h.push_str("<div class=\"sheet\">\n");
    for r in records {
        let class = if r.kept { "card" } else { "card rej" };
        let _ = writeln!(h, "<div class=\"{class}\">");
        render_strip(h, r, thumbs.get(&r.key), missing);
        let _ = writeln!(
            h,
            "<div class=\"prompt\">{}</div>",
            esc(r.prompt.as_deref().unwrap_or("—"))
        );
        render_scores(h, run, r);
        let mut meta = vec![format!("key {}", r.key)];
        meta.extend(r.subject.as_ref().map(|s| format!("subject {s}")));
        meta.extend(r.taxonomy.clone());
        meta.extend(r.template.as_ref().map(|t| format!("template {t}")));
        meta.extend(r.seed.as_ref().map(|s| format!("seed {}", value_text(s))));
        let _ = writeln!(h, "<div class=\"meta\">{}</div>", esc(&meta.join(" · ")));
        h.push_str("</div>\n");
    }
    h.push_str("</div>\n");
}

fn render_strip(h: &mut String, r: &Record, thumbs: Option<&Thumbs>, missing: &HashSet<String>) {
    if r.shard.is_none() {
        return; // not written: the sheet says so once, above the cards
    }
    h.push_str("<div class=\"strip\">");
    let why_none = match &r.shard {
        None => "not written",
        Some(s) if missing.contains(s) => "shard missing",
        Some(_) => "not in shard",
    };
    for role in Role::ALL {
        let thumb = thumbs.and_then(|t| t.get(&role));
        if role == Role::Source && thumb.is_none() {
            continue;
        }
        let label = role.label();
        match thumb {
            Some(t) => {
                let _ = write!(
                    h,
                    "<figure><img class=\"t\" alt=\"{label}\" title=\"{label} {}×{}\" src=\"{}\"><figcaption>{label}</figcaption></figure>",
                    t.width, t.height, t.uri
                );
            }
            None => {
                let _ = write!(h, "<figure><div class=\"none\">{why_none}</div><figcaption>{label}</figcaption></figure>");
            }
        }
    }
    h.push_str("</div>\n");
}

fn render_scores(h: &mut String, run: &Run, r: &Record) {
    let mut parts = Vec::new();
    for (key, label) in SCORES {
        let text = match r.score(key) {
            Some(v) => {
                let fails = run.threshold(key).is_some_and(|t| v < t);
                let class = if fails { " class=\"fail\"" } else { "" };
                format!("{label} <span{class}>{v:.3}</span>")
            }
            None => format!("{label} —"),
        };
        parts.push(text);
    }
    if let Some(reason) = r.reason.as_ref().filter(|_| !r.kept) {
        parts.push(format!("rejected by <b>{}</b>", esc(reason)));
    }
    let _ = writeln!(h, "<div class=\"meta\">{}</div>", parts.join(" · "));
}

fn render_shards(h: &mut String, run: &Run) {
    h.push_str("<h2>Shards</h2>\n");
    if run.shards.is_empty() {
        h.push_str("<p class=\"note\">No shards yet.</p>\n");
        return;
    }
    h.push_str("<table><tr><th>shard</th><th>size</th><th>records</th><th>kept</th><th>in index.jsonl</th></tr>\n");
    for (name, shard) in run.shards.iter().take(MAX_SHARD_ROWS) {
        let stat = |k: &str| {
            shard
                .stats
                .as_ref()
                .and_then(|s| s.get(k))
                .and_then(Value::as_f64)
                .map(count_text)
                .unwrap_or_else(|| "—".into())
        };
        let (class, size) = match shard.bytes {
            Some(b) => ("", bytes_text(b)),
            None if shard.indexed == 0 && shard.stats.is_some() => {
                ("", "no tar (no record written)".into())
            }
            None => (" class=\"missing\"", "missing".into()),
        };
        let _ = writeln!(
            h,
            "<tr{class}><td>{}</td><td>{size}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(name),
            stat("records"),
            stat("kept"),
            shard.indexed
        );
    }
    h.push_str("</table>\n");
    if run.shards.len() > MAX_SHARD_ROWS {
        let _ = writeln!(
            h,
            "<p class=\"note\">… and {} more shards.</p>",
            run.shards.len() - MAX_SHARD_ROWS
        );
    }
    let unfinished: BTreeSet<&String> = run
        .shards
        .iter()
        .filter(|(_, s)| s.stats.is_none() && s.bytes.is_some())
        .map(|(n, _)| n)
        .collect();
    if !unfinished.is_empty() {
        let _ = writeln!(
            h,
            "<p class=\"note\">{} shard(s) without a .stats.json (not yet finished).</p>",
            unfinished.len()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Text

/// Escapes text for HTML element content and quoted attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A JSON value as plain text (strings without their quotes).
fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// A count with thousands separators (rounded).
fn count_text(n: f64) -> String {
    if !n.is_finite() {
        return "—".into();
    }
    let digits = format!("{:.0}", n.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < -0.5 {
        out.insert(0, '-');
    }
    out
}

fn bytes_text(b: u64) -> String {
    match b as f64 {
        b if b < 1e3 => format!("{b} B"),
        b if b < 1e6 => format!("{:.1} kB", b / 1e3),
        b if b < 1e9 => format!("{:.1} MB", b / 1e6),
        b => format!("{:.2} GB", b / 1e9),
    }
}

fn duration_text(secs: f64) -> String {
    match secs {
        s if !s.is_finite() => "—".into(),
        s if s < 120.0 => format!("{s:.1} s"),
        s if s < 7200.0 => format!("{:.1} min", s / 60.0),
        s => format!("{:.2} h", s / 3600.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc("<script>a&b</script>\"'"),
            "&lt;script&gt;a&amp;b&lt;/script&gt;&quot;&#39;"
        );
    }

    #[test]
    fn samples_spread_over_groups_and_stay_in_bounds() {
        assert_eq!(round_robin_quotas(&[1, 10, 10], 6), vec![1, 3, 2]);
        assert_eq!(round_robin_quotas(&[2, 1], 10), vec![2, 1]);
        assert_eq!(evenly_spaced(10, 2).collect::<Vec<_>>(), vec![2, 7]);
        assert_eq!(evenly_spaced(3, 5).collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    #[test]
    fn counts_and_durations_read_well() {
        assert_eq!(count_text(1234567.0), "1,234,567");
        assert_eq!(count_text(999.4), "999");
        assert_eq!(duration_text(90.0), "90.0 s");
        assert_eq!(duration_text(7200.0), "2.00 h");
    }
}
