//! The bounded request queue in front of the one-sequence engine (Mirror) and the worker thread
//! that owns it; the other methods run on the batched engine (`batched.rs`).
//!
//! One sequence runs at a time: the worker takes a job, generates, and reports text pieces and
//! the result through the job's channel. At every commit it checks whether the client is still
//! there, the deadline, and shutdown; any of them stops the generation at that commit, so the
//! engine is free for the next job within one window.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mirror_core::{panic_message, ToolCall};
use mirror_scheduler::{FinishReason, Generation, GenerationConfig, Stats, StreamControl};
use tokio::sync::mpsc::UnboundedSender;

use super::api::GenerationReport;
use super::backend::{Backend, Method};
use super::error::{ApiError, ServeError};
use super::metrics::{Metrics, Outcome, QueueGauges, Skipped};
use super::response::LogprobEntry;
use super::stop::StopText;

/// One request for the Mirror engine.
pub struct Job {
    /// Prompt token ids (checked against the context and vocabulary).
    pub prompt: Vec<u32>,
    /// Length, sampling, seed, end-of-sequence handling.
    pub config: GenerationConfig,
    /// Stop strings.
    pub stop: Vec<String>,
    /// When the request arrived.
    pub received: Instant,
    /// The request's deadline, and its length (for messages).
    pub deadline: Instant,
    /// `deadline - received`.
    pub timeout: Duration,
    /// Set when the client is gone (its response future or stream was dropped).
    pub cancel: Arc<AtomicBool>,
    /// Where the worker reports.
    pub events: UnboundedSender<JobEvent>,
}

/// What the worker reports about a job.
// The last event carries the whole answer; it is sent once per choice, so boxing it would
// save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum JobEvent {
    /// The engine took the job.
    Started,
    /// Newly committed text (stop strings already cut out).
    Text(String),
    /// Log-probabilities of newly committed tokens (OpenAI's chat entries), sent before the
    /// text that carries them.
    Logprobs(Vec<LogprobEntry>),
    /// The end: the whole result, or the error to answer with.
    Finished(Result<Completed, ApiError>),
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Completed {
    /// The whole text (what was streamed, in order).
    pub text: String,
    /// OpenAI's finish reason: `stop`, `length` or `tool_calls`, or our `monitor`.
    pub finish_reason: &'static str,
    /// Statistics and token ids for the `mirror_sd` response field.
    pub report: GenerationReport,
    /// The tools the model called (its text is then what came before the calls).
    pub tool_calls: Vec<ToolCall>,
    /// Every token's log-probability entry (OpenAI's chat shape), when asked for.
    pub logprobs: Vec<LogprobEntry>,
}

/// Sets the job's cancel flag when dropped: held by whatever delivers the response, so a
/// client that goes away cancels its job whether it is queued or running.
#[derive(Debug)]
pub struct CancelOnDrop(Arc<AtomicBool>);

