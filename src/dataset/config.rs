//! `pairs.toml`: which model each stage uses and its settings. Every field has a default
//! (`toffee pairs --print-config` writes them); unknown fields are errors naming the file.

use crate::pipeline::request::{Mode, Naming, Settings};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Model folders per stage. A folder named by two stages is loaded once (the Refiner is usually
/// the draft's pipeline plus an adapter).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Models {
    /// Text-to-image pipeline folder of the draft (SD1.x / SD2.x / SDXL).
    pub draft: Option<PathBuf>,
    /// ControlNet folder (Canny) for the draft.
    pub controlnet: Option<PathBuf>,
    /// Pipeline folder of the Refiner (default: the draft's).
    pub refiner: Option<PathBuf>,
    /// The Refiner's adapter: a Toffee adapter folder or an IP-Adapter file.
    pub refiner_adapter: Option<PathBuf>,
    /// The adapter's image encoder (default: found beside the adapter).
    pub refiner_adapter_encoder: Option<PathBuf>,
    /// Zero1to3-layout View Generator folder (optional: no views without it).
    pub view: Option<PathBuf>,
    /// DINO v1 / DINOv2 folder for the DINO score.
    pub dino: Option<PathBuf>,
    /// CLIPModel folder for CLIP-I and CLIP-T.
    pub clip: Option<PathBuf>,
    /// CLIPSeg folder: subjects with neither a mask file nor alpha get a mask from their name
    /// (without it, such subjects are the whole image). The built-in demo uses a built-in one.
    pub segmenter: Option<PathBuf>,
    /// SAM folder: sharpens the segmenter's mask (prompted with its box); needs `segmenter`.
    pub sam: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Draft {
    pub steps: usize,
    pub guidance: f32,
    /// ddim, euler, euler-a, dpmpp-2m, dpmpp-2m-karras, pndm; empty: the pipeline's own.
    pub scheduler: String,
    pub controlnet_scale: f32,
    /// Canny thresholds on the placed subject.
    pub canny_low: f32,
    pub canny_high: f32,
    /// LoRAs fused into the draft model, "FILE[:WEIGHT]" (e.g. an LCM-LoRA with
    /// scheduler = "lcm", steps = 4, guidance = 1).
    pub lora: Vec<String>,
}

impl Default for Draft {
    fn default() -> Self {
        Draft {
            steps: 20,
            guidance: 7.5,
            scheduler: String::new(),
            controlnet_scale: 1.0,
            canny_low: 100.0,
            canny_high: 200.0,
            lora: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Refine {
    /// Denoising steps before the strength cut (img2img convention).
    pub steps: usize,
    pub guidance: f32,
    pub scheduler: String,
    /// How far the draft is noised (img2img strength).
    pub strength: f64,
    /// λ, the adapter's scale.
    pub scale: f32,
    /// The target mask is dilated by this many pixels before it restricts the refinement.
    pub mask_dilation: usize,
    /// LoRAs fused into the Refiner's model, "FILE[:WEIGHT]" (a Refiner with other LoRAs than
    /// the draft's loads its own copy of the model).
    pub lora: Vec<String>,
}

impl Default for Refine {
    fn default() -> Self {
        Refine {
            steps: 20,
            guidance: 7.5,
            scheduler: String::new(),
            strength: 0.5,
            scale: 0.8,
            mask_dilation: 8,
            lora: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ViewStage {
    /// Share of records whose subject is first turned to a new view (needs models.view).
    pub probability: f64,
    /// Polar (elevation) changes to pick from, degrees.
    pub elevations: Vec<f32>,
    /// Azimuth changes to pick from, degrees.
    pub azimuths: Vec<f32>,
    pub steps: usize,
    pub guidance: f32,
}

impl Default for ViewStage {
    fn default() -> Self {
        ViewStage {
            probability: 0.0,
            elevations: vec![-10.0, 0.0, 10.0],
            azimuths: vec![-60.0, -30.0, 30.0, 60.0],
            steps: 50,
            guidance: 3.0,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Place {
    /// The subject's longer side as a share of the canvas side, drawn uniformly in [min, max].
    pub scale_min: f64,
    pub scale_max: f64,
}

impl Default for Place {
    fn default() -> Self {
        Place {
            scale_min: 0.35,
            scale_max: 0.65,
        }
    }
}

/// A record is kept when every score reaches its threshold (raw cosines).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Filter {
    pub dino: f32,
    pub clip_i: f32,
    pub clip_t: f32,
}

impl Filter {
    /// The first threshold `s` fails, in the order dino, clip_i, clip_t; None: kept.
    pub fn rejects(&self, s: &crate::pipeline::score::Scores) -> Option<&'static str> {
        if s.dino < self.dino {
            Some("dino")
        } else if s.clip_i < self.clip_i {
            Some("clip_i")
        } else if s.clip_t < self.clip_t {
            Some("clip_t")
        } else {
            None
        }
    }
}

impl Default for Filter {
    fn default() -> Self {
        Filter {
            dino: 0.4,
            clip_i: 0.7,
            clip_t: 0.2,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Job {
    /// Side of the square target images in pixels (a multiple of 8).
    pub resolution: usize,
    /// Records (prompts) per subject.
    pub prompts_per_subject: usize,
    /// Records per shard: the unit of work, resume and scale-out.
    pub shard_size: usize,
    /// Records per model batch.
    pub batch: usize,
    pub seed: u64,
    /// A file of prompt templates (one per line, `{subject}` placeholder, optional
    /// `taxonomy<TAB>template`); empty: the built-in set.
    pub templates: Option<PathBuf>,
}

impl Default for Job {
    fn default() -> Self {
        Job {
            resolution: 512,
            prompts_per_subject: 4,
            shard_size: 64,
            batch: 4,
            seed: 0,
            templates: None,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PairsConfig {
    pub models: Models,
    pub draft: Draft,
    pub refine: Refine,
    pub view: ViewStage,
    pub place: Place,
    pub filter: Filter,
    /// How made masks are cut and judged (`segmenter`).
    pub mask: crate::pipeline::mask::MaskSettings,
    pub job: Job,
}

impl PairsConfig {
    /// Reads a TOML file; relative model paths are relative to the file's folder.
    pub fn read(path: &Path) -> Result<PairsConfig> {
        let text = crate::input::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let mut c: PairsConfig =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new(""));
        let m = &mut c.models;
        for p in [
            &mut m.draft,
            &mut m.controlnet,
            &mut m.refiner,
            &mut m.refiner_adapter,
            &mut m.refiner_adapter_encoder,
            &mut m.view,
            &mut m.dino,
            &mut m.clip,
            &mut m.segmenter,
            &mut m.sam,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        for l in c.draft.lora.iter_mut().chain(c.refine.lora.iter_mut()) {
            let spec: crate::weights::lora::LoraSpec = l.parse()?;
            if spec.path.is_relative() {
                *l = format!("{}:{}", base.join(&spec.path).display(), spec.scale);
            }
        }
        if let Some(t) = &mut c.job.templates {
            if t.is_relative() {
                *t = base.join(&*t);
            }
        }
        c.check(&path.display().to_string())?;
        Ok(c)
    }

    /// The defaults as TOML, with the model paths commented out.
    pub fn default_toml() -> String {
        let mut s = String::from(
            "# toffee pairs configuration: every value below is the default.\n\
             # Without [models] paths (or without --config), built-in tiny random-weight models run.\n\
             [models]\n\
             # draft = \"models/sd15\"                  # text-to-image pipeline folder\n\
             # controlnet = \"models/controlnet-canny\" # Canny ControlNet for the draft\n\
             # refiner = \"models/sd15\"                # default: the draft's pipeline (loaded once)\n\
             # refiner_adapter = \"models/toffee-adapter\" # Toffee adapter folder or IP-Adapter file\n\
             # refiner_adapter_encoder = \"models/dinov2-base\"\n\
             # view = \"models/zero123\"                # optional View Generator\n\
             # dino = \"models/dinov2-base\"\n\
             # clip = \"models/clip-vit-large-patch14\"\n\
             # segmenter = \"models/clipseg-rd64-refined\" # masks for subjects without one\n\
             # sam = \"models/sam-vit-base\"          # optional: sharpens the segmenter's masks\n\n",
        );
        let body = toml::to_string(&PairsConfig::default()).expect("the config serialises");
        // Drop the empty [models] table toml writes; it is above, commented.
        s.push_str(body.trim_start_matches("[models]\n").trim_start());
        s
    }

    /// Checks values that would only fail later (before any work starts).
    pub fn check(&self, origin: &str) -> Result<()> {
        self.check_numbers(origin)?;
        self.check_stages(origin)?;
        self.check_ranges(origin)?;
        for l in self.draft.lora.iter().chain(&self.refine.lora) {
            let spec: crate::weights::lora::LoraSpec = l
                .parse()
                .map_err(|e| anyhow::anyhow!("{origin}: lora `{l}`: {e}"))?;
            if !spec.path.is_file() {
                bail!("{origin}: lora `{}`: no such file", spec.path.display());
            }
        }
        self.mask.check(&format!("{origin}: [mask]"))?;
        if self.models.sam.is_some() && self.models.segmenter.is_none() {
            bail!("{origin}: models.sam refines the segmenter's masks: it needs models.segmenter");
        }
        for s in [&self.draft.scheduler, &self.refine.scheduler] {
            if !s.is_empty() {
                s.parse::<crate::sched::SchedulerKind>()
                    .map_err(|e| anyhow::anyhow!("{origin}: scheduler `{s}`: {e}"))?;
            }
        }
        Ok(())
    }

    /// Counts of at least one, and every real number finite: a NaN would slip through the
    /// comparisons below it (a NaN guidance turns guidance off, a NaN threshold keeps nothing).
    fn check_numbers(&self, origin: &str) -> Result<()> {
        let j = &self.job;
        for (name, v) in [
            ("job.prompts_per_subject", j.prompts_per_subject),
            ("job.shard_size", j.shard_size),
            ("job.batch", j.batch),
        ] {
            if v == 0 {
                bail!("{origin}: {name} must be at least 1");
            }
        }
        // The plan lists every record before the first one is drafted.
        for (name, v, max) in [
            ("job.prompts_per_subject", j.prompts_per_subject, 100_000),
            ("job.shard_size", j.shard_size, 1_000_000),
        ] {
            if v > max {
                bail!("{origin}: {name} {v} is larger than {max}");
            }
        }
        let (d, r, v, f) = (&self.draft, &self.refine, &self.view, &self.filter);
        let reals = [
            ("draft.canny_low", d.canny_low as f64),
            ("draft.canny_high", d.canny_high as f64),
            ("refine.scale", r.scale as f64),
            ("view.probability", v.probability),
            ("place.scale_min", self.place.scale_min),
            ("place.scale_max", self.place.scale_max),
            ("filter.dino", f.dino as f64),
            ("filter.clip_i", f.clip_i as f64),
            ("filter.clip_t", f.clip_t as f64),
        ];
        let angles = v.elevations.iter().map(|&a| ("view.elevations", a as f64));
        let angles = angles.chain(v.azimuths.iter().map(|&a| ("view.azimuths", a as f64)));
        for (name, x) in reals.into_iter().chain(angles) {
            if !x.is_finite() {
                bail!("{origin}: {name} = {x} is not a finite number");
            }
        }
        Ok(())
    }

    /// The draft's, the Refiner's and the views' settings, by the rules the CLI and the C ABI use
    /// (`request::Settings::check`): counts, finiteness, the size and batch bounds.
    fn check_stages(&self, origin: &str) -> Result<()> {
        let side = Some(self.job.resolution);
        let (d, r) = (&self.draft, &self.refine);
        let draft = Settings {
            control_scale: d.controlnet_scale,
            batch: self.job.batch,
            width: side,
            height: side,
            ..Settings::txt2img(d.steps, d.guidance, 0)
        };
        let refine = Settings {
            mode: Mode::Inpaint,
            strength: Some(r.strength),
            batch: self.job.batch,
            width: side,
            height: side,
            ..Settings::txt2img(r.steps, r.guidance, 0)
        };
        let view = Settings {
            batch: self.job.batch,
            ..Settings::txt2img(self.view.steps, self.view.guidance, 0)
        };
        for (settings, section) in [(draft, "draft"), (refine, "refine"), (view, "view")] {
            settings
                .check(Naming::Config(section))
                .map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        }
        Ok(())
    }

    fn check_ranges(&self, origin: &str) -> Result<()> {
        let j = &self.job;
        if j.resolution == 0 || !j.resolution.is_multiple_of(8) {
            bail!(
                "{origin}: job.resolution {} is not a positive multiple of 8",
                j.resolution
            );
        }
        if !(0.0..=1.0).contains(&self.refine.strength) || self.refine.strength == 0.0 {
            bail!(
                "{origin}: refine.strength {} is not in (0, 1]",
                self.refine.strength
            );
        }
        if !(0.0..=1.0).contains(&self.view.probability) {
            bail!(
                "{origin}: view.probability {} is not in [0, 1]",
                self.view.probability
            );
        }
        let p = &self.place;
        if !(0.0 < p.scale_min && p.scale_min <= p.scale_max && p.scale_max <= 1.0) {
            bail!(
                "{origin}: place.scale_min {} / scale_max {} must satisfy 0 < min ≤ max ≤ 1",
                p.scale_min,
                p.scale_max
            );
        }
        if self.view.probability > 0.0
            && (self.view.elevations.is_empty() || self.view.azimuths.is_empty())
        {
            bail!("{origin}: view.elevations and view.azimuths need at least one angle each");
        }
        Ok(())
    }
}
