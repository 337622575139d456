//! Mirror's draft worker: the draft model on a thread of its own, behind a typed handle.
//!
//! Every request gets exactly one reply, and the types make sure it is taken exactly once:
//! [`DraftWorker::call`] waits for it; [`DraftWorker::start`] returns a [`Pending`] reply that
//! is waited for later (and, if dropped, taken and discarded then); [`DraftWorker::tree`]
//! returns a [`PendingTree`], which must be resolved with the target's verdict (or, if dropped,
//! is abandoned), and whose reply is the next window. While a reply is owed the handle is
//! borrowed, so no other request can slip in between: no stale reply can ever be taken for a
//! later request.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use mirror_core::panic_message;
use mirror_core::sampling::SamplingParams;

use crate::config::StopSet;
use crate::draft::{DraftCounters, DraftState, Resolution, TreeRequest};
use crate::error::{Error, Result};
use crate::mirror::DraftSchedule;
use crate::verify::DraftWindow;
use crate::window::Source;

/// A request to the worker.
pub(crate) enum Request {
    /// Prepare for a generation (see [`DraftState::reset`]).
    Reset {
        capacity: usize,
        position_limit: usize,
        params: SamplingParams,
        stop: StopSet,
    },
    /// Make the cache hold these tokens.
    Prefill {
        tokens: Vec<u32>,
    },
    /// Draft a window after `context` (looked up first when lookup is on).
    Rollout {
        context: Vec<u32>,
        count: usize,
        seed: u64,
    },
    /// Draft a hypothesis tree; its reply follows its [`Outcome`].
    Tree(TreeRequest),
    Shutdown,
}

/// How the target settled a tree.
enum Outcome {
    Resolve {
        accepted: usize,
        token: u32,
        target_done: Instant,
    },
    /// The generation ended before the verdict (an error, a cancellation).
    Abandon,
}

/// What the draft did for one request.
#[derive(Debug, Default)]
pub(crate) struct DraftReport {
    pub window: DraftWindow,
    /// Where `window` came from.
    pub source: Option<Source>,
    pub resolution: Option<Resolution>,
    pub counters: DraftCounters,
    /// Draft compute that overlapped the target's suffix.
    pub hidden: Duration,
    /// Branches drafted in full.
    pub completed: usize,
}

enum Reply {
    Done(DraftReport),
    Failed(String),
}

/// The handle: requests out, replies in.
pub(crate) struct DraftWorker {
    requests: Sender<Request>,
    outcomes: Sender<Outcome>,
    replies: Receiver<Reply>,
    /// Raised when the target's final distributions are ready: anytime drafting stops there.
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl DraftWorker {
    /// Starts the worker thread over `state`.
    pub fn spawn(state: DraftState, schedule: DraftSchedule) -> Result<Self> {
        let (requests, request_rx) = unbounded();
        let (outcomes, outcome_rx) = unbounded();
        let (reply_tx, replies) = unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            state,
            requests: request_rx,
            outcomes: outcome_rx,
            replies: reply_tx,
            stop: Arc::clone(&stop),
            schedule,
        };
        let handle = std::thread::Builder::new()
            .name("mirror-draft-worker".into())
            .spawn(move || worker.run())
            .map_err(|e| Error::WorkerFailed(format!("cannot spawn the draft worker: {e}")))?;
        Ok(Self {
            requests,
            outcomes,
            replies,
            stop,
            handle: Some(handle),
        })
    }

    fn send(&self, request: Request) -> Result<()> {
        self.requests
            .send(request)
            .map_err(|_| Error::WorkerFailed("the draft worker has exited".into()))
    }

    fn receive(&self) -> Result<DraftReport> {
        match self.replies.recv() {
            Ok(Reply::Done(report)) => Ok(report),
            Ok(Reply::Failed(message)) => Err(Error::WorkerFailed(message)),
            Err(_) => Err(Error::WorkerFailed("the draft worker has exited".into())),
        }
    }

    /// Sends `request` and waits for its reply.
    pub fn call(&mut self, request: Request) -> Result<DraftReport> {
        self.start(request)?.wait()
    }

    /// Sends `request`; its reply is waited for through the returned handle.
    pub fn start(&mut self, request: Request) -> Result<Pending<'_>> {
        self.send(request)?;
        Ok(Pending {
            worker: self,
            taken: false,
        })
    }

    /// Sends a tree to draft while the target finishes its layers.
    pub fn tree(&mut self, request: TreeRequest) -> Result<PendingTree<'_>> {
        self.stop.store(false, Ordering::Release);
        self.send(Request::Tree(request))?;
        Ok(PendingTree {
            worker: self,
            settled: false,
        })
    }
}

