//! The HTTP server on SmolLM2-135M (self-speculative draft: its own first 10 layers), started
//! in-process on 127.0.0.1 with an ephemeral port. The reference for every greedy output is an
//! `Engine` running the target alone on the same request.
//!
//! Tests run one at a time (a lock): several assert on the engine being free or busy, and this
//! machine has two cores. Without the model they skip, except under `CI=true`.

#[path = "common/http.rs"]
mod client;
mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use client::{Connection, HttpResponse};
use mirror_sd::mirror_core::sampling::SamplingParams;
use mirror_sd::mirror_core::{load, ChatMessage, LoadOptions, Model, ModelSource, Tokenizer};
use mirror_sd::mirror_scheduler::{
    Autoregressive, Engine, GenerationConfig, MirrorSettings, SpeculativeSettings, WindowPolicy,
};
use mirror_sd::serve::{Backend, BatchSettings, Method, RunningServer, Server, ServerConfig};
use serde_json::{json, Value};

const MODEL_NAME: &str = "smollm2-135m";
const TIMEOUT: Duration = Duration::from_secs(120);

struct Smollm2 {
    target: Arc<Model>,
    draft: Arc<Model>,
    tokenizer: Tokenizer,
}

fn smollm2() -> Option<&'static Smollm2> {
    static MODEL: OnceLock<Option<Smollm2>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = common::smollm2_path()?;
            let loaded = load(&ModelSource::Gguf(path), &LoadOptions::default()).expect("load");
            let target = Arc::new(loaded.model);
            let draft = Arc::new(target.truncated(10).expect("self-draft"));
            Some(Smollm2 {
                target,
                draft,
                tokenizer: loaded.tokenizer,
            })
        })
        .as_ref()
}

/// One server test at a time (a failed test must not block the others).
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn test_config() -> ServerConfig {
    ServerConfig {
        model_name: MODEL_NAME.into(),
        queue_capacity: 16,
        max_body_bytes: 256 << 10,
        request_timeout: Duration::from_secs(120),
        default_max_tokens: 16,
        shutdown_grace: Duration::from_secs(60),
        handle_signals: false,
        // Fixed windows, as for Mirror below: a seed then reproduces a sampled sequence's
        // output whatever else runs, and the self-draft's tokens are always tried.
        batch: BatchSettings {
            window: WindowPolicy::Fixed,
            ..BatchSettings::default()
        },
    }
}

fn start(model: &Smollm2, config: ServerConfig) -> RunningServer {
    let backend = Backend::new(
        Arc::clone(&model.target),
        Some(Arc::clone(&model.draft)),
        model.tokenizer.clone(),
        &Method::ALL,
        Method::Mirror,
        // Fixed windows: the tests check that the self-draft's tokens are accepted, and an
        // adaptive window may rightly prefer plain steps with this draft.
        &MirrorSettings {
            speculative: SpeculativeSettings {
                window: WindowPolicy::Fixed,
                ..SpeculativeSettings::default()
            },
            ..MirrorSettings::default()
        },
    )
    .expect("backend");
    Server::start("127.0.0.1:0".parse().unwrap(), backend, config).expect("start")
}

/// The independent reference: the target alone through the `Engine`.
struct Reference {
    engine: Engine,
}

impl Reference {
    fn new(model: &Smollm2) -> Self {
        Self {
            engine: Engine::new(
                Box::new(Autoregressive::new(Arc::clone(&model.target))),
                model.tokenizer.clone(),
            ),
        }
    }

    /// (token ids, text) for a chat request.
    fn chat(&mut self, user: &str, config: &GenerationConfig) -> (Vec<u32>, String) {
        let generation = self
            .engine
            .generate(&[ChatMessage::new("user", user)][..], config)
            .unwrap();
        (generation.tokens, generation.text.unwrap())
    }

    /// (token ids, text) for a text completion.
    fn text(&mut self, prompt: &str, config: &GenerationConfig) -> (Vec<u32>, String) {
        let generation = self.engine.generate(prompt, config).unwrap();
        (generation.tokens, generation.text.unwrap())
    }
}

fn chat_body(user: &str, max_tokens: usize, method: &str, stream: bool) -> Value {
    json!({
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": user}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "mirror_sd": {"method": method},
    })
}

fn completion_body(prompt: &str, max_tokens: usize, method: &str, stream: bool) -> Value {
    json!({
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "mirror_sd": {"method": method},
    })
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> HttpResponse {
    client::post_json(addr, path, body, TIMEOUT).expect("request")
}

/// Text of a whole response (chat or completion).
fn response_text(body: &Value) -> String {
    let choice = &body["choices"][0];
    choice["message"]["content"]
        .as_str()
        .or_else(|| choice["text"].as_str())
        .unwrap_or_else(|| panic!("no text in {body}"))
        .to_string()
}

fn token_ids(report: &Value) -> Vec<u32> {
    report["token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no token_ids in {report}"))
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

/// A finished stream: its text, finish reason, last `mirror_sd` report and the raw events.
struct Streamed {
    text: String,
    finish_reason: String,
    report: Value,
    usage: Option<Value>,
    events: Vec<String>,
}

fn open_stream(addr: SocketAddr, path: &str, body: &Value) -> Connection {
    let connection = Connection::open(addr, "POST", path, body.to_string().as_bytes(), TIMEOUT)
        .expect("open stream");
    assert_eq!(connection.status, 200, "stream status");
    assert!(
        connection
            .header("content-type")
            .is_some_and(|v| v.starts_with("text/event-stream")),
        "content type {:?}",
        connection.header("content-type")
    );
    connection
}

fn read_stream(mut connection: Connection) -> Streamed {
    let mut streamed = Streamed {
        text: String::new(),
        finish_reason: String::new(),
        report: Value::Null,
        usage: None,
        events: Vec::new(),
    };
    while let Some(data) = connection.next_event_data().expect("event") {
        streamed.events.push(data.clone());
        if data == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(&data).expect("chunk JSON");
        assert!(chunk.get("error").is_none(), "error event {chunk}");
        if let Some(usage) = chunk.get("usage") {
            streamed.usage = Some(usage.clone());
        }
        let Some(choice) = chunk["choices"].get(0) else {
            continue;
        };
        let piece = choice["delta"]["content"]
            .as_str()
            .or_else(|| choice["text"].as_str())
            .unwrap_or("");
        streamed.text += piece;
        if let Some(reason) = choice["finish_reason"].as_str() {
            streamed.finish_reason = reason.to_string();
            streamed.report = chunk["mirror_sd"].clone();
        }
    }
    assert_eq!(
        streamed.events.last().map(String::as_str),
        Some("[DONE]"),
        "the stream must end with [DONE]"
    );
    streamed
}

/// A metric's value from the Prometheus text (0 when absent).
fn metric(addr: SocketAddr, name_and_labels: &str) -> f64 {
    let text = client::get(addr, "/metrics", TIMEOUT).unwrap().text();
    text.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == name_and_labels).then(|| value.parse::<f64>().unwrap())
        })
        .unwrap_or(0.0)
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "timed out waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

const QUESTION: &str = "What is the capital of France?";
const TEXT_PROMPT: &str = "def fibonacci(n):";

