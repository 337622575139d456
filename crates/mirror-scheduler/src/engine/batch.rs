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

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use mirror_core::{sampling, Model, RaggedSequence};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::pool::{cache_bytes, KvPool, PooledCache};
use super::prefix::PrefixStore;
use crate::draft::lookup::LookupConfig;
use crate::error::{Error, Result};
use crate::generation::{FinishReason, Generation, GenerationConfig, StreamControl};
use crate::run::{capacity_for, Output};
use crate::seed::mix;
use crate::stats::Stats;
use crate::verify::verify_window;
use crate::window::DraftWindow;

/// The batched engine's settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchSettings {
    /// Most sequences running at once (default 16).
    pub max_batch: usize,
    /// Bytes the running sequences' KV caches may take together (default 4 GiB).
    pub kv_budget_bytes: u64,
    /// Most rows one step's forward takes, prompt chunks and windows included (default 256).
    pub step_tokens: usize,
    /// Most prompt tokens one sequence prefills in one step (default 128), so that a long prompt
    /// does not stall everyone's next token.
    pub prefill_chunk: usize,
    /// Keep finished sequences' caches in the pool for prompts that start like them (default
    /// on; see the `prefix` module).
    pub prefix_cache: bool,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            max_batch: 16,
            kv_budget_bytes: 4 << 30,
            step_tokens: 256,
            prefill_chunk: 128,
            prefix_cache: true,
        }
    }
}

