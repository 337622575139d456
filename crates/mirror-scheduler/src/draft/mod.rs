//! The draft side: proposing windows for the target to verify.
//!
//! Here live the linear drafter that vanilla SD and Mirror share ([`Drafter`]: rollouts after a
//! context, with prompt lookup first when it is on), the draft model's counted forwards over its
//! cache (`model`), lookahead tokens (`lookahead`) and prompt lookup ([`lookup`]). Mirror's tree
//! drafting builds on [`Drafter`] in [`crate::strategy::mirror`].
//!
//! May import: the data modules ([`crate::generation`], [`crate::stats`], [`crate::window`]),
//! [`crate::seed`] and [`crate::error`]; never the strategies or the engine.

mod lookahead;
pub mod lookup;
mod model;

use std::sync::Arc;

use mirror_core::sampling::{self, Penalties, SamplingParams};
use mirror_core::Model;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::error::Result;
use crate::generation::StopSet;
use crate::seed::mix;
use crate::stats::DraftCounters;
use crate::window::{DraftChoice, DraftWindow, Source};
use lookup::LookupConfig;

pub(crate) use lookahead::{agreed_prefix, StepLogits};
pub(crate) use model::{DraftModel, InjectedFault};

/// The draft token at window position `index` from the draft's `logits`: the argmax under
/// greedy `params`, else a sample of the warped distribution with the window's `seed` (kept as
/// the choice's `q` for verification). Shared by [`Drafter`] and the batched engine, so that a
/// batched sequence drafts what it would alone.
pub(crate) fn choose_draft_token(
    logits: &[f32],
    params: &SamplingParams,
    seed: u64,
    index: usize,
) -> (u32, DraftChoice) {
    if params.is_greedy() {
        return (sampling::argmax(logits), DraftChoice::PointMass);
    }
    let q = sampling::warp_probs(logits, params);
    let u = StdRng::seed_from_u64(mix(seed, index as u64)).random::<f64>();
    (q.sample(u), DraftChoice::Sampled(q))
}

/// The draft model as a proposer: its cache, sampling, stop tokens and position limit.
pub struct Drafter {
    pub(crate) model: DraftModel,
    pub(crate) params: SamplingParams,
    pub(crate) stop: StopSet,
    /// Drafted tokens stay below this position: past it the target could not verify them.
    pub(crate) position_limit: usize,
    /// A lookahead token is proposed only while its lookahead row's top probability reaches
    /// this (0: always); a step then ends early rather than propose a likely miss.
    pub(crate) lookahead_confidence: f32,
    /// Prompt lookup tried before the model, for windows and tree branches alike.
    pub(crate) lookup: Option<LookupConfig>,
    /// A rollout's penalties (with the prompt's length) and the context it follows: proposals
    /// are drawn from the draft's logits penalized as the target's rows will be.
    penalties: Option<(Penalties, usize)>,
    context: Vec<u32>,
}

impl Drafter {
    /// A drafter over `model`; [`Drafter::reset`] prepares it for a generation.
    pub fn new(model: Arc<Model>) -> Self {
        Self {
            model: DraftModel::new(model),
            params: SamplingParams::greedy(),
            stop: StopSet::default(),
            position_limit: usize::MAX,
            lookahead_confidence: 0.0,
            lookup: None,
            penalties: None,
            context: Vec::new(),
        }
    }

    /// Rollouts from now on propose under `penalties` (a prompt of `prompt_len` tokens); until
    /// the next [`Drafter::reset`].
    pub(crate) fn set_penalties(&mut self, penalties: &Penalties, prompt_len: usize) {
        self.penalties = (!penalties.is_neutral()).then(|| (penalties.clone(), prompt_len));
    }

    /// The draft model.
    pub fn draft_model(&self) -> &Arc<Model> {
        &self.model.model
    }

    /// Prepares for a generation: a cache of `capacity` rows, drafted tokens below
    /// `position_limit` (and below the draft's own context limit), sampling settings, stop tokens.
    pub fn reset(
        &mut self,
        capacity: usize,
        position_limit: usize,
        params: SamplingParams,
        stop: StopSet,
    ) -> Result<()> {
        self.position_limit = position_limit.min(self.model.model.context_limit());
        self.model.reset(capacity)?;
        self.params = params;
        self.stop = stop;
        self.penalties = None;
        Ok(())
    }

