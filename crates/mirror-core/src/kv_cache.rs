//! A preallocated key/value cache with O(1) rollback and in-place compaction.
//!
//! Each layer owns two buffers of shape `(batch, kv_heads, capacity, head_dim)`, allocated once,
//! in the cache's own dtype: the model's activations' (f32 on the CPU) by default, or f16 for
//! half the bytes (keys and values are rounded once, when appended; see
//! [`LoadOptions::kv_dtype`](crate::LoadOptions)).
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

    /// The dtype keys and values are stored in.
    pub fn dtype(&self) -> Option<DType> {
        self.layers.first().map(|l| l.keys.dtype())
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

    /// Appends keys and values `(batch, kv_heads, t, head_dim)` to `layer`, converted to the
    /// cache's dtype, and returns views of everything cached for it so far.
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
        let dtype = cache.keys.dtype();
        cache.keys.slice_set(&keys.to_dtype(dtype)?, 2, cache.len)?;
        cache
            .values
            .slice_set(&values.to_dtype(dtype)?, 2, cache.len)?;
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
        self.clear();
        self.append_rows_from(source, 0, len)
    }

    /// Appends positions `[start, start + len)` of `source` after this cache's rows (same
    /// layers, batch and head shapes): how a prefix stored in pieces (the prefix cache's radix
    /// tree, one piece per edge) is laid back end to end. The copied rows are the source's bits
    /// exactly.
    pub fn append_rows_from(&mut self, source: &KvCache, start: usize, len: usize) -> Result<()> {
        if source.layers.len() != self.layers.len() || source.batch != self.batch {
            return Err(Error::invalid(format!(
                "cannot copy rows from a cache of {} layers and batch {} into one of {} layers and batch {}",
                source.layers.len(),
                source.batch,
                self.layers.len(),
                self.batch
            )));
        }
        let end = start + len;
        let source_len = source.layers.iter().map(|l| l.len).min().unwrap_or(0);
        if end > source_len {
            return Err(Error::invalid(format!(
                "cannot copy positions {start}..{end} from a cache holding {source_len}"
            )));
        }
        let base = self.len();
        if self.layers.iter().any(|l| l.len != base) {
            return Err(Error::invalid(
                "cannot append rows to a cache whose layers have different lengths",
            ));
        }
        if base + len > self.capacity {
            return Err(Error::ContextOverflow {
                requested: base + len,
                capacity: self.capacity,
            });
        }
        if len == 0 {
            return Ok(());
        }
        for (into, from) in self.layers.iter_mut().zip(&source.layers) {
            // `slice_set` copies, so the narrowed views (contiguous or not) share nothing with
            // this cache afterwards.
            into.keys
                .slice_set(&from.keys.narrow(2, start, len)?.contiguous()?, 2, base)?;
            into.values
                .slice_set(&from.values.narrow(2, start, len)?.contiguous()?, 2, base)?;
            into.len = base + len;
        }
        Ok(())
    }

    /// A new cache holding exactly positions `[start, end)` of this one (its capacity is
    /// `end - start`, its buffers its own): one edge's rows in the prefix cache's radix tree,
    /// charged for those rows alone.
    pub fn rows_between(&self, start: usize, end: usize) -> Result<Self> {
        if start >= end {
            return Err(Error::invalid(format!(
                "a cache of positions {start}..{end} holds no rows"
            )));
        }
        let Some(first) = self.layers.first() else {
            return Err(Error::invalid("a cache without layers holds no rows"));
        };
        let (_, num_kv_heads, _, head_dim) = first.keys.dims4()?;
        let mut rows = Self::new(
            self.layers.len(),
            self.batch,
            num_kv_heads,
            head_dim,
            end - start,
            first.keys.dtype(),
            first.keys.device(),
        )?;
        rows.append_rows_from(self, start, end - start)?;
        Ok(rows)
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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::KvCache;

    const LAYERS: usize = 3;
    const HEADS: usize = 2;
    const HEAD_DIM: usize = 4;

    /// The value every element of position `position` holds in a filled cache: distinct per
    /// layer, keys/values, head, position and lane, so a misplaced row cannot compare equal.
    fn value(layer: usize, is_value: bool, head: usize, position: usize, lane: usize) -> f32 {
        (layer * 100_000 + usize::from(is_value) * 10_000 + head * 1_000 + position * 10 + lane)
            as f32
    }

    /// Positions `[start, end)` of one layer's keys or values, as `value` writes them:
    /// `(1, heads, end - start, head_dim)`.
    fn block(layer: usize, is_value: bool, start: usize, end: usize) -> Tensor {
        let mut data = Vec::new();
        for head in 0..HEADS {
            for position in start..end {
                for lane in 0..HEAD_DIM {
                    data.push(value(layer, is_value, head, position, lane));
                }
            }
        }
        Tensor::from_vec(data, (1, HEADS, end - start, HEAD_DIM), &Device::Cpu).unwrap()
    }

    fn cache(capacity: usize) -> KvCache {
        KvCache::new(
            LAYERS,
            1,
            HEADS,
            HEAD_DIM,
            capacity,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    }

    /// A cache holding positions `0..len`, written one append per position.
    fn filled(len: usize, capacity: usize) -> KvCache {
        let mut cache = cache(capacity);
        for position in 0..len {
            for layer in 0..LAYERS {
                let keys = block(layer, false, position, position + 1);
                let values = block(layer, true, position, position + 1);
                cache.append(layer, &keys, &values).unwrap();
            }
        }
        cache
    }

    /// Row `row` of `cache`'s layer `layer`, keys then values, every head.
    fn row(cache: &KvCache, layer: usize, row: usize) -> Vec<f32> {
        let (keys, values) = cache.view(layer).unwrap();
        let mut out = keys
            .narrow(2, row, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        out.extend(
            values
                .narrow(2, row, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
        out
    }

    /// What row `row` holds when it is source position `position` (independent of `KvCache`).
    fn expected_row(layer: usize, position: usize) -> Vec<f32> {
        let mut out = Vec::new();
        for is_value in [false, true] {
            for head in 0..HEADS {
                for lane in 0..HEAD_DIM {
                    out.push(value(layer, is_value, head, position, lane));
                }
            }
        }
        out
    }

    fn assert_rows(cache: &KvCache, positions: &[usize]) {
        assert_eq!(cache.len(), positions.len());
        for layer in 0..LAYERS {
            assert_eq!(cache.layer_len(layer), positions.len());
            for (row_index, &position) in positions.iter().enumerate() {
                assert_eq!(
                    row(cache, layer, row_index),
                    expected_row(layer, position),
                    "layer {layer}, row {row_index} (source position {position})"
                );
            }
        }
    }

    #[test]
    fn rows_appended_from_pieces_lie_end_to_end() {
        let source = filled(10, 12);
        assert_rows(&source, &(0..10).collect::<Vec<_>>());
        let mut into = cache(9);
        into.append_rows_from(&source, 2, 3).unwrap();
        into.append_rows_from(&source, 0, 2).unwrap();
        into.append_rows_from(&source, 9, 1).unwrap();
        into.append_rows_from(&source, 4, 0).unwrap();
        assert_rows(&into, &[2, 3, 4, 0, 1, 9]);
        // Past the source's rows, or the destination's capacity: refused, nothing written.
        assert!(into.append_rows_from(&source, 8, 3).is_err());
        assert!(into.append_rows_from(&source, 0, 4).is_err());
        assert_rows(&into, &[2, 3, 4, 0, 1, 9]);
        // A source of another shape is refused.
        let other = KvCache::new(2, 1, HEADS, HEAD_DIM, 4, DType::F32, &Device::Cpu).unwrap();
        assert!(into.append_rows_from(&other, 0, 0).is_err());
    }

    #[test]
    fn a_cache_between_two_positions_holds_those_rows_alone_in_its_own_buffers() {
        let mut source = filled(8, 8);
        let piece = source.rows_between(3, 7).unwrap();
        assert_eq!(piece.capacity(), 4);
        assert_rows(&piece, &[3, 4, 5, 6]);
        // Overwriting the source does not reach the piece.
        source.truncate(3);
        for layer in 0..LAYERS {
            let keys = block(layer, false, 0, 1);
            let values = block(layer, true, 0, 1);
            source.append(layer, &keys, &values).unwrap();
        }
        assert_rows(&piece, &[3, 4, 5, 6]);
        assert!(source.rows_between(5, 5).is_err());
        assert!(source.rows_between(2, 9).is_err());
    }

    #[test]
    fn a_copied_prefix_replaces_what_was_cached() {
        let source = filled(6, 6);
        let mut into = filled(3, 5);
        into.copy_prefix_from(&source, 4).unwrap();
        assert_rows(&into, &[0, 1, 2, 3]);
        assert!(into.copy_prefix_from(&source, 6).is_err());
    }

    #[test]
    fn an_f16_cache_holds_each_appended_value_rounded_to_f16() {
        let mut cache = KvCache::new(1, 1, 1, 3, 2, DType::F16, &Device::Cpu).unwrap();
        let input = [1.0f32 / 3.0, 65519.0, -1.0e-6];
        let keys = Tensor::from_vec(input.to_vec(), (1, 1, 1, 3), &Device::Cpu).unwrap();
        let (k, v) = cache.append(0, &keys, &(&keys * 2.0).unwrap()).unwrap();
        assert_eq!(cache.dtype(), Some(DType::F16));
        let read = |t: &Tensor| -> Vec<f32> {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let want: Vec<f32> = input
            .iter()
            .map(|&x| half::f16::from_f32(x).to_f32())
            .collect();
        assert_eq!(read(&k), want);
        let doubled: Vec<f32> = input
            .iter()
            .map(|&x| half::f16::from_f32(x * 2.0).to_f32())
            .collect();
        assert_eq!(read(&v), doubled);
    }
}
