//! The stages of one record, batched across records: load the subject, optionally turn it to a
//! new view, place it on a canvas (the placement is the target mask), Canny edges, the draft
//! (text-to-image + ControlNet), the Refiner (img2img with the subject as the adapter's image,
//! restricted to the dilated target mask), and the DINO / CLIP-I / CLIP-T scores.
//!
//! Every random choice of a record (view, pose, scale, position, noise) comes from its seed, so a
//! record's result does not depend on the batch it ran in.

use super::config::PairsConfig;
use super::plan::{fnv64, unit, Record, Subject, SubjectSource};
use crate::backend::Device;
use crate::canny;
use crate::image_io;
use crate::models::adapter::{Adapter, AdapterKind};
use crate::pipeline::image_prompt::image_prompts;
use crate::pipeline::mask::Segmenter;
use crate::pipeline::noise::NoiseSource;
use crate::pipeline::score::{ImageEncoder, Mask, ScoreInput, Scorer, Scores};
use crate::pipeline::view::{Pose, View, ViewGenerator, ViewRequest};
use crate::pipeline::{Control, Generator, ImagePrompt, Init, Request};
use crate::sched::SchedulerKind;
use crate::tensor::Tensor;
use anyhow::{bail, Context, Result};
use std::time::Instant;

/// Every model the job uses, loaded once per worker.
impl StageModels {
    /// UNet evaluations (per sample) of every stage's models so far.
    pub fn evaluations(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        self.draft.evaluations.load(Relaxed)
            + self
                .refiner
                .as_ref()
                .map_or(0, |r| r.evaluations.load(Relaxed))
            + self
                .view
                .as_ref()
                .map_or(0, |v| v.evaluations.load(Relaxed))
    }
}

pub struct StageModels {
    /// The draft pipeline with its ControlNet (and the adapter, when the Refiner shares it).
    pub draft: Generator,
    /// A separate Refiner pipeline (with the adapter attached), when it is another folder.
    pub refiner: Option<Generator>,
    /// The adapter's image encoder; None when it is the DINO model of the scores (one folder
    /// named by two stages is loaded once).
    pub adapter_encoder: Option<ImageEncoder>,
    pub view: Option<ViewGenerator>,
    pub scorer: Scorer,
    /// Masks subjects that have neither a mask file nor alpha (None: they are the whole image).
    pub segmenter: Option<Segmenter>,
}

impl StageModels {
    /// One batch of every generating stage against the memory budget on `device`, before any
    /// work (the run's setup and `--check`): a job.batch × job.resolution that cannot fit is a
    /// setup error naming those fields, not every shard failing on its first batch.
    pub fn check_budget(&self, cfg: &PairsConfig, device: &Device) -> Result<()> {
        let (n, r) = (cfg.job.batch, cfg.job.resolution);
        let stage = |name: &str| format!("{name}: job.batch {n} at job.resolution {r}");
        self.draft
            .check_budget(device, n, (r, r), cfg.draft.guidance)
            .with_context(|| stage("draft"))?;
        self.refiner()
            .check_budget(device, n, (r, r), cfg.refine.guidance)
            .with_context(|| stage("refine"))?;
        if let Some(v) = &self.view {
            let s = v.default_size;
            v.check_budget(device, n, (s, s), cfg.view.guidance)
                .with_context(|| format!("view: job.batch {n} at the view model's size {s}"))?;
        }
        Ok(())
    }

    fn refiner(&self) -> &Generator {
        self.refiner.as_ref().unwrap_or(&self.draft)
    }

    fn adapter_encoder(&self) -> &ImageEncoder {
        self.adapter_encoder.as_ref().unwrap_or(&self.scorer.dino)
    }
}

/// A subject ready for the stages: RGB [1, H, W, 3] and mask [1, H, W, 1] in [0, 1].
#[derive(Clone)]
pub struct SubjectData {
    pub rgb: Tensor,
    pub mask: Tensor,
}

/// Why a subject could not be used (counted in the stats, the run goes on).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    Unreadable,
    MaskSize,
    EmptyMask,
    /// A made mask covers (nearly) the whole image: the segmenter matched everything.
    MaskWholeImage,
}

