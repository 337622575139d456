//! The draft side: autoregressive rollouts and branch-complete hypothesis trees, over a draft
//! model and its own KV cache. Used in-thread by vanilla SD and on its worker thread by Mirror-SD.
//!
//! A draft with speculative streams ([`Model::with_streams`]) proposes its main-stream token and
//! one token per stream in each step. With a greedy draft, the next step also checks the stream
//! tokens against the main stream (every fed row's main logits come with the pass) and replaces
//! the first one it disagrees with, as Speculative Streaming does; streams anchored at every fed
//! row make the step after a disagreement propose a full set again. A sampling draft keeps its
//! stream tokens as sampled from their own distributions (the distribution each token was drawn
//! from is what the target's verification divides by, so output stays exact).

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

/// What one draft step leaves a chain: the main distribution after its newest fed token and the
/// streams' distributions anchored there (empty without streams).
#[derive(Debug, Clone, Default)]
struct StepLogits {
    main: Vec<f32>,
    streams: Vec<Vec<f32>>,
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
}

/// How many of `fed` (a chain's newest tokens, the first already trusted) the main stream
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
pub struct DraftState {
    pub model: Arc<Model>,
    cache: Option<KvCache>,
    /// Tokens whose keys/values occupy the cache's first rows (the linear sequence).
    cached: Vec<u32>,
    pub params: SamplingParams,
    pub stop_ids: Vec<u32>,
    /// Drafted tokens stay below this position: past it the target could not verify them.
    position_limit: usize,
    /// Work since the last `take_counters`.
    counters: DraftCounters,
    /// Busy intervals of the current tree, for the hidden-time split.
    pub intervals: Vec<(Instant, Instant)>,
    /// Fault injection for tests: after this many forwards, fail once (panic or error).
    pub fault: Option<(usize, bool)>,
    /// A stream token is proposed only while its stream's top probability reaches this (0:
    /// always); a step then ends early rather than propose a likely miss.
    pub stream_confidence: f32,
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
            counters: DraftCounters::default(),
            intervals: Vec::new(),
            fault: None,
            stream_confidence: 0.0,
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

    pub fn take_counters(&mut self) -> DraftCounters {
        std::mem::take(&mut self.counters)
    }

    /// Streams of the draft (0: one token per step).
    fn num_streams(&self) -> usize {
        self.model
            .streams()
            .map_or(0, |head| head.config().num_streams)
    }

    /// Whether streams anchored at positions up to `last_anchor` stay inside the draft's context
    /// (near the end a step proposes its main token only).
    fn streams_fit(&self, last_anchor: usize) -> bool {
        last_anchor + self.num_streams() < self.model.context_limit()
    }

    /// Whether a step checks the previous step's stream tokens against the main stream.
    fn self_verifying(&self) -> bool {
        self.num_streams() > 0 && self.params.is_greedy()
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
        self.counters.forwards += 1;
        self.total_forwards += 1;
        self.counters.busy += end - start;
        self.intervals.push((start, end));
        Ok(out)
    }

