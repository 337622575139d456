//! Mirror's draft worker: the draft model on a thread of its own, behind a typed handle.
//!
//! One channel carries requests to the thread; each request carries its own one-shot reply
//! channel, typed by what that request answers, so no reply can be taken for another request.
//! A tree is the one request that waits on the target halfway: it carries two more one-shot
//! channels, one raised when the target's final distributions are ready (anytime drafting stops
//! there) and one for the target's verdict. Dropping a [`PendingTree`] before its verdict
//! abandons the tree.
//!
//! The worker keeps its own copy of the committed sequence, updated from what each request says
//! changed: the prompt at prefill, the window under verification with a tree, and the commit that
//! the verdict makes of it ([`Verdict::committed`], the target's own rule).

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender, TryRecvError};
use mirror_core::panic_message;
use mirror_core::sampling::SamplingParams;

use super::plan::BranchPlan;
use super::settings::DraftSchedule;
use super::tree_draft::TreeRequest;
use crate::draft::Drafter;
use crate::error::{Error, Result, WorkerFault};
use crate::generation::StopSet;
use crate::stats::{DraftCounters, Reuse};
use crate::window::{DraftWindow, Source, Verdict};

/// How the draft is prepared for a generation (see [`Drafter::reset`]).
pub(crate) struct Reset {
    pub capacity: usize,
    pub position_limit: usize,
    pub params: SamplingParams,
    pub stop: StopSet,
    /// Tokens per window and per branch.
    pub gamma: usize,
    /// A cache of `capacity` rows to draft in (the batched engine's, lent by its pool); `None`
    /// keeps or allocates the worker's own.
    pub cache: Option<mirror_core::KvCache>,
}

/// A window the draft proposed.
#[derive(Debug, Default)]
pub(crate) struct Drafted {
    pub window: DraftWindow,
    /// Where `window` came from.
    pub source: Option<Source>,
    pub counters: DraftCounters,
}

/// A tree resolved against the target's verdict: the next window.
#[derive(Debug)]
pub(crate) struct Resolved {
    pub next: Drafted,
    pub reuse: Reuse,
    /// Draft compute that overlapped the target's suffix.
    pub busy_while_target_ran: Duration,
    /// Branches drafted in full.
    pub completed: usize,
}

/// The reply end of a one-shot channel.
type Reply<T> = Sender<std::result::Result<T, WorkerFault>>;

/// A request to the worker, with the channel its reply goes back on.
enum Request {
    Reset(Reset, Reply<()>),
    /// Cache the prompt (all but its last token) and take it as the sequence.
    Prefill(Vec<u32>, Reply<()>),
    /// Draft a window after the sequence (looked up first when lookup is on).
    Rollout {
        count: usize,
        seed: u64,
        reply: Reply<Drafted>,
    },
    /// Draft the tree after the sequence and `window`, then resolve it with the verdict.
    Tree {
        window: Vec<u32>,
        plan: Vec<BranchPlan>,
        step_seed: u64,
        target_done: Receiver<Instant>,
        verdict: Receiver<Verdict>,
        reply: Reply<Resolved>,
    },
}

/// The handle: the requests' channel and the thread.
pub(crate) struct DraftWorker {
    requests: Option<Sender<Request>>,
    handle: Option<JoinHandle<()>>,
}

/// A reply the worker owes; [`Pending::wait`] takes it.
pub(crate) struct Pending<T> {
    reply: Receiver<std::result::Result<T, WorkerFault>>,
}

impl<T> Pending<T> {
    /// Waits for the reply.
    pub fn wait(self) -> Result<T> {
        match self.reply.recv() {
            Ok(reply) => reply.map_err(Error::from),
            Err(_) => Err(WorkerFault::Exited.into()),
        }
    }
}

fn one_shot<T>() -> (Sender<T>, Receiver<T>) {
    bounded(1)
}

