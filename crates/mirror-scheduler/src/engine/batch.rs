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

use super::pool::{KvPool, PooledCache};
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
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            max_batch: 16,
            kv_budget_bytes: 4 << 30,
            step_tokens: 256,
            prefill_chunk: 128,
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

/// A sequence waiting for admission.
pub(crate) struct Waiting {
    pub request: SequenceRequest,
    pub sink: Box<dyn Sink>,
    pub submitted: Instant,
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

    /// The first decode step of a one-token prompt needs no prefill.
    fn after_admission(&mut self) {
        if self.seq.len() <= 1 {
            self.phase = Phase::Decode;
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
    waiting: VecDeque<Waiting>,
    running: Vec<Sequence>,
}

impl BatchCore {
    pub fn new(target: Arc<Model>, settings: BatchSettings) -> Result<Self> {
        settings.check()?;
        Ok(Self {
            target,
            pool: KvPool::new(settings.kv_budget_bytes),
            settings,
            waiting: VecDeque::new(),
            running: Vec::new(),
        })
    }

    /// Queues a sequence; a request that can never run fails at once.
    pub fn submit(&mut self, waiting: Waiting) {
        let request = &waiting.request;
        let checked = capacity_for(
            &self.target,
            &request.prompt,
            &request.config,
            gamma_of(request),
        )
        .and_then(|capacity| {
            self.pool
                .check_fits(super::pool::cache_bytes(&self.target, capacity))
        })
        .and_then(|()| check_speculation(request.speculation));
        match checked {
            Ok(()) => self.waiting.push_back(waiting),
            Err(e) => waiting.sink.finish(Err(e)),
        }
    }

    /// Whether any sequence runs or waits.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Sequences running, sequences waiting, bytes of the pool used and free.
    pub fn load(&self) -> (usize, usize, u64, u64) {
        (
            self.running.len(),
            self.waiting.len(),
            self.pool.used(),
            self.pool.free(),
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
        self.retire();
        report
    }

    /// Admission: waiting sequences, first come first served, while the batch has room and the
    /// pool holds their caches.
    fn admit(&mut self) {
        while self.running.len() < self.settings.max_batch {
            let Some(next) = self.waiting.front() else {
                break;
            };
            let request = &next.request;
            let gamma = gamma_of(request);
            let lent = capacity_for(&self.target, &request.prompt, &request.config, gamma)
                .and_then(|capacity| self.pool.lend(&self.target, capacity));
            let cache = match lent {
                Ok(Some(cache)) => cache,
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
            let mut sequence = start(waiting, cache, &self.target);
            sequence.after_admission();
            self.running.push(sequence);
        }
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

    /// Finished, cancelled, expired and failed sequences leave, their caches back in the pool.
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
            let sink = sequence.sink.take();
            let result = match sequence.failed.take() {
                Some(e) => Err(e),
                None => Ok(sequence.output.finish(sequence.stats, sequence.started)),
            };
            self.pool.give_back(sequence.cache);
            if let Some(sink) = sink {
                sink.finish(result);
            }
        }
    }

    /// Ends every sequence, running or waiting, with `error()` (the engine is shutting down).
    pub fn abandon(&mut self, error: impl Fn() -> Error) {
        for waiting in self.waiting.drain(..) {
            waiting.sink.finish(Err(error()));
        }
        for mut sequence in self.running.drain(..) {
            if let Some(sink) = sequence.sink.take() {
                sink.finish(Err(error()));
            }
            self.pool.give_back(sequence.cache);
        }
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

/// A sequence admitted with its cache: the same random streams as it would have alone.
fn start(waiting: Waiting, cache: PooledCache, target: &Model) -> Sequence {
    let Waiting {
        request,
        sink,
        submitted,
    } = waiting;
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
        config: request.config,
    }
}
