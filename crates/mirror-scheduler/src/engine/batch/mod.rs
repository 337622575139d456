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
mod forward;
mod mirror;
mod request;
mod retire;
mod sequence;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use mirror_core::Model;

use super::pool::{cache_bytes, KvPool};
use super::prefix::PrefixStore;
use crate::adaptive::batch::{allocate, DraftOffer, StepCost};
use crate::adaptive::{TokenAcceptance, WindowPolicy};
use crate::error::{Error, Result};
use crate::generation::FinishReason;
use crate::run::{capacity_for, check_penalties};
use crate::strategy::settings::check_pair;
use crate::window::DraftWindow;
use mirror::MirrorShared;
use request::{check_speculation, gamma_of, shared_prompt_refused, Lent};
use sequence::{new_sequence, Phase, Sequence};

pub use request::{BatchSettings, EngineLoad, SequenceRequest, Speculation, StepReport};
pub(crate) use request::{Fork, Sink, Waiting};

/// The batched core: the running sequences, those waiting, and the pool.
pub(crate) struct BatchCore {
    target: Arc<Model>,
    /// The draft model of sequences that draft with one ([`Speculation::Draft`]).
    draft: Option<Arc<Model>>,
    /// What Mirror sequences share ([`Speculation::Mirror`]), when there is a draft model.
    mirror: Option<MirrorShared>,
    settings: BatchSettings,
    pool: KvPool,
    prefix: PrefixStore,
    /// The draft model's caches of finished sequences, kept like the target's.
    draft_prefix: PrefixStore,
    /// Measured step time by row count: the price of a row in the next step.
    step_cost: StepCost,
    /// The draft's forward time by rows, measured while it drafts.
    draft_cost: StepCost,
    /// Draft-model acceptance pooled over every drafting sequence: a new one starts from it.
    draft_acceptance: TokenAcceptance,
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
        let mirror = match &draft {
            Some(draft) => Some(MirrorShared::new(&target, draft, settings.mirror)?),
            None => None,
        };
        Ok(Self {
            mirror,
            prefix: PrefixStore::new(Some(&target)),
            draft_prefix: PrefixStore::new(draft.as_deref()),
            target,
            draft,
            pool: KvPool::new(settings.kv_budget_bytes),
            step_cost: StepCost::default(),
            draft_cost: StepCost::default(),
            draft_acceptance: TokenAcceptance::default(),
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
        self.caches_bytes(capacities, self.draft_of(waiting).as_ref())
    }

    /// Bytes of target caches of `capacities` rows, each with a cache of the draft model given
    /// (and of the extra rows given with it), as [`BatchCore::draft_of`] gives them.
    fn caches_bytes(&self, capacities: &[usize], draft: Option<&(Arc<Model>, usize)>) -> u64 {
        let draft_bytes = |c| draft.map_or(0, |(d, extra)| cache_bytes(d, c + extra));
        (capacities.iter())
            .map(|&c| cache_bytes(&self.target, c) + draft_bytes(c))
            .sum()
    }

    /// The draft model, when `waiting`'s sequences draft with it, and the rows their draft
    /// caches take beyond the target's (a Mirror sequence's tree).
    fn draft_of(&self, waiting: &Waiting) -> Option<(Arc<Model>, usize)> {
        let speculation = waiting.request.speculation;
        match (&self.draft, &self.mirror) {
            (Some(draft), _) if speculation.uses_draft_model() => Some((Arc::clone(draft), 0)),
            (_, Some(mirror)) if speculation.is_mirror() => Some((
                Arc::clone(&mirror.draft),
                mirror.extra_rows(gamma_of(&waiting.request)),
            )),
            _ => None,
        }
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
        if let Some(shared) = &self.mirror {
            for sequence in &mut self.running {
                sequence.prepare_mirror(shared);
            }
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
        for sequence in &mut self.running {
            if let Some((proposed, accepted)) = sequence.drafted_verdict.take() {
                self.draft_acceptance.record(proposed, accepted);
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
            let draft = self.draft_of(next);
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
        draft: Option<(Arc<Model>, usize)>,
    ) -> Result<Option<Vec<Lent>>> {
        let needed = self.caches_bytes(capacities, draft.as_ref());
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
            let draft = draft.as_ref().map(|(d, extra)| (&**d, capacity + extra));
            match self.lend_one(capacity, draft) {
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

    /// One sequence's caches of `capacity` rows, and its draft cache of the rows given with the
    /// draft model (`None` while the pool cannot hold them).
    fn lend_one(
        &mut self,
        capacity: usize,
        draft: Option<(&Model, usize)>,
    ) -> Result<Option<Lent>> {
        let Some(target) = self.pool.lend(&self.target, capacity)? else {
            return Ok(None);
        };
        let draft = match draft.map(|(model, rows)| self.pool.lend(model, rows)) {
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
            // A Mirror sequence's draft cache is its worker's: it prefills there.
            let drafts = waiting.request.speculation.uses_draft_model();
            let draft = first.draft.as_mut().filter(|_| drafts);
            let target = &mut first.target.cache;
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
        drafting::seed_acceptance(&mut sequence, &self.draft_acceptance);
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
                // Forced tokens are always accepted; an exploring window is kept whole.
                rate: match s.forced || s.draft.as_ref().is_some_and(|d| d.exploring) {
                    true => 1.0,
                    false => s.acceptance.rate(),
                },
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
}

#[cfg(test)]
mod tests;
