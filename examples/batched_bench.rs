//! Throughput of the batched engine, like llama.cpp's `llama-batched-bench`: for B sequences at
//! once (B = 1, 2, 4, 8, 16 by default), each with a 128-token prompt and 32 new tokens, the
//! aggregate prompt-processing and decode rates in tokens per second. Medians of several runs.
//!
//! ```text
//! cargo run --release --example batched_bench                     # the default target, a table
//! cargo run --release --example batched_bench -- --json           # the same as JSON
//! cargo run --release --example batched_bench -- --methods ar,lookup --suite ../shared/prompts/bench.jsonl
//! cargo run --release --example batched_bench -- --follow-up      # the prefix cache on follow-up turns
//! ```
//!
//! Prefill is the time from submission until every prompt is cached (all of them in one ragged
//! forward unless `--step-tokens` is smaller); decode is the rest, and its rate counts every
//! sequence's new tokens. Prompts are pseudo-random tokens, as `llama-batched-bench`'s are, or
//! with `--suite` the prompt suite's chat prompts (sequence `b` takes prompt `b`, at their own
//! lengths); end-of-sequence does not stop a sequence, so every one generates exactly its tokens.
//! With `--whole-suite` every batch size runs the whole suite with `B` sequences in flight, and
//! the figure is the throughput over it all (prefills included).
//! The prefix cache is off, so that every run prefills. `--methods ar,lookup` runs both in one
//! process, alternating per batch size.

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;

use clap::{Parser, ValueEnum};
use mirror_sd::mirror_core::{ChatMessage, Model, Tokenizer};
use mirror_sd::mirror_scheduler::{
    BatchSettings, EngineHandle, EngineLoad, Event, Generation, GenerationConfig, LookupConfig,
    MirrorSettings, Prompt, SequenceRequest, Speculation, SpeculativeSettings,
};
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Method {
    /// One token per step.
    Ar,
    /// Prompt-lookup windows of up to --gamma tokens.
    Lookup,
    /// Vanilla SD: windows of up to --gamma tokens drafted by --draft, every drafting sequence
    /// in one ragged draft forward per draft step.
    Sd,
    /// Lookup, then the draft model (not batched yet).
    #[value(name = "sd+lookup")]
    SdLookup,
    /// Mirror: windows of up to --gamma tokens, each sequence's tree drafted by its own draft
    /// worker from the step's early-exit tap while the target runs its remaining layers.
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
    /// Methods, run in turn at each batch size.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "ar")]
    methods: Vec<Method>,
    /// Take the prompts from this suite (`{"messages": ...}` per line) instead of random tokens.
    #[arg(long)]
    suite: Option<std::path::PathBuf>,
    /// Window sizing of lookup: adaptive (the batch's goodput) or fixed at gamma.
    #[arg(long, value_enum, default_value_t = common::WindowArg::Adaptive)]
    window: common::WindowArg,
    /// Most draft tokens per window (lookup, sd).
    #[arg(long, default_value_t = SpeculativeSettings::default().gamma)]
    gamma: usize,
    /// Mirror's early-exit candidates per row (lowered as the batch grows, see
    /// `MirrorSettings::batch_candidates`).
    #[arg(long, default_value_t = MirrorSettings::default().kappa)]
    kappa: usize,
    /// Threads of Mirror's draft pool (default: the draft's own, as the target's).
    #[arg(long)]
    draft_threads: Option<usize>,
    #[command(flatten)]
    draft_vocab: common::DraftVocabArgs,
    /// With `--suite`: each batch size runs every prompt of the suite with B sequences in
    /// flight (a finished sequence's slot takes the next prompt), and reports `throughput_tok_s`:
    /// tokens generated over the seconds from the first submission to the last completion,
    /// prefills included. Without it, a batch of B takes the suite's first B prompts (one
    /// category or two).
    #[arg(long, requires = "suite")]
    whole_suite: bool,
    /// Rows one step may take (default: every prompt at once).
    #[arg(long)]
    step_tokens: Option<usize>,
    /// Timed runs per batch size (the median is reported); one untimed run comes first.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Instead: the prefix cache on the suite's multi-turn prompts (`--suite`, default the
    /// shared suite). Each conversation runs, then is replayed as a follow-up turn (its answer
    /// and one more user message); the follow-up's time to first token is timed with the cache
    /// on and off.
    #[arg(long)]
    follow_up: bool,
}

