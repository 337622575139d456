//! The KV pool: every batched sequence's cache comes from here, against a byte budget.
//!
//! A cache is allocated whole at admission (its capacity is the prompt, the output and one
//! window of slack, as for a sequence run alone) and returned at finish, cancel or failure.
//! When the budget cannot hold the next cache, admission waits: nothing running is ever
//! evicted or killed for memory.

use mirror_core::{KvCache, Model};

use crate::error::{Error, Result};

/// Bytes of a cache of `capacity` rows for `model` (keys and values, every layer).
pub(crate) fn cache_bytes(model: &Model, capacity: usize) -> u64 {
    let config = model.config();
    let per_row = 2 * config.num_kv_heads() * config.head_dim() * model.kv_dtype().size_in_bytes();
    (model.num_layers() * per_row * capacity) as u64
}

/// A cache lent by the pool, with what it is charged.
pub(crate) struct PooledCache {
    pub cache: KvCache,
    pub bytes: u64,
}

/// The byte budget of the running sequences' caches.
#[derive(Debug)]
pub(crate) struct KvPool {
    budget: u64,
    used: u64,
}

impl KvPool {
    pub fn new(budget: u64) -> Self {
        Self { budget, used: 0 }
    }

    pub fn used(&self) -> u64 {
        self.used
    }

    pub fn free(&self) -> u64 {
        self.budget - self.used
    }

    /// Whether a cache of `bytes` could ever be lent: one larger than the whole budget waits
    /// forever, so it is refused instead.
    pub fn check_fits(&self, bytes: u64) -> Result<()> {
        if bytes > self.budget {
            return Err(Error::MemoryBudget {
                needed: bytes,
                budget: self.budget,
            });
        }
        Ok(())
    }

    /// A cache of `capacity` rows for `model`, or `None` while the budget cannot hold it.
    pub fn lend(&mut self, model: &Model, capacity: usize) -> Result<Option<PooledCache>> {
        let bytes = cache_bytes(model, capacity);
        self.check_fits(bytes)?;
        if bytes > self.free() {
            return Ok(None);
        }
        let cache = model.new_cache(1, capacity)?;
        self.used += bytes;
        Ok(Some(PooledCache { cache, bytes }))
    }

    /// Takes a cache back.
    pub fn give_back(&mut self, cache: PooledCache) {
        self.release(cache.bytes);
    }

    /// Charges `bytes` of rows built outside [`KvPool::lend`] (a prefix-cache node's), or
    /// false, charging nothing, while the budget cannot hold them.
    pub fn charge(&mut self, bytes: u64) -> bool {
        if bytes > self.free() {
            return false;
        }
        self.used += bytes;
        true
    }

    /// Takes back `bytes` that [`KvPool::charge`] or [`KvPool::lend`] charged.
    pub fn release(&mut self, bytes: u64) {
        self.used -= bytes.min(self.used);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_larger_than_the_budget_is_refused_and_the_rest_waits_for_free_bytes() {
        let mut pool = KvPool::new(100);
        assert!(pool.check_fits(100).is_ok());
        assert!(matches!(
            pool.check_fits(101),
            Err(Error::MemoryBudget {
                needed: 101,
                budget: 100
            })
        ));
        pool.used = 60;
        assert_eq!(pool.free(), 40);
        assert!(!pool.charge(41));
        assert_eq!(pool.used(), 60);
        assert!(pool.charge(40));
        assert_eq!(pool.free(), 0);
        pool.release(30);
        assert_eq!(pool.used(), 70);
    }
}
