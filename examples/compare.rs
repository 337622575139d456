//! Runs autoregressive decoding, vanilla SD, prompt lookup and Mirror-SD on the same models over
//! a prompt suite, in one process so that speed ratios are measured side by side.
//! Greedy outputs must be token-identical to autoregressive decoding: the run fails loudly if not.
//! Writes `results.json`, `results.md` and `speedup.svg` to `--out-dir`.
//!
//! ```text
//! cargo run --release --example compare                       # default pair, the whole suite
//! cargo run --release --example compare -- --per-category 1 --max-new-tokens 48
//! cargo run --release --example compare -- --target models/SmolLM2-135M-Instruct.Q4_1.gguf --self-draft-layers 10
//! # with and without lookahead tokens on the draft
//! cargo run --release --example compare -- --draft-lookahead lookahead/qwen2.5-coder-0.5b-instruct.safetensors \
//!     --methods ar,sd,sd+lookahead,mirror,mirror+lookahead
//! ```
//!
//! Method names: `ar`, `sd`, `lookup` (prompt lookup, no draft model), `mirror` (anytime),
//! `mirror-full`; `+lookup` tries lookup before the draft model, `+lookahead` uses the draft
//! with the lookahead weights of `--draft-lookahead`, and `@fixed` / `@adaptive` overrides
//! `--window`. The per-category table of BENCHMARKS.md ("Speculation that pays on a CPU"):
//!
//! ```text
//! cargo run --release --example compare -- --max-new-tokens 64 \
//!     --methods ar,sd@fixed,sd+lookup@fixed,lookup@fixed,mirror@fixed,sd+lookup,mirror+lookup
//! ```

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use mirror_sd::mirror_core::{threads, Model};
use mirror_sd::mirror_scheduler::{
    Autoregressive, Decoder, DraftSchedule, Engine, Generation, GenerationConfig, LookupConfig,
    Mirror, MirrorSettings, SpeculativeDecoding,
};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(about = "Compare autoregressive, vanilla SD and Mirror-SD side by side")]
struct Args {
    #[command(flatten)]
    pair: common::PairArgs,
    /// Use the target's own first N layers as the draft.
    #[arg(long)]
    self_draft_layers: Option<usize>,
    /// Prompt suite (JSON lines with id, category, messages).
    #[arg(long, default_value = "../shared/prompts/bench.jsonl")]
    prompts: PathBuf,
    /// Prompts per category (default: all).
    #[arg(long)]
    per_category: Option<usize>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// gamma, and the defaults of the window policy and lookup (a method's name can override
    /// both).
    #[command(flatten)]
    drafting: common::DraftArgs,
    /// Mirror's flags (`mirror` runs `--schedule`, `mirror-full` the full grid).
    #[command(flatten)]
    mirror: common::MirrorArgs,
    /// Threads of the Mirror draft worker's own pool, with --mirror-cores shared.
    #[arg(long)]
    draft_threads: Option<usize>,
    /// Mirror's cores: `split` pins target and draft to disjoint cores (as `generate` does),
    /// `shared` lets both use every core.
    #[arg(long, value_enum, default_value_t = MirrorCores::Split)]
    mirror_cores: MirrorCores,
    /// Lookahead checkpoint for the draft (enables the `+lookahead` methods).
    #[arg(long)]
    draft_lookahead: Option<PathBuf>,
    /// Strategies to run, comma-separated: ar, sd, lookup (no draft model), mirror,
    /// mirror-full; `+lookup` tries lookup before the draft model, `+lookahead` uses the draft
    /// with lookahead, and `@fixed` or `@adaptive` overrides --window (e.g. `sd+lookup@fixed`).
    #[arg(long, default_value = "ar,sd,sd+lookup,lookup,mirror,mirror+lookup")]
    methods: String,
    /// Also run llama.cpp's plain decoding of the target file on every prompt, in turn with
    /// the other methods (`scripts/llama-cpp/suite.mjs`; needs `cd scripts/llama-cpp && npm i -E`).
    #[arg(long)]
    llama_cpp: bool,
    #[arg(long, default_value = "target/compare")]
    out_dir: PathBuf,
    /// Also run every method sampled at this temperature, right after its greedy run on each
    /// prompt (rows `<method>/sampled`; 0: greedy only).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Top-k of the sampled runs (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Top-p of the sampled runs (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampled runs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum MirrorCores {
    Split,
    Shared,
}

