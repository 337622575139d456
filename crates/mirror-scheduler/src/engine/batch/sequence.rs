//! One running sequence of the batched engine: the rows it offers a step, and how it settles
//! the step's logits, exactly as the one-sequence strategy it mirrors would.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use mirror_core::Model;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rayon::prelude::*;

use super::mirror::{Context, MirrorShared, MirrorSide};
use super::request::{gamma_of, Fork, Lent, SequenceRequest, Sink, Speculation};
use crate::adaptive::TokenAcceptance;
use crate::constraint::ConstraintState;
use crate::engine::pool::PooledCache;
use crate::error::{Error, Result};
use crate::generation::{
    token_logprobs, FinishReason, GenerationConfig, StreamControl, TokenLogprob,
};
use crate::monitor::{BoundaryTokens, MonitorSet};
use crate::run::{next_token, window_room, Output};
use crate::seed::mix;
use crate::stats::Stats;
use crate::verify::verify_window;
use crate::window::DraftWindow;

/// Where a running sequence is.
pub(crate) enum Phase {
    /// Its prompt (all but the last token) is being cached, a chunk per step.
    Prefill,
    /// It decodes: each step feeds the last token, and a window after it.
    Decode,
}

/// A running sequence.
pub(crate) struct Sequence {
    /// Prompt and committed tokens.
    pub(crate) seq: Vec<u32>,
    pub(crate) cache: PooledCache,
    pub(crate) config: GenerationConfig,
    pub(crate) speculation: Speculation,
    pub(crate) deadline: Option<Instant>,
    pub(crate) output: Output,
    pub(crate) stats: Stats,
    pub(crate) started: Instant,
    pub(crate) rng: StdRng,
    pub(crate) phase: Phase,
    pub(crate) sink: Option<Box<dyn Sink>>,
    /// The committed tokens' log-probabilities, when the sequence asked for them.
    pub(crate) logprobs: Vec<TokenLogprob>,
    /// Set when it must leave at the next retire phase with this error.
    pub(crate) failed: Option<Error>,
    /// The rows it fed this step, and the window among them.
    pub(crate) fed: Vec<u32>,
    pub(crate) window: DraftWindow,
    /// Forks waiting for this sequence's prefill, each with the cache it was lent.
    pub(crate) forks: Vec<(Fork, Lent)>,
    /// How often the target accepts this sequence's draft tokens.
    pub(crate) acceptance: TokenAcceptance,
    /// The last step's drafted window and its accepted tokens, for the engine's pooled
    /// acceptance (taken after the settle).
    pub(crate) drafted_verdict: Option<(usize, usize)>,
    /// The draft model's side, for a sequence that drafts with it.
    pub(crate) draft: Option<DraftSide>,
    /// The draft worker's side, for a Mirror sequence.
    pub(crate) mirror: Option<MirrorSide>,
    /// Decode steps settled so far (a drafted window's seed, as a sequence alone).
    pub(crate) decode_steps: u64,
    /// Where the sequence is in its constraint, if it has one.
    pub(crate) constraint: Option<ConstraintState>,
    /// Whether this step's window holds the tokens the constraint forces.
    pub(crate) forced: bool,
    /// Its monitors, when its config asked for them.
    pub(crate) monitors: Option<MonitorSet>,
    /// The boundary tokens its monitors (and its forks') read.
    pub(crate) boundaries: Option<BoundaryTokens>,
}