    /// Feeds `tokens` causally after the cache, returning the last row's logits.
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let logits = self.timed(|m, c| m.next_token_logits(tokens, c))?;
        self.cached.extend_from_slice(tokens);
        Ok(logits)
    }

    /// Feeds a chain's newest `tokens` causally after the cache. With `check` (and a
    /// self-verifying draft), tokens after the first stand only while the main stream agrees;
    /// the rest leave the cache again. Returns how many stood and the step's logits after the
    /// last of them.
    fn feed_chain(&mut self, tokens: &[u32], check: bool) -> Result<(usize, StepLogits)> {
        if tokens.is_empty() {
            return Err(Error::Core(mirror_core::Error::InvalidArgument(
                "a draft step needs at least one token to feed".into(),
            )));
        }
        if self.num_streams() == 0 {
            return Ok((
                tokens.len(),
                StepLogits {
                    main: self.feed(tokens)?,
                    streams: Vec::new(),
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
        let stream_rows = if self.streams_fit(base + tokens.len() - 1) {
            rows.clone()
        } else {
            Vec::new()
        };
        let out =
            self.timed(|m, c| m.forward_with_streams(tokens, &input, c, &rows, &stream_rows))?;
        let main = out.main.to_vec2::<f32>()?;
        let mut streams = if stream_rows.is_empty() {
            vec![Vec::new(); rows.len()]
        } else {
            out.streams.to_vec3::<f32>()?
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
                streams: std::mem::take(&mut streams[anchor]),
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
        self.stop_ids.contains(&token)
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

    /// Appends one step's proposals to `window`: the main token, then one per stream while the
    /// streams are confident enough, up to `count` tokens or a stop token. Returns whether the
    /// window is finished. (Where a step stops depends on the draft's own logits only, so the
    /// verification stays exact.)
    fn propose(
        &self,
        window: &mut DraftWindow,
        step: &StepLogits,
        count: usize,
        seed: u64,
    ) -> bool {
        for (j, logits) in std::iter::once(&step.main).chain(&step.streams).enumerate() {
            if j > 0 && sampling::max_probability(logits) < self.stream_confidence {
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
                // Every active branch feeds its unfed tokens: the root first, then what its last
                // step proposed (one token, or one per stream too).
                let mut fed: Vec<(usize, Vec<u32>)> = Vec::with_capacity(active.len());
                for &i in &active {
                    let b = &branches[i];
                    let unfed = if b.nodes.is_empty() {
                        vec![b.plan.token]
                    } else {
                        b.window.tokens[b.nodes.len() - 1..].to_vec()
                    };
                    let prefix_len = window_start + b.plan.row + 1;
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
                // Logit (and stream) rows: the tail's last (the bonus guess), then each branch's
                // last fed row, or all of its fed rows when stream tokens are checked.
                let check = self.self_verifying();
                let skip = tail.len();
                let mut wanted: Vec<usize> = Vec::new();
                if skip > 0 {
                    wanted.push(skip - 1);
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
                let stream_rows = if self.num_streams() > 0 && self.streams_fit(deepest) {
                    anchors.clone()
                } else {
                    Vec::new()
                };
                let input = AttentionInput::from_rows(&rows, base + rows.len(), &device)?;
                let out = self.timed(|m, c| {
                    m.forward_with_streams(&tokens, &input, c, &wanted, &stream_rows)
                })?;
                let main = out.main.to_vec2::<f32>()?;
                let mut streams = if stream_rows.is_empty() {
                    Vec::new()
                } else {
                    out.streams.to_vec3::<f32>()?
                };
                let row_of = |r: usize| wanted.iter().position(|&w| w == r);
                // The tail's last row is the draft's own prediction after w_gamma: its guess for
                // the bonus token. Root a branch there too (the draft continuing its own chain),
                // unless the plan already has it; it is fed with the next pass.
                if skip > 0 && self.cached.len() + skip == context.len() {
                    let bonus_row = context.len() - 1 - window_start;
                    let guess = sampling::argmax(&main[0]);
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
                for (&i, (first, unfed)) in active.iter().zip(&fed) {
                    // Rows of this branch's fed tokens among the wanted ones.
                    let own: Vec<usize> =
                        (0..unfed.len()).filter_map(|k| row_of(first + k)).collect();
                    let kept = if check {
                        let own_main: Vec<Vec<f32>> =
                            own.iter().map(|&w| main[w].clone()).collect();
                        agreed_prefix(unfed, &own_main)
                    } else {
                        unfed.len()
                    };
                    let anchor = own[if check { kept - 1 } else { 0 }];
                    let step = StepLogits {
                        main: main[anchor].clone(),
                        streams: if streams.is_empty() {
                            Vec::new()
                        } else {
                            // Stream rows follow the wanted rows after the tail's.
                            std::mem::take(&mut streams[anchor - usize::from(skip > 0)])
                        },
                    };
                    let b = &mut branches[i];
                    let room = self.position_limit - (window_start + b.plan.row + 2);
                    let count = gamma.min(room);
                    b.nodes.extend((0..kept).map(|k| base + first + k));
                    if !b.nodes.is_empty() && b.nodes.len() - 1 < b.window.len() {
                        // Stream tokens the main stream disagreed with leave the window.
                        b.window.truncate(b.nodes.len() - 1);
                    }
                    let mut window = std::mem::take(&mut b.window);
                    self.propose(&mut window, &step, count, b.seed);
                    self.counters.steps += 1;
                    branches[i].window = window;
                }
            }
        }
        self.counters.tokens += branches.iter().map(|b| b.window.len()).sum::<usize>();
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
        // The branch's last step is not fed yet: feed it (checking stream tokens), then go on.
        let fed = branch.nodes.len() - 1;
        let (kept, step) = self.feed_chain(&drafted[fed..], true)?;
        window.truncate(fed + kept);
        self.extend(&mut window, step, gamma.min(room), branch.seed)?;
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
