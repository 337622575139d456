//! The draft side: autoregressive rollouts and branch-complete hypothesis trees, over a draft
//! model and its own KV cache. Used in-thread by vanilla SD and on its worker thread by Mirror-SD.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mirror_core::sampling::{self, SamplingParams};
use mirror_core::{AttentionInput, KvCache, Model, RowVisibility};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::tree::BranchPlan;
use crate::verify::{DraftChoice, DraftWindow};

/// Mixes seeds into one (splitmix64 finaliser), so every branch has its own random stream and
/// sampled output does not depend on how many branches were drafted in time.
pub(crate) fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b
        .wrapping_add(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(a << 6)
        .wrapping_add(a >> 2);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Logits rows of a forward, as host vectors.
pub(crate) fn host_rows(logits: &candle_core::Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(logits.squeeze(0)?.to_vec2::<f32>()?)
}

/// A branch of the hypothesis tree as drafted so far.
#[derive(Debug, Clone)]
pub(crate) struct Branch {
    pub plan: BranchPlan,
    /// Cache rows of the fed nodes: the root, then each drafted token but the last.
    pub nodes: Vec<usize>,
    /// Drafted tokens.
    pub window: DraftWindow,
    pub seed: u64,
}

impl Branch {
    /// A branch not drafted yet; its random stream depends only on the step and its root.
    fn new(plan: BranchPlan, step_seed: u64) -> Self {
        Self {
            plan,
            nodes: Vec::new(),
            window: DraftWindow::default(),
            seed: branch_seed(step_seed, plan.row, plan.token),
        }
    }
}

/// Seed of the branch after `row` rooted at `token`; a fresh rollout of the same outcome uses it
/// too, so a sampled window is the same whether it was drafted in the tree or afterwards.
fn branch_seed(step_seed: u64, row: usize, token: u32) -> u64 {
    mix(step_seed, ((row as u64) << 32) | token as u64)
}

/// How the next window was obtained at the final rendezvous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Taken whole from the tree.
    Hit,
    /// Taken partly from the tree, then extended.
    Partial,
    /// Rolled out afresh.
    Miss,
}

/// The draft model with its cache and the tokens that cache holds.
pub(crate) struct DraftState {
    pub model: Arc<Model>,
    cache: Option<KvCache>,
    /// Tokens whose keys/values occupy the cache's first rows (the linear sequence).
    cached: Vec<u32>,
    pub params: SamplingParams,
    pub stop_ids: Vec<u32>,
    /// Drafted tokens stay below this position: past it the target could not verify them.
    position_limit: usize,
    /// Forward passes and compute time since the last `take_counters`.
    pub forwards: usize,
    pub busy: Duration,
    /// Busy intervals of the current tree, for the hidden-time split.
    pub intervals: Vec<(Instant, Instant)>,
    /// Fault injection for tests: after this many forwards, fail once (panic or error).
    pub fault: Option<(usize, bool)>,
    pub total_forwards: usize,
}

impl DraftState {
    pub fn new(model: Arc<Model>) -> Self {
        Self {
            model,
            cache: None,
            cached: Vec::new(),
            params: SamplingParams::greedy(),
            stop_ids: Vec::new(),
            position_limit: usize::MAX,
            forwards: 0,
            busy: Duration::ZERO,
            intervals: Vec::new(),
            fault: None,
            total_forwards: 0,
        }
    }

    /// Prepares for a generation: a cache of `capacity` rows, drafted tokens below
    /// `position_limit` (and below the draft's own context limit), sampling settings, stop tokens.
    pub fn reset(
        &mut self,
        capacity: usize,
        position_limit: usize,
        params: SamplingParams,
        stop_ids: Vec<u32>,
    ) -> Result<()> {
        self.position_limit = position_limit.min(self.model.context_limit());
        let reuse = self
            .cache
            .as_ref()
            .is_some_and(|c| c.capacity() == capacity);
        if reuse {
            if let Some(cache) = self.cache.as_mut() {
                cache.clear();
            }
        } else {
            self.cache = Some(self.model.new_cache(1, capacity)?);
        }
        self.cached.clear();
        self.params = params;
        self.stop_ids = stop_ids;
        Ok(())
    }

    fn cache(&mut self) -> Result<&mut KvCache> {
        self.cache
            .as_mut()
            .ok_or_else(|| Error::InvalidConfig("draft used before reset".into()))
    }

    pub fn take_counters(&mut self) -> (usize, Duration) {
        let out = (self.forwards, self.busy);
        self.forwards = 0;
        self.busy = Duration::ZERO;
        out
    }

