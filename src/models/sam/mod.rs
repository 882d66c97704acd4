//! Segment Anything: transformers' `SamModel`. A ViT image encoder (windowed and global attention
//! with decomposed relative positions, then a conv neck), a prompt encoder (points with labels and
//! boxes through a random-Fourier positional encoding) and the two-way transformer mask decoder
//! (low-resolution mask logits and IoU scores).
//!
//! The image encoder and the mask decoder run on the backend; the prompt encoder works on a handful
//! of points and runs on the host. Windows are cut and put back with `gather` (zero rows for the
//! padding); ConvTranspose2d(k=2, s=2) is a linear layer followed by a `gather` pixel shuffle; the
//! hypernetwork products are one bias-free linear layer per prompt. The final masks and scores are
//! returned on the host in transformers' layout.

mod config;
mod decoder;
mod prompt;
mod vision;

pub use config::{Act, SamConfig, SamDecoderConfig, SamPromptConfig, SamVisionConfig};
pub use prompt::Prompts;
pub use vision::resize_rel_pos;

use crate::backend::{self as ops, Device};
use crate::config::Config;
use crate::tensor::Tensor;
use crate::weights::{Vb, WeightStore};
use anyhow::{bail, Context, Result};
use decoder::MaskDecoder;
use prompt::PromptEncoder;
use std::path::Path;
use vision::VisionEncoder;

/// A loaded `SamModel`.
pub struct Sam {
    pub config: SamConfig,
    vision: VisionEncoder,
    prompt: PromptEncoder,
    decoder: MaskDecoder,
    /// [g·g, C] image-wide positional encoding, on the device.
    image_pe: Tensor,
    device: Device,
}

/// transformers' `SamImageSegmentationOutput` (host tensors) plus the image embeddings.
pub struct SamOutput {
    /// [B, n, M, 4g, 4g] low-resolution mask logits (M = 3 with multimask output, else 1).
    pub pred_masks: Tensor,
    /// [B, n, M]
    pub iou_scores: Tensor,
    /// [B, g, g, C] NHWC, on the device.
    pub image_embeddings: Tensor,
}

impl Sam {
    pub fn load(cfg: &Config, store: &WeightStore, device: &Device) -> Result<Sam> {
        let c = SamConfig::parse(cfg)?;
        let vb = Vb::root_on(store, device);
        let vision = VisionEncoder::load(&vb.pp("vision_encoder"), &c.vision)?;
        let prompt = PromptEncoder::load(store, &c)?;
        let decoder = MaskDecoder::load(&vb.pp("mask_decoder"), &c.decoder)?;
        let g = c.prompt.image_embedding_size;
        let mut pe = Vec::with_capacity(g * g * c.prompt.hidden);
        for y in 0..g {
            for x in 0..g {
                let (fx, fy) = ((x as f32 + 0.5) / g as f32, (y as f32 + 0.5) / g as f32);
                pe.extend(prompt.encode(fx, fy));
            }
        }
        Ok(Sam {
            image_pe: device.put(Tensor::new(vec![g * g, c.prompt.hidden], pe)),
            config: c,
            vision,
            prompt,
            decoder,
            device: device.clone(),
        })
    }

