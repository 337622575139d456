//! The draft model with its KV cache: every draft forward goes through here, counted and timed,
//! and the tokens its cache rows hold are tracked so that a caller can tell what must be fed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mirror_core::{AttentionInput, KvCache, Model};

use super::lookahead::{agreed_prefix, StepLogits};
use crate::error::{Error, Result, WorkerFault};
use crate::stats::DraftCounters;

/// A test's injected failure: after this many forwards, fail once, by panicking or by
/// returning [`WorkerFault::Injected`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InjectedFault {
    pub after_forwards: usize,
    pub panic: bool,
}

/// The draft model, its cache and what the cache holds.
pub(crate) struct DraftModel {
    pub model: Arc<Model>,
    cache: Option<KvCache>,
    /// Tokens whose keys/values occupy the cache's first rows (the linear chain).
    cached: Vec<u32>,
    /// Work since the last `take_counters`.
    counters: DraftCounters,
    /// Running average of a step forward's time (see [`DraftCounters::typical_step`]).
    step_cost: Option<Duration>,
    /// Busy intervals since the last `clear_intervals`, for the hidden-time split.
    intervals: Vec<(Instant, Instant)>,
    pub fault: Option<InjectedFault>,
    total_forwards: usize,
}

impl DraftModel {
    pub fn new(model: Arc<Model>) -> Self {
        Self {
            model,
            cache: None,
            cached: Vec::new(),
            counters: DraftCounters::default(),
            step_cost: None,
            intervals: Vec::new(),
            fault: None,
            total_forwards: 0,
        }
    }

    /// An empty cache of `capacity` rows (the old one reused when it has that size).
    pub fn reset(&mut self, capacity: usize) -> Result<()> {
        match self.cache.as_mut() {
            Some(cache) if cache.capacity() == capacity => cache.clear(),
            _ => self.cache = Some(self.model.new_cache(1, capacity)?),
        }
        self.cached.clear();
        Ok(())
    }

    /// Drafts in `cache` from now on (the next [`DraftModel::reset`] clears it, and keeps it
    /// when it has the capacity asked for).
    pub fn set_cache(&mut self, cache: KvCache) {
        self.cache = Some(cache);
        self.cached.clear();
    }

    pub fn cache(&mut self) -> Result<&mut KvCache> {
        self.cache
            .as_mut()
            .ok_or_else(|| Error::InvalidConfig("draft used before reset".into()))
    }

    /// The tokens the cache rows hold.
    pub fn cached(&self) -> &[u32] {
        &self.cached
    }

    /// Records that the cache rows now also hold `tokens` (fed by a pass that did not go
    /// through [`DraftModel::feed`]).
    pub fn note_cached(&mut self, tokens: &[u32]) {
        self.cached.extend_from_slice(tokens);
    }

    pub fn take_counters(&mut self) -> DraftCounters {
        self.counters.typical_step = self.step_cost;
        std::mem::take(&mut self.counters)
    }

    /// Counts draft steps and the tokens they proposed.
    pub fn count_steps(&mut self, steps: usize, tokens: usize) {
        self.counters.steps += steps;
        self.counters.tokens += tokens;
    }

    /// Lookahead tokens of the draft per step (0: one token per step).
    pub fn lookahead_tokens(&self) -> usize {
        self.model
            .lookahead()
            .map_or(0, |head| head.config().tokens)
    }

    /// Whether lookahead rows anchored at positions up to `last_anchor` stay inside the draft's
    /// context (near the end a step proposes its main token only).
    pub fn lookahead_fits(&self, last_anchor: usize) -> bool {
        last_anchor + self.lookahead_tokens() < self.model.context_limit()
    }

    /// Fails once, as a test asked, when the injected fault is due.
    fn injected_failure(&mut self) -> Result<()> {
        let Some(fault) = self.fault else {
            return Ok(());
        };
        if self.total_forwards < fault.after_forwards {
            return Ok(());
        }
        self.fault = None;
        if fault.panic {
            panic!(
                "injected draft panic after {} forwards",
                fault.after_forwards
            );
        }
        Err(WorkerFault::Injected {
            forwards: fault.after_forwards,
        }
        .into())
    }

    /// Runs one draft forward over `rows` fed rows, counted and timed.
    pub fn forward<T>(
        &mut self,
        rows: usize,
        pass: impl FnOnce(&Model, &mut KvCache) -> mirror_core::Result<T>,
    ) -> Result<T> {
        self.injected_failure()?;
        let start = Instant::now();
        let model = Arc::clone(&self.model);
        let out = pass(&model, self.cache()?)?;
        let end = Instant::now();
        self.counters.forwards += 1;
        self.total_forwards += 1;
        self.counters.busy += end - start;
        if rows <= 2 {
            self.counters.step_forwards += 1;
            self.counters.step_busy += end - start;
            // A slow average (weight 1/8 for the newest): one preempted pass barely moves it.
            self.step_cost = Some(match self.step_cost {
                Some(old) => (old * 7 + (end - start)) / 8,
                None => end - start,
            });
        }
        self.intervals.push((start, end));
        Ok(out)
    }