impl SkipReason {
    pub fn name(self) -> &'static str {
        match self {
            SkipReason::Unreadable => "unreadable",
            SkipReason::MaskSize => "mask_size",
            SkipReason::EmptyMask => "empty_mask",
            SkipReason::MaskWholeImage => "mask_whole_image",
        }
    }
}

/// A subject ready for the stages, or why it is skipped.
pub type LoadedSubject = std::result::Result<SubjectData, (SkipReason, String)>;

/// With a segmenter: the subjects among `subjects` that are image files without a mask file,
/// loaded here (each decoded once), those without alpha masked from their category by the
/// segmenter. This runs on the device thread; the reader takes these instead of loading them
/// again. A made mask that is empty or covers the whole image (`[mask]` min_area / max_area) is a
/// skip reason, not an error; an unreadable image is left to `load_subject` to report.
pub fn load_and_mask(
    models: &StageModels,
    all: &[Subject],
    subjects: impl Iterator<Item = usize>,
) -> Result<std::collections::BTreeMap<usize, LoadedSubject>> {
    use crate::pipeline::mask::MaskVerdict;
    let mut made = std::collections::BTreeMap::new();
    let Some(seg) = &models.segmenter else {
        return Ok(made);
    };
    for i in subjects {
        if made.contains_key(&i) {
            continue;
        }
        let s = &all[i];
        let SubjectSource::File { image, mask: None } = &s.source else {
            continue;
        };
        let Ok(img) = image_io::load(image) else {
            continue;
        };
        if let Some(alpha) = img.alpha {
            made.insert(i, checked(s, img.rgb, alpha));
            continue;
        }
        let m = seg
            .segment(&image_io::to_rgb8(&img.rgb), &s.category)
            .with_context(|| format!("subject `{}` ({})", s.name, image.display()))?;
        let why = |what: &str| {
            format!(
                "{}: the mask made for `{}` {what} ({:.1}% of the image)",
                image.display(),
                s.category,
                100.0 * m.area()
            )
        };
        let loaded = match m.verdict {
            MaskVerdict::Ok => {
                let v = m.mask.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect();
                checked(s, img.rgb, Tensor::new(vec![1, m.height, m.width, 1], v))
            }
            MaskVerdict::Empty => Err((SkipReason::EmptyMask, why("is empty"))),
            MaskVerdict::WholeImage => {
                Err((SkipReason::MaskWholeImage, why("covers the whole image")))
            }
        };
        made.insert(i, loaded);
    }
    Ok(made)
}

/// Loads a subject: its mask from the given file, else its alpha, else the whole image.
pub fn load_subject(s: &Subject) -> LoadedSubject {
    let (rgb, mask) = match &s.source {
        SubjectSource::Builtin(i) => super::builtin::subject(*i),
        SubjectSource::File { image, mask } => {
            let img =
                image_io::load(image).map_err(|e| (SkipReason::Unreadable, format!("{e:#}")))?;
            let (_, h, w, _) = img.rgb.dims4();
            let mask = match (mask, img.alpha) {
                (Some(m), _) => {
                    let t = image_io::load_mask(m)
                        .map_err(|e| (SkipReason::Unreadable, format!("{e:#}")))?;
                    let (_, mh, mw, _) = t.dims4();
                    if (mh, mw) != (h, w) {
                        return Err((
                            SkipReason::MaskSize,
                            format!(
                                "{}: the mask is {mw}x{mh} but the image {} is {w}x{h}",
                                m.display(),
                                image.display()
                            ),
                        ));
                    }
                    t
                }
                (None, Some(a)) => a,
                (None, None) => Tensor::new(vec![1, h, w, 1], vec![1.0; h * w]),
            };
            (img.rgb, mask)
        }
    };
    checked(s, rgb, mask)
}

/// The subject, unless its mask is empty.
fn checked(s: &Subject, rgb: Tensor, mask: Tensor) -> LoadedSubject {
    if !mask.data().iter().any(|&v| v >= 0.5) {
        return Err((
            SkipReason::EmptyMask,
            format!("subject `{}`: the mask is empty", s.name),
        ));
    }
    Ok(SubjectData { rgb, mask })
}

