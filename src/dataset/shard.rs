//! Building one shard as a pipeline: a reader thread decodes the subjects (each once) and forms
//! batches, the calling thread runs the stages on the device, a writer thread encodes PNGs and
//! appends them to the tar; bounded queues of two batches keep memory flat. Then the tar is
//! committed, then the shard's index lines, then its stats (which mark it done).

use super::config::PairsConfig;
use super::format::{self, jsonl, member, IndexLine, ShardFiles, Stats};
use super::job::{model_ids, Options, Plan};
use super::plan::{Record, Subject};
use super::stages::{self, Outcome, StageModels, SubjectData, Timings};
use super::writer::{png_bytes, write_text, ShardWriter};
use crate::backend::Device;
use anyhow::{Context, Result};
use crossbeam_channel::{Receiver, Sender};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// The records of shard `shard` in the plan.
pub fn shard_records(plan: &Plan, shard: usize) -> &[Record] {
    let size = plan.cfg.job.shard_size;
    let start = shard * size;
    &plan.records[start..(start + size).min(plan.records.len())]
}

/// Subjects of one shard, loaded once each; the failures with their reasons.
type Loaded = BTreeMap<usize, stages::LoadedSubject>;

/// A batch on its way to the device: records and their subjects.
type Batch = (Vec<Record>, Vec<SubjectData>);

/// What the writer thread of a shard collected: the tar, and the tally.
struct Written {
    writer: ShardWriter,
    tally: Tally,
}

#[derive(Default)]
struct Tally {
    index: Vec<IndexLine>,
    records: usize,
    kept: usize,
    rejections: BTreeMap<String, usize>,
    seconds: f64,
}

impl Tally {
    /// The shard's counts and times as the writer saw them.
    fn stats(&self, cfg: &PairsConfig, seconds: f64) -> Stats {
        Stats {
            records: self.records,
            kept: self.kept,
            rejected: self.records - self.kept,
            rejections: self.rejections.clone(),
            thresholds: thresholds(cfg),
            seconds,
            pairs_per_hour: format::per_hour(self.kept, seconds),
            work_seconds: seconds,
            ..Stats::default()
        }
    }
}

/// What the reader thread of a shard saw.
#[derive(Default)]
struct ReadStats {
    skipped_subjects: BTreeMap<String, usize>,
    skipped_records: usize,
    seconds: f64,
}

