//! The OpenAI request bodies the server accepts, their validation, and the response bodies.
//!
//! Requests are checked strictly: an unknown field, a wrong type or an out-of-range value is a
//! 400 naming the field, so that a client never silently gets something it did not ask for.

use std::time::Duration;

use mirror_core::sampling::{Penalties, SamplingParams};
use mirror_core::{ChatMessage, Tool};
use mirror_scheduler::{Constraint, MonitorConfig};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::backend::Method;
use super::error::ApiError;
pub use super::fields::MAX_TOP_LOGPROBS;
use super::fields::{parse_logprobs, parse_monitors};
use super::messages::{forced_call_constraint, parse_messages, parse_tools, ToolChoice};
pub use super::response::{unix_seconds, Choice, GenerationReport, ResponseIdentity, Usage};

/// The request extension field: `"mirror_sd": {"method": "sd", "ignore_eos": true, "timeout_s": 30}`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeculationOptions {
    /// `ar` (the target alone), `sd` (vanilla speculative decoding) or `mirror`.
    pub method: Option<String>,
    /// Generate past end-of-sequence tokens (fixed-length outputs for load tests).
    #[serde(default)]
    pub ignore_eos: bool,
    /// This request's deadline in seconds, at most the server's `--request-timeout-s`.
    pub timeout_s: Option<f64>,
    /// Output in the language of this Lark grammar (llguidance's dialect).
    pub grammar: Option<String>,
    /// Output matching this regular expression.
    pub regex: Option<String>,
    /// The repetition penalty (transformers' and llama.cpp's definition; 1 is neutral).
    pub repetition_penalty: Option<f64>,
    /// Generation monitors to run: `["instability", "path_deviation", "latent_trajectory"]`.
    pub monitors: Option<Value>,
    /// Their parameters and `early_stop` (a `MonitorConfig`; see `fields`).
    pub monitor_options: Option<Value>,
}

/// OpenAI's `response_format`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonSchemaFormat {
    /// OpenAI requires a name; it names nothing here.
    #[allow(dead_code)]
    name: String,
    #[allow(dead_code)]
    description: Option<String>,
    schema: Option<Value>,
    /// Accepted: the schema is always enforced.
    #[allow(dead_code)]
    strict: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Fields shared by chat and text completions (the prompt or messages are taken out first).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SharedFields {
    model: String,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<u64>,
    seed: Option<u64>,
    stop: Option<Value>,
    n: Option<u64>,
    response_format: Option<ResponseFormat>,
    frequency_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    /// Chat: `true`/`false`; completions: how many alternatives.
    logprobs: Option<Value>,
    top_logprobs: Option<u64>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    /// Accepted: a forced call is one call; an `auto` output may hold several.
    #[allow(dead_code)]
    parallel_tool_calls: Option<bool>,
    logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    /// Accepted and ignored: this server stores no completions.
    #[allow(dead_code)]
    metadata: Option<Map<String, Value>>,
    /// Accepted and ignored: this server stores no completions.
    #[allow(dead_code)]
    store: Option<bool>,
    /// Accepted and ignored: there is one tier.
    #[allow(dead_code)]
    service_tier: Option<String>,
    /// Accepted and ignored: the prefix cache finds shared prompts by itself.
    #[allow(dead_code)]
    prompt_cache_key: Option<String>,
    /// Accepted and ignored, as `user`.
    #[allow(dead_code)]
    safety_identifier: Option<String>,
    /// OpenAI's end-user tag: accepted and ignored.
    #[allow(dead_code)]
    user: Option<String>,
    mirror_sd: Option<SpeculationOptions>,
}

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Chat messages, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Raw text (BOS added where the model expects one).
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
}

impl Endpoint {
    /// The route.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }
}

