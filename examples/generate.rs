//! One generation with Mirror-SD (or vanilla SD, or the target alone), streamed, with statistics.
//!
//! With no arguments it runs the default pair (Qwen2.5-Coder 1.5B target, 0.5B draft; fetched
//! when missing) on a sample prompt, with the method `--method auto` picks: Mirror when target
//! and draft run on different devices (or on a GPU, the draft on a second stream), and prompt
//! lookup when both share the CPU, where it was the fastest method `compare` measured
//! (BENCHMARKS.md, "Speculation on a CPU"). The first line on stderr says which and why.
//!
//! ```text
//! cargo run --release --example generate
//! cargo run --release --example generate -- --method sd --gamma 5 --prompt "Write quicksort in Rust"
//! cargo run --release --example generate -- --method sd --lookup      # lookup first, then the draft
//! cargo run --release --example generate -- --method lookup           # no draft model at all
//! cargo run --release --example generate -- --target models/SmolLM2-135M-Instruct.Q4_1.gguf --self-draft-layers 10
//! cargo run --release --example generate -- --method lookup --monitors instability,path_deviation,latent_trajectory
//! ```
//!
//! With `--monitors` the generation runs on the batched engine (`EngineHandle`, the one that
//! runs monitors: `ar`, `sd` or `lookup`) and their summaries are printed after the text.

#[path = "common/mod.rs"]
mod common;

use std::io::Write;
use std::sync::Arc;

use clap::{Parser, ValueEnum};
use mirror_sd::mirror_core::sampling::SamplingParams;
use mirror_sd::mirror_core::ChatMessage;
use mirror_sd::mirror_core::{Model, Tokenizer};
use mirror_sd::mirror_scheduler::monitor::{MonitorConfig, MonitorKind};
use mirror_sd::mirror_scheduler::{
    Autoregressive, BatchSettings, Decoder, Engine, EngineHandle, Event, GenerationConfig,
    LookupConfig, Mirror, SequenceRequest, Speculation, SpeculativeDecoding, StreamControl,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Method {
    /// Mirror on two devices, prompt lookup on one CPU (see the module docs).
    Auto,
    /// The target alone.
    Ar,
    /// Vanilla speculative decoding (with --lookup: lookup first, then the draft model).
    Sd,
    /// Prompt-lookup decoding: no draft model.
    Lookup,
    /// Mirror speculative decoding.
    Mirror,
}

impl Method {
    /// The name `--method` takes.
    fn name(self) -> &'static str {
        match self {
            Method::Auto => "auto",
            Method::Ar => "ar",
            Method::Sd => "sd",
            Method::Lookup => "lookup",
            Method::Mirror => "mirror",
        }
    }
}

#[derive(Parser, Debug)]
#[command(about = "Generate with Mirror speculative decoding")]
struct Args {
    #[command(flatten)]
    pair: common::PairArgs,
    #[command(flatten)]
    draft_model: common::DraftModelArgs,
    #[command(flatten)]
    drafting: common::DraftArgs,
    #[arg(long, value_enum, default_value_t = Method::Auto)]
    method: Method,
    /// The prompt (a user message when the chat template is on).
    #[arg(
        long,
        default_value = "Write a Python function that checks whether a string is a palindrome, ignoring case and punctuation."
    )]
    prompt: String,
    #[command(flatten)]
    mirror: common::MirrorArgs,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    placement: common::PlacementArgs,
    /// Send the prompt as raw text instead of rendering the chat template.
    #[arg(long)]
    no_chat_template: bool,
    /// Print the result and statistics as JSON instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Generation monitors to run and print (comma-separated: instability, path_deviation,
    /// latent_trajectory); the generation then runs on the batched engine (ar, sd or lookup).
    #[arg(long, value_delimiter = ',')]
    monitors: Vec<String>,
    /// With --monitors: end the generation when path deviation's rule fires (changes the
    /// output: not lossless).
    #[arg(long)]
    monitor_early_stop: bool,
}

