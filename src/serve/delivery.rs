//! Delivering a job's answer: a whole response once every choice has finished, or server-sent
//! events as the choices' text arrives (OpenAI's chunks, ending with `data: [DONE]`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;

use super::api::{Choice, Endpoint, ResponseIdentity, Usage};
use super::error::ApiError;
use super::queue::{CancelOnDrop, Completed, JobEvent};
use super::response::LogprobEntry;

/// A queued job seen from its handler: one receiver per choice.
pub(crate) struct Waiting {
    pub receivers: Vec<UnboundedReceiver<JobEvent>>,
    /// Cancels a Mirror job if this handler or stream is dropped (the client went away); the
    /// batched engine's relays see their receivers dropped instead.
    pub _guard: Option<CancelOnDrop>,
    pub deadline: Instant,
    pub timeout: Duration,
}

impl Waiting {
    fn timed_out(&self) -> ApiError {
        ApiError::deadline(self.timeout.as_secs_f64(), None)
    }
}

/// The end of one choice.
async fn finished(receiver: &mut UnboundedReceiver<JobEvent>) -> Result<Completed, ApiError> {
    while let Some(event) = receiver.recv().await {
        if let JobEvent::Finished(result) = event {
            return result;
        }
    }
    Err(ApiError::internal("the engine worker stopped"))
}

pub(crate) async fn whole_response(
    mut waiting: Waiting,
    identity: ResponseIdentity,
    prompt_tokens: usize,
) -> Result<Response, ApiError> {
    let receivers = &mut waiting.receivers;
    let finished = tokio::time::timeout_at(waiting.deadline.into(), async {
        let mut choices = Vec::with_capacity(receivers.len());
        for receiver in receivers.iter_mut() {
            choices.push(finished(receiver).await?);
        }
        Ok::<_, ApiError>(choices)
    })
    .await;
    let completed = match finished {
        Err(_) => return Err(waiting.timed_out()),
        Ok(result) => result?,
    };
    let Some(first) = completed.first() else {
        return Err(ApiError::internal("the request had no choices"));
    };
    let usage = usage(prompt_tokens, &completed);
    let choices: Vec<Choice<'_>> = completed
        .iter()
        .map(|c| Choice {
            text: &c.text,
            finish_reason: c.finish_reason,
            tool_calls: &c.tool_calls,
            logprobs: &c.logprobs,
        })
        .collect();
    let body = identity.complete(&choices, usage, &first.report);
    Ok(axum::Json(body).into_response())
}

fn usage(prompt_tokens: usize, completed: &[Completed]) -> Usage {
    let completion_tokens = completed.iter().map(|c| c.report.token_ids.len()).sum();
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
    }
}

/// One choice's events, with its index.
type ChoiceEvents = std::pin::Pin<Box<dyn Stream<Item = (usize, JobEvent)> + Send>>;

/// Every choice's events in one stream.
type MergedEvents = futures_util::stream::SelectAll<ChoiceEvents>;

/// Every choice's events in one stream, each with its choice's index.
fn merged(receivers: Vec<UnboundedReceiver<JobEvent>>) -> MergedEvents {
    futures_util::stream::select_all(receivers.into_iter().enumerate().map(|(index, receiver)| {
        let events = futures_util::stream::unfold(receiver, move |mut receiver| async move {
            let event = receiver.recv().await?;
            Some(((index, event), receiver))
        });
        Box::pin(events) as ChoiceEvents
    }))
}

