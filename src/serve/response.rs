//! The response bodies: whole completions, streamed chunks, usage, and the `mirror_sd` report,
//! as typed [`Serialize`] structs (fields in OpenAI's order, `null`s and omissions as OpenAI
//! sends them).
//!
//! `async-openai`'s types were considered and not adopted: its response structs have no room for
//! our `mirror_sd` extension fields, its chunk types serialize fields we omit (and the other way
//! round), and it would bring a large dependency tree (reqwest among it) into the library for
//! a handful of plain structs.

use serde::Serialize;
use serde_json::{Map, Value};

use mirror_core::ToolCall;
use mirror_scheduler::{MonitorReport, TokenLogprob};

use super::api::Endpoint;

/// One choice of a whole response.
#[derive(Debug, Clone, Copy)]
pub struct Choice<'a> {
    /// Its text (the content before any tool calls).
    pub text: &'a str,
    /// `stop`, `length` or `tool_calls`.
    pub finish_reason: &'a str,
    /// The tools it called.
    pub tool_calls: &'a [ToolCall],
    /// Its tokens' log-probability entries (OpenAI's chat shape; empty when not asked for).
    pub logprobs: &'a [LogprobEntry],
}

/// One alternative of a token's log-probability entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopLogprob {
    /// Its text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f64,
    /// Its text's UTF-8 bytes.
    pub bytes: Vec<u8>,
}

/// OpenAI's chat log-probability entry of one token: its text, log-probability, UTF-8 bytes
/// and the likeliest alternatives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogprobEntry {
    /// Its text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f64,
    /// Its text's UTF-8 bytes.
    pub bytes: Vec<u8>,
    /// The likeliest tokens at its position.
    pub top_logprobs: Vec<TopLogprob>,
}

impl LogprobEntry {
    /// The entry of one generated token, `text` giving each token id's text.
    pub(crate) fn new(lp: &TokenLogprob, text: impl Fn(u32) -> String) -> Self {
        let token = text(lp.token);
        Self {
            bytes: token.as_bytes().to_vec(),
            token,
            logprob: f64::from(lp.logprob),
            top_logprobs: lp
                .top
                .iter()
                .map(|&(id, logprob)| {
                    let token = text(id);
                    TopLogprob {
                        bytes: token.as_bytes().to_vec(),
                        token,
                        logprob: f64::from(logprob),
                    }
                })
                .collect(),
        }
    }
}

/// A choice's `logprobs`: chat's `{"content": entries}`, or the legacy completions shape.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Logprobs<'a> {
    /// `/v1/chat/completions`.
    Chat {
        /// One entry per token.
        content: &'a [LogprobEntry],
    },
    /// `/v1/completions`: parallel lists, the alternatives as maps from text to log-probability.
    Completions {
        /// The tokens' texts.
        tokens: Vec<&'a str>,
        /// Their log-probabilities.
        token_logprobs: Vec<f64>,
        /// Their alternatives, text to log-probability.
        top_logprobs: Vec<Map<String, Value>>,
        /// Where each token starts in the choice's text, in bytes.
        text_offset: Vec<usize>,
    },
}

/// OpenAI's function call object: arguments as a JSON string.
#[derive(Debug, Serialize)]
struct FunctionCall<'a> {
    name: &'a str,
    arguments: String,
}

/// One of OpenAI's `tool_calls`; streamed deltas carry their `index`.
#[derive(Debug, Serialize)]
struct ToolCallObject<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionCall<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
}

fn tool_call_objects(calls: &[ToolCall], indexed: bool) -> Vec<ToolCallObject<'_>> {
    calls
        .iter()
        .enumerate()
        .map(|(i, call)| ToolCallObject {
            id: &call.id,
            kind: "function",
            function: FunctionCall {
                name: &call.name,
                arguments: call.arguments.to_string(),
            },
            index: indexed.then_some(i),
        })
        .collect()
}

/// The assistant's message of a whole chat choice.
#[derive(Debug, Serialize)]
struct Message<'a> {
    role: &'static str,
    /// `null` when the choice called tools and said nothing.
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<ToolCallObject<'a>>>,
}

/// A streamed chat choice's increment.
#[derive(Debug, Default, Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<ToolCallObject<'a>>>,
}

