//! The filter stage: DINO, CLIP-I and CLIP-T scores of (subject, target, prompt) records, the
//! numbers DreamBench reports for subject-driven models.
//!
//! - DINO = cos(CLS embedding of the subject, CLS embedding of the target), with whichever DINO
//!   (v1 `ViTModel` or `Dinov2Model`) the folder holds; the CLS embedding is token 0 of
//!   `last_hidden_state` (after the final LayerNorm).
//! - CLIP-I = cos(CLIP image embedding of the subject, of the target) (`image_embeds`, projected).
//! - CLIP-T = cos(CLIP image embedding of the target, CLIP text embedding of the prompt)
//!   (`text_embeds`, projected). Raw cosines in [−1, 1] everywhere; papers that print CLIP-T as
//!   "×100" multiply this number by 100, and the engine never does.
//!
//! Masked variants (for subjects cut out of a scene): the image is cut to the bounding box of the
//! mask (pixels ≥ 0.5), centred on a square canvas, and every pixel outside the mask (and the
//! canvas padding) is filled with the encoder's mean colour, `round(255 · image_mean)`, which
//! its normalisation maps to ~0. Then the encoder's own preprocessing runs as usual.
//!
//! Batched: one encoder call per batch of records; the embeddings are downloaded once per batch
//! (a few kilobytes), never per image.

use crate::backend::Device;
use crate::image_proc::ImageProcessor;
use crate::models::clip_text::ClipText;
use crate::models::load::{image_encoder_dir, load_clip_text_tower, load_image_encoder};
use crate::models::vit::{Vit, VitKind, VitOutput};
use crate::tensor::Tensor;
use crate::tokenizer::ClipTokenizer;
use anyhow::{bail, Context, Result};
use image::RgbImage;
use std::path::{Path, PathBuf};

/// One embedding per row, on the host.
pub type Rows = Vec<Vec<f32>>;

/// A vision model with the preprocessing its checkpoint names.
pub struct ImageEncoder {
    pub model: Vit,
    pub processor: ImageProcessor,
    pub dir: PathBuf,
}

/// Where a model folder's `preprocessor_config.json` is: beside the weights, or in a pipeline's
/// `feature_extractor/` (diffusers layout).
fn processor_path(model_dir: &Path, user_path: &Path) -> PathBuf {
    let candidates = [
        model_dir.join("preprocessor_config.json"),
        user_path.join("preprocessor_config.json"),
        user_path.join("feature_extractor/preprocessor_config.json"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| candidates[0].clone())
}

impl ImageEncoder {
    pub fn load(path: &Path, device: &Device) -> Result<ImageEncoder> {
        Self::load_with(path, device, false)
    }

    /// `load`, but a CLIP vision folder without preprocessor_config.json gets
    /// `CLIPImageProcessor`'s defaults, as diffusers' IP-Adapter loader does.
    pub fn load_with(path: &Path, device: &Device, clip_default: bool) -> Result<ImageEncoder> {
        let model = load_image_encoder(path, device)?;
        let dir = image_encoder_dir(path);
        let model_dir = if dir.join("model_index.json").is_file() {
            dir.join("image_encoder")
        } else {
            dir.clone()
        };
        let pp = processor_path(&model_dir, path);
        if !pp.is_file() && clip_default && model.config.kind == VitKind::ClipVision {
            let processor = ImageProcessor::clip_default();
            let (h, w) = processor.output_size();
            model.check_input(h, w)?;
            return Ok(ImageEncoder {
                model,
                processor,
                dir,
            });
        }
        if !pp.is_file() {
            bail!(
                "{}: missing: the image encoder needs its preprocessor_config.json (the image \
                 processor transformers saves beside the model)",
                pp.display()
            );
        }
        let processor = ImageProcessor::from_file(&pp)?;
        let (h, w) = processor.output_size();
        model
            .check_input(h, w)
            .with_context(|| format!("{}: the processor's output size", pp.display()))?;
        Ok(ImageEncoder {
            model,
            processor,
            dir,
        })
    }

    pub fn kind(&self) -> VitKind {
        self.model.config.kind
    }

    /// pixel_values [N, 3, H, W] (host, the processor's output) of `images`.
    pub fn pixel_values(&self, images: &[RgbImage]) -> Tensor {
        self.processor.pixel_values(images)
    }

    /// The model on preprocessed pixel values (NCHW, host).
    pub fn encode_pixels(&self, pixel_values: &Tensor) -> VitOutput {
        let dev = self.model.device();
        self.model.forward(&dev.put(pixel_values.to_nhwc()))
    }

    /// Score embeddings [N, D] on the host (see the module comment for which embedding).
    pub fn embed(&self, images: &[RgbImage]) -> Result<Rows> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let (h, w) = self.processor.output_size();
        self.model.check_memory(images.len(), h, w)?;
        let out = self.encode_pixels(&self.pixel_values(images));
        rows(&out.embedding(self.kind()), self.model.device())
    }

    /// The fill colour of masked regions: the processor's mean, in 8-bit.
    pub fn fill(&self) -> [u8; 3] {
        let m = self.processor.image_mean();
        std::array::from_fn(|i| (m[i] * 255.0).round().clamp(0.0, 255.0) as u8)
    }
}