impl DraftWorker {
    /// Starts the worker thread over `drafter`.
    pub fn spawn(drafter: Drafter, schedule: DraftSchedule) -> Result<Self> {
        let (requests, request_rx) = unbounded();
        let worker = Worker {
            drafter,
            schedule,
            seq: Vec::new(),
            gamma: 0,
        };
        let handle = std::thread::Builder::new()
            .name("mirror-draft-worker".into())
            .spawn(move || worker.run(request_rx))
            .map_err(WorkerFault::Spawn)?;
        Ok(Self {
            requests: Some(requests),
            handle: Some(handle),
        })
    }

    fn send<T>(&self, request: impl FnOnce(Reply<T>) -> Request) -> Result<Pending<T>> {
        let (reply, reply_rx) = one_shot();
        let sent = self.requests.as_ref().map(|r| r.send(request(reply)));
        match sent {
            Some(Ok(())) => Ok(Pending { reply: reply_rx }),
            _ => Err(WorkerFault::Exited.into()),
        }
    }

    /// Prepares the draft for a generation.
    pub fn reset(&mut self, reset: Reset) -> Result<()> {
        self.send(|reply| Request::Reset(reset, reply))?.wait()
    }

    /// Starts the draft's prefill of `prompt`; the reply is waited for later, so that both
    /// models prefill at once.
    pub fn prefill(&mut self, prompt: Vec<u32>) -> Result<Pending<()>> {
        self.send(|reply| Request::Prefill(prompt, reply))
    }

    /// Drafts a window of up to `count` tokens after the sequence.
    pub fn rollout(&mut self, count: usize, seed: u64) -> Result<Drafted> {
        self.send(|reply| Request::Rollout { count, seed, reply })?
            .wait()
    }

    /// Sends the tree after `window` to draft while the target finishes its layers.
    pub fn tree(
        &mut self,
        window: &[u32],
        plan: Vec<BranchPlan>,
        step_seed: u64,
    ) -> Result<PendingTree> {
        let (target_done, target_done_rx) = one_shot();
        let (verdict, verdict_rx) = one_shot();
        let resolved = self.send(|reply| Request::Tree {
            window: window.to_vec(),
            plan,
            step_seed,
            target_done: target_done_rx,
            verdict: verdict_rx,
            reply,
        })?;
        Ok(PendingTree {
            target_done,
            verdict,
            resolved,
        })
    }
}

impl Drop for DraftWorker {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop after the request it is on.
        self.requests = None;
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// A tree being drafted. Resolved once with the target's verdict; dropped before that, it is
/// abandoned (the worker stops drafting and replies to no one).
pub(crate) struct PendingTree {
    target_done: Sender<Instant>,
    verdict: Sender<Verdict>,
    resolved: Pending<Resolved>,
}

impl PendingTree {
    /// The target's final distributions were ready at `at`: anytime drafting stops after its
    /// current pass.
    pub fn target_done(&self, at: Instant) {
        let _ = self.target_done.try_send(at);
    }

    /// The target's verdict on the window: the draft hands over the next window.
    pub fn resolve(self, verdict: Verdict) -> Result<Resolved> {
        self.send_verdict(verdict)?.wait()
    }

    /// Sends the target's verdict without waiting: the draft resolves the tree (and rolls out
    /// afresh on a miss) while the caller goes on; the reply is the next window.
    pub fn send_verdict(self, verdict: Verdict) -> Result<Pending<Resolved>> {
        if self.verdict.send(verdict).is_err() {
            return Err(WorkerFault::Exited.into());
        }
        Ok(self.resolved)
    }
}

/// The worker thread's side.
struct Worker {
    drafter: Drafter,
    schedule: DraftSchedule,
    /// The committed sequence as the draft knows it.
    seq: Vec<u32>,
    gamma: usize,
}

/// Runs `handle`, a failure (error or panic) becoming its reply.
fn guarded<T>(handle: impl FnOnce() -> Result<T>) -> std::result::Result<T, WorkerFault> {
    match catch_unwind(AssertUnwindSafe(handle)) {
        Ok(result) => result.map_err(WorkerFault::from),
        Err(panic) => Err(WorkerFault::Panicked(panic_message(&*panic))),
    }
}

impl Worker {
    fn run(mut self, requests: Receiver<Request>) {
        // A reply whose receiver is gone belongs to a generation that ended: it is dropped.
        while let Ok(request) = requests.recv() {
            match request {
                Request::Reset(reset, reply) => {
                    let _ = reply.send(guarded(|| self.reset(reset)));
                }
                Request::Prefill(prompt, reply) => {
                    let _ = reply.send(guarded(|| self.prefill(prompt)));
                }
                Request::Rollout { count, seed, reply } => {
                    let _ = reply.send(guarded(|| self.rollout(count, seed)));
                }
                Request::Tree {
                    window,
                    plan,
                    step_seed,
                    target_done,
                    verdict,
                    reply,
                } => {
                    let tree = TreeRequest {
                        window_start: self.seq.len().saturating_sub(1),
                        plan,
                        gamma: self.gamma,
                        step_seed,
                    };
                    if let Some(resolved) = self.tree(tree, &window, &target_done, &verdict) {
                        let _ = reply.send(resolved);
                    }
                }
            }
        }
    }

