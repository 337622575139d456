//! Lookahead tokens (Bhendawade et al., "Speculative Streaming: Fast LLM Inference without
//! Auxiliary Models", arXiv 2402.11131): `S` extra rows (the paper's *streams*) in the top layers
//! of a draft, so that one forward proposes `1 + S` tokens. mirror-sd says "lookahead" for them,
//! keeping "stream" for output streaming; their checkpoint format keeps the paper's names.
//!
//! Lookahead `j` (1-based) of an anchor row at position `p` enters layer `N - lookahead_layers` as
//! `h + up(down(h)) + e_j`, where `h` is the main row's state there, `down`/`up` a rank-`r`
//! residual projection and `e_j` a learned lookahead embedding. In the top layers it attends to
//! everything the anchor sees (the verified prefix and the anchor itself) and to lookahead rows
//! `1..=j` of the same anchor, at position `p + j`, and predicts the token at `p + j + 1` through
//! the model's shared final norm and LM head. Lookahead keys and values are never cached, and the
//! main row never attends to lookahead rows, so a draft with lookahead predicts exactly what the base
//! draft predicts on its main row.
//!
//! Checkpoints are safetensors files holding `streams.down_proj.weight` `(rank, hidden)`,
//! `streams.up_proj.weight` `(hidden, rank)` and `streams.embeddings` `(S, hidden)`, with the
//! [`LookaheadConfig`] as JSON in the metadata key `mirror_sd.streams`.

use std::path::Path;

use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::Linear;

use super::layers::Kernels;
use super::transformer::Model;
use crate::checkpoint::Checkpoint;
pub use crate::config::LookaheadConfig;
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::mask::AttentionInput;

/// Metadata key of a lookahead checkpoint's config.
pub const LOOKAHEAD_CONFIG_KEY: &str = "mirror_sd.streams";
const DOWN: &str = "streams.down_proj.weight";
const UP: &str = "streams.up_proj.weight";
const EMBEDDINGS: &str = "streams.embeddings";

/// The lookahead parameters of a draft; attach them with
/// [`Model::with_lookahead`](crate::Model::with_lookahead).
#[derive(Debug, Clone)]
pub struct LookaheadHead {
    config: LookaheadConfig,
    hidden_size: usize,
    down: Linear,
    up: Linear,
    embeddings: Tensor,
}

impl LookaheadHead {
    /// Builds a head from its tensors: `down` `(rank, hidden)`, `up` `(hidden, rank)`,
    /// `embeddings` `(lookahead_tokens, hidden)`. Tensors that are [`candle_core::Var`]s stay
    /// trainable through the head.
    pub fn from_tensors(
        config: LookaheadConfig,
        down: Tensor,
        up: Tensor,
        embeddings: Tensor,
    ) -> Result<Self> {
        config.validate()?;
        let (rank, hidden_size) = down.dims2()?;
        let shape_error = |name: &str, expected: Vec<usize>, actual: &[usize]| Error::TensorShape {
            name: name.to_string(),
            expected,
            actual: actual.to_vec(),
            path: "lookahead parameters".into(),
        };
        if rank != config.rank {
            return Err(shape_error(
                DOWN,
                vec![config.rank, hidden_size],
                down.dims(),
            ));
        }
        if up.dims() != [hidden_size, rank] {
            return Err(shape_error(UP, vec![hidden_size, rank], up.dims()));
        }
        if embeddings.dims() != [config.tokens, hidden_size] {
            return Err(shape_error(
                EMBEDDINGS,
                vec![config.tokens, hidden_size],
                embeddings.dims(),
            ));
        }
        Ok(Self {
            config,
            hidden_size,
            down: Linear::new(down, None),
            up: Linear::new(up, None),
            embeddings,
        })
    }

    /// A head whose parameters are all zero: every lookahead row starts as a copy of its anchor.
    pub fn zeros(
        config: LookaheadConfig,
        hidden_size: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (s, r, h) = (config.tokens, config.rank, hidden_size);
        Self::from_tensors(
            config,
            Tensor::zeros((r, h), dtype, device)?,
            Tensor::zeros((h, r), dtype, device)?,
            Tensor::zeros((s, h), dtype, device)?,
        )
    }