/// Builds shard `shard` on `dev`. Returns None when stopped (the shard is dropped).
pub fn build_shard(
    plan: &Plan,
    o: &Options,
    models: &StageModels,
    shard: usize,
    dev: &Device,
) -> Result<Option<Stats>> {
    let clock = Instant::now();
    let started = format::unix_now();
    // Shards of one device share its models sequentially, so the counter's growth over this
    // call is this shard's.
    let evaluations_before = models.evaluations();
    let name = format::shard_name(shard);
    let files = ShardFiles::new(&o.out, shard);
    let writer = ShardWriter::create(&files.tar)?;
    let mut t = Timings::default();
    // Masks for unmasked subjects come from the device models, so those subjects are loaded
    // and masked here, on the device thread, before the reader starts; the reader takes them.
    let made = stages::load_and_mask(
        models,
        &plan.subjects,
        shard_records(plan, shard).iter().map(|r| r.subject),
    )
    .with_context(|| format!("shard {name}: masking subjects"))?;
    let (batch_tx, batch_rx) = crossbeam_channel::bounded::<Batch>(2);
    let (out_tx, out_rx) = crossbeam_channel::bounded::<Vec<Outcome>>(2);
    let tar_name = format!("{name}.tar");
    let (read, written, worked) = std::thread::scope(|sc| {
        let reader = sc.spawn(|| read_batches(plan, shard, made, batch_tx));
        let writer_thread = sc.spawn(|| write_outcomes(plan, o, writer, &tar_name, out_rx));
        let worked = run_batches(models, &plan.cfg, o, dev, &name, batch_rx, out_tx, &mut t);
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
    if written.tally.index.iter().any(|l| !l.shard.is_empty()) {
        written.writer.commit()?;
    } else {
        written.writer.abandon();
    }
    write_text(&files.index, &jsonl(&written.tally.index)?)?;
    (t.load, t.write) = (read.seconds, written.tally.seconds);
    let seconds = clock.elapsed().as_secs_f64();
    let stats = Stats {
        skipped_records: read.skipped_records,
        skipped_subjects: read.skipped_subjects,
        stage_seconds: t,
        started,
        finished: started + seconds,
        device: format!("{} ({})", dev.name(), dev.storage()),
        unet_evaluations: models.evaluations() - evaluations_before,
        ..written.tally.stats(&plan.cfg, seconds)
    };
    write_text(&files.stats, &serde_json::to_string_pretty(&stats)?)?;
    Ok(Some(stats))
}

fn thresholds(cfg: &PairsConfig) -> BTreeMap<String, f32> {
    [
        ("dino", cfg.filter.dino),
        ("clip_i", cfg.filter.clip_i),
        ("clip_t", cfg.filter.clip_t),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The reader thread: the shard's subjects decoded (each once; `made` holds those masked on the
/// device already), batches of `job.batch` records sent to the device.
fn read_batches(plan: &Plan, shard: usize, mut made: Loaded, tx: Sender<Batch>) -> ReadStats {
    let clock = Instant::now();
    let cfg = &plan.cfg;
    let mut rs = ReadStats::default();
    let mut loaded: Loaded = BTreeMap::new();
    let mut batch: Batch = (Vec::new(), Vec::new());
    for r in shard_records(plan, shard) {
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
        if batch.0.len() == cfg.job.batch && tx.send(std::mem::take(&mut batch)).is_err() {
            break;
        }
    }
    if !batch.0.is_empty() {
        let _ = tx.send(batch);
    }
    rs.seconds = clock.elapsed().as_secs_f64();
    rs
}

/// The device loop, on the calling thread: each batch through every stage, until the reader is
/// done, a stop is asked for (Ok(true)) or a batch fails.
#[allow(clippy::too_many_arguments)]
fn run_batches(
    models: &StageModels,
    cfg: &PairsConfig,
    o: &Options,
    dev: &Device,
    name: &str,
    rx: Receiver<Batch>,
    tx: Sender<Vec<Outcome>>,
    t: &mut Timings,
) -> Result<bool> {
    for (records, subjects) in rx.iter() {
        if o.stop.load(Ordering::SeqCst) {
            return Ok(true);
        }
        let outcomes = run_batch_or_halves(models, cfg, &records, &subjects, t, dev)
            .map_err(|e| e.context(format!("shard {name}")))?;
        if tx.send(outcomes).is_err() {
            break; // the writer failed; its error is reported by the caller
        }
    }
    Ok(false)
}

/// The writer thread: each outcome's index line, and its members in the tar when it is kept (or
/// rejected records are kept too).
fn write_outcomes(
    plan: &Plan,
    o: &Options,
    writer: ShardWriter,
    tar_name: &str,
    rx: Receiver<Vec<Outcome>>,
) -> Result<Written> {
    let ids = model_ids(&plan.cfg);
    let mut w = Written {
        writer,
        tally: Tally::default(),
    };
    for outcomes in rx {
        let clock = Instant::now();
        for out in &outcomes {
            let subject = &plan.subjects[out.record.subject];
            let in_tar = out.kept || o.keep_rejected;
            if in_tar {
                if let Err(e) = write_record(&mut w.writer, out, subject, &plan.cfg, &ids) {
                    w.writer.abandon();
                    return Err(e);
                }
            }
            let t = &mut w.tally;
            t.records += 1;
            if out.kept {
                t.kept += 1;
            } else {
                let reason = out.reason.unwrap_or("?").to_string();
                *t.rejections.entry(reason).or_default() += 1;
            }
            t.index
                .push(index_line(out, subject, in_tar.then_some(tar_name)));
        }
        w.tally.seconds += clock.elapsed().as_secs_f64();
    }
    Ok(w)
}

fn index_line(out: &Outcome, subject: &Subject, tar: Option<&str>) -> IndexLine {
    IndexLine {
        key: out.record.key.clone(),
        shard: tar.unwrap_or_default().to_string(),
        subject: subject.name.clone(),
        prompt: out.record.prompt.clone(),
        template: out.record.template.clone(),
        taxonomy: out.record.taxonomy.clone(),
        seed: out.record.seed,
        scores: out.scores,
        kept: out.kept,
        reason: out.reason.unwrap_or_default().to_string(),
        edit: out.kept,
    }
}

/// A batch through every stage; when it fails and the device recovers (an out-of-memory), the
/// two halves on their own.
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
            let (r, s) = (records.split_at(half), subjects.split_at(half));
            let mut a = run_batch_or_halves(models, cfg, r.0, s.0, t, dev)?;
            a.extend(run_batch_or_halves(models, cfg, r.1, s.1, t, dev)?);
            Ok(a)
        }
        Err(e) => Err(e),
    }
}

/// The record's members in the tar: its images and `KEY.json`.
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
    let meta = record_json(out, subject, cfg, ids);
    w.add(
        k,
        member::JSON,
        serde_json::to_string_pretty(&meta)?.as_bytes(),
    )
}

fn record_json<'a>(
    out: &'a Outcome,
    subject: &'a Subject,
    cfg: &'a PairsConfig,
    ids: &'a serde_json::Value,
) -> format::RecordJson<'a> {
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
    format::RecordJson {
        key: &out.record.key,
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
    }
}
