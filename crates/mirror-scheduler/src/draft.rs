//! The draft side: autoregressive rollouts and branch-complete hypothesis trees, over a draft
//! model and its own KV cache. Used in-thread by vanilla SD and on its worker thread by Mirror-SD.
//!
//! A draft with lookahead tokens ([`Model::with_lookahead`]) proposes its main-lookahead token and
//! one lookahead token per step. With a greedy draft, the next step also checks the lookahead
//! tokens against the main row (every fed row's main logits come with the pass) and replaces
//! the first one it disagrees with, as Speculative Streaming does; lookahead rows anchored at every fed
//! row make the step after a disagreement propose a full set again. A sampling draft keeps its
//! lookahead tokens as sampled from their own distributions (the distribution each token was drawn
//! from is what the target's verification divides by, so output stays exact).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mirror_core::sampling::{self, SamplingParams};
use mirror_core::{AttentionInput, KvCache, Model, RowVisibility};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::config::StopSet;
use crate::error::{Error, Result};
use crate::lookup::LookupConfig;
use crate::seed::{branch_seed, mix};
use crate::tree::BranchPlan;
use crate::verify::{DraftChoice, DraftWindow};
use crate::window::Source;

/// What one draft step leaves a chain: the main distribution after its newest fed token and the
/// lookahead distributions anchored there (empty without lookahead).
#[derive(Debug, Clone, Default)]
struct StepLogits {
    main: Vec<f32>,
    lookahead: Vec<Vec<f32>>,
}

/// Draft work since the last [`DraftState::take_counters`].
#[derive(Debug, Clone, Copy, Default)]
pub struct DraftCounters {
    /// Forward passes.
    pub forwards: usize,
    /// Compute time.
    pub busy: Duration,
    /// Draft steps: one chain (a rollout or one branch) advanced by one forward.
    pub steps: usize,
    /// Tokens those steps added to their windows (eta = tokens / steps).
    pub tokens: usize,
    /// Forwards that fed one chain step (at most two rows), and their compute time: the cost
    /// of a step, without the catch-up forwards that feed many committed tokens at once.
    pub step_forwards: usize,
    pub step_busy: Duration,
    /// The drafter's running average of a step forward's time, from earlier work: what
    /// [`DraftCounters::steady_busy`] charges per forward when none of these was a step (a
    /// one-token window drafted by the very forward that caught up).
    pub typical_step: Option<Duration>,
}

impl DraftCounters {
    /// Compute time of these forwards had each cost a typical step: what drafting costs
    /// once the draft is caught up with the text.
    pub fn steady_busy(&self) -> Duration {
        if self.step_forwards == 0 {
            return match self.typical_step {
                Some(step) => (step * self.forwards as u32).min(self.busy),
                None => self.busy,
            };
        }
        self.step_busy / self.step_forwards as u32 * self.forwards as u32
    }
}

/// How many of `fed` (a chain's newest tokens, the first already trusted) the main row
/// agrees with: token `i >= 1` stands if the main argmax after token `i - 1` is `fed[i]`.
fn agreed_prefix(fed: &[u32], main_rows: &[Vec<f32>]) -> usize {
    1 + fed
        .iter()
        .skip(1)
        .zip(main_rows)
        .take_while(|(&token, row)| sampling::argmax(row) == token)
        .count()
}

/// A branch of the hypothesis tree as drafted so far.
#[derive(Debug, Clone)]
pub struct Branch {
    pub plan: BranchPlan,
    /// Cache rows of the fed nodes: the root, then each drafted token but the last.
    pub nodes: Vec<usize>,
    /// Drafted tokens.
    pub window: DraftWindow,
    pub seed: u64,
    /// Filled by prompt lookup: complete as it is, with no rows in the cache.
    pub looked_up: bool,
}