#[test]
fn greedy_responses_equal_the_engine_token_for_token() {
    let _serial = serial();
    let Some(model) = smollm2() else { return };
    let mut reference = Reference::new(model);
    let config = GenerationConfig::greedy(16);
    let (chat_tokens, chat_text) = reference.chat(QUESTION, &config);
    let (text_tokens, text_text) = reference.text(TEXT_PROMPT, &config);
    let server = start(model, test_config());
    let addr = server.local_addr();
    for method in ["ar", "sd", "lookup", "mirror"] {
        for (path, body, tokens, text) in [
            (
                "/v1/chat/completions",
                chat_body(QUESTION, 16, method, false),
                &chat_tokens,
                &chat_text,
            ),
            (
                "/v1/completions",
                completion_body(TEXT_PROMPT, 16, method, false),
                &text_tokens,
                &text_text,
            ),
        ] {
            let response = post(addr, path, &body);
            assert_eq!(response.status, 200, "{path} {method}: {}", response.text());
            let json = response.json().unwrap();
            assert_eq!(&token_ids(&json["mirror_sd"]), tokens, "{path} {method}");
            assert_eq!(&response_text(&json), text, "{path} {method}");
            assert_eq!(json["mirror_sd"]["method"], method);
            assert_eq!(json["usage"]["completion_tokens"], tokens.len());
            assert_eq!(json["model"], MODEL_NAME);
            let expected_object = if path.contains("chat") {
                "chat.completion"
            } else {
                "text_completion"
            };
            assert_eq!(json["object"], expected_object);

            let mut stream_body = body.clone();
            stream_body["stream"] = json!(true);
            stream_body["stream_options"] = json!({"include_usage": true});
            let streamed = read_stream(open_stream(addr, path, &stream_body));
            assert_eq!(&streamed.text, text, "{path} {method} streamed");
            assert_eq!(
                &token_ids(&streamed.report),
                tokens,
                "{path} {method} streamed"
            );
            let usage = streamed.usage.expect("usage chunk");
            assert_eq!(usage["completion_tokens"], tokens.len());
            assert!(
                streamed.events.len() >= 4,
                "a stream of {} events for {} tokens",
                streamed.events.len(),
                tokens.len()
            );
            if method == "sd" || method == "mirror" {
                assert!(
                    json["mirror_sd"]["mean_accepted"].as_f64().unwrap() > 0.0,
                    "{method}: the self-draft never agreed"
                );
            }
        }
    }
}

#[test]
fn sampled_requests_follow_seed_temperature_top_k_and_top_p() {
    let _serial = serial();
    let Some(model) = smollm2() else { return };
    let config = GenerationConfig {
        max_new_tokens: 16,
        sampling: SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
        },
        seed: 7,
        ..GenerationConfig::default()
    };
    let (tokens, _) = Reference::new(model).chat(QUESTION, &config);
    let server = start(model, test_config());
    let mut body = chat_body(QUESTION, 16, "ar", false);
    body["temperature"] = json!(0.8);
    body["top_k"] = json!(40);
    body["top_p"] = json!(0.9);
    body["seed"] = json!(7);
    let response = post(server.local_addr(), "/v1/chat/completions", &body);
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(token_ids(&response.json().unwrap()["mirror_sd"]), tokens);
    body["seed"] = json!(8);
    let other = post(server.local_addr(), "/v1/chat/completions", &body);
    assert_ne!(
        token_ids(&other.json().unwrap()["mirror_sd"]),
        tokens,
        "another seed gave the same sample"
    );
}

#[test]
fn stop_strings_cut_the_text_in_both_modes() {
    let _serial = serial();
    let Some(model) = smollm2() else { return };
    let (_, full) = Reference::new(model).text(TEXT_PROMPT, &GenerationConfig::greedy(24));
    // A stop string from the middle of the reference output (on character boundaries).
    let chars: Vec<(usize, char)> = full.char_indices().collect();
    assert!(chars.len() > 12, "reference output too short: {full:?}");
    let (from, to) = (chars[chars.len() / 2].0, chars[chars.len() / 2 + 3].0);
    let stop = full[from..to].to_string();
    let expected = &full[..full.find(&stop).unwrap()];
    let server = start(model, test_config());
    for method in ["ar", "sd", "mirror"] {
        let mut body = completion_body(TEXT_PROMPT, 24, method, false);
        body["stop"] = json!(["\u{1}never", stop]);
        let json = post(server.local_addr(), "/v1/completions", &body)
            .json()
            .unwrap();
        assert_eq!(
            response_text(&json),
            expected,
            "{method} with stop {stop:?}"
        );
        assert_eq!(json["choices"][0]["finish_reason"], "stop");
        body["stream"] = json!(true);
        let streamed = read_stream(open_stream(server.local_addr(), "/v1/completions", &body));
        assert_eq!(streamed.text, expected, "{method} streamed, stop {stop:?}");
        assert_eq!(streamed.finish_reason, "stop");
    }
}

#[test]
fn sixteen_concurrent_clients_complete_with_correct_outputs() {
    let _serial = serial();
    let Some(model) = smollm2() else { return };
    let questions = [
        QUESTION,
        "Name three primary colors.",
        "Write a haiku about rain.",
        "What is 12 times 12?",
    ];
    let mut reference = Reference::new(model);
    let config = GenerationConfig::greedy(12);
    let expected: Vec<(Vec<u32>, String)> = questions
        .iter()
        .map(|q| reference.chat(q, &config))
        .collect();
    let server = start(model, test_config());
    let addr = server.local_addr();
    let methods = ["ar", "sd", "lookup", "ar", "sd", "mirror"];
    let clients: Vec<_> = (0..16)
        .map(|i| {
            let question = questions[i % questions.len()];
            let body = chat_body(question, 12, methods[i % methods.len()], i % 2 == 1);
            std::thread::spawn(move || {
                if i % 2 == 1 {
                    let streamed = read_stream(open_stream(addr, "/v1/chat/completions", &body));
                    (i, streamed.text, token_ids(&streamed.report))
                } else {
                    let response = post(addr, "/v1/chat/completions", &body);
                    assert_eq!(response.status, 200, "client {i}: {}", response.text());
                    let json = response.json().unwrap();
                    (i, response_text(&json), token_ids(&json["mirror_sd"]))
                }
            })
        })
        .collect();
    for handle in clients {
        let (i, text, tokens) = handle.join().expect("client thread");
        let (want_tokens, want_text) = &expected[i % questions.len()];
        assert_eq!(&tokens, want_tokens, "client {i}");
        assert_eq!(&text, want_text, "client {i}");
    }
    assert_eq!(
        metric(
            addr,
            "mirror_sd_requests_total{route=\"/v1/chat/completions\",status=\"200\"}"
        ),
        16.0
    );
    assert_eq!(metric(addr, "mirror_sd_queue_depth"), 0.0);
    // They really ran batched: the mean step fed several sequences.
    let per_step = metric(addr, "mirror_sd_batch_sequences_per_step");
    assert!(per_step > 1.5, "{per_step} sequences per step");
}

/// A request with `method` that must be refused with `status` and a `Retry-After` of at least
/// one second.
fn refused_with_retry_after(addr: SocketAddr, method: &str, status: u16) -> HttpResponse {
    let refused = post(
        addr,
        "/v1/chat/completions",
        &chat_body(QUESTION, 8, method, false),
    );
    assert_eq!(refused.status, status, "{method}: {}", refused.text());
    let retry_after: u64 = refused
        .header("retry-after")
        .expect("Retry-After header")
        .parse()
        .expect("Retry-After in seconds");
    assert!(retry_after >= 1);
    refused
}

/// A long generation that only stops when cancelled (end-of-sequence ignored).
fn endless(method: &str) -> Value {
    let mut body = completion_body("Count from one to one thousand:", 4000, method, true);
    body["mirror_sd"]["ignore_eos"] = json!(true);
    body
}

