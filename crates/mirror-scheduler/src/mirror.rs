//! Mirror speculative decoding (Bhendawade et al., "Mirror Speculative Decoding: Breaking the
//! Serial Barrier in LLM Inference", arXiv 2510.13161).
//!
//! The target runs layers `[0, l_e)` over the window, taps its own final norm and LM head there,
//! and sends the top-kappa tokens of every window row to the draft worker (its own thread, its own
//! device handle and KV cache). While the target runs `[l_e, N)`, the draft drafts the
//! hypothesis tree: for each row and candidate, the window it would propose next. At the final
//! rendezvous the corrected prefix is looked up in the tree: a hit makes a drafted branch the next
//! window at no exposed cost, a miss rolls out afresh. Only host data (token ids, log-probs)
//! crosses between the two devices.
//!
//! Beyond the paper, *anytime drafting* (the default) orders branches by the probability that
//! they are needed and stops drafting when the target's final distributions are ready; whatever
//! is drafted by then is reused, a partial branch is completed. [`DraftSchedule::FullGrid`] is the
//! paper's mode: every branch, then the rendezvous.

use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use mirror_core::sampling;
use mirror_core::{AttentionInput, KvCache, Model};
use rand::Rng;

use crate::config::{Generation, GenerationConfig, StreamControl};
use crate::draft::{DraftState, Resolution, TreeRequest};
use crate::error::{Error, Result};
use crate::host::host_rows;
use crate::pair::{check_pair, draft_option_setters, DraftOptions};
use crate::progress::Run;
use crate::seed::mix;
use crate::stats::timed;
use crate::tree::{overlap_mass, plan_branches, AcceptanceEstimate, BranchPlan};
use crate::verify::{verify_window, DraftWindow, Verdict};
use crate::window::{Offer, Source, WindowChooser};
use crate::worker::{DraftReport, DraftWorker, Request};
use crate::Decoder;

/// Where the target taps its early exit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EarlyExit {
    /// After this many layers.
    Layer(usize),
    /// After this fraction of the layers (0.5 is the paper's N/2).
    Fraction(f64),
}

impl EarlyExit {
    /// The layer index for a model of `layers` layers.
    pub fn resolve(self, layers: usize) -> Result<usize> {
        let layer = match self {
            EarlyExit::Layer(l) => l,
            EarlyExit::Fraction(f) if (0.0..=1.0).contains(&f) => {
                (f * layers as f64).round() as usize
            }
            EarlyExit::Fraction(f) => {
                return Err(Error::InvalidConfig(format!(
                    "early-exit fraction {f} is not in [0, 1]"
                )))
            }
        };
        if layer == 0 || layer >= layers {
            return Err(Error::InvalidConfig(format!(
                "early-exit layer {layer} must be in 1..{layers} (the target has {layers} layers)"
            )));
        }
        Ok(layer)
    }
}

/// How much of the hypothesis tree the draft computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DraftSchedule {
    /// Branches in order of need, `branches_per_pass` per draft forward, until the target's final
    /// distributions are ready (default).
    ///
    /// Greedy output is identical in every run. Under sampling, every branch draws from its own
    /// seeded random sequence, so a window is the same whether it was drafted in the tree or rolled out
    /// later; the logits of a tree pass and of a linear pass can still differ in the last bits,
    /// so a draw on a boundary may differ between runs that drafted different amounts. The output
    /// distribution is exact either way. Use [`DraftSchedule::FullGrid`] for bit-reproducible
    /// sampled runs.
    Anytime {
        /// Branches advanced together in one tree-masked draft pass.
        branches_per_pass: usize,
    },
    /// Every branch of the kappa x (gamma + 1) grid, all at once, before the final rendezvous
    /// (the paper's mode).
    FullGrid,
}

/// Builder of [`Mirror`].
pub struct MirrorBuilder {
    target: Arc<Model>,
    draft: Arc<Model>,
    options: DraftOptions,
    kappa: usize,
    early_exit: EarlyExit,
    schedule: DraftSchedule,
    draft_threads: Option<usize>,
    fault: Option<(usize, bool)>,
}

impl MirrorBuilder {
    draft_option_setters!();

