//! What a pairs run is asked to do, resolved and checked before any model loads: the options,
//! the plan (config, subjects, records, this process's slice of the shards), the job file that
//! claims the output folder, and the model identities every record carries. `run` (the job),
//! `shard` (one shard) and `check` (`--check`) read it; it reads none of them.

use super::config::PairsConfig;
use super::format::{self, JobFile};
use super::plan::{self, Record, Subject, SubjectSource};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub struct Options {
    /// pairs.toml; None: the defaults with built-in models.
    pub config: Option<PathBuf>,
    /// A folder of subject images or a JSONL list; None: the built-in subjects.
    pub subjects: Option<PathBuf>,
    /// Overrides `job.templates`.
    pub templates: Option<PathBuf>,
    pub out: PathBuf,
    /// This process's slice: shard index and count (None: from the environment, else 0 of 1).
    pub shard_index: Option<usize>,
    pub num_shards: Option<usize>,
    /// One worker per device (`cpu`, `cuda:0`, …).
    pub devices: Vec<String>,
    /// Overrides `job.batch`.
    pub batch: Option<usize>,
    pub keep_rejected: bool,
    pub progress: bool,
    /// Set to stop after the batch in flight (Ctrl-C).
    pub stop: Arc<AtomicBool>,
    /// Called after every finished shard with (records done, records to do) of this run.
    pub on_shard: Option<ShardCallback>,
}

/// A progress hook of embedders (the C ABI).
pub type ShardCallback = Arc<dyn Fn(usize, usize) + Send + Sync>;

