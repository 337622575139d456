//! Requests on the batched engine (`ar`, `sd`, `lookup`): admission, and one relay task per
//! choice that turns its [`SequenceStream`] into the [`JobEvent`]s the response code reads,
//! applying stop strings, the deadline and shutdown.
//!
//! A client that goes away drops its receivers; the relay sees that, drops the stream, and the
//! engine cancels the sequence at its next step, giving its KV back to the pool at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mirror_scheduler::{
    EngineLoad, Error, Event, FinishReason, GenerationConfig, SequenceStream, Stats,
};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::watch;

use super::backend::{Batched, Method, PromptEncoder};
use super::error::{ApiError, ServeError};
use super::messages::ToolChoice;
use super::metrics::{Metrics, Outcome};
use super::queue::{engine_error, report, settle, Completed, JobEvent, Timing};
use super::response::LogprobEntry;
use super::stop::StopText;
use super::tool_output::ToolOutput;

/// One request for the batched engine.
pub(crate) struct Submission {
    pub method: Method,
    pub prompt: Vec<u32>,
    pub config: GenerationConfig,
    /// Choices (`n`): the prompt is prefilled once and forked.
    pub choices: usize,
    pub stop: Vec<String>,
    pub received: Instant,
    pub deadline: Instant,
    pub timeout: Duration,
    /// The request field a constraint came from (named in a compile error).
    pub constraint_param: Option<&'static str>,
    /// Whether the output may hold, or is, a tool call.
    pub tool_choice: ToolChoice,
    /// The offered tools' names.
    pub tool_names: Vec<String>,
}

/// A submission's error as the client sees it: a constraint that does not compile is a 400
/// naming the field `param` it came from; anything else is the engine's.
pub(crate) fn constraint_error(e: Error, param: &str) -> ApiError {
    match e {
        Error::InvalidConstraint { .. } => {
            ApiError::invalid_param(param, e.to_string()).with_code("invalid_constraint")
        }
        e => engine_error(ServeError::Engine(e)),
    }
}

/// The batched engine behind the HTTP handlers.
pub(crate) struct BatchedQueue {
    batched: Batched,
    /// Most sequences that may wait for admission; beyond it requests get 503.
    capacity: usize,
    /// Choices submitted and not yet answered.
    in_flight: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    /// Token texts for log-probabilities.
    encoder: PromptEncoder,
}

impl BatchedQueue {
    pub fn new(
        batched: Batched,
        capacity: usize,
        metrics: Arc<Metrics>,
        encoder: PromptEncoder,
    ) -> Self {
        Self {
            batched,
            capacity,
            in_flight: Arc::new(AtomicUsize::new(0)),
            metrics,
            encoder,
        }
    }

    /// The engine's load after its last step.
    pub fn load(&self) -> EngineLoad {
        self.batched.handle.load()
    }

    /// Sequences submitted that the batch has not taken yet (counted from the submissions, so
    /// a burst between two steps is seen whole).
    fn waiting(&self) -> usize {
        let in_flight = self.in_flight.load(Ordering::Acquire);
        in_flight.saturating_sub(self.load().running)
    }

    /// Submits `submission`: one receiver of events per choice, or 503 when too many wait,
    /// or 400 when its constraint does not compile.
    pub fn submit(
        &self,
        submission: Submission,
        aborted: watch::Receiver<bool>,
    ) -> Result<Vec<UnboundedReceiver<JobEvent>>, ApiError> {
        let choices = submission.choices;
        if self.waiting() + choices > self.capacity.max(choices) {
            let retry_after = self.metrics.mean_generation_seconds().ceil() as u64;
            return Err(ApiError::batch_full(
                self.capacity,
                retry_after.clamp(1, 3600),
            ));
        }
        let mut request = self.batched.request(
            submission.method,
            submission.prompt.clone(),
            submission.config.clone(),
        );
        request.deadline = Some(submission.deadline);
        let streams = self
            .batched
            .handle
            .submit_forked(request, choices)
            .map_err(|e| match submission.constraint_param {
                Some(param) => constraint_error(e, param),
                None => engine_error(ServeError::Engine(e)),
            })?;
        let submission = Arc::new(submission);
        let mut receivers = Vec::with_capacity(streams.len());
        for stream in streams {
            let (events, receiver) = unbounded_channel();
            receivers.push(receiver);
            let relay = Relay {
                submission: Arc::clone(&submission),
                events,
                metrics: Arc::clone(&self.metrics),
                encoder: self.encoder.clone(),
                _in_flight: InFlight::new(&self.in_flight),
            };
            tokio::spawn(relay.run(stream, aborted.clone()));
        }
        Ok(receivers)
    }
}

/// Counts a choice in flight for as long as it lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(count))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One choice's relay from its stream to its handler.
struct Relay {
    submission: Arc<Submission>,
    events: UnboundedSender<JobEvent>,
    metrics: Arc<Metrics>,
    encoder: PromptEncoder,
    _in_flight: InFlight,
}