#[test]
fn a_full_mirror_queue_answers_429_with_retry_after() {
    let _serial = serial();
    let Some(model) = smollm2() else { return };
    let server = start(
        model,
        ServerConfig {
            queue_capacity: 1,
            ..test_config()
        },
    );
    let addr = server.local_addr();
    // A runs; B waits in the one place of the queue; C finds it full.
    let mut running = open_stream(addr, "/v1/completions", &endless("mirror"));
    running.next_event_data().unwrap().expect("a first chunk");
    let waiting = std::thread::spawn(move || {
        post(
            addr,
            "/v1/chat/completions",
            &chat_body(QUESTION, 8, "mirror", false),
        )
    });
    wait_until("B is queued", || {
        metric(addr, "mirror_sd_queue_depth") == 1.0
    });
    let refused = refused_with_retry_after(addr, "mirror", 429);
    let error = refused.json().unwrap();
    assert_eq!(error["error"]["type"], "rate_limit_error");
    assert_eq!(error["error"]["code"], "queue_full");
    // Once A goes away, B runs and the queue accepts again.
    running.disconnect();
    let queued = waiting.join().unwrap();
    assert_eq!(queued.status, 200, "{}", queued.text());
    let after = post(
        addr,
        "/v1/chat/completions",
        &chat_body(QUESTION, 4, "mirror", false),
    );
    assert_eq!(after.status, 200);
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_the_engine() {
    let _serial = serial();
    let Some(model) = smollm2() else { return };
    let server = start(model, test_config());
    let addr = server.local_addr();
    // The engine's speed on this machine now, to size "a full generation".
    let probe = post(addr, "/v1/completions", &{
        let mut body = endless("mirror");
        body["stream"] = json!(false);
        body["max_tokens"] = json!(64);
        body
    });
    let probe = probe.json().unwrap();
    let tokens_per_second = probe["mirror_sd"]["tokens_per_second"].as_f64().unwrap();
    let full_generation = Duration::from_secs_f64(4000.0 / tokens_per_second);
    let mirror_tokens_before = metric(addr, "mirror_sd_generated_tokens_total{method=\"mirror\"}");

    let mut abandoned = open_stream(addr, "/v1/completions", &endless("mirror"));
    for _ in 0..3 {
        abandoned.next_event_data().unwrap().expect("a chunk");
    }
    abandoned.disconnect();
    let started = Instant::now();
    let next = post(
        addr,
        "/v1/chat/completions",
        &chat_body(QUESTION, 8, "ar", false),
    );
    let next_latency = started.elapsed();
    assert_eq!(next.status, 200, "{}", next.text());

    // The engine's own counters: the abandoned generation ended as cancelled, after a few tokens.
    assert_eq!(
        metric(
            addr,
            "mirror_sd_generations_total{method=\"mirror\",outcome=\"cancelled\"}"
        ),
        1.0
    );
    let abandoned_tokens =
        metric(addr, "mirror_sd_generated_tokens_total{method=\"mirror\"}") - mirror_tokens_before;
    assert!(
        abandoned_tokens < 400.0,
        "the abandoned generation ran on for {abandoned_tokens} of 4000 tokens"
    );
    assert!(
        next_latency < full_generation / 10,
        "the next request took {next_latency:?}; a full abandoned generation takes {full_generation:?}"
    );

    // The same for a client of a whole (non-streamed) response that leaves while it generates.
    let mut whole = endless("sd");
    whole["stream"] = json!(false);
    // The batch is empty first, so that the one running sequence below is this request's.
    wait_for_batch(addr, 0.0, 0.0);
    let leaving = client::send_request(
        addr,
        "POST",
        "/v1/completions",
        whole.to_string().as_bytes(),
        TIMEOUT,
    )
    .unwrap();
    // In the batch (Mirror's worker may still be busy with the stream abandoned above; the
    // batch's gauges are updated after each step).
    wait_until("the whole request runs", || {
        metric(addr, "mirror_sd_batch_running") == 1.0
    });
    drop(leaving);
    let started = Instant::now();
    // The batch runs the next request beside the abandoned one; the abandoned one must end
    // as cancelled all the same.
    let next = post(
        addr,
        "/v1/chat/completions",
        &chat_body(QUESTION, 8, "ar", false),
    );
    assert_eq!(next.status, 200, "{}", next.text());
    wait_until("the abandoned whole request is cancelled", || {
        metric(
            addr,
            "mirror_sd_generations_total{method=\"sd\",outcome=\"cancelled\"}",
        ) == 1.0
    });
    assert!(
        started.elapsed() < full_generation / 10,
        "a whole request was cancelled {:?} after its client left",
        started.elapsed()
    );
}

#[test]
fn bad_inputs_get_their_status_and_error_body_and_harm_no_other_request() {
    let _serial = serial();
    let Some(model) = smollm2() else { return };
    let (tokens, text) = Reference::new(model).text(TEXT_PROMPT, &GenerationConfig::greedy(48));
    let server = start(model, test_config());
    let addr = server.local_addr();
    // A good request streams while the bad ones arrive.
    let good = open_stream(
        addr,
        "/v1/completions",
        &completion_body(TEXT_PROMPT, 48, "mirror", true),
    );
    let chat = |extra: Value| {
        let mut body = chat_body(QUESTION, 8, "ar", false);
        for (key, value) in extra.as_object().unwrap() {
            body[key] = value.clone();
        }
        body.to_string().into_bytes()
    };
    let completion = |extra: Value| {
        let mut body = completion_body(TEXT_PROMPT, 8, "ar", false);
        for (key, value) in extra.as_object().unwrap() {
            body[key] = value.clone();
        }
        body.to_string().into_bytes()
    };
    let context_limit = model.target.context_limit();
    let chat_path = "/v1/chat/completions";
    let completions_path = "/v1/completions";
    // (what, path, body, status, error code or param it must name)
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "malformed JSON",
            chat_path,
            b"{\"model\": ".to_vec(),
            400,
            "invalid_json",
        ),
        (
            "non-UTF-8 body",
            chat_path,
            b"{\"model\": \"\xff\xfe\"}".to_vec(),
            400,
            "invalid_utf8",
        ),
        (
            "not an object",
            chat_path,
            b"[1, 2]".to_vec(),
            400,
            "JSON object",
        ),
        (
            "unknown field",
            chat_path,
            chat(json!({"frobnicate": 1})),
            400,
            "frobnicate",
        ),
        (
            "wrong type",
            chat_path,
            chat(json!({"temperature": "hot"})),
            400,
            "temperature",
        ),
        (
            "messages not a list",
            chat_path,
            chat(json!({"messages": "hi"})),
            400,
            "messages",
        ),
        (
            "message without content",
            chat_path,
            chat(json!({"messages": [{"role": "user"}]})),
            400,
            "content",
        ),
        (
            "unknown role",
            chat_path,
            chat(json!({"messages": [{"role": "wizard", "content": "x"}]})),
            400,
            "role",
        ),
        (
            "missing messages",
            chat_path,
            br#"{"model": "smollm2-135m"}"#.to_vec(),
            400,
            "messages",
        ),
        (
            "missing model",
            chat_path,
            br#"{"messages": [{"role": "user", "content": "x"}]}"#.to_vec(),
            400,
            "model",
        ),
        (
            "unknown model",
            chat_path,
            chat(json!({"model": "gpt-9"})),
            404,
            "model_not_found",
        ),
        (
            "empty message list",
            chat_path,
            chat(json!({"messages": []})),
            400,
            "messages",
        ),
        (
            "prompt over the context",
            chat_path,
            chat(
                json!({"messages": [{"role": "user", "content": "hello ".repeat(context_limit)}]}),
            ),
            400,
            "context_length_exceeded",
        ),
        (
            "token prompt over the context",
            completions_path,
            completion(json!({"prompt": vec![1u32; context_limit]})),
            400,
            "context_length_exceeded",
        ),
        (
            "token outside the vocabulary",
            completions_path,
            completion(json!({"prompt": [1, 10_000_000]})),
            400,
            "vocabulary",
        ),
        (
            "empty prompt",
            completions_path,
            completion(json!({"prompt": ""})),
            400,
            "prompt",
        ),
        (
            "batched prompts",
            completions_path,
            completion(json!({"prompt": ["a", "b"]})),
            400,
            "batched",
        ),
        (
            "max_tokens 0",
            chat_path,
            chat(json!({"max_tokens": 0})),
            400,
            "max_tokens",
        ),
        (
            "max_tokens huge",
            chat_path,
            chat(json!({"max_tokens": 1_000_000_000_000u64})),
            400,
            "context_length_exceeded",
        ),
        (
            "max_tokens negative",
            chat_path,
            chat(json!({"max_tokens": -1})),
            400,
            "max_tokens",
        ),
        (
            "temperature above 2",
            chat_path,
            chat(json!({"temperature": 3.0})),
            400,
            "temperature",
        ),
        (
            "temperature negative",
            chat_path,
            chat(json!({"temperature": -0.5})),
            400,
            "temperature",
        ),
        (
            "top_p 0",
            chat_path,
            chat(json!({"top_p": 0.0})),
            400,
            "top_p",
        ),
        (
            "top_p above 1",
            chat_path,
            chat(json!({"top_p": 1.5})),
            400,
            "top_p",
        ),
        (
            "top_k negative",
            chat_path,
            chat(json!({"top_k": -1})),
            400,
            "top_k",
        ),
        (
            "seed negative",
            chat_path,
            chat(json!({"seed": -1})),
            400,
            "seed",
        ),
        ("n = 0", chat_path, chat(json!({"n": 0})), 400, "n"),
        (
            "audio output",
            chat_path,
            chat(json!({"audio": {"voice": "alloy", "format": "wav"}})),
            400,
            "audio",
        ),
        (
            "top_logprobs over 20",
            chat_path,
            chat(json!({"logprobs": true, "top_logprobs": 21})),
            400,
            "top_logprobs",
        ),
        (
            "top_logprobs without logprobs",
            chat_path,
            chat(json!({"top_logprobs": 2})),
            400,
            "top_logprobs",
        ),
        (
            "logprobs of a wrong type",
            chat_path,
            chat(json!({"logprobs": "yes"})),
            400,
            "logprobs",
        ),
        (
            "a latent monitor off Mirror's tap layer",
            chat_path,
            chat(json!({"mirror_sd": {
                "method": "mirror",
                "monitors": ["latent_trajectory"],
                "monitor_options": {"latent_trajectory": {"layer": 3}},
            }})),
            400,
            "mirror_sd.monitor_options",
        ),
        (
            "frequency_penalty 3",
            chat_path,
            chat(json!({"frequency_penalty": 3.0})),
            400,
            "frequency_penalty",
        ),
        (
            "a logit_bias key that is no token id",
            chat_path,
            chat(json!({"logit_bias": {"hello": 1}})),
            400,
            "logit_bias",
        ),
        (
            "a logit_bias token outside the vocabulary",
            chat_path,
            chat(json!({"logit_bias": {"999999999": 1}})),
            400,
            "logit_bias",
        ),
        (
            "a logit bias of 200",
            chat_path,
            chat(json!({"logit_bias": {"5": 200}})),
            400,
            "logit_bias",
        ),
        ("n = 17", chat_path, chat(json!({"n": 17})), 400, "n"),
        (
            "two constraints",
            chat_path,
            chat(json!({"response_format": {"type": "json_object"}, "mirror_sd": {"regex": "a+"}})),
            400,
            "mirror_sd.regex",
        ),
        (
            "unknown response_format type",
            chat_path,
            chat(json!({"response_format": {"type": "yaml"}})),
            400,
            "response_format",
        ),
        (
            "five stop strings",
            chat_path,
            chat(json!({"stop": ["a", "b", "c", "d", "e"]})),
            400,
            "stop",
        ),
        (
            "empty stop string",
            chat_path,
            chat(json!({"stop": ""})),
            400,
            "stop",
        ),
        (
            "stop not a string",
            chat_path,
            chat(json!({"stop": 3})),
            400,
            "stop",
        ),
        (
            "unknown method",
            chat_path,
            chat(json!({"mirror_sd": {"method": "turbo"}})),
            400,
            "mirror_sd.method",
        ),
        (
            "unknown extension field",
            chat_path,
            chat(json!({"mirror_sd": {"gamma": 9}})),
            400,
            "gamma",
        ),
        (
            "timeout 0",
            chat_path,
            chat(json!({"mirror_sd": {"timeout_s": 0}})),
            400,
            "mirror_sd.timeout_s",
        ),
        (
            "oversized body",
            chat_path,
            vec![b' '; 300 << 10],
            413,
            "request_too_large",
        ),
        (
            "unknown route",
            "/v1/nothing",
            chat(json!({})),
            404,
            "route_not_found",
        ),
    ];
    for (what, path, body, status, needle) in cases {
        // The server answers 413 before reading the whole body and closes the connection.
        let send = if status == 413 {
            client::send_refused_body
        } else {
            client::send
        };
        let response =
            send(addr, "POST", path, &body, TIMEOUT).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(response.status, status, "{what}: {}", response.text());
        let json = response
            .json()
            .unwrap_or_else(|e| panic!("{what}: the error body is not JSON: {e}"));
        let error = &json["error"];
        let message = error["message"].as_str().unwrap_or("");
        assert!(!message.is_empty(), "{what}: no message in {json}");
        assert!(error["type"].is_string(), "{what}: no type in {json}");
        let named = [&error["code"], &error["param"]]
            .iter()
            .any(|v| v.as_str().is_some_and(|s| s.contains(needle)))
            || message.contains(needle);
        assert!(named, "{what}: the error does not name {needle:?}: {json}");
    }
    let wrong_method = client::get(addr, chat_path, TIMEOUT).unwrap();
    assert_eq!(wrong_method.status, 405);
    assert_eq!(
        wrong_method.json().unwrap()["error"]["code"],
        "method_not_allowed"
    );

    let streamed = read_stream(good);
    assert_eq!(streamed.text, text, "the concurrent good request");
    assert_eq!(token_ids(&streamed.report), tokens);
    let after = post(
        addr,
        "/v1/chat/completions",
        &chat_body(QUESTION, 4, "sd", false),
    );
    assert_eq!(after.status, 200, "{}", after.text());
    let health = client::get(addr, "/health", TIMEOUT).unwrap();
    assert_eq!(health.status, 200);
    assert_eq!(health.json().unwrap()["status"], "ok");
}

