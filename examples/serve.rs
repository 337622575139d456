//! An OpenAI-compatible HTTP server (`mirror_sd::serve`) over Mirror-SD, vanilla SD or the
//! target alone, chosen per request.
//!
//! With no arguments it serves the default pair (Qwen2.5-Coder 1.5B target, 0.5B draft; fetched
//! when missing) with Mirror on http://127.0.0.1:8080:
//!
//! ```text
//! cargo run --release --example serve
//! cargo run --release --example serve -- --target models/SmolLM2-135M-Instruct.Q4_1.gguf --self-draft-layers 10 --port 8000
//! curl -s localhost:8080/v1/chat/completions -H 'content-type: application/json' \
//!   -d '{"model": "qwen2.5-coder-1.5b-instruct-q4_k_m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32, "temperature": 0}'
//! ```
//!
//! SIGINT or SIGTERM stops accepting, lets accepted requests finish within `--shutdown-grace-s`,
//! then exits 0; a second signal cancels what is left at once.

#[path = "common/mod.rs"]
mod common;

/// mimalloc instead of the system allocator: glibc's per-thread arenas kept growing the
/// server's resident memory under a long mixed load (`load --soak`, BENCHMARKS.md). A service
/// that embeds `mirror_sd::serve` chooses its own allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use mirror_sd::serve::{Backend, BatchSettings, Method, Server, ServerConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum MethodArg {
    /// The target alone.
    Ar,
    /// Vanilla speculative decoding.
    Sd,
    /// Speculation by prompt lookup (no draft model).
    Lookup,
    /// Mirror speculative decoding (one sequence at a time).
    Mirror,
}

impl MethodArg {
    fn method(self) -> Method {
        match self {
            MethodArg::Ar => Method::Autoregressive,
            MethodArg::Sd => Method::Speculative,
            MethodArg::Lookup => Method::Lookup,
            MethodArg::Mirror => Method::Mirror,
        }
    }
}

#[derive(Parser, Debug)]
#[command(about = "Serve Mirror speculative decoding over an OpenAI-compatible HTTP API")]
struct Args {
    #[command(flatten)]
    pair: common::PairArgs,
    #[command(flatten)]
    draft_model: common::DraftModelArgs,
    #[command(flatten)]
    drafting: common::DraftArgs,
    /// Method of requests that do not name one (`"mirror_sd": {"method": ...}`).
    #[arg(long, value_enum, default_value_t = MethodArg::Mirror)]
    method: MethodArg,
    /// Methods requests may ask for (comma-separated); the draft loads only if sd or mirror is.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "ar,sd,lookup,mirror"
    )]
    methods: Vec<MethodArg>,
    /// Most sequences in the batch (ar, sd and lookup requests); 1 serves one at a time.
    #[arg(long, default_value_t = BatchSettings::default().max_batch)]
    max_batch: usize,
    /// The batch's KV pool, in MiB (admission waits when it is full).
    #[arg(long, default_value_t = BatchSettings::default().kv_budget_bytes >> 20)]
    kv_budget_mb: u64,
    #[command(flatten)]
    mirror: common::MirrorArgs,
    #[command(flatten)]
    placement: common::PlacementArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Model id clients name (default: the target's file or directory name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Requests that may wait while one generates; more get 429.
    #[arg(long, default_value_t = 32)]
    queue_capacity: usize,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 2 << 20)]
    max_body_bytes: usize,
    /// Deadline of every request in seconds (504 beyond); requests may ask for less.
    #[arg(long, default_value_t = 600.0)]
    request_timeout_s: f64,
    /// max_tokens of requests that give none.
    #[arg(long, default_value_t = 256)]
    default_max_tokens: usize,
    /// On SIGINT/SIGTERM, seconds accepted requests may take to finish before cancellation.
    #[arg(long, default_value_t = 30.0)]
    shutdown_grace_s: f64,
}

fn main() {
    // Before any model or pool exists: see mirror_core::threads.
    mirror_sd::mirror_core::threads::limit_candle_threads(1);
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn seconds(name: &str, value: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("--{name} must be a positive number of seconds, got {value}"))
}

fn run(args: Args) -> Result<(), String> {
    let methods: Vec<Method> = args.methods.iter().map(|m| m.method()).collect();
    let default_method = args.method.method();
    if !methods.contains(&default_method) {
        return Err(format!("--method {default_method} is not among --methods"));
    }
    let request_timeout = seconds("request-timeout-s", args.request_timeout_s)?;
    let shutdown_grace = Duration::try_from_secs_f64(args.shutdown_grace_s).map_err(|_| {
        format!(
            "--shutdown-grace-s {} is not a duration",
            args.shutdown_grace_s
        )
    })?;
    let target_source = common::resolve_source(&args.pair.target)?;
    // Pools are fixed at load time, so the default method decides the placement; requests
    // for another method run on the same pools.
    let (target_options, draft_options) = args
        .placement
        .load_options(&args.pair, default_method == Method::Mirror)?;
    let loaded = common::load_with_spinner("target", &target_source, &target_options)?;
    let target = Arc::new(loaded.model);
    let draft = if methods.iter().any(|m| m.needs_draft()) {
        Some(
            args.draft_model
                .load(&args.pair, &target, &loaded.tokenizer, &draft_options)?,
        )
    } else {
        None
    };
    let settings = args.mirror.settings(args.drafting.settings());
    let backend = Backend::new(
        target,
        draft,
        loaded.tokenizer,
        &methods,
        default_method,
        &settings,
    )
    .map_err(|e| e.to_string())?;
    let model_name = match args.served_model_name {
        Some(name) => name,
        None => model_name_of(&args.pair.target),
    };
    let config = ServerConfig {
        model_name: model_name.clone(),
        queue_capacity: args.queue_capacity,
        max_body_bytes: args.max_body_bytes,
        request_timeout,
        default_max_tokens: args.default_max_tokens,
        shutdown_grace,
        handle_signals: true,
        batch: BatchSettings {
            max_batch: args.max_batch,
            kv_budget_bytes: args.kv_budget_mb << 20,
            ..BatchSettings::default()
        },
    };
    let server = Server::start(SocketAddr::new(args.host, args.port), backend, config)
        .map_err(|e| e.to_string())?;
    let served: Vec<&str> = methods.iter().map(|m| m.as_str()).collect();
    // The load generator and scripts wait for this line.
    println!(
        "listening on http://{} (model `{model_name}`, methods {}, default {default_method})",
        server.local_addr(),
        served.join(",")
    );
    server.wait().map_err(|e| e.to_string())?;
    eprintln!("shut down cleanly");
    Ok(())
}

/// The model id: the target's file or directory name without `.gguf`, or a hub id as given.
fn model_name_of(target: &str) -> String {
    let path = std::path::Path::new(target);
    if path.exists() || target.ends_with(".gguf") {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| target.to_string());
        name.trim_end_matches(".gguf").to_string()
    } else {
        target.to_string()
    }
}
