//! Mirror sequences in the batched engine ([`Speculation::Mirror`]).
//!
//! Each Mirror sequence has the single-sequence Mirror's draft worker ([`DraftWorker`]: the
//! draft model on a thread of its own, in a draft cache lent by the pool). A step goes:
//!
//! 1. before the schedule, every Mirror sequence in decode holds its next window: the one its
//!    worker resolved at the end of the last step (waited for here, so that the worker's
//!    fallback rollouts ran while the engine settled, retired and admitted), or, at the first
//!    step and after a resynchronisation, a fresh rollout;
//! 2. the step's one ragged target forward runs to the early-exit layer `l_e`; the tap (the
//!    target's final norm and LM head there) runs over the rows of every Mirror sequence at once,
//!    and each sequence's top-kappa candidates per row plan its tree ([`plan_branches`]), which
//!    goes to its worker; kappa is lowered as the step's Mirror sequences grow
//!    ([`MirrorSettings::kappa_at`]);
//! 3. the workers draft their trees (branch-complete rollouts) while the target runs its
//!    suffix layers `[l_e, N)` for every row;
//! 4. each sequence verifies its window as any window ([`crate::verify`]), and sends the
//!    verdict to its worker, which reuses the matching branch as the next window (or rolls one
//!    out on a miss).
//!
//! The target's rows are those of the one-pass forward (running the layers in two ranges
//! gives the same bits), so verification sees exactly the distributions a sequence alone
//! would: greedy output equals the target's alone, sampled output follows its distribution.

use std::sync::Arc;
use std::time::Instant;

use mirror_core::{Model, RaggedPass};

use crate::engine::pool::{KvPool, PooledCache};
use crate::error::{Error, Result};
use crate::generation::{GenerationConfig, StopSet};
use crate::seed::mix;
use crate::stats::Stats;
use crate::strategy::mirror::plan::{plan_branches, AcceptanceEstimate};
use crate::strategy::mirror::target::{candidates, omega, tree_cache_rows};
use crate::strategy::mirror::worker::{DraftWorker, Pending, PendingTree, Reset, Resolved};
use crate::strategy::mirror::{
    draft_on_its_pool, drafter_for, lookahead_tokens, record_resolution, MirrorSettings,
};
use crate::window::{DraftWindow, Verdict};

/// What the engine's Mirror sequences share: the draft model, the settings, the tap's layer.
pub(crate) struct MirrorShared {
    pub draft: Arc<Model>,
    pub settings: MirrorSettings,
    pub early_exit_layer: usize,
}

impl MirrorShared {
    /// The draft model (on a pool of its own when the settings ask for one) and the early-exit
    /// layer of `target`.
    pub fn new(target: &Model, draft: &Arc<Model>, settings: MirrorSettings) -> Result<Self> {
        settings.check()?;
        let draft = draft_on_its_pool(draft, &settings)?;
        Ok(Self {
            early_exit_layer: settings.early_exit.resolve(target.num_layers())?,
            draft,
            settings,
        })
    }

    /// Rows a Mirror sequence's draft cache takes beyond the target's `capacity`: the tree's.
    pub fn extra_rows(&self, gamma: usize) -> usize {
        tree_cache_rows(gamma, self.settings.kappa, lookahead_tokens(&self.draft))
    }
}

/// A tree the worker drafts this step, the early-exit candidates it was planned from, and the
/// number of branches planned.
struct TreeInFlight {
    tree: PendingTree,
    top_k: Vec<Vec<(u32, f32)>>,
    planned: usize,
}

