//! An LM head that computes the logits of some tokens only: for a draft model, whose head over
//! a 150K vocabulary is a large share of its forward (a quarter of the 0.5B Qwen2.5's weight
//! bytes), while the tokens it proposes and the target accepts are mostly frequent ones (Zhao
//! et al., "FR-Spec: Accelerating Large-Vocabulary Language Models via Frequency-Ranked
//! Speculative Sampling", 2025). Every other token's logit is negative infinity, so the draft
//! never proposes it. Verification stays exact: it judges each proposal against the
//! distribution it was drawn from, whatever that distribution is.
//!
//! The kept tokens' rows are repacked into one smaller matrix (the same quants and scales, so
//! the same bits as the full head's rows), and their logits scattered back to their ids.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::linear::{packed_forward, Linear};
use crate::error::{Error, Result};
use crate::kernels::PackedMatrix;

/// The kept rows of an LM head and the tokens they score.
pub(crate) struct PartialHead {
    matrix: Arc<PackedMatrix>,
    /// Ascending, distinct: row `i` of `matrix` scores token `tokens[i]`.
    tokens: Vec<usize>,
    vocab: usize,
}

impl PartialHead {
    /// The rows of `head` that score `tokens`. The head must be packed, without bias.
    pub(crate) fn new(head: &Linear, tokens: &[u32]) -> Result<Self> {
        let full = head.packed().ok_or_else(|| {
            Error::invalid(
                "an LM head restricted to some tokens needs packed weights without bias \
                 (a GGUF or a quantized load on the CPU)",
            )
        })?;
        let vocab = full.rows();
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::TokenOutOfRange {
                token,
                vocab_size: vocab,
            });
        }
        let mut tokens: Vec<usize> = tokens.iter().map(|&t| t as usize).collect();
        tokens.sort_unstable();
        tokens.dedup();
        let matrix = Arc::new(full.select_rows(&tokens)?);
        Ok(Self {
            matrix,
            tokens,
            vocab,
        })
    }

    /// Tokens whose logits the head computes.
    pub(crate) fn computed_tokens(&self) -> usize {
        self.matrix.rows()
    }

    /// `h (..., hidden) -> logits (..., vocab)` in f32: the kept tokens' logits as the full
    /// head computes them, negative infinity elsewhere.
    pub(crate) fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let kept = packed_forward(std::slice::from_ref(&self.matrix), h)?.to_dtype(DType::F32)?;
        let mut dims = kept.dims().to_vec();
        let width = self.matrix.rows();
        let kept = kept.flatten_all()?.to_vec1::<f32>()?;
        let rows = kept.len() / width.max(1);
        let mut logits = vec![f32::NEG_INFINITY; rows * self.vocab];
        for (row, values) in kept.chunks_exact(width).enumerate() {
            let out = &mut logits[row * self.vocab..(row + 1) * self.vocab];
            for (&token, &value) in self.tokens.iter().zip(values) {
                out[token] = value;
            }
        }
        if let Some(last) = dims.last_mut() {
            *last = self.vocab;
        }
        Ok(Tensor::from_vec(logits, dims, &Device::Cpu)?)
    }
}
