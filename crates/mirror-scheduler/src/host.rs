//! What crosses from a model's device to the host: logits rows as vectors. Only host data
//! passes between the target's and the draft's devices.

use crate::error::Result;

/// The rows of a `(1, rows, vocab)` logits tensor.
pub(crate) fn host_rows(logits: &candle_core::Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(logits.squeeze(0)?.to_vec2::<f32>()?)
}