/// A request that passed every check that does not need the tokenizer.
#[derive(Debug, Clone)]
pub struct ParsedRequest {
    /// The model the client named.
    pub model: String,
    /// Messages, text or token ids.
    pub prompt: PromptInput,
    /// Stream server-sent events.
    pub stream: bool,
    /// Streaming: send a last chunk with `usage` (OpenAI's `stream_options.include_usage`).
    pub include_usage: bool,
    /// Most tokens to generate, when given (checked against the context after tokenizing).
    pub max_tokens: Option<u64>,
    /// Temperature, top-k, top-p.
    pub sampling: SamplingParams,
    /// Seed of the sampling stream.
    pub seed: u64,
    /// Stop strings (at most four, none empty).
    pub stop: Vec<String>,
    /// The method the request asked for, if any.
    pub method: Option<Method>,
    /// Keep generating past end-of-sequence.
    pub ignore_eos: bool,
    /// This request's own deadline, if any.
    pub timeout: Option<Duration>,
    /// Choices to generate (`n`), from one prefill of the prompt.
    pub choices: usize,
    /// What the output must match (`response_format`, `mirror_sd.grammar` or `mirror_sd.regex`),
    /// with the request field that asked for it.
    pub constraint: Option<(Constraint, &'static str)>,
    /// Frequency, presence and repetition penalties and logit bias.
    pub penalties: Penalties,
    /// Tools the model may call (chat only).
    pub tools: Vec<Tool>,
    /// Whether a call is forced, and of which tool.
    pub tool_choice: ToolChoice,
    /// Return log-probabilities, with this many alternatives per token.
    pub logprobs: Option<usize>,
    /// Generation monitors (`mirror_sd.monitors`), when asked for.
    pub monitors: Option<MonitorConfig>,
}

/// Fields of OpenAI's API that this server refuses (400 naming them), with why. Anything not
/// listed, supported or accepted-and-ignored is an unknown field (400 too).
const NOT_SUPPORTED: [(&str, &str); 11] = [
    (
        "audio",
        "audio output is not supported: the models here produce text",
    ),
    ("modalities", "only text output is supported"),
    ("prediction", "predicted outputs are not supported"),
    ("web_search_options", "web search is not supported"),
    (
        "functions",
        "the deprecated `functions` field is not supported",
    ),
    (
        "function_call",
        "the deprecated `function_call` field is not supported",
    ),
    (
        "reasoning_effort",
        "the served model is not a reasoning model",
    ),
    ("verbosity", "the served model is not a reasoning model"),
    ("best_of", "best_of is not supported: use n"),
    ("echo", "echoing the prompt is not supported"),
    ("suffix", "suffixes (fill-in-the-middle) are not supported"),
];

/// Most stop strings per request, as OpenAI allows.
pub const MAX_STOP_STRINGS: usize = 4;

/// Most choices (`n`) per request.
pub const MAX_CHOICES: u64 = 16;

/// Parses a chat or text completion body. `max_timeout` bounds `mirror_sd.timeout_s`.
pub fn parse_request(
    endpoint: Endpoint,
    body: &[u8],
    max_timeout: Duration,
) -> Result<ParsedRequest, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::invalid(format!(
            "the request body is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
        .with_code("invalid_utf8")
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        ApiError::invalid(format!("the request body is not valid JSON: {e}"))
            .with_code("invalid_json")
    })?;
    let Value::Object(mut fields) = value else {
        return Err(ApiError::invalid("the request body must be a JSON object"));
    };
    let prompt = match endpoint {
        Endpoint::Chat => {
            PromptInput::Chat(parse_messages(take_required(&mut fields, "messages")?)?)
        }
        Endpoint::Completions => parse_prompt(take_required(&mut fields, "prompt")?)?,
    };
    for (field, why) in NOT_SUPPORTED {
        match fields.remove(field) {
            Some(value) if !is_default_of(field, &value) => {
                return Err(ApiError::invalid_param(
                    field,
                    format!("`{field}` is not supported by this server: {why}"),
                )
                .with_code("unsupported_parameter"));
            }
            // A value that asks for nothing is served.
            _ => {}
        }
    }
    let shared: SharedFields = deserialize_field_checked(Value::Object(fields))?;
    let options = shared.mirror_sd.unwrap_or_default();
    let choices = shared.n.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&choices) {
        return Err(ApiError::invalid_param(
            "n",
            format!("n = {choices} is not in [1, {MAX_CHOICES}]"),
        ));
    }
    let logprobs = parse_logprobs(endpoint, shared.logprobs, shared.top_logprobs)?;
    let monitors = parse_monitors(options.monitors.clone(), options.monitor_options.clone())?;
    let mut constraint = parse_constraint(shared.response_format, &options)?;
    let (tools, tool_choice) = parse_tools(shared.tools, shared.tool_choice)?;
    if endpoint == Endpoint::Completions && !tools.is_empty() {
        return Err(ApiError::invalid_param(
            "tools",
            "tools need /v1/chat/completions",
        ));
    }
    if let Some(forced) = forced_call_constraint(&tools, &tool_choice) {
        if let Some((_, param)) = &constraint {
            return Err(ApiError::invalid_param(
                *param,
                format!("{param} and a forced tool call both constrain the output: give one"),
            ));
        }
        constraint = Some((forced, "tools"));
    }
    let penalties = parse_penalties(
        shared.frequency_penalty,
        shared.presence_penalty,
        shared.logit_bias,
        options.repetition_penalty,
    )?;
    let max_tokens = match (shared.max_tokens, shared.max_completion_tokens) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::invalid_param(
                "max_tokens",
                format!("max_tokens ({a}) and max_completion_tokens ({b}) disagree"),
            ))
        }
        (a, b) => a.or(b),
    };
    if max_tokens == Some(0) {
        return Err(ApiError::invalid_param(
            "max_tokens",
            "max_tokens must be at least 1",
        ));
    }
    let temperature = shared.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid_param(
            "temperature",
            format!("temperature {temperature} is not in [0, 2]"),
        ));
    }
    let top_p = shared.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid_param(
            "top_p",
            format!("top_p {top_p} is not in (0, 1]"),
        ));
    }
    let top_k = usize::try_from(shared.top_k.unwrap_or(0)).map_err(|_| {
        ApiError::invalid_param("top_k", "top_k does not fit this machine's integers")
    })?;
    let method = options
        .method
        .as_deref()
        .map(|name| {
            Method::parse(name).ok_or_else(|| {
                ApiError::invalid_param(
                    "mirror_sd.method",
                    format!("unknown method `{name}` (expected ar, sd, lookup or mirror)"),
                )
            })
        })
        .transpose()?;
    let timeout = options
        .timeout_s
        .map(|seconds| {
            if seconds > 0.0 && seconds <= max_timeout.as_secs_f64() {
                Ok(Duration::from_secs_f64(seconds))
            } else {
                Err(ApiError::invalid_param(
                    "mirror_sd.timeout_s",
                    format!(
                        "timeout_s {seconds} is not in (0, {}] (the server's limit)",
                        max_timeout.as_secs_f64()
                    ),
                ))
            }
        })
        .transpose()?;
    Ok(ParsedRequest {
        model: shared.model,
        prompt,
        stream: shared.stream,
        include_usage: shared.stream_options.is_some_and(|o| o.include_usage),
        max_tokens,
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_k,
            top_p: top_p as f32,
        },
        seed: shared.seed.unwrap_or(0),
        stop: parse_stop(shared.stop)?,
        method,
        ignore_eos: options.ignore_eos,
        timeout,
        choices: choices as usize,
        constraint,
        penalties,
        tools,
        tool_choice,
        logprobs,
        monitors,
    })
}

