//! Bookkeeping shared by every strategy: the start of a generation, committing tokens, stop
//! conditions, streaming, context.

use std::sync::Arc;
use std::time::Instant;

use mirror_core::sampling::{self, SamplingParams};
use mirror_core::{KvCache, Model};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::generation::{
    token_logprobs, FinishReason, Generation, GenerationConfig, StopSet, StreamControl,
    TokenLogprob,
};
use crate::monitor::MonitorSet;
use crate::stats::Stats;
use crate::window::{DraftWindow, Verdict};

/// Where a one-sequence generation streams its committed tokens, with their log-probabilities
/// when asked for (else an empty slice).
pub(crate) type OnTokens<'a> = &'a mut dyn FnMut(&[u32], &[TokenLogprob]) -> StreamControl;

/// One generation in progress, as every strategy starts it: the prompt checked, the target's
/// cache sized, statistics, the committed output and the random generator of verification.
pub(crate) struct Run<'a> {
    pub started: Instant,
    pub stats: Stats,
    pub progress: Progress<'a>,
    pub rng: StdRng,
    /// The target's cache (`capacity` rows: prompt, output and one window of slack).
    pub cache: KvCache,
    /// Prompt and committed tokens.
    pub seq: Vec<u32>,
    /// Tokens of `seq` that are the prompt.
    prompt_len: usize,
    /// Alternatives per token when log-probabilities were asked for.
    logprobs_top: Option<usize>,
    /// The committed tokens' log-probabilities, when asked for.
    logprobs: Vec<TokenLogprob>,
    /// The monitors, for the strategies that feed them ([`Run::monitor`]).
    monitors: Option<MonitorSet>,
}

impl<'a> Run<'a> {
    /// Checks `prompt` and prepares a generation of windows of up to `gamma` draft tokens
    /// (0 for plain decoding); `rng_seed` seeds verification's random generator.
    pub fn begin(
        target: &Arc<Model>,
        prompt: &[u32],
        config: &GenerationConfig,
        gamma: usize,
        rng_seed: u64,
        on_tokens: OnTokens<'a>,
    ) -> Result<Self> {
        let started = Instant::now();
        check_penalties(config, target)?;
        let capacity = capacity_for(target, prompt, config, gamma)?;
        Ok(Self {
            started,
            stats: Stats::new(gamma),
            progress: Progress::new(config, target, on_tokens),
            rng: StdRng::seed_from_u64(rng_seed),
            cache: target.new_cache(1, capacity)?,
            seq: prompt.to_vec(),
            prompt_len: prompt.len(),
            logprobs_top: config.logprobs,
            logprobs: Vec::new(),
            monitors: None,
        })
    }

    /// Refuses log-probabilities and monitors (for the decoders that do not read them: they
    /// run on the batched engine, and under Mirror).
    pub fn refuse_observers(config: &GenerationConfig) -> Result<()> {
        if config.logprobs.is_some() {
            return Err(Error::InvalidConfig(
                "log-probabilities come from the batched engine (EngineHandle) and Mirror; this \
                 decoder does not return them"
                    .into(),
            ));
        }
        if config.monitors.is_some() {
            return Err(Error::BatchedOnly {
                feature: "generation monitors",
            });
        }
        Ok(())
    }

    /// Feeds `monitors` every committed token ([`Run::commit_observed`]).
    pub fn monitor(&mut self, monitors: MonitorSet) {
        self.monitors = Some(monitors);
    }

    /// Whether commits need the target's raw rows (log-probabilities or monitors).
    pub fn observes(&self) -> bool {
        self.logprobs_top.is_some() || self.monitors.is_some()
    }

    /// The layer whose hidden states the monitors read, if any.
    pub fn hidden_layer(&self) -> Option<usize> {
        self.monitors.as_ref()?.hidden_layer()
    }

    /// Refuses a constraint (for the decoders that do not apply one).
    pub fn refuse_constraint(config: &GenerationConfig) -> Result<()> {
        match config.constraint {
            Some(_) => Err(Error::InvalidConfig(
                "constrained output runs on the batched engine (EngineHandle) and Mirror; this \
                 decoder does not apply constraints"
                    .into(),
            )),
            None => Ok(()),
        }
    }

