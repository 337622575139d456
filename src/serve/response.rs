//! The response bodies: whole completions, streamed chunks, usage, and the `mirror_sd` report.

use serde::Serialize;
use serde_json::{json, Map, Value};

use mirror_core::ToolCall;

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
    pub logprobs: &'a [Value],
}

/// OpenAI's `tool_calls`: arguments as a JSON string; streamed deltas carry their `index`.
fn tool_calls_json(calls: &[ToolCall], indexed: bool) -> Value {
    Value::Array(
        calls
            .iter()
            .enumerate()
            .map(|(i, call)| {
                let mut value = json!({
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments.to_string()},
                });
                if indexed {
                    value["index"] = json!(i);
                }
                value
            })
            .collect(),
    )
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

    fn envelope(&self, chunk: bool, choices: Value) -> Map<String, Value> {
        let mut body = Map::new();
        body.insert("id".into(), json!(self.id));
        body.insert("object".into(), json!(self.object(chunk)));
        body.insert("created".into(), json!(self.created));
        body.insert("model".into(), json!(self.model));
        body.insert("choices".into(), choices);
        body
    }

    /// The whole (non-streaming) response: one choice each, and the first choice's report.
    pub fn complete(
        &self,
        choices: &[Choice<'_>],
        usage: Usage,
        report: &GenerationReport,
    ) -> Value {
        let choices: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(index, choice)| match self.endpoint {
                Endpoint::Chat => {
                    let mut message = json!({"role": "assistant", "content": choice.text});
                    if !choice.tool_calls.is_empty() {
                        message["tool_calls"] = tool_calls_json(choice.tool_calls, false);
                        if choice.text.is_empty() {
                            message["content"] = Value::Null;
                        }
                    }
                    json!({
                        "index": index,
                        "message": message,
                        "logprobs": self.logprobs_json(choice.logprobs, 0),
                        "finish_reason": choice.finish_reason,
                    })
                }
                Endpoint::Completions => json!({
                    "index": index,
                    "text": choice.text,
                    "logprobs": self.logprobs_json(choice.logprobs, 0),
                    "finish_reason": choice.finish_reason,
                }),
            })
            .collect();
        let mut body = self.envelope(false, Value::Array(choices));
        body.insert("usage".into(), json!(usage));
        body.insert("mirror_sd".into(), json!(report));
        Value::Object(body)
    }

    /// The `logprobs` field of a choice: `null` without entries; for chat `{"content":
    /// entries}`; for completions OpenAI's legacy shape (`tokens`, `token_logprobs`,
    /// `top_logprobs` as maps, `text_offset` counted from `offset`).
    pub fn logprobs_json(&self, entries: &[Value], offset: usize) -> Value {
        if entries.is_empty() {
            return Value::Null;
        }
        match self.endpoint {
            Endpoint::Chat => json!({ "content": entries }),
            Endpoint::Completions => {
                let mut text_offset = Vec::with_capacity(entries.len());
                let mut at = offset;
                for entry in entries {
                    text_offset.push(at);
                    at += entry["token"].as_str().map_or(0, str::len);
                }
                let top: Vec<Value> = entries
                    .iter()
                    .map(|e| {
                        let alternatives =
                            e["top_logprobs"].as_array().cloned().unwrap_or_default();
                        Value::Object(
                            alternatives
                                .iter()
                                .map(|a| {
                                    (
                                        a["token"].as_str().unwrap_or("").to_string(),
                                        a["logprob"].clone(),
                                    )
                                })
                                .collect(),
                        )
                    })
                    .collect();
                json!({
                    "tokens": entries.iter().map(|e| e["token"].clone()).collect::<Vec<_>>(),
                    "token_logprobs": entries.iter().map(|e| e["logprob"].clone()).collect::<Vec<_>>(),
                    "top_logprobs": top,
                    "text_offset": text_offset,
                })
            }
        }
    }

    /// A streamed chunk carrying choice `index`'s `text` (a chat choice's first chunk also
    /// carries the role) and the log-probability entries of the tokens since the last chunk
    /// (`offset`: the choice's text length before this chunk).
    pub fn text_chunk_with_logprobs(
        &self,
        index: usize,
        text: &str,
        first: bool,
        logprobs: &[Value],
        offset: usize,
    ) -> Value {
        let mut chunk = self.text_chunk(index, text, first);
        chunk["choices"][0]["logprobs"] = self.logprobs_json(logprobs, offset);
        chunk
    }

    /// A streamed chunk carrying choice `index`'s `text` (a chat choice's first chunk also
    /// carries the role).
    pub fn text_chunk(&self, index: usize, text: &str, first: bool) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat if first => json!({
                "index": index,
                "delta": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": null,
            }),
            Endpoint::Chat => json!({
                "index": index, "delta": {"content": text}, "logprobs": null, "finish_reason": null,
            }),
            Endpoint::Completions => json!({
                "index": index, "text": text, "logprobs": null, "finish_reason": null,
            }),
        };
        Value::Object(self.envelope(true, json!([choice])))
    }

    /// A streamed chunk with choice `index`'s tool calls, whole.
    pub fn tool_calls_chunk(&self, index: usize, calls: &[ToolCall]) -> Value {
        let choice = json!({
            "index": index,
            "delta": {"tool_calls": tool_calls_json(calls, true)},
            "logprobs": null,
            "finish_reason": null,
        });
        Value::Object(self.envelope(true, json!([choice])))
    }

    /// Choice `index`'s last content chunk: its finish reason and its `mirror_sd` report.
    pub fn finish_chunk(
        &self,
        index: usize,
        finish_reason: &str,
        report: &GenerationReport,
    ) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": index, "delta": {}, "logprobs": null, "finish_reason": finish_reason,
            }),
            Endpoint::Completions => json!({
                "index": index, "text": "", "logprobs": null, "finish_reason": finish_reason,
            }),
        };
        let mut body = self.envelope(true, json!([choice]));
        body.insert("mirror_sd".into(), json!(report));
        Value::Object(body)
    }

    /// The usage chunk of `stream_options.include_usage` (no choices).
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        let mut body = self.envelope(true, json!([]));
        body.insert("usage".into(), json!(usage));
        Value::Object(body)
    }
}
