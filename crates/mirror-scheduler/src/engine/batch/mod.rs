//! The batched core: many sequences, one ragged target forward per step.
//!
//! Each step runs in named phases: `admit` (waiting sequences take caches from the pool, within
//! the batch cap), `schedule` (each running sequence offers its rows: a chunk of its prompt, a
//! plain decode row, or a verification window of `1 + k` rows drafted by prompt lookup, within the
//! step's token budget), `forward` (one ragged target pass: the linear layers over every row at
//! once, attention per sequence over its own cache), `settle` (each sequence verifies or samples,
//! commits and rolls its cache back) and `retire` (finished, cancelled, expired or failed
//! sequences leave and return their caches).
//!
//! A sequence follows exactly the steps it would take alone: a plain one those of
//! [`crate::Autoregressive`], a lookup one those of [`crate::SpeculativeDecoding::prompt_lookup`]
//! with fixed windows, with the same random streams. The kernels and attention give every row
//! the same bits whatever rows share its forward, so greedy output, and seeded sampled output,
//! equals the sequence's output alone.

mod drafting;
mod request;
mod sequence;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use mirror_core::{Model, RaggedSequence};

use super::pool::{cache_bytes, KvPool};
use super::prefix::PrefixStore;
use crate::adaptive::batch::{allocate, DraftOffer, StepCost};
use crate::adaptive::WindowPolicy;
use crate::error::{Error, Result};
use crate::generation::FinishReason;
use crate::run::{capacity_for, check_penalties};
use crate::strategy::settings::check_pair;
use crate::window::DraftWindow;
use request::{check_speculation, gamma_of, shared_prompt_refused, Lent};
use sequence::{new_sequence, settle_all, Phase, Sequence};

pub use request::{BatchSettings, EngineLoad, SequenceRequest, Speculation, StepReport};
pub(crate) use request::{Fork, Sink, Waiting};

/// The batched core: the running sequences, those waiting, and the pool.
pub(crate) struct BatchCore {
    target: Arc<Model>,
    /// The draft model of sequences that draft with one ([`Speculation::Draft`]).
    draft: Option<Arc<Model>>,
    settings: BatchSettings,
    pool: KvPool,
    prefix: PrefixStore,
    /// The draft model's caches of finished sequences, kept like the target's.
    draft_prefix: PrefixStore,
    /// Measured step time by row count: the price of a row in the next step.
    step_cost: StepCost,
    /// The draft's forward time by rows, measured while it drafts.
    draft_cost: StepCost,
    waiting: VecDeque<Waiting>,
    running: Vec<Sequence>,
}

impl BatchCore {
    pub fn new(
        target: Arc<Model>,
        draft: Option<Arc<Model>>,
        settings: BatchSettings,
    ) -> Result<Self> {
        settings.check()?;
        if let Some(draft) = &draft {
            check_pair(&target, draft)?;
        }
        Ok(Self {
            prefix: PrefixStore::new(Some(&target)),
            draft_prefix: PrefixStore::new(draft.as_deref()),
            target,
            draft,
            pool: KvPool::new(settings.kv_budget_bytes),
            step_cost: StepCost::default(),
            draft_cost: StepCost::default(),
            settings,
            waiting: VecDeque::new(),
            running: Vec::new(),
        })
    }

    /// Queues a sequence (and its forks); a request that can never run fails at once.
    pub fn submit(&mut self, waiting: Waiting) {
        match self.check(&waiting) {
            Ok(()) => self.waiting.push_back(waiting),
            Err(e) => waiting.fail(e, shared_prompt_refused),
        }
    }

    /// The caches `waiting` needs (its own, then its forks'), checked against the context and
    /// the pool's whole budget.
    fn check(&self, waiting: &Waiting) -> Result<()> {
        check_speculation(waiting.request.speculation, self.draft.is_some())?;
        for config in
            std::iter::once(&waiting.request.config).chain(waiting.forks.iter().map(|f| &f.config))
        {
            check_penalties(config, &self.target)?;
            if let Some(monitors) = &config.monitors {
                (monitors.check(self.target.num_layers())).map_err(Error::InvalidConfig)?;
            }
        }
        let bytes = self.bytes_of(waiting, &self.capacities(waiting)?);
        self.pool.check_fits(bytes)
    }

    /// Bytes of the caches of `capacities` rows that `waiting`'s sequences need: the target's,
    /// and the draft model's when they draft with it.
    fn bytes_of(&self, waiting: &Waiting, capacities: &[usize]) -> u64 {
        let draft = self.draft_of(waiting);
        capacities
            .iter()
            .map(|&c| cache_bytes(&self.target, c) + draft.map_or(0, |d| cache_bytes(d, c)))
            .sum()
    }