/// Seconds spent per stage.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Timings {
    pub load: f64,
    pub view: f64,
    pub draft: f64,
    pub refine: f64,
    pub score: f64,
    pub write: f64,
}

impl Timings {
    /// (stage, seconds) in pipeline order.
    pub fn named(&self) -> [(&'static str, f64); 6] {
        [
            ("load", self.load),
            ("view", self.view),
            ("draft", self.draft),
            ("refine", self.refine),
            ("score", self.score),
            ("write", self.write),
        ]
    }

    pub fn add(&mut self, o: &Timings) {
        self.load += o.load;
        self.view += o.view;
        self.draft += o.draft;
        self.refine += o.refine;
        self.score += o.score;
        self.write += o.write;
    }
}

/// What one record produced.
pub struct Outcome {
    pub record: Record,
    pub subject: SubjectData,
    /// The placed-subject mask (where the subject is in the target).
    pub target_mask: Tensor,
    /// The dilated target mask that restricted the Refiner (the editing pair's mask).
    pub edit_mask: Tensor,
    /// The draft (the editing pair's source).
    pub draft: Tensor,
    /// The refined image (the target).
    pub target: Tensor,
    pub scores: Scores,
    pub kept: bool,
    /// The first threshold that failed.
    pub reason: Option<&'static str>,
    pub view: Option<Pose>,
    pub placement: Placement,
}

fn scheduler(name: &str) -> Option<SchedulerKind> {
    (!name.is_empty()).then(|| name.parse().expect("checked when the config was read"))
}

fn stream(seed: u64, what: &str) -> u64 {
    fnv64(&[&seed.to_le_bytes(), what.as_bytes()])
}

/// Rows `y0..y0+h`, columns `x0..x0+w` of an NHWC image.
fn crop(t: &Tensor, x0: usize, y0: usize, w: usize, h: usize) -> Tensor {
    let (_, _, tw, c) = t.dims4();
    let mut out = Vec::with_capacity(w * h * c);
    for y in y0..y0 + h {
        out.extend_from_slice(&t.data()[(y * tw + x0) * c..(y * tw + x0 + w) * c]);
    }
    Tensor::new(vec![1, h, w, c], out)
}

/// Bounding box (x0, y0, w, h) of mask pixels ≥ 0.5.
fn bbox(mask: &Tensor) -> Option<(usize, usize, usize, usize)> {
    let m = Mask::from_tensor(mask);
    m.bbox().map(|(x0, y0, x1, y1)| {
        (
            x0 as usize,
            y0 as usize,
            (x1 - x0) as usize,
            (y1 - y0) as usize,
        )
    })
}

/// The subject composited on white by its mask.
fn on_white(s: &SubjectData) -> Tensor {
    image_io::on_white(&s.rgb, &s.mask)
}

/// (x, y, width, height) of a placed subject on the canvas.
pub type Placement = (usize, usize, usize, usize);

/// Places the subject's masked crop on an R×R mid-gray canvas at a size and position drawn
/// from `seed`. Returns (canvas, binary target mask, placement).
pub fn place(
    s: &SubjectData,
    r: usize,
    seed: u64,
    cfg: &PairsConfig,
) -> Result<(Tensor, Tensor, Placement)> {
    let Some((x0, y0, cw, ch)) = bbox(&s.mask) else {
        bail!("the subject mask is empty");
    };
    let p = &cfg.place;
    let share = p.scale_min + (p.scale_max - p.scale_min) * unit(seed, "scale");
    let long = ((share * r as f64).round() as usize).clamp(1, r);
    let f = long as f64 / cw.max(ch) as f64;
    let (w, h) = (
        ((cw as f64 * f).round() as usize).clamp(1, r),
        ((ch as f64 * f).round() as usize).clamp(1, r),
    );
    let x = ((unit(seed, "x") * (r - w + 1) as f64) as usize).min(r - w);
    let y = ((unit(seed, "y") * (r - h + 1) as f64) as usize).min(r - h);
    let rgb = image_io::fit(&crop(&s.rgb, x0, y0, cw, ch), w, h);
    let m = image_io::fit(&crop(&s.mask, x0, y0, cw, ch), w, h);
    let mut canvas = vec![0.5f32; r * r * 3];
    let mut target = vec![0.0f32; r * r];
    for yy in 0..h {
        for xx in 0..w {
            if m.data()[yy * w + xx] >= 0.5 {
                let p = (y + yy) * r + x + xx;
                target[p] = 1.0;
                canvas[p * 3..p * 3 + 3]
                    .copy_from_slice(&rgb.data()[(yy * w + xx) * 3..(yy * w + xx) * 3 + 3]);
            }
        }
    }
    Ok((
        Tensor::new(vec![1, r, r, 3], canvas),
        Tensor::new(vec![1, r, r, 1], target),
        (x, y, w, h),
    ))
}

/// Binary dilation of a [1, H, W, 1] mask by `radius` pixels (a square window).
pub fn dilate(mask: &Tensor, radius: usize) -> Tensor {
    let (_, h, w, _) = mask.dims4();
    let src: Vec<bool> = mask.data().iter().map(|&v| v >= 0.5).collect();
    // Separable: rows, then columns.
    let mut rows = vec![false; h * w];
    for y in 0..h {
        for x in 0..w {
            let (a, b) = (x.saturating_sub(radius), (x + radius).min(w - 1));
            rows[y * w + x] = (a..=b).any(|xx| src[y * w + xx]);
        }
    }
    let mut out = vec![0.0f32; h * w];
    for y in 0..h {
        for x in 0..w {
            let (a, b) = (y.saturating_sub(radius), (y + radius).min(h - 1));
            out[y * w + x] = (a..=b).any(|yy| rows[yy * w + x]) as u8 as f32;
        }
    }
    Tensor::new(vec![1, h, w, 1], out)
}

/// A zero-scale image prompt: the draft runs through a UNet that carries the Refiner's adapter
/// (a shared folder) exactly as without it.
fn inert_prompt(a: &Adapter, layers: usize) -> ImagePrompt {
    let shape = match a.kind {
        AdapterKind::Plain => vec![1, a.image_embed_dim],
        _ => vec![1, 1, a.image_embed_dim],
    };
    ImagePrompt {
        positive: Tensor::zeros(shape.clone()),
        negative: Tensor::zeros(shape),
        scales: vec![0.0; layers],
    }
}

/// The view stage for the records that draw one: their subjects replaced by new views (the
/// mask: pixels away from the white background). Returns the pose of each record, or None.
fn views(
    models: &StageModels,
    cfg: &PairsConfig,
    records: &[Record],
    subjects: &mut [SubjectData],
) -> Result<Vec<Option<Pose>>> {
    let v = &cfg.view;
    let mut poses = vec![None; records.len()];
    let Some(gen) = &models.view else {
        return Ok(poses);
    };
    let pick = |list: &[f32], seed: u64, what: &str| {
        list[(unit(seed, what) * list.len() as f64) as usize % list.len()]
    };
    let chosen: Vec<usize> = (0..records.len())
        .filter(|&i| unit(records[i].seed, "view") < v.probability)
        .collect();
    if chosen.is_empty() {
        return Ok(poses);
    }
    let size = gen.default_size;
    let req = ViewRequest {
        subjects: chosen
            .iter()
            .map(|&i| {
                let w = image_io::fit(&on_white(&subjects[i]), size, size);
                Tensor::new(
                    w.shape().to_vec(),
                    w.data()
                        .iter()
                        .map(|x| (x * 255.0).round() / 255.0)
                        .collect(),
                )
            })
            .collect(),
        views: chosen
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let seed = records[i].seed;
                let pose = Pose {
                    polar: pick(&v.elevations, seed, "elevation"),
                    azimuth: pick(&v.azimuths, seed, "azimuth"),
                    radius: 0.0,
                };
                poses[i] = Some(pose);
                View { subject: k, pose }
            })
            .collect(),
        steps: v.steps,
        guidance: v.guidance,
        scheduler: None,
        seed: 0,
        batch: chosen.len(),
    };
    let seeds = chosen
        .iter()
        .map(|&i| stream(records[i].seed, "view"))
        .collect();
    let (_, images) = gen.run_chunk(
        &req,
        0,
        chosen.len(),
        &mut NoiseSource::seeded(seeds),
        &mut |_, _| {},
    )?;
    for (k, &i) in chosen.iter().enumerate() {
        let img = images.narrow0(k, 1);
        // Zero123 renders on white: the subject is what is clearly not white.
        let mask: Vec<f32> = img
            .data()
            .chunks(3)
            .map(|p| (p.iter().map(|c| 1.0 - c).fold(0.0f32, f32::max) > 0.08) as u8 as f32)
            .collect();
        if mask.iter().any(|&m| m > 0.0) {
            subjects[i] = SubjectData {
                mask: Tensor::new(vec![1, size, size, 1], mask),
                rgb: img,
            };
        } else {
            poses[i] = None;
        }
    }
    Ok(poses)
}