#[test]
fn deadlines_end_requests_with_504() {
    let _serial = serial();
    let Some(model) = smollm2() else { return };
    let server = start(model, test_config());
    let addr = server.local_addr();
    let mut whole = endless("mirror");
    whole["stream"] = json!(false);
    whole["mirror_sd"]["timeout_s"] = json!(0.5);
    let started = Instant::now();
    let response = post(addr, "/v1/completions", &whole);
    assert_eq!(response.status, 504, "{}", response.text());
    assert_eq!(
        response.json().unwrap()["error"]["code"],
        "deadline_exceeded"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    let mut streamed = endless("sd");
    streamed["mirror_sd"]["timeout_s"] = json!(0.5);
    let mut connection = open_stream(addr, "/v1/completions", &streamed);
    let mut last_json = Value::Null;
    while let Some(data) = connection.next_event_data().unwrap() {
        if data != "[DONE]" {
            last_json = serde_json::from_str(&data).unwrap();
        }
    }
    assert_eq!(
        last_json["error"]["code"], "deadline_exceeded",
        "{last_json}"
    );
    // The engine is free again.
    let after = post(
        addr,
        "/v1/chat/completions",
        &chat_body(QUESTION, 4, "ar", false),
    );
    assert_eq!(after.status, 200);
    assert_eq!(
        metric(
            addr,
            "mirror_sd_generations_total{method=\"mirror\",outcome=\"deadline\"}"
        ) + metric(
            addr,
            "mirror_sd_generations_total{method=\"sd\",outcome=\"deadline\"}"
        ),
        2.0
    );
}

#[test]
fn shutdown_drains_accepted_requests_then_refuses_connections() {
    let _serial = serial();
    let Some(model) = smollm2() else { return };
    let mut reference = Reference::new(model);
    let (running_tokens, running_text) = reference.text(TEXT_PROMPT, &GenerationConfig::greedy(32));
    let (_, queued_text) = reference.chat(QUESTION, &GenerationConfig::greedy(8));
    let mut server = start(model, test_config());
    let addr = server.local_addr();
    let mut running = open_stream(
        addr,
        "/v1/completions",
        &completion_body(TEXT_PROMPT, 32, "mirror", true),
    );
    let first = running.next_event_data().unwrap().expect("a first chunk");
    let queued = std::thread::spawn(move || {
        post(
            addr,
            "/v1/chat/completions",
            &chat_body(QUESTION, 8, "mirror", false),
        )
    });
    wait_until("the second request is queued", || {
        metric(addr, "mirror_sd_queue_depth") == 1.0
    });
    server.shutdown();
    // Both accepted requests finish with their full, correct output.
    let mut rest = read_stream(running);
    let first: Value = serde_json::from_str(&first).unwrap();
    rest.text = first["choices"][0]["text"].as_str().unwrap().to_string() + &rest.text;
    assert_eq!(rest.text, running_text);
    assert_eq!(token_ids(&rest.report), running_tokens);
    let queued = queued.join().unwrap();
    assert_eq!(queued.status, 200, "{}", queued.text());
    assert_eq!(response_text(&queued.json().unwrap()), queued_text);
    server.wait().expect("a clean exit");
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(),
        "the server still accepts connections after shutdown"
    );
}