    /// Early-exit candidates per row kappa (default 4; the paper uses 8).
    pub fn kappa(mut self, kappa: usize) -> Self {
        self.kappa = kappa;
        self
    }

    /// Where the target taps its early exit (default N/2).
    pub fn early_exit(mut self, early_exit: EarlyExit) -> Self {
        self.early_exit = early_exit;
        self
    }

    /// Anytime (default) or full-grid drafting.
    pub fn schedule(mut self, schedule: DraftSchedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// Runs the draft on a pool of its own of `threads` threads (CPU; the draft model is
    /// cloned with its weights shared, see [`Model::with_threads`]), so the two models do not
    /// compete for one pool. A draft loaded with its own pool or cores needs none.
    pub fn draft_threads(mut self, threads: usize) -> Self {
        self.draft_threads = Some(threads);
        self
    }

    /// Fault injection for tests: the draft worker fails once after `forwards` forward passes,
    /// by panicking or by returning an error.
    #[doc(hidden)]
    pub fn inject_draft_fault(mut self, forwards: usize, panic: bool) -> Self {
        self.fault = Some((forwards, panic));
        self
    }

    /// Checks the configuration, spawns the draft worker and builds the decoder.
    pub fn build(mut self) -> Result<Mirror> {
        self.options.check()?;
        if self.kappa == 0 {
            return Err(Error::InvalidConfig("kappa must be at least 1".into()));
        }
        if let DraftSchedule::Anytime {
            branches_per_pass: 0,
        } = self.schedule
        {
            return Err(Error::InvalidConfig(
                "branches_per_pass must be at least 1".into(),
            ));
        }
        check_pair(&self.target, &self.draft)?;
        if let Some(threads) = self.draft_threads {
            self.draft = Arc::new(Model::clone(&self.draft).with_threads(threads)?);
        }
        let early_exit_layer = self.early_exit.resolve(self.target.num_layers())?;
        let mut state = DraftState::new(Arc::clone(&self.draft));
        state.fault = self.fault;
        state.lookahead_confidence = self.options.lookahead_confidence;
        state.lookup = self.options.lookup;
        let draft_lookahead = self
            .draft
            .lookahead()
            .map_or(0, |head| head.config().tokens);
        Ok(Mirror {
            worker: DraftWorker::spawn(state, self.schedule)?,
            side: TargetSide {
                target: self.target,
                options: self.options,
                kappa: self.kappa,
                early_exit_layer,
                schedule: self.schedule,
                draft_lookahead,
            },
        })
    }
}

/// Mirror speculative decoding: target and draft in parallel, with a hypothesis tree.
pub struct Mirror {
    side: TargetSide,
    worker: DraftWorker,
}

/// The target's half of Mirror, and the settings of a run.
struct TargetSide {
    target: Arc<Model>,
    options: DraftOptions,
    kappa: usize,
    early_exit_layer: usize,
    schedule: DraftSchedule,
    /// Lookahead tokens of the draft (a step feeds up to `1 + draft_lookahead` rows a branch).
    draft_lookahead: usize,
}

/// The target's prefix `[0, l_e)` over a window, and what its early-exit tap says.
struct Tapped {
    /// Cache rows before the window.
    base: usize,
    input: AttentionInput,
    /// States after layer `l_e`.
    hidden: Tensor,
    /// Early-exit top-kappa of every window row.
    top_k: Vec<Vec<(u32, f32)>>,
    /// Branches to draft, most likely first.
    plan: Vec<BranchPlan>,
}

impl Mirror {
    /// A builder for `target` with `draft` on the worker thread.
    pub fn builder(target: Arc<Model>, draft: Arc<Model>) -> MirrorBuilder {
        MirrorBuilder {
            target,
            draft,
            options: DraftOptions::default(),
            kappa: 4,
            early_exit: EarlyExit::Fraction(0.5),
            schedule: DraftSchedule::Anytime {
                branches_per_pass: 4,
            },
            draft_threads: None,
            fault: None,
        }
    }

    /// The early-exit layer l_e.
    pub fn early_exit_layer(&self) -> usize {
        self.side.early_exit_layer
    }