    /// Reads a lookahead checkpoint (see the module docs).
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let checkpoint = Checkpoint::read(path, device, "lookahead checkpoint")?;
        let config: LookaheadConfig = checkpoint.meta(LOOKAHEAD_CONFIG_KEY)?;
        let get = |name: &str| -> Result<Tensor> { Ok(checkpoint.tensor(name)?.to_dtype(dtype)?) };
        Self::from_tensors(config, get(DOWN)?, get(UP)?, get(EMBEDDINGS)?)
    }

    #[cfg(feature = "train")]
    /// Writes the head as a lookahead checkpoint (f32), with `extra` metadata entries.
    pub fn save(
        &self,
        path: &Path,
        extra: &std::collections::HashMap<String, String>,
    ) -> Result<()> {
        let mut metadata = extra.clone();
        metadata.insert(
            LOOKAHEAD_CONFIG_KEY.into(),
            crate::checkpoint::json(&self.config)?,
        );
        let tensors = vec![
            (DOWN.to_string(), self.down.weight().to_dtype(DType::F32)?),
            (UP.to_string(), self.up.weight().to_dtype(DType::F32)?),
            (
                EMBEDDINGS.to_string(),
                self.embeddings.to_dtype(DType::F32)?,
            ),
        ];
        crate::checkpoint::write(path, tensors, metadata)
    }

    /// The head's shape.
    pub fn config(&self) -> &LookaheadConfig {
        &self.config
    }

    /// Width of the states the head reads.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// `down`, `up` and the lookahead embeddings, in that order.
    pub fn tensors(&self) -> [&Tensor; 3] {
        [self.down.weight(), self.up.weight(), &self.embeddings]
    }

    pub(crate) fn check_fits(&self, hidden_size: usize, num_layers: usize) -> Result<()> {
        if self.hidden_size != hidden_size || self.config.layers > num_layers {
            return Err(Error::invalid(format!(
                "lookahead rows for hidden size {} over {} layers do not fit a model of hidden size \
                 {hidden_size} with {num_layers} layers",
                self.hidden_size, self.config.layers
            )));
        }
        Ok(())
    }

    /// Initial lookahead states `(batch, anchors * S, hidden)` (anchor-major) from the
    /// anchors' main-row states `(batch, anchors, hidden)`.
    pub fn initial_states(&self, anchors: &Tensor) -> Result<Tensor> {
        let (batch, rows, hidden) = anchors.dims3()?;
        let count = self.config.tokens;
        let projected = (anchors + self.up.forward(&self.down.forward(anchors)?)?)?;
        let embeddings = self
            .embeddings
            .to_dtype(anchors.dtype())?
            .reshape((1, 1, count, hidden))?;
        let states = projected
            .unsqueeze(2)?
            .broadcast_add(&embeddings)?
            .reshape((batch, rows * count, hidden))?;
        Ok(states)
    }
}

/// Positions and mask of the lookahead rows of `anchor_positions.len()` anchors: lookahead `j` of the
/// anchor at `p` sits at `p + j`, sees the keys its anchor sees (`anchor_mask` rows `(anchors,
/// kv_len)`, additive; `None`: all `kv_len` keys) and lookahead rows `1..=j` of its own anchor.
pub fn lookahead_attention(
    anchor_positions: &[u32],
    anchor_mask: Option<&Tensor>,
    kv_len: usize,
    lookahead_tokens: usize,
    device: &Device,
) -> Result<AttentionInput> {
    let anchors = anchor_positions.len();
    let rows = anchors * lookahead_tokens;
    if rows == 0 {
        return Err(Error::invalid(
            "lookahead needs at least one anchor and one token",
        ));
    }
    let positions: Vec<u32> = anchor_positions
        .iter()
        .flat_map(|&p| (1..=lookahead_tokens as u32).map(move |j| p + j))
        .collect();
    let seen = match anchor_mask {
        Some(mask) => {
            if mask.dims() != [anchors, kv_len] {
                return Err(Error::invalid(format!(
                    "anchor mask {:?} is not ({anchors}, {kv_len})",
                    mask.dims()
                )));
            }
            let repeat: Vec<u32> = (0..rows).map(|r| (r / lookahead_tokens) as u32).collect();
            let repeat = Tensor::from_vec(repeat, rows, device)?;
            mask.to_dtype(DType::F32)?.index_select(&repeat, 0)?
        }
        None => Tensor::zeros((rows, kv_len), DType::F32, device)?,
    };
    let mut own = vec![f32::NEG_INFINITY; rows * rows];
    for row in 0..rows {
        let anchor = row / lookahead_tokens;
        let first = anchor * lookahead_tokens;
        own[row * rows + first..=row * rows + row].fill(0.0);
    }
    let own = Tensor::from_vec(own, (rows, rows), device)?;
    Ok(AttentionInput {
        positions: Tensor::from_vec(positions, (1, rows), device)?,
        mask: Some(Tensor::cat(&[&seen, &own], 1)?),
    })
}

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
        self.run(|| {
            let (cos, sin) = self.rope.tables(&positions)?;
            let mut x = head.initial_states(anchors)?;
            for index in split..self.num_layers() {
                x = self.layers[index].forward(&x, kernels, |attn, h| {
                    let (q, k, v) = attn.project_qkv(h, &self.rope, &cos, &sin, kernels)?;
                    let (cached_keys, cached_values) = cache.view(index)?;
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