fn main() {
    // Before any model or pool exists: see mirror_core::threads.
    mirror_sd::mirror_core::threads::limit_candle_threads(1);
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// The method `--method auto` stands for on this placement, and why.
fn auto_method(placement: &common::PlacementArgs) -> (Method, String) {
    let (target, draft) = (
        placement.target_device.trim().to_lowercase(),
        placement.draft_device.trim().to_lowercase(),
    );
    if target != "cpu" || draft != target {
        let why = format!(
            "target on {target}, draft on {draft}: the draft's tree work runs beside the target"
        );
        return (Method::Mirror, why);
    }
    let why = "target and draft share the CPU, where prompt lookup was the fastest method \
               measured and Mirror, which needs a second device, the slowest (BENCHMARKS.md, \
               \"Speculation that pays on a CPU\"); --method mirror forces Mirror"
        .to_string();
    (Method::Lookup, why)
}

fn run(mut args: Args) -> Result<(), String> {
    if args.method == Method::Auto {
        let (method, why) = auto_method(&args.placement);
        eprintln!("method: {} (auto: {why})", method.name());
        args.method = method;
    } else {
        eprintln!("method: {} (as asked)", args.method.name());
    }
    let target_source = common::resolve_source(&args.pair.target)?;
    let (target_options, draft_options) = args
        .placement
        .load_options(&args.pair, matches!(args.method, Method::Mirror))?;
    let loaded = common::load_with_spinner("target", &target_source, &target_options)?;
    let target = Arc::new(loaded.model);
    let draft = || {
        args.draft_model
            .load(&args.pair, &target, &loaded.tokenizer, &draft_options)
    };
    let draft = match args.method {
        Method::Ar | Method::Lookup | Method::Auto => None,
        _ => Some(draft()?),
    };
    let weight_report = |model: &mirror_sd::mirror_core::Model| {
        let report = model.weight_report();
        serde_json::json!({
            "summary": report.summary(),
            "compute": report.compute,
            "bytes_by_type": report.bytes_by_type(),
            "converted": report.converted(),
        })
    };
    let weights = serde_json::json!({
        "target": weight_report(&target),
        "draft": draft.as_ref().map(|d| weight_report(d)),
    });
    if !args.monitors.is_empty() {
        return run_monitored(&args, target, draft, loaded.tokenizer);
    }
    let settings = args.drafting.settings();
    let decoder: Box<dyn Decoder> = match (args.method, draft) {
        (Method::Lookup, _) => Box::new(
            SpeculativeDecoding::prompt_lookup(Arc::clone(&target))
                .speculative_settings(settings)
                .prompt_lookup(Default::default())
                .build()
                .map_err(|e| e.to_string())?,
        ),
        (Method::Ar | Method::Auto, _) | (_, None) => {
            Box::new(Autoregressive::new(Arc::clone(&target)))
        }
        (Method::Sd, Some(draft)) => Box::new(
            SpeculativeDecoding::builder(Arc::clone(&target), draft)
                .speculative_settings(settings)
                .build()
                .map_err(|e| e.to_string())?,
        ),
        (Method::Mirror, Some(draft)) => Box::new(
            Mirror::builder(Arc::clone(&target), draft)
                .settings(args.mirror.settings(settings))
                .build()
                .map_err(|e| e.to_string())?,
        ),
    };
    let method = decoder.name();
    let mut engine = Engine::new(decoder, loaded.tokenizer);
    let config = generation_config(&args);
    let messages = [ChatMessage::new("user", args.prompt.clone())];
    let prompt = if args.no_chat_template || engine.tokenizer().chat_template().is_none() {
        engine.encode(&args.prompt)
    } else {
        engine.encode(&messages[..])
    }
    .map_err(|e| e.to_string())?;
    let quiet = args.json;
    let generation = engine
        .generate_with(&prompt, &config, |piece| {
            if !quiet {
                print!("{piece}");
                let _ = std::io::stdout().flush();
            }
            StreamControl::Continue
        })
        .map_err(|e| e.to_string())?;
    if args.json {
        let out = serde_json::json!({
            "method": method,
            "prompt_tokens": prompt.len(),
            "generation": generation,
            "mean_accepted": generation.stats.mean_accepted(),
            "tokens_per_second": generation.stats.tokens_per_second(),
            "reuse_rate": generation.stats.reuse_rate(),
            "hidden_fraction": generation.stats.hidden_fraction(),
            "weights": weights,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?
        );
    } else {
        println!(
            "\n\n[{method}] finish: {:?}, prompt {} tokens",
            generation.finish_reason,
            prompt.len()
        );
        println!("{}", generation.stats.summary());
    }
    Ok(())
}

fn generation_config(args: &Args) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
        },
        seed: args.seed,
        ..GenerationConfig::default()
    }
}

