//! Structured output on the batched engine: the suite of schema-constrained prompts in
//! `benches/prompts/constrained.jsonl` (field extraction, lists, tool-call-shaped objects,
//! configs), each generated under its JSON schema with the tokens the grammar forces proposed as
//! free drafts (`BatchSettings::forced_drafts`) and without, alternated prompt by prompt in one
//! run. Reports tokens per second (median over the prompts), the speedup of forced drafts, the
//! grammar's time as a share of the generation and per token against a plain decode step, and
//! whether every output is valid under its schema (the `jsonschema` crate, independent of
//! llguidance).
//!
//! ```text
//! cargo run --release --example constrained_bench                       # default target, ar
//! cargo run --release --example constrained_bench -- --methods ar,lookup,sd,mirror
//! ```
//!
//! `mirror` runs one sequence at a time (`Mirror`, `MirrorSettings::forced_drafts` on and off),
//! the other methods on the batched engine.

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use mirror_sd::mirror_core::ChatMessage;
use mirror_sd::mirror_core::{Model, Tokenizer};
use mirror_sd::mirror_scheduler::{
    BatchSettings, Constraint, Decoder, EngineHandle, Generation, GenerationConfig, LookupConfig,
    Mirror, MirrorSettings, Prompt, SequenceRequest, Speculation, SpeculativeSettings,
    WindowPolicy,
};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Method {
    /// One token per step (forced tokens aside).
    Ar,
    /// Prompt-lookup windows.
    Lookup,
    /// Windows drafted by the draft model.
    Sd,
    /// Mirror-SD (one sequence at a time, not the batch).
    Mirror,
}

#[derive(Parser, Debug)]
#[command(about = "Schema-constrained generation with and without grammar-forced drafts")]
struct Args {
    #[command(flatten)]
    pair: common::PairArgs,
    /// Threads of each model's pool (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// The suite: `{"id", "messages", "schema"}` per line.
    #[arg(long, default_value = "benches/prompts/constrained.jsonl")]
    suite: std::path::PathBuf,
    /// Methods, each run with forced drafts on and off.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "ar")]
    methods: Vec<Method>,
    /// Most tokens per output (an output the schema has not closed by then is invalid).
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Most draft tokens per window (lookup, sd).
    #[arg(long, default_value_t = SpeculativeSettings::default().gamma)]
    gamma: usize,
}