/// llama.cpp on the target's GGUF file, in a process of its own (`scripts/llama-cpp/suite.mjs`)
/// that answers one generation request per line.
struct LlamaCpp {
    child: std::process::Child,
    requests: std::process::ChildStdin,
    replies: std::io::BufReader<std::process::ChildStdout>,
}

impl LlamaCpp {
    fn start(model: &str) -> Result<Self, String> {
        use std::process::{Command, Stdio};
        let script = common::repo_root().join("scripts/llama-cpp/suite.mjs");
        let mut child = Command::new("node")
            .arg(&script)
            .args(["--model", model])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start node {}: {e}", script.display()))?;
        let requests = child.stdin.take().ok_or("llama.cpp: no stdin")?;
        let replies = std::io::BufReader::new(child.stdout.take().ok_or("llama.cpp: no stdout")?);
        let mut llama = Self {
            child,
            requests,
            replies,
        };
        let ready = llama.reply()?;
        eprintln!("llama.cpp ready: {ready}");
        Ok(llama)
    }

    fn reply(&mut self) -> Result<serde_json::Value, String> {
        use std::io::BufRead;
        let mut line = String::new();
        self.replies
            .read_line(&mut line)
            .map_err(|e| format!("llama.cpp: {e}"))?;
        let value: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("llama.cpp replied {line:?}: {e}"))?;
        match value.get("error") {
            Some(error) => Err(format!("llama.cpp: {error}")),
            None => Ok(value),
        }
    }

    /// Greedy decoding of `prompt`: (tokens, seconds, prefill seconds).
    fn generate(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        stop: &[u32],
    ) -> Result<(Vec<u32>, f64, f64), String> {
        use std::io::Write;
        let request = serde_json::json!({
            "tokens": prompt, "max_new_tokens": max_new_tokens, "stop": stop,
        });
        writeln!(self.requests, "{request}").map_err(|e| format!("llama.cpp: {e}"))?;
        let reply = self.reply()?;
        let tokens = serde_json::from_value(reply["tokens"].clone())
            .map_err(|e| format!("llama.cpp tokens: {e}"))?;
        let seconds = reply["seconds"].as_f64().unwrap_or(0.0);
        Ok((
            tokens,
            seconds,
            reply["prefill_seconds"].as_f64().unwrap_or(0.0),
        ))
    }
}

impl Drop for LlamaCpp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A method's name taken apart: `base[+lookup][+lookahead][@fixed|@adaptive]`.
struct MethodSpec<'a> {
    base: &'a str,
    lookup: bool,
    lookahead: bool,
    window: Option<common::WindowArg>,
}

impl<'a> MethodSpec<'a> {
    fn parse(name: &'a str) -> Result<Self, String> {
        let (rest, window) = match name.split_once('@') {
            Some((rest, "fixed")) => (rest, Some(common::WindowArg::Fixed)),
            Some((rest, "adaptive")) => (rest, Some(common::WindowArg::Adaptive)),
            Some((_, other)) => return Err(format!("`{name}`: unknown window `@{other}`")),
            None => (name, None),
        };
        let mut parts = rest.split('+');
        let base = parts.next().unwrap_or_default();
        let mut spec = Self {
            base,
            lookup: false,
            lookahead: false,
            window,
        };
        for part in parts {
            match part {
                "lookup" => spec.lookup = true,
                "lookahead" => spec.lookahead = true,
                other => return Err(format!("`{name}`: unknown modifier `+{other}`")),
            }
        }
        Ok(spec)
    }

    fn needs_draft(&self) -> bool {
        !matches!(self.base, "ar" | "lookup")
    }
}

#[derive(Debug, Default, Clone, Serialize)]
struct Totals {
    tokens: usize,
    seconds: f64,
    prefill_seconds: f64,
    windows: usize,
    /// Windows drafted by prompt lookup (part of `windows`).
    lookup_windows: usize,
    /// Target passes with no window (adaptive plain steps).
    plain_steps: usize,
    accepted: usize,
    target_passes: usize,
    reuse: usize,
    resolved: usize,
    /// Sum over windows of Omega (final mass on the early-exit top-kappa at the deciding row).
    omega_sum: f64,
    draft_passes: usize,
    draft_steps: usize,
    draft_tokens: usize,
    draft_busy: f64,
    draft_hidden: f64,
    target_prefix: f64,
    target_suffix: f64,
    wait_final: f64,
}

