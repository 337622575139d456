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
//!
//! The folder, bottom-up: `settings` (data), [`plan`] (which branches, pure logic over host
//! data), `tree_draft` (the draft side's trees over [`crate::draft::Drafter`]), `worker` (the
//! draft's thread and its protocol), `target` (the target's prefix, tap and suffix), and this
//! file, the decoding loop over them. Nothing here is imported by the modules below
//! `crate::strategy`.

pub mod plan;
mod settings;
pub(crate) mod target;
mod tree_draft;
pub(crate) mod worker;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use mirror_core::{Model, Tokenizer};

use crate::adaptive::{Offer, WindowChooser};
use crate::constraint::LazyCompiler;
use crate::draft::{Drafter, InjectedFault};
use crate::error::Result;
use crate::generation::{FinishReason, Generation, GenerationConfig, StreamControl};
use crate::monitor::{BoundaryTokens, MonitorConfig, MonitorSet};
use crate::run::{OnTokens, Run};
use crate::seed::mix;
use crate::stats::time_phase;
use crate::strategy::settings::{check_pair, speculative_setters};
use crate::strategy::Decoder;
use crate::window::{DraftWindow, Source};
use plan::AcceptanceEstimate;
use target::{verify, TargetSide};
use worker::{DraftWorker, Drafted, Reset, Resolved};

pub use settings::{DraftSchedule, EarlyExit, MirrorSettings, DEFAULT_BRANCHES_PER_PASS};
pub use tree_draft::{Branch, TreeRequest};

/// Builder of [`Mirror`].
pub struct MirrorBuilder {
    target: Arc<Model>,
    draft: Arc<Model>,
    settings: MirrorSettings,
    fault: Option<InjectedFault>,
    constraints: LazyCompiler,
}

impl MirrorBuilder {
    speculative_setters!(settings.speculative);

    /// Early-exit candidates per row kappa (default 4; the paper uses 8).
    pub fn kappa(mut self, kappa: usize) -> Self {
        self.settings.kappa = kappa;
        self
    }

    /// Where the target taps its early exit (default N/2).
    pub fn early_exit(mut self, early_exit: EarlyExit) -> Self {
        self.settings.early_exit = early_exit;
        self
    }

    /// Anytime (default) or full-grid drafting.
    pub fn schedule(mut self, schedule: DraftSchedule) -> Self {
        self.settings.schedule = schedule;
        self
    }

    /// Runs the draft on a pool of its own of `threads` threads (CPU; the draft model is
    /// cloned with its weights shared, see [`Model::with_threads`]), so the two models do not
    /// compete for one pool. A draft loaded with its own pool or cores needs none.
    pub fn draft_threads(mut self, threads: usize) -> Self {
        self.settings.draft_threads = Some(threads);
        self
    }

    /// The target's tokenizer, for constrained output ([`GenerationConfig::constraint`]; the
    /// constraint compiler is built at the first constrained generation). Without it a
    /// constrained generation is [`crate::Error::InvalidConfig`].
    pub fn tokenizer(mut self, tokenizer: Tokenizer) -> Self {
        self.constraints = LazyCompiler::new(Some(tokenizer), self.target.vocab_size());
        self
    }

    /// A constraint compiler shared with others (built once for them all), instead of
    /// [`MirrorBuilder::tokenizer`].
    pub fn constraints(mut self, constraints: LazyCompiler) -> Self {
        self.constraints = constraints;
        self
    }

    /// All of Mirror's settings at once.
    pub fn settings(mut self, settings: MirrorSettings) -> Self {
        self.settings = settings;
        self
    }

    /// Fault injection for tests: the draft worker fails once after `forwards` forward passes,
    /// by panicking or by returning an error.
    #[doc(hidden)]
    pub fn inject_draft_fault(mut self, forwards: usize, panic: bool) -> Self {
        self.fault = Some(InjectedFault {
            after_forwards: forwards,
            panic,
        });
        self
    }

    /// Checks the configuration, spawns the draft worker and builds the decoder.
    pub fn build(mut self) -> Result<Mirror> {
        let settings = self.settings;
        settings.check()?;
        check_pair(&self.target, &self.draft)?;
        self.draft = draft_on_its_pool(&self.draft, &settings)?;
        let early_exit_layer = settings.early_exit.resolve(self.target.num_layers())?;
        let mut drafter = drafter_for(Arc::clone(&self.draft), &settings);
        drafter.model.fault = self.fault;
        let draft_lookahead = lookahead_tokens(&self.draft);
        Ok(Mirror {
            constraints: self.constraints,
            boundaries: OnceLock::new(),
            worker: DraftWorker::spawn(drafter, settings.schedule)?,
            side: TargetSide {
                target: self.target,
                gamma: settings.speculative.gamma,
                kappa: settings.kappa,
                early_exit_layer,
                draft_lookahead,
            },
            settings,
        })
    }
}