/// A Mirror sequence's draft side.
pub(crate) struct MirrorSide {
    gamma: usize,
    /// The draft cache lent at admission, until the worker takes it.
    lent: Option<PooledCache>,
    /// Pool bytes of that cache, and its rows.
    bytes: u64,
    rows: usize,
    /// The draft's prefill, sent when the worker started.
    prefill: Option<Pending<()>>,
    /// The next window as the worker resolves it after the last verdict.
    resolving: Option<Pending<Resolved>>,
    /// The window for the next step.
    next: Option<DraftWindow>,
    /// This step's tree, while the worker drafts it.
    tree: Option<TreeInFlight>,
    /// The sequence's length as the worker will hold it once it resolved its tree.
    known: usize,
    /// Per-position acceptance, the tree planner's guide.
    acceptance: AcceptanceEstimate,
    /// A tree request that failed this step: the sequence fails at its settle.
    fault: Option<Error>,
    /// Last, so that it is dropped last: the worker's thread is joined when it drops, and a
    /// tree it drafts ends (abandoned) only once the tree's handle above has gone.
    worker: Option<DraftWorker>,
}

impl MirrorSide {
    /// The side of a sequence with windows of `gamma` tokens, drafting in `lent`.
    pub fn new(gamma: usize, lent: PooledCache) -> Self {
        Self {
            gamma,
            bytes: lent.bytes,
            rows: lent.cache.capacity(),
            lent: Some(lent),
            worker: None,
            prefill: None,
            resolving: None,
            next: None,
            tree: None,
            known: 0,
            acceptance: AcceptanceEstimate::new(gamma),
            fault: None,
        }
    }

    /// Returns the draft cache's bytes to the pool. The worker ends on a thread of its own
    /// (it may be finishing a rollout), so that the engine's step does not wait for it.
    pub fn release(mut self, pool: &mut KvPool) {
        match self.lent.take() {
            Some(lent) => pool.give_back(lent),
            None => pool.release(self.bytes),
        }
        if self.worker.is_some() {
            let ending = std::thread::Builder::new().name("mirror-draft-end".into());
            // Without a thread, the worker ends here.
            let _ = ending.spawn(move || drop(self));
        }
    }

    /// Takes the window for this step (empty before the first one is ready).
    pub fn take_window(&mut self) -> DraftWindow {
        self.next.take().unwrap_or_default()
    }

    /// Whether the side's worker runs (its sequence is tapped this step).
    pub fn is_running(&self) -> bool {
        self.worker.is_some() && self.fault.is_none()
    }

    /// Plans the tree from the tap's rows (`kappa` candidates each) and sends it to the worker,
    /// which drafts it while the target runs its suffix. A failure fails the sequence at its
    /// settle.
    fn send_tree(&mut self, rows: &[Vec<f32>], kappa: usize, window: &DraftWindow, seed: u64) {
        let top_k = candidates(rows, kappa);
        let plan = plan_branches(&top_k, &window.tokens, &self.acceptance);
        let Some(worker) = self.worker.as_mut() else {
            return;
        };
        let planned = plan.len();
        match worker.tree(&window.tokens, plan, seed) {
            Ok(tree) => {
                self.tree = Some(TreeInFlight {
                    tree,
                    top_k,
                    planned,
                })
            }
            Err(e) => self.fault = Some(e),
        }
    }

    /// After verification: learns from the verdict, counts Omega, and sends the verdict to the
    /// worker (the next window is waited for at the next step), unless the sequence is `done`
    /// (the tree is abandoned). `seq_len` is the sequence's length before this step's commit.
    pub fn settle(
        &mut self,
        rows: &[Vec<f32>],
        window: &DraftWindow,
        verdict: &Verdict,
        seq_len: usize,
        stats: &mut Stats,
        done: bool,
    ) -> Result<()> {
        if let Some(e) = self.fault.take() {
            return Err(e);
        }
        let Some(TreeInFlight {
            tree,
            top_k,
            planned,
        }) = self.tree.take()
        else {
            return Ok(());
        };
        stats.omega_sum += omega(rows, verdict, &top_k);
        stats.branches_planned += planned;
        self.acceptance.record(window.len(), verdict.accepted);
        if done {
            return Ok(());
        }
        self.resolving = Some(tree.send_verdict(*verdict)?);
        self.known = seq_len + verdict.committed(&window.tokens).len();
        Ok(())
    }
}

