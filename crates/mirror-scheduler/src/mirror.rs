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

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use mirror_core::sampling::{self, SamplingParams};
use mirror_core::{AttentionInput, Model};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::config::{FinishReason, Generation, GenerationConfig, StreamControl};
use crate::draft::{host_rows, mix, DraftCounters, DraftState, Resolution};
use crate::error::{Error, Result};
use crate::progress::{capacity_for, Progress};
use crate::speculative::{
    check_pair, check_stream_confidence, draft_params, DEFAULT_STREAM_CONFIDENCE,
};
use crate::stats::Stats;
use crate::tree::{overlap_mass, plan_branches, BranchPlan};
use crate::verify::{verify_window, DraftWindow};
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
    /// seeded stream, so a window is the same whether it was drafted in the tree or rolled out
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

enum ToDraft {
    Reset {
        capacity: usize,
        position_limit: usize,
        params: SamplingParams,
        stop_ids: Vec<u32>,
    },
    Prefill {
        tokens: Vec<u32>,
    },
    Rollout {
        context: Vec<u32>,
        count: usize,
        seed: u64,
    },
    Tree {
        context: Vec<u32>,
        window_start: usize,
        plan: Vec<BranchPlan>,
        gamma: usize,
        step_seed: u64,
    },
    Resolve {
        accepted: usize,
        token: u32,
        target_done: Instant,
    },
    Shutdown,
}

#[derive(Debug, Default)]
struct DraftReport {
    window: DraftWindow,
    resolution: Option<Resolution>,
    counters: DraftCounters,
    hidden: Duration,
    completed: usize,
}

enum FromDraft {
    Done(DraftReport),
    Failed(String),
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

struct Worker {
    state: DraftState,
    rx: Receiver<ToDraft>,
    tx: Sender<FromDraft>,
    stop: Arc<AtomicBool>,
    schedule: DraftSchedule,
}

impl Worker {
    fn run(mut self) {
        let mut pending: Option<ToDraft> = None;
        loop {
            let command = match pending.take() {
                Some(c) => c,
                None => match self.rx.recv() {
                    Ok(c) => c,
                    Err(_) => return,
                },
            };
            if matches!(command, ToDraft::Shutdown) {
                return;
            }
            let outcome = catch_unwind(AssertUnwindSafe(|| self.handle(command)));
            let reply = match outcome {
                Ok(Ok((reply, next))) => {
                    pending = next;
                    reply
                }
                Ok(Err(e)) => Some(FromDraft::Failed(e.to_string())),
                Err(panic) => Some(FromDraft::Failed(format!(
                    "panic: {}",
                    panic_message(&*panic)
                ))),
            };
            if let Some(reply) = reply {
                if self.tx.send(reply).is_err() {
                    return;
                }
            }
        }
    }

    fn report(&mut self, window: DraftWindow, resolution: Option<Resolution>) -> DraftReport {
        DraftReport {
            window,
            resolution,
            counters: self.state.take_counters(),
            ..DraftReport::default()
        }
    }