    /// The drafting schedule.
    pub fn schedule(&self) -> DraftSchedule {
        self.side.schedule
    }
}

impl TargetSide {
    /// Rows of the draft's cache a tree may take beyond the sequence: planned branches plus
    /// the bonus guess, each fed at most gamma times; a step of a draft with lookahead feeds
    /// up to `1 + lookahead` rows (lookahead tokens the main row rejects keep their rows until
    /// the tree is resolved).
    fn tree_rows(&self) -> usize {
        let gamma = self.options.gamma;
        let branches = self.kappa * (gamma + 1) + 1;
        branches * gamma * (1 + self.draft_lookahead) + gamma + 2
    }

    /// Prefix and tap: the target runs its first `l_e` layers over the window, applies its
    /// final norm and LM head there, and plans the branches from the top-kappa of every row.
    fn prefix_and_tap(
        &self,
        cache: &mut KvCache,
        seq: &[u32],
        window: &DraftWindow,
        acceptance: &AcceptanceEstimate,
    ) -> Result<Tapped> {
        let base = cache.len();
        let mut fed = vec![seq[seq.len() - 1]];
        fed.extend_from_slice(&window.tokens);
        let input = AttentionInput::causal(1, fed.len(), base, self.target.device())?;
        let hidden = self.target.embed(&[&fed])?;
        let hidden =
            self.target
                .forward_layers(&hidden, 0..self.early_exit_layer, &input, cache)?;
        let top_k: Vec<Vec<(u32, f32)>> = host_rows(&self.target.logits(&hidden)?)?
            .iter()
            .map(|row| sampling::top_k_log_probs(row, self.kappa))
            .collect();
        let plan = plan_branches(&top_k, &window.tokens, acceptance);
        Ok(Tapped {
            base,
            input,
            hidden,
            top_k,
            plan,
        })
    }

    /// Suffix: the target's layers `[l_e, N)` and its final distributions, while the draft
    /// drafts the tree.
    fn suffix(&self, cache: &mut KvCache, tapped: &Tapped) -> Result<Vec<Vec<f32>>> {
        let layers = self.early_exit_layer..self.target.num_layers();
        let hidden = self
            .target
            .forward_layers(&tapped.hidden, layers, &tapped.input, cache)?;
        host_rows(&self.target.logits(&hidden)?)
    }
}

/// The target's verdict on the window, and the overlap mass Omega of its distribution at the
/// deciding row on the early-exit candidates there.
fn verify(
    config: &GenerationConfig,
    rows: &[Vec<f32>],
    window: &DraftWindow,
    tapped: &Tapped,
    rng: &mut rand::rngs::StdRng,
) -> Result<(Verdict, f64)> {
    let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
    let verdict = verify_window(&refs, window, &config.sampling, &mut || rng.random())?;
    let final_probs: Vec<f32> = sampling::log_softmax(&rows[verdict.accepted])
        .into_iter()
        .map(f32::exp)
        .collect();
    let omega = overlap_mass(&final_probs, &tapped.top_k[verdict.accepted]);
    Ok((verdict, omega))
}

impl Decoder for Mirror {
    fn name(&self) -> &'static str {
        "mirror"
    }

    fn target(&self) -> &Arc<Model> {
        &self.side.target
    }

