//! Mirror's draft side: branch-complete hypothesis trees over the [`Drafter`], and their
//! resolution at the final rendezvous.
//!
//! A tree is drafted after the linear context (`...committed, c, w_1..w_gamma`, with `c` at
//! `window_start`): for each planned branch `(row, token)`, the window the draft would propose
//! if the target accepted `w_1..w_row` and then emitted `token`. Branches are advanced
//! together, `branches_per_pass` at a time, in tree-masked draft passes; each branch draws
//! from its own seeded random sequence, so a branch is the same window a fresh rollout of its
//! outcome would be.

use mirror_core::sampling;
use mirror_core::{AttentionInput, RowVisibility};

use super::plan::BranchPlan;
use crate::draft::{agreed_prefix, Drafter, StepLogits};
use crate::error::Result;
use crate::generation::StopSet;
use crate::seed::branch_seed;
use crate::stats::Reuse;
use crate::window::{DraftWindow, Source};

/// A branch of the hypothesis tree as drafted so far.
#[derive(Debug, Clone)]
pub struct Branch {
    /// Where it hangs and what it anticipates.
    pub plan: BranchPlan,
    /// Cache rows of the fed nodes: the root, then each drafted token but the last.
    pub nodes: Vec<usize>,
    /// Drafted tokens.
    pub window: DraftWindow,
    /// Its own random sequence (sampling drafts).
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

/// One hypothesis tree to draft after a linear context whose window starts (with the token
/// before it) at `window_start`: the branches of `plan`, each up to `gamma` tokens.
#[derive(Debug, Clone)]
pub struct TreeRequest {
    /// Index of `c`, the committed token before the window, in the context.
    pub window_start: usize,
    /// Branches to draft, most likely first.
    pub plan: Vec<BranchPlan>,
    /// Tokens per branch.
    pub gamma: usize,
    /// Seed the branches' own seeds derive from.
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

/// The input rows of one tree pass.
struct PassRows {
    /// What each row may see.
    rows: Vec<RowVisibility>,
    /// The token fed at each row.
    tokens: Vec<u32>,
    /// Per active branch: its first fed row (counted from the pass's base) and its fed tokens.
    fed: Vec<(usize, Vec<u32>)>,
}

impl Drafter {
    /// Whether `branch` of `tree` is drafted (see [`Branch::is_complete`]).
    pub fn is_complete(&self, branch: &Branch, tree: &TreeRequest) -> bool {
        branch.is_complete(tree, self.position_limit, &self.stop)
    }

    /// Drafts the branches of `tree.plan` (most likely first) after `context`,
    /// `branches_per_pass` at a time; with `until` (anytime drafting) it ends between passes
    /// once `until` says so.
    pub fn build_tree(
        &mut self,
        context: &[u32],
        tree: &TreeRequest,
        branches_per_pass: usize,
        until: Option<&dyn Fn() -> bool>,
    ) -> Result<Vec<Branch>> {
        self.model.clear_intervals();
        // The linear tail the cache lacks (usually the window's last token) rides along with
        // the first tree pass instead of costing a forward of its own.
        let common = self.model.cached_prefix(context);
        self.model.truncate(common)?;
        let mut tail: Vec<u32> = context[common..].to_vec();
        let mut branches: Vec<Branch> = Vec::with_capacity(tree.plan.len());
        let done = || until.is_some_and(|until| until());
        for wave in tree.plan.chunks(branches_per_pass.max(1)) {
            if done() {
                break;
            }
            let first = branches.len();
            self.plant(&mut branches, wave, context, tree);
            loop {
                let active: Vec<usize> = (first..branches.len())
                    .filter(|&i| !self.is_complete(&branches[i], tree))
                    .collect();
                if active.is_empty() || done() {
                    break;
                }
                let pass = self.tree_pass(&tail, &branches, &active, tree)?;
                self.plant_bonus_branch(&pass, &mut branches, context, tree);
                self.model.note_cached(&tail);
                tail.clear();
                self.advance(&pass, &mut branches, &active, tree);
            }
        }
        let drafted = branches
            .iter()
            .filter(|b| !b.looked_up)
            .map(|b| b.window.len())
            .sum::<usize>();
        self.model.count_steps(0, drafted);
        Ok(branches)
    }