impl CancelOnDrop {
    /// A guard and the flag it sets.
    pub fn new() -> (Self, Arc<AtomicBool>) {
        let flag = Arc::new(AtomicBool::new(false));
        (Self(Arc::clone(&flag)), flag)
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// State shared by the queue's handle and the worker.
#[derive(Debug)]
struct Shared {
    depth: AtomicUsize,
    busy: AtomicBool,
    draining: AtomicBool,
    abort: AtomicBool,
    /// The same as `abort`, for the batched engine's relays, which await it.
    aborted: tokio::sync::watch::Sender<bool>,
    metrics: Arc<Metrics>,
}

/// The queue's handle, used by the HTTP handlers.
pub struct RequestQueue {
    sender: Mutex<Option<SyncSender<Job>>>,
    capacity: usize,
    shared: Arc<Shared>,
}

impl RequestQueue {
    /// Starts the worker thread, which owns `backend`; at most `capacity` jobs wait.
    pub fn start(
        backend: Backend,
        capacity: usize,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, JoinHandle<()>), ServeError> {
        let (sender, receiver) = sync_channel(capacity);
        let shared = Arc::new(Shared {
            depth: AtomicUsize::new(0),
            busy: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            abort: AtomicBool::new(false),
            aborted: tokio::sync::watch::Sender::new(false),
            metrics,
        });
        let worker_shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("mirror-sd-engine".into())
            .spawn(move || run_worker(backend, receiver, &worker_shared))?;
        Ok((
            Self {
                sender: Mutex::new(Some(sender)),
                capacity,
                shared,
            },
            handle,
        ))
    }

    /// Queues `job`, or answers 429 (full) or 503 (shutting down).
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        if self.draining() {
            return Err(ApiError::shutting_down());
        }
        let guard = self.sender.lock().unwrap_or_else(|e| e.into_inner());
        let Some(sender) = guard.as_ref() else {
            return Err(ApiError::shutting_down());
        };
        // Counted before sending so that the worker's decrement never runs first.
        let depth = self.shared.depth.fetch_add(1, Ordering::AcqRel);
        match sender.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.shared.depth.fetch_sub(1, Ordering::AcqRel);
                match e {
                    TrySendError::Full(_) => Err(ApiError::queue_full(
                        self.capacity,
                        self.retry_after_s(depth),
                    )),
                    TrySendError::Disconnected(_) => Err(ApiError::shutting_down()),
                }
            }
        }
    }

    /// Seconds until a place is likely free: the waiting jobs and the running one at the mean
    /// generation time so far (at least 1).
    fn retry_after_s(&self, depth: usize) -> u64 {
        let estimate = self.shared.metrics.mean_generation_seconds() * (depth + 1) as f64;
        (estimate.ceil() as u64).clamp(1, 3600)
    }

    /// Queue depth, capacity, whether the engine is busy and whether the server drains.
    pub fn gauges(&self) -> QueueGauges {
        QueueGauges {
            depth: self.shared.depth.load(Ordering::Acquire),
            capacity: self.capacity,
            engine_busy: self.shared.busy.load(Ordering::Acquire),
            draining: self.draining(),
            batch: None,
        }
    }

    /// Resolves once [`RequestQueue::abort`] was called (at once if it was).
    pub fn aborted(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shared.aborted.subscribe()
    }

    /// Whether shutdown has begun (new requests get 503).
    pub fn draining(&self) -> bool {
        self.shared.draining.load(Ordering::Acquire)
    }

    /// Refuses new jobs; queued and running ones go on.
    pub fn begin_drain(&self) {
        self.shared.draining.store(true, Ordering::Release);
    }

    /// Stops the running generation at its next commit and refuses the queued jobs (the end
    /// of the shutdown grace period).
    pub fn abort(&self) {
        self.begin_drain();
        self.shared.abort.store(true, Ordering::Release);
        self.shared.aborted.send_replace(true);
    }

    /// Closes the queue: the worker exits once the jobs already queued are handled.
    pub fn close(&self) {
        self.sender.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

fn run_worker(mut backend: Backend, jobs: Receiver<Job>, shared: &Shared) {
    for job in jobs.iter() {
        shared.depth.fetch_sub(1, Ordering::AcqRel);
        let skipped = if job.cancel.load(Ordering::Acquire) {
            Some((Skipped::ClientGone, None))
        } else if shared.abort.load(Ordering::Acquire) {
            Some((Skipped::Shutdown, Some(ApiError::shutting_down())))
        } else if Instant::now() >= job.deadline {
            Some((
                Skipped::Deadline,
                Some(ApiError::deadline(job.timeout.as_secs_f64(), None)),
            ))
        } else {
            None
        };
        if let Some((why, answer)) = skipped {
            shared.metrics.record_skipped(why);
            if let Some(error) = answer {
                let _ = job.events.send(JobEvent::Finished(Err(error)));
            }
            continue;
        }
        let queue_wait = job.received.elapsed();
        shared.metrics.record_queue_wait(queue_wait);
        shared.busy.store(true, Ordering::Release);
        let _ = job.events.send(JobEvent::Started);
        run_job(&mut backend, job, queue_wait, shared);
    }
}

/// Marks the engine idle, then delivers the job's answer: a client that has its answer sees
/// the engine idle (a stale "busy" would let it mistake this job for the next one).
fn finish(job: &Job, answer: Result<Completed, ApiError>, shared: &Shared) {
    shared.busy.store(false, Ordering::Release);
    let _ = job.events.send(JobEvent::Finished(answer));
}

/// Why the server stopped a generation early.
#[derive(Debug, Clone, Copy)]
enum Interruption {
    ClientGone,
    Deadline,
    Shutdown,
}

fn interruption(job: &Job, shared: &Shared) -> Option<Interruption> {
    // The deadline first: a handler that timed out also drops its guard.
    if Instant::now() >= job.deadline {
        Some(Interruption::Deadline)
    } else if job.cancel.load(Ordering::Acquire) {
        Some(Interruption::ClientGone)
    } else if shared.abort.load(Ordering::Acquire) {
        Some(Interruption::Shutdown)
    } else {
        None
    }
}

fn run_job(backend: &mut Backend, job: Job, queue_wait: Duration, shared: &Shared) {
    let mut stop = StopText::new(job.stop.clone());
    let mut first_text: Option<Duration> = None;
    let mut interrupted: Option<Interruption> = None;
    let mut logprobs: Vec<LogprobEntry> = Vec::new();
    let encoder = backend.encoder();
    let result = catch_unwind(AssertUnwindSafe(|| {
        backend.generate_mirror(&job.prompt, &job.config, |piece, new_logprobs| {
            if !new_logprobs.is_empty() {
                let entries: Vec<LogprobEntry> = new_logprobs
                    .iter()
                    .map(|lp| LogprobEntry::new(lp, |id| encoder.token_text(id)))
                    .collect();
                logprobs.extend(entries.iter().cloned());
                let _ = job.events.send(JobEvent::Logprobs(entries));
            }
            if piece.is_empty() {
                return StreamControl::Continue;
            }
            first_text.get_or_insert_with(|| job.received.elapsed());
            let out = stop.push(piece);
            if !out.is_empty() && job.events.send(JobEvent::Text(out)).is_err() {
                // Nobody listens; a deadline that passed explains why first.
                interrupted = interruption(&job, shared).or(Some(Interruption::ClientGone));
                return StreamControl::Stop;
            }
            if stop.stopped() {
                return StreamControl::Stop;
            }
            interrupted = interruption(&job, shared);
            match interrupted {
                Some(_) => StreamControl::Stop,
                None => StreamControl::Continue,
            }
        })
    }));
    let latency = job.received.elapsed();
    let metrics = &shared.metrics;
    let record = |outcome: Outcome, generation: Option<&Generation>| {
        metrics.record_generation(
            Method::Mirror,
            outcome,
            generation.map(|g| &g.stats),
            first_text,
            latency,
        );
    };
    let answer = match result {
        Err(panic) => {
            record(Outcome::Error, None);
            Err(ApiError::internal(format!(
                "the engine panicked: {}",
                panic_message(panic.as_ref())
            )))
        }
        Ok(Err(error)) => {
            record(Outcome::Error, None);
            Err(engine_error(error))
        }
        Ok(Ok(generation)) => match interrupted {
            Some(Interruption::ClientGone) => {
                record(Outcome::Cancelled, Some(&generation));
                shared.busy.store(false, Ordering::Release);
                return;
            }
            Some(Interruption::Deadline) => {
                record(Outcome::Deadline, Some(&generation));
                Err(ApiError::deadline(
                    job.timeout.as_secs_f64(),
                    Some(generation.tokens.len()),
                ))
            }
            Some(Interruption::Shutdown) => {
                record(Outcome::Shutdown, Some(&generation));
                Err(ApiError::shutting_down())
            }
            None => {
                let mut completed = settle(
                    Method::Mirror,
                    generation,
                    &mut stop,
                    &mut |tail| {
                        let _ = job.events.send(JobEvent::Text(tail));
                    },
                    Timing {
                        queue_wait,
                        first_text,
                        latency,
                    },
                    metrics,
                );
                completed.logprobs = logprobs;
                Ok(completed)
            }
        },
    };
    finish(&job, answer, shared);
}

/// When a generation's request waited, first showed text, and ended.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub queue_wait: Duration,
    pub first_text: Option<Duration>,
    pub latency: Duration,
}

