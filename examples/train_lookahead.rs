//! Trains lookahead tokens for a draft (Bhendawade et al., arXiv 2402.11131) on text that
//! ships with this machine's toolchains: the Python standard library sources and the Rust
//! documentation's Markdown. The base draft stays frozen; only the lookahead parameters train, with
//! the future n-gram loss. Deterministic for a seed, checkpointed, and resumable.
//!
//! ```text
//! # the default draft (Qwen2.5-Coder-0.5B): what lookahead/qwen2.5-coder-0.5b-instruct.safetensors holds
//! cargo run --release --example train_lookahead
//! # SmolLM2-135M
//! cargo run --release --example train_lookahead -- --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     --out lookahead/smollm2-135m-instruct.safetensors
//! ```
//!
//! The layers below the lookahead rows run once over the corpus and their states are kept in
//! `<work-dir>/frozen.safetensors`; `<work-dir>/state.safetensors` holds parameters, AdamW
//! moments and the step, so an interrupted run continues where it stopped (`--fresh` restarts).
//! With `--distill-target`, labels are the target's greedy predictions on the same text
//! (teacher-forced), which aims the lookahead tokens at what the target will accept.

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use mirror_sd::mirror_core::training::{freeze, FrozenSequence, LookaheadTrainer, TrainSettings};
use mirror_sd::mirror_core::{LookaheadConfig, Model, Tokenizer};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

#[derive(Parser, Debug)]
#[command(about = "Train lookahead tokens for a draft model")]
struct Args {
    /// The draft whose lookahead tokens to train.
    #[arg(long, default_value = common::DEFAULT_DRAFT)]
    model: String,
    /// Where the trained lookahead weights go.
    #[arg(
        long,
        default_value = "lookahead/qwen2.5-coder-0.5b-instruct.safetensors"
    )]
    out: PathBuf,
    /// Frozen states and resumable state (default: target/lookahead/<out file stem>).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Text files or directories (searched recursively for .py, .md, .rs, .txt). Default: the
    /// Python standard library and the Rust toolchain's documentation.
    #[arg(long)]
    data: Vec<PathBuf>,
    /// Lookahead tokens per draft step (the streams of Speculative Streaming).
    #[arg(long, default_value_t = 2)]
    lookahead_tokens: usize,
    /// Top layers the lookahead tokens run through.
    #[arg(long, default_value_t = 4)]
    lookahead_layers: usize,
    #[arg(long, default_value_t = 64)]
    rank: usize,
    /// Training sequences (of --seq-len tokens).
    #[arg(long, default_value_t = 384)]
    sequences: usize,
    /// Held-out sequences for the evaluation.
    #[arg(long, default_value_t = 8)]
    eval_sequences: usize,
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    #[arg(long, default_value_t = 600)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Anchors per step (shared by the batch).
    #[arg(long, default_value_t = 32)]
    anchors: usize,
    #[arg(long, default_value_t = 5e-3)]
    learning_rate: f64,
    #[arg(long, default_value_t = 100)]
    checkpoint_every: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Label with this target's greedy predictions instead of the text's next tokens.
    #[arg(long)]
    distill_target: Option<String>,
    /// Ignore any saved state and start over.
    #[arg(long)]
    fresh: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Default corpus: every Python standard library and Rust documentation directory found.
fn default_data() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for root in [Path::new("/usr/lib"), Path::new("/usr/local/lib")] {
        if let Ok(entries) = std::fs::read_dir(root) {
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("python3.") && p.join("os.py").is_file())
                })
                .collect();
            found.sort();
            dirs.extend(found);
        }
    }
    if let Some(home) = std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".rustup")))
    {
        if let Ok(entries) = std::fs::read_dir(home.join("toolchains")) {
            let mut docs: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path().join("share/doc")))
                .filter(|p| p.is_dir())
                .collect();
            docs.sort();
            dirs.extend(docs.into_iter().take(1));
        }
    }
    dirs
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_file() {
        out.push(path.to_path_buf());
        return;
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        let skip = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
            n.starts_with('.') || n == "test" || n == "tests" || n == "site-packages"
        });
        if skip {
            continue;
        }
        if p.is_dir() {
            collect_files(&p, out);
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "py" | "md" | "rs" | "txt"))
        {
            out.push(p);
        }
    }
}

/// Token sequences of `len` from the corpus: files shuffled with the seed, tokenised, joined,
/// cut into consecutive chunks until `count` are collected.
fn corpus(
    data: &[PathBuf],
    tokenizer: &Tokenizer,
    count: usize,
    len: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>, String> {
    let mut files = Vec::new();
    for path in data {
        collect_files(path, &mut files);
    }
    if files.is_empty() {
        return Err(format!("no text files under {data:?}; pass --data"));
    }
    files.shuffle(&mut StdRng::seed_from_u64(seed));
    let mut sequences = Vec::with_capacity(count);
    let mut pending: Vec<u32> = Vec::new();
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue; // not UTF-8: skip
        };
        let tokens = tokenizer.encode(&text, false).map_err(|e| e.to_string())?;
        pending.extend(tokens);
        while pending.len() >= len && sequences.len() < count {
            sequences.push(pending.drain(..len).collect());
        }
        // A file contributes at most its own chunks: start the next file fresh.
        pending.clear();
        if sequences.len() == count {
            return Ok(sequences);
        }
    }
    Err(format!(
        "the corpus gave {} sequences of {len} tokens, {count} wanted",
        sequences.len()
    ))
}