/// This process's slice from the schedulers' environment: Slurm job arrays
/// ((SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP of
/// SLURM_ARRAY_TASK_COUNT: `--array=4-10:2` is tasks 0..4 of 4) or Kubernetes indexed Jobs
/// (JOB_COMPLETION_INDEX of TOFFEE_NUM_SHARDS). An id that is not one of the array's is an error:
/// clamping it would build another task's shards twice and leave its own unbuilt.
pub fn slice_from_env(get: impl Fn(&str) -> Option<String>) -> Result<Option<(usize, usize)>> {
    let num = |name: &str| -> Result<Option<usize>> {
        get(name)
            .map(|v| {
                v.trim()
                    .parse::<usize>()
                    .with_context(|| format!("${name} = `{v}` is not a number"))
            })
            .transpose()
    };
    if let (Some(id), Some(count)) = (num("SLURM_ARRAY_TASK_ID")?, num("SLURM_ARRAY_TASK_COUNT")?) {
        let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let step = num("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
        let Some(offset) = id.checked_sub(min).filter(|o| o % step == 0) else {
            bail!(
                "$SLURM_ARRAY_TASK_ID {id} is not a task of an array starting at \
                 $SLURM_ARRAY_TASK_MIN {min} in steps of {step}"
            );
        };
        return Ok(Some((offset / step, count)));
    }
    if let Some(id) = num("JOB_COMPLETION_INDEX")? {
        let Some(count) = num("TOFFEE_NUM_SHARDS")? else {
            bail!("$JOB_COMPLETION_INDEX is set but $TOFFEE_NUM_SHARDS (the number of indexed pods) is not");
        };
        return Ok(Some((id, count)));
    }
    Ok(None)
}

/// The checked plan: everything known before a model loads.
pub struct Plan {
    pub cfg: PairsConfig,
    pub subjects: Vec<Subject>,
    pub records: Vec<Record>,
    pub shards: usize,
    pub mine: Vec<usize>,
    pub job: JobFile,
}

/// Checks the options, the config, the model paths and the output folder (without creating it);
/// reads the subject list; computes the records and this process's shards.
pub fn resolve(o: &Options) -> Result<Plan> {
    let cfg = read_config(o)?;
    check_model_paths(&cfg, o.config.as_deref())?;
    let subjects = match &o.subjects {
        Some(p) => plan::read_subjects(p)?,
        None => builtin_subjects(),
    };
    let templates = match o.templates.as_ref().or(cfg.job.templates.as_ref()) {
        Some(t) => plan::read_templates(t)?,
        None => plan::builtin_templates(),
    };
    let records = plan::records(
        &subjects,
        &templates,
        cfg.job.prompts_per_subject,
        cfg.job.seed,
    );
    let shards = plan::shard_count(records.len(), cfg.job.shard_size);
    let (index, count) = match (o.shard_index, o.num_shards) {
        (Some(i), Some(n)) => (i, n),
        (None, None) => slice_from_env(|k| std::env::var(k).ok())?.unwrap_or((0, 1)),
        _ => bail!("--shard-index and --num-shards go together"),
    };
    if count == 0 || index >= count {
        bail!("shard index {index} is not below the shard count {count}");
    }
    let mine = plan::my_shards(shards, index, count);
    let job = job_file(o, &cfg, &subjects, records.len(), shards);
    check_output_place(&o.out)?;
    check_job_file(&o.out, &job)?;
    if o.devices.is_empty() {
        bail!("--devices: give at least one device");
    }
    Ok(Plan {
        cfg,
        subjects,
        records,
        shards,
        mine,
        job,
    })
}

/// The config file (or the demo's) with `--batch` applied.
fn read_config(o: &Options) -> Result<PairsConfig> {
    let mut cfg = match &o.config {
        Some(p) => PairsConfig::read(p)?,
        None => demo_config(),
    };
    if let Some(b) = o.batch {
        if b == 0 {
            bail!("--batch must be at least 1");
        }
        cfg.job.batch = b;
    }
    Ok(cfg)
}

/// Real models need every stage's folder; each named path must exist.
fn check_model_paths(cfg: &PairsConfig, config: Option<&Path>) -> Result<()> {
    let m = &cfg.models;
    let given: Vec<(&str, &Option<PathBuf>)> = vec![
        ("draft", &m.draft),
        ("controlnet", &m.controlnet),
        ("refiner_adapter", &m.refiner_adapter),
        ("dino", &m.dino),
        ("clip", &m.clip),
    ];
    let any = given.iter().any(|(_, p)| p.is_some()) || m.view.is_some() || m.refiner.is_some();
    if any {
        let missing: Vec<&str> = given
            .iter()
            .filter(|(_, p)| p.is_none())
            .map(|(n, _)| *n)
            .collect();
        if !missing.is_empty() {
            bail!(
                "{}: [models] needs {} (or no model paths at all for the built-in demo models)",
                config.map(|p| p.display().to_string()).unwrap_or_default(),
                missing.join(", ")
            );
        }
        let files = [
            &m.draft,
            &m.controlnet,
            &m.refiner,
            &m.refiner_adapter,
            &m.refiner_adapter_encoder,
            &m.view,
            &m.dino,
            &m.clip,
        ];
        for p in files.into_iter().flatten() {
            if !p.exists() {
                bail!(
                    "{}: no such model file or folder (named in the config's [models])",
                    p.display()
                );
            }
        }
    }
    for p in [&m.segmenter, &m.sam].into_iter().flatten() {
        if !p.is_dir() {
            bail!(
                "{}: no such model folder (named in the config's [models])",
                p.display()
            );
        }
    }
    if cfg.view.probability > 0.0 && any && m.view.is_none() {
        bail!(
            "view.probability is {} but [models] names no view model",
            cfg.view.probability
        );
    }
    Ok(())
}

fn job_file(
    o: &Options,
    cfg: &PairsConfig,
    subjects: &[Subject],
    records: usize,
    shards: usize,
) -> JobFile {
    let names: Vec<&[u8]> = subjects.iter().map(|s| s.name.as_bytes()).collect();
    JobFile {
        format: format::FORMAT_VERSION,
        toffee_version: env!("CARGO_PKG_VERSION").into(),
        config: cfg.clone(),
        subjects: o
            .subjects
            .as_ref()
            .map_or("<built-in>".into(), |p| p.display().to_string()),
        subject_names_digest: format!("{:016x}", plan::fnv64(&names)),
        records,
        shards,
        keep_rejected: o.keep_rejected,
    }
}

/// The output folder can be made and written: an existing one takes a probe file, else the
/// nearest existing parent must be a writable folder. Nothing is created here (`--check` writes
/// nothing); the run creates the folder once every check has passed.
fn check_output_place(out: &Path) -> Result<()> {
    if out.exists() {
        if !out.is_dir() {
            bail!("{}: the output place is not a folder", out.display());
        }
        let probe = out.join(format!(".toffee-probe-{}", std::process::id()));
        std::fs::write(&probe, b"")
            .with_context(|| format!("{}: the output folder is not writable", out.display()))?;
        let _ = std::fs::remove_file(&probe);
        return Ok(());
    }
    let mut parent = out.parent();
    while let Some(p) = parent {
        let p = if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        };
        if p.exists() {
            let meta =
                std::fs::metadata(p).with_context(|| format!("{}: cannot read", p.display()))?;
            if !meta.is_dir() || meta.permissions().readonly() {
                bail!(
                    "{}: cannot create the output folder: {} is not a writable folder",
                    out.display(),
                    p.display()
                );
            }
            return Ok(());
        }
        parent = p.parent();
    }
    Ok(())
}