/// Runs every stage for a batch of records whose subjects loaded.
pub fn run_batch(
    models: &StageModels,
    cfg: &PairsConfig,
    records: &[Record],
    subjects: &[SubjectData],
    t: &mut Timings,
) -> Result<Vec<Outcome>> {
    let mut placed_from = subjects.to_vec();
    let poses = timed(&mut t.view, tracing::info_span!("view"), || {
        views(models, cfg, records, &mut placed_from)
    })?;
    let drafted = timed(&mut t.draft, tracing::info_span!("draft"), || {
        draft(models, cfg, records, &placed_from)
    })?;
    let (targets, edit_masks) = timed(&mut t.refine, tracing::info_span!("refine"), || {
        refine(models, cfg, records, subjects, &drafted)
    })?;
    let scores = timed(&mut t.score, tracing::info_span!("score"), || {
        score(models, records, subjects, &targets, &drafted.masks)
    })?;
    Ok((0..records.len())
        .map(|i| {
            let reason = match &scores[i] {
                Some(s) => cfg.filter.rejects(s),
                None => Some(EMPTY_TARGET),
            };
            Outcome {
                record: records[i].clone(),
                subject: subjects[i].clone(),
                target_mask: drafted.masks[i].clone(),
                edit_mask: edit_masks[i].clone(),
                draft: drafted.images.narrow0(i, 1),
                target: targets.narrow0(i, 1),
                scores: scores[i].unwrap_or(Scores {
                    dino: 0.0,
                    clip_i: 0.0,
                    clip_t: 0.0,
                }),
                kept: reason.is_none(),
                reason,
                view: poses[i],
                placement: drafted.placements[i],
            }
        })
        .collect())
}

