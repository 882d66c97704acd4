//! `toffee pairs`: resolve the options into a checked plan before any model loads, then build
//! this process's shards.

use super::config::PairsConfig;
use super::format::{self, JobFile, ShardFiles, Stats};
use super::plan::{self, Record, Subject, SubjectSource};
use super::shard::{build_shard, shard_records};
use super::stages::StageModels;
use crate::backend::Device;
use crate::models::adapter::Adapter;
use crate::models::load::open_device;
use crate::pipeline::image_prompt::load_encoder;
use crate::pipeline::mask::Segmenter;
use crate::pipeline::score::Scorer;
use crate::pipeline::view::ViewGenerator;
use crate::pipeline::Generator;
use crate::weights::lora::LoraSpec;
use anyhow::{bail, Context, Result};
pub use format::write_totals;
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
fn write_job_file(out: &Path, job: &JobFile) -> Result<()> {
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

/// The pairs job's devices, one worker each, with the storage the draft generator's UNet (most of
/// the work) asks for: bf16 for a bf16 checkpoint (`open_device`, the policy of every command).
pub fn open_devices(specs: &[String], cfg: &PairsConfig) -> Result<Vec<Device>> {
    specs
        .iter()
        .map(|d| open_device(d, cfg.models.draft.as_deref(), "unet"))
        .collect()
}

/// Loads every model of the config on `device` (built-in ones when the config names none). A
/// folder named by two stages is loaded once.
pub fn load_models(cfg: &PairsConfig, device: &Device) -> Result<StageModels> {
    let m = &cfg.models;
    let segmenter = match &m.segmenter {
        Some(dir) => Some(Segmenter::load(dir, m.sam.as_deref(), cfg.mask, device)?),
        // The demo masks unmasked subjects with the built-in tiny CLIPSeg + SAM.
        None if m.draft.is_none() => Some(Segmenter::builtin(true, cfg.mask, device)?),
        None => None,
    };
    let specs = |l: &[String]| -> Result<Vec<LoraSpec>> { l.iter().map(|s| s.parse()).collect() };
    let (draft_loras, refine_loras) = (specs(&cfg.draft.lora)?, specs(&cfg.refine.lora)?);
    let Some(draft_dir) = &m.draft else {
        if !draft_loras.is_empty() || !refine_loras.is_empty() {
            bail!(
                "draft.lora / refine.lora need [models] draft: a LoRA is made for one base model"
            );
        }
        return builtin_models(segmenter, device);
    };
    let mut draft =
        Generator::load_with_loras(draft_dir, m.controlnet.as_deref(), &draft_loras, device)?;
    let adapter_path = m.refiner_adapter.as_ref().expect("checked in resolve");
    let adapter = Adapter::load(adapter_path, device)?;
    let dino_dir = m.dino.as_ref().expect("checked in resolve");
    let enc_dir =
        crate::pipeline::image_prompt::encoder_dir(&adapter, m.refiner_adapter_encoder.as_deref())?;
    // The Refiner usually reads the same DINO the filter scores with: load it once.
    let adapter_encoder = if same_path(&enc_dir, dino_dir) {
        None
    } else {
        Some(load_encoder(&adapter, Some(&enc_dir), device)?)
    };
    let refiner_dir = m.refiner.as_deref().unwrap_or(draft_dir);
    // One model for both stages only when they also fuse the same LoRAs.
    let same = same_path(refiner_dir, draft_dir) && draft_loras == refine_loras;
    let refiner = if same {
        draft.attach_adapter(adapter)?;
        None
    } else {
        let mut r = Generator::load_with_loras(refiner_dir, None, &refine_loras, device)?;
        r.attach_adapter(adapter)?;
        Some(r)
    };
    let view = m
        .view
        .as_ref()
        .map(|v| ViewGenerator::load(v, device))
        .transpose()?;
    let scorer = Scorer::load(dino_dir, m.clip.as_ref().expect("checked"), device)?;
    Ok(StageModels {
        draft,
        refiner,
        adapter_encoder,
        view,
        scorer,
        segmenter,
    })
}

/// The demo's stage models: every stage built in (tiny, random weights).
fn builtin_models(segmenter: Option<Segmenter>, device: &Device) -> Result<StageModels> {
    let mut draft = crate::builtin::generator(device)?;
    draft.controlnet = Some(super::builtin::controlnet(device)?);
    let adapter = super::builtin::refiner_adapter(&mut draft.unet, device)?;
    draft.attach_adapter(adapter)?;
    Ok(StageModels {
        draft,
        refiner: None,
        // The built-in adapter reads the built-in DINO's tokens: one model for both stages.
        adapter_encoder: None,
        view: Some(super::builtin::view_generator(device)?),
        scorer: super::builtin::scorer(device)?,
        segmenter,
    })
}

fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
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

pub struct Summary {
    pub stats: Stats,
    pub shards_done: usize,
    pub shards_skipped: usize,
    pub stopped: bool,
}

/// Removes temporary files a killed run left for `shards` (claimed by this run, so no other
/// live run is writing them).
fn clean_leftovers(out: &Path, shards: &[usize]) {
    let Ok(entries) = std::fs::read_dir(out) else {
        return;
    };
    let prefixes: Vec<String> = shards
        .iter()
        .map(|&i| format!(".{}.", format::shard_name(i)))
        .collect();
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.contains(".tmp.") && prefixes.iter().any(|p| n.starts_with(p.as_str())) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The shards of `shards` whose stats file (the mark of a finished shard) is missing.
fn unfinished(out: &Path, shards: &[usize]) -> Vec<usize> {
    shards
        .iter()
        .copied()
        .filter(|&i| !ShardFiles::new(out, i).stats.is_file())
        .collect()
}

/// One device and its models per worker.
type Workers = Vec<(Device, StageModels)>;

/// Everything that must succeed before any work and before job.json claims the folder: the plan
/// (config, subjects, slice, output folder, an earlier job's file compared), the devices, and
/// every worker's models (loaded in parallel), the claim on the unfinished shards (`lock`).
/// Returns the plan, the unfinished shards, the workers and the claim; nothing to do loads no
/// models.
fn setup(o: &Options) -> Result<(Plan, Vec<usize>, Workers, super::lock::Claim)> {
    let plan = resolve(o)?;
    let todo = unfinished(&o.out, &plan.mine);
    let devices = open_devices(&o.devices, &plan.cfg)?;
    let n = if todo.is_empty() {
        0
    } else {
        devices.len().min(todo.len())
    };
    let loaded: Vec<Result<StageModels>> = std::thread::scope(|scope| {
        let handles: Vec<_> = devices[..n]
            .iter()
            .map(|d| scope.spawn(|| load_models(&plan.cfg, d)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("loading the models panicked")))
            })
            .collect()
    });
    let models = loaded.into_iter().collect::<Result<Vec<_>>>()?;
    for (d, m) in devices.iter().zip(&models) {
        m.check_budget(&plan.cfg, d)?;
    }
    std::fs::create_dir_all(&o.out)
        .with_context(|| format!("{}: cannot create the output folder", o.out.display()))?;
    let claim = super::lock::claim(&o.out, &todo)?;
    // A run that held these shards may have finished some while this one loaded its models.
    let todo = unfinished(&o.out, &todo);
    write_job_file(&o.out, &plan.job)?;
    let workers = devices.into_iter().zip(models).collect();
    Ok((plan, todo, workers, claim))
}