/// What a choice carries besides its index, log-probabilities and finish reason.
#[derive(Debug, Serialize)]
enum Body<'a> {
    /// A whole chat choice.
    #[serde(rename = "message")]
    Message(Message<'a>),
    /// A streamed chat choice.
    #[serde(rename = "delta")]
    Delta(Delta<'a>),
    /// A completions choice, whole or streamed.
    #[serde(rename = "text")]
    Text(&'a str),
}

/// One element of `choices`, whole or streamed: `{"index", "message" | "delta" | "text",
/// "logprobs", "finish_reason"}`.
#[derive(Debug, Serialize)]
pub struct ChoiceObject<'a> {
    index: usize,
    #[serde(flatten)]
    body: Body<'a>,
    logprobs: Option<Logprobs<'a>>,
    finish_reason: Option<&'a str>,
}

/// A whole response or a streamed chunk: `{"id", "object", "created", "model", "choices"}`,
/// with `usage` and `mirror_sd` where they belong.
#[derive(Debug, Serialize)]
pub struct ResponseBody<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<ChoiceObject<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mirror_sd: Option<&'a GenerationReport>,
}

/// Token counts of a response.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    /// Tokens of the prompt (chat template included).
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

/// The response extension field `mirror_sd`: how the generation went.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationReport {
    /// `ar`, `sd`, `lookup` or `mirror`.
    pub method: &'static str,
    /// The generated token ids (all committed tokens, a stop sequence's included).
    pub token_ids: Vec<u32>,
    /// Time the request waited in the queue, in milliseconds.
    pub queue_ms: f64,
    /// From arrival to the first committed text, in milliseconds.
    pub time_to_first_token_ms: Option<f64>,
    /// The generation itself (prefill included), in milliseconds.
    pub generation_ms: f64,
    /// Generated tokens per second of generation time.
    pub tokens_per_second: f64,
    /// Window length (0 for `ar`).
    pub gamma: usize,
    /// Windows verified.
    pub windows: usize,
    /// Mean accepted draft tokens per window, E[A].
    pub mean_accepted: f64,
    /// Tokens committed per target forward pass.
    pub tokens_per_target_pass: f64,
    /// Acceptance rate of each window position.
    pub acceptance_by_position: Vec<f64>,
    /// Mirror: share of next windows served from the hypothesis tree.
    pub reuse_rate: f64,
    /// Share of the draft's compute hidden behind the target.
    pub draft_hidden_fraction: f64,
    /// The summaries of the monitors `mirror_sd.monitors` asked for (omitted otherwise), and
    /// the reading that stopped the generation under `early_stop`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub monitors: Option<MonitorReport>,
}

/// OpenAI's `created`: seconds since the Unix epoch.
pub fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Identity of one response: its id, creation time and model.
#[derive(Debug, Clone)]
pub struct ResponseIdentity {
    /// `chatcmpl-...` or `cmpl-...`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The served model's name.
    pub model: String,
    /// Which endpoint.
    pub endpoint: Endpoint,
}

