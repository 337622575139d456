//! Ragged batches: one forward over the rows of many sequences, each with its own KV cache.
//!
//! The linear layers (the projections, the MLP, the LM head) run once over every row of every
//! sequence, which is where a CPU forward's time goes (each weight is read once per forward,
//! however many rows); rotary embeddings use each row's own position; attention runs per
//! sequence, over its own cache, with its own causal mask. The kernels give each row the same
//! bits whatever rows share its call, so every sequence gets exactly the logits it would get
//! alone ([`Model::forward_causal`]).

use candle_core::Tensor;

use super::layers::Kernels;
use super::transformer::Model;
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::mask::AttentionInput;

/// Which of a sequence's fed rows a ragged forward returns logits for. The LM head is a large
/// share of a forward's work (a 0.5B's reads a quarter of its weights), and each row's logits
/// cost it again beyond the first rows, so a forward computes only the rows asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowLogits {
    /// None (a prompt chunk).
    Nothing,
    /// The last fed row's only (a draft catching up on committed tokens before it proposes).
    Last,
    /// Every fed row's (a decode step or a verification window).
    Every,
}

impl RowLogits {
    /// The fed rows of a span of `len` rows at `offset` that get logits.
    fn rows(self, offset: usize, len: usize) -> std::ops::Range<usize> {
        match self {
            RowLogits::Nothing => offset..offset,
            RowLogits::Last => (offset + len).saturating_sub(1).max(offset)..offset + len,
            RowLogits::Every => offset..offset + len,
        }
    }
}

/// One sequence's share of a ragged forward: `tokens` fed causally after what `cache` holds
/// (a cache of batch 1), and which of its rows' logits are wanted.
pub struct RaggedSequence<'a> {
    /// Tokens to feed (at least one).
    pub tokens: &'a [u32],
    /// Which fed rows' logits to return.
    pub logits: RowLogits,
    /// The sequence's own cache; the fed rows are appended to it.
    pub cache: &'a mut KvCache,
}

/// Where one sequence's rows sit in the ragged batch, and its attention input.
struct Span {
    offset: usize,
    len: usize,
    mask: Option<Tensor>,
}

impl Model {
    /// One forward over the rows of every sequence in `sequences`. Returns, per sequence, the
    /// logits of the fed rows it asked for (as host vectors), in order.
    pub fn forward_ragged(
        &self,
        sequences: &mut [RaggedSequence<'_>],
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        Ok(self.forward_ragged_capturing(sequences, &[])?.0)
    }

    /// [`Model::forward_ragged`], also returning for sequence `i` the hidden states of its fed
    /// rows after the first `capture[i]` layers (`None`, or an index past `capture`: none), as
    /// host vectors: the same forward, so the logits are the same bits. `capture[i]` is within
    /// `1..=N`.
    #[allow(clippy::type_complexity)]
    pub fn forward_ragged_capturing(
        &self,
        sequences: &mut [RaggedSequence<'_>],
        capture: &[Option<usize>],
    ) -> Result<(Vec<Vec<Vec<f32>>>, Vec<Vec<Vec<f32>>>)> {
        if sequences.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        self.begin_ragged(sequences, capture)?.finish()
    }

    /// A ragged forward run layer range by layer range: [`RaggedPass::run_to`] a depth,
    /// [`RaggedPass::tap`] the rows there (the early-exit tap of Mirror-SD), then
    /// [`RaggedPass::finish`]. Running it to the end gives the same bits as
    /// [`Model::forward_ragged_capturing`], whatever depths were tapped on the way.
    pub fn begin_ragged<'m, 's, 'a>(
        &'m self,
        sequences: &'s mut [RaggedSequence<'a>],
        capture: &[Option<usize>],
    ) -> Result<RaggedPass<'m, 's, 'a>> {
        if sequences.is_empty() {
            return Err(Error::invalid(
                "a ragged forward needs at least one sequence",
            ));
        }
        if let Some(&layer) = capture
            .iter()
            .flatten()
            .find(|&&l| l == 0 || l > self.num_layers())
        {
            return Err(Error::invalid(format!(
                "a captured layer must be within 1..={}, got {layer}",
                self.num_layers()
            )));
        }
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(sequences.len());
        for sequence in sequences.iter() {
            self.check_ragged(sequence)?;
            let base = sequence.cache.len();
            let len = sequence.tokens.len();
            let input = AttentionInput::causal(1, len, base, self.device())?;
            let (_, mask) = self.prepare_input(&input, 1, len, base + len)?;
            spans.push(Span {
                offset: tokens.len(),
                len,
                mask,
            });
            tokens.extend_from_slice(sequence.tokens);
            positions.extend((base..base + len).map(|p| p as u32));
        }
        let rows = tokens.len();
        let hidden = self.embed(&[&tokens])?;
        let positions = Tensor::from_vec(positions, (1, rows), self.device())?;
        let (cos, sin) = self.run(rows, || self.rope.tables(&positions))?;
        Ok(RaggedPass {
            model: self,
            captured: vec![Vec::new(); sequences.len()],
            sequences,
            spans,
            capture: capture.to_vec(),
            cos,
            sin,
            hidden,
            depth: 0,
        })
    }

    /// A sequence's share must be non-empty, fit its cache, and match this model.
    fn check_ragged(&self, sequence: &RaggedSequence<'_>) -> Result<()> {
        let cache = &sequence.cache;
        if sequence.tokens.is_empty() {
            return Err(Error::invalid("a ragged sequence needs at least one token"));
        }
        if cache.batch() != 1 || cache.num_layers() != self.num_layers() {
            return Err(Error::invalid(format!(
                "a ragged sequence needs a cache of batch 1 and {} layers, got batch {} and {} layers",
                self.num_layers(),
                cache.batch(),
                cache.num_layers()
            )));
        }
        if cache.len() + sequence.tokens.len() > cache.capacity() {
            return Err(Error::invalid(format!(
                "{} tokens do not fit after {} cached rows (capacity {})",
                sequence.tokens.len(),
                cache.len(),
                cache.capacity()
            )));
        }
        Ok(())
    }
}

