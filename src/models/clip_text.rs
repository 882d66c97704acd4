//! CLIPTextModel / CLIPTextModelWithProjection (transformers), as the SD text encoders use them.

use super::nn::LayerNorm;
use crate::backend::Device;
use crate::backend::{self as ops, Activation, LinearW};
use crate::config::Config;
use crate::tensor::Tensor;
use crate::weights::{Vb, WeightStore};
use anyhow::{bail, Result};

struct Layer {
    ln1: LayerNorm,
    q: LinearW,
    k: LinearW,
    v: LinearW,
    o: LinearW,
    ln2: LayerNorm,
    fc1: LinearW,
    fc2: LinearW,
}

impl Layer {
    fn load(l: &Vb, hidden: usize, inter: usize, eps: f64) -> Result<Layer> {
        let a = l.pp("self_attn");
        Ok(Layer {
            ln1: LayerNorm::load(&l.pp("layer_norm1"), hidden, eps)?,
            q: a.pp("q_proj").linear(hidden, hidden, true)?,
            k: a.pp("k_proj").linear(hidden, hidden, true)?,
            v: a.pp("v_proj").linear(hidden, hidden, true)?,
            o: a.pp("out_proj").linear(hidden, hidden, true)?,
            ln2: LayerNorm::load(&l.pp("layer_norm2"), hidden, eps)?,
            fc1: l.pp("mlp.fc1").linear(hidden, inter, true)?,
            fc2: l.pp("mlp.fc2").linear(inter, hidden, true)?,
        })
    }
}

pub struct ClipText {
    pub vocab_size: usize,
    pub hidden: usize,
    pub max_positions: usize,
    heads: usize,
    act: Activation,
    eos_token_id: u32,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    final_ln: LayerNorm,
    projection: Option<LinearW>,
    device: Device,
}

pub struct ClipTextOutput {
    pub last_hidden_state: Tensor,
    /// hidden_states[-2]: the input of the last layer, before the final LayerNorm (SDXL, clip-skip).
    pub penultimate_hidden_state: Tensor,
    pub pooler_output: Tensor,
    /// Projected pooled output, for models with a text projection.
    pub text_embeds: Option<Tensor>,
    /// embeddings, then each layer's output.
    pub hidden_states: Vec<Tensor>,
}

/// transformers 5 saves CLIPTextModel without the `text_model.` prefix, real checkpoints have it:
/// normalise to the bare names.
pub fn normalise_name(name: &str) -> Option<String> {
    name.strip_prefix("text_model.").map(String::from)
}

/// `hidden_act`: CLIP's text encoders use quick_gelu or gelu.
fn activation(cfg: &Config) -> Result<Activation> {
    let act_name = cfg.str_or("hidden_act", "quick_gelu")?;
    match Activation::parse(act_name) {
        Some(a @ (Activation::Gelu | Activation::QuickGelu)) => Ok(a),
        _ => Err(cfg.unsupported("hidden_act", act_name, "quick_gelu, gelu")),
    }
}

/// Whether the model has a text projection: by its architecture, or by its weights.
fn with_projection(cfg: &Config, store: &WeightStore) -> bool {
    let archs = cfg
        .get("architectures")
        .and_then(|a| a.as_array())
        .cloned()
        .unwrap_or_default();
    archs
        .iter()
        .any(|a| a.as_str() == Some("CLIPTextModelWithProjection"))
        || store.contains("text_projection.weight")
}

impl ClipText {
    pub fn load(cfg: &Config, store: &WeightStore, device: &Device) -> Result<Self> {
        // A full CLIPConfig nests the text part under text_config; SD checkpoints use the flat form.
        cfg.check_sizes(&[
            ("vocab_size", 1 << 22),
            ("hidden_size", 16384),
            ("intermediate_size", 65536),
            ("num_hidden_layers", 256),
            ("num_attention_heads", 1024),
            ("max_position_embeddings", 65536),
            ("projection_dim", 16384),
        ])?;
        let vocab_size = cfg.usize("vocab_size")?;
        let hidden = cfg.usize("hidden_size")?;
        let inter = cfg.usize("intermediate_size")?;
        let layers_n = cfg.usize("num_hidden_layers")?;
        let heads = cfg.usize("num_attention_heads")?;
        let max_positions = cfg.usize_or("max_position_embeddings", 77)?;
        let eps = cfg.eps_or("layer_norm_eps", 1e-5)?;
        let act = activation(cfg)?;
        if heads == 0 || hidden % heads != 0 {
            bail!(
                "{}: hidden_size {hidden} is not divisible by num_attention_heads {heads}",
                cfg.path.display()
            );
        }
        let eos_token_id = cfg.usize_or("eos_token_id", 2)? as u32;
        let with_projection = with_projection(cfg, store);
        let vb = Vb::root_on(store, device);
        let e = vb.pp("embeddings");
        let mut layers = Vec::new();
        for i in 0..layers_n {
            let l = vb.pp(format!("encoder.layers.{i}"));
            layers.push(Layer::load(&l, hidden, inter, eps)?);
        }
        let projection = if with_projection {
            let p = cfg.usize_or("projection_dim", hidden)?;
            Some(vb.pp("text_projection").linear(hidden, p, false)?)
        } else {
            None
        };
        Ok(ClipText {
            vocab_size,
            hidden,
            max_positions,
            heads,
            act,
            eos_token_id,
            token_embedding: e.get("token_embedding.weight", &[vocab_size, hidden])?,
            position_embedding: e.get("position_embedding.weight", &[max_positions, hidden])?,
            layers,
            final_ln: LayerNorm::load(&vb.pp("final_layer_norm"), hidden, eps)?,
            projection,
            device: device.clone(),
        })
    }