impl Relay {
    async fn run(self, mut stream: SequenceStream, mut aborted: watch::Receiver<bool>) {
        let method = self.submission.method;
        let received = self.submission.received;
        let mut stop = StopText::new(self.submission.stop.clone());
        let mut logprobs: Vec<LogprobEntry> = Vec::new();
        let mut tool_output = ToolOutput::new(
            self.submission.tool_choice.clone(),
            self.submission.tool_names.clone(),
        );
        let mut first_text: Option<Duration> = None;
        let mut tokens: Vec<u32> = Vec::new();
        // The answer cut at a stop string, while the engine's report of it is awaited.
        let mut stopped: Option<Completed> = None;
        let timing = |first_text| Timing {
            // The batch admits within a step: the queue wait is not measured apart.
            queue_wait: Duration::ZERO,
            first_text,
            latency: received.elapsed(),
        };
        let answer = loop {
            let event = tokio::select! {
                _ = self.events.closed() => {
                    // The handler went away (the client, or its deadline, which it awaits
                    // too); dropping the stream cancels the sequence.
                    let outcome = if Instant::now() >= self.submission.deadline {
                        Outcome::Deadline
                    } else {
                        Outcome::Cancelled
                    };
                    let stats = partial_stats(tokens.len());
                    self.metrics.record_generation(
                        method, outcome, Some(&stats), first_text, received.elapsed(),
                    );
                    return;
                }
                _ = aborted.wait_for(|aborted| *aborted) => {
                    self.metrics.record_generation(
                        method, Outcome::Shutdown, None, first_text, received.elapsed(),
                    );
                    break Err(ApiError::shutting_down());
                }
                event = stream.next_event() => event,
            };
            match event {
                // Past a stop string, while its sequence ends.
                Some(Event::Text { .. }) if stopped.is_some() => {}
                Some(Event::Text {
                    tokens: new,
                    text,
                    logprobs: new_logprobs,
                }) => {
                    tokens.extend_from_slice(&new);
                    if !new_logprobs.is_empty() {
                        let entries: Vec<LogprobEntry> = new_logprobs
                            .iter()
                            .map(|lp| LogprobEntry::new(lp, |id| self.encoder.token_text(id)))
                            .collect();
                        logprobs.extend(entries.iter().cloned());
                        let _ = self.events.send(JobEvent::Logprobs(entries));
                    }
                    if !text.is_empty() {
                        first_text.get_or_insert_with(|| received.elapsed());
                    }
                    let out = tool_output.push(&stop.push(&text));
                    self.send_text(out);
                    if stop.stopped() {
                        // A stop string: the sequence is cancelled.
                        let stats = partial_stats(tokens.len());
                        self.metrics.record_generation(
                            method,
                            Outcome::Stop,
                            Some(&stats),
                            first_text,
                            received.elapsed(),
                        );
                        let completed = Completed {
                            text: stop.emitted().to_string(),
                            finish_reason: "stop",
                            report: report(method, tokens.clone(), &stats, timing(first_text)),
                            tool_calls: Vec::new(),
                            logprobs: Vec::new(),
                        };
                        if self.submission.config.monitors.is_none() {
                            // Dropping the stream below cancels the sequence.
                            break Ok(completed);
                        }
                        // The monitors' report comes with the engine's end of the sequence,
                        // at its next step: wait for it (later tokens are past the stop).
                        stream.stop();
                        stopped = Some(completed);
                    }
                }
                Some(Event::Finished(result)) if stopped.is_some() => {
                    let Some(mut completed) = stopped.take() else {
                        continue;
                    };
                    if let Ok(generation) = *result {
                        if let Some(monitors) = &generation.monitors {
                            self.metrics.record_monitors(monitors);
                        }
                        completed.report.monitors = generation.monitors;
                    }
                    break Ok(completed);
                }
                Some(Event::Finished(result)) => match *result {
                    Ok(generation) if generation.finish_reason == FinishReason::Deadline => {
                        self.metrics.record_generation(
                            method,
                            Outcome::Deadline,
                            Some(&generation.stats),
                            first_text,
                            received.elapsed(),
                        );
                        break Err(ApiError::deadline(
                            self.submission.timeout.as_secs_f64(),
                            Some(generation.tokens.len()),
                        ));
                    }
                    Ok(generation) => {
                        break Ok(settle(
                            method,
                            generation,
                            &mut stop,
                            &mut |tail| self.send_text(tool_output.push(&tail)),
                            timing(first_text),
                            &self.metrics,
                        ))
                    }
                    Err(error) => {
                        self.metrics.record_generation(
                            method,
                            Outcome::Error,
                            None,
                            first_text,
                            received.elapsed(),
                        );
                        break Err(engine_error(ServeError::Engine(error)));
                    }
                },
                None => break Err(ApiError::internal("the batched engine stopped")),
            }
        };
        drop(stream);
        let answer = answer.map(|mut completed| {
            completed.logprobs = logprobs;
            let rest = tool_output.finish(&mut completed);
            self.send_text(rest);
            completed
        });
        let _ = self.events.send(JobEvent::Finished(answer));
    }

    fn send_text(&self, text: String) {
        if !text.is_empty() {
            let _ = self.events.send(JobEvent::Text(text));
        }
    }
}

/// Statistics of a sequence that the server ended early (the engine's own never arrive).
fn partial_stats(generated_tokens: usize) -> Stats {
    Stats {
        generated_tokens,
        ..Stats::default()
    }
}
