//! Load generator for the `serve` example: N concurrent clients on loopback, each sending a
//! bounded number of greedy chat requests back to back. Reports p50/p99 latency, time to first
//! token (streamed requests), throughput, errors by status, and whether every output equals a
//! reference generation (the same prompt, generated once beforehand with `--reference-method`,
//! by default the target alone).
//!
//! ```text
//! cargo run --release --example serve &            # wait for "listening on ..."
//! cargo run --release --example load -- --clients 1,4,16 --requests-per-client 2 --max-tokens 32
//! target/llama-cpp/bin/llama-server -m models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf -np 8 -t 2 --port 8081 &
//! cargo run --release --example load -- --url http://127.0.0.1:8081 --server llama-server
//! ```
//!
//! `--server llama-server` drives llama.cpp's own server on the same file instead, for
//! comparison: the same requests with its top-level `ignore_eos`, token counts from `usage`, and
//! no correctness check (its numerics differ from ours, so its tokens may too).
//!
//! `--soak` runs a long mixed load instead of the levels (see `soak.rs`): `--soak-requests`
//! requests at `--soak-clients` clients, random lengths, some cancelled mid-stream and some
//! malformed, the server's resident memory sampled on the way.
//!
//! ```text
//! cargo run --release --example load -- --soak --url http://127.0.0.1:8000
//! ```

#[path = "../common/mod.rs"]
mod common;
#[path = "../../tests/common/http.rs"]
mod http;
mod soak;

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use http::Connection;
use mirror_sd::mirror_core::ChatMessage;
use serde_json::{json, Value};

/// Bounds that keep a run finite whatever the flags.
const MAX_CLIENTS: usize = 256;
const MAX_REQUESTS_PER_CLIENT: usize = 1000;
const MAX_TOKENS: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Server-sent events (time to first token measured at the client).
    Stream,
    /// Whole responses.
    Whole,
}

/// Which server the load goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ServerKind {
    /// Ours (`examples/serve.rs`).
    MirrorSd,
    /// llama.cpp's `llama-server`.
    LlamaServer,
}

#[derive(Parser, Debug)]
#[command(about = "Concurrent loopback load on the mirror-sd server")]
struct Args {
    /// The kind of server at `--url`.
    #[arg(long, value_enum, default_value_t = ServerKind::MirrorSd)]
    server: ServerKind,
    /// The server (loopback addresses only).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Model id (default: the first one /v1/models lists).
    #[arg(long)]
    model: Option<String>,
    /// Concurrency levels to run in turn (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    clients: Vec<usize>,
    /// Requests each client sends, one after another.
    #[arg(long, default_value_t = 2)]
    requests_per_client: usize,
    /// Tokens per request (end-of-sequence ignored, so every request generates this many).
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Speculation method of the load (default: the server's).
    #[arg(long)]
    method: Option<String>,
    /// Method of the reference generations.
    #[arg(long, default_value = "ar")]
    reference_method: String,
    /// Skip the reference generations and the correctness check.
    #[arg(long)]
    no_reference: bool,
    #[arg(long, value_enum, default_value_t = Mode::Stream)]
    mode: Mode,
    /// Prompt suite (JSON lines with `messages`), as used by `compare`.
    #[arg(long, default_value = "../shared/prompts/bench.jsonl")]
    prompts: PathBuf,
    /// Distinct prompts taken from the suite.
    #[arg(long, default_value_t = 8)]
    prompt_count: usize,
    /// Per level: no new request starts after this many seconds.
    #[arg(long, default_value_t = 300.0)]
    time_limit_s: f64,
    /// Per request: give up after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    request_timeout_s: f64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Run the soak instead of the levels.
    #[arg(long)]
    soak: bool,
    /// Soak: requests in all.
    #[arg(long, default_value_t = 2000)]
    soak_requests: usize,
    /// Soak: concurrent clients.
    #[arg(long, default_value_t = 8)]
    soak_clients: usize,
    /// Soak: most tokens of a request (each draws its length from 1..=this).
    #[arg(long, default_value_t = 48)]
    soak_max_tokens: usize,
    /// Soak: seed of the request mix.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Soak: the server's process id, for its resident memory (default: the process listening
    /// on the port of `--url`).
    #[arg(long)]
    server_pid: Option<u32>,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// `http://host:port` on a loopback address.
fn loopback_addr(url: &str) -> Result<SocketAddr, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("--url {url}: only http:// URLs are supported"))?;
    let authority = rest.trim_end_matches('/');
    let addrs: Vec<SocketAddr> = authority
        .to_socket_addrs()
        .map_err(|e| format!("--url {url}: {e}"))?
        .collect();
    let addr = addrs
        .first()
        .copied()
        .ok_or_else(|| format!("--url {url}: no address"))?;
    if addrs.iter().any(|a| !a.ip().is_loopback()) {
        return Err(format!(
            "--url {url}: the load generator only targets loopback addresses"
        ));
    }
    Ok(addr)
}