/// A drafting sequence's draft cache and what it holds.
pub(crate) struct DraftSide {
    pub cache: PooledCache,
    /// The tokens whose keys and values the cache rows hold (`tokens.len()` rows).
    pub tokens: Vec<u32>,
    /// The window drafted for the next step.
    pub drafted: DraftWindow,
    /// Draft tokens the batch's allocation kept of the last window (adaptive windows draft one
    /// more than that next time).
    pub last_kept: Option<usize>,
    /// Windows drafted so far while the planner could not yet price the sequence's acceptance
    /// (see `drafting`'s `EXPLORE_WINDOWS`), whether or not the step kept them.
    pub explored: usize,
    /// Whether the window drafted for the next step is one of those: the step keeps it whole.
    pub exploring: bool,
    /// Whether the rest of the prompt's draft prefill is put off: when it came, no acceptance
    /// could make drafting pay (see `drafting`), so the prompt's draft rows would be pure cost.
    /// The sequence decodes without them; if the planner later drafts, the first draft forward
    /// catches the draft up on every committed token it lacks.
    pub deferred: bool,
}

impl DraftSide {
    /// Leading tokens the draft cache holds in common with `seq`.
    pub fn common_prefix(&self, seq: &[u32]) -> usize {
        (self.tokens.iter().zip(seq))
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// Keeps the first `rows` cache rows.
    pub fn truncate(&mut self, rows: usize) {
        self.tokens.truncate(rows);
        self.cache.cache.truncate(rows);
    }
}

impl Sequence {
    /// Whether the cache has room for one more token; ends the sequence at the context limit
    /// when not (as a sequence alone, [`crate::run::Run::has_room`]).
    pub(crate) fn has_room(&mut self) -> bool {
        self.output.has_room(&self.cache.cache)
    }

    /// Readies a Mirror sequence's draft worker and next window (see [`MirrorSide::prepare`]);
    /// a failure fails the sequence.
    pub(crate) fn prepare_mirror(&mut self, shared: &MirrorShared) {
        if self.done() {
            return;
        }
        let decoding = self.is_decoding();
        let Some(side) = self.mirror.as_mut() else {
            return;
        };
        let context = Context {
            seq: &self.seq,
            decoding,
            config: &self.config,
            stop: self.output.stop(),
            position_limit: self.cache.cache.capacity(),
            stats: &mut self.stats,
        };
        if let Err(e) = side.prepare(shared, context) {
            self.failed = Some(e);
        }
    }

    /// Whether it is past its prefill.
    pub(crate) fn is_decoding(&self) -> bool {
        matches!(self.phase, Phase::Decode)
    }

    pub(crate) fn done(&self) -> bool {
        self.output.done() || self.failed.is_some()
    }