    pub fn has_projection(&self) -> bool {
        self.projection.is_some()
    }

    /// ids: one row of token ids per prompt, all rows the same length (≤ max_position_embeddings).
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<ClipTextOutput> {
        let _span = tracing::info_span!("text_encoder").entered();
        let b = ids.len();
        if b == 0 {
            bail!("no input ids");
        }
        let l = ids[0].len();
        if l == 0 || l > self.max_positions || ids.iter().any(|r| r.len() != l) {
            bail!(
                "input_ids rows must all have the same length between 1 and {} (got {l})",
                self.max_positions
            );
        }
        if let Some(bad) = ids
            .iter()
            .flatten()
            .find(|&&i| i as usize >= self.vocab_size)
        {
            bail!(
                "token id {bad} is outside the vocabulary ({} entries)",
                self.vocab_size
            );
        }
        let (tokens, pool) = self.index_tensors(ids);
        Ok(self.forward_indices(&tokens, &pool, b, l))
    }

    /// The token ids (flattened) and pooling rows of `ids` on the model's device: the inputs of
    /// `forward_indices`, which is what a CUDA graph captures.
    pub fn index_tensors(&self, ids: &[Vec<u32>]) -> (Tensor, Tensor) {
        let l = ids.first().map_or(0, |r| r.len());
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let rows: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(bi, row)| (bi * l + self.pool_position(row)) as u32)
            .collect();
        (self.device.put_ids(&flat), self.device.put_ids(&rows))
    }

    /// The encoder on prepared indices (`index_tensors`), `b` prompts of `l` tokens (validated by
    /// `forward`).
    pub fn forward_indices(
        &self,
        tokens: &Tensor,
        pool: &Tensor,
        b: usize,
        l: usize,
    ) -> ClipTextOutput {
        let tok = ops::gather(&self.token_embedding, tokens).reshape(vec![b, l, self.hidden]);
        let pos = self.position_embedding.narrow0(0, l);
        let pos_b = Tensor::cat0(&vec![&pos; b]).reshape(vec![b, l, self.hidden]);
        let mut x = ops::add(&tok, &pos_b);
        let mut hidden_states = vec![x.clone()];
        for layer in &self.layers {
            let h = layer.ln1.forward(&x);
            let (q, k, v) = (
                ops::linear(&h, &layer.q),
                ops::linear(&h, &layer.k),
                ops::linear(&h, &layer.v),
            );
            let a = ops::linear(&ops::attention(&q, &k, &v, self.heads, true), &layer.o);
            x = ops::add(&x, &a);
            let h = layer.ln2.forward(&x);
            let m = ops::linear(&self.act.apply(&ops::linear(&h, &layer.fc1)), &layer.fc2);
            x = ops::add(&x, &m);
            hidden_states.push(x.clone());
        }
        let last = self.final_ln.forward(&x);
        let pooled = ops::gather(&last.reshape(vec![b * l, self.hidden]), pool);
        let text_embeds = self.projection.as_ref().map(|p| ops::linear(&pooled, p));
        let penultimate = hidden_states[hidden_states.len().saturating_sub(2)].clone();
        ClipTextOutput {
            last_hidden_state: last,
            penultimate_hidden_state: penultimate,
            pooler_output: pooled,
            text_embeds,
            hidden_states,
        }
    }

    /// Where transformers pools: legacy configs (eos_token_id == 2) take the highest id (the EOS of
    /// the original vocabulary); others the first EOS (position 0 when there is none, as argmax over all-false does).
    fn pool_position(&self, row: &[u32]) -> usize {
        if self.eos_token_id == 2 {
            // argmax returns the first maximum, as torch does.
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            best
        } else {
            row.iter()
                .position(|&v| v == self.eos_token_id)
                .unwrap_or(0)
        }
    }
}
