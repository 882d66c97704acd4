//! `toffee score`: DINO, CLIP-I and CLIP-T of one (subject, target, prompt) record, or of every
//! line of a JSONL file, batched through the encoders (formulas in `pipeline::score`).

use crate::image_io::load_mask;
use crate::image_proc::load_rgb8_on_white as load_rgb8;
use crate::models::load::open_device;
use crate::pipeline::score::{Mask, ScoreInput, Scorer, Scores};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};

/// One record of a `--pairs` file; relative paths are relative to the file's folder.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PairLine {
    pub subject: PathBuf,
    pub target: PathBuf,
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_mask: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_mask: Option<PathBuf>,
}

#[derive(serde::Serialize)]
struct ScoredLine<'a> {
    #[serde(flatten)]
    pair: &'a PairLine,
    #[serde(flatten)]
    scores: Scores,
}

fn mask(path: &Path) -> Result<Mask> {
    Ok(Mask::from_tensor(&load_mask(path)?))
}

/// Reads a record's images (paths as given, resolved against `base`).
pub fn load_input(p: &PairLine, base: &Path) -> Result<ScoreInput> {
    let at = |q: &Path| base.join(q);
    Ok(ScoreInput {
        subject: load_rgb8(&at(&p.subject))?,
        subject_mask: p.subject_mask.as_ref().map(|m| mask(&at(m))).transpose()?,
        target: load_rgb8(&at(&p.target))?,
        target_mask: p.target_mask.as_ref().map(|m| mask(&at(m))).transpose()?,
        prompt: p.prompt.clone(),
        name: at(&p.subject).display().to_string(),
    })
}

/// Scores one record.
pub fn score_one(scorer: &Scorer, p: &PairLine) -> Result<Scores> {
    let input = load_input(p, Path::new(""))?;
    Ok(scorer.score(std::slice::from_ref(&input))?[0])
}

/// Reads a `--pairs` file: one JSON object per non-empty line.
pub fn read_pairs(path: &Path) -> Result<Vec<PairLine>> {
    // A record is two paths and a prompt: a longer line is not one (and is not held in memory).
    const MAX_LINE: u64 = 1 << 20;
    let f = crate::input::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut reader = std::io::BufReader::new(f);
    let mut v = Vec::new();
    for i in 0.. {
        let mut bytes = Vec::new();
        (&mut reader)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut bytes)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        if bytes.is_empty() {
            break;
        }
        if bytes.len() as u64 > MAX_LINE {
            bail!(
                "{}:{}: a line longer than {MAX_LINE} bytes",
                path.display(),
                i + 1
            );
        }
        let line = String::from_utf8(bytes)
            .map_err(|_| anyhow::anyhow!("{}:{}: not UTF-8 text", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let p: PairLine = serde_json::from_str(&line).with_context(|| {
            format!(
                "{}:{}: expected {{\"subject\", \"target\", \"prompt\"[, \"subject_mask\", \"target_mask\"]}}",
                path.display(),
                i + 1
            )
        })?;
        v.push(p);
    }
    if v.is_empty() {
        bail!("{}: no records", path.display());
    }
    Ok(v)
}

/// Scores every record of `pairs` in batches of `batch`, writing one JSON line per record (the
/// input fields plus `dino`, `clip_i`, `clip_t`) to `out`, in input order.
pub fn score_file(
    scorer: &Scorer,
    pairs: &Path,
    batch: usize,
    out: &mut dyn Write,
) -> Result<usize> {
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let lines = read_pairs(pairs)?;
    let base = pairs.parent().unwrap_or(Path::new(""));
    for chunk in lines.chunks(batch) {
        let inputs = chunk
            .iter()
            .map(|p| load_input(p, base))
            .collect::<Result<Vec<_>>>()?;
        let scores = scorer.score(&inputs)?;
        for (pair, scores) in chunk.iter().zip(scores) {
            serde_json::to_writer(&mut *out, &ScoredLine { pair, scores })?;
            out.write_all(b"\n")?;
        }
    }
    Ok(lines.len())
}

#[derive(clap::Args)]
pub struct Args {
    /// DINO v1 (ViTModel) or DINOv2 folder.
    #[arg(long)]
    pub dino: PathBuf,
    /// CLIPModel folder (vision and text towers, tokenizer, preprocessor_config.json).
    #[arg(long)]
    pub clip: PathBuf,
    #[arg(long, required_unless_present = "pairs", conflicts_with = "pairs")]
    pub subject: Option<PathBuf>,
    #[arg(long, required_unless_present = "pairs", conflicts_with = "pairs")]
    pub target: Option<PathBuf>,
    /// Score the subject inside this mask only (white = subject).
    #[arg(long, conflicts_with = "pairs")]
    pub subject_mask: Option<PathBuf>,
    #[arg(long, conflicts_with = "pairs")]
    pub target_mask: Option<PathBuf>,
    #[arg(long, required_unless_present = "pairs", conflicts_with = "pairs")]
    pub prompt: Option<String>,
    /// JSONL: {"subject", "target", "prompt"[, "subject_mask", "target_mask"]} per line
    /// (paths relative to the file); writes one JSON line per record with the scores.
    #[arg(long)]
    pub pairs: Option<PathBuf>,
    /// With --pairs: write the scored lines here (atomically) instead of stdout.
    #[arg(long, requires = "pairs")]
    pub out: Option<PathBuf>,
    /// Records per encoder batch.
    #[arg(long, default_value_t = 16, allow_negative_numbers = true, value_parser = super::count::<usize>)]
    pub batch: usize,
    /// One JSON object instead of a line of text.
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(a: Args) -> Result<()> {
    let scorer = load_scorer(&Options {
        dino: a.dino,
        clip: a.clip,
        device: a.device,
    })?;
    if let Some(pairs) = a.pairs {
        let n = match a.out {
            Some(out) => {
                let mut buf = Vec::new();
                let n = score_file(&scorer, &pairs, a.batch, &mut buf)?;
                crate::weights::safetensors::write_atomic(&out, &buf)?;
                n
            }
            None => score_file(&scorer, &pairs, a.batch, &mut std::io::stdout().lock())?,
        };
        eprintln!("scored {n} record{}", if n == 1 { "" } else { "s" });
        return Ok(());
    }
    let (Some(subject), Some(target), Some(prompt)) = (a.subject, a.target, a.prompt) else {
        bail!("--subject, --target and --prompt are required without --pairs");
    };
    let line = PairLine {
        subject,
        target,
        prompt,
        subject_mask: a.subject_mask,
        target_mask: a.target_mask,
    };
    let s = score_one(&scorer, &line)?;
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!(
            "dino {:.6}  clip_i {:.6}  clip_t {:.6}",
            s.dino, s.clip_i, s.clip_t
        );
    }
    Ok(())
}

pub struct Options {
    pub dino: PathBuf,
    pub clip: PathBuf,
    pub device: String,
}

pub fn load_scorer(o: &Options) -> Result<Scorer> {
    // DINO is the larger share of the work (every image, patch tokens).
    let dev = open_device(&o.device, Some(&o.dino), "")?;
    Scorer::load(&o.dino, &o.clip, &dev)
}
