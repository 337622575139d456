//! The speed of the target and the draft alone, like llama.cpp's `llama-bench`: prompt
//! processing and decoding in tokens per second, and the cost of one forward of k tokens
//! (k = 1, 2, 4, 8, 16) after a 128-token context, the number that decides whether
//! speculation pays. Medians of several runs; one model at a time.
//!
//! ```text
//! cargo run --release --example bench                       # default pair, a table
//! cargo run --release --example bench -- --json             # the same as JSON
//! cargo run --release --example bench -- --candle           # also candle-transformers' quantized model
//! cargo run --release --example bench -- --weights float    # dequantized f32 weights
//! ```
//!
//! `scripts/llama_cpp_bench.mjs` prints the same JSON shape for llama.cpp on the same files.

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::Instant;

use clap::Parser;
use mirror_sd::mirror_core::kernels::{KernelPath, WeightBytes};
use mirror_sd::mirror_core::{Device, Model, ModelSource, Tensor};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(about = "Prompt-processing and decode speed, and forward cost per window size")]
struct Args {
    #[command(flatten)]
    pair: common::PairArgs,
    /// Threads of each model's pool (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Which models: target, draft or both.
    #[arg(long, default_value = "both")]
    only: String,
    /// Prompt tokens of the prompt-processing test.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens of the decode test.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Cached tokens before the k-token forwards.
    #[arg(long, default_value_t = 128)]
    context: usize,
    /// Window sizes k of the forward test.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    ks: Vec<usize>,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 7)]
    repeats: usize,
    /// Also time candle-transformers' quantized model (qwen2 / llama GGUF) on the same file.
    #[arg(long)]
    candle: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also measure the machine's read bandwidth (a streaming read of 1 GiB on the models'
    /// threads) and give each model's decode as a fraction of the memory floor: its weight bytes
    /// per token over that bandwidth, against the measured time per token.
    #[arg(long)]
    bandwidth: bool,
}

