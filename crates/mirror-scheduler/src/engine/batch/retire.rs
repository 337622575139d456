//! The batch's retire phase: sequences that are done leave, their caches back in the pool or
//! in the prefix cache, their forks handed over; and the engine's shutdown.

use super::request::Lent;
use super::sequence::Sequence;
use super::BatchCore;
use crate::error::Error;
use crate::generation::FinishReason;

impl BatchCore {
    /// Finished, cancelled, expired and failed sequences leave; the prefix cache keeps the rows
    /// of theirs it lacks, and their caches go back to the pool. A leaving sequence's pending
    /// forks take over its prefill.
    pub(super) fn retire(&mut self) {
        let mut index = 0;
        while index < self.running.len() {
            let sequence = &mut self.running[index];
            // As a sequence alone: it ends when done, or at the context limit.
            let leaving = sequence.done() || (sequence.is_decoding() && !sequence.has_room());
            if !leaving {
                index += 1;
                continue;
            }
            let mut sequence = self.running.swap_remove(index);
            if let Some(heir) = self.hand_over_forks(&mut sequence) {
                self.running.push(heir);
            }
            let sink = sequence.sink.take();
            let failed = sequence.failed.take();
            let rows = sequence.cache.cache.len();
            if self.settings.prefix_cache && failed.is_none() {
                // Keeping rows only saves later prefills: a copy that fails keeps the tree as
                // it was, the cache's bytes are back in the pool either way, and the
                // sequence's output stands.
                let pool = &mut self.pool;
                let _ = self
                    .prefix
                    .insert(&sequence.seq[..rows], sequence.cache, pool);
                if let Some(draft) = sequence.draft {
                    let _ = (self.draft_prefix).insert(&draft.tokens, draft.cache, pool);
                }
            } else {
                self.pool.give_back(sequence.cache);
                if let Some(draft) = sequence.draft {
                    self.pool.give_back(draft.cache);
                }
            }
            if let Some(mirror) = sequence.mirror {
                mirror.release(&mut self.pool);
            }
            let result = match failed {
                Some(e) => Err(e),
                None => {
                    let mut generation = sequence.output.finish(sequence.stats, sequence.started);
                    generation.logprobs = sequence.logprobs;
                    let stopped = generation.finish_reason == FinishReason::Monitor;
                    generation.monitors = sequence.monitors.map(|m| m.report(stopped));
                    Ok(generation)
                }
            };
            if let Some(sink) = sink {
                sink.finish(result);
            }
        }
    }

    /// A sequence leaving before its forks started: the first fork carries on with its prefill
    /// (from a copy of what is cached so far), with the others as its own forks.
    pub(super) fn hand_over_forks(&mut self, sequence: &mut Sequence) -> Option<Sequence> {
        if sequence.forks.is_empty() {
            return None;
        }
        let mut forks = std::mem::take(&mut sequence.forks).into_iter();
        let (fork, lent) = forks.next()?;
        // A failed step may have left the cache half-written: the heir starts over then.
        let prompt_rows = sequence.prompt_len() - 1;
        let rows = if sequence.failed.is_some() {
            0
        } else {
            sequence.cache.cache.len().min(prompt_rows)
        };
        let mut heir = sequence.fork(fork, lent, rows, &self.target);
        heir.forks = forks.collect();
        heir.stats.prefix_cached_tokens = sequence.stats.prefix_cached_tokens;
        heir.decode_once_prefilled();
        Some(heir)
    }

    /// Ends every sequence, running or waiting, with `error()` (the engine is shutting down).
    pub fn abandon(&mut self, error: impl Fn() -> Error) {
        for waiting in self.waiting.drain(..) {
            waiting.fail(error(), &error);
        }
        for mut sequence in std::mem::take(&mut self.running) {
            if let Some(sink) = sequence.sink.take() {
                sink.finish(Err(error()));
            }
            for (fork, lent) in std::mem::take(&mut sequence.forks) {
                fork.sink.finish(Err(error()));
                self.give_back(lent);
            }
            self.give_back(Lent {
                target: sequence.cache,
                draft: sequence.draft.map(|d| d.cache),
            });
            if let Some(mirror) = sequence.mirror {
                mirror.release(&mut self.pool);
            }
        }
        self.prefix.clear(&mut self.pool);
        self.draft_prefix.clear(&mut self.pool);
    }
}