/// Checks that a resumed run asks for the job its folder's job.json records (naming what
/// differs); a folder without one is free. The batch size is not part of the job: it does not
/// change any record.
fn check_job_file(out: &Path, job: &JobFile) -> Result<()> {
    let path = out.join(format::JOB_FILE);
    let normalised = |j: &JobFile| -> Result<serde_json::Value> {
        let mut j = j.clone();
        j.config.job.batch = 0;
        j.toffee_version = String::new();
        Ok(serde_json::to_value(j)?)
    };
    if path.is_file() {
        let text = crate::input::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let old: JobFile = serde_json::from_str(&text)
            .with_context(|| format!("{}: not the job file of a pairs run", path.display()))?;
        if let Some((field, was, now)) = first_difference("", &normalised(&old)?, &normalised(job)?)
        {
            bail!(
                "{}: this output folder belongs to another job: `{field}` was {was} and is now {now} \
                 (use a new --out, or the same options to resume)",
                path.display()
            );
        }
    }
    Ok(())
}

/// Claims the folder for `job` (job.json), once every setup check has passed. Created only where
/// none exists, so of two jobs started into one folder at once one finds the other's file and is
/// refused by the comparison, instead of both running and one job.json naming the wrong job.
pub(super) fn write_job_file(out: &Path, job: &JobFile) -> Result<()> {
    let path = out.join(format::JOB_FILE);
    if !crate::atomic_file::create_new(&path, serde_json::to_string_pretty(job)?.as_bytes())? {
        check_job_file(out, job)?;
    }
    Ok(())
}

/// The first leaf where two JSON values differ: (dotted path, old, new).
fn first_difference(
    path: &str,
    a: &serde_json::Value,
    b: &serde_json::Value,
) -> Option<(String, String, String)> {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                first_difference(
                    &p,
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                )
            })
        }
        _ if a != b => Some((path.to_string(), a.to_string(), b.to_string())),
        _ => None,
    }
}

/// The built-in demo: tiny models at 128², few steps, every stage on, thresholds that keep some
/// records and reject others.
pub fn demo_config() -> PairsConfig {
    let mut c = PairsConfig::default();
    c.job.resolution = 128;
    c.job.prompts_per_subject = 2;
    c.job.shard_size = 4;
    c.job.batch = 2;
    c.draft.steps = 6;
    c.refine.steps = 6;
    c.refine.mask_dilation = 4;
    c.view.probability = 0.5;
    c.view.steps = 4;
    c.filter.dino = 0.0;
    c.filter.clip_i = 0.0;
    c.filter.clip_t = -1.0;
    c
}

fn builtin_subjects() -> Vec<Subject> {
    super::builtin::SUBJECTS
        .iter()
        .enumerate()
        .map(|(i, (name, noun))| Subject {
            name: (*name).into(),
            category: (*noun).into(),
            source: SubjectSource::Builtin(i),
        })
        .collect()
}

/// The model identities written into every record.
pub(super) fn model_ids(cfg: &PairsConfig) -> serde_json::Value {
    let m = &cfg.models;
    let id = |p: &Option<PathBuf>| {
        p.as_ref()
            .map_or(serde_json::Value::String("<built-in>".into()), |p| {
                p.display().to_string().into()
            })
    };
    serde_json::json!({
        "draft": id(&m.draft), "controlnet": id(&m.controlnet),
        "refiner": if m.refiner.is_some() { id(&m.refiner) } else { id(&m.draft) },
        "refiner_adapter": id(&m.refiner_adapter), "view": if m.draft.is_none() { id(&None) } else { id(&m.view) },
        "dino": id(&m.dino), "clip": id(&m.clip),
    })
}

#[cfg(test)]
mod tests {
    use super::slice_from_env;

    fn slice(vars: &[(&str, &str)]) -> anyhow::Result<Option<(usize, usize)>> {
        slice_from_env(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn slurm_array_ids_map_to_slices_or_are_refused() {
        let id = |id: &'static str, min: &'static str, step: &'static str| {
            slice(&[
                ("SLURM_ARRAY_TASK_ID", id),
                ("SLURM_ARRAY_TASK_MIN", min),
                ("SLURM_ARRAY_TASK_STEP", step),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ])
        };
        assert_eq!(id("5", "2", "1").unwrap(), Some((3, 4)));
        assert_eq!(id("10", "4", "2").unwrap(), Some((3, 4)));
        for (i, m, s) in [("1", "2", "1"), ("5", "4", "2")] {
            let e = id(i, m, s).unwrap_err().to_string();
            assert!(e.contains("is not a task of an array"), "{e}");
        }
        assert_eq!(slice(&[]).unwrap(), None);
    }
}