    /// Feeds `tokens` causally after the cache, returning the last row's logits.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let logits = self.forward(tokens.len(), |m, c| m.next_token_logits(tokens, c))?;
        self.cached.extend_from_slice(tokens);
        Ok(logits)
    }

    /// Feeds a chain's newest `tokens` causally after the cache. With `check` (a greedy draft
    /// with lookahead tokens), tokens after the first stand only while the main row agrees;
    /// the rest leave the cache again. Returns how many stood and the step's logits after the
    /// last of them.
    pub fn feed_chain(&mut self, tokens: &[u32], check: bool) -> Result<(usize, StepLogits)> {
        if tokens.is_empty() {
            return Err(Error::Core(mirror_core::Error::InvalidArgument(
                "a draft step needs at least one token to feed".into(),
            )));
        }
        if self.lookahead_tokens() == 0 {
            let main = self.feed(tokens)?;
            return Ok((
                tokens.len(),
                StepLogits {
                    main,
                    lookahead: Vec::new(),
                },
            ));
        }
        let rows: Vec<usize> = if check {
            (0..tokens.len()).collect()
        } else {
            vec![tokens.len() - 1]
        };
        let device = self.model.device().clone();
        let base = self.cache()?.len();
        let input = AttentionInput::causal(1, tokens.len(), base, &device)?;
        let lookahead_rows = if self.lookahead_fits(base + tokens.len() - 1) {
            rows.clone()
        } else {
            Vec::new()
        };
        let out = self.forward(tokens.len(), |m, c| {
            m.forward_with_lookahead(tokens, &input, c, &rows, &lookahead_rows)
        })?;
        let main = out.main.to_vec2::<f32>()?;
        let mut lookahead = if lookahead_rows.is_empty() {
            vec![Vec::new(); rows.len()]
        } else {
            out.lookahead.to_vec3::<f32>()?
        };
        let kept = if check {
            agreed_prefix(tokens, &main)
        } else {
            tokens.len()
        };
        self.cache()?.truncate(base + kept);
        self.cached.extend_from_slice(&tokens[..kept]);
        let anchor = if check { kept - 1 } else { 0 };
        Ok((
            kept,
            StepLogits {
                main: main[anchor].clone(),
                lookahead: std::mem::take(&mut lookahead[anchor]),
            },
        ))
    }

    /// How many leading tokens of `context` the cache already holds.
    pub fn cached_prefix(&self, context: &[u32]) -> usize {
        self.cached
            .iter()
            .zip(context)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// Makes the cache hold `context` and returns the step's logits after its last token.
    pub fn advance_to(&mut self, context: &[u32]) -> Result<StepLogits> {
        let mut common = self.cached_prefix(context);
        if common == context.len() {
            // Everything is cached but the logits after it are not: feed the last token again.
            common -= 1;
        }
        self.truncate(common)?;
        // Committed tokens are not checked: they are the target's.
        Ok(self.feed_chain(&context[common..], false)?.1)
    }

    /// Makes the cache hold `context` exactly (no logits needed).
    pub fn sync(&mut self, context: &[u32]) -> Result<()> {
        let common = self.cached_prefix(context);
        self.truncate(common)?;
        if common < context.len() {
            self.feed(&context[common..])?;
        }
        Ok(())
    }

    /// Keeps the first `len` cache rows.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.cached.truncate(len);
        self.cache()?.truncate(len);
        Ok(())
    }

    /// Keeps the first `keep` rows, then moves the rows `nodes` right after them (a tree
    /// branch's path becoming the linear chain); the moved rows now hold `tokens`.
    pub fn compact(&mut self, keep: usize, nodes: &[usize], tokens: &[u32]) -> Result<()> {
        self.cache()?.compact(keep, nodes)?;
        self.cached.truncate(keep);
        self.cached.extend_from_slice(tokens);
        Ok(())
    }

    pub fn clear_intervals(&mut self) {
        self.intervals.clear();
    }

    /// Draft compute since `clear_intervals` that ran before `until` (while the target was
    /// busy).
    pub fn busy_before(&self, until: Instant) -> Duration {
        self.intervals
            .iter()
            .map(|&(s, e)| e.min(until).saturating_duration_since(s))
            .sum()
    }
}