    /// Runs one command; a tree is followed by its resolution (or abandoned when another command
    /// arrives instead, which is then returned to run next).
    fn handle(&mut self, command: ToDraft) -> Result<(Option<FromDraft>, Option<ToDraft>)> {
        match command {
            ToDraft::Reset {
                capacity,
                position_limit,
                params,
                stop_ids,
            } => {
                self.state
                    .reset(capacity, position_limit, params, stop_ids)?;
                Ok((Some(FromDraft::Done(DraftReport::default())), None))
            }
            ToDraft::Prefill { tokens } => {
                self.state.sync(&tokens)?;
                let report = self.report(DraftWindow::default(), None);
                Ok((Some(FromDraft::Done(report)), None))
            }
            ToDraft::Rollout {
                context,
                count,
                seed,
            } => {
                let window = self.state.rollout(&context, count, seed)?;
                let report = self.report(window, None);
                Ok((Some(FromDraft::Done(report)), None))
            }
            ToDraft::Tree {
                context,
                window_start,
                plan,
                gamma,
                step_seed,
            } => {
                let (per_pass, stop) = match self.schedule {
                    DraftSchedule::Anytime { branches_per_pass } => {
                        (branches_per_pass, Some(&*self.stop))
                    }
                    DraftSchedule::FullGrid => (plan.len(), None),
                };
                // A tree and its resolution get exactly one reply, to the resolution: a failure
                // while drafting (error or panic) is held until then, so no stray reply is left
                // for a later request.
                let built = catch_unwind(AssertUnwindSafe(|| {
                    self.state.build_tree(
                        &context,
                        window_start,
                        &plan,
                        gamma,
                        step_seed,
                        per_pass,
                        stop,
                    )
                }))
                .unwrap_or_else(|panic| {
                    Err(Error::WorkerFailed(format!(
                        "panic: {}",
                        panic_message(&*panic)
                    )))
                });
                let next = self.rx.recv().unwrap_or(ToDraft::Shutdown);
                let ToDraft::Resolve {
                    accepted,
                    token,
                    target_done,
                } = next
                else {
                    // The generation was abandoned: run the next command instead.
                    return Ok((None, Some(next)));
                };
                let branches = built?;
                let completed = branches
                    .iter()
                    .filter(|b| {
                        b.window.len() >= gamma
                            || b.window
                                .tokens
                                .last()
                                .is_some_and(|t| self.state.stop_ids.contains(t))
                    })
                    .count();
                let hidden = self.state.hidden_time(target_done);
                let (window, resolution) = self.state.resolve(
                    &context,
                    window_start,
                    &branches,
                    accepted,
                    token,
                    gamma,
                    step_seed,
                )?;
                let mut report = self.report(window, Some(resolution));
                report.hidden = hidden;
                report.completed = completed;
                Ok((Some(FromDraft::Done(report)), None))
            }
            ToDraft::Resolve { .. } => Err(Error::WorkerFailed("resolve without a tree".into())),
            ToDraft::Shutdown => Ok((None, None)),
        }
    }
}

/// Builder of [`Mirror`].
pub struct MirrorBuilder {
    target: Arc<Model>,
    draft: Arc<Model>,
    gamma: usize,
    kappa: usize,
    early_exit: EarlyExit,
    schedule: DraftSchedule,
    greedy_draft: bool,
    draft_threads: Option<usize>,
    fault: Option<(usize, bool)>,
    stream_confidence: f32,
}

impl MirrorBuilder {
    /// Window length gamma (default 4; the paper uses 7).
    pub fn gamma(mut self, gamma: usize) -> Self {
        self.gamma = gamma;
        self
    }

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

    /// Under sampling, let the draft propose its argmax (point-mass rule) instead of sampling.
    pub fn greedy_draft(mut self, yes: bool) -> Self {
        self.greedy_draft = yes;
        self
    }

    /// Runs the draft on a pool of its own of `threads` threads (CPU; the draft model is
    /// cloned with its weights shared, see [`Model::with_threads`]), so the two models do not
    /// compete for one pool. A draft loaded with its own pool or cores needs none.
    pub fn draft_threads(mut self, threads: usize) -> Self {
        self.draft_threads = Some(threads);
        self
    }

    /// With a draft that has speculative streams: propose a stream's token only when its top
    /// probability reaches `threshold` (default [`DEFAULT_STREAM_CONFIDENCE`]; 0 proposes all).
    pub fn stream_confidence(mut self, threshold: f32) -> Self {
        self.stream_confidence = threshold;
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
        if self.gamma == 0 || self.kappa == 0 {
            return Err(Error::InvalidConfig(
                "gamma and kappa must be at least 1".into(),
            ));
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
        check_stream_confidence(self.stream_confidence)?;
        if let Some(threads) = self.draft_threads {
            self.draft = Arc::new(Model::clone(&self.draft).with_threads(threads)?);
        }
        let early_exit_layer = self.early_exit.resolve(self.target.num_layers())?;
        let (to_worker, worker_rx) = unbounded();
        let (worker_tx, from_worker) = unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let mut state = DraftState::new(Arc::clone(&self.draft));
        state.fault = self.fault;
        state.stream_confidence = self.stream_confidence;
        let worker = Worker {
            state,
            rx: worker_rx,
            tx: worker_tx,
            stop: Arc::clone(&stop),
            schedule: self.schedule,
        };
        let handle = std::thread::Builder::new()
            .name("mirror-draft-worker".into())
            .spawn(move || worker.run())
            .map_err(|e| Error::WorkerFailed(format!("cannot spawn the draft worker: {e}")))?;
        let draft_streams = self
            .draft
            .streams()
            .map_or(0, |head| head.config().num_streams);
        Ok(Mirror {
            target: self.target,
            draft_streams,
            gamma: self.gamma,
            kappa: self.kappa,
            early_exit_layer,
            schedule: self.schedule,
            greedy_draft: self.greedy_draft,
            to_worker,
            from_worker,
            stop,
            handle: Some(handle),
            acceptance: vec![(1.0, 2.0); self.gamma],
            outstanding: 0,
        })
    }
}

/// Mirror speculative decoding: target and draft in parallel, with a hypothesis tree.
pub struct Mirror {
    target: Arc<Model>,
    /// Speculative streams of the draft (a step feeds up to `1 + draft_streams` rows a branch).
    draft_streams: usize,
    gamma: usize,
    kappa: usize,
    early_exit_layer: usize,
    schedule: DraftSchedule,
    greedy_draft: bool,
    to_worker: Sender<ToDraft>,
    from_worker: Receiver<FromDraft>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    /// Verified windows so far: per position, (accepted, proposed) given the earlier positions
    /// were accepted; the tree's branch priorities come from these rates.
    acceptance: Vec<(f64, f64)>,
    /// Replies owed by the worker to requests whose generation ended in an error: drained before
    /// the next generation so that no stale reply is taken for a new one.
    outstanding: usize,
}

impl Mirror {
    /// A builder for `target` with `draft` on the worker thread.
    pub fn builder(target: Arc<Model>, draft: Arc<Model>) -> MirrorBuilder {
        MirrorBuilder {
            target,
            draft,
            gamma: 4,
            kappa: 4,
            early_exit: EarlyExit::Fraction(0.5),
            schedule: DraftSchedule::Anytime {
                branches_per_pass: 4,
            },
            greedy_draft: false,
            draft_threads: None,
            fault: None,
            stream_confidence: DEFAULT_STREAM_CONFIDENCE,
        }
    }