/// `f` inside the stage's tracing span (`--profile`), its time added to `seconds`.
fn timed<T>(seconds: &mut f64, span: tracing::Span, f: impl FnOnce() -> T) -> T {
    let clock = Instant::now();
    let _span = span.entered();
    let out = f();
    *seconds += clock.elapsed().as_secs_f64();
    out
}

/// The draft stage's output: the images, and where each subject was placed.
struct Drafted {
    images: Tensor,
    masks: Vec<Tensor>,
    placements: Vec<Placement>,
}

/// Places each subject on its canvas and drafts the scene around its Canny edges.
fn draft(
    models: &StageModels,
    cfg: &PairsConfig,
    records: &[Record],
    placed_from: &[SubjectData],
) -> Result<Drafted> {
    let (n, r) = (records.len(), cfg.job.resolution);
    let mut canvases = Vec::new();
    let mut masks = Vec::new();
    let mut placements = Vec::new();
    for (rec, s) in records.iter().zip(placed_from) {
        let (c, m, p) = place(s, r, stream(rec.seed, "place"), cfg)?;
        canvases.push(canny::canny(&c, cfg.draft.canny_low, cfg.draft.canny_high));
        masks.push(m);
        placements.push(p);
    }
    let edges = Tensor::cat0(&canvases.iter().collect::<Vec<_>>());
    // One control image per record, doubled for the unconditional half under guidance.
    let control = models.draft.controlnet.as_ref().map(|_| Control {
        image: if cfg.draft.guidance > 1.0 {
            Tensor::cat0(&[&edges, &edges])
        } else {
            edges
        },
        scale: cfg.draft.controlnet_scale,
    });
    let layers = models.draft.unet.cross_attention_layers();
    let req = Request {
        prompts: records.iter().map(|r| r.prompt.clone()).collect(),
        negative: None,
        images_per_prompt: 1,
        steps: cfg.draft.steps,
        guidance: cfg.draft.guidance,
        width: r,
        height: r,
        scheduler: scheduler(&cfg.draft.scheduler),
        seed: 0,
        batch: n,
        init: crate::pipeline::request::txt2img_init(&models.draft, n, r, r),
        control,
        init_latents: None,
        image_prompts: models
            .draft
            .adapters
            .iter()
            .map(|a| inert_prompt(a, layers))
            .collect(),
    };
    let seeds = records.iter().map(|r| stream(r.seed, "draft")).collect();
    let images = models
        .draft
        .run_chunk(&req, 0, n, &mut NoiseSource::seeded(seeds), &mut |_, _| {})?
        .images;
    Ok(Drafted {
        images,
        masks,
        placements,
    })
}