/// Read bandwidth in bytes per second: the median of 5 streaming reads of 1 GiB, split over
/// `threads` threads (summed as u64 words, which the compiler vectorizes).
fn read_bandwidth(threads: usize) -> Result<f64, String> {
    const BYTES: usize = 1 << 30;
    // Memory as the weights get it (huge pages unless they are turned off), so that the floor
    // is the one the kernels stream against.
    let mut memory = WeightBytes::zeroed(BYTES).map_err(|e| e.to_string())?;
    let words: &mut [u64] = as_words(memory.as_mut_slice());
    for (i, w) in words.iter_mut().enumerate() {
        *w = i as u64 | 1;
    }
    let words: &[u64] = words;
    let threads = threads.max(1);
    let chunk = words.len().div_ceil(threads);
    let mut times = Vec::new();
    for _ in 0..6 {
        let started = Instant::now();
        let total: u64 = std::thread::scope(|scope| {
            let parts: Vec<_> = words
                .chunks(chunk)
                .map(|part| scope.spawn(move || part.iter().fold(0u64, |a, &w| a.wrapping_add(w))))
                .collect();
            parts
                .into_iter()
                .map(|p| p.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(total);
        times.push(started.elapsed().as_secs_f64());
    }
    // The first pass warms the pages and the threads.
    Ok(BYTES as f64 / common::median(times[1..].to_vec()))
}

/// 64-byte aligned bytes (a multiple of 8 long) as 64-bit words.
fn as_words(bytes: &mut [u8]) -> &mut [u64] {
    let len = bytes.len() / 8;
    // SAFETY: `WeightBytes` are 64-byte aligned (so 8-byte aligned), `len * 8` bytes lie inside
    // them, every bit pattern is a valid u64, and the borrow is unique for the slice's life.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<u64>(), len) }
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Deterministic token ids spread over the common part of the vocabulary.
fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 100 + (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) % 20_000)
        .collect()
}

fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Field `name` (in kB) of a `/proc` status-like text, in MB.
fn proc_field_mb(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
}

/// Resident set and its peak, in MB (Linux).
fn memory_mb() -> (Option<f64>, Option<f64>) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    (
        proc_field_mb(&status, "VmRSS:"),
        proc_field_mb(&status, "VmHWM:"),
    )
}

/// Resident memory in transparent huge pages (Linux), in MB.
fn huge_page_mb() -> Option<f64> {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    proc_field_mb(&rollup, "AnonHugePages:")
}

fn bench_model(model: &Model, args: &Args) -> Result<Value, String> {
    let err = |e: mirror_sd::mirror_core::Error| e.to_string();
    let vocab_guard = |t: Vec<u32>| -> Vec<u32> {
        t.into_iter()
            .map(|id| id % model.vocab_size() as u32)
            .collect()
    };
    let capacity = (args.prompt_tokens + 1)
        .max(args.context + args.ks.iter().copied().max().unwrap_or(1))
        .max(args.decode_tokens + 2);
    let mut cache = model.new_cache(1, capacity).map_err(err)?;

    // Prompt processing: one forward of the whole prompt from an empty cache.
    let prompt = vocab_guard(tokens(args.prompt_tokens, 1));
    let mut prefill = Vec::new();
    for run in 0..3 {
        cache.clear();
        let started = Instant::now();
        model.forward_causal(&prompt, &mut cache).map_err(err)?;
        if run > 0 || args.repeats <= 1 {
            prefill.push(started.elapsed().as_secs_f64());
        }
    }
    let prefill_tok_s = args.prompt_tokens as f64 / common::median(prefill);

    // Decoding: greedy tokens one at a time after a one-token prompt.
    let mut decode = Vec::new();
    for _ in 0..3 {
        cache.clear();
        let mut next = argmax(&model.next_token_logits(&[100], &mut cache).map_err(err)?);
        let started = Instant::now();
        for _ in 0..args.decode_tokens {
            next = argmax(&model.next_token_logits(&[next], &mut cache).map_err(err)?);
        }
        decode.push(started.elapsed().as_secs_f64());
    }
    let decode_tok_s = args.decode_tokens as f64 / common::median(decode);

    // k tokens after a context, all positions' logits (a verification window).
    cache.clear();
    let context = vocab_guard(tokens(args.context, 2));
    model.forward_causal(&context, &mut cache).map_err(err)?;
    let mut forward_ms = BTreeMap::new();
    for &k in &args.ks {
        let window = vocab_guard(tokens(k, 3 + k as u32));
        let mut times = Vec::new();
        for run in 0..args.repeats + 2 {
            let started = Instant::now();
            let logits = model.forward_causal(&window, &mut cache).map_err(err)?;
            logits.device().synchronize().map_err(|e| e.to_string())?;
            let elapsed = started.elapsed().as_secs_f64();
            cache.truncate(args.context);
            if run >= 2 {
                times.push(elapsed * 1e3);
            }
        }
        forward_ms.insert(k.to_string(), common::median(times));
    }
    let report = model.weight_report();
    Ok(json!({
        "prefill_tok_s": prefill_tok_s,
        "decode_tok_s": decode_tok_s,
        "forward_ms": forward_ms,
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "context": args.context,
        "threads": model.threads(),
        "weights": report.summary(),
        "weight_bytes": report.total_bytes(),
        "weight_bytes_per_token": report.bytes_read_per_token(),
    }))
}

/// candle-transformers' quantized model on the same GGUF file: a forward of k tokens after the
/// context (last position's logits only, which is all that model returns).
fn bench_candle(path: &std::path::Path, args: &Args) -> Result<Value, String> {
    use candle_transformers::models::{quantized_llama, quantized_qwen2};
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let content =
        candle_core::quantized::gguf_file::Content::read(&mut file).map_err(|e| e.to_string())?;
    let arch = match content.metadata.get("general.architecture") {
        Some(candle_core::quantized::gguf_file::Value::String(s)) => s.clone(),
        _ => return Err("no general.architecture".into()),
    };
    let vocab = content
        .tensor_infos
        .get("token_embd.weight")
        .map(|t| t.shape.dims()[0])
        .unwrap_or(32_000) as u32;
    let device = Device::Cpu;
    let context: Vec<u32> = tokens(args.context, 2).iter().map(|t| t % vocab).collect();
    let input = |ids: &[u32]| -> Result<Tensor, String> {
        Tensor::new(ids, &device)
            .and_then(|t| t.unsqueeze(0))
            .map_err(|e| e.to_string())
    };
    enum Weights {
        Qwen2(quantized_qwen2::ModelWeights),
        Llama(quantized_llama::ModelWeights),
    }
    let mut base = match arch.as_str() {
        "qwen2" => Weights::Qwen2(
            quantized_qwen2::ModelWeights::from_gguf(content, &mut file, &device)
                .map_err(|e| e.to_string())?,
        ),
        "llama" => Weights::Llama(
            quantized_llama::ModelWeights::from_gguf(content, &mut file, &device)
                .map_err(|e| e.to_string())?,
        ),
        other => return Err(format!("no candle reference for `{other}`")),
    };
    let context_input = input(&context)?;
    let mut forward_ms = BTreeMap::new();
    for &k in &args.ks {
        let window: Vec<u32> = tokens(k, 3 + k as u32).iter().map(|t| t % vocab).collect();
        let x = input(&window)?;
        let mut times = Vec::new();
        for run in 0..args.repeats + 2 {
            // Its cache cannot be rolled back: clear it and prefill the context again,
            // outside the clock.
            match &mut base {
                Weights::Qwen2(m) => {
                    m.clear_kv_cache();
                    m.forward(&context_input, 0)
                }
                Weights::Llama(m) => m.forward(&context_input, 0),
            }
            .map_err(|e| e.to_string())?;
            let started = Instant::now();
            let logits = match &mut base {
                Weights::Qwen2(m) => m.forward(&x, args.context),
                Weights::Llama(m) => m.forward(&x, args.context),
            }
            .map_err(|e| e.to_string())?;
            logits.device().synchronize().map_err(|e| e.to_string())?;
            if run >= 2 {
                times.push(started.elapsed().as_secs_f64() * 1e3);
            }
        }
        forward_ms.insert(k.to_string(), common::median(times));
    }
    Ok(json!({ "forward_ms": forward_ms }))
}

fn run(args: Args) -> Result<(), String> {
    let device = Device::Cpu;
    let threads = args
        .threads
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()));
    let mut out = serde_json::Map::new();
    let roles: Vec<(&str, &str, &str)> = match args.only.as_str() {
        "target" => vec![("target", &args.pair.target, &args.pair.weights)],
        "draft" => vec![("draft", &args.pair.draft, args.pair.draft_weights())],
        "both" => vec![
            ("target", &args.pair.target, &args.pair.weights),
            ("draft", &args.pair.draft, args.pair.draft_weights()),
        ],
        other => return Err(format!("--only {other}: expected target, draft or both")),
    };
    let mut models = Vec::new();
    for (role, source, weights) in &roles {
        let source = common::resolve_source(source)?;
        let options = common::load_options(weights, args.pair.kv_dtype, &device, threads, None)?;
        let loaded = common::load_with_spinner(role, &source, &options)?;
        models.push((role.to_string(), source, loaded.model));
    }
    let (rss, _) = memory_mb();
    let huge = huge_page_mb();
    for (role, source, model) in &models {
        let mut result = bench_model(model, &args)?;
        result["model"] = json!(source.to_string());
        if args.candle {
            if let ModelSource::Gguf(path) = source {
                // candle runs its quantized matmuls in its own process-wide pool.
                let candle = bench_candle(path, &args)?;
                result["candle_quantized"] = candle;
            }
        }
        out.insert(role.clone(), result);
    }
    if args.bandwidth {
        let bandwidth = read_bandwidth(threads.unwrap_or(1))?;
        for (role, _, _) in &models {
            if let Some(result) = out.get_mut(role) {
                let bytes = result["weight_bytes_per_token"].as_f64().unwrap_or(0.0);
                let token_s = 1.0 / result["decode_tok_s"].as_f64().unwrap_or(f64::NAN);
                let floor_s = bytes / bandwidth;
                result["memory_floor_ms"] = json!(floor_s * 1e3);
                result["decode_ms"] = json!(token_s * 1e3);
                result["fraction_of_floor"] = json!(floor_s / token_s);
            }
        }
        out.insert("read_bandwidth_gb_s".into(), json!(bandwidth / 1e9));
    }
    let (_, peak) = memory_mb();
    out.insert("rss_mb_after_load".into(), json!(rss));
    out.insert("peak_rss_mb".into(), json!(peak));
    out.insert("huge_page_mb_after_load".into(), json!(huge));
    out.insert("kernel_path".into(), json!(KernelPath::selected().name()));
    out.insert("threads".into(), json!(threads));
    let out = Value::Object(out);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    print_table(&out, &args);
    Ok(())
}