#[test]
fn shutdown_cancels_what_outlives_the_grace_period() {
    let _serial = serial();
    let Some(model) = smollm2() else { return };
    let mut server = start(
        model,
        ServerConfig {
            shutdown_grace: Duration::from_millis(300),
            ..test_config()
        },
    );
    let addr = server.local_addr();
    let mut running = open_stream(addr, "/v1/completions", &endless("mirror"));
    running.next_event_data().unwrap().expect("a first chunk");
    let started = Instant::now();
    server.shutdown();
    let mut last = Value::Null;
    let mut done = false;
    while let Some(data) = running.next_event_data().unwrap() {
        if data == "[DONE]" {
            done = true;
        } else {
            last = serde_json::from_str(&data).unwrap();
        }
    }
    assert!(done, "the stream must end with [DONE]");
    assert_eq!(last["error"]["code"], "shutting_down", "{last}");
    server.wait().expect("a clean exit");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "shutdown took {:?}",
        started.elapsed()
    );
}

#[test]
fn models_health_and_metrics_describe_the_server() {
    let _serial = serial();
    let Some(model) = smollm2() else { return };
    let server = start(model, test_config());
    let addr = server.local_addr();
    let models = client::get(addr, "/v1/models", TIMEOUT)
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(models["data"][0]["id"], MODEL_NAME);
    assert_eq!(models["data"][0]["mirror_sd"]["default_method"], "mirror");
    assert_eq!(
        client::get(addr, "/v1/models/gpt-9", TIMEOUT)
            .unwrap()
            .status,
        404
    );
    for method in ["sd", "mirror"] {
        let response = post(
            addr,
            "/v1/chat/completions",
            &chat_body(QUESTION, 16, method, false),
        );
        assert_eq!(response.status, 200);
    }
    let text = client::get(addr, "/metrics", TIMEOUT).unwrap().text();
    for family in [
        "mirror_sd_requests_total",
        "mirror_sd_queue_depth",
        "mirror_sd_tokens_per_second",
        "mirror_sd_time_to_first_token_seconds",
        "mirror_sd_mean_accepted_tokens",
        "mirror_sd_reuse_rate",
        "mirror_sd_draft_hidden_fraction",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "/metrics lacks {family}:\n{text}"
        );
    }
    for method in ["sd", "mirror"] {
        assert!(
            metric(
                addr,
                &format!("mirror_sd_mean_accepted_tokens{{method=\"{method}\"}}")
            ) > 0.0
        );
        assert!(
            metric(
                addr,
                &format!("mirror_sd_tokens_per_second{{method=\"{method}\"}}")
            ) > 0.0
        );
    }
    assert_eq!(
        metric(addr, "mirror_sd_time_to_first_token_seconds_count"),
        2.0
    );
    assert!(
        metric(
            addr,
            "mirror_sd_reuse_total{method=\"mirror\",kind=\"hit\"}"
        ) + metric(
            addr,
            "mirror_sd_reuse_total{method=\"mirror\",kind=\"partial\"}"
        ) + metric(
            addr,
            "mirror_sd_reuse_total{method=\"mirror\",kind=\"miss\"}"
        ) > 0.0
    );
}

/// The official `openai` Python package (installed into `.venv` by `.ci/run`) as the client.
#[test]
fn the_openai_python_client_talks_to_the_server() {
    let _serial = serial();
    let Some(model) = smollm2() else { return };
    let python = common::repo_root().join(".venv/bin/python");
    let has_openai = python.is_file()
        && std::process::Command::new(&python)
            .args(["-c", "import openai"])
            .output()
            .is_ok_and(|o| o.status.success());
    if !has_openai {
        let message = "the openai package is not installed in .venv (run .ci/run, or \
                       python3 -m venv .venv && .venv/bin/pip install openai)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{message}");
        }
        eprintln!("skipping: {message}");
        return;
    }
    let mut reference = Reference::new(model);
    let (_, chat_text) = reference.chat(QUESTION, &GenerationConfig::greedy(16));
    let (_, completion_text) = reference.text(TEXT_PROMPT, &GenerationConfig::greedy(16));
    let server = start(model, test_config());
    let output = std::process::Command::new(&python)
        .arg(common::repo_root().join("tests/openai_client.py"))
        .arg(format!("http://{}/v1", server.local_addr()))
        .arg(MODEL_NAME)
        .arg(QUESTION)
        .arg(TEXT_PROMPT)
        .output()
        .expect("run python");
    assert!(
        output.status.success(),
        "the Python client failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("the script prints JSON");
    assert_eq!(report["models"], json!([MODEL_NAME]));
    assert_eq!(report["chat"], chat_text);
    assert_eq!(report["chat_stream"], chat_text);
    assert_eq!(
        report["chat_usage_completion_tokens"],
        report["chat_stream_usage_completion_tokens"]
    );
    assert_eq!(report["completion"], completion_text);
    assert_eq!(report["completion_stream"], completion_text);
    assert_eq!(report["chat_method"], "sd");
    assert_eq!(report["chat_n2"], json!([chat_text, chat_text]));
    // Two strings of at most 16 characters close well within 48 tokens.
    assert_eq!(report["json_schema_finish"], "stop", "{report}");
    let text = report["json_schema"].as_str().expect("content");
    let value: Value = serde_json::from_str(text).expect("the content is JSON");
    assert!(
        value["city"].is_string() && value["country"].is_string(),
        "{value}"
    );
    assert_eq!(value.as_object().map(|o| o.len()), Some(2), "{value}");
    // A forced call, whole and streamed, on the server's default method (Mirror, which hands
    // tools to the batch).
    assert_eq!(report["tool_finish"], "tool_calls");
    assert_eq!(report["tool_call"]["name"], "get_weather");
    assert!(
        report["tool_call"]["arguments"]["city"].is_string(),
        "{report}"
    );
    assert!(
        report["tool_call"]["arguments"]["days"].is_i64(),
        "{report}"
    );
    assert_eq!(report["tool_call_stream"], json!([report["tool_call"]]));
    assert_eq!(report["penalized_finish"], "length");
    let logprobs = report["logprobs"].as_array().expect("logprobs");
    assert_eq!(logprobs.len(), 8, "{report}");
    assert!(logprobs
        .iter()
        .all(|v| v.as_f64().is_some_and(|v| v <= 0.0)));
    assert_eq!(report["logprobs_top"], json!(vec![2; 8]));
    assert_eq!(report["logprobs_stream"], report["logprobs"]);
    assert_eq!(report["unknown_model_status"], 404);
    assert_eq!(report["bad_temperature_status"], 400);
}

