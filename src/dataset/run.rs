//! `toffee pairs`: resolve the options into a checked plan before any model loads, then build
//! this process's shards.

use super::config::PairsConfig;
use super::format::{self, ShardFiles, Stats};
use super::job::{resolve, write_job_file, Options, Plan};
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
use std::path::Path;

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
        None if m.draft.is_none() => Some(crate::builtin::segmenter(true, cfg.mask, device)?),
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
