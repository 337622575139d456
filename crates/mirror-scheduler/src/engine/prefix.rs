//! The prefix cache: the KV caches of finished sequences, kept in the pool's budget until it
//! needs their bytes back (least recently used first), so that a new sequence whose prompt starts
//! with the same tokens (a shared system prompt, the next turn of a conversation) copies those
//! rows instead of prefilling them.
//!
//! Entries are found by the longest common prefix of token ids, scanned entry by entry: a few
//! dozen entries of a few thousand tokens cost microseconds against milliseconds per prefilled
//! token, so no radix tree is kept yet. Copied rows are the stored rows' bits, and those are what
//! a prefill of the same tokens computes (the kernels and attention give every row the same bits
//! whatever rows share its forward), so output is bit-identical with and without the cache.

use super::pool::{KvPool, PooledCache};

/// One kept cache and the tokens its rows hold.
struct Entry {
    tokens: Vec<u32>,
    cache: PooledCache,
    last_used: u64,
}

/// The kept caches.
#[derive(Default)]
pub(crate) struct PrefixStore {
    entries: Vec<Entry>,
    clock: u64,
}

/// The best stored prefix for a prompt: which entry, and how many leading tokens it shares.
pub(crate) struct PrefixMatch<'a> {
    pub cache: &'a PooledCache,
    pub len: usize,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixStore {
    /// Entries kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Bytes the kept caches take in the pool.
    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.cache.bytes).sum()
    }

    /// The entry sharing the most leading tokens with `tokens` (at most `limit` of them), if
    /// any shares one; it counts as used now.
    pub fn longest(&mut self, tokens: &[u32], limit: usize) -> Option<PrefixMatch<'_>> {
        let (index, len) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, tokens).min(limit)))
            .filter(|&(_, len)| len > 0)
            .max_by_key(|&(i, len)| (len, self.entries[i].last_used))?;
        self.clock += 1;
        let entry = &mut self.entries[index];
        entry.last_used = self.clock;
        Some(PrefixMatch {
            cache: &entry.cache,
            len,
        })
    }

    /// Keeps `cache`, whose first rows hold `tokens`. An entry whose tokens start the new ones
    /// is redundant and goes; a new entry that an old one already covers is not kept. Caches
    /// that are not kept go back to `pool`.
    pub fn insert(&mut self, tokens: Vec<u32>, cache: PooledCache, pool: &mut KvPool) {
        if tokens.is_empty()
            || self
                .entries
                .iter()
                .any(|e| common_prefix(&e.tokens, &tokens) == tokens.len())
        {
            pool.give_back(cache);
            return;
        }
        let mut index = 0;
        while index < self.entries.len() {
            let entry = &self.entries[index];
            if common_prefix(&entry.tokens, &tokens) == entry.tokens.len() {
                let entry = self.entries.swap_remove(index);
                pool.give_back(entry.cache);
            } else {
                index += 1;
            }
        }
        self.clock += 1;
        self.entries.push(Entry {
            tokens,
            cache,
            last_used: self.clock,
        });
    }

    /// Gives the least recently used entry's cache back to `pool`; false when none is kept.
    pub fn evict_one(&mut self, pool: &mut KvPool) -> bool {
        let Some(index) = (0..self.entries.len()).min_by_key(|&i| self.entries[i].last_used) else {
            return false;
        };
        let entry = self.entries.swap_remove(index);
        pool.give_back(entry.cache);
        true
    }

    /// Gives every kept cache back.
    pub fn clear(&mut self, pool: &mut KvPool) {
        while self.evict_one(pool) {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_common_prefix_counts_leading_equal_tokens() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
        assert_eq!(common_prefix(&[5], &[1]), 0);
        assert_eq!(common_prefix(&[], &[1]), 0);
    }
}