impl Totals {
    fn add(&mut self, g: &Generation) {
        let s = &g.stats;
        self.tokens += s.generated_tokens;
        self.seconds += s.time.total.as_secs_f64();
        self.prefill_seconds += s.time.prefill.as_secs_f64();
        self.windows += s.windows;
        self.lookup_windows += s.lookup_windows;
        self.plain_steps += s.plain_steps;
        self.accepted += (s.mean_accepted() * s.windows as f64).round() as usize;
        self.target_passes += s.target_passes;
        self.reuse += s.reuse_hits + s.reuse_partials;
        self.resolved += s.reuse_resolved();
        self.omega_sum += s.omega_sum;
        self.draft_passes += s.draft_passes;
        self.draft_steps += s.draft_steps;
        self.draft_tokens += s.draft_tokens;
        self.draft_busy += s.time.draft_busy.as_secs_f64();
        self.draft_hidden += s.time.draft_hidden.as_secs_f64();
        self.target_prefix += s.time.target_prefix.as_secs_f64();
        self.target_suffix += s.time.target_suffix.as_secs_f64();
        self.wait_final += s.time.wait_final.as_secs_f64();
    }
    /// Tokens per second after prefill.
    fn decode_tokens_per_second(&self) -> f64 {
        self.tokens as f64 / (self.seconds - self.prefill_seconds).max(1e-9)
    }
    /// A generation that reports only its tokens and times (llama.cpp).
    fn add_plain(&mut self, tokens: usize, seconds: f64, prefill_seconds: f64) {
        self.tokens += tokens;
        self.seconds += seconds;
        self.prefill_seconds += prefill_seconds;
        self.target_passes += tokens;
    }
    fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
    fn mean_accepted(&self) -> f64 {
        self.accepted as f64 / (self.windows.max(1)) as f64
    }
    fn reuse_rate(&self) -> f64 {
        self.reuse as f64 / (self.resolved.max(1)) as f64
    }
    fn eta(&self) -> f64 {
        self.draft_tokens as f64 / self.draft_steps.max(1) as f64
    }
    fn draft_ms_per_window(&self) -> f64 {
        1e3 * self.draft_busy / self.windows.max(1) as f64
    }
    fn hidden(&self) -> f64 {
        self.draft_hidden / self.draft_busy.max(1e-9)
    }
}

fn main() {
    // Before any model or pool exists: see mirror_core::threads.
    mirror_sd::mirror_core::threads::limit_candle_threads(1);
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// A target and its drafts.
#[derive(Clone)]
struct ModelSet {
    target: Arc<Model>,
    draft: Option<Arc<Model>>,
    draft_lookahead: Option<Arc<Model>>,
}

impl ModelSet {
    /// The same models (weights shared), target and drafts pinned to disjoint cores.
    fn pinned_apart(&self) -> Result<Self, String> {
        let (target_cores, draft_cores) = threads::split_cores(&threads::available_cores());
        let pin = |model: &Arc<Model>, cores: &[usize]| -> Result<Arc<Model>, String> {
            Model::clone(model)
                .with_cores(cores)
                .map(Arc::new)
                .map_err(|e| e.to_string())
        };
        let pin_draft =
            |draft: &Option<Arc<Model>>| draft.as_ref().map(|d| pin(d, &draft_cores)).transpose();
        Ok(Self {
            target: pin(&self.target, &target_cores)?,
            draft: pin_draft(&self.draft)?,
            draft_lookahead: pin_draft(&self.draft_lookahead)?,
        })
    }
}

/// The models each method runs on: Mirror's pinned to disjoint cores unless `--mirror-cores
/// shared`.
struct Models {
    shared: ModelSet,
    mirror: ModelSet,
}

fn build(method: &str, args: &Args, models: &Models) -> Result<Box<dyn Decoder>, String> {
    let spec = MethodSpec::parse(method)?;
    let mut settings = args.drafting.settings();
    if let Some(window) = spec.window {
        settings.window = window.policy();
    }
    if spec.lookup {
        settings.lookup = Some(LookupConfig::default());
    }
    let set = if spec.base.starts_with("mirror") {
        &models.mirror
    } else {
        &models.shared
    };
    let (target, draft, lookahead) = (&set.target, &set.draft, &set.draft_lookahead);
    let draft = || -> Result<Arc<Model>, String> {
        let chosen = if spec.lookahead { lookahead } else { draft };
        chosen.clone().ok_or_else(|| {
            if spec.lookahead {
                format!("`{method}` needs --draft-lookahead")
            } else {
                format!("`{method}` needs a draft model")
            }
        })
    };
    let mirror = |schedule| -> Result<Box<dyn Decoder>, String> {
        let mut mirror_settings = MirrorSettings {
            schedule,
            ..args.mirror.settings(settings)
        };
        if let MirrorCores::Shared = args.mirror_cores {
            mirror_settings.draft_threads = args.draft_threads;
        }
        let decoder = Mirror::builder(Arc::clone(target), draft()?)
            .settings(mirror_settings)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Box::new(decoder))
    };
    match spec.base {
        "ar" => Ok(Box::new(Autoregressive::new(Arc::clone(target)))),
        "sd" => Ok(Box::new(
            SpeculativeDecoding::builder(Arc::clone(target), draft()?)
                .speculative_settings(settings)
                .build()
                .map_err(|e| e.to_string())?,
        )),
        "lookup" => Ok(Box::new(
            SpeculativeDecoding::prompt_lookup(Arc::clone(target))
                .speculative_settings(settings)
                .prompt_lookup(LookupConfig::default())
                .build()
                .map_err(|e| e.to_string())?,
        )),
        "mirror" => mirror(args.mirror.schedule()),
        "mirror-full" => mirror(DraftSchedule::FullGrid),
        other => Err(format!("unknown method `{other}`")),
    }
}

