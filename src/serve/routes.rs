//! HTTP routes: the OpenAI endpoints, models, health and metrics, with JSON errors everywhere.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::StreamExt;
use mirror_core::Tool;
use mirror_scheduler::{GenerationConfig, LazyCompiler, MirrorSettings};
use serde::Serialize;
use tokio::sync::mpsc::unbounded_channel;

use super::api::{
    parse_request, unix_seconds, Endpoint, ParsedRequest, PromptInput, ResponseIdentity,
};
use super::backend::{Method, PromptEncoder};
use super::batched::{constraint_error, BatchedQueue, Submission};
use super::delivery::{stream_response, whole_response, Waiting};
use super::error::ApiError;
use super::messages::ToolChoice;
use super::metrics::{Metrics, QueueGauges};
use super::queue::{CancelOnDrop, Job, RequestQueue};

/// What the handlers share.
pub(crate) struct App {
    /// Mirror's one-sequence queue.
    pub queue: RequestQueue,
    /// The batched engine, when a batched method is served.
    pub batched: Option<BatchedQueue>,
    pub metrics: Arc<Metrics>,
    pub encoder: PromptEncoder,
    pub model_name: String,
    pub created: u64,
    pub methods: Vec<Method>,
    pub default_method: Method,
    pub context_limit: usize,
    pub vocab_size: usize,
    /// Checks a constraint on Mirror's path before it is queued.
    pub constraints: LazyCompiler,
    /// Mirror's settings and the target's depth: check monitors on Mirror's path.
    pub mirror_layout: (MirrorSettings, usize),
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub default_max_tokens: usize,
    pub next_id: AtomicU64,
}

pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Bodies are read with the server's own limit, which answers 413 in OpenAI's shape.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(
            Arc::clone(&app),
            count_requests,
        ))
        .with_state(app)
}

async fn count_requests(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    app.metrics
        .record_request(&path, response.status().as_u16());
    response
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(
        "route_not_found",
        format!("no route for {} {}", request.method(), request.uri().path()),
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

/// OpenAI's model object, with what this server serves in `mirror_sd`.
#[derive(Serialize)]
struct ModelObject<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    mirror_sd: ModelExtension,
}

#[derive(Serialize)]
struct ModelExtension {
    methods: Vec<&'static str>,
    default_method: &'static str,
    context_limit: usize,
}

/// `/v1/models`: `{"object": "list", "data": [model]}`.
#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: [ModelObject<'a>; 1],
}

/// `/health`.
#[derive(Serialize)]
struct Health {
    status: &'static str,
    queue_depth: usize,
    queue_capacity: usize,
    engine_busy: bool,
}

fn model_object(app: &App) -> ModelObject<'_> {
    ModelObject {
        id: &app.model_name,
        object: "model",
        created: app.created,
        owned_by: "mirror-sd",
        mirror_sd: ModelExtension {
            methods: app.methods.iter().map(|m| m.as_str()).collect(),
            default_method: app.default_method.as_str(),
            context_limit: app.context_limit,
        },
    }
}

async fn list_models(State(app): State<Arc<App>>) -> Response {
    let list = ModelList {
        object: "list",
        data: [model_object(&app)],
    };
    axum::Json(list).into_response()
}

async fn get_model(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    if id == app.model_name {
        axum::Json(model_object(&app)).into_response()
    } else {
        unknown_model(&app, &id).into_response()
    }
}

fn unknown_model(app: &App, name: &str) -> ApiError {
    ApiError::not_found(
        "model_not_found",
        format!(
            "the model `{name}` does not exist; this server serves `{}`",
            app.model_name
        ),
    )
    .with_param("model")
}