/// The rows of a [N, D] device or host tensor, downloaded once.
fn rows(t: &Tensor, dev: &Device) -> Result<Rows> {
    dev.check()?;
    let h = t.to_host()?;
    let d = h.last_dim();
    Ok(h.data().chunks(d).map(|r| r.to_vec()).collect())
}

/// Cosine similarity; 0 when either vector is zero.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        ab += *x as f64 * *y as f64;
        aa += *x as f64 * *x as f64;
        bb += *y as f64 * *y as f64;
    }
    // torch's cosine_similarity clamps each norm at 1e-8.
    (ab / (aa.sqrt().max(1e-8) * bb.sqrt().max(1e-8))) as f32
}

/// A mask the size of its image, row-major, values in [0, 1] (≥ 0.5 is inside).
#[derive(Clone, Debug)]
pub struct Mask {
    pub width: u32,
    pub height: u32,
    pub values: Vec<f32>,
}

impl Mask {
    /// From image_io's [1, H, W, 1] mask tensors.
    pub fn from_tensor(t: &Tensor) -> Mask {
        let (_, h, w, _) = t.dims4();
        Mask {
            width: w as u32,
            height: h as u32,
            values: t.data().to_vec(),
        }
    }

    /// Bounding box (x0, y0, x1, y1), exclusive ends, of the pixels inside; None when empty.
    pub fn bbox(&self) -> Option<(u32, u32, u32, u32)> {
        let mut b: Option<(u32, u32, u32, u32)> = None;
        for y in 0..self.height {
            for x in 0..self.width {
                if self.values[(y * self.width + x) as usize] >= 0.5 {
                    b = Some(match b {
                        None => (x, y, x + 1, y + 1),
                        Some((x0, y0, x1, y1)) => {
                            (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1))
                        }
                    });
                }
            }
        }
        b
    }
}

/// The masked variant's input: the mask's bounding box on a square canvas of `fill`, pixels
/// outside the mask filled too. `what` names the image in errors.
pub fn cut_to_mask(img: &RgbImage, mask: &Mask, fill: [u8; 3], what: &str) -> Result<RgbImage> {
    if (mask.width, mask.height) != img.dimensions() {
        bail!(
            "{what}: the mask is {}x{} but the image is {}x{}",
            mask.width,
            mask.height,
            img.width(),
            img.height()
        );
    }
    let Some((x0, y0, x1, y1)) = mask.bbox() else {
        bail!("{what}: the mask is empty (no pixel ≥ 0.5)");
    };
    let (w, h) = (x1 - x0, y1 - y0);
    let side = w.max(h);
    let (ox, oy) = ((side - w) / 2, (side - h) / 2);
    let mut out = RgbImage::from_pixel(side, side, image::Rgb(fill));
    for y in y0..y1 {
        for x in x0..x1 {
            if mask.values[(y * mask.width + x) as usize] >= 0.5 {
                out.put_pixel(x - x0 + ox, y - y0 + oy, *img.get_pixel(x, y));
            }
        }
    }
    Ok(out)
}