/// Waits until an engine takes the job (errors before that get their own status), then
/// streams server-sent events.
pub(crate) async fn stream_response(
    waiting: Waiting,
    identity: ResponseIdentity,
    prompt_tokens: usize,
    include_usage: bool,
) -> Result<Response, ApiError> {
    let Waiting {
        receivers,
        _guard,
        deadline,
        timeout,
    } = waiting;
    let choices = receivers.len();
    let mut events = merged(receivers);
    let first = tokio::time::timeout_at(deadline.into(), events.next()).await;
    let mut pending = VecDeque::new();
    match first {
        Err(_) => return Err(ApiError::deadline(timeout.as_secs_f64(), None)),
        Ok(None) => return Err(ApiError::internal("the engine worker stopped")),
        Ok(Some((_, JobEvent::Finished(Err(error))))) => return Err(error),
        Ok(Some(event)) => pending.push_back(event),
    }
    let stream = EventStream {
        events,
        _guard,
        identity,
        prompt_tokens,
        include_usage,
        sent_text: vec![false; choices],
        pending_logprobs: vec![Vec::new(); choices],
        text_len: vec![0; choices],
        completed: Vec::with_capacity(choices),
        pending_events: pending,
        out: VecDeque::new(),
        done: false,
    };
    Ok(Sse::new(stream.into_stream())
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Turns a job's events into OpenAI's stream of chunks, ending with `data: [DONE]` once every
/// choice has finished.
struct EventStream {
    events: MergedEvents,
    _guard: Option<CancelOnDrop>,
    identity: ResponseIdentity,
    prompt_tokens: usize,
    include_usage: bool,
    /// Whether a text chunk of each choice went out (a chat choice's first carries the role).
    sent_text: Vec<bool>,
    /// Each choice's log-probability entries not yet sent, and its text's length so far.
    pending_logprobs: Vec<Vec<LogprobEntry>>,
    text_len: Vec<usize>,
    /// The choices that have finished.
    completed: Vec<Completed>,
    /// Events received before the stream started.
    pending_events: VecDeque<(usize, JobEvent)>,
    /// Events ready to send.
    out: VecDeque<Event>,
    done: bool,
}

impl EventStream {
    fn into_stream(self) -> impl Stream<Item = Result<Event, Infallible>> + Send {
        futures_util::stream::unfold(self, |mut state| async move {
            loop {
                if let Some(event) = state.out.pop_front() {
                    return Some((Ok(event), state));
                }
                if state.done {
                    return None;
                }
                let next = match state.pending_events.pop_front() {
                    Some(event) => Some(event),
                    None => state.events.next().await,
                };
                state.handle(next);
            }
        })
    }

    fn push(&mut self, data: String) {
        self.out.push_back(Event::default().data(data));
    }

    fn end(&mut self) {
        self.out.push_back(Event::default().data("[DONE]"));
        self.done = true;
    }

    /// A chunk of choice `index`'s text, with the log-probabilities that arrived before it.
    fn text(&mut self, index: usize, text: &str) {
        let logprobs = std::mem::take(&mut self.pending_logprobs[index]);
        let chunk = self.identity.text_chunk(
            index,
            text,
            !self.sent_text[index],
            &logprobs,
            self.text_len[index],
        );
        let data = json_data(&chunk);
        self.sent_text[index] = true;
        self.text_len[index] += text.len();
        self.push(data);
    }

    fn handle(&mut self, event: Option<(usize, JobEvent)>) {
        match event {
            Some((_, JobEvent::Started)) => {}
            Some((index, JobEvent::Logprobs(entries))) => {
                self.pending_logprobs[index].extend(entries);
            }
            Some((index, JobEvent::Text(text))) => self.text(index, &text),
            Some((index, JobEvent::Finished(Ok(completed)))) => {
                let role_due = !self.sent_text[index] && self.identity.endpoint == Endpoint::Chat;
                if role_due || !self.pending_logprobs[index].is_empty() {
                    // The role, or the last tokens' log-probabilities, in a chunk of no text.
                    self.text(index, "");
                }
                if !completed.tool_calls.is_empty() {
                    let chunk = self.identity.tool_calls_chunk(index, &completed.tool_calls);
                    let data = json_data(&chunk);
                    self.push(data);
                }
                let finish =
                    self.identity
                        .finish_chunk(index, completed.finish_reason, &completed.report);
                let data = json_data(&finish);
                self.push(data);
                self.completed.push(completed);
                if self.completed.len() < self.sent_text.len() {
                    return;
                }
                if self.include_usage {
                    let chunk = self
                        .identity
                        .usage_chunk(usage(self.prompt_tokens, &self.completed));
                    let data = json_data(&chunk);
                    self.push(data);
                }
                self.end();
            }
            Some((_, JobEvent::Finished(Err(error)))) => {
                self.out.push_back(Event::default().data(error.body_json()));
                self.end();
            }
            None => {
                let error = ApiError::internal("the engine worker stopped");
                self.out.push_back(Event::default().data(error.body_json()));
                self.end();
            }
        }
    }
}

/// An event's data: `value` as JSON (an OpenAI-shaped error should serializing ever fail).
fn json_data(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| {
        ApiError::internal(format!("a chunk could not be serialized: {e}")).body_json()
    })
}