    /// Draft work since the last call.
    pub fn take_counters(&mut self) -> DraftCounters {
        self.model.take_counters()
    }

    /// Makes the cache hold `context` exactly (a prefill).
    pub fn sync(&mut self, context: &[u32]) -> Result<()> {
        self.model.sync(context)
    }

    /// Whether a step checks the previous step's lookahead tokens against the main row.
    pub(crate) fn self_verifying(&self) -> bool {
        self.model.lookahead_tokens() > 0 && self.params.is_greedy()
    }

    /// The next token of `window` from the draft's `logits` (penalized first when a rollout's
    /// penalties are set).
    fn choose(&self, logits: &[f32], seed: u64, window: &DraftWindow) -> (u32, DraftChoice) {
        let Some((penalties, prompt_len)) = &self.penalties else {
            return choose_draft_token(logits, &self.params, seed, window.len());
        };
        let prompt_len = (*prompt_len).min(self.context.len());
        let (prompt, output) = self.context.split_at(prompt_len);
        let row = penalties.penalized_next(logits, prompt, output, &window.tokens);
        choose_draft_token(&row, &self.params, seed, window.len())
    }

    /// Drafts up to `count` tokens after `context` (a stop token ends the window early). The
    /// cache then holds `context` and every drafted token but those of the last step.
    pub fn rollout(&mut self, context: &[u32], count: usize, seed: u64) -> Result<DraftWindow> {
        let mut window = DraftWindow::default();
        let count = count.min(self.position_limit.saturating_sub(context.len()));
        if count == 0 {
            return Ok(window);
        }
        let step = self.model.advance_to(context)?;
        if self.penalties.is_some() {
            self.context.clear();
            self.context.extend_from_slice(context);
        }
        self.extend(&mut window, step, count, seed)?;
        Ok(window)
    }

    /// Up to `count` tokens after `context`: looked up when lookup is on and finds any, rolled
    /// out by the model otherwise.
    pub fn window(
        &mut self,
        context: &[u32],
        count: usize,
        seed: u64,
    ) -> Result<(DraftWindow, Source)> {
        let count = count.min(self.position_limit.saturating_sub(context.len()));
        if let Some(lookup) = &self.lookup {
            let window = lookup.window(context, count, &self.stop);
            if !window.is_empty() {
                return Ok((window, Source::Lookup));
            }
        }
        Ok((self.rollout(context, count, seed)?, Source::Model))
    }

    /// Appends one step's proposals to `window`: the main token, then one per lookahead row while
    /// they are confident enough, up to `count` tokens or a stop token. Returns whether the
    /// window is finished. (Where a step stops depends on the draft's own logits only, so the
    /// verification stays exact.)
    pub(crate) fn propose(
        &self,
        window: &mut DraftWindow,
        step: &StepLogits,
        count: usize,
        seed: u64,
    ) -> bool {
        for (j, logits) in std::iter::once(&step.main)
            .chain(&step.lookahead)
            .enumerate()
        {
            if j > 0 && sampling::max_probability(logits) < self.lookahead_confidence {
                return false;
            }
            let (token, choice) = self.choose(logits, seed, window);
            window.tokens.push(token);
            window.choices.push(choice);
            if window.len() >= count || self.stop.contains(token) {
                return true;
            }
        }
        false
    }

    /// Continues `window` from `step` (the logits after its last fed token) to `count`.
    pub(crate) fn extend(
        &mut self,
        window: &mut DraftWindow,
        mut step: StepLogits,
        count: usize,
        seed: u64,
    ) -> Result<()> {
        let start = window.len();
        let mut steps = 0;
        loop {
            let before = window.len();
            let finished = self.propose(window, &step, count, seed);
            steps += 1;
            if finished {
                break;
            }
            let fresh = window.tokens[before..].to_vec();
            let (kept, next) = self.model.feed_chain(&fresh, self.self_verifying())?;
            window.truncate(before + kept);
            step = next;
        }
        self.model.count_steps(steps, window.len() - start);
        Ok(())
    }
}