    /// The draft model, when `waiting`'s sequences draft with it.
    fn draft_of(&self, waiting: &Waiting) -> Option<&Arc<Model>> {
        self.draft
            .as_ref()
            .filter(|_| waiting.request.speculation.uses_draft_model())
    }

    fn capacities(&self, waiting: &Waiting) -> Result<Vec<usize>> {
        let request = &waiting.request;
        let gamma = gamma_of(request);
        std::iter::once(&request.config)
            .chain(waiting.forks.iter().map(|f| &f.config))
            .map(|config| capacity_for(&self.target, &request.prompt, config, gamma))
            .collect()
    }

    /// Whether any sequence runs or waits.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Sequences running and waiting, the pool's bytes, and the prefix cache's share of them
    /// (the step counters are the engine thread's: [`crate::EngineHandle::load`]).
    pub fn load(&self) -> EngineLoad {
        EngineLoad {
            running: self.running.len(),
            waiting: self.waiting.len(),
            pool_used: self.pool.used(),
            pool_free: self.pool.free(),
            prefix_entries: self.prefix.len() + self.draft_prefix.len(),
            prefix_bytes: self.prefix.bytes() + self.draft_prefix.bytes(),
            ..EngineLoad::default()
        }
    }

    /// One step: admit, schedule, forward, settle, retire.
    pub fn step(&mut self) -> StepReport {
        self.admit();
        self.expire();
        if let Some(draft) = &self.draft {
            let phase = drafting::DraftPhase {
                draft,
                policy: self.settings.window,
                prefill_chunk: self.settings.prefill_chunk,
                target_cost: &self.step_cost,
                draft_cost: &mut self.draft_cost,
            };
            drafting::draft_phase(phase, &mut self.running);
        }
        let report = self.schedule();
        if report.rows > 0 {
            if let Err(e) = self.forward_and_settle() {
                let shared = Arc::new(e);
                for sequence in &mut self.running {
                    if !sequence.fed.is_empty() {
                        sequence.failed = Some(Error::StepFailed {
                            source: Arc::clone(&shared),
                        });
                    }
                }
            }
        }
        self.spawn_forks();
        self.retire();
        report
    }

    /// Admission: waiting sequences, first come first served, while the batch has room and the
    /// pool holds their caches (the prefix cache gives bytes back, least recently used first).
    fn admit(&mut self) {
        while let Some(next) = self.waiting.front() {
            let wanted = 1 + next.forks.len();
            if self.running.len() + wanted > self.settings.max_batch && !self.running.is_empty() {
                break;
            }
            let draft = self.draft_of(next).cloned();
            let lent = self.capacities(next).and_then(|c| self.lend_all(&c, draft));
            let caches = match lent {
                Ok(Some(caches)) => caches,
                // The pool is full: admission waits for a sequence to leave.
                Ok(None) => break,
                Err(e) => {
                    if let Some(waiting) = self.waiting.pop_front() {
                        waiting.fail(e, shared_prompt_refused);
                    }
                    continue;
                }
            };
            let Some(waiting) = self.waiting.pop_front() else {
                break;
            };
            if let Some(sequence) = self.start(waiting, caches) {
                self.running.push(sequence);
            }
        }
    }

    /// Caches of `capacities` rows, the target's and `draft`'s, all or none (`None` while the
    /// pool cannot hold them all, after the prefix caches gave back what they could).
    fn lend_all(
        &mut self,
        capacities: &[usize],
        draft: Option<Arc<Model>>,
    ) -> Result<Option<Vec<Lent>>> {
        let needed: u64 = capacities
            .iter()
            .map(|&c| {
                cache_bytes(&self.target, c) + draft.as_ref().map_or(0, |d| cache_bytes(d, c))
            })
            .sum();
        while self.pool.free() < needed {
            // The larger store gives back first: neither starves the other.
            let (larger, smaller) = if self.prefix.bytes() >= self.draft_prefix.bytes() {
                (&mut self.prefix, &mut self.draft_prefix)
            } else {
                (&mut self.draft_prefix, &mut self.prefix)
            };
            if !larger.evict_one(&mut self.pool) && !smaller.evict_one(&mut self.pool) {
                return Ok(None);
            }
        }
        let mut lent: Vec<Lent> = Vec::with_capacity(capacities.len());
        for &capacity in capacities {
            match self.lend_one(capacity, draft.as_deref()) {
                Ok(Some(one)) => lent.push(one),
                other => {
                    for one in lent {
                        self.give_back(one);
                    }
                    return other.map(|_| None);
                }
            }
        }
        Ok(Some(lent))
    }

    /// One sequence's caches of `capacity` rows (`None` while the pool cannot hold them).
    fn lend_one(&mut self, capacity: usize, draft: Option<&Model>) -> Result<Option<Lent>> {
        let Some(target) = self.pool.lend(&self.target, capacity)? else {
            return Ok(None);
        };
        let draft = match draft.map(|model| self.pool.lend(model, capacity)) {
            None => None,
            Some(Ok(Some(cache))) => Some(cache),
            Some(other) => {
                self.pool.give_back(target);
                return other.map(|_| None);
            }
        };
        Ok(Some(Lent { target, draft }))
    }