impl BatchSettings {
    pub(crate) fn check(&self) -> Result<()> {
        let positive = [
            ("max_batch", self.max_batch),
            ("step_tokens", self.step_tokens),
            ("prefill_chunk", self.prefill_chunk),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::InvalidConfig(format!("{name} must be at least 1")));
            }
        }
        if self.kv_budget_bytes == 0 {
            return Err(Error::InvalidConfig(
                "kv_budget_bytes must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// How a batched sequence speculates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Speculation {
    /// One token per step (as [`crate::Autoregressive`]).
    #[default]
    None,
    /// Windows of up to `gamma` tokens drafted by prompt lookup, verified in the same forward (as
    /// [`crate::SpeculativeDecoding::prompt_lookup`] with fixed windows).
    Lookup {
        /// The lookup's n-gram range.
        lookup: LookupConfig,
        /// Most draft tokens per window.
        gamma: usize,
    },
}

/// One sequence for the batched engine.
#[derive(Debug, Clone)]
pub struct SequenceRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Its own length, sampling, seed and stop tokens.
    pub config: GenerationConfig,
    /// How it speculates.
    pub speculation: Speculation,
    /// When it must end; output so far is returned with [`FinishReason::Deadline`].
    pub deadline: Option<Instant>,
}

impl SequenceRequest {
    /// Greedy, no speculation, no deadline.
    pub fn new(prompt: Vec<u32>, config: GenerationConfig) -> Self {
        Self {
            prompt,
            config,
            speculation: Speculation::None,
            deadline: None,
        }
    }
}

/// Where a batched sequence's committed tokens go, and how it ends: the callback may cancel.
pub(crate) trait Sink: Send {
    /// Newly committed tokens; `Stop` cancels the sequence.
    fn tokens(&mut self, tokens: &[u32]) -> StreamControl;
    /// Whether the consumer has gone (checked before every step, prefill included).
    fn cancelled(&self) -> bool;
    /// The end.
    fn finish(self: Box<Self>, result: Result<Generation>);
}

/// A sequence waiting for admission, with the forks that share its prompt.
pub(crate) struct Waiting {
    pub request: SequenceRequest,
    pub sink: Box<dyn Sink>,
    pub submitted: Instant,
    pub forks: Vec<Fork>,
}

/// A sequence that shares another's prompt: the prompt is prefilled once, then its cache is
/// copied into each fork, which goes on with its own settings (seed, length, sampling).
pub(crate) struct Fork {
    pub config: GenerationConfig,
    pub sink: Box<dyn Sink>,
}

/// Where a running sequence is.
enum Phase {
    /// Its prompt (all but the last token) is being cached, a chunk per step.
    Prefill,
    /// It decodes: each step feeds the last token, and a window after it.
    Decode,
}

/// A running sequence.
struct Sequence {
    /// Prompt and committed tokens.
    seq: Vec<u32>,
    cache: PooledCache,
    config: GenerationConfig,
    speculation: Speculation,
    deadline: Option<Instant>,
    output: Output,
    stats: Stats,
    started: Instant,
    rng: StdRng,
    phase: Phase,
    sink: Option<Box<dyn Sink>>,
    /// Set when it must leave at the next retire phase with this error.
    failed: Option<Error>,
    /// The rows it fed this step, and the window among them.
    fed: Vec<u32>,
    window: DraftWindow,
    /// Forks waiting for this sequence's prefill, each with the cache it was lent.
    forks: Vec<(Fork, PooledCache)>,
}

impl Sequence {
    /// Whether the cache has room for one more token; ends the sequence at the context limit
    /// when not (as [`crate::run::Run::has_room`]).
    fn has_room(&mut self) -> bool {
        let cache = &self.cache.cache;
        if cache.len() + 1 > cache.capacity() {
            self.output.finish = Some(FinishReason::ContextLimit);
            return false;
        }
        true
    }

    fn window_room(&self) -> usize {
        let cache = &self.cache.cache;
        cache.capacity() - cache.len() - 1
    }

    fn done(&self) -> bool {
        self.output.done() || self.failed.is_some()
    }

    /// The rows this sequence offers the next step, within `budget` rows.
    fn offer(&mut self, budget: usize, prefill_chunk: usize) -> usize {
        self.fed.clear();
        self.window = DraftWindow::default();
        match self.phase {
            Phase::Prefill => {
                let target = self.seq.len() - 1;
                let cached = self.cache.cache.len();
                let take = (target - cached).min(prefill_chunk).min(budget);
                self.fed.extend_from_slice(&self.seq[cached..cached + take]);
            }
            Phase::Decode => {
                if budget == 0 {
                    return 0;
                }
                if let Speculation::Lookup { lookup, gamma } = self.speculation {
                    let room = gamma.min(self.window_room()).min(budget - 1);
                    self.window = lookup.window(&self.seq, room, self.output.stop());
                    if !self.window.is_empty() {
                        self.stats.lookup_windows += 1;
                    }
                }
                self.fed.push(self.seq[self.seq.len() - 1]);
                self.fed.extend_from_slice(&self.window.tokens);
            }
        }
        self.fed.len()
    }

    /// After the forward: verify or sample, commit, roll the cache back.
    fn settle(&mut self, rows: Vec<Vec<f32>>) -> Result<()> {
        match self.phase {
            Phase::Prefill => {
                if self.cache.cache.len() + 1 >= self.seq.len() {
                    self.phase = Phase::Decode;
                    self.stats.time.prefill = self.started.elapsed();
                }
                Ok(())
            }
            Phase::Decode => {
                self.stats.target_passes += 1;
                let base = self.cache.cache.len() - self.fed.len();
                let committed = match self.speculation {
                    Speculation::None => {
                        let logits = &rows[0];
                        let token = if self.config.sampling.is_greedy() {
                            sampling::argmax(logits)
                        } else {
                            sampling::warp_probs(logits, &self.config.sampling)
                                .sample(self.rng.random())
                        };
                        vec![token]
                    }
                    Speculation::Lookup { .. } => {
                        let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
                        let rng = &mut self.rng;
                        let verdict =
                            verify_window(&refs, &self.window, &self.config.sampling, &mut || {
                                rng.random()
                            })?;
                        self.stats
                            .record_window(self.window.len(), verdict.accepted);
                        self.cache.cache.truncate(base + 1 + verdict.accepted);
                        verdict.committed(&self.window.tokens)
                    }
                };
                self.seq.extend_from_slice(&committed);
                self.commit(&committed);
                Ok(())
            }
        }
    }

    /// Commits tokens to the output and streams them; a panicking sink fails the sequence.
    fn commit(&mut self, new: &[u32]) {
        let committed = self.output.push(new).to_vec();
        if committed.is_empty() {
            return;
        }
        let Some(sink) = self.sink.as_mut() else {
            return;
        };
        match catch_unwind(AssertUnwindSafe(|| sink.tokens(&committed))) {
            Ok(StreamControl::Stop) if self.output.finish.is_none() => {
                self.output.finish = Some(FinishReason::Cancelled);
            }
            Ok(_) => {}
            Err(panic) => {
                self.failed = Some(Error::GenerationPanicked(mirror_core::panic_message(
                    &*panic,
                )));
            }
        }
    }

    /// This sequence's request as submitted (its prompt, settings and deadline).
    fn request(&self) -> SequenceRequest {
        let prompt_len = self.seq.len() - self.output.tokens.len();
        SequenceRequest {
            prompt: self.seq[..prompt_len].to_vec(),
            config: self.config.clone(),
            speculation: self.speculation,
            deadline: self.deadline,
        }
    }

    /// The first decode step of a one-token prompt needs no prefill; a prompt whose prefix was
    /// cached starts its prefill after it.
    fn after_admission(&mut self) {
        if self.cache.cache.len() + 1 >= self.seq.len() {
            self.phase = Phase::Decode;
            self.stats.time.prefill = self.started.elapsed();
        }
    }
}

/// What one step did, for statistics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Sequences that contributed rows.
    pub sequences: usize,
    /// Rows of the forward.
    pub rows: usize,
}