fn positive_seconds(name: &str, value: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("--{name} must be a positive number of seconds"))
}

struct Outcome {
    status: u16,
    latency: Duration,
    time_to_first_token: Option<Duration>,
    completion_tokens: usize,
    text: String,
    token_ids: Vec<u32>,
    prompt: usize,
    error: Option<String>,
}

fn request_body(
    server: ServerKind,
    model: &str,
    messages: &[ChatMessage],
    max_tokens: usize,
    method: Option<&str>,
    stream: bool,
) -> Value {
    let mut body = json!({
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    });
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    match server {
        ServerKind::MirrorSd => {
            let mut extension = json!({"ignore_eos": true});
            if let Some(method) = method {
                extension["method"] = json!(method);
            }
            body["mirror_sd"] = extension;
        }
        ServerKind::LlamaServer => body["ignore_eos"] = json!(true),
    }
    body
}

fn token_ids(report: &Value) -> Vec<u32> {
    report["token_ids"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// Every client thread's outcomes, in thread order (a thread that panicked gives none).
fn join_all<T>(handles: Vec<std::thread::ScopedJoinHandle<'_, Vec<T>>>) -> Vec<T> {
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap_or_default())
        .collect()
}

fn send_one(
    addr: SocketAddr,
    body: &Value,
    stream: bool,
    prompt: usize,
    timeout: Duration,
) -> Outcome {
    let started = Instant::now();
    let mut outcome = Outcome {
        status: 0,
        latency: Duration::ZERO,
        time_to_first_token: None,
        completion_tokens: 0,
        text: String::new(),
        token_ids: Vec::new(),
        prompt,
        error: None,
    };
    let result = if stream {
        read_stream(addr, body, timeout, started, &mut outcome)
    } else {
        read_whole(addr, body, timeout, &mut outcome)
    };
    if let Err(e) = result {
        outcome.error = Some(e);
    }
    outcome.latency = started.elapsed();
    outcome
}

fn read_whole(
    addr: SocketAddr,
    body: &Value,
    timeout: Duration,
    outcome: &mut Outcome,
) -> Result<(), String> {
    let response =
        http::post_json(addr, "/v1/chat/completions", body, timeout).map_err(|e| e.to_string())?;
    outcome.status = response.status;
    let json = response.json().map_err(|e| e.to_string())?;
    if response.status != 200 {
        return Err(json["error"]["message"]
            .as_str()
            .unwrap_or("error")
            .to_string());
    }
    outcome.text = json["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("")
        .to_string();
    outcome.token_ids = token_ids(&json["mirror_sd"]);
    outcome.completion_tokens = json["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
    Ok(())
}

fn read_stream(
    addr: SocketAddr,
    body: &Value,
    timeout: Duration,
    started: Instant,
    outcome: &mut Outcome,
) -> Result<(), String> {
    let mut connection = Connection::open(
        addr,
        "POST",
        "/v1/chat/completions",
        body.to_string().as_bytes(),
        timeout,
    )
    .map_err(|e| e.to_string())?;
    outcome.status = connection.status;
    if connection.status != 200 {
        let body = connection.read_to_end().map_err(|e| e.to_string())?;
        return Err(String::from_utf8_lossy(&body).into_owned());
    }
    let mut done = false;
    while let Some(data) = connection.next_event_data().map_err(|e| e.to_string())? {
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let chunk: Value = serde_json::from_str(&data).map_err(|e| e.to_string())?;
        if let Some(error) = chunk.get("error") {
            return Err(error["message"]
                .as_str()
                .unwrap_or("error event")
                .to_string());
        }
        if let Some(tokens) = chunk["usage"]["completion_tokens"].as_u64() {
            outcome.completion_tokens = tokens as usize;
        }
        let Some(choice) = chunk["choices"].get(0) else {
            continue;
        };
        if let Some(piece) = choice["delta"]["content"].as_str() {
            if !piece.is_empty() && outcome.time_to_first_token.is_none() {
                outcome.time_to_first_token = Some(started.elapsed());
            }
            outcome.text += piece;
        }
        if choice["finish_reason"].is_string() {
            outcome.token_ids = token_ids(&chunk["mirror_sd"]);
            outcome.completion_tokens = outcome.completion_tokens.max(outcome.token_ids.len());
        }
    }
    if !done {
        return Err("the stream ended without [DONE]".into());
    }
    Ok(())
}

/// The reference answer to prompt `i` (`messages`) of `max_tokens` tokens, generated with
/// `--reference-method` as a whole response.
fn reference(
    args: &Args,
    addr: SocketAddr,
    model: &str,
    (i, messages): (usize, &[ChatMessage]),
    max_tokens: usize,
    timeout: Duration,
) -> Result<Outcome, String> {
    let body = request_body(
        args.server,
        model,
        messages,
        max_tokens,
        Some(&args.reference_method),
        false,
    );
    let outcome = send_one(addr, &body, false, i, timeout);
    match &outcome.error {
        Some(error) => Err(format!(
            "reference for prompt {i}, {max_tokens} tokens: {} {error}",
            outcome.status
        )),
        None => Ok(outcome),
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn ms(value: Option<f64>) -> String {
    value.map_or("-".into(), |v| format!("{:.0}", v * 1e3))
}

fn run(args: Args) -> Result<(), String> {
    let addr = loopback_addr(&args.url)?;
    if args.clients.is_empty() || args.clients.iter().any(|&c| c == 0 || c > MAX_CLIENTS) {
        return Err(format!(
            "--clients: each level must be in 1..={MAX_CLIENTS}"
        ));
    }
    if args.requests_per_client == 0 || args.requests_per_client > MAX_REQUESTS_PER_CLIENT {
        return Err(format!(
            "--requests-per-client must be in 1..={MAX_REQUESTS_PER_CLIENT}"
        ));
    }
    if args.max_tokens == 0 || args.max_tokens > MAX_TOKENS {
        return Err(format!("--max-tokens must be in 1..={MAX_TOKENS}"));
    }
    let time_limit = positive_seconds("time-limit-s", args.time_limit_s)?;
    let timeout = positive_seconds("request-timeout-s", args.request_timeout_s)?;
    let model = match args.model.clone() {
        Some(model) => model,
        None => {
            let models = http::get(addr, "/v1/models", timeout)
                .and_then(|r| r.json())
                .map_err(|e| format!("GET /v1/models on {addr}: {e}"))?;
            models["data"][0]["id"]
                .as_str()
                .ok_or("the server lists no model")?
                .to_string()
        }
    };
    let suite = common::read_prompts(&args.prompts)?;
    let prompts: Vec<Vec<ChatMessage>> = suite
        .into_iter()
        .take(args.prompt_count.max(1))
        .map(|(_, _, messages)| messages)
        .collect();
    if prompts.is_empty() {
        return Err(format!("{}: no prompts", args.prompts.display()));
    }
    if args.soak {
        return soak::run(&args, addr, &model, &prompts, timeout);
    }
    let references: Option<Vec<Outcome>> =
        if args.no_reference || args.server == ServerKind::LlamaServer {
            None
        } else {
            eprintln!(
                "reference: {} prompts, {} tokens each, method {}",
                prompts.len(),
                args.max_tokens,
                args.reference_method
            );
            let mut references = Vec::new();
            for (i, messages) in prompts.iter().enumerate() {
                references.push(reference(
                    &args,
                    addr,
                    &model,
                    (i, messages),
                    args.max_tokens,
                    timeout,
                )?);
            }
            Some(references)
        };
    let mut levels = Vec::new();
    for &clients in &args.clients {
        let started = Instant::now();
        let outcomes: Vec<Outcome> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..clients)
                .map(|c| {
                    let (model, prompts, method) = (&model, &prompts, args.method.as_deref());
                    scope.spawn(move || {
                        let mut outcomes = Vec::new();
                        for r in 0..args.requests_per_client {
                            if started.elapsed() > time_limit {
                                break;
                            }
                            let prompt = (c * args.requests_per_client + r) % prompts.len();
                            let stream = args.mode == Mode::Stream;
                            let body = request_body(
                                args.server,
                                model,
                                &prompts[prompt],
                                args.max_tokens,
                                method,
                                stream,
                            );
                            outcomes.push(send_one(addr, &body, stream, prompt, timeout));
                        }
                        outcomes
                    })
                })
                .collect();
            join_all(handles)
        });
        let wall = started.elapsed().as_secs_f64();
        levels.push(summarize(clients, &outcomes, references.as_deref(), wall));
        eprintln!("{} clients done in {wall:.1} s", clients);
    }
    if args.json {
        let report = json!({"model": model, "max_tokens": args.max_tokens, "mode": format!("{:?}", args.mode), "levels": levels});
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        );
    } else {
        println!("| clients | requests | ok | errors | correct | p50 latency ms | p99 latency ms | p50 TTFT ms | p99 TTFT ms | tokens/s | requests/s |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        for level in &levels {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} |",
                level["clients"],
                level["requests"],
                level["ok"],
                level["errors_by_status"],
                level["correct"],
                ms(level["latency_p50_s"].as_f64()),
                ms(level["latency_p99_s"].as_f64()),
                ms(level["ttft_p50_s"].as_f64()),
                ms(level["ttft_p99_s"].as_f64()),
                level["tokens_per_second"].as_f64().unwrap_or(0.0),
                level["requests_per_second"].as_f64().unwrap_or(0.0),
            );
        }
    }
    let wrong: u64 = levels
        .iter()
        .map(|l| l["incorrect"].as_u64().unwrap_or(0))
        .sum();
    let errors: u64 = levels
        .iter()
        .map(|l| l["errors"].as_u64().unwrap_or(0))
        .sum();
    if wrong > 0 || errors > 0 {
        return Err(format!(
            "{errors} failed requests, {wrong} outputs differ from the reference"
        ));
    }
    Ok(())
}