    /// Returns a sequence's caches to the pool.
    fn give_back(&mut self, lent: Lent) {
        self.pool.give_back(lent.target);
        if let Some(draft) = lent.draft {
            self.pool.give_back(draft);
        }
    }

    /// A sequence admitted with its caches: its prompt's longest stored prefix copied in (the
    /// target's and the draft's), and the same random streams as it would have alone. `None`
    /// (the sequence and its forks told why, their caches back in the pool) when a copy fails.
    fn start(&mut self, waiting: Waiting, mut lent: Vec<Lent>) -> Option<Sequence> {
        let prompt = &waiting.request.prompt;
        // The last prompt token is always fed: its logits start the decoding.
        let limit = prompt.len().saturating_sub(1);
        let mut reused = (0, 0);
        if self.settings.prefix_cache {
            let first = lent.first_mut()?;
            let (target, draft) = (&mut first.target.cache, first.draft.as_mut());
            let copied = self
                .prefix
                .copy_longest(prompt, limit, target)
                .and_then(|target| match draft {
                    Some(draft) => (self.draft_prefix)
                        .copy_longest(prompt, limit, &mut draft.cache)
                        .map(|d| (target, d)),
                    None => Ok((target, 0)),
                });
            match copied {
                Ok(rows) => reused = rows,
                Err(e) => {
                    for one in lent {
                        self.give_back(one);
                    }
                    waiting.fail(e, || {
                        Error::InvalidPrompt("the prompt it shares could not be started".into())
                    });
                    return None;
                }
            }
        }
        let forks: Vec<(Fork, Lent)> = waiting.forks.into_iter().zip(lent.drain(1..)).collect();
        let own = lent.pop()?;
        let mut sequence = new_sequence(
            waiting.request,
            waiting.sink,
            waiting.submitted,
            own,
            &self.target,
            waiting.boundaries,
        );
        sequence.stats.prefix_cached_tokens = reused.0;
        sequence.constraint = waiting.constraint;
        if let Some(draft) = sequence.draft.as_mut() {
            draft.tokens = sequence.seq[..reused.1].to_vec();
        }
        sequence.forks = forks;
        sequence.decode_once_prefilled();
        Some(sequence)
    }

    /// Sequences whose deadline passed, or whose consumer has gone, end before the step.
    fn expire(&mut self) {
        let now = Instant::now();
        for sequence in &mut self.running {
            if sequence.done() {
                continue;
            }
            if sequence.deadline.is_some_and(|d| now >= d) {
                sequence.output.finish = Some(FinishReason::Deadline);
            } else if sequence.sink.as_ref().is_some_and(|s| s.cancelled()) {
                sequence.output.finish = Some(FinishReason::Cancelled);
            }
        }
    }

    /// Each running sequence offers its rows, decode rows first (they are everyone's next
    /// token), then prompt chunks, within the step's token budget.
    fn schedule(&mut self) -> StepReport {
        let mut budget = self.settings.step_tokens;
        let (chunk, forced) = (self.settings.prefill_chunk, self.settings.forced_drafts);
        let mut report = StepReport::default();
        for sequence in &mut self.running {
            sequence.fed.clear();
            sequence.window = DraftWindow::default();
        }
        // Decode rows and windows first: they are everyone's next tokens.
        for sequence in &mut self.running {
            if matches!(sequence.phase, Phase::Decode) && !sequence.done() && sequence.has_room() {
                budget -= sequence.offer(budget, chunk, forced);
            }
        }
        if self.settings.window == WindowPolicy::Adaptive {
            self.allocate_windows();
        }
        // Prompt chunks take what is left, within the slowdown the running sequences accept.
        let decode_rows: usize = self.running.iter().map(|s| s.fed.len()).sum();
        let mut budget = self.settings.step_tokens.saturating_sub(decode_rows);
        if let Some(bound) = self.prefill_bound(decode_rows) {
            budget = budget.min(bound);
        }
        for sequence in &mut self.running {
            if matches!(sequence.phase, Phase::Prefill) && !sequence.done() {
                budget -= sequence.offer(budget, chunk, forced);
            }
        }
        for sequence in &self.running {
            if !sequence.fed.is_empty() {
                report.sequences += 1;
                report.rows += sequence.fed.len();
            }
        }
        report
    }

