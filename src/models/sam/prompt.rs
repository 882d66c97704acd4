//! SAM's prompt encoder (on the host) and the checked prompts it embeds.

use super::config::SamConfig;
use crate::tensor::Tensor;
use crate::weights::WeightStore;
use anyhow::{bail, Result};

pub(super) struct PromptEncoder {
    /// [2, F] random-Fourier matrix (`shared_image_embedding.positional_embedding`).
    fourier: Vec<f32>,
    feats: usize,
    /// point_embed.0..3: negative point, positive point, box corner 1, box corner 2.
    point_embed: Vec<Vec<f32>>,
    not_a_point: Vec<f32>,
    pub(super) no_mask: Vec<f32>,
    input_size: f32,
}

impl PromptEncoder {
    pub(super) fn load(store: &WeightStore, c: &SamConfig) -> Result<PromptEncoder> {
        let f = c.vision.num_pos_feats;
        let h = c.prompt.hidden;
        // transformers' current name, unless the checkpoint has the older one.
        let fourier_name = if store.contains("prompt_encoder.shared_embedding.positional_embedding")
        {
            "prompt_encoder.shared_embedding.positional_embedding"
        } else {
            "shared_image_embedding.positional_embedding"
        };
        let row = |name: &str| -> Result<Vec<f32>> { Ok(store.get(name, &[1, h])?.into_vec()) };
        Ok(PromptEncoder {
            fourier: store.get(fourier_name, &[2, f])?.into_vec(),
            feats: f,
            point_embed: (0..4)
                .map(|i| row(&format!("prompt_encoder.point_embed.{i}.weight")))
                .collect::<Result<_>>()?,
            not_a_point: row("prompt_encoder.not_a_point_embed.weight")?,
            no_mask: row("prompt_encoder.no_mask_embed.weight")?,
            input_size: c.prompt.image_size as f32,
        })
    }

    /// `SamPositionalEmbedding` of one point in [0, 1]²: [sin(2π·c·P), cos(2π·c·P)], c = 2·p − 1.
    pub(super) fn encode(&self, x: f32, y: f32) -> Vec<f32> {
        let f = self.feats;
        let (cx, cy) = (2.0 * x - 1.0, 2.0 * y - 1.0);
        let two_pi = (2.0 * std::f64::consts::PI) as f32;
        let mut out = vec![0.0f32; 2 * f];
        for j in 0..f {
            let v = two_pi * (cx * self.fourier[j] + cy * self.fourier[f + j]);
            out[j] = v.sin();
            out[f + j] = v.cos();
        }
        out
    }

    /// A point in input pixels: shifted to the pixel centre, normalised by the input size.
    fn encode_pixel(&self, x: f32, y: f32) -> Vec<f32> {
        let s = self.input_size;
        self.encode((x + 0.5) / s, (y + 0.5) / s)
    }

    fn embed_point(&self, x: f32, y: f32, label: i64) -> Vec<f32> {
        match label {
            -1 => self.not_a_point.clone(),
            -10 => vec![0.0; self.not_a_point.len()],
            l => {
                let mut e = self.encode_pixel(x, y);
                if l == 0 || l == 1 {
                    for (a, b) in e.iter_mut().zip(&self.point_embed[l as usize]) {
                        *a += b;
                    }
                }
                e
            }
        }
    }

