//! Throughput of the batched engine, like llama.cpp's `llama-batched-bench`: for B sequences at
//! once (B = 1, 2, 4, 8, 16 by default), each with a 128-token prompt and 32 new tokens, the
//! aggregate prompt-processing and decode rates in tokens per second. Medians of several runs.
//!
//! ```text
//! cargo run --release --example batched_bench                     # the default target, a table
//! cargo run --release --example batched_bench -- --json           # the same as JSON
//! cargo run --release --example batched_bench -- --method lookup  # prompt-lookup windows
//! ```
//!
//! Prefill is the time from submission until every prompt is cached (all of them in one ragged
//! forward unless `--step-tokens` is smaller); decode is the rest, and its rate counts every
//! sequence's new tokens. Prompts are pseudo-random tokens, as `llama-batched-bench`'s are, and
//! end-of-sequence does not stop a sequence, so every one generates exactly its tokens.

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;

use clap::{Parser, ValueEnum};
use mirror_sd::mirror_core::Model;
use mirror_sd::mirror_scheduler::{
    BatchSettings, EngineHandle, Generation, GenerationConfig, LookupConfig, SequenceRequest,
    Speculation, SpeculativeSettings,
};
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Method {
    /// One token per step.
    Ar,
    /// Prompt-lookup windows of up to --gamma tokens.
    Lookup,
    /// Vanilla SD with a draft model (not batched yet).
    Sd,
    /// Lookup, then the draft model (not batched yet).
    #[value(name = "sd+lookup")]
    SdLookup,
    /// Mirror (not batched yet).
    Mirror,
}

#[derive(Parser, Debug)]
#[command(about = "Aggregate prefill and decode throughput of the batched engine")]
struct Args {
    #[command(flatten)]
    pair: common::PairArgs,
    /// Threads of the target's pool (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    batches: Vec<usize>,
    /// Prompt tokens of every sequence.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// New tokens of every sequence.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    #[arg(long, value_enum, default_value_t = Method::Ar)]
    method: Method,
    /// Most draft tokens per window (lookup).
    #[arg(long, default_value_t = SpeculativeSettings::default().gamma)]
    gamma: usize,
    /// Rows one step may take (default: every prompt at once).
    #[arg(long)]
    step_tokens: Option<usize>,
    /// Timed runs per batch size (the median is reported); one untimed run comes first.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() {
    mirror_sd::mirror_core::threads::limit_candle_threads(1);
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// Pseudo-random prompt tokens of sequence `seed`, within the vocabulary.
fn prompt(n: usize, seed: u32, vocab: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| {
            let mixed = i
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            (100 + (mixed >> 8) % 20_000) % vocab as u32
        })
        .collect()
}

/// One run of `batch` sequences: (prefill seconds, decode seconds, new tokens).
fn run_batch(
    engine: &EngineHandle,
    target: &Model,
    batch: usize,
    args: &Args,
    speculation: Speculation,
) -> Result<(f64, f64, usize), String> {
    let config = GenerationConfig {
        max_new_tokens: args.new_tokens,
        stop_at_eos: false,
        ..GenerationConfig::default()
    };
    let streams = (0..batch)
        .map(|b| {
            let tokens = prompt(args.prompt_tokens, b as u32 + 1, target.vocab_size());
            let request = SequenceRequest {
                speculation,
                ..SequenceRequest::new(tokens, config.clone())
            };
            engine.submit(request).map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let generations: Vec<Generation> = streams
        .into_iter()
        .map(|s| s.wait().map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let prefill = generations
        .iter()
        .map(|g| g.stats.time.prefill.as_secs_f64())
        .fold(0.0, f64::max);
    let total = generations
        .iter()
        .map(|g| g.stats.time.total.as_secs_f64())
        .fold(0.0, f64::max);
    let tokens = generations.iter().map(|g| g.tokens.len()).sum();
    Ok((prefill, total - prefill, tokens))
}

fn run(args: Args) -> Result<(), String> {
    let speculation = match args.method {
        Method::Ar => Speculation::None,
        Method::Lookup => Speculation::Lookup {
            lookup: LookupConfig::default(),
            gamma: args.gamma,
        },
        other => {
            return Err(format!(
                "--method {other:?} is not batched yet: the batched engine runs ar and lookup"
            ))
        }
    };
    let source = common::resolve_source(&args.pair.target)?;
    let device = common::parse_device("cpu")?;
    let options = common::load_options(&args.pair.weights, &device, args.threads, None)?;
    let loaded = common::load_with_spinner("target", &source, &options)?;
    let target = Arc::new(loaded.model);
    let most = args.batches.iter().copied().max().unwrap_or(1);
    let settings = BatchSettings {
        max_batch: most,
        step_tokens: args
            .step_tokens
            .unwrap_or(most * (args.prompt_tokens + args.gamma + 1)),
        prefill_chunk: args.prompt_tokens,
        ..BatchSettings::default()
    };
    let engine =
        EngineHandle::spawn(Arc::clone(&target), None, settings).map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for &batch in &args.batches {
        run_batch(&engine, &target, batch, &args, speculation)?;
        let (mut prefill, mut decode) = (Vec::new(), Vec::new());
        for _ in 0..args.repeats.max(1) {
            let (p, d, tokens) = run_batch(&engine, &target, batch, &args, speculation)?;
            prefill.push((batch * args.prompt_tokens) as f64 / p);
            decode.push(tokens as f64 / d);
        }
        let row = json!({
            "batch": batch,
            "method": format!("{:?}", args.method).to_lowercase(),
            "prefill_tok_s": median(prefill),
            "decode_tok_s": median(decode),
        });
        if !args.json {
            println!(
                "B={batch:>3}  prefill {:>8.1} tok/s  decode {:>7.2} tok/s",
                row["prefill_tok_s"].as_f64().unwrap_or(0.0),
                row["decode_tok_s"].as_f64().unwrap_or(0.0)
            );
        }
        rows.push(row);
    }
    if args.json {
        let out = json!({ "batched": rows, "cpu": common::cpu_description() });
        println!(
            "{}",
            serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?
        );
    }
    Ok(())
}