/// The batched core: the running sequences, those waiting, and the pool.
pub(crate) struct BatchCore {
    target: Arc<Model>,
    settings: BatchSettings,
    pool: KvPool,
    prefix: PrefixStore,
    waiting: VecDeque<Waiting>,
    running: Vec<Sequence>,
}

impl BatchCore {
    pub fn new(target: Arc<Model>, settings: BatchSettings) -> Result<Self> {
        settings.check()?;
        Ok(Self {
            target,
            pool: KvPool::new(settings.kv_budget_bytes),
            prefix: PrefixStore::default(),
            settings,
            waiting: VecDeque::new(),
            running: Vec::new(),
        })
    }

    /// Queues a sequence (and its forks); a request that can never run fails at once.
    pub fn submit(&mut self, waiting: Waiting) {
        match self.check(&waiting) {
            Ok(()) => self.waiting.push_back(waiting),
            Err(e) => {
                let forks = waiting.forks;
                waiting.sink.finish(Err(e));
                for fork in forks {
                    fork.sink.finish(Err(Error::InvalidPrompt(
                        "the prompt it shares was refused".into(),
                    )));
                }
            }
        }
    }

    /// The caches `waiting` needs (its own, then its forks'), checked against the context and
    /// the pool's whole budget.
    fn check(&self, waiting: &Waiting) -> Result<()> {
        let request = &waiting.request;
        check_speculation(request.speculation)?;
        let bytes: u64 = self
            .capacities(waiting)?
            .into_iter()
            .map(|capacity| cache_bytes(&self.target, capacity))
            .sum();
        self.pool.check_fits(bytes)
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

    /// Sequences running, sequences waiting, bytes of the pool used and free, and the prefix
    /// cache's entries and bytes (part of the used bytes).
    pub fn load(&self) -> (usize, usize, u64, u64, usize, u64) {
        (
            self.running.len(),
            self.waiting.len(),
            self.pool.used(),
            self.pool.free(),
            self.prefix.len(),
            self.prefix.bytes(),
        )
    }

    /// One step: admit, schedule, forward, settle, retire.
    pub fn step(&mut self) -> StepReport {
        self.admit();
        self.expire();
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
            let caches = match self.capacities(next).and_then(|c| self.lend_all(&c)) {
                Ok(Some(caches)) => caches,
                // The pool is full: admission waits for a sequence to leave.
                Ok(None) => break,
                Err(e) => {
                    if let Some(waiting) = self.waiting.pop_front() {
                        waiting.sink.finish(Err(e));
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

    /// Caches of `capacities` rows, all or none (`None` while the pool cannot hold them all,
    /// after the prefix cache gave back what it could).
    fn lend_all(&mut self, capacities: &[usize]) -> Result<Option<Vec<PooledCache>>> {
        let needed: u64 = capacities
            .iter()
            .map(|&c| cache_bytes(&self.target, c))
            .sum();
        while self.pool.free() < needed {
            if !self.prefix.evict_one(&mut self.pool) {
                return Ok(None);
            }
        }
        let mut caches = Vec::with_capacity(capacities.len());
        for &capacity in capacities {
            match self.pool.lend(&self.target, capacity) {
                Ok(Some(cache)) => caches.push(cache),
                other => {
                    for cache in caches {
                        self.pool.give_back(cache);
                    }
                    return other.map(|_| None);
                }
            }
        }
        Ok(Some(caches))
    }

    /// A sequence admitted with its caches: its prompt's longest stored prefix copied in, and
    /// the same random streams as it would have alone. `None` (the sequence and its forks told
    /// why, their caches back in the pool) when the copy fails.
    fn start(&mut self, waiting: Waiting, mut caches: Vec<PooledCache>) -> Option<Sequence> {
        let prompt = &waiting.request.prompt;
        let mut reused = 0;
        if self.settings.prefix_cache {
            // The last prompt token is always fed: its logits start the decoding.
            if let Some(found) = self.prefix.longest(prompt, prompt.len().saturating_sub(1)) {
                let copied = caches[0]
                    .cache
                    .copy_prefix_from(&found.cache.cache, found.len);
                if let Err(e) = copied {
                    for cache in caches {
                        self.pool.give_back(cache);
                    }
                    waiting.sink.finish(Err(e.into()));
                    for fork in waiting.forks {
                        fork.sink.finish(Err(Error::InvalidPrompt(
                            "the prompt it shares could not be started".into(),
                        )));
                    }
                    return None;
                }
                reused = found.len;
            }
        }
        let forks: Vec<(Fork, PooledCache)> = waiting
            .forks
            .into_iter()
            .zip(caches.drain(1..))
            .collect();
        let cache = caches.pop()?;
        let mut sequence = new_sequence(
            waiting.request,
            waiting.sink,
            waiting.submitted,
            cache,
            &self.target,
        );
        sequence.stats.prefix_cached_tokens = reused;
        sequence.forks = forks;
        sequence.after_admission();
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
        let mut report = StepReport::default();
        for sequence in &mut self.running {
            sequence.fed.clear();
        }
        for prefill_pass in [false, true] {
            for sequence in &mut self.running {
                let prefilling = matches!(sequence.phase, Phase::Prefill);
                if prefilling != prefill_pass || sequence.done() {
                    continue;
                }
                if !prefilling && !sequence.has_room() {
                    continue;
                }
                let rows = sequence.offer(budget, self.settings.prefill_chunk);
                budget -= rows;
                if rows > 0 {
                    report.sequences += 1;
                    report.rows += rows;
                }
            }
        }
        report
    }

    /// The ragged forward over every offered row, then each sequence settles.
    fn forward_and_settle(&mut self) -> Result<()> {
        let mut offered: Vec<&mut Sequence> = self
            .running
            .iter_mut()
            .filter(|s| !s.fed.is_empty())
            .collect();
        let mut inputs: Vec<RaggedSequence<'_>> = offered
            .iter_mut()
            .map(|s| RaggedSequence {
                tokens: &s.fed,
                logits: matches!(s.phase, Phase::Decode),
                cache: &mut s.cache.cache,
            })
            .collect();
        let logits = self.target.forward_ragged(&mut inputs)?;
        drop(inputs);
        for (sequence, rows) in offered.into_iter().zip(logits) {
            if let Err(e) = sequence.settle(rows) {
                sequence.failed = Some(e);
            }
        }
        Ok(())
    }

    /// Forks whose prompt is cached now start decoding, each from a copy of the cache.
    fn spawn_forks(&mut self) {
        let mut spawned = Vec::new();
        for parent in &mut self.running {
            if parent.forks.is_empty() || !matches!(parent.phase, Phase::Decode) {
                continue;
            }
            let request = parent.request();
            // The prompt but its last token: what every fork's first decode step starts from
            // (the parent may have decoded a step already, when its prompt came from the
            // prefix cache; those rows are its own).
            let prompt_rows = request.prompt.len() - 1;
            for (fork, mut cache) in std::mem::take(&mut parent.forks) {
                let copied = cache
                    .cache
                    .copy_prefix_from(&parent.cache.cache, prompt_rows);
                let request = SequenceRequest {
                    config: fork.config,
                    ..request.clone()
                };
                let mut sequence =
                    new_sequence(request, fork.sink, parent.started, cache, &self.target);
                sequence.phase = Phase::Decode;
                sequence.stats.time.prefill = parent.stats.time.prefill;
                if let Err(e) = copied {
                    sequence.failed = Some(e.into());
                }
                spawned.push(sequence);
            }
        }
        self.running.extend(spawned);
    }

    /// Finished, cancelled, expired and failed sequences leave; their caches go to the prefix
    /// cache (or back to the pool). A leaving sequence's pending forks take over its prefill.
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
                let tokens = sequence.seq[..rows].to_vec();
                self.prefix.insert(tokens, sequence.cache, &mut self.pool);
            } else {
                self.pool.give_back(sequence.cache);
            }
            let result = match failed {
                Some(e) => Err(e),
                None => Ok(sequence.output.finish(sequence.stats, sequence.started)),
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
        let (fork, mut cache) = forks.next()?;
        let request = sequence.request();
        // A failed step may have left the cache half-written: the heir starts over then.
        let rows = if sequence.failed.is_some() {
            0
        } else {
            sequence.cache.cache.len().min(request.prompt.len() - 1)
        };
        let copied = cache.cache.copy_prefix_from(&sequence.cache.cache, rows);
        let request = SequenceRequest {
            config: fork.config,
            ..request
        };
        let mut heir = new_sequence(request, fork.sink, sequence.started, cache, &self.target);
        heir.forks = forks.collect();
        heir.stats.prefix_cached_tokens = sequence.stats.prefix_cached_tokens;
        heir.after_admission();
        if let Err(e) = copied {
            heir.failed = Some(e.into());
        }
        Some(heir)
    }

    /// Ends every sequence, running or waiting, with `error()` (the engine is shutting down).
    pub fn abandon(&mut self, error: impl Fn() -> Error) {
        for waiting in self.waiting.drain(..) {
            waiting.sink.finish(Err(error()));
            for fork in waiting.forks {
                fork.sink.finish(Err(error()));
            }
        }
        for mut sequence in self.running.drain(..) {
            if let Some(sink) = sequence.sink.take() {
                sink.finish(Err(error()));
            }
            for (fork, cache) in sequence.forks.drain(..) {
                fork.sink.finish(Err(error()));
                self.pool.give_back(cache);
            }
            self.pool.give_back(sequence.cache);
        }
        self.prefix.clear(&mut self.pool);
    }
}

fn gamma_of(request: &SequenceRequest) -> usize {
    match request.speculation {
        Speculation::None => 0,
        Speculation::Lookup { gamma, .. } => gamma,
    }
}

fn check_speculation(speculation: Speculation) -> Result<()> {
    if let Speculation::Lookup { lookup, gamma } = speculation {
        lookup.check()?;
        if gamma == 0 {
            return Err(Error::InvalidConfig("gamma must be at least 1".into()));
        }
    }
    Ok(())
}

/// A sequence with its cache, in prefill: the same random streams as it would have alone.
fn new_sequence(
    request: SequenceRequest,
    sink: Box<dyn Sink>,
    submitted: Instant,
    cache: PooledCache,
    target: &Model,
) -> Sequence {
    let gamma = gamma_of(&request);
    let rng_seed = match request.speculation {
        Speculation::None => request.config.seed,
        // As vanilla SD seeds its verification.
        Speculation::Lookup { .. } => mix(request.config.seed, 1),
    };
    Sequence {
        output: Output::new(&request.config, target),
        seq: request.prompt,
        cache,
        speculation: request.speculation,
        deadline: request.deadline,
        stats: Stats::new(gamma),
        started: submitted,
        rng: StdRng::seed_from_u64(rng_seed),
        phase: Phase::Prefill,
        sink: Some(sink),
        failed: None,
        fed: Vec::new(),
        window: DraftWindow::default(),
        forks: Vec::new(),
        config: request.config,
    }
}
