//! `toffee pairs`: resolve the options into a checked plan before any model loads, then build
//! this process's shards.

use super::config::PairsConfig;
use super::format::{self, jsonl, member, IndexLine, JobFile, ShardFiles, Stats};
use super::plan::{self, Record, Subject, SubjectSource};
use super::stages::{self, Outcome, StageModels, SubjectData, Timings};
use super::writer::{png_bytes, write_text, ShardWriter};
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
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

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
/// (SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT) or Kubernetes indexed
/// Jobs (JOB_COMPLETION_INDEX of TOFFEE_NUM_SHARDS).
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
        return Ok(Some((id.saturating_sub(min), count)));
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
        let text = std::fs::read_to_string(&path)
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

/// Claims the folder for `job` (job.json), once every setup check has passed.
fn write_job_file(out: &Path, job: &JobFile) -> Result<()> {
    let path = out.join(format::JOB_FILE);
    if path.is_file() {
        return Ok(());
    }
    write_text(&path, &serde_json::to_string_pretty(job)?)
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
        let mut draft = crate::builtin::generator(device)?;
        draft.controlnet = Some(super::builtin::controlnet(device)?);
        let adapter = super::builtin::refiner_adapter(&mut draft.unet, device)?;
        draft.attach_adapter(adapter)?;
        return Ok(StageModels {
            draft,
            refiner: None,
            // The built-in adapter reads the built-in DINO's tokens: one model for both stages.
            adapter_encoder: None,
            view: Some(super::builtin::view_generator(device)?),
            scorer: super::builtin::scorer(device)?,
            segmenter,
        });
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

fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// The model identities written into every record.
fn model_ids(cfg: &PairsConfig) -> serde_json::Value {
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

/// Subjects of one shard, loaded once each; the failures with their reasons.
type Loaded = BTreeMap<usize, stages::LoadedSubject>;

fn shard_records(plan: &Plan, shard: usize) -> &[Record] {
    let size = plan.cfg.job.shard_size;
    let start = shard * size;
    &plan.records[start..(start + size).min(plan.records.len())]
}

/// What the writer thread of a shard collected.
struct Written {
    writer: ShardWriter,
    index: Vec<IndexLine>,
    records: usize,
    kept: usize,
    rejections: BTreeMap<String, usize>,
    seconds: f64,
}

/// What the reader thread of a shard saw.
#[derive(Default)]
struct ReadStats {
    skipped_subjects: BTreeMap<String, usize>,
    skipped_records: usize,
    seconds: f64,
}

/// Builds one shard as a pipeline: a reader thread decodes the subjects (each once) and forms
/// batches, this thread runs the stages on the device, a writer thread encodes PNGs and appends
/// them to the tar; bounded queues of two batches keep memory flat. Then the tar is committed,
/// then its index lines, then its stats. Returns None when stopped (the shard is dropped).
fn build_shard(
    plan: &Plan,
    o: &Options,
    models: &StageModels,
    shard: usize,
    dev: &Device,
) -> Result<Option<Stats>> {
    let device = dev.name();
    let device = device.as_str();
    let clock = Instant::now();
    let started = super::format::unix_now();
    // Shards of one device share its models sequentially, so the counter's growth over this
    // call is this shard's.
    let evaluations_before = models.evaluations();
    let cfg = &plan.cfg;
    let name = format::shard_name(shard);
    let recs = shard_records(plan, shard);
    let ids = model_ids(cfg);
    let files = ShardFiles::new(&o.out, shard);
    let writer = ShardWriter::create(&files.tar)?;
    let tar_name = format!("{name}.tar");
    let tar_name = &tar_name;
    let ids = &ids;
    let mut t = Timings::default();
    // Masks for unmasked subjects come from the device models, so those subjects are loaded
    // and masked here, on the device thread, before the reader starts; the reader takes them.
    let mut made = stages::load_and_mask(models, &plan.subjects, recs.iter().map(|r| r.subject))
        .with_context(|| format!("shard {name}: masking subjects"))?;
    let (batch_tx, batch_rx) = crossbeam_channel::bounded::<(Vec<Record>, Vec<SubjectData>)>(2);
    let (out_tx, out_rx) = crossbeam_channel::bounded::<Vec<Outcome>>(2);
    let (read, written, worked) = std::thread::scope(|sc| {
        let reader = sc.spawn(move || {
            let clock = Instant::now();
            let mut rs = ReadStats::default();
            let mut loaded: Loaded = BTreeMap::new();
            let mut batch = (Vec::new(), Vec::new());
            for r in recs {
                let l = loaded.entry(r.subject).or_insert_with(|| {
                    let l = made
                        .remove(&r.subject)
                        .unwrap_or_else(|| stages::load_subject(&plan.subjects[r.subject]));
                    // A bad subject counts once, in the shard that holds its first record.
                    if let Err((reason, msg)) = &l {
                        let first = plan.records.iter().position(|x| x.subject == r.subject);
                        if first.is_some_and(|f| f >= shard * cfg.job.shard_size) {
                            eprintln!(
                                "toffee: warning: skipping subject `{}`: {msg}",
                                plan.subjects[r.subject].name
                            );
                            *rs.skipped_subjects.entry(reason.name().into()).or_default() += 1;
                        }
                    }
                    l
                });
                match l {
                    Ok(s) => {
                        batch.0.push(r.clone());
                        batch.1.push(s.clone());
                    }
                    Err(_) => rs.skipped_records += 1,
                }
                if batch.0.len() == cfg.job.batch
                    && batch_tx.send(std::mem::take(&mut batch)).is_err()
                {
                    break;
                }
            }
            if !batch.0.is_empty() {
                let _ = batch_tx.send(batch);
            }
            rs.seconds = clock.elapsed().as_secs_f64();
            rs
        });
        let writer_thread = sc.spawn(move || -> Result<Written> {
            let mut w = Written {
                writer,
                index: Vec::new(),
                records: 0,
                kept: 0,
                rejections: BTreeMap::new(),
                seconds: 0.0,
            };
            for outcomes in out_rx {
                let clock = Instant::now();
                for out in &outcomes {
                    let keep_file = out.kept || o.keep_rejected;
                    if keep_file {
                        if let Err(e) = write_record(
                            &mut w.writer,
                            out,
                            &plan.subjects[out.record.subject],
                            cfg,
                            ids,
                        ) {
                            w.writer.abandon();
                            return Err(e);
                        }
                    }
                    w.records += 1;
                    if out.kept {
                        w.kept += 1;
                    } else {
                        *w.rejections
                            .entry(out.reason.unwrap_or("?").to_string())
                            .or_default() += 1;
                    }
                    w.index.push(IndexLine {
                        key: out.record.key.clone(),
                        shard: if keep_file {
                            tar_name.clone()
                        } else {
                            String::new()
                        },
                        subject: plan.subjects[out.record.subject].name.clone(),
                        prompt: out.record.prompt.clone(),
                        template: out.record.template.clone(),
                        taxonomy: out.record.taxonomy.clone(),
                        seed: out.record.seed,
                        scores: out.scores,
                        kept: out.kept,
                        reason: out.reason.unwrap_or_default().to_string(),
                        edit: out.kept,
                    });
                }
                w.seconds += clock.elapsed().as_secs_f64();
            }
            Ok(w)
        });
        // The device stages, on this thread.
        let mut worked: Result<bool> = Ok(false);
        for (records, subjects) in batch_rx.iter() {
            if o.stop.load(Ordering::SeqCst) {
                worked = Ok(true);
                break;
            }
            match run_batch_or_halves(models, cfg, &records, &subjects, &mut t, dev) {
                Ok(outcomes) => {
                    if out_tx.send(outcomes).is_err() {
                        break; // the writer failed; its error is reported below
                    }
                }
                Err(e) => {
                    worked = Err(e.context(format!("shard {name}")));
                    break;
                }
            }
        }
        drop(batch_rx);
        drop(out_tx);
        let read = reader.join().unwrap_or_default();
        let written = writer_thread
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the shard writer panicked")));
        (read, written, worked)
    });
    let written = written?;
    match worked {
        Err(e) => {
            written.writer.abandon();
            return Err(e);
        }
        Ok(true) => {
            written.writer.abandon();
            return Ok(None);
        }
        Ok(false) => {}
    }
    // A shard that wrote no record (all rejected, without --keep-rejected) has no tar: an empty
    // tar breaks loaders (webdataset, Hugging Face datasets); its stats still mark it done.
    if written.index.iter().any(|l| !l.shard.is_empty()) {
        written.writer.commit()?;
    } else {
        written.writer.abandon();
    }
    write_text(&files.index, &jsonl(&written.index)?)?;
    t.load = read.seconds;
    t.write = written.seconds;
    let seconds = clock.elapsed().as_secs_f64();
    let stats = Stats {
        records: written.records,
        kept: written.kept,
        rejected: written.records - written.kept,
        rejections: written.rejections,
        skipped_records: read.skipped_records,
        skipped_subjects: read.skipped_subjects,
        thresholds: [
            ("dino", cfg.filter.dino),
            ("clip_i", cfg.filter.clip_i),
            ("clip_t", cfg.filter.clip_t),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        stage_seconds: t,
        seconds,
        pairs_per_hour: super::format::per_hour(written.kept, seconds),
        work_seconds: seconds,
        started,
        finished: started + seconds,
        device: format!("{device} ({})", dev.storage()),
        unet_evaluations: models.evaluations() - evaluations_before,
        shards_finished: None,
        shards_expected: None,
    };
    write_text(&files.stats, &serde_json::to_string_pretty(&stats)?)?;
    Ok(Some(stats))
}

/// `run_batch`, and when the device ran out of memory on it, the two halves (recursively): a
/// record's result does not depend on its batch, so the output is the same, only slower.
fn run_batch_or_halves(
    models: &StageModels,
    cfg: &PairsConfig,
    records: &[Record],
    subjects: &[SubjectData],
    t: &mut Timings,
    dev: &Device,
) -> Result<Vec<Outcome>> {
    match stages::run_batch(models, cfg, records, subjects, t) {
        Ok(o) => Ok(o),
        Err(e) if records.len() > 1 && dev.recover()? => {
            let half = records.len() / 2;
            eprintln!(
                "toffee: warning: {e:#}; retrying as batches of {half} and {}",
                records.len() - half
            );
            let mut a =
                run_batch_or_halves(models, cfg, &records[..half], &subjects[..half], t, dev)?;
            a.extend(run_batch_or_halves(
                models,
                cfg,
                &records[half..],
                &subjects[half..],
                t,
                dev,
            )?);
            Ok(a)
        }
        Err(e) => Err(e),
    }
}

fn write_record(
    w: &mut ShardWriter,
    out: &Outcome,
    subject: &Subject,
    cfg: &PairsConfig,
    ids: &serde_json::Value,
) -> Result<()> {
    let k = &out.record.key;
    w.add(k, member::SUBJECT, &png_bytes(&out.subject.rgb)?)?;
    w.add(k, member::SUBJECT_MASK, &png_bytes(&out.subject.mask)?)?;
    w.add(k, member::TARGET, &png_bytes(&out.target)?)?;
    w.add(k, member::TARGET_MASK, &png_bytes(&out.target_mask)?)?;
    // Rejected records written with --keep-rejected carry the editing pair too: every record of
    // a shard has the same members (loaders infer one schema).
    w.add(k, member::SOURCE, &png_bytes(&out.draft)?)?;
    w.add(k, member::EDIT_MASK, &png_bytes(&out.edit_mask)?)?;
    let (x, y, width, height) = out.placement;
    let view = match out.view {
        Some(p) => format::ViewJson {
            applied: true,
            elevation: p.polar,
            azimuth: p.azimuth,
            radius: p.radius,
        },
        None => format::ViewJson {
            applied: false,
            elevation: 0.0,
            azimuth: 0.0,
            radius: 0.0,
        },
    };
    let meta = format::RecordJson {
        key: k,
        subject: &subject.name,
        category: &subject.category,
        prompt: &out.record.prompt,
        template: &out.record.template,
        taxonomy: &out.record.taxonomy,
        seed: out.record.seed,
        view,
        placement: format::PlacementJson {
            x,
            y,
            width,
            height,
        },
        scores: out.scores,
        kept: out.kept,
        reason: out.reason.unwrap_or_default(),
        edit: out.kept,
        settings: format::SettingsJson {
            draft: &cfg.draft,
            refine: &cfg.refine,
            view: &cfg.view,
            place: &cfg.place,
            filter: &cfg.filter,
            resolution: cfg.job.resolution,
        },
        models: ids,
    };
    w.add(
        k,
        member::JSON,
        serde_json::to_string_pretty(&meta)?.as_bytes(),
    )
}

/// Removes temporary files a killed run left for `shards`.
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

/// One device and its models per worker.
type Workers = Vec<(Device, StageModels)>;

/// Everything that must succeed before any work and before job.json claims the folder: the plan
/// (config, subjects, slice, output folder, an earlier job's file compared), the devices, and
/// every worker's models (loaded in parallel). Returns the plan, the unfinished shards and the
/// workers; nothing to do loads no models.
fn setup(o: &Options) -> Result<(Plan, Vec<usize>, Workers)> {
    let plan = resolve(o)?;
    let todo: Vec<usize> = plan
        .mine
        .iter()
        .copied()
        .filter(|&i| !ShardFiles::new(&o.out, i).stats.is_file())
        .collect();
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
    std::fs::create_dir_all(&o.out)
        .with_context(|| format!("{}: cannot create the output folder", o.out.display()))?;
    write_job_file(&o.out, &plan.job)?;
    Ok((plan, todo, devices.into_iter().zip(models).collect()))
}

/// Builds this process's unfinished shards, one worker per device (shard k of the remaining ones
/// goes to worker k mod workers). A failure before the work starts is a `SetupError`.
pub fn run(o: &Options) -> Result<Summary> {
    let (plan, todo, workers) = setup(o).map_err(|e| anyhow::Error::new(super::SetupError(e)))?;
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
                let plan = &plan;
                let todo = &todo;
                let progress = &progress;
                scope.spawn(move || -> Result<(usize, bool)> {
                    let mut done = 0;
                    for &shard in todo.iter().skip(w).step_by(n) {
                        match build_shard(plan, o, models, shard, dev)? {
                            Some(s) => {
                                let (records, total) = progress.shard_done(&s);
                                if let Some(cb) = &o.on_shard {
                                    cb(records, total);
                                }
                                done += 1;
                            }
                            None => return Ok((done, true)),
                        }
                    }
                    Ok((done, false))
                })
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
    Ok(Summary {
        stats,
        shards_done: done,
        shards_skipped: skipped,
        stopped,
    })
}