/// What [`MirrorSide::prepare`] reads of its sequence.
pub(crate) struct Context<'a> {
    /// Prompt and committed tokens.
    pub seq: &'a [u32],
    /// Whether the sequence is past its prefill.
    pub decoding: bool,
    pub config: &'a GenerationConfig,
    pub stop: &'a StopSet,
    /// The target cache's capacity: drafted tokens stay below it.
    pub position_limit: usize,
    pub stats: &'a mut Stats,
}

impl MirrorSide {
    /// Before the schedule: starts the worker if it has none yet (its draft prefill runs beside
    /// the target's), and, in decode, readies the window of the next step: the one the worker
    /// resolved after the last verdict, or a fresh rollout (at the first step, or after a commit
    /// the worker did not foresee, when it starts over from the sequence).
    pub fn prepare(&mut self, shared: &MirrorShared, context: Context<'_>) -> Result<()> {
        let params = shared.settings.speculative.sampling(context.config);
        let reset = |cache| Reset {
            capacity: self.rows,
            position_limit: context.position_limit,
            params,
            stop: context.stop.clone(),
            gamma: self.gamma,
            cache,
        };
        if self.worker.is_none() {
            let Some(lent) = self.lent.take() else {
                return Err(Error::InvalidConfig(
                    "a Mirror sequence has no draft cache".into(),
                ));
            };
            let drafter = drafter_for(Arc::clone(&shared.draft), &shared.settings);
            let mut worker = DraftWorker::spawn(drafter, shared.settings.schedule)?;
            worker.reset(reset(Some(lent.cache)))?;
            self.prefill = Some(worker.prefill(context.seq.to_vec())?);
            self.known = context.seq.len();
            self.worker = Some(worker);
        }
        if !context.decoding || self.next.is_some() {
            return Ok(());
        }
        let Some(worker) = self.worker.as_mut() else {
            return Ok(());
        };
        if let Some(prefill) = self.prefill.take() {
            prefill.wait()?;
        }
        if let Some(resolving) = self.resolving.take() {
            let resolved = resolving.wait()?;
            record_resolution(context.stats, &resolved);
            if self.known == context.seq.len() {
                self.next = Some(resolved.next.window);
                return Ok(());
            }
        }
        if self.known != context.seq.len() {
            // The commit was cut after the worker's verdict (by a grammar or a monitor): the
            // draft starts over from the sequence, in the same cache.
            worker.reset(reset(None))?;
            worker.prefill(context.seq.to_vec())?.wait()?;
            self.known = context.seq.len();
        }
        let first = worker.rollout(self.gamma, mix(context.config.seed, u64::MAX))?;
        context.stats.record_draft(first.counters);
        context.stats.time.wait_final += first.counters.busy;
        self.next = Some(first.window);
        Ok(())
    }
}

/// One Mirror sequence's share of a step's tap: its index in the ragged pass, its side, its
/// window and its tree's seed.
pub(crate) struct Tapped<'s> {
    pub index: usize,
    pub side: &'s mut MirrorSide,
    pub window: &'s DraftWindow,
    pub seed: u64,
}

/// Runs `pass` to the early-exit layer, taps the rows of every sequence of `tapped`, and sends
/// each its tree; the caller then finishes the pass (the suffix) while the workers draft.
pub(crate) fn tap_and_send(
    shared: &MirrorShared,
    pass: &mut RaggedPass<'_, '_, '_>,
    tapped: &mut [Tapped<'_>],
) -> Result<()> {
    if tapped.is_empty() {
        return Ok(());
    }
    pass.run_to(shared.early_exit_layer)?;
    let indices: Vec<usize> = tapped.iter().map(|t| t.index).collect();
    let rows = pass.tap(&indices)?;
    let kappa = shared.settings.kappa_at(tapped.len());
    for (one, rows) in tapped.iter_mut().zip(rows) {
        one.side.send_tree(&rows, kappa, one.window, one.seed);
    }
    Ok(())
}

/// The target's final distributions are ready: anytime drafting stops.
pub(crate) fn target_done(tapped: &[Tapped<'_>]) {
    let now = Instant::now();
    for one in tapped {
        if let Some(in_flight) = &one.side.tree {
            in_flight.tree.target_done(now);
        }
    }
}