fn main() {
    mirror_sd::mirror_core::threads::limit_candle_threads(1);
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
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

/// What one run of a batch gave.
struct BatchRun {
    prefill_s: f64,
    decode_s: f64,
    prompt_tokens: usize,
    tokens: usize,
    /// Windows verified and draft tokens accepted, over every sequence.
    windows: usize,
    accepted: usize,
    /// Mirror: next windows taken whole or partly from a tree, and rolled out afresh.
    reused: usize,
    misses: usize,
}

/// Every prompt of the suite with `batch` sequences in flight: a sequence that finishes hands
/// its slot to the next prompt at once, as a loaded server's would, so that a method which
/// finishes some sequences early is not charged for a batch draining at its end (fixed groups
/// of `batch` would be). Returns the tokens generated, the seconds from the first submission to
/// the last completion (every prefill included), and the run's window counts.
fn run_suite(
    engine: &EngineHandle,
    prompts: &[Vec<u32>],
    batch: usize,
    args: &Args,
    speculation: Speculation,
) -> Result<BatchRun, String> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let started = std::time::Instant::now();
    let generations: Vec<Generation> = std::thread::scope(|scope| {
        let slots: Vec<_> = (0..batch.clamp(1, prompts.len().max(1)))
            .map(|_| {
                scope.spawn(|| -> Result<Vec<Generation>, String> {
                    let mut done = Vec::new();
                    loop {
                        let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(prompt) = prompts.get(index) else {
                            return Ok(done);
                        };
                        let stream = engine
                            .submit(request(prompt, args, speculation))
                            .map_err(|e| e.to_string())?;
                        done.push(stream.wait().map_err(|e| e.to_string())?);
                    }
                })
            })
            .collect();
        let mut all = Vec::new();
        for slot in slots {
            all.extend(
                slot.join()
                    .map_err(|_| "a submitting thread panicked".to_string())??,
            );
        }
        Ok::<_, String>(all)
    })?;
    let wall = started.elapsed().as_secs_f64();
    let prompt_tokens = prompts.iter().map(Vec::len).sum();
    // No prefill time of its own: prefills interleave with decoding; the wall time is the run's.
    Ok(BatchRun::of(&generations, 0.0, wall, prompt_tokens))
}

/// A request for `prompt`: exactly `--new-tokens` tokens (end-of-sequence does not stop it).
fn request(prompt: &[u32], args: &Args, speculation: Speculation) -> SequenceRequest {
    let config = GenerationConfig {
        max_new_tokens: args.new_tokens,
        stop_at_eos: false,
        ..GenerationConfig::default()
    };
    SequenceRequest {
        speculation,
        ..SequenceRequest::new(prompt.to_vec(), config)
    }
}

impl BatchRun {
    /// A run's figures: its times, its prompts' tokens, and its generations' counts.
    fn of(generations: &[Generation], prefill_s: f64, decode_s: f64, prompt_tokens: usize) -> Self {
        let sum = |f: &dyn Fn(&Generation) -> usize| generations.iter().map(f).sum::<usize>();
        BatchRun {
            prefill_s,
            decode_s,
            prompt_tokens,
            tokens: sum(&|g| g.tokens.len()),
            windows: sum(&|g| g.stats.windows),
            accepted: sum(&|g| {
                let histogram = &g.stats.accepted_histogram;
                histogram.iter().enumerate().map(|(a, n)| a * n).sum()
            }),
            reused: sum(&|g| g.stats.reuse_hits + g.stats.reuse_partials),
            misses: sum(&|g| g.stats.reuse_misses),
        }
    }
}