    fn generate_with(
        &mut self,
        prompt: &[u32],
        config: &GenerationConfig,
        on_tokens: &mut dyn FnMut(&[u32]) -> StreamControl,
    ) -> Result<Generation> {
        let (side, worker) = (&self.side, &mut self.worker);
        let gamma = side.options.gamma;
        let mut run = Run::begin(
            &side.target,
            prompt,
            config,
            gamma,
            mix(config.seed, 1),
            on_tokens,
        )?;
        let mut acceptance = AcceptanceEstimate::new(gamma);
        // The draft's work runs beside the target: a window's tokens cost nothing more.
        let mut chooser = WindowChooser::new(side.options.window, 0.0);
        let (mut window, mut source) = start(side, worker, &mut run, config)?;
        let mut step = 0u64;
        while !run.progress.done() && run.has_room() {
            let step_started = Instant::now();
            trim_window(&mut window, source, &mut chooser, &mut run);

            let tapped = timed(&mut run.stats.time.target_prefix, || {
                side.prefix_and_tap(&mut run.cache, &run.seq, &window, &acceptance)
            })?;
            run.stats.branches_planned += tapped.plan.len();

            // First rendezvous: the candidates go to the draft, which drafts the tree...
            let mut context = run.seq.clone();
            context.extend_from_slice(&window.tokens);
            let request = TreeRequest {
                context,
                window_start: run.seq.len() - 1,
                plan: tapped.plan.clone(),
                gamma,
                step_seed: mix(config.seed, step),
            };
            let tree = timed(&mut run.stats.time.wait_early_exit, || worker.tree(request))?;

            // ...while the target runs its suffix.
            let rows = timed(&mut run.stats.time.target_suffix, || {
                side.suffix(&mut run.cache, &tapped)
            })?;
            let target_done = Instant::now();
            tree.target_done();
            run.stats.target_passes += 1;

            // Verify and learn.
            let (verdict, omega) = timed(&mut run.stats.time.verify, || {
                verify(config, &rows, &window, &tapped, &mut run.rng)
            })?;
            run.stats.record_window(window.len(), verdict.accepted);
            run.stats.omega_sum += omega;
            acceptance.record(window.len(), verdict.accepted);
            chooser.record_verdict(source, window.len(), verdict.accepted);

            // Final rendezvous: the draft hands over the next window.
            let report = timed(&mut run.stats.time.wait_final, || {
                tree.resolve(verdict.accepted, verdict.token, target_done)
            })?;
            record_resolution(&mut run, &report);
            // A step's whole time, exposed draft waits included, against its window length.
            let drafted = (!window.is_empty()).then_some(source);
            chooser.record_step(drafted, window.len(), step_started.elapsed());
            run.commit(tapped.base, &window, verdict);
            source = report.source.unwrap_or(Source::Model);
            window = report.window;
            step += 1;
        }
        Ok(run.finish())
    }
}

/// Cuts the next window to the room left and to the length the chooser picks. The window is
/// drafted already (its cost is behind us, mostly hidden): what its length still decides is
/// the target's pass, and the tree planned from it.
fn trim_window(
    window: &mut DraftWindow,
    source: Source,
    chooser: &mut WindowChooser,
    run: &mut Run,
) {
    window.truncate(run.window_room());
    let offer = Offer {
        source,
        tokens: window.len(),
    };
    let length = chooser.choose(&[offer]).map_or(0, |(_, k)| k);
    window.truncate(length);
    if source == Source::Lookup && !window.is_empty() {
        run.stats.lookup_windows += 1;
    }
}

/// The start of a generation: the draft reset, both models prefilled at once (the draft on
/// its worker, the target here), and the first window drafted.
fn start(
    side: &TargetSide,
    worker: &mut DraftWorker,
    run: &mut Run,
    config: &GenerationConfig,
) -> Result<(DraftWindow, Source)> {
    let capacity = run.cache.capacity();
    worker.call(Request::Reset {
        capacity: capacity + side.tree_rows(),
        position_limit: capacity,
        params: side.options.sampling(config),
        stop: run.progress.stop().clone(),
    })?;
    let n = run.seq.len();
    if n > 1 {
        let prefix = run.seq[..n - 1].to_vec();
        let pending = worker.start(Request::Prefill {
            tokens: prefix.clone(),
        })?;
        side.target.next_token_logits(&prefix, &mut run.cache)?;
        pending.wait()?;
    }
    run.stats.time.prefill = run.started.elapsed();
    let first = worker.call(Request::Rollout {
        context: run.seq.clone(),
        count: side.options.gamma,
        seed: mix(config.seed, u64::MAX),
    })?;
    run.stats.record_draft(first.counters);
    run.stats.time.wait_final += first.counters.busy;
    Ok((first.window, first.source.unwrap_or(Source::Model)))
}

fn record_resolution(run: &mut Run, report: &DraftReport) {
    let stats = &mut run.stats;
    stats.record_draft(report.counters);
    stats.time.draft_hidden += report.hidden;
    stats.branches_completed += report.completed;
    match report.resolution {
        Some(Resolution::Hit) => stats.reuse_hits += 1,
        Some(Resolution::Partial) => stats.reuse_partial += 1,
        Some(Resolution::Miss) | None => stats.fallbacks += 1,
    }
}