/// `--monitors`: one sequence on the batched engine, streamed, then the monitors' summaries.
fn run_monitored(
    args: &Args,
    target: Arc<Model>,
    draft: Option<Arc<Model>>,
    tokenizer: Tokenizer,
) -> Result<(), String> {
    let kinds = (args.monitors.iter())
        .map(|name| {
            MonitorKind::from_name(name.trim()).ok_or_else(|| {
                format!("unknown monitor `{name}` (instability, path_deviation, latent_trajectory)")
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let gamma = args.drafting.settings().gamma;
    let speculation = match args.method {
        Method::Ar => Speculation::None,
        Method::Lookup | Method::Auto => Speculation::Lookup {
            lookup: LookupConfig::default(),
            gamma,
        },
        Method::Sd => Speculation::Draft {
            gamma,
            greedy_draft: false,
        },
        Method::Mirror => {
            return Err(
                "--monitors runs on the batched engine: use --method ar, sd or lookup".into(),
            )
        }
    };
    let use_template = !args.no_chat_template && tokenizer.chat_template().is_some();
    let prompt = if use_template {
        let messages = [ChatMessage::new("user", args.prompt.clone())];
        let text = tokenizer.apply_chat_template(&messages, true);
        text.and_then(|t| tokenizer.encode(&t, false))
    } else {
        tokenizer.encode(&args.prompt, true)
    }
    .map_err(|e| e.to_string())?;
    let mut config = generation_config(args);
    config.stop_tokens = tokenizer.eos_ids().to_vec();
    config.monitors = Some(MonitorConfig {
        early_stop: args.monitor_early_stop,
        ..MonitorConfig::only(&kinds)
    });
    let settings = BatchSettings::default();
    let engine = match (draft, speculation) {
        (Some(draft), Speculation::Draft { .. }) => {
            EngineHandle::spawn_with_draft(target, draft, Some(tokenizer), settings)
        }
        _ => EngineHandle::spawn(target, Some(tokenizer), settings),
    }
    .map_err(|e| e.to_string())?;
    let prompt_tokens = prompt.len();
    let request = SequenceRequest {
        speculation,
        ..SequenceRequest::new(prompt, config)
    };
    let stream = engine.submit(request).map_err(|e| e.to_string())?;
    let mut generation = None;
    for event in stream {
        match event {
            Event::Text { text, .. } if !args.json => {
                print!("{text}");
                let _ = std::io::stdout().flush();
            }
            Event::Text { .. } => {}
            Event::Finished(result) => generation = Some((*result).map_err(|e| e.to_string())?),
        }
    }
    let generation = generation.ok_or("the batched engine stopped")?;
    let monitors = serde_json::to_string_pretty(&generation.monitors).map_err(|e| e.to_string())?;
    if args.json {
        let out = serde_json::json!({
            "method": args.method.name(),
            "prompt_tokens": prompt_tokens,
            "generation": generation,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?
        );
    } else {
        println!(
            "\n\n[{} batched] finish: {:?}, prompt {prompt_tokens} tokens",
            args.method.name(),
            generation.finish_reason
        );
        println!("{}", generation.stats.summary());
        println!("monitors: {monitors}");
    }
    Ok(())
}