/// One run of `batch` sequences.
fn run_batch(
    engine: &EngineHandle,
    prompts: &[Vec<u32>],
    batch: usize,
    args: &Args,
    speculation: Speculation,
) -> Result<BatchRun, String> {
    let streams = (0..batch)
        .map(|b| {
            let prompt = &prompts[b % prompts.len()];
            engine
                .submit(request(prompt, args, speculation))
                .map_err(|e| e.to_string())
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
    let prompt_tokens = (0..batch).map(|b| prompts[b % prompts.len()].len()).sum();
    Ok(BatchRun::of(
        &generations,
        prefill,
        total - prefill,
        prompt_tokens,
    ))
}

/// What a method runs as in the batched engine.
fn speculation_of(method: Method, gamma: usize) -> Result<Speculation, String> {
    match method {
        Method::Ar => Ok(Speculation::None),
        Method::Lookup => Ok(Speculation::Lookup {
            lookup: LookupConfig::default(),
            gamma,
        }),
        Method::Sd => Ok(Speculation::Draft {
            gamma,
            greedy_draft: false,
        }),
        Method::Mirror => Ok(Speculation::Mirror { gamma }),
        Method::SdLookup => {
            Err("--methods sd+lookup is not batched yet (ar, lookup, sd and mirror are)".into())
        }
    }
}

/// Seconds from submission to the first token of `prompt`, and the generation.
fn first_token(
    engine: &EngineHandle,
    prompt: Vec<u32>,
    new_tokens: usize,
) -> Result<(f64, Generation), String> {
    let started = std::time::Instant::now();
    let mut stream = engine
        .submit(SequenceRequest::new(
            prompt,
            GenerationConfig::greedy(new_tokens),
        ))
        .map_err(|e| e.to_string())?;
    let mut ttft = None;
    for event in stream.by_ref() {
        match event {
            Event::Text { .. } => {
                ttft.get_or_insert(started.elapsed().as_secs_f64());
            }
            Event::Finished(result) => {
                let generation = (*result).map_err(|e| e.to_string())?;
                return Ok((ttft.unwrap_or(0.0), generation));
            }
        }
    }
    Err("the stream ended without a result".into())
}

/// The engine's load once its last sequence has left (the engine thread publishes it after
/// the step that retired it, which may come just after the sequence's stream ended).
fn settled_load(engine: &EngineHandle) -> EngineLoad {
    let started = std::time::Instant::now();
    loop {
        let load = engine.load();
        if load.running == 0 || started.elapsed() > std::time::Duration::from_secs(5) {
            return load;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Pool bytes of one cached position of `model` (keys and values, every layer).
fn cache_row_bytes(model: &Model) -> usize {
    let config = model.config();
    let element = model.dtype().size_in_bytes();
    model.num_layers() * 2 * config.num_kv_heads() * config.head_dim() * element
}

/// The prefix cache on follow-up turns (see `--follow-up`).
fn follow_up(args: &Args, target: &Arc<Model>, tokenizer: &Tokenizer) -> Result<(), String> {
    let path = args
        .suite
        .clone()
        .unwrap_or_else(|| "../shared/prompts/bench.jsonl".into());
    let conversations: Vec<Vec<ChatMessage>> = common::read_prompts(&path)?
        .into_iter()
        .filter(|(_, category, _)| category == "multi-turn")
        .map(|(_, _, messages)| messages)
        .collect();
    if conversations.is_empty() {
        return Err(format!("{}: no multi-turn prompts", path.display()));
    }
    let mut rows = Vec::new();
    for prefix_cache in [true, false] {
        let settings = BatchSettings {
            prefix_cache,
            ..BatchSettings::default()
        };
        let engine =
            EngineHandle::spawn(Arc::clone(target), None, settings).map_err(|e| e.to_string())?;
        let mut times = Vec::new();
        let mut reused = Vec::new();
        // Rows the finished caches held (each prompt and its output but the last token): the
        // first turns', and the follow-ups' (one token decoded, never fed).
        let (mut first_rows, mut follow_up_rows) = (Vec::new(), Vec::new());
        for messages in &conversations {
            let encode =
                |m: &[ChatMessage]| Prompt::Chat(m).encode(tokenizer).map_err(|e| e.to_string());
            let prompt = encode(messages)?;
            let prompt_len = prompt.len();
            let (_, first) = first_token(&engine, prompt, args.new_tokens)?;
            first_rows.push(prompt_len + first.tokens.len() - 1);
            let answer = tokenizer
                .decode(&first.tokens, true)
                .map_err(|e| e.to_string())?;
            let mut next = messages.clone();
            next.push(ChatMessage::new("assistant", answer));
            next.push(ChatMessage::new("user", "Thank you. Can you say more?"));
            let prompt = encode(&next)?;
            follow_up_rows.push(prompt.len());
            let (ttft, second) = first_token(&engine, prompt, 1)?;
            times.push(ttft);
            reused.push(second.stats.prefix_cached_tokens);
        }
        let load = settled_load(&engine);
        rows.push(json!({
            "prefix_cache": prefix_cache,
            "follow_up_ttft_s": common::median(times),
            "prefix_cached_tokens": reused,
            "prefix_bytes": load.prefix_bytes,
            "prefix_nodes": load.prefix_entries,
            "first_turn_rows": first_rows,
            "follow_up_rows": follow_up_rows,
            "row_bytes": cache_row_bytes(target),
        }));
    }
    let ratio = rows[1]["follow_up_ttft_s"].as_f64().unwrap_or(0.0)
        / rows[0]["follow_up_ttft_s"].as_f64().unwrap_or(f64::NAN);
    let out = json!({
        "follow_up": rows,
        "ttft_without_over_with": ratio,
        "cpu": common::cpu_description(),
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?
    );
    Ok(())
}

fn run(args: Args) -> Result<(), String> {
    let speculations = args
        .methods
        .iter()
        .map(|&m| speculation_of(m, args.gamma))
        .collect::<Result<Vec<_>, _>>()?;
    let source = common::resolve_source(&args.pair.target)?;
    let device = common::parse_device("cpu")?;
    let options = args.pair.target_options(&device, args.threads)?;
    let loaded = common::load_with_spinner("target", &source, &options)?;
    let target = Arc::new(loaded.model);
    if args.follow_up {
        return follow_up(&args, &target, &loaded.tokenizer);
    }
    let prompts: Vec<Vec<u32>> = match &args.suite {
        Some(path) => common::read_prompts(path)?
            .iter()
            .map(|(_, _, messages)| Prompt::Chat(messages).encode(&loaded.tokenizer))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?,
        None => (0..args.batches.iter().copied().max().unwrap_or(1))
            .map(|b| prompt(args.prompt_tokens, b as u32 + 1, target.vocab_size()))
            .collect(),
    };
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(1);
    let most = args.batches.iter().copied().max().unwrap_or(1);
    let settings = BatchSettings {
        max_batch: most,
        step_tokens: args
            .step_tokens
            .unwrap_or(most * (longest + args.gamma + 1)),
        prefill_chunk: longest,
        prefix_cache: false,
        window: args.window.policy(),
        mirror: MirrorSettings {
            kappa: args.kappa,
            draft_threads: args.draft_threads,
            ..MirrorSettings::default()
        },
        ..BatchSettings::default()
    };
    let drafts = args.methods.contains(&Method::Sd) || args.methods.contains(&Method::Mirror);
    let engine = if drafts {
        let draft_options = args.pair.draft_options(&device, args.threads)?;
        let draft_source = common::resolve_source(&args.pair.draft)?;
        let draft = common::load_with_spinner("draft", &draft_source, &draft_options)?;
        let draft = args.draft_vocab.apply(&draft.model, &draft.tokenizer)?;
        EngineHandle::spawn_with_draft(Arc::clone(&target), Arc::new(draft), None, settings)
    } else {
        EngineHandle::spawn(Arc::clone(&target), None, settings)
    }
    .map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for &batch in &args.batches {
        for (&method, &speculation) in args.methods.iter().zip(&speculations) {
            // Warm-up (with --whole-suite, one batch of the suite's first prompts).
            run_batch(
                &engine,
                &prompts,
                batch.min(prompts.len()),
                &args,
                speculation,
            )?;
            let (mut prefill, mut decode) = (Vec::new(), Vec::new());
            let (mut windows, mut accepted, mut reused, mut misses) = (0, 0, 0, 0);
            for _ in 0..args.repeats.max(1) {
                let run = match args.whole_suite {
                    true => run_suite(&engine, &prompts, batch, &args, speculation)?,
                    false => run_batch(&engine, &prompts, batch, &args, speculation)?,
                };
                prefill.push(run.prompt_tokens as f64 / run.prefill_s);
                decode.push(run.tokens as f64 / run.decode_s);
                windows += run.windows;
                accepted += run.accepted;
                reused += run.reused;
                misses += run.misses;
            }
            let name = match method {
                Method::Ar => "ar",
                Method::Lookup => "lookup",
                Method::Sd => "sd",
                Method::SdLookup => "sd+lookup",
                Method::Mirror => "mirror",
            };
            let accepted_per_window = accepted as f64 / windows.max(1) as f64;
            let tree_reuse = reused as f64 / (reused + misses).max(1) as f64;
            let mut row = json!({
                "batch": batch,
                "method": name,
                "accepted_per_window": accepted_per_window,
                "tree_reuse": tree_reuse,
            });
            // With --whole-suite one figure: prefill and decode interleave while slots refill.
            let rates = match args.whole_suite {
                true => {
                    let throughput = common::median(decode);
                    row["throughput_tok_s"] = json!(throughput);
                    format!("whole suite {throughput:>7.2} tok/s")
                }
                false => {
                    let (prefill, decode) = (common::median(prefill), common::median(decode));
                    row["prefill_tok_s"] = json!(prefill);
                    row["decode_tok_s"] = json!(decode);
                    format!("prefill {prefill:>8.1} tok/s  decode {decode:>7.2} tok/s")
                }
            };
            if !args.json {
                println!(
                    "B={batch:>3}  {name:<7} {rates}  accepted/window {accepted_per_window:.2}  \
                     tree reuse {tree_reuse:.2}"
                );
            }
            rows.push(row);
        }
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