/// Refines each draft inside its dilated subject mask with the subject as the adapter's image.
/// Returns the targets and the masks the Refiner changed.
fn refine(
    models: &StageModels,
    cfg: &PairsConfig,
    records: &[Record],
    subjects: &[SubjectData],
    drafted: &Drafted,
) -> Result<(Tensor, Vec<Tensor>)> {
    let (n, r) = (records.len(), cfg.job.resolution);
    let refiner = models.refiner();
    let subject_images: Vec<image::RgbImage> = subjects
        .iter()
        .map(|s| image_io::to_rgb8(&on_white(s)))
        .collect();
    let prompt = image_prompts(
        &refiner.adapters[0],
        models.adapter_encoder(),
        &subject_images,
        cfg.refine.scale,
        refiner.unet.cross_attention_layers(),
    )?;
    let edit_masks: Vec<Tensor> = drafted
        .masks
        .iter()
        .map(|m| dilate(m, cfg.refine.mask_dilation))
        .collect();
    let req = Request {
        prompts: records.iter().map(|r| r.prompt.clone()).collect(),
        negative: None,
        images_per_prompt: 1,
        steps: cfg.refine.steps,
        guidance: cfg.refine.guidance,
        width: r,
        height: r,
        scheduler: scheduler(&cfg.refine.scheduler),
        seed: 0,
        batch: n,
        init: Init::Inpaint {
            image: drafted.images.clone(),
            mask: Tensor::cat0(&edit_masks.iter().collect::<Vec<_>>()),
            strength: cfg.refine.strength,
        },
        control: None,
        init_latents: None,
        image_prompts: vec![prompt],
    };
    let seeds = records.iter().map(|r| stream(r.seed, "refine")).collect();
    let targets = refiner
        .run_chunk(&req, 0, n, &mut NoiseSource::seeded(seeds), &mut |_, _| {})?
        .images;
    Ok((targets, edit_masks))
}

/// The rejection of a record whose placed subject covers no pixel (a tiny `place.scale` at a
/// small resolution): there is nothing to score, and it is one record's failure, not the run's.
pub const EMPTY_TARGET: &str = "empty_target_mask";

/// DINO, CLIP-I and CLIP-T of each target against its subject (inside the masks) and prompt;
/// None where the target mask is empty (`EMPTY_TARGET`).
fn score(
    models: &StageModels,
    records: &[Record],
    subjects: &[SubjectData],
    targets: &Tensor,
    masks: &[Tensor],
) -> Result<Vec<Option<Scores>>> {
    let scored: Vec<usize> = (0..records.len())
        .filter(|&i| Mask::from_tensor(&masks[i]).bbox().is_some())
        .collect();
    let inputs: Vec<ScoreInput> = scored
        .iter()
        .map(|&i| ScoreInput {
            subject: image_io::to_rgb8(&subjects[i].rgb),
            subject_mask: Some(Mask::from_tensor(&subjects[i].mask)),
            target: image_io::to_rgb8(&targets.narrow0(i, 1)),
            target_mask: Some(Mask::from_tensor(&masks[i])),
            prompt: records[i].prompt.clone(),
            name: records[i].key.clone(),
        })
        .collect();
    let mut out = vec![None; records.len()];
    for (i, s) in scored.into_iter().zip(models.scorer.score(&inputs)?) {
        out[i] = Some(s);
    }
    Ok(out)
}