fn main() {
    mirror_sd::mirror_core::threads::limit_candle_threads(1);
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

struct Case {
    id: String,
    prompt: Vec<u32>,
    schema: Value,
}

fn speculation_of(method: Method, gamma: usize) -> Speculation {
    match method {
        Method::Ar | Method::Mirror => Speculation::None,
        Method::Lookup => Speculation::Lookup {
            lookup: LookupConfig::default(),
            gamma,
        },
        Method::Sd => Speculation::Draft {
            gamma,
            greedy_draft: false,
        },
    }
}

/// What runs a generation: the batched engine, or Mirror one sequence at a time.
enum Runner<'a> {
    Batched(&'a EngineHandle, Speculation),
    Mirror(&'a mut Mirror),
}

/// One greedy constrained generation, timed from submission.
fn generate(
    runner: Runner<'_>,
    case: &Case,
    max_tokens: usize,
) -> Result<(Generation, f64), String> {
    let config = GenerationConfig {
        constraint: Some(Constraint::JsonSchema(case.schema.clone())),
        ..GenerationConfig::greedy(max_tokens)
    };
    let started = Instant::now();
    let generation = match runner {
        Runner::Batched(engine, speculation) => {
            let request = SequenceRequest {
                speculation,
                ..SequenceRequest::new(case.prompt.clone(), config)
            };
            engine.generate(request).map_err(|e| e.to_string())?
        }
        Runner::Mirror(mirror) => mirror
            .generate(&case.prompt, &config)
            .map_err(|e| e.to_string())?,
    };
    Ok((generation, started.elapsed().as_secs_f64()))
}

/// Whether `generation`'s text parses and validates under `schema`.
fn valid(generation: &Generation, tokenizer: &Tokenizer, schema: &Value) -> Result<bool, String> {
    let validator = jsonschema::validator_for(schema).map_err(|e| e.to_string())?;
    let text = match &generation.text {
        Some(text) => text.clone(),
        None => tokenizer
            .decode(&generation.tokens, true)
            .map_err(|e| e.to_string())?,
    };
    Ok(serde_json::from_str::<Value>(&text).is_ok_and(|v| validator.is_valid(&v)))
}

/// Mirror with forced drafts on and off (the same settings otherwise).
fn mirrors(
    target: &Arc<Model>,
    draft: &Arc<Model>,
    tokenizer: &Tokenizer,
) -> Result<Vec<Mirror>, String> {
    [true, false]
        .into_iter()
        .map(|forced_drafts| {
            Mirror::builder(Arc::clone(target), Arc::clone(draft))
                .tokenizer(tokenizer.clone())
                .settings(MirrorSettings {
                    forced_drafts,
                    ..MirrorSettings::default()
                })
                .build()
                .map_err(|e| e.to_string())
        })
        .collect()
}

fn run(args: Args) -> Result<(), String> {
    let source = common::resolve_source(&args.pair.target)?;
    let device = common::parse_device("cpu")?;
    let options = args.pair.target_options(&device, args.threads)?;
    let loaded = common::load_with_spinner("target", &source, &options)?;
    let target = Arc::new(loaded.model);
    let tokenizer = loaded.tokenizer;
    let text = std::fs::read_to_string(&args.suite)
        .map_err(|e| format!("{}: {e}", args.suite.display()))?;
    let cases = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let v: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
            let messages: Vec<ChatMessage> =
                serde_json::from_value(v["messages"].clone()).map_err(|e| e.to_string())?;
            Ok(Case {
                id: v["id"].as_str().unwrap_or("?").to_string(),
                prompt: Prompt::Chat(&messages)
                    .encode(&tokenizer)
                    .map_err(|e| e.to_string())?,
                schema: v["schema"].clone(),
            })
        })
        .collect::<Result<Vec<Case>, String>>()?;
    let needs_draft = args
        .methods
        .iter()
        .any(|m| matches!(m, Method::Sd | Method::Mirror));
    let draft = if needs_draft {
        let draft_options = args.pair.draft_options(&device, args.threads)?;
        let draft_source = common::resolve_source(&args.pair.draft)?;
        Some(Arc::new(
            common::load_with_spinner("draft", &draft_source, &draft_options)?.model,
        ))
    } else {
        None
    };
    // One engine per setting, so that both are warm and the runs alternate.
    let engines = [true, false]
        .into_iter()
        .map(|forced_drafts| {
            let settings = BatchSettings {
                forced_drafts,
                // Fixed windows: both settings propose the same drafts where nothing is forced.
                window: WindowPolicy::Fixed,
                prefix_cache: false,
                ..BatchSettings::default()
            };
            let (target, tokenizer) = (Arc::clone(&target), Some(tokenizer.clone()));
            match &draft {
                Some(d) => {
                    EngineHandle::spawn_with_draft(target, Arc::clone(d), tokenizer, settings)
                }
                None => EngineHandle::spawn(target, tokenizer, settings),
            }
            .map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    // A plain decode step, for the grammar's cost per token.
    let plain = engines[1]
        .generate(SequenceRequest::new(
            cases[0].prompt.clone(),
            GenerationConfig {
                stop_at_eos: false,
                ..GenerationConfig::greedy(32)
            },
        ))
        .map_err(|e| e.to_string())?;
    let decode_s = (plain.stats.time.total - plain.stats.time.prefill).as_secs_f64();
    let step_s = decode_s / (plain.tokens.len().max(2) - 1) as f64;
    // Warm-up: compile the grammars' first masks and the pools.
    generate(
        Runner::Batched(&engines[0], Speculation::None),
        &cases[0],
        16,
    )?;
    let mut mirrors = match (&draft, args.methods.contains(&Method::Mirror)) {
        (Some(draft), true) => mirrors(&target, draft, &tokenizer)?,
        _ => Vec::new(),
    };
    let mut rows = Vec::new();
    for &method in &args.methods {
        let speculation = speculation_of(method, args.gamma);
        let mut per_setting = [(); 2].map(|_| Vec::new());
        for case in &cases {
            for i in 0..2 {
                let runner = match method {
                    Method::Mirror => Runner::Mirror(&mut mirrors[i]),
                    _ => Runner::Batched(&engines[i], speculation),
                };
                let (generation, seconds) = generate(runner, case, args.max_tokens)?;
                let tokens = generation.tokens.len();
                let grammar_s = generation.stats.time.constraint.as_secs_f64();
                per_setting[i].push(json!({
                    "id": case.id,
                    "tokens": tokens,
                    "tok_s": tokens as f64 / seconds,
                    "forced_tokens": generation.stats.forced_tokens,
                    "grammar_share": grammar_s / seconds,
                    "grammar_per_token_over_step": grammar_s / tokens.max(1) as f64 / step_s,
                    "valid": valid(&generation, &tokenizer, &case.schema)?,
                }));
            }
        }
        let median_of = |rows: &[Value], key: &str| {
            common::median(rows.iter().filter_map(|r| r[key].as_f64()).collect())
        };
        let name = format!("{method:?}").to_lowercase();
        let [on, off] = &per_setting;
        let speedups: Vec<f64> = on
            .iter()
            .zip(off)
            .filter_map(|(a, b)| Some(a["tok_s"].as_f64()? / b["tok_s"].as_f64()?))
            .collect();
        let all_valid = on.iter().chain(off).all(|r| r["valid"] == true);
        println!(
            "{name:<7} forced drafts {:>6.2} tok/s, without {:>6.2} tok/s: {:.2}x (median per prompt); \
             grammar {:.1}% of the time, {:.1}% of a decode step per token; valid: {}",
            median_of(on, "tok_s"),
            median_of(off, "tok_s"),
            common::median(speedups.clone()),
            100.0 * median_of(on, "grammar_share"),
            100.0 * median_of(on, "grammar_per_token_over_step"),
            if all_valid { "all" } else { "NOT ALL" }
        );
        rows.push(json!({
            "method": name,
            "forced_drafts": on,
            "without": off,
            "speedup_median": common::median(speedups),
            "all_valid": all_valid,
        }));
    }
    let out = json!({
        "constrained": rows,
        "decode_step_s": step_s,
        "cpu": common::cpu_description(),
    });
    std::fs::create_dir_all("target/bench").map_err(|e| e.to_string())?;
    let path = "target/bench/constrained.json";
    std::fs::write(
        path,
        serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    println!("{} ({path})", common::cpu_description());
    Ok(())
}
