//! The dataset card: `README.md` in every run folder, for people and for loaders. Its YAML header
//! is a Hugging Face dataset card's (`configs` names the shards), so `load_dataset(DIR)` reads
//! the folder as WebDataset; the body says what the records hold, how they were made (the config
//! in full) and whether the folder is complete. Rebuilt with index.jsonl and stats.json.

use super::format::{member, JobFile, Stats, INDEX_FIELDS, README_FILE};
use super::writer::write_text;
use anyhow::Result;
use std::fmt::Write;
use std::path::Path;

/// Writes `README.md` into the run folder `out`.
pub fn write_card(out: &Path, job: &JobFile, stats: &Stats) -> Result<()> {
    write_text(&out.join(README_FILE), &card(job, stats))
}

fn card(job: &JobFile, stats: &Stats) -> String {
    let mut s = String::new();
    // The header's `configs` is how the Hub and `load_dataset(DIR)` find the shards.
    s.push_str(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    \
         path: \"pairs-*.tar\"\ntags:\n- toffee\n- subject-driven\n- image-editing\n---\n\n",
    );
    // No folder name: the same records give the same card wherever they are (merged shards of
    // an array equal an unsharded run's, byte for byte).
    let _ = writeln!(s, "# Subject-driven image pairs (toffee)\n");
    let (done, all) = (stats.shards_finished.unwrap_or(0), job.shards);
    if done < all {
        let _ = writeln!(
            s,
            "**Partial: {done} of {all} shards finished.** The numbers below cover the finished \
             shards only: rerun the job to finish it (it resumes), or merge (`toffee pairs merge`) \
             once every process of a sharded run is done.\n"
        );
    }
    let rejected = if job.keep_rejected {
        "rejected records are in the shards too (`kept` false)"
    } else {
        "rejected records are listed in index.jsonl only"
    };
    let _ = writeln!(
        s,
        "Made by toffee {} (`toffee pairs`, format {}) from the subjects `{}`: {} records in {} \
         shards of up to {}, {} kept and {} rejected; {rejected}. Every record pairs a subject with the \
         same subject in a new scene a prompt describes, drafted by a ControlNet-guided \
         generator, refined towards the subject's identity and scored with DINO and CLIP.\n",
        job.toffee_version,
        job.format,
        job.subjects,
        job.records,
        job.shards,
        job.config.job.shard_size,
        stats.kept,
        stats.rejected,
    );
    write_files(&mut s);
    write_fields(&mut s);
    write_made(&mut s, job, stats);
    s.push_str(
        "## Load it\n\n```python\nimport glob, webdataset as wds\nurls = \
         sorted(glob.glob(\"pairs-*.tar\"))\nds = wds.WebDataset(urls, \
         shardshuffle=False).decode(\"pil\")\n\nfrom datasets import load_dataset\npairs = \
         load_dataset(\".\", split=\"train\")  # this folder: the header above names the \
         shards\n```\n",
    );
    s
}

fn write_files(s: &mut String) {
    s.push_str(
        "## Files\n\n\
         - `pairs-NNNNNN.tar`: WebDataset shards; the members of a record share its KEY.\n\
         - `pairs-NNNNNN.jsonl`, `pairs-NNNNNN.stats.json`: a shard's index lines and stats (the \
         stats mark it finished).\n\
         - `index.jsonl`: every record of the finished shards, kept or not, one line each.\n\
         - `stats.json`: counts, rejection reasons, skipped subjects, times, shards finished.\n\
         - `job.json`: the job (config, subjects, plan) a rerun must match.\n\
         - `report.html`: contact sheet, score histograms, rejections, stage times.\n\n\
         Members of a record (`KEY.<member>`):\n\n| member | holds |\n| --- | --- |\n",
    );
    for (m, what) in member::ALL {
        let _ = writeln!(s, "| `{m}` | {what} |");
    }
    s.push('\n');
}

fn write_fields(s: &mut String) {
    s.push_str(
        "## Fields\n\nEvery index line, and every `KEY.json`, has these fields with one JSON type \
         each (`KEY.json` adds `category`, `view`, `placement`, `settings` and `models`):\n\n\
         | field | meaning |\n| --- | --- |\n",
    );
    for (f, what) in INDEX_FIELDS {
        let _ = writeln!(s, "| `{f}` | {what} |");
    }
    s.push('\n');
}

fn write_made(s: &mut String, job: &JobFile, stats: &Stats) {
    let c = &job.config;
    // Without a draft folder every stage runs its built-in model; with one, a stage without a
    // folder of its own is off (the view) or shares the draft's (the Refiner).
    let builtin = c.models.draft.is_none();
    let model = |p: &Option<std::path::PathBuf>| match p {
        Some(p) => format!("`{}`", p.display()),
        None if builtin => "built-in (random weights)".into(),
        None => "none".into(),
    };
    let _ = writeln!(
        s,
        "## How it was made\n\n\
         - Draft: {} with ControlNet {}, {} steps, guidance {}.\n\
         - Refiner: {} with adapter {}, strength {}, λ {}, {} steps.\n\
         - New views: {}% of the records (View Generator {}).\n\
         - Filter: kept when DINO ≥ {}, CLIP-I ≥ {} and CLIP-T ≥ {} (DINO {}, CLIP {}).\n\
         - {}² targets, seed {}, on {}.\n",
        model(&c.models.draft),
        model(&c.models.controlnet),
        c.draft.steps,
        c.draft.guidance,
        model(
            c.models
                .refiner
                .as_ref()
                .map_or(&c.models.draft, |_| &c.models.refiner)
        ),
        model(&c.models.refiner_adapter),
        c.refine.strength,
        c.refine.scale,
        c.refine.steps,
        c.view.probability * 100.0,
        model(&c.models.view),
        c.filter.dino,
        c.filter.clip_i,
        c.filter.clip_t,
        model(&c.models.dino),
        model(&c.models.clip),
        c.job.resolution,
        c.job.seed,
        if stats.device.is_empty() {
            "—"
        } else {
            &stats.device
        },
    );
    let toml = toml::to_string(c).unwrap_or_else(|e| format!("# not printable: {e}\n"));
    let _ = writeln!(
        s,
        "The config in full (`job.json` has it too):\n\n```toml\n{toml}```\n"
    );
}