/// The drafter of Mirror's worker over `draft`, with `settings`' lookup and lookahead
/// confidence.
pub(crate) fn drafter_for(draft: Arc<Model>, settings: &MirrorSettings) -> Drafter {
    let mut drafter = Drafter::new(draft);
    drafter.lookahead_confidence = settings.speculative.lookahead_confidence;
    drafter.lookup = settings.speculative.lookup;
    drafter
}

/// `draft` on a pool of its own when `settings` give it threads (`draft_threads`), else as is.
pub(crate) fn draft_on_its_pool(
    draft: &Arc<Model>,
    settings: &MirrorSettings,
) -> Result<Arc<Model>> {
    Ok(match settings.draft_threads {
        Some(threads) => Arc::new(Model::clone(draft).with_threads(threads)?),
        None => Arc::clone(draft),
    })
}

/// Lookahead tokens a step of `draft` may propose beside its main token.
pub(crate) fn lookahead_tokens(draft: &Model) -> usize {
    draft.lookahead().map_or(0, |head| head.config().tokens)
}

/// Mirror speculative decoding: target and draft in parallel, with a hypothesis tree.
pub struct Mirror {
    side: TargetSide,
    worker: DraftWorker,
    settings: MirrorSettings,
    constraints: LazyCompiler,
    /// The monitors' boundary tokens, decoded at the first monitored generation.
    boundaries: OnceLock<Option<BoundaryTokens>>,
}

impl Mirror {
    /// A builder for `target` with `draft` on the worker thread.
    pub fn builder(target: Arc<Model>, draft: Arc<Model>) -> MirrorBuilder {
        MirrorBuilder {
            constraints: LazyCompiler::new(None, target.vocab_size()),
            target,
            draft,
            settings: MirrorSettings::default(),
            fault: None,
        }
    }

    /// The early-exit layer l_e.
    pub fn early_exit_layer(&self) -> usize {
        self.side.early_exit_layer
    }

    /// The settings this decoder was built with.
    pub fn settings(&self) -> &MirrorSettings {
        &self.settings
    }