    /// Adds the branches of `wave` whose first token still fits below the position limit;
    /// with lookup on, a branch whose continuation is found in the text is complete at once.
    fn plant(
        &self,
        branches: &mut Vec<Branch>,
        wave: &[BranchPlan],
        context: &[u32],
        tree: &TreeRequest,
    ) {
        for plan in wave {
            if tree.window_start + plan.row + 2 >= self.position_limit {
                continue;
            }
            let mut branch = Branch::new(*plan, tree.step_seed);
            if let Some(lookup) = &self.lookup {
                let mut outcome = context[..tree.window_start + plan.row + 1].to_vec();
                outcome.push(plan.token);
                let count = branch.capacity(tree, self.position_limit);
                branch.window = lookup.window(&outcome, count, &self.stop);
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
        let base = self.model.cache()?.len();
        let PassRows { rows, tokens, fed } = pass_rows(base, tail, branches, active, tree);
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
        let lookahead_rows =
            if self.model.lookahead_tokens() > 0 && self.model.lookahead_fits(deepest) {
                anchors
            } else {
                Vec::new()
            };
        let device = self.model.model.device().clone();
        let input = AttentionInput::from_rows(&rows, base + rows.len(), &device)?;
        let out = self.model.forward(tokens.len(), |m, c| {
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
    fn plant_bonus_branch(
        &self,
        pass: &TreePass,
        branches: &mut Vec<Branch>,
        context: &[u32],
        tree: &TreeRequest,
    ) {
        if pass.tail == 0 || self.model.cached().len() + pass.tail != context.len() {
            return;
        }
        let bonus_row = context.len() - 1 - tree.window_start;
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
            self.model.count_steps(1, 0);
            branches[i].window = window;
        }
    }

    /// The final rendezvous on the draft side: after `context` (the tree's), the target accepted
    /// `accepted` window tokens and emitted `token`. Keeps the matching branch (compacting its
    /// rows onto the committed prefix) and completes it, or drafts afresh. Returns the next
    /// window, how it was obtained and where its tokens came from.
    pub fn resolve(
        &mut self,
        context: &[u32],
        tree: &TreeRequest,
        branches: &[Branch],
        accepted: usize,
        token: u32,
    ) -> Result<(DraftWindow, Reuse, Source)> {
        let keep = tree.window_start + accepted + 1;
        let mut committed = context[..keep].to_vec();
        committed.push(token);
        let found = branches
            .iter()
            .find(|b| b.plan.row == accepted && b.plan.token == token && !b.window.is_empty());
        let seed = branch_seed(tree.step_seed, accepted, token);
        let Some(branch) = found else {
            self.model.truncate(keep)?;
            let (window, source) = self.window(&committed, tree.gamma, seed)?;
            return Ok((window, Reuse::Miss, source));
        };
        if branch.looked_up {
            // Nothing of it is cached: the next tree feeds it with its linear tail.
            self.model.truncate(keep)?;
            return Ok((branch.window.clone(), Reuse::Hit, Source::Lookup));
        }
        let drafted = &branch.window.tokens;
        let fed = branch.nodes.len() - 1;
        let mut path = vec![token];
        path.extend_from_slice(&drafted[..fed]);
        self.model.compact(keep, &branch.nodes, &path)?;
        let mut window = branch.window.clone();
        if self.is_complete(branch, tree) {
            window.truncate(tree.gamma);
            return Ok((window, Reuse::Hit, Source::Model));
        }
        // The branch's last step is not fed yet: feed it (checking lookahead tokens), then go on.
        let (kept, step) = self
            .model
            .feed_chain(&drafted[fed..], self.self_verifying())?;
        window.truncate(fed + kept);
        let count = branch.capacity(tree, self.position_limit);
        self.extend(&mut window, step, count, branch.seed)?;
        Ok((window, Reuse::Partial, Source::Model))
    }
}

/// The rows of one tree pass at cache length `base`: the linear `tail`, then each active
/// branch's unfed tokens.
fn pass_rows(
    base: usize,
    tail: &[u32],
    branches: &[Branch],
    active: &[usize],
    tree: &TreeRequest,
) -> PassRows {
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
    PassRows { rows, tokens, fed }
}
