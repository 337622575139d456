//! Many prompts through the batched engine with every generation monitor, one JSON line each:
//! the driver of `scripts/monitor_auc.py` (which writes the prompts and grades the answers).
//!
//! Reads JSON lines `{"id": ..., "prompt": "..."}` (`--prompts FILE`, or stdin), renders each
//! as a user message with the target's chat template, generates them all at once on one
//! batched engine (greedy unless asked otherwise), and prints, in input order,
//! `{"id", "text", "tokens", "finish_reason", "monitors"}` per line on stdout.
//!
//! ```text
//! cargo run --release --example monitor_study -- --target models/SmolLM2-135M-Instruct.Q4_1.gguf --prompts p.jsonl
//! ```

#[path = "common/mod.rs"]
mod common;

use std::io::{BufRead, Write};
use std::sync::Arc;

use clap::Parser;
use mirror_sd::mirror_core::{ChatMessage, LoadOptions};
use mirror_sd::mirror_scheduler::monitor::MonitorConfig;
use mirror_sd::mirror_scheduler::{
    BatchSettings, EngineHandle, GenerationConfig, LookupConfig, SequenceRequest, Speculation,
};
use serde::Deserialize;

#[derive(Parser, Debug)]
#[command(about = "Run prompts with generation monitors on the batched engine, as JSON lines")]
struct Args {
    /// The target: a model directory, a .gguf file, or a hub id.
    #[arg(long, default_value = common::DEFAULT_TARGET)]
    target: String,
    /// JSON lines of `{"id", "prompt"}` (default: stdin).
    #[arg(long)]
    prompts: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 120)]
    max_new_tokens: usize,
    /// Sequences decoding at once.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Draft with prompt lookup (greedy output is the same; often faster).
    #[arg(long)]
    lookup: bool,
    /// The monitors' parameters, as a `MonitorConfig` in JSON (default: all three, defaults).
    #[arg(long)]
    monitor_config: Option<String>,
    /// Run no monitor (the same generations, to time what monitoring costs).
    #[arg(long)]
    no_monitors: bool,
    /// Keep no finished sequence's KV for later prompts (the batched engine's prefix cache).
    #[arg(long)]
    no_prefix_cache: bool,
}

#[derive(Deserialize)]
struct PromptLine {
    id: serde_json::Value,
    prompt: String,
}

fn main() {
    mirror_sd::mirror_core::threads::limit_candle_threads(1);
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    let input: Box<dyn BufRead> = match &args.prompts {
        Some(path) => Box::new(std::io::BufReader::new(
            std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?,
        )),
        None => Box::new(std::io::stdin().lock()),
    };
    let mut prompts = Vec::new();
    for line in input.lines() {
        let line = line.map_err(|e| e.to_string())?;
        if !line.trim().is_empty() {
            let parsed: PromptLine =
                serde_json::from_str(&line).map_err(|e| format!("bad prompt line: {e}"))?;
            prompts.push(parsed);
        }
    }
    let monitors: MonitorConfig = match &args.monitor_config {
        Some(json) => serde_json::from_str(json).map_err(|e| format!("--monitor-config: {e}"))?,
        None => MonitorConfig::default(),
    };
    let source = common::resolve_source(&args.target)?;
    let loaded = common::load_with_spinner("target", &source, &LoadOptions::default())?;
    let tokenizer = loaded.tokenizer;
    let settings = BatchSettings {
        max_batch: args.max_batch,
        prefix_cache: !args.no_prefix_cache,
        ..BatchSettings::default()
    };
    let engine = EngineHandle::spawn(Arc::new(loaded.model), Some(tokenizer.clone()), settings)
        .map_err(|e| e.to_string())?;
    let speculation = match args.lookup {
        true => Speculation::Lookup {
            lookup: LookupConfig::default(),
            gamma: 4,
        },
        false => Speculation::None,
    };
    let config = GenerationConfig {
        stop_tokens: tokenizer.eos_ids().to_vec(),
        monitors: (!args.no_monitors).then_some(monitors),
        ..GenerationConfig::greedy(args.max_new_tokens)
    };
    let started = std::time::Instant::now();
    // Everything is submitted at once: the engine runs `max_batch` at a time.
    let mut streams = Vec::with_capacity(prompts.len());
    for p in &prompts {
        let messages = [ChatMessage::new("user", p.prompt.clone())];
        let text = (tokenizer.apply_chat_template(&messages, true)).map_err(|e| e.to_string())?;
        let tokens = tokenizer.encode(&text, false).map_err(|e| e.to_string())?;
        let request = SequenceRequest {
            speculation,
            ..SequenceRequest::new(tokens, config.clone())
        };
        streams.push(engine.submit(request).map_err(|e| e.to_string())?);
    }
    let mut out = std::io::stdout().lock();
    for (i, (p, stream)) in prompts.iter().zip(streams).enumerate() {
        let generation = stream.wait().map_err(|e| e.to_string())?;
        let line = serde_json::json!({
            "id": p.id,
            "text": generation.text,
            "tokens": generation.tokens.len(),
            "finish_reason": generation.finish_reason,
            "monitors": generation.monitors,
        });
        writeln!(out, "{line}").map_err(|e| e.to_string())?;
        out.flush().map_err(|e| e.to_string())?;
        eprintln!(
            "[monitor_study] {}/{} done, {:.2} s",
            i + 1,
            prompts.len(),
            started.elapsed().as_secs_f64()
        );
    }
    eprintln!(
        "[monitor_study] {} prompts in {:.2} s",
        prompts.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