/// Texts of a whole response's choices, by index.
fn choice_texts(body: &Value) -> Vec<String> {
    let choices = body["choices"].as_array().expect("choices");
    choices
        .iter()
        .enumerate()
        .map(|(i, choice)| {
            assert_eq!(choice["index"], i, "{body}");
            choice["message"]["content"]
                .as_str()
                .or_else(|| choice["text"].as_str())
                .expect("choice text")
                .to_string()
        })
        .collect()
}

#[test]
fn n_choices_share_one_prefill_and_each_equals_its_own_request() {
    let _serial = serial();
    let Some(model) = smollm2() else { return };
    let (_, greedy_text) = Reference::new(model).chat(QUESTION, &GenerationConfig::greedy(12));
    let server = start(model, test_config());
    let addr = server.local_addr();
    for method in ["ar", "sd", "lookup"] {
        let mut body = chat_body(QUESTION, 12, method, false);
        body["n"] = json!(3);
        let response = post(addr, "/v1/chat/completions", &body);
        assert_eq!(response.status, 200, "{method}: {}", response.text());
        let json = response.json().unwrap();
        assert_eq!(
            choice_texts(&json),
            vec![greedy_text.clone(); 3],
            "{method}"
        );
    }
    // Sampled: choice i is the request with seed + i alone (the independent reference here is
    // the one-choice request, itself checked against the Engine in another test).
    let sampled = |n: usize, seed: u64| {
        let mut body = chat_body(QUESTION, 12, "ar", false);
        body["n"] = json!(n);
        body["temperature"] = json!(1.0);
        body["seed"] = json!(seed);
        let response = post(addr, "/v1/chat/completions", &body);
        assert_eq!(response.status, 200, "{}", response.text());
        let json = response.json().unwrap();
        (
            choice_texts(&json),
            json["usage"]["completion_tokens"].clone(),
        )
    };
    let (three, _) = sampled(3, 40);
    let (again, _) = sampled(3, 40);
    assert_eq!(three, again, "a seed reproduces every choice");
    let distinct: std::collections::HashSet<&String> = three.iter().collect();
    assert!(
        distinct.len() >= 2,
        "three samples were all equal: {three:?}"
    );
    for (i, text) in three.iter().enumerate() {
        let (alone, _) = sampled(1, 40 + i as u64);
        assert_eq!(&alone[0], text, "choice {i} against seed {}", 40 + i);
    }
    // Streamed: every chunk names its choice; each choice's pieces add up to its text.
    let mut body = chat_body(QUESTION, 12, "ar", true);
    body["n"] = json!(3);
    body["temperature"] = json!(1.0);
    body["seed"] = json!(40);
    body["stream_options"] = json!({"include_usage": true});
    let mut connection = open_stream(addr, "/v1/chat/completions", &body);
    let mut texts = vec![String::new(); 3];
    let mut finished = [false; 3];
    let mut usage = Value::Null;
    while let Some(data) = connection.next_event_data().unwrap() {
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&data).unwrap();
        assert!(chunk.get("error").is_none(), "{chunk}");
        if let Some(u) = chunk.get("usage") {
            usage = u.clone();
        }
        let Some(choice) = chunk["choices"].get(0) else {
            continue;
        };
        let index = choice["index"].as_u64().expect("an index") as usize;
        assert!(!finished[index], "a chunk of choice {index} after its end");
        texts[index] += choice["delta"]["content"].as_str().unwrap_or("");
        finished[index] = choice["finish_reason"].is_string();
    }
    assert_eq!(finished, [true; 3]);
    assert_eq!(texts, three);
    let (_, whole_usage) = sampled(3, 40);
    assert_eq!(usage["completion_tokens"], whole_usage);
    // Mirror runs one sequence at a time: n > 1 is refused with the field named.
    let mut body = chat_body(QUESTION, 4, "mirror", false);
    body["n"] = json!(2);
    let refused = post(addr, "/v1/chat/completions", &body);
    assert_eq!(refused.status, 400);
    assert_eq!(refused.json().unwrap()["error"]["param"], "n");
}

/// Until the engine shows `running` sequences and `waiting` ones.
fn wait_for_batch(addr: SocketAddr, running: f64, waiting: f64) {
    wait_until(&format!("{running} run and {waiting} wait"), || {
        metric(addr, "mirror_sd_batch_running") == running
            && metric(addr, "mirror_sd_batch_waiting") == waiting
    });
}

#[test]
fn a_full_batch_or_kv_pool_answers_503_with_retry_after_and_recovers() {
    let _serial = serial();
    let Some(model) = smollm2() else { return };
    // The pool bytes of one endless sequence, from a server with room for many.
    let probe = start(model, test_config());
    let mut running = open_stream(probe.local_addr(), "/v1/completions", &endless("ar"));
    running.next_event_data().unwrap().expect("a first chunk");
    let one_sequence = metric(probe.local_addr(), "mirror_sd_kv_pool_used_bytes");
    assert!(one_sequence > 0.0);
    running.disconnect();
    drop(probe);
    let full_batch = BatchSettings {
        max_batch: 1,
        ..test_config().batch
    };
    let full_pool = BatchSettings {
        kv_budget_bytes: (one_sequence * 1.5) as u64,
        prefix_cache: false,
        ..test_config().batch
    };
    for (what, batch) in [("batch", full_batch), ("KV pool", full_pool)] {
        let server = start(
            model,
            ServerConfig {
                queue_capacity: 1,
                batch,
                ..test_config()
            },
        );
        let addr = server.local_addr();
        // A runs; B (as large) waits for room in the batch or the pool; C finds the waiting
        // place taken.
        let mut running = open_stream(addr, "/v1/completions", &endless("ar"));
        running.next_event_data().unwrap().expect("a first chunk");
        let waiting =
            std::thread::spawn(move || open_stream(addr, "/v1/completions", &endless("ar")));
        wait_for_batch(addr, 1.0, 1.0);
        let refused = refused_with_retry_after(addr, "sd", 503);
        assert_eq!(
            refused.json().unwrap()["error"]["code"],
            "engine_overloaded"
        );
        // A goes away: B runs, and once it is gone too the server takes requests again.
        running.disconnect();
        let mut queued = waiting.join().unwrap();
        queued.next_event_data().unwrap().expect("B's first chunk");
        queued.disconnect();
        wait_for_batch(addr, 0.0, 0.0);
        let after = post(
            addr,
            "/v1/chat/completions",
            &chat_body(QUESTION, 4, "sd", false),
        );
        assert_eq!(after.status, 200, "{what}: {}", after.text());
    }
}

#[test]
fn a_disconnect_gives_its_kv_back_to_the_pool() {
    let _serial = serial();
    let Some(model) = smollm2() else { return };
    let server = start(
        model,
        ServerConfig {
            batch: BatchSettings {
                prefix_cache: false,
                ..test_config().batch
            },
            ..test_config()
        },
    );
    let addr = server.local_addr();
    let mut running = open_stream(addr, "/v1/completions", &endless("sd"));
    for _ in 0..3 {
        running.next_event_data().unwrap().expect("a chunk");
    }
    assert!(metric(addr, "mirror_sd_kv_pool_used_bytes") > 0.0);
    running.disconnect();
    wait_until("the pool is whole again", || {
        metric(addr, "mirror_sd_kv_pool_used_bytes") == 0.0
    });
    assert_eq!(
        metric(addr, "mirror_sd_kv_pool_free_bytes"),
        BatchSettings::default().kv_budget_bytes as f64
    );
    assert_eq!(metric(addr, "mirror_sd_batch_running"), 0.0);
    assert_eq!(
        metric(
            addr,
            "mirror_sd_generations_total{method=\"sd\",outcome=\"cancelled\"}"
        ),
        1.0
    );
}