    fn reset(&mut self, reset: Reset) -> Result<()> {
        self.seq.clear();
        self.gamma = reset.gamma;
        if let Some(cache) = reset.cache {
            self.drafter.model.set_cache(cache);
        }
        self.drafter.reset(
            reset.capacity,
            reset.position_limit,
            reset.params,
            reset.stop,
        )
    }

    fn prefill(&mut self, prompt: Vec<u32>) -> Result<()> {
        self.seq = prompt;
        let cached = self.seq.len().saturating_sub(1);
        self.drafter.sync(&self.seq[..cached])?;
        self.drafter.take_counters();
        Ok(())
    }

    fn rollout(&mut self, count: usize, seed: u64) -> Result<Drafted> {
        let (window, source) = self.drafter.window(&self.seq, count, seed)?;
        Ok(Drafted {
            window,
            source: Some(source),
            counters: self.drafter.take_counters(),
        })
    }

    /// Drafts the tree, then waits for the verdict: the tree and its resolution are one request
    /// with one reply. A failure while drafting is held until then. `None` when the tree was
    /// abandoned.
    fn tree(
        &mut self,
        tree: TreeRequest,
        window: &[u32],
        target_done: &Receiver<Instant>,
        verdict: &Receiver<Verdict>,
    ) -> Option<std::result::Result<Resolved, WorkerFault>> {
        let per_pass = match self.schedule {
            DraftSchedule::Anytime { branches_per_pass } => branches_per_pass,
            DraftSchedule::FullGrid => tree.plan.len(),
        };
        let anytime = matches!(self.schedule, DraftSchedule::Anytime { .. });
        // Drafting stops once the target is done, or gone.
        let done_at: Cell<Option<Instant>> = Cell::new(None);
        let stop = || match target_done.try_recv() {
            Ok(at) => {
                done_at.set(Some(at));
                true
            }
            Err(TryRecvError::Disconnected) => true,
            Err(TryRecvError::Empty) => done_at.get().is_some(),
        };
        self.seq.extend_from_slice(window);
        let built = guarded(|| {
            let until: Option<&dyn Fn() -> bool> = if anytime { Some(&stop) } else { None };
            self.drafter.build_tree(&self.seq, &tree, per_pass, until)
        });
        let Ok(verdict) = verdict.recv() else {
            // Abandoned: the generation ended; the next one starts with a reset.
            self.drafter.take_counters();
            return None;
        };
        let target_done = done_at
            .get()
            .or_else(|| target_done.try_recv().ok())
            .unwrap_or_else(Instant::now);
        Some(guarded(|| {
            let branches = built?;
            let completed = branches
                .iter()
                .filter(|b| self.drafter.is_complete(b, &tree))
                .count();
            let busy_while_target_ran = self.drafter.model.busy_before(target_done);
            let (next, reuse, source) = self.drafter.resolve(
                &self.seq,
                &tree,
                &branches,
                verdict.accepted,
                verdict.token,
            )?;
            self.seq.truncate(tree.window_start + 1);
            self.seq.extend(verdict.committed(window));
            Ok(Resolved {
                next: Drafted {
                    window: next,
                    source: Some(source),
                    counters: self.drafter.take_counters(),
                },
                reuse,
                busy_while_target_ran,
                completed,
            })
        }))
    }
}