fn print_table(out: &Value, args: &Args) {
    println!(
        "| model | weights | pp{} tok/s | tg{} tok/s |{} |",
        args.prompt_tokens,
        args.decode_tokens,
        args.ks
            .iter()
            .map(|k| format!(" fwd k={k} ms"))
            .collect::<Vec<_>>()
            .join(" |")
    );
    println!("|---|---|---|---|{}", "---|".repeat(args.ks.len()));
    for role in ["target", "draft"] {
        let Some(r) = out.get(role) else { continue };
        let forward = |value: &Value, k: usize| {
            value["forward_ms"][k.to_string()]
                .as_f64()
                .map_or("-".to_string(), |v| format!("{v:.1}"))
        };
        println!(
            "| {role} | {} | {:.1} | {:.2} |{} |",
            r["weights"].as_str().unwrap_or("?"),
            r["prefill_tok_s"].as_f64().unwrap_or(0.0),
            r["decode_tok_s"].as_f64().unwrap_or(0.0),
            args.ks
                .iter()
                .map(|&k| format!(" {}", forward(r, k)))
                .collect::<Vec<_>>()
                .join(" |")
        );
        if r.get("candle_quantized").is_some() {
            println!(
                "| {role}: candle quantized | as stored | | |{} |",
                args.ks
                    .iter()
                    .map(|&k| format!(" {}", forward(&r["candle_quantized"], k)))
                    .collect::<Vec<_>>()
                    .join(" |")
            );
        }
    }
    if let Some(bandwidth) = out["read_bandwidth_gb_s"].as_f64() {
        println!("\nread bandwidth {bandwidth:.1} GB/s (1 GiB streamed, median of 5)");
        for role in ["target", "draft"] {
            let Some(r) = out.get(role) else { continue };
            println!(
                "{role}: {:.0} MB of weights a token: floor {:.1} ms, decode {:.1} ms a token, {:.2} of the floor",
                r["weight_bytes_per_token"].as_f64().unwrap_or(0.0) / 1e6,
                r["memory_floor_ms"].as_f64().unwrap_or(0.0),
                r["decode_ms"].as_f64().unwrap_or(0.0),
                r["fraction_of_floor"].as_f64().unwrap_or(0.0),
            );
        }
    }
    println!(
        "\nkernel path {}, threads {:?}, RSS after load {:.0} MB ({:.0} MB in huge pages), peak {:.0} MB",
        out["kernel_path"].as_str().unwrap_or("?"),
        out["threads"],
        out["rss_mb_after_load"].as_f64().unwrap_or(0.0),
        out["huge_page_mb_after_load"].as_f64().unwrap_or(0.0),
        out["peak_rss_mb"].as_f64().unwrap_or(0.0)
    );
}