    /// Applies `config`'s penalties to the verification rows of `window` (row `j` after the
    /// committed tokens and the window's first `j`).
    pub fn penalize(&self, config: &GenerationConfig, rows: &mut [Vec<f32>], window: &[u32]) {
        config.penalties.apply_window(
            rows,
            &self.seq[..self.prompt_len],
            &self.progress.output.tokens,
            window,
        );
    }

    /// Whether the cache has room for one more token; ends the generation at the context
    /// limit when not.
    pub fn has_room(&mut self) -> bool {
        self.progress.output.has_room(&self.cache)
    }

    /// Draft tokens the next window may hold (see [`window_room`]).
    pub fn window_room(&self) -> usize {
        window_room(&self.cache)
    }

    /// After a verified window fed at cache row `base`: keeps the accepted rows, commits the
    /// accepted tokens and the target's correction (or bonus). Returns what was committed.
    pub fn commit(&mut self, base: usize, window: &DraftWindow, verdict: Verdict) -> Vec<u32> {
        let new = verdict.committed(&window.tokens);
        self.commit_kept(base, new)
    }

    /// [`Run::commit`] of a verdict's tokens `new`, which a constraint may have cut short (see
    /// [`crate::constraint::ConstraintState::settle`]). The cache keeps the rows of every
    /// committed token but the last: the one before the window at `base`, then the window's.
    pub fn commit_kept(&mut self, base: usize, new: Vec<u32>) -> Vec<u32> {
        self.commit_observed(base, new, &[], &[])
    }

    /// [`Run::commit_kept`], token `j` of `new` chosen at `rows[j]` (the target's raw logits,
    /// before penalties and constraint) with the monitored layer's state `hidden[j]`: the
    /// monitors see the tokens the output takes (under early stop a firing rule cuts `new`
    /// after its token and ends the generation), and log-probabilities are read when asked.
    pub fn commit_observed(
        &mut self,
        base: usize,
        mut new: Vec<u32>,
        rows: &[Vec<f32>],
        hidden: &[Vec<f32>],
    ) -> Vec<u32> {
        let taken = self.progress.output.accepts(&new);
        let stopped = match self.monitors.as_mut() {
            Some(monitors) => monitors.observe_committed(&mut new, taken, rows, hidden),
            None => false,
        };
        let logprobs = match self.logprobs_top {
            Some(top) => token_logprobs(rows, &new, top),
            None => Vec::new(),
        };
        self.cache.truncate(base + new.len());
        self.seq.extend_from_slice(&new);
        let before = self.progress.output.tokens.len();
        self.progress.commit(&new, &logprobs);
        let committed = self.progress.output.tokens.len() - before;
        self.logprobs
            .extend_from_slice(&logprobs[..committed.min(logprobs.len())]);
        if stopped {
            self.progress
                .output
                .finish
                .get_or_insert(FinishReason::Monitor);
        }
        new
    }

    /// Closes the generation.
    pub fn finish(self) -> Generation {
        let mut generation = self.progress.finish(self.stats, self.started);
        generation.logprobs = self.logprobs;
        let stopped = generation.finish_reason == FinishReason::Monitor;
        generation.monitors = self.monitors.map(|m| m.report(stopped));
        generation
    }
}

/// Checks `config`'s penalties against `target`'s vocabulary.
pub(crate) fn check_penalties(config: &GenerationConfig, target: &Model) -> Result<()> {
    config
        .penalties
        .check(target.vocab_size())
        .map_err(Error::InvalidConfig)
}

/// The committed output of one generation: its tokens, the stop and length rules, and why it
/// ended. Shared by the one-sequence strategies ([`Progress`]) and the batched engine.
pub(crate) struct Output {
    pub tokens: Vec<u32>,
    stop: StopSet,
    max_new_tokens: usize,
    pub finish: Option<FinishReason>,
}

impl Output {
    pub fn new(config: &GenerationConfig, target: &Model) -> Self {
        Self {
            tokens: Vec::new(),
            stop: StopSet::new(config, target),
            max_new_tokens: config.max_new_tokens,
            finish: (config.max_new_tokens == 0).then_some(FinishReason::Length),
        }
    }

    pub fn stop(&self) -> &StopSet {
        &self.stop
    }

    /// Commits `new` tokens in order, stopping at a stop token or the length limit. Returns
    /// the tokens that were committed (a prefix of `new`).
    pub fn push(&mut self, new: &[u32]) -> &[u32] {
        let start = self.tokens.len();
        for &token in new {
            if self.finish.is_some() {
                break;
            }
            self.tokens.push(token);
            if self.stop.contains(token) {
                self.finish = Some(FinishReason::Stop);
            } else if self.tokens.len() >= self.max_new_tokens {
                self.finish = Some(FinishReason::Length);
            }
        }
        &self.tokens[start..]
    }

