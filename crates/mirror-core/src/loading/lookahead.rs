//! Lookahead checkpoints ([`LookaheadHead::load`], [`LookaheadHead::save`]): read and written
//! here, above the model, so that the head itself knows no file format.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::LookaheadConfig;
use crate::error::Result;
#[cfg(feature = "train")]
use crate::formats::checkpoint;
use crate::formats::checkpoint::Checkpoint;
use crate::models::lookahead::{LookaheadHead, DOWN, EMBEDDINGS, UP};

/// Metadata key of a lookahead checkpoint's config.
pub const LOOKAHEAD_CONFIG_KEY: &str = "mirror_sd.streams";

impl LookaheadHead {
    /// Reads a lookahead checkpoint: a safetensors file holding `streams.down_proj.weight`
    /// `(rank, hidden)`, `streams.up_proj.weight` `(hidden, rank)` and `streams.embeddings`
    /// `(S, hidden)`, with the [`LookaheadConfig`] as JSON in the metadata key
    /// [`LOOKAHEAD_CONFIG_KEY`].
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
            checkpoint::json(self.config())?,
        );
        let tensors = [DOWN, UP, EMBEDDINGS]
            .into_iter()
            .zip(self.tensors())
            .map(|(name, tensor)| Ok((name.to_string(), tensor.to_dtype(DType::F32)?)))
            .collect::<Result<Vec<_>>>()?;
        checkpoint::write(path, tensors, metadata)
    }
}
