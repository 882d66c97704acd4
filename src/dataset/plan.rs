//! Subjects in, a fixed list of records out: which subject, which prompt, which seed, which key,
//! which shard. Everything is a pure function of the inputs and the config, so every process of
//! a job array computes the same plan and takes a disjoint slice of it.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where a subject comes from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum SubjectSource {
    /// An image file; its mask is `mask` if given, else its alpha channel, else the whole image.
    File {
        image: PathBuf,
        mask: Option<PathBuf>,
    },
    /// One of the built-in procedurally drawn subjects.
    Builtin(usize),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Subject {
    pub name: String,
    /// The noun that replaces `{subject}` in templates.
    pub category: String,
    pub source: SubjectSource,
}

/// One line of a `--subjects` JSONL file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubjectLine {
    image: PathBuf,
    #[serde(default)]
    mask: Option<PathBuf>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    category: Option<String>,
}

/// The noun a subject name stands for: `_` and `-` as spaces.
pub fn noun_of(name: &str) -> String {
    name.replace(['_', '-'], " ").trim().to_string()
}

/// A folder of subject images (PNG / JPEG, sorted by file name; `NAME.mask.png` files are the
/// masks of `NAME.*`), or a JSONL file of {"image", "mask"?, "name"?, "category"?} (paths
/// relative to the file).
pub fn read_subjects(path: &Path) -> Result<Vec<Subject>> {
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("{}: cannot list", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().to_lowercase())
                    .unwrap_or_default();
                !name.ends_with(".mask.png")
                    && (name.ends_with(".png") || name.ends_with(".jpg") || name.ends_with(".jpeg"))
            })
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("{}: no PNG or JPEG subject images", path.display());
        }
        let subjects: Vec<Subject> = files
            .into_iter()
            .map(|f| {
                let stem = f
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let mask = f.with_file_name(format!("{stem}.mask.png"));
                Subject {
                    category: noun_of(&stem),
                    name: stem,
                    source: SubjectSource::File {
                        image: f,
                        mask: mask.is_file().then_some(mask),
                    },
                }
            })
            .collect();
        check_unique_names(path, &subjects)?;
        return Ok(subjects);
    }
    let text = crate::input::read_to_string(path)
        .with_context(|| format!("{}: cannot read the subjects", path.display()))?;
    let base = path.parent().unwrap_or(Path::new(""));
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: SubjectLine = serde_json::from_str(line).with_context(|| {
            format!(
                "{}:{}: expected {{\"image\", \"mask\"?, \"name\"?, \"category\"?}}",
                path.display(),
                i + 1
            )
        })?;
        let name = l.name.unwrap_or_else(|| {
            l.image
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        out.push(Subject {
            category: l.category.unwrap_or_else(|| noun_of(&name)),
            name,
            source: SubjectSource::File {
                image: base.join(l.image),
                mask: l.mask.map(|m| base.join(m)),
            },
        });
    }
    if out.is_empty() {
        bail!("{}: no subjects", path.display());
    }
    check_unique_names(path, &out)?;
    Ok(out)
}

/// Subject names key the records and name their files, so two subjects may not share one, also
/// not in another case (`Cup.png` and `cup.jpg` would collide on a case-insensitive disk) or
/// after decoding (two non-UTF-8 file names that read as the same text).
fn check_unique_names(origin: &Path, subjects: &[Subject]) -> Result<()> {
    let mut seen: std::collections::HashMap<String, &Subject> = std::collections::HashMap::new();
    for s in subjects {
        if s.name.trim().is_empty() {
            bail!("{}: a subject has an empty name", origin.display());
        }
        if s.category.trim().is_empty() {
            bail!(
                "{}: subject `{}` has an empty category (its prompts would name nothing)",
                origin.display(),
                s.name
            );
        }
        if let Some(first) = seen.insert(s.name.to_lowercase(), s) {
            let what = |s: &Subject| match &s.source {
                SubjectSource::File { image, .. } => format!("`{}` ({})", s.name, image.display()),
                SubjectSource::Builtin(_) => format!("`{}`", s.name),
            };
            bail!(
                "{}: subjects {} and {} have the same name (names key the records; rename one)",
                origin.display(),
                what(first),
                what(s)
            );
        }
    }
    Ok(())
}

/// A prompt template and its place in Toffee-5M's taxonomy.
#[derive(Clone, Debug, PartialEq)]
pub struct Template {
    pub taxonomy: String,
    pub text: String,
}

/// The built-in templates: background, style, colour and texture changes, as in Toffee-5M.
pub fn builtin_templates() -> Vec<Template> {
    let t = |taxonomy: &str, text: &str| Template {
        taxonomy: taxonomy.into(),
        text: text.into(),
    };
    vec![
        t("background", "a photo of a {subject} on a sandy beach"),
        t("background", "a {subject} on a wooden kitchen table"),
        t("background", "a {subject} in the snow"),
        t("background", "a {subject} in a forest clearing"),
        t("background", "a {subject} on a city street at night"),
        t("background", "a {subject} on a shelf in a living room"),
        t("style", "a watercolor painting of a {subject}"),
        t("style", "a pencil sketch of a {subject}"),
        t("style", "an oil painting of a {subject}"),
        t("style", "a {subject} in the style of a cartoon"),
        t("colour", "a red {subject}"),
        t("colour", "a blue {subject}"),
        t("colour", "a golden {subject}"),
        t("colour", "a purple {subject}"),
        t("texture", "a {subject} made of wood"),
        t("texture", "a {subject} made of glass"),
        t("texture", "a knitted {subject}"),
        t("texture", "a {subject} made of marble"),
    ]
}

