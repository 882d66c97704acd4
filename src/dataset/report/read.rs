//! Reading a run folder for the report, through `format`'s types: the index, the stats, the job
//! and the shards' thumbnails.

use super::super::format::{self, member, IndexLine, JobFile, Stats};
use super::{MAX_MEMBER_BYTES, THUMB_PX};
use anyhow::{bail, Context, Result};
use base64::Engine as _;
use image::codecs::png::{CompressionType, FilterType as PngFilter, PngEncoder};
use image::DynamicImage;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::Path;

/// A record's score by name, when finite.
pub(super) fn score(r: &IndexLine, name: &str) -> Option<f64> {
    let s = &r.scores;
    let v = match name {
        "dino" => s.dino,
        "clip_i" => s.clip_i,
        "clip_t" => s.clip_t,
        _ => return None,
    };
    Some(v as f64).filter(|v| v.is_finite())
}

/// The shard a record is in; None when it was not written.
pub(super) fn shard_of(r: &IndexLine) -> Option<&str> {
    Some(r.shard.as_str()).filter(|s| !s.is_empty())
}

/// A shard as the folder and the index see it.
#[derive(Debug, Default)]
pub(super) struct Shard {
    /// Size of the tar, `None` when it is not in the folder.
    pub(super) bytes: Option<u64>,
    /// Its `.stats.json` (written once the shard is committed).
    pub(super) stats: Option<Stats>,
    /// Records `index.jsonl` places in it.
    pub(super) indexed: usize,
}

/// The folder, read through `format`'s types.
pub(super) struct Run {
    pub(super) dir: String,
    pub(super) stats: Stats,
    pub(super) job: Option<JobFile>,
    pub(super) records: Vec<IndexLine>,
    pub(super) shards: BTreeMap<String, Shard>,
}

impl Run {
    pub(super) fn load(dir: &Path) -> Result<Run> {
        let stats = format::read_stats(&dir.join(format::STATS_FILE))?;
        let index = dir.join(format::INDEX_FILE);
        let records = format::read_index(&index)?;
        for (i, r) in records.iter().enumerate() {
            if shard_of(r).is_some_and(|s| !is_plain_file_name(s)) {
                bail!(
                    "{}: line {}: shard {:?} is not a file name",
                    index.display(),
                    i + 1,
                    r.shard
                );
            }
        }
        let job = match dir.join(format::JOB_FILE).exists() {
            true => Some(format::read_job(dir)?),
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

    pub(super) fn missing_shards(&self) -> Vec<String> {
        self.shards
            .iter()
            // A done shard that wrote no record has no tar, and that is not missing.
            .filter(|(_, s)| s.bytes.is_none() && (s.indexed > 0 || s.stats.is_none()))
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub(super) fn threshold(&self, score: &str) -> Option<f64> {
        self.stats.thresholds.get(score).map(|&t| t as f64)
    }
}

/// The shard field names a file inside the folder; anything else would read outside it.
pub(super) fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\'])
}

/// Every shard the folder holds (`pairs-*.tar`, `pairs-*.stats.json`) or the index names.
pub(super) fn scan_shards(dir: &Path, records: &[IndexLine]) -> Result<BTreeMap<String, Shard>> {
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
            let stats = format::read_stats(&entry.path())?;
            shards.entry(format!("{stem}.tar")).or_default().stats = Some(stats);
        } else if name.ends_with(".tar") {
            let meta = entry
                .metadata()
                .with_context(|| format!("{}: cannot stat", entry.path().display()))?;
            shards.entry(name).or_default().bytes = Some(meta.len());
        }
    }
    for shard in records.iter().filter_map(shard_of) {
        shards.entry(shard.to_string()).or_default().indexed += 1;
    }
    Ok(shards)
}

/// The thumbnails of one record, by role.
pub(super) type Thumbs = BTreeMap<Role, Thumb>;

pub(super) struct Thumb {
    pub(super) uri: String,
    pub(super) width: u32,
    pub(super) height: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Role {
    Subject,
    Source,
    Target,
    SubjectMask,
    TargetMask,
}

impl Role {
    pub(super) const ALL: [Role; 5] = [
        Role::Subject,
        Role::Source,
        Role::Target,
        Role::SubjectMask,
        Role::TargetMask,
    ];

    pub(super) fn suffix(self) -> &'static str {
        match self {
            Role::Subject => member::SUBJECT,
            Role::Source => member::SOURCE,
            Role::Target => member::TARGET,
            Role::SubjectMask => member::SUBJECT_MASK,
            Role::TargetMask => member::TARGET_MASK,
        }
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            Role::Subject => "subject",
            Role::Source => "source",
            Role::Target => "target",
            Role::SubjectMask => "subject mask",
            Role::TargetMask => "target mask",
        }
    }

    pub(super) fn is_mask(self) -> bool {
        matches!(self, Role::SubjectMask | Role::TargetMask)
    }
}

/// Reads the images of `keys` from one shard (WebDataset: `KEY.role.png`) as thumbnails.
pub(super) fn read_shard(path: &Path, keys: &HashSet<&str>) -> Result<HashMap<String, Thumbs>> {
    let mut found: HashMap<String, Thumbs> = HashMap::new();
    format::for_each_member(path, |key, suffix, entry| {
        let Some(role) = Role::ALL.into_iter().find(|r| r.suffix() == suffix) else {
            return Ok(());
        };
        if !keys.contains(key) {
            return Ok(());
        }
        let name = format!("{key}.{suffix}");
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
        Ok(())
    })?;
    Ok(found)
}

/// Decodes an image, downscales it to at most [`THUMB_PX`] on the long side and re-encodes it as a
/// PNG data URI (masks as 8-bit grey, which compresses to almost nothing).
pub(super) fn thumbnail(bytes: &[u8], mask: bool) -> Result<Thumb> {
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