#[test]
fn response_format_and_grammars_constrain_the_output() {
    let _serial = serial();
    let Some(model) = smollm2() else { return };
    let server = start(model, test_config());
    let addr = server.local_addr();
    let schema = json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "population": {"type": "integer"}
        },
        "required": ["city", "population"],
        "additionalProperties": false
    });
    let validator = jsonschema::validator_for(&schema).expect("a valid schema");
    for (method, seed) in [("ar", 1), ("sd", 2), ("lookup", 3), ("mirror", 4)] {
        let mut body = chat_body("Describe Paris as JSON.", 64, method, false);
        body["temperature"] = json!(0.9);
        body["seed"] = json!(seed);
        body["response_format"] = json!({
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": schema, "strict": true}
        });
        let response = post(addr, "/v1/chat/completions", &body);
        assert_eq!(response.status, 200, "{method}: {}", response.text());
        let json = response.json().unwrap();
        let text = response_text(&json);
        if json["choices"][0]["finish_reason"] == "stop" {
            let value: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{method}: {text:?} is not JSON: {e}"));
            assert!(
                validator.is_valid(&value),
                "{method}: {value} breaks the schema"
            );
        }
        // Streamed, the same request gives the same text.
        body["stream"] = json!(true);
        let streamed = read_stream(open_stream(addr, "/v1/chat/completions", &body));
        assert_eq!(streamed.text, text, "{method} streamed");
    }
    let mut body = completion_body("The phone number is ", 12, "ar", false);
    body["mirror_sd"]["regex"] = json!("[0-9]{3}-[0-9]{4}");
    let json = post(addr, "/v1/completions", &body).json().unwrap();
    let text = response_text(&json);
    let bytes = text.as_bytes();
    assert!(
        bytes.len() == 8
            && bytes[3] == b'-'
            && bytes
                .iter()
                .enumerate()
                .all(|(i, b)| i == 3 || b.is_ascii_digit()),
        "{text:?} does not match [0-9]{{3}}-[0-9]{{4}}"
    );
    let mut body = chat_body(QUESTION, 16, "ar", false);
    body["response_format"] = json!({"type": "json_object"});
    let json = post(addr, "/v1/chat/completions", &body).json().unwrap();
    if json["choices"][0]["finish_reason"] == "stop" {
        let value: Value = serde_json::from_str(&response_text(&json)).expect("JSON");
        assert!(value.is_object(), "{value}");
    }
    // Bad constraints are the client's fault, with the field named.
    for (field, value, method) in [
        (
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}),
            "ar",
        ),
        ("mirror_sd.regex", json!("(unclosed"), "ar"),
        ("mirror_sd.regex", json!("(unclosed"), "mirror"),
    ] {
        let mut body = chat_body(QUESTION, 8, method, false);
        if field == "response_format" {
            body["response_format"] = value;
        } else {
            body["mirror_sd"]["regex"] = value;
        }
        let refused = post(addr, "/v1/chat/completions", &body);
        assert_eq!(refused.status, 400, "{field} {method}: {}", refused.text());
        assert_eq!(refused.json().unwrap()["error"]["param"], field);
    }
}

#[test]
fn penalties_logit_bias_and_the_developer_role_reach_the_engine() {
    let _serial = serial();
    let Some(model) = smollm2() else { return };
    let mut reference = Reference::new(model);
    let (plain_tokens, _) = reference.chat(QUESTION, &GenerationConfig::greedy(16));
    let penalties = mirror_sd::mirror_core::sampling::Penalties {
        frequency: 0.7,
        presence: 0.3,
        repetition: Some(1.2),
        logit_bias: vec![(plain_tokens[0], -100.0)],
    };
    let config = GenerationConfig {
        penalties,
        ..GenerationConfig::greedy(16)
    };
    let (want, want_text) = reference.chat(QUESTION, &config);
    assert_ne!(want, plain_tokens);
    let server = start(model, test_config());
    let addr = server.local_addr();
    for method in ["ar", "sd", "lookup", "mirror"] {
        let mut body = chat_body(QUESTION, 16, method, false);
        body["frequency_penalty"] = json!(0.7);
        body["presence_penalty"] = json!(0.3);
        body["mirror_sd"]["repetition_penalty"] = json!(1.2);
        body["logit_bias"] = json!({ plain_tokens[0].to_string(): -100 });
        // Fields accepted and ignored, and neutral values of refused ones.
        body["metadata"] = json!({"app": "test"});
        body["store"] = json!(false);
        body["logprobs"] = json!(false);
        let response = post(addr, "/v1/chat/completions", &body);
        assert_eq!(response.status, 200, "{method}: {}", response.text());
        let json = response.json().unwrap();
        assert_eq!(token_ids(&json["mirror_sd"]), want, "{method}");
        assert_eq!(response_text(&json), want_text, "{method}");
    }
    // `developer` is `system` under another name.
    let as_role = |role: &str| {
        let body = json!({
            "model": MODEL_NAME,
            "messages": [
                {"role": role, "content": "Answer in one word."},
                {"role": "user", "content": QUESTION},
            ],
            "max_tokens": 8,
            "temperature": 0,
            "mirror_sd": {"method": "ar"},
        });
        let response = post(addr, "/v1/chat/completions", &body);
        assert_eq!(response.status, 200, "{role}: {}", response.text());
        token_ids(&response.json().unwrap()["mirror_sd"])
    };
    assert_eq!(as_role("developer"), as_role("system"));
}

fn weather_tool() -> Value {
    json!({
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather forecast of a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7}
                },
                "required": ["city", "unit", "days"],
                "additionalProperties": false
            }
        }
    })
}

