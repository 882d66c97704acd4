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

    /// Width of the pooled embedding SDXL feeds the UNet (text_encoder_2's projection).
    pub fn encode(&self, prompts: &[String]) -> Result<Embeds> {
        let texts: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
        let ids = self.tok.encode_batch(&texts)?;
        let out = self.te.forward(&ids)?;
        match &self.second {
            None => Ok(Embeds {
                context: out.last_hidden_state,
                pooled: None,
            }),
            Some((tok2, te2)) => {
                // SDXL: both encoders' penultimate hidden states side by side; pooled from the second.
                let ids2 = tok2.encode_batch(&texts)?;
                let out2 = te2.forward(&ids2)?;
                let pooled = out2.text_embeds.unwrap_or(out2.pooler_output);
                Ok(Embeds {
                    context: ops::concat_channels(&[
                        &out.penultimate_hidden_state,
                        &out2.penultimate_hidden_state,
                    ]),
                    pooled: Some(pooled),
                })
            }
        }
    }
}