impl Drop for DraftWorker {
    fn drop(&mut self) {
        let _ = self.requests.send(Request::Shutdown);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// A reply the worker owes; taken once, by [`Pending::wait`] or when dropped.
pub(crate) struct Pending<'a> {
    worker: &'a mut DraftWorker,
    taken: bool,
}

impl Pending<'_> {
    pub fn wait(mut self) -> Result<DraftReport> {
        self.taken = true;
        self.worker.receive()
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.taken {
            // The generation ended early: the reply belongs to it, not to the next request.
            let _ = self.worker.receive();
        }
    }
}

/// A tree being drafted: settled once, by [`PendingTree::resolve`] or, when dropped, by
/// abandoning it.
pub(crate) struct PendingTree<'a> {
    worker: &'a mut DraftWorker,
    settled: bool,
}

impl PendingTree<'_> {
    /// The target's final distributions are ready: anytime drafting stops after its pass.
    pub fn target_done(&self) {
        self.worker.stop.store(true, Ordering::Release);
    }

    /// The target accepted `accepted` window tokens and emitted `token` (its final layers done
    /// at `target_done`): the draft hands over the next window.
    pub fn resolve(
        mut self,
        accepted: usize,
        token: u32,
        target_done: Instant,
    ) -> Result<DraftReport> {
        self.settled = true;
        self.worker
            .outcomes
            .send(Outcome::Resolve {
                accepted,
                token,
                target_done,
            })
            .map_err(|_| Error::WorkerFailed("the draft worker has exited".into()))?;
        self.worker.receive()
    }
}

impl Drop for PendingTree<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.worker.stop.store(true, Ordering::Release);
            if self.worker.outcomes.send(Outcome::Abandon).is_ok() {
                let _ = self.worker.receive();
            }
        }
    }
}

/// The worker thread's side.
struct Worker {
    state: DraftState,
    requests: Receiver<Request>,
    outcomes: Receiver<Outcome>,
    replies: Sender<Reply>,
    stop: Arc<AtomicBool>,
    schedule: DraftSchedule,
}

impl Worker {
    fn run(mut self) {
        while let Ok(request) = self.requests.recv() {
            if matches!(request, Request::Shutdown) {
                return;
            }
            // A failure (error or panic) becomes the request's one reply.
            let reply = match catch_unwind(AssertUnwindSafe(|| self.handle(request))) {
                Ok(Ok(report)) => Reply::Done(report),
                Ok(Err(e)) => Reply::Failed(e.to_string()),
                Err(panic) => Reply::Failed(format!("panic: {}", panic_message(&*panic))),
            };
            if self.replies.send(reply).is_err() {
                return;
            }
        }
    }

    fn report(&mut self, window: DraftWindow, source: Option<Source>) -> DraftReport {
        DraftReport {
            window,
            source,
            counters: self.state.take_counters(),
            ..DraftReport::default()
        }
    }

    fn handle(&mut self, request: Request) -> Result<DraftReport> {
        match request {
            Request::Reset {
                capacity,
                position_limit,
                params,
                stop,
            } => {
                self.state.reset(capacity, position_limit, params, stop)?;
                Ok(DraftReport::default())
            }
            Request::Prefill { tokens } => {
                self.state.sync(&tokens)?;
                Ok(self.report(DraftWindow::default(), None))
            }
            Request::Rollout {
                context,
                count,
                seed,
            } => {
                let (window, source) = self.state.window(&context, count, seed)?;
                Ok(self.report(window, Some(source)))
            }
            Request::Tree(tree) => self.tree(tree),
            Request::Shutdown => Ok(DraftReport::default()),
        }
    }

    /// Drafts the tree, then waits for its outcome: the tree and its resolution are one
    /// request with one reply. A failure while drafting is held until then.
    fn tree(&mut self, tree: TreeRequest) -> Result<DraftReport> {
        let (per_pass, stop) = match self.schedule {
            DraftSchedule::Anytime { branches_per_pass } => (branches_per_pass, Some(&*self.stop)),
            DraftSchedule::FullGrid => (tree.plan.len(), None),
        };
        let built = catch_unwind(AssertUnwindSafe(|| {
            self.state.build_tree(&tree, per_pass, stop)
        }))
        .unwrap_or_else(|panic| {
            Err(Error::WorkerFailed(format!(
                "panic: {}",
                panic_message(&*panic)
            )))
        });
        let Ok(Outcome::Resolve {
            accepted,
            token,
            target_done,
        }) = self.outcomes.recv()
        else {
            // Abandoned (or the handle is gone): acknowledge, nothing to hand over.
            self.state.take_counters();
            return Ok(DraftReport::default());
        };
        let branches = built?;
        let completed = branches
            .iter()
            .filter(|b| self.state.is_complete(b, &tree))
            .count();
        let hidden = self.state.hidden_time(target_done);
        let (window, resolution, source) = self.state.resolve(&tree, &branches, accepted, token)?;
        Ok(DraftReport {
            resolution: Some(resolution),
            hidden,
            completed,
            ..self.report(window, Some(source))
        })
    }
}