impl Branch {
    /// A branch not drafted yet; its random sequence depends only on the step and its root.
    fn new(plan: BranchPlan, step_seed: u64) -> Self {
        Self {
            plan,
            nodes: Vec::new(),
            window: DraftWindow::default(),
            seed: branch_seed(step_seed, plan.row, plan.token),
            looked_up: false,
        }
    }

    /// Tokens the branch may hold: `gamma`, or fewer near the position limit (the branch's
    /// tokens start at position `window_start + row + 2`).
    pub fn capacity(&self, tree: &TreeRequest, position_limit: usize) -> usize {
        let start = tree.window_start + self.plan.row + 2;
        tree.gamma.min(position_limit.saturating_sub(start))
    }

    /// The one rule for "this branch is drafted": full, or ended by a stop token.
    pub fn is_complete(&self, tree: &TreeRequest, position_limit: usize, stop: &StopSet) -> bool {
        self.looked_up
            || self.window.len() >= self.capacity(tree, position_limit)
            || stop.ends(&self.window.tokens)
    }
}

/// One hypothesis tree to draft: after the linear `context` (`...committed, c, w_1..w_gamma`,
/// with `c` at `window_start`), the branches of `plan`, each up to `gamma` tokens.
#[derive(Debug, Clone)]
pub struct TreeRequest {
    pub context: Vec<u32>,
    pub window_start: usize,
    pub plan: Vec<BranchPlan>,
    pub gamma: usize,
    pub step_seed: u64,
}