    /// The rows this sequence offers the next step, within `budget` rows.
    pub(crate) fn offer(
        &mut self,
        budget: usize,
        prefill_chunk: usize,
        forced_drafts: bool,
    ) -> usize {
        self.fed.clear();
        self.window = DraftWindow::default();
        self.forced = false;
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
                match self.speculation {
                    Speculation::Lookup { lookup, gamma } => {
                        let room = gamma.min(window_room(&self.cache.cache)).min(budget - 1);
                        self.window = lookup.window(&self.seq, room, self.output.stop());
                    }
                    Speculation::Draft { .. } => {
                        if let Some(draft) = self.draft.as_mut() {
                            self.window = std::mem::take(&mut draft.drafted);
                            self.window.truncate(budget - 1);
                        }
                    }
                    Speculation::Mirror { .. } => {
                        if let Some(mirror) = self.mirror.as_mut() {
                            self.window = mirror.take_window();
                            let room = window_room(&self.cache.cache).min(budget - 1);
                            self.window.truncate(room);
                        }
                    }
                    Speculation::None => {}
                }
                let started = Instant::now();
                let constrained = self.constrain_window(budget - 1, forced_drafts);
                self.stats.time.constraint += started.elapsed();
                if let Err(e) = constrained {
                    self.failed = Some(e);
                    return 0;
                }
                self.fed.push(self.seq[self.seq.len() - 1]);
                self.fed.extend_from_slice(&self.window.tokens);
            }
        }
        self.fed.len()
    }

    /// Under a constraint, the window is what the grammar forces (up to `room` tokens), or else
    /// the drafted window's longest prefix the grammar allows.
    fn constrain_window(&mut self, room: usize, forced_drafts: bool) -> Result<()> {
        if let Some(constraint) = self.constraint.as_mut() {
            let room = room.min(window_room(&self.cache.cache));
            self.forced = constraint.constrain_window(&mut self.window, room, forced_drafts)?;
        }
        Ok(())
    }

    /// Keeps the first `tokens` of the offered window (the batch's allocation).
    pub(crate) fn trim_window(&mut self, tokens: usize) {
        if tokens < self.window.len() {
            self.window.truncate(tokens);
            self.fed.truncate(1 + tokens);
        }
    }

    /// After the forward: verify or sample, commit, roll the cache back.
    pub(crate) fn settle(&mut self, rows: Vec<Vec<f32>>, hidden: Vec<Vec<f32>>) -> Result<()> {
        match self.phase {
            Phase::Prefill => {
                self.decode_once_prefilled();
                Ok(())
            }
            Phase::Decode => {
                self.stats.target_passes += 1;
                let base = self.cache.cache.len() - self.fed.len();
                let mut rows = rows;
                // The target's own rows, kept apart when penalties or the grammar change them.
                let changed = !self.config.penalties.is_neutral() || self.constraint.is_some();
                let reads_raw = self.config.logprobs.is_some() || self.monitors.is_some();
                let raw = (reads_raw && changed).then(|| rows.clone());
                let (prompt, output) = self.seq.split_at(self.prompt_len());
                self.config
                    .penalties
                    .apply_window(&mut rows, prompt, output, &self.window.tokens);
                if let Some(constraint) = self.constraint.as_mut() {
                    let started = Instant::now();
                    constraint.mask_window(&self.window.tokens, &mut rows)?;
                    self.stats.time.constraint += started.elapsed();
                }
                let plain = matches!(self.speculation, Speculation::None) && self.window.is_empty();
                let seq_len = self.seq.len();
                let (committed, verdict) = match plain {
                    true => (
                        vec![next_token(&rows[0], &self.config.sampling, &mut self.rng)],
                        None,
                    ),
                    false => {
                        let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
                        let rng = &mut self.rng;
                        let verdict =
                            verify_window(&refs, &self.window, &self.config.sampling, &mut || {
                                rng.random()
                            })?;
                        if self.forced {
                            self.stats.forced_tokens += verdict.accepted;
                        } else {
                            self.stats
                                .record_window(self.window.len(), verdict.accepted);
                        }
                        if !self.window.is_empty() && !self.forced {
                            if matches!(self.speculation, Speculation::Lookup { .. }) {
                                self.stats.lookup_windows += 1;
                            }
                            self.acceptance.record(self.window.len(), verdict.accepted);
                            if self.speculation.uses_draft_model() {
                                self.drafted_verdict = Some((self.window.len(), verdict.accepted));
                            }
                        }
                        self.cache.cache.truncate(base + 1 + verdict.accepted);
                        (verdict.committed(&self.window.tokens), Some(verdict))
                    }
                };
                if let Some(draft) = self.draft.as_mut() {
                    draft.last_kept = Some(self.window.len());
                }
                let mut committed = committed;
                if let Some(constraint) = self.constraint.as_mut() {
                    let started = Instant::now();
                    let kept = constraint.settle(&committed)?;
                    committed.truncate(kept);
                    self.drop_rows_past(kept);
                    self.stats.time.constraint += started.elapsed();
                }
                let raw_rows = raw.as_ref().unwrap_or(&rows);
                let stopped = self.observe_monitors(&mut committed, raw_rows, &hidden);
                if stopped {
                    self.drop_rows_past(committed.len());
                }
                self.seq.extend_from_slice(&committed);
                self.decode_steps += 1;
                let logprobs = match self.config.logprobs {
                    Some(top) => token_logprobs(raw_rows, &committed, top),
                    None => Vec::new(),
                };
                self.commit(&committed, &logprobs);
                if stopped {
                    self.output.finish.get_or_insert(FinishReason::Monitor);
                }
                if self.constraint.as_ref().is_some_and(|c| c.is_stopped()) {
                    // Complete: nothing may follow (its end token, if any, is committed).
                    self.output.finish.get_or_insert(FinishReason::Stop);
                }
                if let Some(verdict) = verdict {
                    // A sequence that ends here abandons its tree: no next window is drafted.
                    let done = self.done() || !self.has_room();
                    if let Some(mirror) = self.mirror.as_mut() {
                        let (window, stats) = (&self.window, &mut self.stats);
                        mirror.settle(&rows, window, &verdict, seq_len, stats, done)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Cuts the cache after the rows of the first `kept` tokens committed this step (the rows
    /// of tokens the grammar or a monitor dropped leave with them).
    fn drop_rows_past(&mut self, kept: usize) {
        let rows = self.cache.cache.len().min(self.seq.len() + kept);
        self.cache.cache.truncate(rows);
    }

    /// Feeds the monitors the tokens of `committed` the output will take, each with its raw
    /// row and hidden state; under early stop, a firing rule cuts `committed` after its token
    /// and returns true.
    fn observe_monitors(
        &mut self,
        committed: &mut Vec<u32>,
        rows: &[Vec<f32>],
        hidden: &[Vec<f32>],
    ) -> bool {
        let Some(monitors) = self.monitors.as_mut() else {
            return false;
        };
        let taken = self.output.accepts(committed);
        monitors.observe_committed(committed, taken, rows, hidden)
    }

    /// The layer whose hidden states this sequence's monitors read this step, if any (none in
    /// prefill: its rows choose no token).
    pub(crate) fn hidden_layer(&self) -> Option<usize> {
        let monitors = self.monitors.as_ref()?;
        monitors
            .hidden_layer()
            .filter(|_| matches!(self.phase, Phase::Decode))
    }

    /// Commits tokens (with their log-probabilities, if asked for) to the output and streams
    /// them; a panicking sink fails the sequence.
    pub(crate) fn commit(&mut self, new: &[u32], logprobs: &[TokenLogprob]) {
        let committed = self.output.push(new).to_vec();
        if committed.is_empty() {
            return;
        }
        let logprobs = &logprobs[..logprobs.len().min(committed.len())];
        self.logprobs.extend_from_slice(logprobs);
        let Some(sink) = self.sink.as_mut() else {
            return;
        };
        match catch_unwind(AssertUnwindSafe(|| sink.tokens(&committed, logprobs))) {
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

    /// Tokens of the prompt (the rest of `seq` is output).
    pub(crate) fn prompt_len(&self) -> usize {
        self.seq.len() - self.output.tokens.len()
    }

    /// A fork of this sequence: its prompt, speculation and deadline with the fork's settings,
    /// in `cache` holding a copy of this sequence's first `rows` cache rows (failed, if the copy
    /// failed), in prefill.
    pub(crate) fn fork(&self, fork: Fork, mut lent: Lent, rows: usize, target: &Model) -> Sequence {
        let mut copied = lent.target.cache.copy_prefix_from(&self.cache.cache, rows);
        let mut draft_tokens = Vec::new();
        if let (Some(parent), Some(cache)) = (&self.draft, lent.draft.as_mut()) {
            let draft_rows = parent.tokens.len().min(rows);
            draft_tokens = parent.tokens[..draft_rows].to_vec();
            copied = copied.and(
                cache
                    .cache
                    .copy_prefix_from(&parent.cache.cache, draft_rows),
            );
        }
        let request = SequenceRequest {
            prompt: self.seq[..self.prompt_len()].to_vec(),
            config: fork.config,
            speculation: self.speculation,
            deadline: self.deadline,
        };
        let boundaries = self.boundaries.clone();
        let mut sequence = new_sequence(request, fork.sink, self.started, lent, target, boundaries);
        sequence.constraint = fork.constraint;
        if let Some(draft) = sequence.draft.as_mut() {
            draft.tokens = draft_tokens;
        }
        if let Err(e) = copied {
            sequence.failed = Some(e.into());
        }
        sequence
    }

    /// Starts decoding once the prompt but its last token is cached: after the last prompt
    /// chunk, or at once for a one-token prompt or one whose prefix came from the prefix cache.
    pub(crate) fn decode_once_prefilled(&mut self) {
        let cached = |rows: usize| rows + 1 >= self.seq.len();
        let draft = self.draft.as_ref();
        let draft_cached = draft.is_none_or(|d| d.deferred || cached(d.tokens.len()));
        if matches!(self.phase, Phase::Prefill) && cached(self.cache.cache.len()) && draft_cached {
            self.enter_decode();
        }
    }

    /// Ends the prefill.
    pub(crate) fn enter_decode(&mut self) {
        self.phase = Phase::Decode;
        self.stats.time.prefill = self.started.elapsed();
    }
}

/// One sequence's rows of a step (logits, or hidden states), one per fed token.
type Rows = Vec<Vec<f32>>;

/// Every offered sequence settles on its rows of the step (`logits[i]`, and `hidden[i]` when
/// its monitors captured a layer), a failure failing that sequence alone. Settling is per
/// sequence (sampling, penalties, the grammar, monitors, log-probabilities: passes over
/// vocabulary-wide rows), so with several sequences the rayon pool takes them in parallel;
/// each one's result is the same whichever thread runs it.
pub(crate) fn settle_all(
    offered: Vec<&mut Sequence>,
    logits: Vec<Vec<Vec<f32>>>,
    mut hidden: Vec<Vec<Vec<f32>>>,
) {
    hidden.resize_with(offered.len(), Vec::new);
    let settle = |((sequence, rows), hidden): ((&mut Sequence, Rows), Rows)| {
        if let Err(e) = sequence.settle(rows, hidden) {
            sequence.failed = Some(e);
        }
    };
    let work = offered.into_iter().zip(logits).zip(hidden);
    match work.len() {
        // One sequence: no hand-off to the pool.
        0 | 1 => work.for_each(settle),
        _ => work.collect::<Vec<_>>().into_par_iter().for_each(settle),
    }
}

/// A sequence with its cache, in prefill: the same random streams as it would have alone.
pub(crate) fn new_sequence(
    request: SequenceRequest,
    sink: Box<dyn Sink>,
    submitted: Instant,
    lent: Lent,
    target: &Model,
    boundaries: Option<BoundaryTokens>,
) -> Sequence {
    let gamma = gamma_of(&request);
    let rng_seed = match request.speculation {
        Speculation::None => request.config.seed,
        // As vanilla SD seeds its verification.
        Speculation::Lookup { .. } | Speculation::Draft { .. } | Speculation::Mirror { .. } => {
            mix(request.config.seed, 1)
        }
    };
    let (draft, mirror) = match (request.speculation, lent.draft) {
        (Speculation::Mirror { gamma }, Some(cache)) => (None, Some(MirrorSide::new(gamma, cache))),
        (_, draft) => (draft, None),
    };
    Sequence {
        output: Output::new(&request.config, target),
        seq: request.prompt,
        cache: lent.target,
        mirror,
        draft: draft.map(|cache| DraftSide {
            cache,
            tokens: Vec::new(),
            drafted: DraftWindow::default(),
            last_kept: None,
            explored: 0,
            exploring: false,
            deferred: false,
        }),
        decode_steps: 0,
        constraint: None,
        logprobs: Vec::new(),
        forced: false,
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
        acceptance: TokenAcceptance::default(),
        drafted_verdict: None,
        monitors: (request.config.monitors.as_ref())
            .map(|c| MonitorSet::new(c, boundaries.clone(), target.num_layers())),
        boundaries,
        config: request.config,
    }
}