/// A ragged forward in progress (see [`Model::begin_ragged`]): the hidden states of every row
/// after the first [`RaggedPass::depth`] layers.
pub struct RaggedPass<'m, 's, 'a> {
    model: &'m Model,
    sequences: &'s mut [RaggedSequence<'a>],
    spans: Vec<Span>,
    capture: Vec<Option<usize>>,
    captured: Vec<Vec<Vec<f32>>>,
    cos: Tensor,
    sin: Tensor,
    hidden: Tensor,
    depth: usize,
}

impl RaggedPass<'_, '_, '_> {
    /// Layers run so far.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Runs layers `[depth, layer)` over every row (nothing when `layer <= depth`).
    pub fn run_to(&mut self, layer: usize) -> Result<()> {
        let model = self.model;
        if layer > model.num_layers() {
            return Err(Error::invalid(format!(
                "layer {layer} is past the model's {} layers",
                model.num_layers()
            )));
        }
        let (from, spans, capture) = (self.depth, &self.spans, &self.capture);
        let (sequences, captured) = (&mut *self.sequences, &mut self.captured);
        let (cos, sin) = (&self.cos, &self.sin);
        let mut x = self.hidden.clone();
        let rows = spans.iter().map(|span| span.len).sum();
        x = model.run(rows, || {
            for index in from..layer {
                x = model.layers[index].forward(&x, Kernels::Fused, |attn, h| {
                    let (q, k, v) = attn.project_qkv(h, &model.rope, cos, sin, Kernels::Fused)?;
                    let mut heads = Vec::with_capacity(spans.len());
                    for (sequence, span) in sequences.iter_mut().zip(spans) {
                        let rows_of = |t: &Tensor| -> Result<Tensor> {
                            Ok(t.narrow(2, span.offset, span.len)?.contiguous()?)
                        };
                        let (keys, values) =
                            sequence.cache.append(index, &rows_of(&k)?, &rows_of(&v)?)?;
                        heads.push(attn.attend_heads(
                            &rows_of(&q)?,
                            &keys,
                            &values,
                            span.mask.as_ref(),
                            Kernels::Fused,
                        )?);
                    }
                    attn.project_output(&Tensor::cat(&heads, 1)?)
                })?;
                for (i, span) in spans.iter().enumerate() {
                    if capture.get(i).copied().flatten() == Some(index + 1) {
                        captured[i] = x
                            .narrow(1, span.offset, span.len)?
                            .squeeze(0)?
                            .to_dtype(candle_core::DType::F32)?
                            .to_vec2::<f32>()?;
                    }
                }
            }
            Ok(x)
        })?;
        self.hidden = x;
        self.depth = self.depth.max(layer);
        Ok(())
    }

    /// The final norm and LM head over the rows of the sequences `tapped` (indices into the
    /// pass's sequences) at the current depth: per tapped sequence, the logits of its fed rows
    /// as host vectors. After layer `l < N` this is the early-exit tap.
    pub fn tap(&self, tapped: &[usize]) -> Result<Vec<Vec<Vec<f32>>>> {
        if let Some(&i) = tapped.iter().find(|&&i| i >= self.spans.len()) {
            return Err(Error::invalid(format!(
                "sequence {i} is not in a pass of {}",
                self.spans.len()
            )));
        }
        let rows: Vec<usize> = tapped
            .iter()
            .flat_map(|&i| self.spans[i].offset..self.spans[i].offset + self.spans[i].len)
            .collect();
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut logits = (self.model.logits_at(&self.hidden, &rows)?)
            .squeeze(0)?
            .to_vec2::<f32>()?
            .into_iter();
        Ok(tapped
            .iter()
            .map(|&i| logits.by_ref().take(self.spans[i].len).collect())
            .collect())
    }

    /// Runs the remaining layers and returns, per sequence, the logits of its fed rows when it
    /// asked for them, and the hidden states it asked to capture.
    #[allow(clippy::type_complexity)]
    pub fn finish(mut self) -> Result<(Vec<Vec<Vec<f32>>>, Vec<Vec<Vec<f32>>>)> {
        self.run_to(self.model.num_layers())?;
        let wanted: Vec<usize> = (self.sequences.iter())
            .zip(&self.spans)
            .flat_map(|(sequence, span)| sequence.logits.rows(span.offset, span.len))
            .collect();
        let mut logits = if wanted.is_empty() {
            Vec::new()
        } else {
            (self.model.logits_at(&self.hidden, &wanted)?)
                .squeeze(0)?
                .to_vec2::<f32>()?
        }
        .into_iter();
        let logits = (self.sequences.iter())
            .zip(&self.spans)
            .map(|(sequence, span)| {
                let rows = sequence.logits.rows(span.offset, span.len).len();
                logits.by_ref().take(rows).collect()
            })
            .collect();
        Ok((logits, self.captured))
    }
}
