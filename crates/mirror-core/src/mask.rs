//! Attention masks and position ids: causal with an offset, and arbitrary per-row visibility
//! over the cache (token trees, and what a draft needs to grow many branches in one pass).
//!
//! Masks are additive: `0.0` where a query may attend, `-inf` elsewhere, shaped
//! `(queries, keys)` for one row or `(batch, queries, keys)` for a batch.

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// Positions and mask of the tokens fed to one forward pass.
#[derive(Debug, Clone)]
pub struct AttentionInput {
    /// Position id of every new token, `(batch, tokens)`, `u32`.
    pub positions: Tensor,
    /// Additive mask over `cached + new` keys, or `None` when every new token may see every key
    /// (a single decoded token).
    pub mask: Option<Tensor>,
}

impl AttentionInput {
    /// Causal attention for `seq_len` new tokens after `offset` cached ones, for every row of a
    /// batch (rows are independent sequences of equal length).
    pub fn causal(batch: usize, seq_len: usize, offset: usize, device: &Device) -> Result<Self> {
        if seq_len == 0 {
            return Err(Error::invalid("a forward needs at least one token"));
        }
        let row: Vec<u32> = (offset..offset + seq_len).map(|p| p as u32).collect();
        let positions: Vec<u32> = (0..batch).flat_map(|_| row.iter().copied()).collect();
        let positions = Tensor::from_vec(positions, (batch, seq_len), device)?;
        let mask = if seq_len == 1 {
            None
        } else {
            let kv_len = offset + seq_len;
            let data: Vec<f32> = (0..seq_len)
                .flat_map(|i| (0..kv_len).map(move |j| visible(j <= offset + i)))
                .collect();
            Some(Tensor::from_vec(data, (seq_len, kv_len), device)?)
        };
        Ok(Self { positions, mask })
    }

    /// One row per new token, each with its own view of the keys (batch 1). `kv_len` is the
    /// number of keys after the new tokens are appended.
    pub fn from_rows(rows: &[RowVisibility], kv_len: usize, device: &Device) -> Result<Self> {
        if rows.is_empty() {
            return Err(Error::invalid("a forward needs at least one token"));
        }
        let mut data = vec![f32::NEG_INFINITY; rows.len() * kv_len];
        for (i, row) in rows.iter().enumerate() {
            let line = &mut data[i * kv_len..(i + 1) * kv_len];
            if row.prefix_len > kv_len || row.extra.iter().any(|&k| k >= kv_len) {
                return Err(Error::invalid(format!(
                    "row {i} sees keys beyond the {kv_len} that will be cached"
                )));
            }
            line[..row.prefix_len].fill(0.0);
            for &k in &row.extra {
                line[k] = 0.0;
            }
        }
        let positions: Vec<u32> = rows.iter().map(|r| r.position as u32).collect();
        Ok(Self {
            positions: Tensor::from_vec(positions, (1, rows.len()), device)?,
            mask: Some(Tensor::from_vec(data, (rows.len(), kv_len), device)?),
        })
    }

    /// Number of new tokens.
    pub fn seq_len(&self) -> Result<usize> {
        Ok(self.positions.dim(1)?)
    }
}

/// What one new token may attend to: the first `prefix_len` keys, plus the keys in `extra`
/// (absolute indices; include the token's own index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowVisibility {
    /// The token's position id.
    pub position: usize,
    /// Keys `[0, prefix_len)` are visible.
    pub prefix_len: usize,
    /// Further visible keys, absolute indices (ancestors and the token itself).
    pub extra: Vec<usize>,
}

fn visible(yes: bool) -> f32 {
    if yes {
        0.0
    } else {
        f32::NEG_INFINITY
    }
}