    /// The early-exit layer l_e.
    pub fn early_exit_layer(&self) -> usize {
        self.early_exit_layer
    }

    /// The drafting schedule.
    pub fn schedule(&self) -> DraftSchedule {
        self.schedule
    }

    fn send(&mut self, command: ToDraft) -> Result<()> {
        // Every command but a tree (answered after its resolution) gets exactly one reply.
        let replies = !matches!(command, ToDraft::Tree { .. } | ToDraft::Shutdown);
        self.to_worker
            .send(command)
            .map_err(|_| Error::WorkerFailed("the draft worker has exited".into()))?;
        self.outstanding += usize::from(replies);
        Ok(())
    }

    fn receive(&mut self) -> Result<DraftReport> {
        let reply = self.from_worker.recv();
        self.outstanding = self.outstanding.saturating_sub(1);
        match reply {
            Ok(FromDraft::Done(report)) => Ok(report),
            Ok(FromDraft::Failed(msg)) => Err(Error::WorkerFailed(msg)),
            Err(_) => Err(Error::WorkerFailed("the draft worker has exited".into())),
        }
    }

    fn request(&mut self, command: ToDraft) -> Result<DraftReport> {
        self.send(command)?;
        self.receive()
    }

    /// Discards replies left over from a generation that ended in an error.
    fn drain(&mut self) -> Result<()> {
        while self.outstanding > 0 {
            // A failure reported now belonged to the abandoned generation.
            let _ = self.receive();
            if self.handle.as_ref().is_some_and(|h| h.is_finished()) {
                return Err(Error::WorkerFailed("the draft worker has exited".into()));
            }
        }
        Ok(())
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        let _ = self.to_worker.send(ToDraft::Shutdown);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

impl Decoder for Mirror {
    fn name(&self) -> &'static str {
        "mirror"
    }

    fn target(&self) -> &Arc<Model> {
        &self.target
    }

    fn generate_stream(
        &mut self,
        prompt: &[u32],
        config: &GenerationConfig,
        on_tokens: &mut dyn FnMut(&[u32]) -> StreamControl,
    ) -> Result<Generation> {
        let started = Instant::now();
        let (gamma, kappa) = (self.gamma, self.kappa);
        let capacity = capacity_for(&self.target, prompt, config, gamma)?;
        let mut stats = Stats::new(gamma);
        let mut progress = Progress::new(config, &self.target, on_tokens);
        let mut rng = StdRng::seed_from_u64(mix(config.seed, 1));
        // Planned branches plus the bonus guess, each fed at most gamma times; a step of a
        // draft with streams feeds up to 1 + streams rows (stream tokens the main stream
        // rejects keep their rows until the tree is resolved).
        let branches = kappa * (gamma + 1) + 1;
        let tree_rows = branches * gamma * (1 + self.draft_streams) + gamma + 2;
        self.drain()?;
        self.request(ToDraft::Reset {
            capacity: capacity + tree_rows,
            position_limit: capacity,
            params: draft_params(config, self.greedy_draft),
            stop_ids: progress.stop_ids().to_vec(),
        })?;

        // Prefill both models at once: the draft on its worker, the target here.
        let mut seq = prompt.to_vec();
        let n = seq.len();
        let mut cache = self.target.new_cache(1, capacity)?;
        if n > 1 {
            self.send(ToDraft::Prefill {
                tokens: seq[..n - 1].to_vec(),
            })?;
            self.target.next_token_logits(&seq[..n - 1], &mut cache)?;
            self.receive()?;
        }
        stats.time.prefill = started.elapsed();
        let first = self.request(ToDraft::Rollout {
            context: seq.clone(),
            count: gamma,
            seed: mix(config.seed, u64::MAX),
        })?;
        stats.record_draft(first.counters);
        stats.time.wait_final += first.counters.busy;
        let mut window = first.window;
        let layers = self.target.num_layers();
        let device = self.target.device().clone();
        let mut step = 0u64;
        while !progress.done() {
            if cache.len() + 1 > cache.capacity() {
                progress.finish = Some(FinishReason::ContextLimit);
                break;
            }
            window.truncate(cache.capacity() - cache.len() - 1);
            let base = cache.len();
            let mut fed = vec![seq[seq.len() - 1]];
            fed.extend_from_slice(&window.tokens);

            // Target prefix and the early-exit tap.
            let t0 = Instant::now();
            let input = AttentionInput::causal(1, fed.len(), base, &device)?;
            let hidden = self.target.embed(&[&fed])?;
            let hidden = self.target.forward_layers(
                &hidden,
                0..self.early_exit_layer,
                &input,
                &mut cache,
            )?;
            let tap = host_rows(&self.target.logits(&hidden)?)?;
            let top_k: Vec<Vec<(u32, f32)>> = tap
                .iter()
                .map(|row| sampling::top_k_log_probs(row, kappa))
                .collect();
            let rates: Vec<f64> = self.acceptance.iter().map(|(a, p)| a / p).collect();
            let plan = plan_branches(&top_k, &window.tokens, &rates);
            stats.branches_planned += plan.len();
            stats.time.target_prefix += t0.elapsed();

            // First rendezvous: hand the candidates to the draft.
            let t1 = Instant::now();
            let step_seed = mix(config.seed, step);
            let mut context = seq.clone();
            context.extend_from_slice(&window.tokens);
            self.stop.store(false, Ordering::Release);
            self.send(ToDraft::Tree {
                context,
                window_start: seq.len() - 1,
                plan,
                gamma,
                step_seed,
            })?;
            stats.time.wait_early_exit += t1.elapsed();

            // Target suffix while the draft drafts.
            let t2 = Instant::now();
            let hidden = self.target.forward_layers(
                &hidden,
                self.early_exit_layer..layers,
                &input,
                &mut cache,
            )?;
            let rows = host_rows(&self.target.logits(&hidden)?)?;
            let target_done = Instant::now();
            self.stop.store(true, Ordering::Release);
            stats.time.target_suffix += target_done - t2;
            stats.target_passes += 1;

            let t3 = Instant::now();
            let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
            let verdict = verify_window(&refs, &window, &config.sampling, &mut || rng.random())?;
            stats.record_window(window.len(), verdict.accepted);
            for (j, rate) in self.acceptance.iter_mut().enumerate().take(window.len()) {
                if j > verdict.accepted {
                    break;
                }
                rate.1 += 1.0;
                rate.0 += f64::from(u8::from(j < verdict.accepted));
            }
            let final_probs: Vec<f32> = sampling::log_softmax(&rows[verdict.accepted])
                .into_iter()
                .map(f32::exp)
                .collect();
            stats.omega_sum += overlap_mass(&final_probs, &top_k[verdict.accepted]);
            stats.time.verify += t3.elapsed();

            // Final rendezvous: the draft hands over the next window.
            let t4 = Instant::now();
            let report = self.request(ToDraft::Resolve {
                accepted: verdict.accepted,
                token: verdict.token,
                target_done,
            })?;
            stats.time.wait_final += t4.elapsed();
            stats.record_draft(report.counters);
            stats.time.draft_hidden += report.hidden;
            stats.branches_completed += report.completed;
            match report.resolution {
                Some(Resolution::Hit) => stats.reuse_hits += 1,
                Some(Resolution::Partial) => stats.reuse_partial += 1,
                Some(Resolution::Miss) | None => stats.fallbacks += 1,
            }

            cache.truncate(base + 1 + verdict.accepted);
            let mut new = window.tokens[..verdict.accepted].to_vec();
            new.push(verdict.token);
            seq.extend_from_slice(&new);
            window = report.window;
            progress.commit(&new);
            step += 1;
        }
        Ok(progress.finish(stats, started))
    }
}