    pub fn done(&self) -> bool {
        self.finish.is_some()
    }

    /// How many of `new` [`Output::push`] would commit.
    pub fn accepts(&self, new: &[u32]) -> usize {
        if self.finish.is_some() {
            return 0;
        }
        let room = self.max_new_tokens.saturating_sub(self.tokens.len());
        let until_stop = new
            .iter()
            .position(|&t| self.stop.contains(t))
            .map_or(new.len(), |i| i + 1);
        until_stop.min(room)
    }

    /// Whether `cache` has room for one more token; ends the generation at the context limit
    /// when not.
    pub fn has_room(&mut self, cache: &KvCache) -> bool {
        if cache.len() + 1 > cache.capacity() {
            self.finish = Some(FinishReason::ContextLimit);
            return false;
        }
        true
    }

    /// Closes the generation: final counters and the result.
    pub fn finish(self, mut stats: Stats, started: Instant) -> Generation {
        stats.generated_tokens = self.tokens.len();
        stats.time.total = started.elapsed();
        Generation {
            finish_reason: self.finish.unwrap_or(FinishReason::Length),
            tokens: self.tokens,
            text: None,
            stats,
            logprobs: Vec::new(),
            monitors: None,
        }
    }
}

/// The committed output of one generation, streamed to a callback as it grows.
pub(crate) struct Progress<'a> {
    pub output: Output,
    on_tokens: OnTokens<'a>,
}

impl<'a> Progress<'a> {
    pub fn new(config: &GenerationConfig, target: &Model, on_tokens: OnTokens<'a>) -> Self {
        Self {
            output: Output::new(config, target),
            on_tokens,
        }
    }

    pub fn stop(&self) -> &StopSet {
        self.output.stop()
    }

    /// Commits `new` tokens in order, stopping at a stop token or the length limit, and streams
    /// them with theirs of `logprobs` (one per token of `new`, or none). Returns true while
    /// generation should go on.
    pub fn commit(&mut self, new: &[u32], logprobs: &[TokenLogprob]) -> bool {
        let committed = self.output.push(new);
        let logprobs = &logprobs[..logprobs.len().min(committed.len())];
        if !committed.is_empty()
            && (self.on_tokens)(committed, logprobs) == StreamControl::Stop
            && self.output.finish.is_none()
        {
            self.output.finish = Some(FinishReason::Cancelled);
        }
        self.output.finish.is_none()
    }

    pub fn done(&self) -> bool {
        self.output.done()
    }

    /// Closes the generation: final counters and the result.
    pub fn finish(self, stats: Stats, started: Instant) -> Generation {
        self.output.finish(stats, started)
    }
}

/// Draft tokens the next window may hold after what `cache` holds: it keeps one row for the
/// token before the window.
pub(crate) fn window_room(cache: &KvCache) -> usize {
    cache.capacity() - cache.len() - 1
}

/// The token plain decoding commits after `logits`: the argmax when greedy (no random draw),
/// else a draw from the warped distribution.
pub(crate) fn next_token(logits: &[f32], params: &SamplingParams, rng: &mut StdRng) -> u32 {
    if params.is_greedy() {
        sampling::argmax(logits)
    } else {
        sampling::warp_probs(logits, params).sample(rng.random())
    }
}

/// Cache capacity for a generation: prompt, output and one window of slack, within the limit.
pub(crate) fn capacity_for(
    target: &Arc<Model>,
    prompt: &[u32],
    config: &GenerationConfig,
    gamma: usize,
) -> Result<usize> {
    let limit = target.context_limit();
    if prompt.is_empty() {
        return Err(Error::InvalidPrompt("the prompt is empty".into()));
    }
    if prompt.len() >= limit {
        return Err(Error::InvalidPrompt(format!(
            "the prompt has {} tokens but the context limit is {limit}",
            prompt.len()
        )));
    }
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= target.vocab_size()) {
        return Err(mirror_core::Error::TokenOutOfRange {
            token: bad,
            vocab_size: target.vocab_size(),
        }
        .into());
    }
    Ok((prompt.len() + config.max_new_tokens + gamma + 2).min(limit))
}
