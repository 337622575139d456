//! The prefix cache: the KV rows of finished sequences, kept in the pool's budget until it needs
//! their bytes back, so that a new sequence whose prompt starts with the same tokens (a shared
//! system prompt, the next turn of a conversation) copies those rows instead of prefilling them.
//!
//! The rows live in a radix tree over token ids (see the `radix` module), as SGLang's
//! RadixAttention and llama-server's prompt cache keep them: each node owns the rows of its own
//! edge's tokens, in a small cache of exactly that many rows, charged to the pool by its own
//! bytes. Two conversations that share a 500-token system prompt keep it once, as one node with
//! two children, where a list of whole caches kept it twice; a follow-up turn adds only its new
//! tokens, as a child of the turn it continues.
//!
//! - **Lookup** walks the tree along the prompt to the longest match (which may end inside an
//!   edge) and copies the path's rows, in order, into the new sequence's cache.
//! - **Insertion** at finish walks the same way, splits the edge where the finished tokens
//!   diverge, and stores only the rows not already in the tree, as one new leaf; the finished
//!   cache goes back to the pool.
//! - **Eviction** removes the least recently used leaf, repeatedly, until the pool has the bytes
//!   it needs: a node used by a lookup or an insertion counts as used then, and so do its
//!   ancestors, so cold suffixes go first and the prefixes others share go last.
//!
//! Rows are copied out, not shared: attention reads one contiguous cache per sequence, which then
//! appends to it, so each new sequence gets its own copy of the matched path (microseconds a row,
//! against milliseconds a prefilled token). A split copies the edge's two halves into caches of
//! their own, so every node stays charged for exactly its rows. [`PrefixStore::len`] (the
//! engine's `prefix_entries`) counts nodes, a shared prefix once.
//!
//! Copied rows are the stored rows' bits, and those are what a prefill of the same tokens
//! computes (the kernels and attention give every row the same bits whatever rows share its
//! forward), so output is bit-identical with and without the cache.
//!
//! The batched engine keeps one store for the target's caches and one for the draft model's,
//! each with its own row size: the two are found and evicted independently.

mod radix;

use mirror_core::{KvCache, Model};

use super::pool::{cache_bytes, KvPool, PooledCache};
use crate::error::Result;
use radix::{EdgeRows, RadixTree};

/// One edge's KV rows, in a cache of exactly that many rows.
struct EdgeCache {
    cache: KvCache,
    /// Pool bytes of one row of the store's model.
    row_bytes: u64,
}

impl EdgeRows for EdgeCache {
    fn between(&self, start: usize, end: usize) -> Result<Self> {
        Ok(Self {
            cache: self.cache.rows_between(start, end)?,
            row_bytes: self.row_bytes,
        })
    }

    fn bytes(&self) -> u64 {
        self.row_bytes * self.cache.capacity() as u64
    }
}

/// The kept rows of one model's caches.
pub(crate) struct PrefixStore {
    tree: RadixTree<EdgeCache>,
    /// Pool bytes of one cached position (keys and values, every layer):
    /// `cache_bytes(model, 1)`, and a cache of `n` rows costs `n` times that.
    row_bytes: u64,
}

impl PrefixStore {
    /// An empty store for `model`'s caches (`None`: a store that is never filled, for an engine
    /// without a draft model).
    pub fn new(model: Option<&Model>) -> Self {
        Self {
            tree: RadixTree::default(),
            row_bytes: model.map_or(0, |m| cache_bytes(m, 1)),
        }
    }

    /// Nodes of the tree: one per stored edge, a shared prefix counted once.
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    /// Bytes the kept rows take in the pool.
    pub fn bytes(&self) -> u64 {
        self.tree.bytes()
    }

    /// Copies into `into` (emptied first) the rows of the longest stored prefix of `tokens` (at
    /// most `limit` tokens); returns how many rows it copied. The path counts as used now.
    pub fn copy_longest(
        &mut self,
        tokens: &[u32],
        limit: usize,
        into: &mut KvCache,
    ) -> Result<usize> {
        let found = self.tree.longest(tokens, limit);
        if found.len == 0 {
            return Ok(0);
        }
        into.clear();
        for (rows, len) in found.pieces {
            into.append_rows_from(&rows.cache, 0, len)?;
        }
        Ok(found.len)
    }

    /// Keeps the rows of `tokens` that `finished` holds (its first rows) and the tree does not,
    /// then gives `finished` back to `pool`. The new rows are charged to the pool, which has the
    /// finished cache's bytes back by then; a copy that fails leaves the tree whole without them.
    pub fn insert(
        &mut self,
        tokens: &[u32],
        finished: PooledCache,
        pool: &mut KvPool,
    ) -> Result<()> {
        let PooledCache { cache, bytes } = finished;
        pool.release(bytes);
        let rows = tokens.len().min(cache.len());
        let row_bytes = self.row_bytes;
        self.tree.insert(&tokens[..rows], |start, end| {
            let bytes = row_bytes * (end - start) as u64;
            if !pool.charge(bytes) {
                return Ok(None);
            }
            match cache.rows_between(start, end) {
                Ok(rows) => Ok(Some(EdgeCache {
                    cache: rows,
                    row_bytes,
                })),
                Err(e) => {
                    pool.release(bytes);
                    Err(e.into())
                }
            }
        })
    }

    /// Gives the least recently used leaf's rows back to `pool`; false when none is kept.
    pub fn evict_one(&mut self, pool: &mut KvPool) -> bool {
        match self.tree.evict_leaf() {
            Some(rows) => {
                pool.release(rows.bytes());
                true
            }
            None => false,
        }
    }

    /// Gives every kept row back.
    pub fn clear(&mut self, pool: &mut KvPool) {
        while self.evict_one(pool) {}
    }
}

#[cfg(test)]
mod tests;