fn summarize(
    clients: usize,
    outcomes: &[Outcome],
    references: Option<&[Outcome]>,
    wall: f64,
) -> Value {
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.error.is_none()).collect();
    let mut errors_by_status: BTreeMap<String, usize> = BTreeMap::new();
    for outcome in outcomes.iter().filter(|o| o.error.is_some()) {
        let key = if outcome.status == 0 {
            "io".to_string()
        } else {
            outcome.status.to_string()
        };
        *errors_by_status.entry(key).or_default() += 1;
    }
    for outcome in outcomes.iter().filter_map(|o| o.error.as_ref()).take(3) {
        eprintln!("error: {outcome}");
    }
    let (correct, incorrect) = match references {
        Some(references) => {
            let correct = ok
                .iter()
                .filter(|o| {
                    let want = &references[o.prompt];
                    o.token_ids == want.token_ids && o.text == want.text
                })
                .count();
            (json!(correct), ok.len() - correct)
        }
        None => (json!("unchecked"), 0),
    };
    let mut latencies: Vec<f64> = ok.iter().map(|o| o.latency.as_secs_f64()).collect();
    latencies.sort_by(f64::total_cmp);
    let mut ttfts: Vec<f64> = ok
        .iter()
        .filter_map(|o| o.time_to_first_token)
        .map(|d| d.as_secs_f64())
        .collect();
    ttfts.sort_by(f64::total_cmp);
    let tokens: usize = ok.iter().map(|o| o.completion_tokens).sum();
    json!({
        "clients": clients,
        "requests": outcomes.len(),
        "ok": ok.len(),
        "errors": outcomes.len() - ok.len(),
        "errors_by_status": errors_by_status,
        "correct": correct,
        "incorrect": incorrect,
        "latency_p50_s": percentile(&latencies, 50.0),
        "latency_p99_s": percentile(&latencies, 99.0),
        "ttft_p50_s": percentile(&ttfts, 50.0),
        "ttft_p99_s": percentile(&ttfts, 99.0),
        "generated_tokens": tokens,
        "wall_s": wall,
        "tokens_per_second": if wall > 0.0 { tokens as f64 / wall } else { 0.0 },
        "requests_per_second": if wall > 0.0 { ok.len() as f64 / wall } else { 0.0 },
    })
}