fn run(args: Args) -> Result<(), String> {
    let methods: Vec<String> = args
        .methods
        .split(',')
        .map(|m| m.trim().to_string())
        .collect();
    if methods.first().map(String::as_str) != Some("ar") {
        return Err(
            "the first method must be `ar`: it is the reference for identity and speedups".into(),
        );
    }
    let mut prompts = common::read_prompts(&args.prompts)?;
    if let Some(k) = args.per_category {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        prompts.retain(|(_, cat, _)| {
            let n = seen.entry(cat.clone()).or_default();
            *n += 1;
            *n <= k
        });
    }
    let device = mirror_sd::mirror_core::Device::Cpu;
    let (target_options, draft_options) = args.pair.options(&device)?;
    let loaded = common::load_with_spinner(
        "target",
        &common::resolve_source(&args.pair.target)?,
        &target_options,
    )?;
    let target = Arc::new(loaded.model);
    let specs = methods
        .iter()
        .map(|m| MethodSpec::parse(m))
        .collect::<Result<Vec<_>, _>>()?;
    let draft = if specs.iter().any(MethodSpec::needs_draft) {
        Some(common::draft_model(
            &args.pair.draft,
            args.self_draft_layers,
            &target,
            Some(&loaded.tokenizer),
            &draft_options,
        )?)
    } else {
        None
    };
    let draft_lookahead = match (&args.draft_lookahead, &draft) {
        (Some(path), Some(draft)) => Some(common::attach_lookahead(draft, path)?),
        _ => None,
    };
    let config = GenerationConfig::greedy(args.max_new_tokens);
    let sampled = (args.temperature > 0.0).then(|| GenerationConfig {
        sampling: mirror_sd::mirror_core::sampling::SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
        },
        seed: args.seed,
        ..GenerationConfig::greedy(args.max_new_tokens)
    });
    let tokenizer = loaded.tokenizer;
    let mut engines: Vec<(String, Engine)> = Vec::new();
    let shared = ModelSet {
        target,
        draft,
        draft_lookahead,
    };
    let any_mirror = specs.iter().any(|s| s.base.starts_with("mirror"));
    let mirror = if args.mirror_cores == MirrorCores::Split && any_mirror {
        shared.pinned_apart()?
    } else {
        shared.clone()
    };
    let models = Models { shared, mirror };
    for m in &methods {
        engines.push((
            m.clone(),
            Engine::new(build(m, &args, &models)?, tokenizer.clone()),
        ));
    }
    // per method -> per category totals
    let mut results: BTreeMap<String, BTreeMap<String, Totals>> = BTreeMap::new();
    let mut mismatches = Vec::new();
    // The reference (autoregressive) tokens of every prompt, for auditing runs against each other.
    let mut outputs: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut llama = if args.llama_cpp {
        Some(LlamaCpp::start(&args.pair.target)?)
    } else {
        None
    };
    let mut stop_ids: Vec<u32> = tokenizer.eos_ids().to_vec();
    stop_ids.extend(models.shared.target.config().eos_token_ids());
    // llama.cpp's greedy tokens, compared with ours (its arithmetic differs: not required to
    // agree, reported).
    let mut pending_llama: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut llama_identical = 0usize;
    for (id, category, messages) in &prompts {
        let prompt = engines[0].1.encode(messages).map_err(|e| e.to_string())?;
        if let Some(llama) = llama.as_mut() {
            let (tokens, seconds, prefill) =
                llama.generate(&prompt, args.max_new_tokens, &stop_ids)?;
            eprintln!(
                "{id:<14} {:<14} {:>4} tokens {:>6.2} tok/s",
                "llama.cpp",
                tokens.len(),
                tokens.len() as f64 / seconds
            );
            let per = results.entry("llama.cpp".into()).or_default();
            per.entry(category.clone())
                .or_default()
                .add_plain(tokens.len(), seconds, prefill);
            per.entry("overall".into())
                .or_default()
                .add_plain(tokens.len(), seconds, prefill);
            pending_llama.insert(id.clone(), tokens);
        }
        let mut reference: Option<Vec<u32>> = None;
        // Round-robin per prompt: every method sees the same machine state in turn.
        for (name, engine) in engines.iter_mut() {
            let g = engine
                .generate(&prompt, &config)
                .map_err(|e| format!("{name} on {id}: {e}"))?;
            eprintln!(
                "{id:<14} {name:<14} {:>4} tokens {:>6.2} tok/s  E[A] {:.2}  eta {:.2}  reuse {:.2}",
                g.tokens.len(),
                g.stats.tokens_per_second(),
                g.stats.mean_accepted(),
                g.stats.eta(),
                g.stats.reuse_rate()
            );
            match &reference {
                None => {
                    outputs.insert(id.clone(), g.tokens.clone());
                    if pending_llama.get(id) == Some(&g.tokens) {
                        llama_identical += 1;
                    }
                    reference = Some(g.tokens.clone());
                }
                Some(want) if *want != g.tokens => {
                    mismatches.push(format!("{name} differs from ar on {id}"))
                }
                _ => {}
            }
            let per = results.entry(name.clone()).or_default();
            per.entry(category.clone()).or_default().add(&g);
            per.entry("overall".into()).or_default().add(&g);
            if let Some(sampled) = &sampled {
                let g = engine
                    .generate(&prompt, sampled)
                    .map_err(|e| format!("{name} sampled on {id}: {e}"))?;
                eprintln!(
                    "{id:<14} {:<14} {:>4} tokens {:>6.2} tok/s  E[A] {:.2}",
                    format!("{name}/sampled"),
                    g.tokens.len(),
                    g.stats.tokens_per_second(),
                    g.stats.mean_accepted(),
                );
                let per = results.entry(format!("{name}/sampled")).or_default();
                per.entry(category.clone()).or_default().add(&g);
                per.entry("overall".into()).or_default().add(&g);
            }
        }
    }
    // Sampled against greedy: decode time per token (prefill excluded) and per target pass.
    let mut sampling_overhead = BTreeMap::new();
    if sampled.is_some() {
        for m in &methods {
            let (g, s) = (
                &results[m]["overall"],
                &results[&format!("{m}/sampled")]["overall"],
            );
            let per_token =
                |t: &Totals| 1e3 * (t.seconds - t.prefill_seconds) / t.tokens.max(1) as f64;
            let per_pass =
                |t: &Totals| 1e3 * (t.seconds - t.prefill_seconds) / t.target_passes.max(1) as f64;
            eprintln!(
                "{m}: greedy {:.1} ms/token, sampled {:.1} ms/token ({:.2}x); per target pass {:.1} -> {:.1} ms ({:.2}x); E[A] {:.2} -> {:.2}",
                per_token(g),
                per_token(s),
                per_token(s) / per_token(g),
                per_pass(g),
                per_pass(s),
                per_pass(s) / per_pass(g),
                g.mean_accepted(),
                s.mean_accepted()
            );
            sampling_overhead.insert(
                m.clone(),
                serde_json::json!({
                    "greedy_ms_per_token": per_token(g), "sampled_ms_per_token": per_token(s),
                    "greedy_ms_per_target_pass": per_pass(g), "sampled_ms_per_target_pass": per_pass(s),
                    "greedy_mean_accepted": g.mean_accepted(), "sampled_mean_accepted": s.mean_accepted(),
                }),
            );
        }
    }
    let methods: Vec<String> = methods
        .iter()
        .flat_map(|m| {
            let sampled_row = sampled.as_ref().map(|_| format!("{m}/sampled"));
            std::iter::once(m.clone()).chain(sampled_row)
        })
        .collect();
    std::fs::create_dir_all(&args.out_dir).map_err(|e| e.to_string())?;
    // llama.cpp joins the table and chart as one more method.
    let mut shown = methods.clone();
    if llama.is_some() {
        shown.push("llama.cpp".into());
        eprintln!(
            "llama.cpp's greedy output equals ours on {llama_identical} of {} prompts",
            prompts.len()
        );
    }
    let table = markdown(&shown, &results);
    println!("{table}");
    std::fs::write(args.out_dir.join("results.md"), &table).map_err(|e| e.to_string())?;
    // FF beside the paper's 1 - Omega, as observed on this run (1 - Omega is not a bound on
    // FF: see Stats::omega).
    let bounds: BTreeMap<&String, serde_json::Value> = methods
        .iter()
        .filter(|m| m.starts_with("mirror"))
        .map(|m| {
            let t = &results[m]["overall"];
            let ff = 1.0 - t.reuse_rate();
            let omega = t.omega_sum / t.resolved.max(1) as f64;
            eprintln!(
                "{m}: FF {ff:.2}, 1 - Omega {:.2} (Omega {omega:.2})",
                1.0 - omega
            );
            (m, serde_json::json!({ "miss_rate": ff, "omega": omega }))
        })
        .collect();
    let json = serde_json::json!({
        "fallback_vs_omega": bounds,
        "sampling": sampled.as_ref().map(|c| serde_json::json!({
            "temperature": c.sampling.temperature, "top_k": c.sampling.top_k,
            "top_p": c.sampling.top_p, "seed": c.seed,
        })),
        "sampling_overhead": sampling_overhead,
        "target": args.pair.target, "draft": args.self_draft_layers.map(|l| format!("target's first {l} layers")).unwrap_or(args.pair.draft.clone()),
        "draft_lookahead": args.draft_lookahead, "lookahead_confidence": args.drafting.lookahead_confidence, "window": format!("{:?}", args.drafting.window), "mirror_cores": format!("{:?}", args.mirror_cores),
        "gamma": args.drafting.gamma, "kappa": args.mirror.kappa, "exit_fraction": args.mirror.exit_fraction,
        "max_new_tokens": args.max_new_tokens, "prompts": prompts.len(), "results": results,
        "identical_to_autoregressive": mismatches.is_empty(),
        "llama_cpp_identical_prompts": llama.as_ref().map(|_| llama_identical),
        "outputs": outputs,
    });
    std::fs::write(
        args.out_dir.join("results.json"),
        serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(args.out_dir.join("speedup.svg"), svg(&shown, &results))
        .map_err(|e| e.to_string())?;
    eprintln!(
        "wrote {}/results.{{md,json}} and speedup.svg",
        args.out_dir.display()
    );
    if !mismatches.is_empty() {
        return Err(format!(
            "greedy outputs are not identical:\n  {}",
            mismatches.join("\n  ")
        ));
    }
    Ok(())
}