/// One record to score.
#[derive(Clone)]
pub struct ScoreInput {
    pub subject: RgbImage,
    pub subject_mask: Option<Mask>,
    pub target: RgbImage,
    pub target_mask: Option<Mask>,
    pub prompt: String,
    /// Names the record in errors (e.g. the subject's path).
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Scores {
    pub dino: f32,
    pub clip_i: f32,
    pub clip_t: f32,
}

/// The DINO encoder, the CLIP image and text towers and the CLIP tokenizer.
pub struct Scorer {
    pub dino: ImageEncoder,
    pub clip: ImageEncoder,
    clip_text: ClipText,
    tokenizer: ClipTokenizer,
}

impl Scorer {
    /// From parts already loaded (built-in models).
    pub fn new(
        dino: ImageEncoder,
        clip: ImageEncoder,
        clip_text: ClipText,
        tokenizer: ClipTokenizer,
    ) -> Scorer {
        Scorer {
            dino,
            clip,
            clip_text,
            tokenizer,
        }
    }

    /// `dino`: a ViT (DINO v1) or DINOv2 folder; `clip`: a CLIPModel folder (both towers and the
    /// tokenizer).
    pub fn load(dino: &Path, clip: &Path, device: &Device) -> Result<Scorer> {
        let dino_enc = ImageEncoder::load(dino, device)?;
        if dino_enc.kind() == VitKind::ClipVision {
            bail!(
                "{}: --dino needs a DINO model (ViTModel or Dinov2Model), this is a CLIP vision model",
                dino.display()
            );
        }
        let clip_enc = ImageEncoder::load(clip, device)?;
        if clip_enc.kind() != VitKind::ClipVision {
            bail!(
                "{}: --clip needs a CLIPModel folder, this is a {}",
                clip.display(),
                clip_enc.kind().class_name()
            );
        }
        let clip_text = load_clip_text_tower(clip, device)?;
        let tokenizer = ClipTokenizer::from_dir(clip)?;
        Ok(Scorer {
            dino: dino_enc,
            clip: clip_enc,
            clip_text,
            tokenizer,
        })
    }

    /// The images an encoder sees for one side of a record (masked variant when a mask is given).
    fn view(
        enc: &ImageEncoder,
        img: &RgbImage,
        mask: Option<&Mask>,
        what: &str,
    ) -> Result<RgbImage> {
        match mask {
            Some(m) => cut_to_mask(img, m, enc.fill(), what),
            None => Ok(img.clone()),
        }
    }

    fn side_embeddings(&self, enc: &ImageEncoder, items: &[ScoreInput]) -> Result<(Rows, Rows)> {
        let mut imgs = Vec::with_capacity(items.len() * 2);
        for it in items {
            imgs.push(Self::view(
                enc,
                &it.subject,
                it.subject_mask.as_ref(),
                &format!("{} (subject)", it.name),
            )?);
        }
        for it in items {
            imgs.push(Self::view(
                enc,
                &it.target,
                it.target_mask.as_ref(),
                &format!("{} (target)", it.name),
            )?);
        }
        let mut e = enc.embed(&imgs)?;
        let targets = e.split_off(items.len());
        Ok((e, targets))
    }

    /// CLIP text embeddings of `prompts` [N, P] on the host.
    pub fn text_embeddings(&self, prompts: &[&str]) -> Result<Rows> {
        let ids = self.tokenizer.encode_batch(prompts)?;
        let out = self.clip_text.forward(&ids)?;
        let te = out.text_embeds.expect("load checks the projection");
        rows(&te, self.clip.model.device())
    }

    /// Scores of a batch of records (one encoder call per model).
    pub fn score(&self, items: &[ScoreInput]) -> Result<Vec<Scores>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let (ds, dt) = self.side_embeddings(&self.dino, items)?;
        let (cs, ct) = self.side_embeddings(&self.clip, items)?;
        // CLIP-T looks at the whole target: the prompt describes the scene, not only the subject.
        let full: Vec<RgbImage> = items.iter().map(|i| i.target.clone()).collect();
        let cfull = self.clip.embed(&full)?;
        let prompts: Vec<&str> = items.iter().map(|i| i.prompt.as_str()).collect();
        let text = self.text_embeddings(&prompts)?;
        Ok((0..items.len())
            .map(|i| Scores {
                dino: cosine(&ds[i], &dt[i]),
                clip_i: cosine(&cs[i], &ct[i]),
                clip_t: cosine(&cfull[i], &text[i]),
            })
            .collect())
    }
}