/// Whether a refused field holds the value that asks for nothing (`"logprobs": false`,
/// `"modalities": ["text"]`, `"echo": false`, `"best_of": 1`): such a request is served.
fn is_default_of(field: &str, value: &Value) -> bool {
    match field {
        "echo" => value == &Value::Bool(false) || value.is_null(),
        "best_of" => value.as_u64() == Some(1) || value.is_null(),
        "modalities" => value == &serde_json::json!(["text"]),
        _ => value.is_null(),
    }
}

fn parse_penalties(
    frequency: Option<f64>,
    presence: Option<f64>,
    logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    repetition: Option<f64>,
) -> Result<Penalties, ApiError> {
    for (param, value) in [
        ("frequency_penalty", frequency),
        ("presence_penalty", presence),
    ] {
        if let Some(v) = value {
            if !(-2.0..=2.0).contains(&v) {
                return Err(ApiError::invalid_param(
                    param,
                    format!("{param} {v} is not in [-2, 2]"),
                ));
            }
        }
    }
    if let Some(r) = repetition {
        if !(r > 0.0 && r.is_finite()) {
            return Err(ApiError::invalid_param(
                "mirror_sd.repetition_penalty",
                format!("repetition_penalty {r} is not a positive number"),
            ));
        }
    }
    let logit_bias = logit_bias
        .unwrap_or_default()
        .into_iter()
        .map(|(token, bias)| {
            let id = token.parse::<u32>().map_err(|_| {
                ApiError::invalid_param(
                    "logit_bias",
                    format!("logit_bias key `{token}` is not a token id"),
                )
            })?;
            if !(-100.0..=100.0).contains(&bias) {
                return Err(ApiError::invalid_param(
                    "logit_bias",
                    format!("the bias {bias} of token {id} is not in [-100, 100]"),
                ));
            }
            Ok((id, bias as f32))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Penalties {
        frequency: frequency.unwrap_or(0.0) as f32,
        presence: presence.unwrap_or(0.0) as f32,
        repetition: repetition.map(|r| r as f32),
        logit_bias,
    })
}

/// The one constraint a request may carry: `response_format`, `mirror_sd.grammar` or
/// `mirror_sd.regex` (compiled later, by the engine: a bad one is a 400 then).
fn parse_constraint(
    format: Option<ResponseFormat>,
    options: &SpeculationOptions,
) -> Result<Option<(Constraint, &'static str)>, ApiError> {
    let from_format = match format {
        None | Some(ResponseFormat::Text) => None,
        Some(ResponseFormat::JsonObject) => Some(Constraint::JsonObject),
        Some(ResponseFormat::JsonSchema { json_schema }) => Some(match json_schema.schema {
            Some(schema) => Constraint::JsonSchema(schema),
            None => Constraint::JsonObject,
        }),
    };
    let asked: Vec<(Constraint, &'static str)> = [
        from_format.map(|c| (c, "response_format")),
        options
            .grammar
            .clone()
            .map(|g| (Constraint::Lark(g), "mirror_sd.grammar")),
        options
            .regex
            .clone()
            .map(|r| (Constraint::Regex(r), "mirror_sd.regex")),
    ]
    .into_iter()
    .flatten()
    .collect();
    match asked.len() {
        0 | 1 => Ok(asked.into_iter().next()),
        _ => Err(ApiError::invalid_param(
            asked[1].1,
            format!(
                "{} and {} both constrain the output: give one",
                asked[0].1, asked[1].1
            ),
        )),
    }
}

fn take_required(fields: &mut Map<String, Value>, name: &str) -> Result<Value, ApiError> {
    fields
        .remove(name)
        .ok_or_else(|| ApiError::invalid_param(name, format!("missing field `{name}`")))
}

/// Deserializes with the path of the failing field in the message and `param`.
fn deserialize_field_checked<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ApiError::invalid(inner.to_string())
        } else {
            ApiError::invalid_param(path.clone(), format!("{path}: {inner}"))
        }
    })
}