fn categories(results: &BTreeMap<String, BTreeMap<String, Totals>>) -> Vec<String> {
    let mut cats: Vec<String> = results
        .values()
        .next()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    cats.retain(|c| c != "overall");
    cats.push("overall".into());
    cats
}

fn markdown(methods: &[String], results: &BTreeMap<String, BTreeMap<String, Totals>>) -> String {
    let mut out = String::from("| category | method | tok/s | decode tok/s | speedup vs ar | vs sd | E[A] | windows looked up / all / plain steps | tokens/target pass | eta | draft ms/window | reuse | draft hidden |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for cat in categories(results) {
        for m in methods {
            // Sampled rows are compared with the sampled baselines.
            let suffix = if m.ends_with("/sampled") {
                "/sampled"
            } else {
                ""
            };
            let ar = results[&format!("ar{suffix}")][&cat].tokens_per_second();
            // The vanilla-SD baseline: `sd`, or `sd@fixed` when that is what ran.
            let sd = (results.get(&format!("sd{suffix}")))
                .or_else(|| results.get(&format!("sd@fixed{suffix}")))
                .map(|r| r[&cat].tokens_per_second());
            let t = &results[m][&cat];
            let tps = t.tokens_per_second();
            let base = m.trim_end_matches("/sampled");
            let vs_sd = match (!matches!(base, "ar" | "sd" | "sd@fixed"), sd) {
                (true, Some(sd)) => format!("{:.2}x", tps / sd),
                _ => "".into(),
            };
            let spec = !m.starts_with("ar") && m != "llama.cpp";
            out += &format!(
                "| {cat} | {m} | {tps:.2} | {:.2} | {:.2}x | {vs_sd} | {} | {} | {:.2} | {} | {} | {} | {} |\n",
                t.decode_tokens_per_second(),
                tps / ar,
                if spec {
                    format!("{:.2}", t.mean_accepted())
                } else {
                    "".into()
                },
                if spec {
                    format!("{} / {} / {}", t.lookup_windows, t.windows, t.plain_steps)
                } else {
                    "".into()
                },
                t.tokens as f64 / t.target_passes.max(1) as f64,
                if spec {
                    format!("{:.2}", t.eta())
                } else {
                    "".into()
                },
                if spec {
                    format!("{:.0}", t.draft_ms_per_window())
                } else {
                    "".into()
                },
                if m.starts_with("mirror") {
                    format!("{:.2}", t.reuse_rate())
                } else {
                    "".into()
                },
                if m.starts_with("mirror") {
                    format!("{:.0}%", 100.0 * t.hidden())
                } else {
                    "".into()
                },
            );
        }
    }
    out
}