/// One tree-masked draft pass: what was fed and the logits it returned.
struct TreePass {
    /// Cache rows before the pass.
    base: usize,
    /// The linear tail fed first (rows `0..tail`).
    tail: usize,
    /// Per active branch, its first fed row (relative to `base`) and the tokens fed.
    fed: Vec<(usize, Vec<u32>)>,
    /// Rows whose logits came back, in order.
    wanted: Vec<usize>,
    /// Main logits of the wanted rows.
    main: Vec<Vec<f32>>,
    /// Lookahead logits of the anchor rows (the wanted rows after the tail's), if any.
    lookahead: Vec<Vec<Vec<f32>>>,
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
pub struct DraftState {
    pub model: Arc<Model>,
    cache: Option<KvCache>,
    /// Tokens whose keys/values occupy the cache's first rows (the linear sequence).
    cached: Vec<u32>,
    pub params: SamplingParams,
    pub stop: StopSet,
    /// Drafted tokens stay below this position: past it the target could not verify them.
    position_limit: usize,
    /// Work since the last `take_counters`.
    counters: DraftCounters,
    /// Running average of a step forward's time (see [`DraftCounters::typical_step`]).
    step_cost: Option<Duration>,
    /// Busy intervals of the current tree, for the hidden-time split.
    pub intervals: Vec<(Instant, Instant)>,
    /// Fault injection for tests: after this many forwards, fail once (panic or error).
    pub fault: Option<(usize, bool)>,
    /// A lookahead token is proposed only while its lookahead row's top probability reaches this (0:
    /// always); a step then ends early rather than propose a likely miss.
    pub lookahead_confidence: f32,
    /// Prompt lookup tried before the model, for windows and tree branches alike.
    pub lookup: Option<LookupConfig>,
    pub total_forwards: usize,
}

impl DraftState {
    pub fn new(model: Arc<Model>) -> Self {
        Self {
            model,
            cache: None,
            cached: Vec::new(),
            params: SamplingParams::greedy(),
            stop: StopSet::default(),
            position_limit: usize::MAX,
            counters: DraftCounters::default(),
            step_cost: None,
            intervals: Vec::new(),
            fault: None,
            lookahead_confidence: 0.0,
            lookup: None,
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
        stop: StopSet,
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
        self.stop = stop;
        Ok(())
    }

    fn cache(&mut self) -> Result<&mut KvCache> {
        self.cache
            .as_mut()
            .ok_or_else(|| Error::InvalidConfig("draft used before reset".into()))
    }

    pub fn take_counters(&mut self) -> DraftCounters {
        self.counters.typical_step = self.step_cost;
        std::mem::take(&mut self.counters)
    }

    /// Lookahead tokens of the draft per step (0: one token per step).
    fn lookahead_tokens(&self) -> usize {
        self.model
            .lookahead()
            .map_or(0, |head| head.config().tokens)
    }

    /// Whether lookahead rows anchored at positions up to `last_anchor` stay inside the draft's context
    /// (near the end a step proposes its main token only).
    fn lookahead_fits(&self, last_anchor: usize) -> bool {
        last_anchor + self.lookahead_tokens() < self.model.context_limit()
    }

    /// Whether a step checks the previous step's lookahead tokens against the main row.
    fn self_verifying(&self) -> bool {
        self.lookahead_tokens() > 0 && self.params.is_greedy()
    }

    /// Runs one forward over `rows` fed rows, with the fault injection and the counters.
    fn timed<T>(
        &mut self,
        rows: usize,
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
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let logits = self.timed(tokens.len(), |m, c| m.next_token_logits(tokens, c))?;
        self.cached.extend_from_slice(tokens);
        Ok(logits)
    }

    /// Feeds a chain's newest `tokens` causally after the cache. With `check` (and a
    /// self-verifying draft), tokens after the first stand only while the main row agrees;
    /// the rest leave the cache again. Returns how many stood and the step's logits after the
    /// last of them.
    fn feed_chain(&mut self, tokens: &[u32], check: bool) -> Result<(usize, StepLogits)> {
        if tokens.is_empty() {
            return Err(Error::Core(mirror_core::Error::InvalidArgument(
                "a draft step needs at least one token to feed".into(),
            )));
        }
        if self.lookahead_tokens() == 0 {
            return Ok((
                tokens.len(),
                StepLogits {
                    main: self.feed(tokens)?,
                    lookahead: Vec::new(),
                },
            ));
        }
        let check = check && self.self_verifying();
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
        let out = self.timed(tokens.len(), |m, c| {
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
    fn cached_prefix(&self, context: &[u32]) -> usize {
        self.cached
            .iter()
            .zip(context)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// Makes the cache hold `context` and returns the step's logits after its last token.
    fn advance_to(&mut self, context: &[u32]) -> Result<StepLogits> {
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

    fn truncate(&mut self, len: usize) -> Result<()> {
        self.cached.truncate(len);
        self.cache()?.truncate(len);
        Ok(())
    }

    fn choose(&self, logits: &[f32], seed: u64, index: usize) -> (u32, DraftChoice) {
        if self.params.is_greedy() {
            return (sampling::argmax(logits), DraftChoice::PointMass);
        }
        let q = sampling::warp_probs(logits, &self.params);
        let u = StdRng::seed_from_u64(mix(seed, index as u64)).random::<f64>();
        (q.sample(u), DraftChoice::Sampled(q))
    }

    fn is_stop(&self, token: u32) -> bool {
        self.stop.contains(token)
    }

    /// Whether `branch` of `tree` is drafted (see [`Branch::is_complete`]).
    pub fn is_complete(&self, branch: &Branch, tree: &TreeRequest) -> bool {
        branch.is_complete(tree, self.position_limit, &self.stop)
    }

    /// Drafts up to `count` tokens after `context` (a stop token ends the window early). The
    /// cache then holds `context` and every drafted token but those of the last step.
    pub fn rollout(&mut self, context: &[u32], count: usize, seed: u64) -> Result<DraftWindow> {
        let mut window = DraftWindow::default();
        let count = count.min(self.position_limit.saturating_sub(context.len()));
        if count == 0 {
            return Ok(window);
        }
        let step = self.advance_to(context)?;
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
    fn propose(
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
            let (token, choice) = self.choose(logits, seed, window.len());
            window.tokens.push(token);
            window.choices.push(choice);
            if window.len() >= count || self.is_stop(token) {
                return true;
            }
        }
        false
    }

    /// Continues `window` from `step` (the logits after its last fed token) to `count`.
    fn extend(
        &mut self,
        window: &mut DraftWindow,
        mut step: StepLogits,
        count: usize,
        seed: u64,
    ) -> Result<()> {
        let start = window.len();
        loop {
            let before = window.len();
            let finished = self.propose(window, &step, count, seed);
            self.counters.steps += 1;
            if finished {
                break;
            }
            let fresh = window.tokens[before..].to_vec();
            let (kept, next) = self.feed_chain(&fresh, true)?;
            window.truncate(before + kept);
            step = next;
        }
        self.counters.tokens += window.len() - start;
        Ok(())
    }

    /// Drafts the branches of `tree.plan` (most likely first), `branches_per_pass` at a time;
    /// with `stop` (anytime drafting) it ends between passes once the flag is raised.
    pub fn build_tree(
        &mut self,
        tree: &TreeRequest,
        branches_per_pass: usize,
        stop: Option<&AtomicBool>,
    ) -> Result<Vec<Branch>> {
        self.intervals.clear();
        // The linear tail the cache lacks (usually the window's last token) rides along with
        // the first tree pass instead of costing a forward of its own.
        let common = self.cached_prefix(&tree.context);
        self.truncate(common)?;
        let mut tail: Vec<u32> = tree.context[common..].to_vec();
        let mut branches: Vec<Branch> = Vec::with_capacity(tree.plan.len());
        let stopped = || stop.is_some_and(|s| s.load(Ordering::Acquire));
        for wave in tree.plan.chunks(branches_per_pass.max(1)) {
            if stopped() {
                break;
            }
            let first = branches.len();
            self.plant(&mut branches, wave, tree);
            loop {
                let active: Vec<usize> = (first..branches.len())
                    .filter(|&i| !self.is_complete(&branches[i], tree))
                    .collect();
                if active.is_empty() || stopped() {
                    break;
                }
                let pass = self.tree_pass(&tail, &branches, &active, tree)?;
                self.plant_bonus_branch(&pass, &mut branches, tree);
                self.cached.append(&mut tail);
                self.advance(&pass, &mut branches, &active, tree);
            }
        }
        self.counters.tokens += branches
            .iter()
            .filter(|b| !b.looked_up)
            .map(|b| b.window.len())
            .sum::<usize>();
        Ok(branches)
    }

    /// Adds the branches of `wave` whose first token still fits below the position limit;
    /// with lookup on, a branch whose continuation is found in the text is complete at once.
    fn plant(&self, branches: &mut Vec<Branch>, wave: &[BranchPlan], tree: &TreeRequest) {
        for plan in wave {
            if tree.window_start + plan.row + 2 >= self.position_limit {
                continue;
            }
            let mut branch = Branch::new(*plan, tree.step_seed);
            if let Some(lookup) = &self.lookup {
                let mut context = tree.context[..tree.window_start + plan.row + 1].to_vec();
                context.push(plan.token);
                let count = branch.capacity(tree, self.position_limit);
                branch.window = lookup.window(&context, count, &self.stop);
                branch.looked_up = !branch.window.is_empty();
            }
            branches.push(branch);
        }
    }

    /// One tree-masked forward: the linear `tail`, then every active branch's unfed tokens
    /// (the root first, then what its last step proposed: one token, or one per lookahead
    /// row too). Each branch row sees the committed prefix up to its root's row, its own
    /// earlier nodes and itself.
    fn tree_pass(
        &mut self,
        tail: &[u32],
        branches: &[Branch],
        active: &[usize],
        tree: &TreeRequest,
    ) -> Result<TreePass> {
        let base = self.cache()?.len();
        let TreeRows { rows, tokens, fed } = tree_rows(base, tail, branches, active, tree);
        // Logit (and lookahead) rows: the tail's last (the bonus guess), then each branch's
        // last fed row, or all of its fed rows when lookahead tokens are checked.
        let check = self.self_verifying();
        let mut wanted: Vec<usize> = Vec::new();
        if !tail.is_empty() {
            wanted.push(tail.len() - 1);
        }
        let mut anchors: Vec<usize> = Vec::new();
        for (first, unfed) in &fed {
            let from = if check {
                *first
            } else {
                first + unfed.len() - 1
            };
            anchors.extend(from..first + unfed.len());
        }
        wanted.extend(&anchors);
        let deepest = rows.iter().map(|r| r.position).max().unwrap_or(0);
        let lookahead_rows = if self.lookahead_tokens() > 0 && self.lookahead_fits(deepest) {
            anchors
        } else {
            Vec::new()
        };
        let input = AttentionInput::from_rows(&rows, base + rows.len(), self.model.device())?;
        let out = self.timed(tokens.len(), |m, c| {
            m.forward_with_lookahead(&tokens, &input, c, &wanted, &lookahead_rows)
        })?;
        let lookahead = if lookahead_rows.is_empty() {
            Vec::new()
        } else {
            out.lookahead.to_vec3::<f32>()?
        };
        Ok(TreePass {
            base,
            tail: tail.len(),
            fed,
            wanted,
            main: out.main.to_vec2::<f32>()?,
            lookahead,
        })
    }

    /// The tail's last row is the draft's own prediction after `w_gamma`: its guess for the
    /// bonus token. Roots a branch there too (the draft continuing its own chain), unless the
    /// plan already has it; it is fed with the next pass.
    fn plant_bonus_branch(&self, pass: &TreePass, branches: &mut Vec<Branch>, tree: &TreeRequest) {
        if pass.tail == 0 || self.cached.len() + pass.tail != tree.context.len() {
            return;
        }
        let bonus_row = tree.context.len() - 1 - tree.window_start;
        let guess = sampling::argmax(&pass.main[0]);
        let planned = tree
            .plan
            .iter()
            .any(|p| p.row == bonus_row && p.token == guess);
        if !planned && tree.window_start + bonus_row + 2 < self.position_limit {
            let plan = BranchPlan {
                row: bonus_row,
                token: guess,
                priority: 1.0,
            };
            branches.push(Branch::new(plan, tree.step_seed));
        }
    }

    /// After a pass: each active branch keeps the fed tokens its main row agrees with (all of
    /// them without a check), records their cache rows, and proposes its next step.
    fn advance(
        &mut self,
        pass: &TreePass,
        branches: &mut [Branch],
        active: &[usize],
        tree: &TreeRequest,
    ) {
        let check = self.self_verifying();
        let row_of = |r: usize| pass.wanted.iter().position(|&w| w == r);
        for (&i, (first, unfed)) in active.iter().zip(&pass.fed) {
            // Rows of this branch's fed tokens among the wanted ones.
            let own: Vec<usize> = (0..unfed.len()).filter_map(|k| row_of(first + k)).collect();
            let kept = if check {
                let own_main: Vec<Vec<f32>> = own.iter().map(|&w| pass.main[w].clone()).collect();
                agreed_prefix(unfed, &own_main)
            } else {
                unfed.len()
            };
            let anchor = own[if check { kept - 1 } else { 0 }];
            let step = StepLogits {
                main: pass.main[anchor].clone(),
                // Lookahead rows follow the wanted rows after the tail's.
                lookahead: pass
                    .lookahead
                    .get(anchor - usize::from(pass.tail > 0))
                    .cloned()
                    .unwrap_or_default(),
            };
            let count = branches[i].capacity(tree, self.position_limit);
            let b = &mut branches[i];
            b.nodes.extend((0..kept).map(|k| pass.base + first + k));
            if !b.nodes.is_empty() && b.nodes.len() - 1 < b.window.len() {
                // Lookahead tokens the main row disagreed with leave the window.
                b.window.truncate(b.nodes.len() - 1);
            }
            let mut window = std::mem::take(&mut b.window);
            self.propose(&mut window, &step, count, b.seed);
            self.counters.steps += 1;
            branches[i].window = window;
        }
    }

    /// The final rendezvous on the draft side: the target accepted `accepted` window tokens and
    /// emitted `token`. Keeps the matching branch (compacting its rows onto the committed
    /// prefix) and completes it, or drafts afresh. Returns the next window and its source.
    pub fn resolve(
        &mut self,
        tree: &TreeRequest,
        branches: &[Branch],
        accepted: usize,
        token: u32,
    ) -> Result<(DraftWindow, Resolution, Source)> {
        let keep = tree.window_start + accepted + 1;
        let mut committed = tree.context[..keep].to_vec();
        committed.push(token);
        let found = branches
            .iter()
            .find(|b| b.plan.row == accepted && b.plan.token == token && !b.window.is_empty());
        let seed = branch_seed(tree.step_seed, accepted, token);
        let Some(branch) = found else {
            self.truncate(keep)?;
            let (window, source) = self.window(&committed, tree.gamma, seed)?;
            return Ok((window, Resolution::Miss, source));
        };
        if branch.looked_up {
            // Nothing of it is cached: the next tree feeds it with its linear tail.
            self.truncate(keep)?;
            return Ok((branch.window.clone(), Resolution::Hit, Source::Lookup));
        }
        self.cache()?.compact(keep, &branch.nodes)?;
        self.cached.truncate(keep);
        self.cached.push(token);
        let drafted = &branch.window.tokens;
        self.cached
            .extend_from_slice(&drafted[..branch.nodes.len() - 1]);
        let mut window = branch.window.clone();
        if self.is_complete(branch, tree) {
            window.truncate(tree.gamma);
            return Ok((window, Resolution::Hit, Source::Model));
        }
        // The branch's last step is not fed yet: feed it (checking lookahead tokens), then go on.
        let fed = branch.nodes.len() - 1;
        let (kept, step) = self.feed_chain(&drafted[fed..], true)?;
        window.truncate(fed + kept);
        let count = branch.capacity(tree, self.position_limit);
        self.extend(&mut window, step, count, branch.seed)?;
        Ok((window, Resolution::Partial, Source::Model))
    }

    /// Draft compute that overlapped `[from, until]` (the target's suffix).
    pub fn hidden_time(&self, until: Instant) -> Duration {
        self.intervals
            .iter()
            .map(|&(s, e)| e.min(until).saturating_duration_since(s))
            .sum()
    }
}

/// The input rows of one tree pass.
struct TreeRows {
    /// What each row may see.
    rows: Vec<RowVisibility>,
    /// The token fed at each row.
    tokens: Vec<u32>,
    /// Per active branch: its first fed row (counted from the pass's base) and its fed tokens.
    fed: Vec<(usize, Vec<u32>)>,
}

/// The rows of one tree pass at cache length `base`: the linear `tail`, then each active
/// branch's unfed tokens.
fn tree_rows(
    base: usize,
    tail: &[u32],
    branches: &[Branch],
    active: &[usize],
    tree: &TreeRequest,
) -> TreeRows {
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
    let mut fed: Vec<(usize, Vec<u32>)> = Vec::with_capacity(active.len());
    for &i in active {
        let b = &branches[i];
        let unfed = if b.nodes.is_empty() {
            vec![b.plan.token]
        } else {
            b.window.tokens[b.nodes.len() - 1..].to_vec()
        };
        let prefix_len = tree.window_start + b.plan.row + 1;
        let first_row = base + rows.len();
        for (k, &t) in unfed.iter().enumerate() {
            let mut extra = b.nodes.clone();
            extra.extend(first_row..=first_row + k);
            rows.push(RowVisibility {
                position: prefix_len + b.nodes.len() + k,
                prefix_len,
                extra,
            });
            tokens.push(t);
        }
        fed.push((first_row - base, unfed));
    }
    TreeRows { rows, tokens, fed }
}