/// A generation that ended by itself (not interrupted): gives `emit` the text the stop strings
/// held back, records it, and returns the answer.
pub(crate) fn settle(
    method: Method,
    generation: Generation,
    stop: &mut StopText,
    emit: &mut dyn FnMut(String),
    timing: Timing,
    metrics: &Metrics,
) -> Completed {
    let tail = stop.finish(generation.text.as_deref().unwrap_or(""));
    if !tail.is_empty() {
        emit(tail);
    }
    let finish_reason = match generation.finish_reason {
        FinishReason::Length | FinishReason::ContextLimit if !stop.stopped() => "length",
        FinishReason::Monitor if !stop.stopped() => "monitor",
        _ => "stop",
    };
    let outcome = match finish_reason {
        "stop" => Outcome::Stop,
        "monitor" => Outcome::Monitor,
        _ => Outcome::Length,
    };
    if let Some(monitors) = &generation.monitors {
        metrics.record_monitors(monitors);
    }
    metrics.record_generation(
        method,
        outcome,
        Some(&generation.stats),
        timing.first_text,
        timing.latency,
    );
    let mut report = report(method, generation.tokens, &generation.stats, timing);
    report.monitors = generation.monitors;
    Completed {
        text: stop.emitted().to_string(),
        finish_reason,
        report,
        tool_calls: Vec::new(),
        logprobs: Vec::new(),
    }
}