    /// Prompt rows a step with `decode_rows` decode rows may add, priced by the measured cost
    /// line: the step may take up to `prefill_slowdown` times what its decode rows alone would
    /// (at least one row, so that every prompt progresses). `None` without decode rows or
    /// before any step was timed: then only `step_tokens` bounds the step.
    fn prefill_bound(&self, decode_rows: usize) -> Option<usize> {
        if decode_rows == 0 {
            return None;
        }
        let limit = self.settings.prefill_slowdown * self.step_cost.seconds(decode_rows)?;
        let most = self.settings.step_tokens.saturating_sub(decode_rows);
        // The line never decreases with rows: the last row count within the limit.
        let (mut low, mut high) = (0, most);
        while low < high {
            let mid = (low + high).div_ceil(2);
            match self.step_cost.seconds(decode_rows + mid) {
                Some(t) if t <= limit => low = mid,
                _ => high = mid - 1,
            }
        }
        Some(low.max(1))
    }

    /// Trims the offered lookup windows to the batch's best goodput (see
    /// [`crate::adaptive`]'s `batch` module). Before any step was timed the windows stay whole:
    /// that step times them.
    fn allocate_windows(&mut self) {
        let rows: usize = self
            .running
            .iter()
            .map(|s| s.fed.len() - s.window.len())
            .sum();
        let committed = self
            .running
            .iter()
            .filter(|s| matches!(s.phase, Phase::Decode) && !s.fed.is_empty())
            .count() as f64;
        let cost = &self.step_cost;
        if committed == 0.0 || cost.seconds(rows.max(1)).is_none() {
            return;
        }
        let offers: Vec<DraftOffer> = self
            .running
            .iter()
            .map(|s| DraftOffer {
                // Forced tokens are always accepted.
                rate: if s.forced { 1.0 } else { s.acceptance.rate() },
                tokens: s.window.len(),
            })
            .collect();
        let taken = allocate(rows, committed, &offers, |r| {
            cost.seconds(r).unwrap_or(f64::EPSILON)
        });
        for (sequence, tokens) in self.running.iter_mut().zip(taken) {
            sequence.trim_window(tokens);
        }
    }

    /// The ragged forward over every offered row, then each sequence settles.
    fn forward_and_settle(&mut self) -> Result<()> {
        let mut offered: Vec<&mut Sequence> = self
            .running
            .iter_mut()
            .filter(|s| !s.fed.is_empty())
            .collect();
        // Monitored decode rows also bring back a layer's hidden states (same forward).
        let capture: Vec<Option<usize>> = offered.iter().map(|s| s.hidden_layer()).collect();
        let mut inputs: Vec<RaggedSequence<'_>> = offered
            .iter_mut()
            .map(|s| RaggedSequence {
                tokens: &s.fed,
                logits: matches!(s.phase, Phase::Decode),
                cache: &mut s.cache.cache,
            })
            .collect();
        let rows: usize = inputs.iter().map(|i| i.tokens.len()).sum();
        let target = &self.target;
        let started = Instant::now();
        let (logits, hidden) = match capture.iter().any(Option::is_some) {
            true => target.forward_ragged_capturing(&mut inputs, &capture)?,
            false => (target.forward_ragged(&mut inputs)?, Vec::new()),
        };
        self.step_cost.record(rows, started.elapsed());
        drop(inputs);
        settle_all(offered, logits, hidden);
        Ok(())
    }

    /// Forks whose prompt is cached now start decoding, each from a copy of the cache.
    fn spawn_forks(&mut self) {
        let mut spawned = Vec::new();
        for parent in &mut self.running {
            if parent.forks.is_empty() || !matches!(parent.phase, Phase::Decode) {
                continue;
            }
            // The prompt but its last token: what every fork's first decode step starts from
            // (the parent may have decoded a step already, when its prompt came from the
            // prefix cache; those rows are its own).
            let prompt_rows = parent.prompt_len() - 1;
            for (fork, lent) in std::mem::take(&mut parent.forks) {
                let mut sequence = parent.fork(fork, lent, prompt_rows, &self.target);
                sequence.phase = Phase::Decode;
                sequence.stats.time.prefill = parent.stats.time.prefill;
                spawned.push(sequence);
            }
        }
        self.running.extend(spawned);
    }

    /// Finished, cancelled, expired and failed sequences leave; the prefix cache keeps the rows
    /// of theirs it lacks, and their caches go back to the pool. A leaving sequence's pending
    /// forks take over its prefill.
    fn retire(&mut self) {
        let mut index = 0;
        while index < self.running.len() {
            let sequence = &mut self.running[index];
            // As a sequence alone: it ends when done, or at the context limit.
            let leaving = sequence.done()
                || (matches!(sequence.phase, Phase::Decode) && !sequence.has_room());
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
    fn hand_over_forks(&mut self, sequence: &mut Sequence) -> Option<Sequence> {
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
        }
        self.prefix.clear(&mut self.pool);
        self.draft_prefix.clear(&mut self.pool);
    }
}

#[cfg(test)]
mod tests;