    /// Sparse embeddings [B, n, tokens, C] (host) of checked prompts.
    pub(super) fn sparse(&self, p: &Prompts) -> Tensor {
        let c = self.not_a_point.len();
        let n = p.prompts_per_image();
        let mut rows: Vec<Vec<Vec<f32>>> = vec![Vec::new(); p.batch * n];
        if let Some((pts, labels)) = &p.points {
            let k = pts.shape()[2];
            let (pd, ld) = (pts.data(), labels.data());
            for (i, r) in rows.iter_mut().enumerate() {
                for j in 0..k {
                    let o = i * k + j;
                    r.push(self.embed_point(pd[2 * o], pd[2 * o + 1], ld[o] as i64));
                }
                if p.boxes.is_none() {
                    // transformers pads point prompts with one not-a-point when there is no box.
                    r.push(self.not_a_point.clone());
                }
            }
        }
        if let Some(boxes) = &p.boxes {
            let bd = boxes.data();
            for (i, r) in rows.iter_mut().enumerate() {
                let bx = &bd[4 * i..4 * i + 4];
                for (corner, pe) in [(0usize, 2usize), (1, 3)] {
                    let mut e = self.encode_pixel(bx[2 * corner], bx[2 * corner + 1]);
                    for (a, b) in e.iter_mut().zip(&self.point_embed[pe]) {
                        *a += b;
                    }
                    r.push(e);
                }
            }
        }
        if rows.iter().all(|r| r.is_empty()) {
            return Tensor::zeros(vec![p.batch, 1, 1, c]);
        }
        let t = rows[0].len();
        let data: Vec<f32> = rows.into_iter().flatten().flatten().collect();
        Tensor::new(vec![p.batch, n, t, c], data)
    }
}

/// Checked prompts in the model's input frame (host tensors): points [B, n, k, 2] (x, y) with
/// labels [B, n, k] (1 foreground, 0 background, -1 not a point, -10 padding), boxes [B, n, 4]
/// (x0, y0, x1, y1).
pub struct Prompts {
    pub(super) batch: usize,
    points: Option<(Tensor, Tensor)>,
    boxes: Option<Tensor>,
}

impl Prompts {
    /// Checks shapes against each other and the image batch `batch`; errors name the tensor.
    pub fn new(
        batch: usize,
        points: Option<&Tensor>,
        labels: Option<&Tensor>,
        boxes: Option<&Tensor>,
    ) -> Result<Prompts> {
        let points = match (points, labels) {
            (None, None) => None,
            (None, Some(_)) => bail!("`input_labels` given without `input_points`"),
            (Some(p), l) => {
                let s = p.shape();
                if s.len() != 4 || s[3] != 2 || s[0] != batch {
                    bail!(
                        "`input_points` has shape {s:?}; expected [{batch}, point_batch, points, 2]"
                    );
                }
                // transformers labels every point 1 when no labels are given.
                let l = match l {
                    Some(l) => l.clone(),
                    None => Tensor::new(s[..3].to_vec(), vec![1.0; s[0] * s[1] * s[2]]),
                };
                if l.shape() != &s[..3] {
                    bail!(
                        "`input_labels` has shape {:?}; expected {:?} (one per input point)",
                        l.shape(),
                        &s[..3]
                    );
                }
                if let Some(v) = l.data().iter().find(|v| v.fract() != 0.0) {
                    bail!("`input_labels` holds {v}, not an integer label");
                }
                Some((p.clone(), l))
            }
        };
        if let Some(b) = boxes {
            let s = b.shape();
            if s.len() != 3 || s[2] != 4 || s[0] != batch {
                bail!("`input_boxes` has shape {s:?}; expected [{batch}, boxes, 4]");
            }
            if let Some((p, _)) = &points {
                if p.shape()[1] != s[1] {
                    bail!(
                        "{} boxes per image but {} point batches: give as many boxes as point \
                         batches",
                        s[1],
                        p.shape()[1]
                    );
                }
            }
        }
        for (name, t) in [
            ("input_points", points.as_ref().map(|p| &p.0)),
            ("input_boxes", boxes),
        ] {
            if let Some(v) = t.and_then(|t| t.data().iter().find(|v| !v.is_finite())) {
                bail!("`{name}` holds a non-finite value ({v})");
            }
        }
        Ok(Prompts {
            batch,
            points,
            boxes: boxes.cloned(),
        })
    }

    /// Prompts (point batches or boxes) per image; 1 when there are none.
    pub fn prompts_per_image(&self) -> usize {
        match (&self.points, &self.boxes) {
            (Some((p, _)), _) => p.shape()[1],
            (None, Some(b)) => b.shape()[1],
            (None, None) => 1,
        }
    }
}
