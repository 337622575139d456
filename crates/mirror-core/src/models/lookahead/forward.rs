//! The draft's forwards with lookahead rows: [`Model`] methods, next to the head they run.

use std::sync::Arc;

use candle_core::{DType, IndexOp, Tensor};

use super::{lookahead_attention, LookaheadHead};
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::mask::AttentionInput;
use crate::models::layers::Kernels;
use crate::models::transformer::Model;

/// Logits of one forward with lookahead tokens (batch 1).
#[derive(Debug, Clone)]
pub struct LookaheadLogits {
    /// Main-lookahead logits of the requested rows, `(rows, vocab)` f32.
    pub main: Tensor,
    /// Lookahead logits `(anchors, S, vocab)` f32: lookahead `j` (1-based) of an anchor at
    /// position `p` predicts the token at `p + j + 1`.
    pub lookahead: Tensor,
}

/// The draft's forwards with lookahead rows, next to the head they run.
impl Model {
    /// Runs lookahead tokens through the top `lookahead_layers` layers.
    ///
    /// `anchors` `(batch, anchors, hidden)` are the main row's states entering layer
    /// `N - lookahead_layers` at the anchor rows; `input` comes from
    /// [`lookahead_attention`] (lookahead rows anchor-major, their
    /// mask over the cache's keys then over the lookahead rows). The cache must already hold the
    /// main rows of the top layers; lookahead keys and values are never written to it.
    /// Returns the lookahead rows' states after the last layer, `(batch, anchors * S, hidden)`.
    pub fn lookahead_hidden(
        &self,
        head: &LookaheadHead,
        anchors: &Tensor,
        input: &AttentionInput,
        cache: &KvCache,
        kernels: Kernels,
    ) -> Result<Tensor> {
        head.check_fits(self.hidden_size(), self.num_layers())?;
        let (batch, anchor_rows, _) = anchors.dims3()?;
        let rows = anchor_rows * head.config().tokens;
        let split = self.num_layers() - head.config().layers;
        if cache.batch() != batch || cache.num_layers() != self.num_layers() {
            return Err(Error::invalid("the cache does not belong to these anchors"));
        }
        let cached = cache.layer_len(split);
        if (split..self.num_layers()).any(|l| cache.layer_len(l) != cached) {
            return Err(Error::invalid(
                "the lookahead layers hold different cached lengths",
            ));
        }
        let (positions, mask) = self.prepare_input(input, batch, rows, cached + rows)?;
        let positions = match kernels {
            // Differentiable RoPE takes one table for the whole batch.
            #[cfg(feature = "train")]
            Kernels::Autograd => positions.i(0..1)?,
            Kernels::Fused => positions,
        };
        self.run(batch * rows, || {
            let (cos, sin) = self.rope.tables(&positions)?;
            let mut x = head.initial_states(anchors)?;
            for index in split..self.num_layers() {
                x = self.layers[index].forward(&x, kernels, |attn, h| {
                    let (q, k, v) = attn.project_qkv(h, &self.rope, &cos, &sin, kernels)?;
                    let (cached_keys, cached_values) = cache.view(index)?;
                    // The lookahead rows' keys as the cache would hold them (its dtype).
                    let k = k.to_dtype(cached_keys.dtype())?;
                    let v = v.to_dtype(cached_values.dtype())?;
                    let keys = Tensor::cat(&[&cached_keys, &k], 2)?;
                    let values = Tensor::cat(&[&cached_values, &v], 2)?;
                    attn.attend(&q, &keys, &values, mask.as_ref(), kernels)
                })?;
            }
            Ok(x)
        })
    }

    /// One draft step with the attached lookahead (batch 1): feeds `tokens` after the cache under
    /// `input`, returns the main logits of `logit_rows` and the lookahead logits anchored at
    /// `lookahead_rows` (indices into `tokens`). Without lookahead, `lookahead_rows` must be empty.
    pub fn forward_with_lookahead(
        &self,
        tokens: &[u32],
        input: &AttentionInput,
        cache: &mut KvCache,
        logit_rows: &[usize],
        lookahead_rows: &[usize],
    ) -> Result<LookaheadLogits> {
        let head = match (&self.lookahead, lookahead_rows.is_empty()) {
            (Some(head), false) => Arc::clone(head),
            (None, false) => {
                return Err(Error::invalid(
                    "lookahead rows requested from a model without lookahead",
                ))
            }
            (_, true) => {
                let hidden = self.embed(&[tokens])?;
                let hidden = self.forward_layers(&hidden, 0..self.num_layers(), input, cache)?;
                let main = self.logits_at(&hidden, logit_rows)?.squeeze(0)?;
                let vocab = self.vocab_size();
                let lookahead = Tensor::zeros((0, 0, vocab), DType::F32, &self.device)?;
                return Ok(LookaheadLogits { main, lookahead });
            }
        };
        if lookahead_rows.iter().any(|&r| r >= tokens.len()) {
            return Err(Error::invalid(format!(
                "lookahead rows {lookahead_rows:?} must index the {} fed tokens",
                tokens.len()
            )));
        }
        let split = self.num_layers() - head.config().layers;
        let kv_before = cache.len();
        let hidden = self.embed(&[tokens])?;
        let middle = self.forward_layers(&hidden, 0..split, input, cache)?;
        let hidden = self.forward_layers(&middle, split..self.num_layers(), input, cache)?;
        if logit_rows.is_empty() || logit_rows.iter().any(|&r| r >= tokens.len()) {
            return Err(Error::invalid(format!(
                "rows {logit_rows:?} must be a non-empty subset of 0..{}",
                tokens.len()
            )));
        }
        let main_rows: Vec<u32> = logit_rows.iter().map(|&r| r as u32).collect();
        let main_rows = Tensor::from_vec(main_rows, logit_rows.len(), &self.device)?;
        let main_hidden = hidden.index_select(&main_rows, 1)?;
        let index: Vec<u32> = lookahead_rows.iter().map(|&r| r as u32).collect();
        let index = Tensor::from_vec(index, lookahead_rows.len(), &self.device)?;
        let anchors = middle.index_select(&index, 1)?;
        let all_positions = input.positions.i(0)?.to_vec1::<u32>()?;
        let anchor_positions: Vec<u32> = lookahead_rows.iter().map(|&r| all_positions[r]).collect();
        let anchor_mask = match &input.mask {
            Some(mask) => Some(mask.flatten_to(mask.rank() - 2)?.index_select(&index, 0)?),
            None => None,
        };
        let stream_input = lookahead_attention(
            &anchor_positions,
            anchor_mask.as_ref(),
            kv_before + tokens.len(),
            head.config().tokens,
            &self.device,
        )?;
        let states =
            self.lookahead_hidden(&head, &anchors, &stream_input, cache, Kernels::Fused)?;
        // One LM-head pass for main and lookahead rows: on a small draft the head's weights are
        // a large share of a step, and streaming them once instead of twice is most of the
        // difference between a lookahead step and a plain one.
        let logits = self
            .logits(&Tensor::cat(&[&main_hidden, &states], 1)?)?
            .squeeze(0)?;
        let main = logits.narrow(0, 0, logit_rows.len())?;
        let lookahead = logits
            .narrow(0, logit_rows.len(), states.dim(1)?)?
            .reshape((
                lookahead_rows.len(),
                head.config().tokens,
                self.vocab_size(),
            ))?;
        Ok(LookaheadLogits { main, lookahead })
    }
}