    /// A transformers model folder: config.json + model.safetensors (or a sharded index).
    pub fn load_dir(dir: &Path, device: &Device) -> Result<Sam> {
        let config = Config::read_dir(dir)?;
        let weights = crate::weights::layout::open_weights(dir)?;
        Sam::load(&config, &weights, device)
            .with_context(|| format!("loading SAM from {}", dir.display()))
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Side of the square model input (pixel_values must be this size).
    pub fn input_size(&self) -> usize {
        self.config.vision.image_size
    }

    /// `get_image_embeddings`: pixel_values NHWC [B, S, S, C] (host or device) -> [B, g, g, C].
    pub fn image_embeddings(&self, pixels: &Tensor) -> Result<Tensor> {
        let c = &self.config.vision;
        if pixels.rank() != 4 {
            bail!(
                "pixel_values has shape {:?}; expected rank 4",
                pixels.shape()
            );
        }
        let (_, h, w, ch) = pixels.dims4();
        if h != c.image_size || w != c.image_size || ch != c.channels {
            bail!(
                "pixel_values is {h}x{w} with {ch} channels; SAM takes {s}x{s} with {} \
                 (pad the image to its image_size, as SamProcessor does)",
                c.channels,
                s = c.image_size
            );
        }
        Ok(self
            .vision
            .forward(&self.device.put_same(pixels), c, &self.device))
    }

    /// The prompt encoder and mask decoder on image embeddings [B, g, g, C]: (pred_masks, iou_scores)
    /// on the host.
    pub fn decode(
        &self,
        image_embeddings: &Tensor,
        prompts: &Prompts,
        multimask: bool,
    ) -> Result<(Tensor, Tensor)> {
        let dc = &self.config.decoder;
        let dev = &self.device;
        let (b, g, _, ch) = image_embeddings.dims4();
        if prompts.batch != b {
            bail!("{} images but prompts for {} images", b, prompts.batch);
        }
        let sparse = self.prompt.sparse(prompts);
        let n = sparse.shape()[1];
        let nn = b * n;
        let qpe = self.decoder.query_tokens(&sparse, nn, ch, dev);
        let t = qpe.shape()[1];
        let (keys, kpe) = self.image_keys(image_embeddings, n);
        let (queries, keys) = self.decoder.transformer(&qpe, keys, &kpe, dc.act);
        let queries = queries.reshape(vec![nn, t * ch]);
        let up = self.decoder.upscale(&keys.reshape(vec![nn, g, g, ch]), dev);
        let side = up.shape()[1];
        let m_all = dc.multimask_outputs + 1;
        let picked: Vec<usize> = if multimask {
            (1..m_all).collect()
        } else {
            vec![0]
        };
        let masks = self.decoder.mask_logits(&queries, &up, &picked, ch)?;
        let iou = self.decoder.iou_scores(&queries, &picked, ch, m_all)?;
        let m = picked.len();
        dev.check()?;
        Ok((
            Tensor::new(vec![b, n, m, side, side], masks),
            Tensor::new(vec![b, n, m], iou),
        ))
    }

    /// The decoder's keys and their positions, each [B·n, g·g, C]: image embeddings + the no-mask
    /// embedding, repeated per prompt, and the image-wide positional encoding.
    fn image_keys(&self, image_embeddings: &Tensor, n: usize) -> (Tensor, Tensor) {
        let dev = &self.device;
        let (b, g, _, ch) = image_embeddings.dims4();
        let nn = b * n;
        let no_mask = Tensor::new(vec![b, ch], self.prompt.no_mask.repeat(b));
        let img = ops::add_per_sample_channels(image_embeddings, &dev.put(no_mask));
        let per: Vec<Tensor> = (0..b).map(|i| img.narrow0(i, 1)).collect();
        let reps: Vec<&Tensor> = per.iter().flat_map(|p| std::iter::repeat_n(p, n)).collect();
        let keys = Tensor::cat0(&reps).reshape(vec![nn, g * g, ch]);
        let kpe = Tensor::cat0(&vec![&self.image_pe; nn]).reshape(vec![nn, g * g, ch]);
        (keys, kpe)
    }

    /// `SamModel.forward` on pixel_values NHWC [B, S, S, C] and prompts.
    pub fn forward(
        &self,
        pixels: &Tensor,
        prompts: &Prompts,
        multimask: bool,
    ) -> Result<SamOutput> {
        let _span = tracing::info_span!("sam").entered();
        let emb = self.image_embeddings(pixels)?;
        let (pred_masks, iou_scores) = self.decode(&emb, prompts, multimask)?;
        Ok(SamOutput {
            pred_masks,
            iou_scores,
            image_embeddings: emb,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Image + boxes -> masks

/// The masks SAM predicts for one box, at the image's size.
#[derive(Clone, Debug)]
pub struct BoxMasks {
    pub width: usize,
    pub height: usize,
    /// M masks (3 with multimask output, else 1), each row-major height × width.
    pub masks: Vec<Vec<bool>>,
    /// The predicted IoU of each mask.
    pub iou: Vec<f32>,
}

impl BoxMasks {
    /// The mask with the highest predicted IoU (the first of equals) and its score.
    pub fn best(&self) -> (&[bool], f32) {
        let mut best = 0;
        for (i, s) in self.iou.iter().enumerate() {
            if *s > self.iou[best] {
                best = i;
            }
        }
        (&self.masks[best], self.iou[best])
    }
}

/// Checks boxes (x0, y0, x1, y1) in the pixels of a `w`×`h` image: finite, inside it, not empty.
pub fn check_boxes(boxes: &[[f32; 4]], w: usize, h: usize) -> Result<()> {
    for (i, b) in boxes.iter().enumerate() {
        let [x0, y0, x1, y1] = *b;
        if b.iter().any(|v| !v.is_finite()) {
            bail!("box {i} {b:?}: not finite");
        }
        if x0 < 0.0 || y0 < 0.0 || x1 > w as f32 || y1 > h as f32 {
            bail!("box {i} {b:?} (x0, y0, x1, y1) is outside the {w}x{h} image");
        }
        if x1 <= x0 || y1 <= y0 {
            bail!("box {i} {b:?} is empty: expected x0 < x1 and y0 < y1");
        }
    }
    Ok(())
}

/// SAM on one image with box prompts, as transformers' processor + model + `post_process_masks`:
/// one `BoxMasks` per box, masks at the image size.
pub fn segment_boxes(
    sam: &Sam,
    proc: &crate::image_proc::sam::SamProcessor,
    img: &image::RgbImage,
    boxes: &[[f32; 4]],
    multimask: bool,
) -> Result<Vec<BoxMasks>> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if boxes.is_empty() {
        bail!("no boxes to segment");
    }
    check_boxes(boxes, w, h)?;
    let inp = proc.preprocess(img)?;
    let scaled = proc.rescale_boxes(boxes, inp.original_size);
    let bt = Tensor::new(
        vec![1, boxes.len(), 4],
        scaled.iter().flatten().copied().collect(),
    );
    let prompts = Prompts::new(1, None, None, Some(&bt))?;
    let out = sam.forward(&inp.pixel_values.to_nhwc(), &prompts, multimask)?;
    let logits = proc.post_process_masks(&out.pred_masks, inp.original_size, inp.reshaped_size)?;
    let m = out.iou_scores.shape()[2];
    let plane = w * h;
    Ok((0..boxes.len())
        .map(|i| BoxMasks {
            width: w,
            height: h,
            masks: (0..m)
                .map(|j| proc.binarize(&logits.data()[(i * m + j) * plane..][..plane]))
                .collect(),
            iou: out.iou_scores.data()[i * m..(i + 1) * m].to_vec(),
        })
        .collect())
}