/// Frozen states for every sequence, cached in `path` (keyed by what they depend on).
fn frozen_states(
    model: &Model,
    sequences: &[Vec<u32>],
    lookahead_layers: usize,
    key: &str,
    path: &Path,
) -> Result<Vec<FrozenSequence>, String> {
    if let Ok(cached) = std::fs::read(path) {
        let key_matches = safetensors::SafeTensors::read_metadata(&cached)
            .ok()
            .and_then(|(_, m)| m.metadata().as_ref().and_then(|m| m.get("key").cloned()))
            .is_some_and(|k| k == key);
        if key_matches {
            let tensors = candle_core::safetensors::load_buffer(&cached, model.device())
                .map_err(|e| e.to_string())?;
            if let Some(middle) = tensors.get("middle") {
                eprintln!("frozen states: reusing {}", path.display());
                return sequences
                    .iter()
                    .enumerate()
                    .map(|(i, tokens)| {
                        Ok(FrozenSequence {
                            tokens: tokens.clone(),
                            middle: middle.get(i).map_err(|e| e.to_string())?,
                        })
                    })
                    .collect();
            }
        }
    }
    let bar = bar(sequences.len() as u64, "frozen layers");
    let mut out = Vec::with_capacity(sequences.len());
    let started = Instant::now();
    for tokens in sequences {
        out.push(freeze(model, lookahead_layers, tokens).map_err(|e| e.to_string())?);
        tick(&bar, started);
    }
    bar.finish();
    let middles: Vec<&Tensor> = out.iter().map(|s| &s.middle).collect();
    let stacked = Tensor::stack(&middles, 0).map_err(|e| e.to_string())?;
    let metadata = HashMap::from([("key".to_string(), key.to_string())]);
    safetensors::tensor::serialize_to_file([("middle", stacked)], Some(metadata), path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(out)
}

/// The target's greedy prediction after every prefix of each sequence, shifted into label
/// position: `labels[t + 1]` is the target's argmax after tokens `..=t` (`labels[0]` unchanged).
fn distill(target: &Model, sequences: &mut [FrozenSequence]) -> Result<(), String> {
    let bar = bar(sequences.len() as u64, "target labels");
    let started = Instant::now();
    let mut agree = 0usize;
    let mut total = 0usize;
    for sequence in sequences.iter_mut() {
        let mut cache = target
            .new_cache(1, sequence.tokens.len())
            .map_err(|e| e.to_string())?;
        let logits = target
            .forward_causal(&sequence.tokens, &mut cache)
            .map_err(|e| e.to_string())?;
        let best = logits
            .argmax(candle_core::D::Minus1)
            .and_then(|t| t.to_vec1::<u32>())
            .map_err(|e| e.to_string())?;
        for (label, &predicted) in sequence.tokens.iter_mut().skip(1).zip(&best) {
            agree += usize::from(*label == predicted);
            total += 1;
            *label = predicted;
        }
        tick(&bar, started);
    }
    bar.finish();
    eprintln!(
        "target labels: the target's greedy token equals the text's in {:.1}% of positions",
        100.0 * agree as f64 / total.max(1) as f64
    );
    Ok(())
}

/// Advances `bar`; when stderr is not a terminal (the bar is hidden), logs every tenth instead.
fn tick(bar: &ProgressBar, started: Instant) {
    bar.inc(1);
    let (pos, len) = (bar.position(), bar.length().unwrap_or(0));
    if bar.is_hidden() && len >= 10 && pos % (len / 10) == 0 {
        eprintln!(
            "{}: {pos}/{len} ({:.0} s)",
            bar.message(),
            started.elapsed().as_secs_f64()
        );
    }
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>14} [{elapsed_precise}] {wide_bar} {pos}/{len} (eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    bar
}

fn report_line(r: &mirror_sd::mirror_core::training::LookaheadReport) -> String {
    let per: Vec<String> = r
        .lookahead_loss
        .iter()
        .zip(&r.lookahead_accuracy)
        .enumerate()
        .map(|(j, (l, a))| format!("s{}: nll {l:.3} top1 {:.1}%", j + 1, 100.0 * a))
        .collect();
    format!("loss {:.3} | {}", r.loss, per.join(" | "))
}

fn run(args: Args) -> Result<(), String> {
    let device: Device = common::parse_device(&args.device)?;
    let source = common::resolve_source(&args.model)?;
    let loaded = common::load_with_spinner(
        "draft",
        &source,
        &common::load_options("as-stored", common::KvDtypeArg::F32, &device, None, None)?,
    )?;
    let model = &loaded.model;
    let config = LookaheadConfig {
        tokens: args.lookahead_tokens,
        layers: args.lookahead_layers,
        rank: args.rank,
    };
    let stem = args
        .out
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("lookahead")
        .to_string();
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| common::repo_root().join("target/lookahead").join(&stem));
    std::fs::create_dir_all(&work_dir).map_err(|e| format!("{}: {e}", work_dir.display()))?;
    let data = if args.data.is_empty() {
        default_data()
    } else {
        args.data.clone()
    };
    let total = args.sequences + args.eval_sequences;
    let started = Instant::now();
    let sequences = corpus(&data, &loaded.tokenizer, total, args.seq_len, args.seed)?;
    eprintln!(
        "corpus: {} sequences of {} tokens from {data:?}",
        sequences.len(),
        args.seq_len
    );
    let key = format!(
        "{}|{}|layers {}|{}x{}|seed {}|data {data:?}",
        args.model,
        model.num_layers(),
        args.lookahead_layers,
        total,
        args.seq_len,
        args.seed
    );
    let mut frozen = frozen_states(
        model,
        &sequences,
        args.lookahead_layers,
        &key,
        &work_dir.join("frozen.safetensors"),
    )?;
    if let Some(target) = &args.distill_target {
        let target = common::load_with_spinner(
            "target",
            &common::resolve_source(target)?,
            &common::load_options("as-stored", common::KvDtypeArg::F32, &device, None, None)?,
        )?;
        mirror_sd::mirror_scheduler::check_tokenizers(&target.tokenizer, &loaded.tokenizer)
            .map_err(|e| e.to_string())?;
        distill(&target.model, &mut frozen)?;
    }
    let (train, held_out) = frozen.split_at(args.sequences);
    let state_path = work_dir.join("state.safetensors");
    let mut trainer = if state_path.is_file() && !args.fresh {
        let trainer = LookaheadTrainer::resume(model, &state_path).map_err(|e| e.to_string())?;
        if trainer.config() != &config {
            return Err(format!(
                "{} holds lookahead {:?}, not {config:?}: pass --fresh to start over",
                state_path.display(),
                trainer.config()
            ));
        }
        eprintln!("resuming at step {}", trainer.step_count());
        trainer
    } else {
        let mut settings = TrainSettings::new(args.lookahead_tokens, args.seed);
        settings.learning_rate = args.learning_rate;
        settings.anchors_per_step = args.anchors;
        LookaheadTrainer::new(model, config.clone(), settings).map_err(|e| e.to_string())?
    };
    let batches = train.len().div_ceil(args.batch.max(1));
    let mut order: Vec<usize> = (0..train.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(args.seed ^ 0x5EED));
    let bar = bar(args.steps as u64, "training");
    bar.set_position(trainer.step_count() as u64);
    let mut recent = Vec::new();
    while trainer.step_count() < args.steps {
        // The batch of a step depends on the step only, so a resumed run sees the same data.
        let b = trainer.step_count() % batches;
        let batch: Vec<&FrozenSequence> = order
            .iter()
            .skip(b * args.batch)
            .take(args.batch)
            .map(|&i| &train[i])
            .collect();
        let report = trainer.step(&batch).map_err(|e| e.to_string())?;
        recent.push(report.loss);
        if recent.len() > 20 {
            recent.remove(0);
        }
        bar.set_message(format!(
            "loss {:.3}",
            recent.iter().sum::<f64>() / recent.len() as f64
        ));
        bar.inc(1);
        let step = trainer.step_count();
        if step % args.checkpoint_every.max(1) == 0 || step == args.steps {
            trainer.save_state(&state_path).map_err(|e| e.to_string())?;
            let line = format!(
                "step {step} ({:.0} s): {} (train batch)",
                started.elapsed().as_secs_f64(),
                report_line(&report)
            );
            if bar.is_hidden() {
                eprintln!("{line}"); // not a terminal: keep the log
            } else {
                bar.println(line);
            }
        }
    }
    bar.finish();
    let evaluation = trainer.evaluate(held_out).map_err(|e| e.to_string())?;
    eprintln!(
        "held-out ({} sequences): {}",
        held_out.len(),
        report_line(&evaluation)
    );
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let mut metadata = HashMap::from([
        ("base_model".to_string(), source.to_string()),
        ("steps".to_string(), trainer.step_count().to_string()),
        ("seed".to_string(), args.seed.to_string()),
        (
            "held_out_top1".to_string(),
            format!("{:?}", evaluation.lookahead_accuracy),
        ),
        (
            "held_out_nll".to_string(),
            format!("{:?}", evaluation.lookahead_loss),
        ),
    ]);
    if let Some(target) = &args.distill_target {
        metadata.insert("distilled_from".into(), target.clone());
    }
    trainer
        .head()
        .and_then(|h| h.save(&args.out, &metadata))
        .map_err(|e| e.to_string())?;
    eprintln!(
        "wrote {} in {:.0} s",
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
