//! Lookahead tokens (Bhendawade et al., "Speculative Streaming: Fast LLM Inference without
//! Auxiliary Models", arXiv 2402.11131): `S` extra rows (the paper's *streams*) in the top layers
//! of a draft, so that one forward proposes `1 + S` tokens. Here: their parameters
//! ([`LookaheadHead`]) and attention ([`lookahead_attention`]), which import data types only
//! (config, mask), so that the transformer can hold a head; and in `forward` the draft's
//! forwards with lookahead rows, [`Model`](crate::Model) methods that import the transformer.
//! Lookahead checkpoints are read and written by [`loading`](crate::loading), above the model.
//!
//! mirror-sd says "lookahead" for these rows, keeping "stream" for output streaming; their
//! checkpoint format keeps the paper's names.
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
mod forward;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Linear;

pub use crate::config::LookaheadConfig;
use crate::error::{Error, Result};
use crate::mask::AttentionInput;
pub use forward::LookaheadLogits;

/// Names of the head's tensors, in errors and in lookahead checkpoints.
pub(crate) const DOWN: &str = "streams.down_proj.weight";
pub(crate) const UP: &str = "streams.up_proj.weight";
pub(crate) const EMBEDDINGS: &str = "streams.embeddings";

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