fn parse_prompt(value: Value) -> Result<PromptInput, ApiError> {
    let bad = || {
        ApiError::invalid_param(
            "prompt",
            "prompt must be a non-empty string, an array of one string, or an array of token ids",
        )
    };
    match value {
        Value::String(text) if !text.is_empty() => Ok(PromptInput::Text(text)),
        Value::Array(items) if items.len() == 1 && items[0].is_string() => {
            parse_prompt(items.into_iter().next().unwrap_or(Value::Null))
        }
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_string) => {
            Err(ApiError::invalid_param(
                "prompt",
                "batched prompts are not supported: send one prompt per request",
            ))
        }
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|item| {
                item.as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or_else(bad)
            })
            .collect::<Result<Vec<u32>, _>>()
            .map(PromptInput::Tokens),
        _ => Err(bad()),
    }
}

fn parse_stop(value: Option<Value>) -> Result<Vec<String>, ApiError> {
    let bad = |why: &str| ApiError::invalid_param("stop", format!("stop: {why}"));
    let stops = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(s),
                _ => Err(bad("every stop sequence must be a string")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("must be a string or an array of strings")),
    };
    if stops.len() > MAX_STOP_STRINGS {
        return Err(bad(&format!(
            "at most {MAX_STOP_STRINGS} stop sequences are allowed, got {}",
            stops.len()
        )));
    }
    if stops.iter().any(String::is_empty) {
        return Err(bad("stop sequences must not be empty"));
    }
    Ok(stops)
}