impl ResponseIdentity {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completions, _) => "text_completion",
        }
    }

    fn envelope<'a>(&'a self, chunk: bool, choices: Vec<ChoiceObject<'a>>) -> ResponseBody<'a> {
        ResponseBody {
            id: &self.id,
            object: self.object(chunk),
            created: self.created,
            model: &self.model,
            choices,
            usage: None,
            mirror_sd: None,
        }
    }

    /// The whole (non-streaming) response: one choice each, and the first choice's report.
    pub fn complete<'a>(
        &'a self,
        choices: &[Choice<'a>],
        usage: Usage,
        report: &'a GenerationReport,
    ) -> ResponseBody<'a> {
        let choices = choices
            .iter()
            .enumerate()
            .map(|(index, choice)| {
                let body = match self.endpoint {
                    Endpoint::Chat => {
                        let called = !choice.tool_calls.is_empty();
                        Body::Message(Message {
                            role: "assistant",
                            content: (!called || !choice.text.is_empty()).then_some(choice.text),
                            tool_calls: called.then(|| tool_call_objects(choice.tool_calls, false)),
                        })
                    }
                    Endpoint::Completions => Body::Text(choice.text),
                };
                ChoiceObject {
                    index,
                    body,
                    logprobs: self.logprobs(choice.logprobs, 0),
                    finish_reason: Some(choice.finish_reason),
                }
            })
            .collect();
        ResponseBody {
            usage: Some(usage),
            mirror_sd: Some(report),
            ..self.envelope(false, choices)
        }
    }

    /// The `logprobs` field of a choice: `null` without entries; for chat `{"content":
    /// entries}`; for completions OpenAI's legacy shape (`tokens`, `token_logprobs`,
    /// `top_logprobs` as maps, `text_offset` counted from `offset`).
    pub fn logprobs<'a>(&self, entries: &'a [LogprobEntry], offset: usize) -> Option<Logprobs<'a>> {
        if entries.is_empty() {
            return None;
        }
        Some(match self.endpoint {
            Endpoint::Chat => Logprobs::Chat { content: entries },
            Endpoint::Completions => {
                let mut text_offset = Vec::with_capacity(entries.len());
                let mut at = offset;
                for entry in entries {
                    text_offset.push(at);
                    at += entry.token.len();
                }
                Logprobs::Completions {
                    tokens: entries.iter().map(|e| e.token.as_str()).collect(),
                    token_logprobs: entries.iter().map(|e| e.logprob).collect(),
                    top_logprobs: entries
                        .iter()
                        .map(|e| {
                            e.top_logprobs
                                .iter()
                                .map(|a| (a.token.clone(), Value::from(a.logprob)))
                                .collect()
                        })
                        .collect(),
                    text_offset,
                }
            }
        })
    }

    fn chunk<'a>(
        &'a self,
        index: usize,
        body: Body<'a>,
        finish: Option<&'a str>,
    ) -> ResponseBody<'a> {
        self.chunk_with_logprobs(index, body, None, finish)
    }

    fn chunk_with_logprobs<'a>(
        &'a self,
        index: usize,
        body: Body<'a>,
        logprobs: Option<Logprobs<'a>>,
        finish_reason: Option<&'a str>,
    ) -> ResponseBody<'a> {
        let choice = ChoiceObject {
            index,
            body,
            logprobs,
            finish_reason,
        };
        self.envelope(true, vec![choice])
    }

    /// A streamed chunk carrying choice `index`'s `text` (a chat choice's first chunk also
    /// carries the role) and the log-probability entries of the tokens since the last chunk
    /// (`offset`: the choice's text length before this chunk).
    pub fn text_chunk<'a>(
        &'a self,
        index: usize,
        text: &'a str,
        first: bool,
        logprobs: &'a [LogprobEntry],
        offset: usize,
    ) -> ResponseBody<'a> {
        let body = match self.endpoint {
            Endpoint::Chat => Body::Delta(Delta {
                role: first.then_some("assistant"),
                content: Some(text),
                tool_calls: None,
            }),
            Endpoint::Completions => Body::Text(text),
        };
        self.chunk_with_logprobs(index, body, self.logprobs(logprobs, offset), None)
    }

    /// A streamed chunk with choice `index`'s tool calls, whole.
    pub fn tool_calls_chunk<'a>(&'a self, index: usize, calls: &'a [ToolCall]) -> ResponseBody<'a> {
        let delta = Delta {
            tool_calls: Some(tool_call_objects(calls, true)),
            ..Delta::default()
        };
        self.chunk(index, Body::Delta(delta), None)
    }

    /// Choice `index`'s last content chunk: its finish reason and its `mirror_sd` report.
    pub fn finish_chunk<'a>(
        &'a self,
        index: usize,
        finish_reason: &'a str,
        report: &'a GenerationReport,
    ) -> ResponseBody<'a> {
        let body = match self.endpoint {
            Endpoint::Chat => Body::Delta(Delta::default()),
            Endpoint::Completions => Body::Text(""),
        };
        ResponseBody {
            mirror_sd: Some(report),
            ..self.chunk(index, body, Some(finish_reason))
        }
    }

    /// The usage chunk of `stream_options.include_usage` (no choices).
    pub fn usage_chunk(&self, usage: Usage) -> ResponseBody<'_> {
        ResponseBody {
            usage: Some(usage),
            ..self.envelope(true, Vec::new())
        }
    }
}
