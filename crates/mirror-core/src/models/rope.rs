//! Rotary position embeddings (Su et al., "RoFormer", arXiv 2104.09864) at arbitrary positions,
//! with the llama3 frequency scaling (Meta, "The Llama 3 Herd of Models", arXiv 2407.21783).

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::Result;

/// Precomputed `cos`/`sin` tables, gathered per token so that tree nodes at the same depth share
/// a rotation.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    cos: Tensor,
    sin: Tensor,
    interleaved: bool,
}

/// The tables cover at most this many positions (a million), whatever the config declares: a
/// model's context limit is capped there. Tables for a config's `max_position_embeddings` of
/// 2^40 (a corrupt or hostile config.json) would otherwise be allocated at load.
pub(crate) const MAX_TABLE_POSITIONS: usize = 1 << 20;

impl Rope {
    pub(crate) fn new(config: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        let head_dim = config.head_dim();
        let max_positions = config.max_position_embeddings.min(MAX_TABLE_POSITIONS);
        let inv_freq = inverse_frequencies(config);
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for position in 0..max_positions {
            for &f in &inv_freq {
                // f32 like the reference implementations, so angles round the same way.
                let angle = position as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (max_positions, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_positions, half), device)?.to_dtype(dtype)?;
        Ok(Self {
            cos,
            sin,
            interleaved: config.rope_interleaved,
        })
    }

    /// Gathers the tables for `positions` `(batch, tokens)`.
    pub(crate) fn tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (batch, tokens) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let cos = self.cos.index_select(&flat, 0)?;
        let sin = self.sin.index_select(&flat, 0)?;
        let half = self.cos.dim(1)?;
        if batch == 1 {
            Ok((cos, sin))
        } else {
            Ok((
                cos.reshape((batch, tokens, half))?,
                sin.reshape((batch, tokens, half))?,
            ))
        }
    }

    /// Rotates `x` `(batch, heads, tokens, head_dim)` (contiguous).
    pub(crate) fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok(if self.interleaved {
            candle_nn::rotary_emb::rope_i(x, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope(x, cos, sin)?
        })
    }

    #[cfg(feature = "train")]
    /// [`Rope::apply`] built from differentiable tensor ops (the fused kernels have no backward),
    /// for tables of one batch row `(tokens, head_dim / 2)`.
    pub(crate) fn apply_differentiable(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        if cos.rank() != 2 {
            return Err(crate::error::Error::invalid(
                "differentiable RoPE needs positions shared by the whole batch",
            ));
        }
        Ok(if self.interleaved {
            candle_nn::rotary_emb::rope_i_slow(x, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope_slow(x, cos, sin)?
        })
    }

    pub(crate) fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }
}

/// `1 / theta^(2i/d)`, rescaled by the llama3 scheme when the config asks for it.
fn inverse_frequencies(config: &ModelConfig) -> Vec<f32> {
    let head_dim = config.head_dim();
    let base: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / (config.rope_theta as f32).powf(i as f32 / head_dim as f32))
        .collect();
    let Some(scaling) = config
        .rope_scaling
        .as_ref()
        .filter(|s| s.rope_type == "llama3")
    else {
        return base;
    };
    // validate() guarantees these are present for llama3.
    let factor = scaling.factor.unwrap_or(1.0) as f32;
    let low = scaling.low_freq_factor.unwrap_or(1.0) as f32;
    let high = scaling.high_freq_factor.unwrap_or(1.0) as f32;
    let original = scaling.original_max_position_embeddings.unwrap_or(8192) as f32;
    let low_freq_wavelen = original / low;
    let high_freq_wavelen = original / high;
    base.into_iter()
        .map(|freq| {
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_freq_wavelen {
                freq
            } else if wavelen > low_freq_wavelen {
                freq / factor
            } else {
                // Interpolate between the scaled and unscaled frequency in the middle band.
                let smooth = (original / wavelen - low) / (high - low);
                (1.0 - smooth) * freq / factor + smooth * freq
            }
        })
        .collect()
}