/// A grouped bar chart of speedup over autoregressive decoding, by category.
fn svg(methods: &[String], results: &BTreeMap<String, BTreeMap<String, Totals>>) -> String {
    let cats = categories(results);
    // Greedy runs only (the chart's baseline is greedy autoregressive decoding).
    let shown: Vec<&String> = methods
        .iter()
        .filter(|m| m.as_str() != "ar" && !m.ends_with("/sampled"))
        .collect();
    let colors = [
        "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860",
    ];
    let (w, h, left, bottom, top) = (120.0 * cats.len() as f64 + 80.0, 360.0, 60.0, 60.0, 30.0);
    let max = cats
        .iter()
        .flat_map(|c| {
            shown.iter().map(move |m| {
                results[*m][c].tokens_per_second() / results["ar"][c].tokens_per_second()
            })
        })
        .fold(1.5f64, f64::max)
        .ceil();
    let y = |v: f64| h - bottom - (h - bottom - top) * v / max;
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    s += &format!("<text x=\"{left}\" y=\"18\">Speedup over autoregressive decoding (greedy, wall time)</text>\n");
    for tick in 0..=(max as usize) {
        let yy = y(tick as f64);
        s += &format!("<line x1=\"{left}\" y1=\"{yy}\" x2=\"{}\" y2=\"{yy}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{tick}x</text>\n", w - 10.0, left - 6.0, yy + 4.0);
    }
    s += &format!("<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\" stroke-dasharray=\"4\"/>\n", y(1.0), w - 10.0, y(1.0));
    let group = 120.0;
    let bar = (group - 20.0) / shown.len().max(1) as f64;
    for (ci, cat) in cats.iter().enumerate() {
        let x0 = left + 10.0 + ci as f64 * group;
        for (mi, m) in shown.iter().enumerate() {
            let v = results[*m][cat].tokens_per_second() / results["ar"][cat].tokens_per_second();
            let x = x0 + mi as f64 * bar;
            s += &format!("<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{m} {cat}: {v:.2}x</title></rect>\n", y(v), bar - 2.0, y(0.0) - y(v), colors[mi % colors.len()]);
        }
        s += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{cat}</text>\n",
            x0 + (group - 20.0) / 2.0,
            h - bottom + 18.0
        );
    }
    for (mi, m) in shown.iter().enumerate() {
        let x = left + 10.0 + mi as f64 * 140.0;
        s += &format!("<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{m}</text>\n", h - 24.0, colors[mi % colors.len()], x + 16.0, h - 14.0);
    }
    s + "</svg>\n"
}