#[test]
fn forced_tool_calls_parse_and_validate_whole_and_streamed() {
    let _serial = serial();
    let Some(model) = smollm2() else { return };
    let server = start(model, test_config());
    let addr = server.local_addr();
    let tool = weather_tool();
    let validator = jsonschema::validator_for(&tool["function"]["parameters"]).unwrap();
    let time_tool = json!({"type": "function", "function": {"name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}},
                       "required": ["zone"], "additionalProperties": false}}});
    let choices = [
        json!("required"),
        json!({"type": "function", "function": {"name": "get_weather"}}),
    ];
    for (i, choice) in choices.iter().enumerate() {
        for method in ["ar", "sd"] {
            let mut body = chat_body(
                "What is the weather in Paris for the next two days?",
                64,
                method,
                false,
            );
            body["tools"] = json!([time_tool, tool]);
            body["tool_choice"] = choice.clone();
            body["temperature"] = json!(0.8);
            body["seed"] = json!(i);
            let response = post(addr, "/v1/chat/completions", &body);
            assert_eq!(
                response.status,
                200,
                "{method} {choice}: {}",
                response.text()
            );
            let json = response.json().unwrap();
            let choice0 = &json["choices"][0];
            assert_eq!(choice0["finish_reason"], "tool_calls", "{json}");
            assert!(choice0["message"]["content"].is_null(), "{json}");
            let call = &choice0["message"]["tool_calls"][0];
            assert_eq!(call["type"], "function");
            assert!(call["id"].as_str().unwrap().starts_with("call_"));
            let name = call["function"]["name"].as_str().unwrap();
            let arguments: Value =
                serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            if name == "get_weather" {
                assert!(validator.is_valid(&arguments), "{arguments}");
            } else {
                assert_eq!(i, 0, "a named choice called {name}");
                assert!(arguments["zone"].is_string(), "{arguments}");
            }
            // Streamed: no content, one tool_calls delta with the same call, then the end.
            body["stream"] = json!(true);
            let mut connection = open_stream(addr, "/v1/chat/completions", &body);
            let (mut deltas, mut finish) = (Vec::new(), Value::Null);
            while let Some(data) = connection.next_event_data().unwrap() {
                if data == "[DONE]" {
                    break;
                }
                let chunk: Value = serde_json::from_str(&data).unwrap();
                let delta = &chunk["choices"][0]["delta"];
                assert!(
                    delta["content"].as_str().unwrap_or("").is_empty(),
                    "{chunk}"
                );
                if let Some(calls) = delta.get("tool_calls") {
                    deltas.push(calls.clone());
                }
                if chunk["choices"][0]["finish_reason"].is_string() {
                    finish = chunk["choices"][0]["finish_reason"].clone();
                }
            }
            assert_eq!(finish, "tool_calls");
            assert_eq!(deltas.len(), 1, "{deltas:?}");
            assert_eq!(deltas[0][0]["index"], 0);
            assert_eq!(
                deltas[0][0]["function"]["arguments"],
                call["function"]["arguments"]
            );
        }
    }
    // A conversation with a call and its result in the history, rendered for a template that
    // knows no tools (SmolLM2's: Hermes blocks), answers in text.
    let body = json!({
        "model": MODEL_NAME,
        "max_tokens": 8,
        "temperature": 0,
        "mirror_sd": {"method": "ar"},
        "tools": [tool],
        "messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\", \"days\": 1}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
        ],
        "tool_choice": "none",
    });
    let response = post(addr, "/v1/chat/completions", &body);
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        response.json().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    // Bad tool requests are the client's fault, with the field named.
    for (what, change, param) in [
        (
            "a named tool that is not offered",
            json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
        ),
        (
            "required without tools",
            json!({"tools": null, "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            "a tool message without its call id",
            json!({"messages": [{"role": "tool", "content": "x"}]}),
            "messages[0].tool_call_id",
        ),
        (
            "arguments that are not JSON",
            json!({"messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}),
            "messages[0].tool_calls[0]",
        ),
        (
            "tools on mirror",
            json!({"mirror_sd": {"method": "mirror"}}),
            "tools",
        ),
    ] {
        let mut body = chat_body(QUESTION, 8, "ar", false);
        body["tools"] = json!([weather_tool()]);
        for (key, value) in change.as_object().unwrap() {
            body[key] = value.clone();
        }
        let response = post(addr, "/v1/chat/completions", &body);
        assert_eq!(response.status, 400, "{what}: {}", response.text());
        assert_eq!(response.json().unwrap()["error"]["param"], param, "{what}");
    }
}

/// LangChain's `ChatOpenAI` (langchain-openai, installed into `.venv` by `.ci/run`) as a client:
/// `invoke`, `stream`, `bind_tools` and `with_structured_output`, with no extension fields.
#[test]
fn the_langchain_client_talks_to_the_server() {
    let _serial = serial();
    let Some(model) = smollm2() else { return };
    let python = common::repo_root().join(".venv/bin/python");
    let has_langchain = python.is_file()
        && std::process::Command::new(&python)
            .args(["-c", "import langchain_openai"])
            .output()
            .is_ok_and(|o| o.status.success());
    if !has_langchain {
        let message = "langchain-openai is not installed in .venv (run .ci/run)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{message}");
        }
        eprintln!("skipping: {message}");
        return;
    }
    // Plain requests run on the server's default method (Mirror), which is lossless.
    let (_, expected) = Reference::new(model).chat(QUESTION, &GenerationConfig::greedy(16));
    let server = start(model, test_config());
    let output = std::process::Command::new(&python)
        .arg(common::repo_root().join("tests/langchain_client.py"))
        .arg(format!("http://{}/v1", server.local_addr()))
        .arg(MODEL_NAME)
        .arg(QUESTION)
        .output()
        .expect("run python");
    assert!(
        output.status.success(),
        "the LangChain client failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("the script prints JSON");
    assert_eq!(report["invoke"], expected);
    assert_eq!(report["stream"], expected);
    let calls = report["tool_calls"].as_array().expect("tool calls");
    assert_eq!(calls.len(), 1, "{report}");
    assert_eq!(calls[0]["name"], "get_weather");
    assert!(
        calls[0]["args"]["city"].is_string() && calls[0]["args"]["days"].is_i64(),
        "{report}"
    );
    assert!(report["structured"]["name"].is_string(), "{report}");
    assert!(report["structured"]["country"].is_string(), "{report}");
}

#[test]
fn logprobs_come_back_whole_and_streamed_on_both_endpoints() {
    let _serial = serial();
    let Some(model) = smollm2() else { return };
    let server = start(model, test_config());
    let addr = server.local_addr();
    for (path, mut body) in [
        ("/v1/chat/completions", chat_body(QUESTION, 8, "sd", false)),
        (
            "/v1/completions",
            completion_body(TEXT_PROMPT, 8, "lookup", false),
        ),
    ] {
        let chat = path.contains("chat");
        if chat {
            body["logprobs"] = json!(true);
            body["top_logprobs"] = json!(2);
        } else {
            body["logprobs"] = json!(2);
        }
        let response = post(addr, path, &body);
        assert_eq!(response.status, 200, "{path}: {}", response.text());
        let json = response.json().unwrap();
        let tokens = token_ids(&json["mirror_sd"]).len();
        let logprobs = &json["choices"][0]["logprobs"];
        // Greedy: each token is the likeliest one, so its value heads its alternatives.
        let values: Vec<f64> = if chat {
            let content = logprobs["content"].as_array().expect("content");
            assert_eq!(content.len(), tokens, "{json}");
            content
                .iter()
                .map(|e| {
                    let lp = e["logprob"].as_f64().unwrap();
                    let top = e["top_logprobs"].as_array().unwrap();
                    assert_eq!(top.len(), 2);
                    assert_eq!(top[0]["token"], e["token"], "{e}");
                    assert_eq!(top[0]["logprob"].as_f64().unwrap(), lp);
                    assert!(top[1]["logprob"].as_f64().unwrap() <= lp);
                    assert_eq!(
                        e["bytes"].as_array().unwrap().len(),
                        e["token"].as_str().unwrap().len()
                    );
                    lp
                })
                .collect()
        } else {
            let values = logprobs["token_logprobs"]
                .as_array()
                .expect("token_logprobs");
            assert_eq!(values.len(), tokens, "{json}");
            assert_eq!(logprobs["tokens"].as_array().unwrap().len(), tokens);
            assert_eq!(logprobs["text_offset"][0], 0);
            values.iter().map(|v| v.as_f64().unwrap()).collect()
        };
        assert!(
            values.iter().all(|&v| v <= 0.0 && v.is_finite()),
            "{values:?}"
        );
        // Streamed: the chunks' entries add up to the whole response's, in order.
        body["stream"] = json!(true);
        let mut connection = open_stream(addr, path, &body);
        let mut streamed = Vec::new();
        while let Some(data) = connection.next_event_data().unwrap() {
            if data == "[DONE]" {
                break;
            }
            let chunk: Value = serde_json::from_str(&data).unwrap();
            let lp = &chunk["choices"][0]["logprobs"];
            if chat {
                for e in lp["content"].as_array().into_iter().flatten() {
                    streamed.push(e["logprob"].as_f64().unwrap());
                }
            } else {
                for v in lp["token_logprobs"].as_array().into_iter().flatten() {
                    streamed.push(v.as_f64().unwrap());
                }
            }
        }
        assert_eq!(streamed, values, "{path} streamed");
    }
}
