//! A preallocated key/value cache with O(1) rollback and in-place compaction.
//!
//! Each layer owns two buffers of shape `(batch, kv_heads, capacity, head_dim)`, allocated once.
//! Appending writes new rows in place (`slice_set`); truncating only moves the length; compaction
//! (keeping an accepted path of a token tree) gathers the kept rows and writes them back at the
//! base of the region.
//!
//! **Clone semantics.** `KvCache` is deliberately not `Clone`: candle tensors share storage when
//! cloned, and appends write into that storage, so a shallow copy would be corrupted by the next
//! append of either side. [`KvCache::deep_copy`] allocates an independent copy. A rollback point is
//! just a length: remember [`KvCache::len`] and call [`KvCache::truncate`].

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Keys and values of one layer.
#[derive(Debug)]
struct LayerCache {
    keys: Tensor,
    values: Tensor,
    len: usize,
}

/// The KV cache of a whole model, passed explicitly as `&mut` to every forward.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    batch: usize,
    capacity: usize,
}

impl KvCache {
    /// Allocates a cache for `num_layers` layers of `batch` independent rows.
    pub fn new(
        num_layers: usize,
        batch: usize,
        num_kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if batch == 0 || capacity == 0 {
            return Err(Error::invalid(
                "a KV cache needs batch >= 1 and capacity >= 1",
            ));
        }
        let shape = (batch, num_kv_heads, capacity, head_dim);
        let layers = (0..num_layers)
            .map(|_| {
                Ok(LayerCache {
                    keys: Tensor::zeros(shape, dtype, device)?,
                    values: Tensor::zeros(shape, dtype, device)?,
                    len: 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            batch,
            capacity,
        })
    }

    /// Rows in the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Most positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Cached length of layer 0 (all layers agree except between the two halves of a split forward).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len)
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cached length of one layer.
    pub fn layer_len(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.len)
    }

    /// Appends keys and values `(batch, kv_heads, t, head_dim)` to `layer` and returns views of
    /// everything cached for it so far.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        keys: &Tensor,
        values: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let capacity = self.capacity;
        let cache = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| Error::invalid(format!("layer {layer} is outside the cache")))?;
        let added = keys.dim(2)?;
        let new_len = cache.len + added;
        if new_len > capacity {
            return Err(Error::ContextOverflow {
                requested: new_len,
                capacity,
            });
        }
        cache.keys.slice_set(keys, 2, cache.len)?;
        cache.values.slice_set(values, 2, cache.len)?;
        cache.len = new_len;
        Ok((
            cache.keys.narrow(2, 0, new_len)?,
            cache.values.narrow(2, 0, new_len)?,
        ))
    }

    /// Views of everything cached for `layer` (read-only; nothing is appended).
    pub(crate) fn view(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        let cache = self
            .layers
            .get(layer)
            .ok_or_else(|| Error::invalid(format!("layer {layer} is outside the cache")))?;
        Ok((
            cache.keys.narrow(2, 0, cache.len)?,
            cache.values.narrow(2, 0, cache.len)?,
        ))
    }

    /// Rolls every layer back to `len` positions. O(1): nothing is copied or cleared.
    pub fn truncate(&mut self, len: usize) {
        for layer in &mut self.layers {
            layer.len = layer.len.min(len);
        }
    }

    /// Empties the cache.
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Keeps the cached positions `rows` (absolute, strictly increasing, all `>= base`) at
    /// `base, base + 1, ...` and drops everything else after `base`.
    ///
    /// This is how an accepted root-to-leaf path of a token tree becomes a plain prefix again.
    /// Positions below `base` are untouched.
    pub fn compact(&mut self, base: usize, rows: &[usize]) -> Result<()> {
        let len = self.len();
        if rows.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::invalid("rows to keep must be strictly increasing"));
        }
        if let (Some(&first), Some(&last)) = (rows.first(), rows.last()) {
            if first < base || last >= len {
                return Err(Error::invalid(format!(
                    "rows to keep must lie in [{base}, {len}), got {first}..={last}"
                )));
            }
        }
        if self.layers.iter().any(|l| l.len != len) {
            return Err(Error::invalid(
                "cannot compact a cache whose layers have different lengths",
            ));
        }
        // Already in place: rows == base..base+n.
        let in_place = rows.iter().enumerate().all(|(i, &r)| r == base + i);
        if !in_place {
            let device = self.layers[0].keys.device().clone();
            let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
            let index = Tensor::from_vec(ids, rows.len(), &device)?;
            for layer in &mut self.layers {
                // Gather on the full contiguous buffer (index_select on a narrowed view fails on
                // CPU), then write the kept rows back at the base.
                let keys = layer.keys.index_select(&index, 2)?;
                let values = layer.values.index_select(&index, 2)?;
                layer.keys.slice_set(&keys, 2, base)?;
                layer.values.slice_set(&values, 2, base)?;
            }
        }
        for layer in &mut self.layers {
            layer.len = base + rows.len();
        }
        Ok(())
    }

    /// Keeps only batch row `row`, returning a batch-1 cache (a deep copy of that row).
    pub fn select_batch_row(&self, row: usize) -> Result<Self> {
        if row >= self.batch {
            return Err(Error::invalid(format!(
                "batch row {row} out of range for a batch of {}",
                self.batch
            )));
        }
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerCache {
                    keys: l.keys.narrow(0, row, 1)?.copy()?,
                    values: l.values.narrow(0, row, 1)?.copy()?,
                    len: l.len,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            batch: 1,
            capacity: self.capacity,
        })
    }

    /// Replaces this cache's contents with the first `len` positions of `source` (same
    /// layers, batch and head shapes; any capacity of at least `len`): a prefix computed once,
    /// reused without recomputing it. The copied rows are the source's bits exactly.
    pub fn copy_prefix_from(&mut self, source: &KvCache, len: usize) -> Result<()> {
        if source.layers.len() != self.layers.len() || source.batch != self.batch {
            return Err(Error::invalid(format!(
                "cannot copy a prefix from a cache of {} layers and batch {} into one of {} layers and batch {}",
                source.layers.len(),
                source.batch,
                self.layers.len(),
                self.batch
            )));
        }
        if len > source.len() {
            return Err(Error::invalid(format!(
                "cannot copy {len} positions from a cache holding {}",
                source.len()
            )));
        }
        if len > self.capacity {
            return Err(Error::ContextOverflow {
                requested: len,
                capacity: self.capacity,
            });
        }
        self.clear();
        if len == 0 {
            return Ok(());
        }
        for (into, from) in self.layers.iter_mut().zip(&source.layers) {
            into.keys
                .slice_set(&from.keys.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            into.values
                .slice_set(&from.values.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            into.len = len;
        }
        Ok(())
    }

    /// An independent copy with its own buffers (see the module docs on clone semantics).
    pub fn deep_copy(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerCache {
                    keys: l.keys.copy()?,
                    values: l.values.copy()?,
                    len: l.len,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            batch: self.batch,
            capacity: self.capacity,
        })
    }
}