impl App {
    /// Both engines' gauges.
    fn gauges(&self) -> QueueGauges {
        let mut gauges = self.queue.gauges();
        if let Some(batched) = &self.batched {
            let load = batched.load();
            gauges.depth += load.waiting;
            gauges.engine_busy |= load.running > 0;
            gauges.batch = Some(load);
        }
        gauges
    }
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let gauges = app.gauges();
    let status = if gauges.draining {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let body = Health {
        status: if gauges.draining { "draining" } else { "ok" },
        queue_depth: gauges.depth,
        queue_capacity: gauges.capacity,
        engine_busy: gauges.engine_busy,
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(app.gauges()),
    )
        .into_response()
}

async fn chat_completions(State(app): State<Arc<App>>, request: Request) -> Response {
    complete(app, Endpoint::Chat, request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(app): State<Arc<App>>, request: Request) -> Response {
    complete(app, Endpoint::Completions, request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// Reads the body up to `limit` bytes (413 beyond it).
async fn read_body(body: Body, declared: Option<u64>, limit: usize) -> Result<Vec<u8>, ApiError> {
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::invalid(format!("reading the request body failed: {e}")))?;
        if bytes.len() + chunk.len() > limit {
            return Err(ApiError::too_large(limit));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

async fn complete(
    app: Arc<App>,
    endpoint: Endpoint,
    request: Request,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    if app.queue.draining() {
        return Err(ApiError::shutting_down());
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body = read_body(request.into_body(), declared, app.max_body_bytes).await?;
    let parsed = parse_request(endpoint, &body, app.request_timeout)?;
    if parsed.model != app.model_name {
        return Err(unknown_model(&app, &parsed.model));
    }
    let method = parsed
        .method
        .unwrap_or_else(|| default_method_for(&app, &parsed));
    if !app.methods.contains(&method) {
        let served: Vec<&str> = app.methods.iter().map(|m| m.as_str()).collect();
        return Err(ApiError::invalid_param(
            "mirror_sd.method",
            format!(
                "method `{method}` is not served here (served: {})",
                served.join(", ")
            ),
        ));
    }
    if endpoint == Endpoint::Chat && !app.encoder.has_chat_template() {
        return Err(ApiError::invalid(
            "this model has no chat template: use /v1/completions",
        ));
    }
    // Tokenizing a long prompt takes a while: keep it off the async threads.
    let encoder = app.encoder.clone();
    let input = parsed.prompt.clone();
    // `tool_choice: "none"` keeps the tools out of the prompt.
    let tools = match parsed.tool_choice {
        ToolChoice::None => Vec::new(),
        _ => parsed.tools.clone(),
    };
    let prompt = tokio::task::spawn_blocking(move || encode(&encoder, input, &tools))
        .await
        .map_err(|_| ApiError::internal("the tokenizer task failed"))??;
    let max_new_tokens = check_lengths(&app, &parsed, &prompt)?;
    let timeout = parsed.timeout.unwrap_or(app.request_timeout);
    let deadline = received + timeout;
    let prompt_tokens = prompt.len();
    let config = GenerationConfig {
        max_new_tokens,
        sampling: parsed.sampling,
        seed: parsed.seed,
        stop_at_eos: !parsed.ignore_eos,
        stop_tokens: Vec::new(),
        constraint: parsed.constraint.as_ref().map(|(c, _)| c.clone()),
        penalties: parsed.penalties.clone(),
        logprobs: parsed.logprobs,
        monitors: parsed.monitors.clone(),
    };
    let (receivers, guard) = match &app.batched {
        Some(batched) if method.is_batched() => {
            let submission = Submission {
                method,
                prompt,
                config,
                choices: parsed.choices,
                stop: parsed.stop.clone(),
                received,
                deadline,
                timeout,
                constraint_param: parsed.constraint.as_ref().map(|(_, param)| *param),
                tool_choice: parsed.tool_choice.clone(),
                tool_names: parsed.tools.iter().map(|t| t.name.clone()).collect(),
            };
            (batched.submit(submission, app.queue.aborted())?, None)
        }
        _ => {
            check_one_sequence(&parsed, method)?;
            if let (Some(constraint), Some((_, param))) = (&config.constraint, &parsed.constraint) {
                app.constraints
                    .compile(constraint)
                    .map_err(|e| constraint_error(e, param))?;
            }
            if let Some(monitors) = &config.monitors {
                let (settings, layers) = &app.mirror_layout;
                settings.monitors_for(monitors, *layers).map_err(|e| {
                    ApiError::invalid_param("mirror_sd.monitor_options", e.to_string())
                })?;
            }
            let (events, receiver) = unbounded_channel();
            let (guard, cancel) = CancelOnDrop::new();
            app.queue.submit(Job {
                prompt,
                config,
                stop: parsed.stop.clone(),
                received,
                deadline,
                timeout,
                cancel,
                events,
            })?;
            (vec![receiver], Some(guard))
        }
    };
    let id = app.next_id.fetch_add(1, Ordering::Relaxed);
    let identity = ResponseIdentity {
        id: match endpoint {
            Endpoint::Chat => format!("chatcmpl-{:x}-{id}", app.created),
            Endpoint::Completions => format!("cmpl-{:x}-{id}", app.created),
        },
        created: unix_seconds(),
        model: app.model_name.clone(),
        endpoint,
    };
    let waiting = Waiting {
        receivers,
        _guard: guard,
        deadline,
        timeout,
    };
    if parsed.stream {
        stream_response(waiting, identity, prompt_tokens, parsed.include_usage).await
    } else {
        whole_response(waiting, identity, prompt_tokens).await
    }
}

/// The method of a request that names none: the server's default, unless that is Mirror and
/// the request needs the batch (several choices, log-probabilities, tools), which then runs
/// with `sd`, or `ar` when `sd` is not served.
fn default_method_for(app: &App, parsed: &ParsedRequest) -> Method {
    if app.default_method.is_batched() || batch_feature(parsed).is_none() {
        return app.default_method;
    }
    [Method::Speculative, Method::Autoregressive, Method::Lookup]
        .into_iter()
        .find(|m| app.methods.contains(m))
        .unwrap_or(app.default_method)
}

/// The first thing `parsed` asks for that only the batched engine does (several choices,
/// tools): the field that asked, and what it is.
fn batch_feature(parsed: &ParsedRequest) -> Option<(&'static str, &'static str)> {
    if parsed.choices > 1 {
        Some(("n", "n > 1 needs"))
    } else if parsed.tool_choice != ToolChoice::None {
        Some(("tools", "tool calls need"))
    } else {
        None
    }
}

/// Refuses what only the batched engine does on a one-sequence method.
fn check_one_sequence(parsed: &ParsedRequest, method: Method) -> Result<(), ApiError> {
    match batch_feature(parsed) {
        Some((param, what)) => Err(ApiError::invalid_param(
            param,
            format!("{what} a batched method (ar, sd or lookup), not `{method}`"),
        )),
        None => Ok(()),
    }
}

fn encode(
    encoder: &PromptEncoder,
    input: PromptInput,
    tools: &[Tool],
) -> Result<Vec<u32>, ApiError> {
    let tokens = match input {
        PromptInput::Chat(messages) if !tools.is_empty() => {
            encoder.chat_with_tools(&messages, tools)
        }
        PromptInput::Chat(messages) => encoder.chat(&messages),
        PromptInput::Text(text) => encoder.text(&text),
        PromptInput::Tokens(tokens) => Ok(tokens),
    };
    tokens.map_err(|e| ApiError::invalid(format!("the prompt cannot be encoded: {e}")))
}

/// Checks the prompt against the vocabulary and context; returns the tokens to generate.
fn check_lengths(app: &App, parsed: &ParsedRequest, prompt: &[u32]) -> Result<usize, ApiError> {
    if prompt.is_empty() {
        return Err(ApiError::invalid_param(
            "prompt",
            "the prompt encodes to no tokens",
        ));
    }
    let vocab = app.vocab_size.min(app.encoder.vocab_size());
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid_param(
            "prompt",
            format!("token id {bad} is outside the vocabulary of {vocab} tokens"),
        ));
    }
    if let Some((bad, _)) = parsed
        .penalties
        .logit_bias
        .iter()
        .find(|(t, _)| *t as usize >= vocab)
    {
        return Err(ApiError::invalid_param(
            "logit_bias",
            format!("logit_bias names token {bad}, outside the vocabulary of {vocab} tokens"),
        ));
    }
    let limit = app.context_limit;
    if prompt.len() >= limit {
        let param = match parsed.prompt {
            PromptInput::Chat(_) => "messages",
            _ => "prompt",
        };
        return Err(ApiError::invalid_param(
            param,
            format!(
                "the prompt has {} tokens but the model's context limit is {limit}",
                prompt.len()
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let room = limit - prompt.len();
    match parsed.max_tokens {
        Some(asked) if asked > room as u64 => Err(ApiError::invalid_param(
            "max_tokens",
            format!(
                "max_tokens {asked} plus the prompt's {} tokens exceed the model's context limit of {limit}",
                prompt.len()
            ),
        )
        .with_code("context_length_exceeded")),
        Some(asked) => Ok(asked as usize),
        None => Ok(app.default_max_tokens.min(room)),
    }
}