/// One worker: builds `shards` in turn on its device. Returns the shards built and whether a
/// stop was asked for.
fn work(
    plan: &Plan,
    o: &Options,
    (dev, models): (&Device, &StageModels),
    shards: impl Iterator<Item = usize>,
    progress: &super::progress::Progress,
) -> Result<(usize, bool)> {
    let mut done = 0;
    for shard in shards {
        let Some(s) = build_shard(plan, o, models, shard, dev)? else {
            return Ok((done, true));
        };
        let (records, total) = progress.shard_done(&s);
        if let Some(cb) = &o.on_shard {
            cb(records, total);
        }
        done += 1;
    }
    Ok((done, false))
}

/// A job whose finished shards hold no record because every subject was skipped has failed,
/// however cleanly it ran.
fn check_some_records(out: &Path, stats: &Stats) -> Result<()> {
    if stats.records > 0 || stats.skipped_records == 0 {
        return Ok(());
    }
    let reasons: Vec<String> = stats
        .skipped_subjects
        .iter()
        .map(|(why, n)| format!("{why}: {n}"))
        .collect();
    bail!(
        "{}: no usable subject: all {} records of the finished shards were skipped ({}); fix \
         the subjects (the warnings above say why) and start again in a new folder",
        out.display(),
        stats.skipped_records,
        reasons.join(", ")
    )
}

/// Builds this process's unfinished shards, one worker per device (shard k of the remaining ones
/// goes to worker k mod workers). A failure before the work starts is a `SetupError`.
pub fn run(o: &Options) -> Result<Summary> {
    let (plan, todo, workers, _claim) =
        setup(o).map_err(|e| anyhow::Error::new(super::SetupError(e)))?;
    let skipped = plan.mine.len() - todo.len();
    clean_leftovers(&o.out, &todo);
    let progress = super::progress::Progress::new(
        o.progress,
        todo.iter().map(|&i| shard_records(&plan, i).len()).sum(),
    );
    let n = workers.len();
    let results: Vec<Result<(usize, bool)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = workers
            .iter()
            .enumerate()
            .map(|(w, (dev, models))| {
                let (plan, progress) = (&plan, &progress);
                let mine = todo.iter().copied().skip(w).step_by(n);
                scope.spawn(move || work(plan, o, (dev, models), mine, progress))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a worker panicked")))
            })
            .collect()
    });
    progress.finish();
    let stats = super::write_summaries(&o.out, &plan.job)?;
    let mut done = 0;
    let mut stopped = false;
    for r in results {
        let (d, s) = r?;
        done += d;
        stopped |= s;
    }
    if !stopped {
        check_some_records(&o.out, &stats)?;
    }
    Ok(Summary {
        stats,
        shards_done: done,
        shards_skipped: skipped,
        stopped,
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