/// The `mirror_sd` field of a response.
pub(crate) fn report(
    method: Method,
    tokens: Vec<u32>,
    stats: &Stats,
    timing: Timing,
) -> GenerationReport {
    GenerationReport {
        method: method.as_str(),
        queue_ms: timing.queue_wait.as_secs_f64() * 1e3,
        time_to_first_token_ms: timing.first_text.map(|d| d.as_secs_f64() * 1e3),
        generation_ms: stats.time.total.as_secs_f64() * 1e3,
        tokens_per_second: stats.tokens_per_second(),
        gamma: stats.gamma,
        windows: stats.windows,
        mean_accepted: stats.mean_accepted(),
        tokens_per_target_pass: stats.tokens_per_target_pass(),
        acceptance_by_position: stats.acceptance_by_position(),
        reuse_rate: stats.reuse_rate(),
        draft_hidden_fraction: stats.hidden_fraction(),
        token_ids: tokens,
        monitors: None,
    }
}

/// Bad prompts the HTTP side could not see are the client's fault; anything else is ours.
pub(crate) fn engine_error(error: ServeError) -> ApiError {
    use mirror_scheduler::Error;
    match &error {
        ServeError::Engine(Error::InvalidPrompt(message)) => ApiError::invalid(message.clone()),
        // A setting the engine refused for this request (a monitor's layer, say).
        ServeError::Engine(Error::InvalidConfig(_)) => ApiError::invalid(error.to_string()),
        ServeError::Engine(Error::Core(mirror_core::Error::TokenOutOfRange { .. })) => {
            ApiError::invalid(error.to_string())
        }
        ServeError::Engine(Error::MemoryBudget { .. }) => {
            ApiError::invalid(error.to_string()).with_code("context_length_exceeded")
        }
        _ => ApiError::internal(error.to_string()),
    }
}