    fn timed<T>(
        &mut self,
        f: impl FnOnce(&Model, &mut KvCache) -> mirror_core::Result<T>,
    ) -> Result<T> {
        if let Some((after, panic)) = self.fault {
            if self.total_forwards >= after {
                self.fault = None;
                if panic {
                    panic!("injected draft panic after {after} forwards");
                }
                return Err(Error::WorkerFailed(format!(
                    "injected draft error after {after} forwards"
                )));
            }
        }
        let start = Instant::now();
        let model = Arc::clone(&self.model);
        let out = f(&model, self.cache()?)?;
        let end = Instant::now();
        self.forwards += 1;
        self.total_forwards += 1;
        self.busy += end - start;
        self.intervals.push((start, end));
        Ok(out)
    }

    /// Feeds `tokens` causally after the cache, returning the last row's logits.
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let logits = self.timed(|m, c| m.next_token_logits(tokens, c))?;
        self.cached.extend_from_slice(tokens);
        Ok(logits)
    }

    /// How many leading tokens of `context` the cache already holds.
    fn cached_prefix(&self, context: &[u32]) -> usize {
        self.cached
            .iter()
            .zip(context)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// Makes the cache hold `context` and returns the logits after its last token.
    fn advance_to(&mut self, context: &[u32]) -> Result<Vec<f32>> {
        let mut common = self.cached_prefix(context);
        if common == context.len() {
            // Everything is cached but the logits after it are not: feed the last token again.
            common -= 1;
        }
        self.truncate(common)?;
        self.feed(&context[common..])
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

    fn truncate(&mut self, len: usize) -> Result<()> {
        self.cached.truncate(len);
        self.cache()?.truncate(len);
        Ok(())
    }

    fn choose(&self, logits: &[f32], seed: u64, index: usize) -> (u32, DraftChoice) {
        if self.params.is_greedy() {
            return (sampling::argmax(logits), DraftChoice::PointMass);
        }
        let q = sampling::warp(logits, &self.params);
        let u = StdRng::seed_from_u64(mix(seed, index as u64)).random::<f64>();
        (sampling::sample(&q, u), DraftChoice::Sampled(q))
    }

    fn is_stop(&self, token: u32) -> bool {
        self.stop_ids.contains(&token)
    }

    /// Drafts up to `count` tokens after `context` (a stop token ends the window early). The
    /// cache then holds `context` and every drafted token but the last.
    pub fn rollout(&mut self, context: &[u32], count: usize, seed: u64) -> Result<DraftWindow> {
        let mut window = DraftWindow::default();
        let count = count.min(self.position_limit.saturating_sub(context.len()));
        if count == 0 {
            return Ok(window);
        }
        let logits = self.advance_to(context)?;
        self.extend(&mut window, logits, count, seed)?;
        Ok(window)
    }

    /// Continues `window` from `logits` (the distribution after its last fed token) to `count`.
    fn extend(
        &mut self,
        window: &mut DraftWindow,
        mut logits: Vec<f32>,
        count: usize,
        seed: u64,
    ) -> Result<()> {
        loop {
            let (token, choice) = self.choose(&logits, seed, window.len());
            window.tokens.push(token);
            window.choices.push(choice);
            if window.len() >= count || self.is_stop(token) {
                return Ok(());
            }
            logits = self.feed(&[token])?;
        }
    }

    /// Drafts the branches of `plan` (most likely first) after the linear `context`
    /// (`...committed, c, w_1..w_gamma`, with `c` at `window_start`), `branches_per_pass` at a
    /// time; with `stop` (anytime drafting) it ends between passes once the flag is raised.
    #[allow(clippy::too_many_arguments)]
    pub fn build_tree(
        &mut self,
        context: &[u32],
        window_start: usize,
        plan: &[BranchPlan],
        gamma: usize,
        step_seed: u64,
        branches_per_pass: usize,
        stop: Option<&AtomicBool>,
    ) -> Result<Vec<Branch>> {
        self.intervals.clear();
        // The linear tail the cache lacks (usually the window's last token) rides along with the
        // first tree pass instead of costing a forward of its own.
        let common = self.cached_prefix(context);
        self.truncate(common)?;
        let mut tail: Vec<u32> = context[common..].to_vec();
        let mut branches: Vec<Branch> = Vec::with_capacity(plan.len());
        let device = self.model.device().clone();
        let stopped = || stop.is_some_and(|s| s.load(Ordering::Acquire));
        for wave in plan.chunks(branches_per_pass.max(1)) {
            if stopped() {
                break;
            }
            let first = branches.len();
            // A branch after row d holds tokens at positions window_start + d + 2 onwards.
            let fits = |p: &&BranchPlan| window_start + p.row + 2 < self.position_limit;
            for p in wave.iter().filter(fits) {
                branches.push(Branch::new(*p, step_seed));
            }
            loop {
                // Every unfinished branch of the wave feeds its newest token (the root first).
                let active: Vec<usize> = (first..branches.len())
                    .filter(|&i| {
                        let b = &branches[i];
                        let room = self.position_limit - (window_start + b.plan.row + 2);
                        b.window.len() < gamma.min(room)
                            && b.window.tokens.last().is_none_or(|&t| !self.is_stop(t))
                    })
                    .collect();
                if active.is_empty() || stopped() {
                    break;
                }
                let base = self.cache()?.len();
                let mut rows = Vec::with_capacity(tail.len() + active.len());
                let mut tokens = Vec::with_capacity(tail.len() + active.len());
                for (i, &t) in tail.iter().enumerate() {
                    rows.push(RowVisibility {
                        position: base + i,
                        prefix_len: base + i + 1,
                        extra: Vec::new(),
                    });
                    tokens.push(t);
                }
                let first_branch_row = base + tail.len();
                for (k, &i) in active.iter().enumerate() {
                    let b = &branches[i];
                    let prefix_len = window_start + b.plan.row + 1;
                    let mut extra = b.nodes.clone();
                    extra.push(first_branch_row + k);
                    rows.push(RowVisibility {
                        position: prefix_len + b.nodes.len(),
                        prefix_len,
                        extra,
                    });
                    tokens.push(b.window.tokens.last().copied().unwrap_or(b.plan.token));
                }
                let input = AttentionInput::from_rows(&rows, base + rows.len(), &device)?;
                let logits = self.timed(|m, c| m.forward(&[&tokens], &input, c))?;
                let logits = host_rows(&logits)?;
                let skip = tail.len();
                // The tail's last row is the draft's own prediction after w_gamma: its guess for
                // the bonus token. Root a branch there too (the draft continuing its own chain),
                // unless the plan already has it; it is fed with the next pass.
                if skip > 0 && self.cached.len() + skip == context.len() {
                    let bonus_row = context.len() - 1 - window_start;
                    let guess = sampling::argmax(&logits[skip - 1]);
                    let planned = plan.iter().any(|p| p.row == bonus_row && p.token == guess);
                    if !planned && window_start + bonus_row + 2 < self.position_limit {
                        let p = BranchPlan {
                            row: bonus_row,
                            token: guess,
                            priority: 1.0,
                        };
                        branches.push(Branch::new(p, step_seed));
                    }
                }
                self.cached.append(&mut tail);
                for (k, &i) in active.iter().enumerate() {
                    let (seed, index) = (branches[i].seed, branches[i].window.len());
                    let (token, choice) = self.choose(&logits[skip + k], seed, index);
                    let b = &mut branches[i];
                    b.nodes.push(first_branch_row + k);
                    b.window.tokens.push(token);
                    b.window.choices.push(choice);
                }
            }
        }
        Ok(branches)
    }

    /// The final rendezvous on the draft side: the target accepted `accepted` window tokens and
    /// emitted `token`. Keeps the matching branch (compacting its rows onto the committed
    /// prefix) and completes it, or rolls out afresh. Returns the next window.
    #[allow(clippy::too_many_arguments)]
    pub fn resolve(
        &mut self,
        context: &[u32],
        window_start: usize,
        branches: &[Branch],
        accepted: usize,
        token: u32,
        gamma: usize,
        step_seed: u64,
    ) -> Result<(DraftWindow, Resolution)> {
        let keep = window_start + accepted + 1;
        let mut committed = context[..keep].to_vec();
        committed.push(token);
        let found = branches
            .iter()
            .find(|b| b.plan.row == accepted && b.plan.token == token && !b.window.is_empty());
        let seed = branch_seed(step_seed, accepted, token);
        let Some(branch) = found else {
            self.truncate(keep)?;
            return Ok((self.rollout(&committed, gamma, seed)?, Resolution::Miss));
        };
        self.cache()?.compact(keep, &branch.nodes)?;
        self.cached.truncate(keep);
        self.cached.push(token);
        let drafted = &branch.window.tokens;
        self.cached
            .extend_from_slice(&drafted[..branch.nodes.len() - 1]);
        let mut window = branch.window.clone();
        let room = self.position_limit.saturating_sub(keep + 1);
        let complete =
            window.len() >= gamma.min(room) || drafted.last().is_some_and(|&t| self.is_stop(t));
        if complete {
            window.truncate(gamma);
            return Ok((window, Resolution::Hit));
        }
        let last = *drafted.last().unwrap_or(&token);
        let logits = self.feed(&[last])?;
        self.extend(&mut window, logits, gamma.min(room), branch.seed)?;
        Ok((window, Resolution::Partial))
    }

    /// Draft compute that overlapped `[from, until]` (the target's suffix).
    pub fn hidden_time(&self, until: Instant) -> Duration {
        self.intervals
            .iter()
            .map(|&(s, e)| e.min(until).saturating_duration_since(s))
            .sum()
    }
}
