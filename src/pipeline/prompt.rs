//! Text conditioning: CLIP embeddings for SD1.x/SD2.x, and SDXL's two encoders with pooled
//! embeddings, as diffusers' `encode_prompt` computes them.

use crate::backend::{self as ops, Device};
use crate::models::clip_text::ClipText;
use crate::tensor::Tensor;
use crate::tokenizer::ClipTokenizer;
use anyhow::Result;

pub struct TextEncoders {
    pub tok: ClipTokenizer,
    pub te: ClipText,
    /// SDXL's second tokenizer and encoder (with projection).
    pub second: Option<(ClipTokenizer, ClipText)>,
}

/// Embeddings for a list of prompts: [n, 77, D] and, for SDXL, pooled [n, P].
pub struct Embeds {
    pub context: Tensor,
    pub pooled: Option<Tensor>,
}

impl Embeds {
    /// Row i of the result is row `index[i]` of self.
    pub fn gather(&self, index: &[usize]) -> Embeds {
        let pick = |t: &Tensor| {
            Tensor::cat0(
                &index
                    .iter()
                    .map(|&i| t.narrow0(i, 1))
                    .collect::<Vec<_>>()
                    .iter()
                    .collect::<Vec<_>>(),
            )
        };
        Embeds {
            context: pick(&self.context),
            pooled: self.pooled.as_ref().map(pick),
        }
    }

    /// Zero embeddings of the same shapes on `device`.
    pub fn zeros_like(&self, device: &Device) -> Embeds {
        Embeds {
            context: device.put(Tensor::zeros(self.context.shape().to_vec())),
            pooled: self
                .pooled
                .as_ref()
                .map(|p| device.put(Tensor::zeros(p.shape().to_vec()))),
        }
    }
}

impl TextEncoders {
    pub fn is_sdxl(&self) -> bool {
        self.second.is_some()
    }

    /// Token ids and pooling rows of every encoder, on the model device: the inputs of `embed`.
    /// Tokenisation errors surface here; `forward` validation (lengths, vocabulary) too.
    pub fn indices(&self, prompts: &[String]) -> Result<Vec<Tensor>> {
        let texts: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
        let mut v = Vec::new();
        let mut add = |tok: &ClipTokenizer, te: &ClipText| -> Result<()> {
            let ids = tok.encode_batch(&texts)?;
            if let Some(bad) = ids.iter().flatten().find(|&&i| i as usize >= te.vocab_size) {
                anyhow::bail!(
                    "token id {bad} is outside the text encoder's vocabulary ({} entries)",
                    te.vocab_size
                );
            }
            let (t, p) = te.index_tensors(&ids);
            v.push(t);
            v.push(p);
            Ok(())
        };
        add(&self.tok, &self.te)?;
        if let Some((tok2, te2)) = &self.second {
            add(tok2, te2)?;
        }
        Ok(v)
    }

    /// Embeddings from `indices` output for `b` prompts: [context, pooled (SDXL)].
    pub fn embed(&self, v: &[Tensor], b: usize) -> Vec<Tensor> {
        let l = v[0].numel() / b.max(1);
        let out = self.te.forward_indices(&v[0], &v[1], b, l);
        match &self.second {
            None => vec![out.last_hidden_state],
            Some((_, te2)) => {
                // SDXL: both encoders' penultimate hidden states side by side; pooled from the second.
                let out2 = te2.forward_indices(&v[2], &v[3], b, l);
                let pooled = out2.text_embeds.unwrap_or(out2.pooler_output);
                vec![
                    ops::concat_channels(&[
                        &out.penultimate_hidden_state,
                        &out2.penultimate_hidden_state,
                    ]),
                    pooled,
                ]
            }
        }
    }

    /// Embeddings of `prompts` (eagerly; the pipeline runs `embed` through a CUDA graph on GPUs).
    pub fn encode(&self, prompts: &[String]) -> Result<Embeds> {
        let v = self.indices(prompts)?;
        Ok(Embeds::from_outputs(self.embed(&v, prompts.len())))
    }
}

impl Embeds {
    pub fn from_outputs(mut v: Vec<Tensor>) -> Embeds {
        let pooled = if v.len() > 1 { v.pop() } else { None };
        Embeds {
            context: v.remove(0),
            pooled,
        }
    }
}