/// A template file: one template per line with `{subject}`, optionally `taxonomy<TAB>template`;
/// blank lines and `#` comments are skipped.
pub fn read_templates(path: &Path) -> Result<Vec<Template>> {
    let text = crate::input::read_to_string(path)
        .with_context(|| format!("{}: cannot read the templates", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let (taxonomy, text) = match line.split_once('\t') {
            Some((t, x)) => (t.trim().to_string(), x.trim().to_string()),
            None => ("custom".to_string(), line.trim().to_string()),
        };
        if !text.contains("{subject}") {
            bail!(
                "{}:{}: the template has no {{subject}} placeholder",
                path.display(),
                i + 1
            );
        }
        out.push(Template { taxonomy, text });
    }
    if out.is_empty() {
        bail!("{}: no templates", path.display());
    }
    Ok(out)
}

/// FNV-1a, 64 bits: a hash that never changes between builds (std's may), for seeds and keys.
pub fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for &b in *p {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        // A separator, so ("ab", "c") and ("a", "bc") differ.
        h = (h ^ 0xff).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// A uniform number in [0, 1) from a seed and a purpose.
pub fn unit(seed: u64, what: &str) -> f64 {
    (fnv64(&[&seed.to_le_bytes(), what.as_bytes()]) >> 11) as f64 / (1u64 << 53) as f64
}

/// One (subject, prompt, seed) record of the dataset.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Record {
    /// 16 hex digits from (subject, prompt, seed): the WebDataset key.
    pub key: String,
    pub subject: usize,
    pub prompt: String,
    pub template: String,
    pub taxonomy: String,
    pub seed: u64,
}

/// The records of `subjects`: `per_subject` prompts each, templates spread over the taxonomy
/// (record j of a subject takes the j-th taxonomy group in turn, a template within it by hash).
pub fn records(
    subjects: &[Subject],
    templates: &[Template],
    per_subject: usize,
    job_seed: u64,
) -> Vec<Record> {
    let mut groups: Vec<&str> = Vec::new();
    for t in templates {
        if !groups.contains(&t.taxonomy.as_str()) {
            groups.push(&t.taxonomy);
        }
    }
    let mut out = Vec::new();
    for (si, s) in subjects.iter().enumerate() {
        for j in 0..per_subject {
            // 53 bits: every JSON reader keeps it exact (pyarrow reads larger integers as
            // doubles, Python's datasets overflows past 2^63).
            let seed = fnv64(&[
                &job_seed.to_le_bytes(),
                s.name.as_bytes(),
                &(j as u64).to_le_bytes(),
            ]) >> 11;
            let group = groups[j % groups.len()];
            let in_group: Vec<&Template> =
                templates.iter().filter(|t| t.taxonomy == group).collect();
            let t = in_group
                [(unit(seed, "template") * in_group.len() as f64) as usize % in_group.len()];
            let prompt = t.text.replace("{subject}", &s.category);
            let key = format!(
                "{:016x}",
                fnv64(&[s.name.as_bytes(), prompt.as_bytes(), &seed.to_le_bytes()])
            );
            out.push(Record {
                key,
                subject: si,
                prompt,
                template: t.text.clone(),
                taxonomy: t.taxonomy.clone(),
                seed,
            });
        }
    }
    out
}

/// Shard `i` of the plan holds records `i·size .. (i+1)·size`.
pub fn shard_count(records: usize, size: usize) -> usize {
    records.div_ceil(size)
}

/// The shards process `index` of `count` builds: every `count`-th, starting at `index`.
pub fn my_shards(shards: usize, index: usize, count: usize) -> Vec<usize> {
    (index..shards).step_by(count.max(1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subjects(n: usize) -> Vec<Subject> {
        (0..n)
            .map(|i| Subject {
                name: format!("s{i}"),
                category: "toy".into(),
                source: SubjectSource::Builtin(i),
            })
            .collect()
    }

    #[test]
    fn keys_are_unique_and_stable() {
        let r = records(&subjects(5), &builtin_templates(), 8, 3);
        let mut keys: Vec<&str> = r.iter().map(|r| r.key.as_str()).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 40);
        assert_eq!(r, records(&subjects(5), &builtin_templates(), 8, 3));
        assert_ne!(
            r[0].key,
            records(&subjects(5), &builtin_templates(), 8, 4)[0].key
        );
        // Every taxonomy group is used by a subject's first four records.
        let groups: std::collections::BTreeSet<&str> =
            r[..4].iter().map(|r| r.taxonomy.as_str()).collect();
        assert_eq!(groups.len(), 4);
    }

    #[test]
    fn shard_slices_are_disjoint_and_cover_everything() {
        for (n, count) in [(10, 3), (7, 1), (3, 5)] {
            let mut all: Vec<usize> = (0..count).flat_map(|i| my_shards(n, i, count)).collect();
            all.sort();
            assert_eq!(all, (0..n).collect::<Vec<_>>());
        }
    }
}