    /// The drafting schedule.
    pub fn schedule(&self) -> DraftSchedule {
        self.settings.schedule
    }
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
        self.generate_streamed(prompt, config, &mut |tokens, _| on_tokens(tokens))
    }

    /// Log-probabilities and monitors read the target's final rows of each verified window
    /// (raw logits, before penalties and the constraint), and the latent monitor the early-exit
    /// tap's states: its layer is the tap's, `l_e` (another is an `InvalidConfig`).
    fn generate_streamed(
        &mut self,
        prompt: &[u32],
        config: &GenerationConfig,
        on_tokens: OnTokens<'_>,
    ) -> Result<Generation> {
        let monitors = match &config.monitors {
            Some(monitors) => Some(self.monitor_set(monitors)?),
            None => None,
        };
        let (side, worker) = (&self.side, &mut self.worker);
        let gamma = side.gamma;
        let mut run = Run::begin(
            &side.target,
            prompt,
            config,
            gamma,
            mix(config.seed, 1),
            on_tokens,
        )?;
        if let Some(monitors) = monitors {
            run.monitor(monitors);
        }
        // The raw rows are copied apart only where penalties or the grammar change them.
        let copies_raw =
            run.observes() && (!config.penalties.is_neutral() || config.constraint.is_some());
        let mut grammar = match &config.constraint {
            Some(constraint) => Some(self.constraints.compile(constraint)?),
            None => None,
        };
        let mut acceptance = AcceptanceEstimate::new(gamma);
        // The draft's work runs beside the target: a window's tokens cost nothing more.
        let mut chooser = WindowChooser::new(self.settings.speculative.window, 0.0);
        let sampling = self.settings.speculative.sampling(config);
        let first = start(side, worker, &mut run, sampling, config.seed)?;
        let (mut window, mut source) = (first.window, first.source.unwrap_or(Source::Model));
        let mut step = 0u64;
        while !run.progress.done() && run.has_room() {
            let step_started = Instant::now();
            trim_window(&mut window, source, &mut chooser, &mut run);
            let (forced, masks) = match grammar.as_mut() {
                Some(grammar) => {
                    let (room, forced_drafts) = (run.window_room(), self.settings.forced_drafts);
                    time_phase(&mut run.stats.time.constraint, || -> Result<_> {
                        let forced = grammar.constrain_window(&mut window, room, forced_drafts)?;
                        Ok((forced, Some(grammar.window_masks(&window.tokens)?)))
                    })?
                }
                None => (false, None),
            };

            let tapped = time_phase(&mut run.stats.time.target_prefix, || {
                let masks = masks.as_deref();
                side.prefix_and_tap(&mut run.cache, &run.seq, &window, &acceptance, masks)
            })?;
            run.stats.branches_planned += tapped.plan.len();

            // First rendezvous: the candidates go to the draft, which drafts the tree...
            let tree = time_phase(&mut run.stats.time.wait_early_exit, || {
                worker.tree(&window.tokens, tapped.plan.clone(), mix(config.seed, step))
            })?;

            // ...while the target runs its suffix.
            let mut rows = time_phase(&mut run.stats.time.target_suffix, || {
                side.suffix(&mut run.cache, &tapped)
            })?;
            tree.target_done(Instant::now());
            run.stats.target_passes += 1;

            // Verify and learn.
            let raw = copies_raw.then(|| rows.clone());
            let hidden = match run.hidden_layer() {
                Some(_) => side.exit_rows(&tapped)?,
                None => Vec::new(),
            };
            run.penalize(config, &mut rows, &window.tokens);
            for (row, mask) in rows.iter_mut().zip(masks.iter().flatten()) {
                mask.apply(row);
            }
            let (verdict, omega) = time_phase(&mut run.stats.time.verify, || {
                verify(config, &rows, &window, &tapped, &mut run.rng)
            })?;
            run.stats.omega_sum += omega;
            if forced {
                // The grammar's tokens, not the draft's: nothing to learn about the draft.
                run.stats.forced_tokens += verdict.accepted;
            } else {
                run.stats.record_window(window.len(), verdict.accepted);
                acceptance.record(window.len(), verdict.accepted);
                chooser.record_verdict(source, window.len(), verdict.accepted);
            }

            // Final rendezvous: the draft hands over the next window.
            let resolved = time_phase(&mut run.stats.time.wait_final, || tree.resolve(verdict))?;
            record_resolution(&mut run.stats, &resolved);
            // A step's whole time, exposed draft waits included, against its window length.
            let drafted = (!window.is_empty()).then_some(source);
            if !forced {
                chooser.record_step(drafted, window.len(), step_started.elapsed());
            }
            let mut new = verdict.committed(&window.tokens);
            if let Some(grammar) = grammar.as_mut() {
                let kept = time_phase(&mut run.stats.time.constraint, || grammar.settle(&new))?;
                new.truncate(kept);
            }
            run.commit_observed(tapped.base, new, raw.as_ref().unwrap_or(&rows), &hidden);
            if grammar.as_ref().is_some_and(|g| g.is_stopped()) {
                // Complete: nothing may follow (its end token, if any, is committed).
                run.progress.output.finish.get_or_insert(FinishReason::Stop);
            }
            source = resolved.next.source.unwrap_or(Source::Model);
            window = resolved.next.window;
            step += 1;
        }
        Ok(run.finish())
    }
}

impl Mirror {
    /// The monitors of `config` ([`MirrorSettings::monitors_for`]), with the boundary tokens of
    /// the tokenizer the builder was given, if any.
    fn monitor_set(&self, config: &MonitorConfig) -> Result<MonitorSet> {
        let layers = self.side.target.num_layers();
        let config = self.settings.monitors_for(config, layers)?;
        let vocab = self.side.target.vocab_size();
        let boundaries = self
            .boundaries
            .get_or_init(|| {
                let tokenizer = self.constraints.tokenizer()?;
                Some(BoundaryTokens::of_tokenizer(tokenizer, vocab))
            })
            .clone();
        Ok(MonitorSet::new(&config, boundaries, layers))
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
    params: mirror_core::sampling::SamplingParams,
    seed: u64,
) -> Result<Drafted> {
    let capacity = run.cache.capacity();
    worker.reset(Reset {
        capacity: capacity + side.tree_cache_rows(),
        position_limit: capacity,
        params,
        stop: run.progress.stop().clone(),
        gamma: side.gamma,
        cache: None,
    })?;
    let prefill = worker.prefill(run.seq.clone())?;
    let n = run.seq.len();
    if n > 1 {
        side.target
            .next_token_logits(&run.seq[..n - 1], &mut run.cache)?;
    }
    // The draft's prefill is not drafting: its counters start after it, as the target's do.
    prefill.wait()?;
    run.stats.time.prefill = run.started.elapsed();
    let first = worker.rollout(side.gamma, mix(seed, u64::MAX))?;
    run.stats.record_draft(first.counters);
    run.stats.time.wait_final += first.counters.busy;
    Ok(first)
}

/// Counts a resolved tree in `stats`: the draft's work, what of it was hidden, and the reuse.
pub(crate) fn record_resolution(stats: &mut crate::stats::Stats, resolved: &Resolved) {
    stats.record_draft(resolved.next.counters);
    stats.time.draft_hidden += resolved.busy_while_target_ran;
    stats.branches_completed += resolved.completed;
    stats.record_reuse(resolved.reuse);
}
