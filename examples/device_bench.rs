//! The CUDA checks and measurements of issue 15, in one binary that runs on a GPU machine
//! without a Rust toolchain, a registry or a model hub (scripts/cuda_device.sh carries it there).
//!
//! - `parity`: logits on a device against logits on the CPU, f32, for the Hugging Face test
//!   fixtures (every position; one full pass and one token at a time) and for any GGUF model
//!   given (dequantized to f32; and as stored, through candle's quantized matmul, reported
//!   but not gated: the two sides quantize activations differently).
//! - `costs`: random-weight models of real shapes (Qwen2.5 7B/14B targets, the 0.5B draft),
//!   built on the machine, and the cost of one forward of k tokens after a 128-token context,
//!   k = 1..16: the target on one CUDA handle, the draft on a second handle with its own stream
//!   and on the CPU cores; then the target's cost while the draft runs beside it, and the
//!   draft's.
//! - `project`: the latency model (`mirror_scheduler::latency`) fed with those costs (or with
//!   roofline costs when there is no measurement) and with acceptance measured on the CPU for
//!   the real pair; writes one JSON and one Markdown table. Measured and projected figures are
//!   labelled as such.
//! - `all`: the three in turn, into one output directory.
//!
//! ```text
//! cargo run --release --example device_bench -- parity --device cpu      # runs anywhere
//! cargo run --release --example device_bench -- costs --target-device cpu --draft-device cpu \
//!     --targets tiny --draft tiny --dtype f32 --ks 1,2,4           # the CPU path of `costs`
//! cargo run --release --example device_bench -- project --roofline h200 --out-dir target/cuda-projection
//! scripts/cuda_device.sh            # on the GPU machine: all of it, with the CUDA build
//! ```

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use mirror_sd::mirror_core::{
    load, load_model_dir, threads, DType, Device, DirFiles, LoadOptions, Model, ModelConfig,
    ModelSource, Tensor, ThreadPlacement, WeightFormat,
};
use mirror_sd::mirror_scheduler::latency::{ForwardCost, Scenario, TreeSchedule};
use serde_json::{json, Value};

type Res<T> = Result<T, String>;

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

#[derive(Parser, Debug)]
#[command(about = "CUDA parity, forward costs and the latency model's projection (issue 15)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Device logits against CPU logits (f32).
    Parity(ParityArgs),
    /// Forward costs of random-weight models of real shapes, alone and side by side.
    Costs(CostsArgs),
    /// The latency model fed with measured (or roofline) costs and CPU-measured acceptance.
    Project(ProjectArgs),
    /// parity, costs and project into one output directory.
    All(AllArgs),
    /// A real model small enough to carry: a GGUF file cut to its first blocks.
    Truncate(TruncateArgs),
}

#[derive(Args, Debug, Clone)]
struct ParityArgs {
    /// The device to check against the CPU (`cuda:0`; `cpu` checks the CPU against itself).
    #[arg(long, default_value = "cuda:0")]
    device: String,
    /// Directory of the Hugging Face fixtures (one sub-directory per checkpoint).
    #[arg(long, default_value = "tests/fixtures/hf")]
    fixtures: PathBuf,
    /// GGUF models to check too (dequantized to f32, and as stored).
    #[arg(long)]
    gguf: Vec<PathBuf>,
    /// Tokens fed to each GGUF model.
    #[arg(long, default_value_t = 48)]
    gguf_tokens: usize,
    /// Largest allowed |device - CPU| on any f32 logit.
    #[arg(long, default_value_t = 1e-3)]
    tolerance: f32,
    /// Write the JSON report here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
struct CostsArgs {
    /// Device of the targets (`cuda:0`: a handle with its own stream).
    #[arg(long, default_value = "cuda:0")]
    target_device: String,
    /// Device of the draft beside the target: a second handle with its own stream (`cuda:0`),
    /// or `cpu` (then the draft runs on the CPU only).
    #[arg(long, default_value = "cuda:0")]
    draft_device: String,
    /// Also run the draft on the CPU cores (quantized, mirror-core's kernels).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    cpu_draft: bool,
    /// Cores of the CPU draft's pool (default: all but the first two, which are left to the
    /// threads that launch the GPU work).
    #[arg(long, value_delimiter = ',')]
    cpu_cores: Option<Vec<usize>>,
    /// GGML type of the CPU draft's weights.
    #[arg(long, default_value = "q8_0")]
    cpu_draft_weights: String,
    /// Target shapes: qwen2.5-7b, qwen2.5-14b, qwen2.5-1.5b, qwen2.5-0.5b, tiny.
    #[arg(long, value_delimiter = ',', default_value = "qwen2.5-7b,qwen2.5-14b")]
    targets: Vec<String>,
    /// Draft shape.
    #[arg(long, default_value = "qwen2.5-0.5b")]
    draft: String,
    /// Dtype of the models on the GPU (weights and activations): bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Window sizes k.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16"
    )]
    ks: Vec<usize>,
    /// Cached tokens before each forward.
    #[arg(long, default_value_t = 128)]
    context: usize,
    /// Timed forwards per k (after two untimed ones); the median is reported.
    #[arg(long, default_value_t = 10)]
    repeats: usize,
    /// Tokens of the target's forward in the side-by-side runs (gamma + 1).
    #[arg(long, default_value_t = 6)]
    contention_k: usize,
    /// Tokens of each draft forward in the side-by-side runs (rows of an anytime tree pass).
    #[arg(long, default_value_t = 2)]
    contention_draft_k: usize,
    /// Write the JSON report here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
struct ProjectArgs {
    /// A `costs` JSON report (measured costs).
    #[arg(long, conflicts_with = "roofline")]
    costs: Option<PathBuf>,
    /// No measurement: roofline costs of a device profile (`h200`), clearly a projection.
    #[arg(long)]
    roofline: Option<String>,
    /// Target shapes of the roofline projection.
    #[arg(long, value_delimiter = ',', default_value = "qwen2.5-7b,qwen2.5-14b")]
    targets: Vec<String>,
    /// Roofline: host microseconds per kernel launch on candle's CUDA path (an assumption).
    #[arg(long, default_value_t = 10.0)]
    host_us: f64,
    /// Roofline: kernel launches per decoder layer (counted on this decoder's CUDA path).
    #[arg(long, default_value_t = 29.0)]
    kernels_per_layer: f64,
    /// A `compare` results.json measured on the CPU for the real pair: gamma, kappa, exit,
    /// E[A] (from `sd`) and reuse (from `mirror`) are read from it.
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Window length of the CPU-measured acceptance (BENCHMARKS.md section 4: gamma 5).
    #[arg(long, default_value_t = 5)]
    gamma: usize,
    /// Early-exit candidates per row (section 4: kappa 2).
    #[arg(long, default_value_t = 2)]
    kappa: usize,
    /// Mean accepted tokens per window, measured on the CPU (section 4: 2.94).
    #[arg(long, default_value_t = 2.94)]
    mean_accepted: f64,
    /// Mirror's tree reuse rate, measured on the CPU (section 4: 0.37); FF = 1 - reuse.
    #[arg(long, default_value_t = 0.37)]
    reuse: f64,
    /// Early-exit layer as a fraction of the target's depth.
    #[arg(long, default_value_t = 0.5)]
    exit_fraction: f64,
    /// Tree nodes advanced per anytime draft pass.
    #[arg(long, default_value_t = 2)]
    rows_per_pass: usize,
    /// Output directory for projection.json and projection.md.
    #[arg(long, default_value = "target/cuda-projection")]
    out_dir: PathBuf,
}

#[derive(Args, Debug, Clone)]
struct AllArgs {
    #[command(flatten)]
    costs: CostsArgs,
    /// GGUF models for the parity check.
    #[arg(long)]
    gguf: Vec<PathBuf>,
    /// Fixtures of the parity check.
    #[arg(long, default_value = "tests/fixtures/hf")]
    fixtures: PathBuf,
    /// Output directory (parity.json, costs.json, projection.json, projection.md).
    #[arg(long, default_value = "target/cuda-device")]
    out_dir: PathBuf,
}

#[derive(Args, Debug, Clone)]
struct TruncateArgs {
    /// The GGUF file to cut.
    #[arg(long)]
    gguf: PathBuf,
    /// Decoder blocks to keep (the first ones).
    #[arg(long)]
    layers: usize,
    /// The GGUF file to write.
    #[arg(long)]
    out: PathBuf,
}

fn main() {
    threads::limit_candle_threads(1);
    // f32 GEMMs in full f32 (no TF32), so that parity measures the same arithmetic.
    candle_core::cuda::set_gemm_reduced_precision_f32(false);
    let result = match Cli::parse().command {
        Command::Parity(a) => parity(&a).map(|_| ()),
        Command::Costs(a) => costs(&a).map(|_| ()),
        Command::Project(a) => project(&a).map(|_| ()),
        Command::All(a) => all(&a),
        Command::Truncate(a) => truncate(&a),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn all(args: &AllArgs) -> Res<()> {
    std::fs::create_dir_all(&args.out_dir).map_err(err)?;
    let parity_args = ParityArgs {
        device: args.costs.target_device.clone(),
        fixtures: args.fixtures.clone(),
        gguf: args.gguf.clone(),
        gguf_tokens: 48,
        tolerance: 1e-3,
        out: Some(args.out_dir.join("parity.json")),
    };
    // A parity failure is reported, and the measurements still run.
    let parity_ok = match parity(&parity_args) {
        Ok(report) => report["pass"].as_bool().unwrap_or(false),
        Err(e) => {
            eprintln!("parity: error: {e}");
            false
        }
    };
    let costs_args = CostsArgs {
        out: Some(args.out_dir.join("costs.json")),
        ..args.costs.clone()
    };
    costs(&costs_args)?;
    project(&ProjectArgs {
        costs: costs_args.out.clone(),
        roofline: None,
        targets: Vec::new(),
        host_us: 10.0,
        kernels_per_layer: 29.0,
        compare: None,
        gamma: 5,
        kappa: 2,
        mean_accepted: 2.94,
        reuse: 0.37,
        exit_fraction: 0.5,
        rows_per_pass: 2,
        out_dir: args.out_dir.clone(),
    })?;
    if !parity_ok {
        return Err("parity failed (see parity.json)".into());
    }
    Ok(())
}

fn write_json(path: Option<&Path>, value: &Value) -> Res<()> {
    if let Some(path) = path {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let text = serde_json::to_string_pretty(value).map_err(err)?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// a real model small enough to carry

/// The first `layers` blocks of a GGUF model with its embeddings, final norm, head, tokenizer
/// and metadata (block count changed), every tensor in its stored type: a real model's weights
/// in a file small enough to carry to the GPU machine (64 MiB per call there).
fn truncate(args: &TruncateArgs) -> Res<()> {
    use candle_core::quantized::{gguf_file, QTensor};
    let mut file =
        std::fs::File::open(&args.gguf).map_err(|e| format!("{}: {e}", args.gguf.display()))?;
    let content = gguf_file::Content::read(&mut file).map_err(err)?;
    let arch = match content.metadata.get("general.architecture") {
        Some(gguf_file::Value::String(s)) => s.clone(),
        _ => return Err("no general.architecture".into()),
    };
    let key = format!("{arch}.block_count");
    let blocks = match content.metadata.get(&key) {
        Some(v) => v.to_u32().map_err(err)? as usize,
        None => return Err(format!("no {key}")),
    };
    if args.layers == 0 || args.layers > blocks {
        return Err(format!("--layers must be 1..={blocks}"));
    }
    let block_count = gguf_file::Value::U32(args.layers as u32);
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), if *k == key { &block_count } else { v }))
        .collect();
    let keep = |name: &str| match name.strip_prefix("blk.") {
        Some(rest) => rest
            .split('.')
            .next()
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| i < args.layers),
        None => true,
    };
    let mut names: Vec<&String> = content.tensor_infos.keys().filter(|n| keep(n)).collect();
    names.sort();
    let tensors = names
        .iter()
        .map(|n| {
            Ok((
                n.as_str(),
                content.tensor(&mut file, n, &Device::Cpu).map_err(err)?,
            ))
        })
        .collect::<Res<Vec<(&str, QTensor)>>>()?;
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?,
    );
    gguf_file::write(&mut out, &metadata, &refs).map_err(err)?;
    std::io::Write::flush(&mut out).map_err(err)?;
    eprintln!(
        "wrote {} ({} of {blocks} blocks, {} tensors)",
        args.out.display(),
        args.layers,
        refs.len()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// parity

/// Largest |a - b| and largest |b| over two f32 tensors of one shape.
fn diff(a: &Tensor, b: &Tensor) -> Res<(f32, f32)> {
    if a.dims() != b.dims() {
        return Err(format!("shapes differ: {:?} vs {:?}", a.dims(), b.dims()));
    }
    let a = a
        .to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(err)?;
    let b = b
        .to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(err)?;
    let mut worst = 0f32;
    let mut scale = 0f32;
    for (x, y) in a.iter().zip(&b) {
        let d = (x - y).abs();
        // NaN never passes.
        worst = if d.is_nan() {
            f32::INFINITY
        } else {
            worst.max(d)
        };
        scale = scale.max(y.abs());
    }
    Ok((worst, scale))
}

/// Logits of every position, `(tokens, vocab)`, in one pass and one token at a time.
fn logits_both_ways(model: &Model, tokens: &[u32]) -> Res<(Tensor, Tensor)> {
    let mut cache = model.new_cache(1, tokens.len() + 1).map_err(err)?;
    let full = model.forward_causal(tokens, &mut cache).map_err(err)?;
    cache.clear();
    let mut rows = Vec::with_capacity(tokens.len());
    for &t in tokens {
        rows.push(model.forward_causal(&[t], &mut cache).map_err(err)?);
    }
    let incremental = Tensor::cat(&rows, 0).map_err(err)?;
    Ok((full, incremental))
}

fn argmax_agreement(a: &Tensor, b: &Tensor) -> Res<f64> {
    let a = a.argmax(1).and_then(|t| t.to_vec1::<u32>()).map_err(err)?;
    let b = b
        .to_device(&Device::Cpu)
        .and_then(|t| t.argmax(1))
        .and_then(|t| t.to_vec1::<u32>())
        .map_err(err)?;
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    Ok(same as f64 / a.len().max(1) as f64)
}

fn parity(args: &ParityArgs) -> Res<Value> {
    let device = common::parse_device(&args.device)?;
    let tol = args.tolerance;
    let mut pass = true;
    let mut fixtures = Vec::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(&args.fixtures)
        .map_err(|e| format!("{}: {e}", args.fixtures.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").is_file())
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(format!("no fixtures under {}", args.fixtures.display()));
    }
    println!("| model | weights | rows | max abs(device - cpu) full pass | one token at a time | max abs(cpu - transformers) | max abs(device - transformers) | max abs logit | pass |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for dir in &names {
        let name = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let files = DirFiles::local(dir).map_err(err)?;
        let on = |device: &Device| {
            load_model_dir(
                &files,
                &LoadOptions {
                    device: device.clone(),
                    ..LoadOptions::default()
                },
            )
            .map_err(|e| format!("{name} on {device:?}: {e}"))
        };
        let cpu = on(&Device::Cpu)?;
        let dev = on(&device)?;
        let reference =
            candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
                .map_err(|e| format!("{name}: reference.safetensors: {e}"))?;
        let mut worst = [0f32; 4];
        let mut scale = 0f32;
        let mut rows = 0;
        for i in 0.. {
            let (Some(tokens), Some(expected)) = (
                reference.get(&format!("tokens_{i}")),
                reference.get(&format!("logits_{i}")),
            ) else {
                break;
            };
            let tokens: Vec<u32> = tokens
                .to_vec1::<i64>()
                .map_err(err)?
                .into_iter()
                .map(|t| t as u32)
                .collect();
            let (cpu_full, _) = logits_both_ways(&cpu, &tokens)?;
            let (dev_full, dev_inc) = logits_both_ways(&dev, &tokens)?;
            let checks = [
                diff(&dev_full, &cpu_full)?,
                diff(&dev_inc, &cpu_full)?,
                diff(&cpu_full, expected)?,
                diff(&dev_full, expected)?,
            ];
            for (w, (d, s)) in worst.iter_mut().zip(checks) {
                *w = w.max(d);
                scale = scale.max(s);
            }
            rows += tokens.len();
        }
        let ok = worst[0] <= tol && worst[1] <= tol;
        pass &= ok;
        println!(
            "| {name} | f32 | {rows} | {:.2e} | {:.2e} | {:.2e} | {:.2e} | {scale:.2} | {} |",
            worst[0],
            worst[1],
            worst[2],
            worst[3],
            if ok { "yes" } else { "NO" }
        );
        fixtures.push(json!({
            "name": name, "weights": "f32", "rows": rows,
            "max_abs_device_vs_cpu": worst[0], "max_abs_device_incremental_vs_cpu": worst[1],
            "max_abs_cpu_vs_transformers": worst[2], "max_abs_device_vs_transformers": worst[3],
            "max_abs_logit": scale, "pass": ok,
        }));
    }
    let mut ggufs = Vec::new();
    for path in &args.gguf {
        for (label, weights) in [
            ("f32 (dequantized)", WeightFormat::Float),
            ("as stored", WeightFormat::AsStored),
        ] {
            let options = |device: &Device| LoadOptions {
                weights,
                device: device.clone(),
                ..LoadOptions::default()
            };
            let source = ModelSource::Gguf(path.clone());
            let cpu = load(&source, &options(&Device::Cpu)).map_err(err)?;
            let dev = load(&source, &options(&device)).map_err(err)?.model;
            let text = "fn main() {\n    let squares: Vec<u64> = (1..=10).map(|x| x * x).collect();\n    println!(\"{squares:?}\");\n}\nThe capital of France is Paris, and the capital of Italy is";
            let mut tokens = cpu.tokenizer.encode(text, true).map_err(err)?;
            tokens.truncate(args.gguf_tokens.max(2));
            let (cpu_full, _) = logits_both_ways(&cpu.model, &tokens)?;
            let (dev_full, dev_inc) = logits_both_ways(&dev, &tokens)?;
            let (full, scale) = diff(&dev_full, &cpu_full)?;
            let (inc, _) = diff(&dev_inc, &cpu_full)?;
            let agree = argmax_agreement(&cpu_full, &dev_full)?;
            // Only f32 is held to the tolerance: quantized weights run with differently
            // quantized activations on the two sides.
            let gated = weights == WeightFormat::Float;
            let ok = !gated || (full <= tol && inc <= tol);
            pass &= ok;
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            println!(
                "| {name} | {label} | {} | {full:.2e} | {inc:.2e} | | | {scale:.2} | {} (argmax agreement {:.3}) |",
                tokens.len(),
                if !gated { "not gated" } else if ok { "yes" } else { "NO" },
                agree
            );
            ggufs.push(json!({
                "name": name, "weights": label, "rows": tokens.len(),
                "max_abs_device_vs_cpu": full, "max_abs_device_incremental_vs_cpu": inc,
                "max_abs_logit": scale, "argmax_agreement": agree, "gated": gated, "pass": ok,
            }));
        }
    }
    println!(
        "\nparity on {}: {} (tolerance {tol:e} on f32 logits)",
        args.device,
        if pass { "PASS" } else { "FAIL" }
    );
    let report = json!({
        "device": args.device, "tolerance": tol, "pass": pass,
        "fixtures": fixtures, "gguf": ggufs,
    });
    write_json(args.out.as_deref(), &report)?;
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// random-weight models of real shapes

/// `config.json` of a model shape (Qwen2.5 configs as published, and a tiny one for tests).
fn shape_config(name: &str) -> Res<ModelConfig> {
    let (hidden, inter, layers, heads, kv, vocab, tied) = match name {
        "qwen2.5-0.5b" => (896, 4864, 24, 14, 2, 151_936, true),
        "qwen2.5-1.5b" => (1536, 8960, 28, 12, 2, 151_936, true),
        "qwen2.5-7b" => (3584, 18_944, 28, 28, 4, 152_064, false),
        "qwen2.5-14b" => (5120, 13_824, 48, 40, 8, 152_064, false),
        "tiny" => (64, 128, 2, 4, 2, 1024, false),
        other => {
            return Err(format!(
            "unknown shape `{other}` (qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b, qwen2.5-14b, tiny)"
        ))
        }
    };
    let text = json!({
        "model_type": "qwen2", "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "vocab_size": vocab, "tie_word_embeddings": tied, "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0, "max_position_embeddings": 32_768,
        "bos_token_id": 151_643, "eos_token_id": 151_645,
    })
    .to_string();
    ModelConfig::from_json(&text, name).map_err(err)
}

/// Parameters of a shape.
fn shape_params(c: &ModelConfig) -> f64 {
    let (h, i, v) = (
        c.hidden_size as f64,
        c.intermediate_size as f64,
        c.vocab_size as f64,
    );
    let kv = (c.num_kv_heads() * c.head_dim()) as f64;
    let q = (c.num_attention_heads * c.head_dim()) as f64;
    let layer = h * q + 2.0 * h * kv + q * h + 3.0 * h * i + 2.0 * h;
    let head = if c.tie_word_embeddings { 0.0 } else { v * h };
    c.num_hidden_layers as f64 * layer + v * h + head + h
}

/// Random weights, drawn on the device they are loaded to: N(0, 0.02) matrices and
/// embeddings, zero biases, unit norm weights. Real shapes, meaningless values: for timing.
struct RandomWeights {
    path: PathBuf,
}

impl mirror_sd::mirror_core::weights::WeightSource for RandomWeights {
    fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> mirror_sd::mirror_core::Result<Tensor> {
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape, dtype, device)?
        } else if name.ends_with(".bias") {
            Tensor::zeros(shape, dtype, device)?
        } else {
            Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(dtype)?
        };
        Ok(t)
    }
    fn contains(&self, _: &str) -> bool {
        true
    }
    fn path(&self) -> &Path {
        &self.path
    }
}

fn random_model(shape: &str, options: &LoadOptions) -> Res<Model> {
    let config = shape_config(shape)?;
    let started = Instant::now();
    let source = RandomWeights {
        path: PathBuf::from(format!("random:{shape}")),
    };
    let model = options
        .build_model(config, &source)
        .map_err(|e| format!("{shape}: {e}"))?;
    model.device().synchronize().map_err(err)?;
    eprintln!(
        "built random {shape} on {:?} in {:.1} s: {}",
        options.device,
        started.elapsed().as_secs_f64(),
        model.weight_report().summary()
    );
    Ok(model)
}

fn parse_dtype(text: &str) -> Res<DType> {
    match text {
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        "f32" => Ok(DType::F32),
        other => Err(format!("dtype `{other}`: expected bf16, f16 or f32")),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn window(k: usize, seed: usize, vocab: usize) -> Vec<u32> {
    (0..k)
        .map(|i| (100 + (i * 7919 + seed * 104_729) % 20_000) as u32 % vocab as u32)
        .collect()
}

/// A model with a filled context, ready for timed forwards of k tokens.
struct Bench {
    model: Arc<Model>,
    cache: mirror_sd::mirror_core::KvCache,
    context: usize,
}

impl Bench {
    fn new(model: Arc<Model>, context: usize, max_k: usize) -> Res<Self> {
        let mut cache = model.new_cache(1, context + max_k + 1).map_err(err)?;
        let prompt = window(context, 1, model.vocab_size());
        model.forward_causal(&prompt, &mut cache).map_err(err)?;
        model.device().synchronize().map_err(err)?;
        Ok(Self {
            model,
            cache,
            context,
        })
    }

    /// Seconds of one forward of `k` tokens after the context, its work finished on the device.
    fn forward(&mut self, k: usize, seed: usize) -> Res<f64> {
        let tokens = window(k, seed, self.model.vocab_size());
        let started = Instant::now();
        let logits = self
            .model
            .forward_causal(&tokens, &mut self.cache)
            .map_err(err)?;
        logits.device().synchronize().map_err(err)?;
        let elapsed = started.elapsed().as_secs_f64();
        self.cache.truncate(self.context);
        Ok(elapsed)
    }

    /// Median milliseconds of `repeats` forwards of each k (two untimed first).
    fn table(&mut self, ks: &[usize], repeats: usize) -> Res<BTreeMap<usize, f64>> {
        let mut out = BTreeMap::new();
        for &k in ks {
            let mut times = Vec::with_capacity(repeats);
            for run in 0..repeats + 2 {
                let t = self.forward(k, run)?;
                if run >= 2 {
                    times.push(t * 1e3);
                }
            }
            out.insert(k, median(times));
        }
        Ok(out)
    }
}

/// The target's forward of `target_k` tokens timed while the draft loops forwards of `draft_k`
/// tokens beside it (its own thread, its own device handle or CPU pool), and the draft's own
/// forwards during that time. Returns (target ms, draft ms), medians.
fn side_by_side(
    target: &mut Bench,
    draft: &mut Bench,
    target_k: usize,
    draft_k: usize,
    repeats: usize,
) -> Res<(f64, f64)> {
    let stop = AtomicBool::new(false);
    let started = AtomicBool::new(false);
    std::thread::scope(|scope| -> Res<(f64, f64)> {
        let drafting = scope.spawn(|| -> Res<Vec<f64>> {
            let mut times = Vec::new();
            let mut run = 0;
            while !stop.load(Ordering::Acquire) {
                let t = draft.forward(draft_k, run)?;
                run += 1;
                started.store(true, Ordering::Release);
                times.push(t * 1e3);
            }
            Ok(times)
        });
        while !started.load(Ordering::Acquire) && !drafting.is_finished() {
            std::thread::yield_now();
        }
        let mut times = Vec::with_capacity(repeats);
        let result = (|| -> Res<()> {
            for run in 0..repeats + 2 {
                let t = target.forward(target_k, run)?;
                if run >= 2 {
                    times.push(t * 1e3);
                }
            }
            Ok(())
        })();
        stop.store(true, Ordering::Release);
        let draft_times = drafting
            .join()
            .map_err(|_| "the draft thread panicked".to_string())??;
        result?;
        // The draft's first forward started before the target's, its last may end after.
        let keep = draft_times.len().saturating_sub(2).max(1);
        let draft_times = draft_times
            .into_iter()
            .skip(1)
            .take(keep)
            .collect::<Vec<_>>();
        Ok((median(times), median(draft_times)))
    })
}

/// Median seconds of a message to another thread and back (the host side of a rendezvous).
fn ping_pong() -> f64 {
    let (to, from_main) = std::sync::mpsc::channel::<u32>();
    let (back, from_worker) = std::sync::mpsc::channel::<u32>();
    let worker = std::thread::spawn(move || {
        while let Ok(v) = from_main.recv() {
            if back.send(v).is_err() {
                break;
            }
        }
    });
    let mut times = Vec::new();
    for i in 0..2000u32 {
        let started = Instant::now();
        let _ = to.send(i);
        let _ = from_worker.recv();
        times.push(started.elapsed().as_secs_f64());
    }
    drop(to);
    let _ = worker.join();
    median(times)
}

fn costs(args: &CostsArgs) -> Res<Value> {
    let target_device = common::parse_device(&args.target_device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let max_k = args
        .ks
        .iter()
        .copied()
        .chain([args.contention_k, args.contention_draft_k])
        .max()
        .unwrap_or(1);
    let gpu_options = |device: &Device| LoadOptions {
        weights: WeightFormat::Float,
        dtype,
        kv_dtype: None,
        device: device.clone(),
        placement: ThreadPlacement::default(),
    };
    // The draft beside the target on the device: a second handle with its own stream.
    let device_draft = if args.draft_device == "cpu" {
        None
    } else {
        let device = common::parse_device(&args.draft_device)?;
        let model = Arc::new(random_model(&args.draft, &gpu_options(&device))?);
        Some((args.draft_device.clone(), model))
    };
    let cpu_draft = if args.cpu_draft || args.draft_device == "cpu" {
        let available = threads::available_cores();
        let cores = match &args.cpu_cores {
            Some(cores) => cores.clone(),
            None if available.len() > 2 => available[2..].to_vec(),
            None => available.clone(),
        };
        let weights = WeightFormat::parse(&args.cpu_draft_weights).map_err(err)?;
        let options = LoadOptions {
            weights,
            dtype: DType::F32,
            kv_dtype: None,
            device: Device::Cpu,
            placement: ThreadPlacement {
                threads: Some(cores.len()),
                cores: Some(cores.clone()),
            },
        };
        let model = Arc::new(random_model(&args.draft, &options)?);
        Some((cores, model))
    } else {
        None
    };
    let mut drafts = serde_json::Map::new();
    let mut draft_benches = Vec::new();
    if let Some((name, model)) = &device_draft {
        let mut bench = Bench::new(Arc::clone(model), args.context, max_k)?;
        let table = bench.table(&args.ks, args.repeats)?;
        print_table(
            &format!("draft {} on {name} (own stream)", args.draft),
            &table,
        );
        drafts.insert(
            "device".into(),
            json!({"device": name, "dtype": args.dtype, "shape": args.draft,
                   "params": shape_params(model.config()),
                   "weight_bytes": model.weight_report().total_bytes(), "forward_ms": ms_map(&table)}),
        );
        draft_benches.push(("device", bench));
    }
    if let Some((cores, model)) = &cpu_draft {
        let mut bench = Bench::new(Arc::clone(model), args.context, max_k)?;
        let table = bench.table(&args.ks, args.repeats)?;
        print_table(
            &format!("draft {} on the CPU ({} cores)", args.draft, cores.len()),
            &table,
        );
        drafts.insert(
            "cpu".into(),
            json!({"device": "cpu", "cores": cores, "weights": args.cpu_draft_weights,
                   "shape": args.draft, "params": shape_params(model.config()),
                   "weight_bytes": model.weight_report().total_bytes(), "forward_ms": ms_map(&table)}),
        );
        draft_benches.push(("cpu", bench));
    }
    let mut targets = serde_json::Map::new();
    for shape in &args.targets {
        let model = Arc::new(random_model(shape, &gpu_options(&target_device))?);
        let mut bench = Bench::new(Arc::clone(&model), args.context, max_k)?;
        let table = bench.table(&args.ks, args.repeats)?;
        print_table(&format!("target {shape} on {}", args.target_device), &table);
        let mut beside = serde_json::Map::new();
        for (placement, draft) in draft_benches.iter_mut() {
            let target_alone = median(
                (0..args.repeats)
                    .map(|r| bench.forward(args.contention_k, r).map(|t| t * 1e3))
                    .collect::<Res<Vec<_>>>()?,
            );
            let draft_alone = median(
                (0..args.repeats)
                    .map(|r| draft.forward(args.contention_draft_k, r).map(|t| t * 1e3))
                    .collect::<Res<Vec<_>>>()?,
            );
            let (target_with, draft_with) = side_by_side(
                &mut bench,
                draft,
                args.contention_k,
                args.contention_draft_k,
                args.repeats.max(5),
            )?;
            println!(
                "  beside the {placement} draft: target k={} {target_alone:.2} -> {target_with:.2} ms ({:+.0}%), draft k={} {draft_alone:.2} -> {draft_with:.2} ms ({:+.0}%)",
                args.contention_k,
                100.0 * (target_with / target_alone - 1.0),
                args.contention_draft_k,
                100.0 * (draft_with / draft_alone - 1.0),
            );
            beside.insert(
                placement.to_string(),
                json!({"target_k": args.contention_k, "draft_k": args.contention_draft_k,
                       "target_alone_ms": target_alone, "target_beside_draft_ms": target_with,
                       "target_slowdown": target_with / target_alone,
                       "draft_alone_ms": draft_alone, "draft_beside_target_ms": draft_with,
                       "draft_slowdown": draft_with / draft_alone}),
            );
        }
        targets.insert(
            shape.clone(),
            json!({"device": args.target_device, "dtype": args.dtype,
                   "params": shape_params(model.config()),
                   "weight_bytes": model.weight_report().total_bytes(),
                   "forward_ms": ms_map(&table), "beside_draft": beside}),
        );
        drop(bench);
        drop(model);
        target_device.synchronize().map_err(err)?;
    }
    let rendezvous = ping_pong();
    println!(
        "host rendezvous (thread ping-pong): {:.1} us",
        rendezvous * 1e6
    );
    let report = json!({
        "kind": "measured",
        "context": args.context,
        "repeats": args.repeats,
        "target_device": args.target_device,
        "targets": targets,
        "drafts": drafts,
        "rendezvous_s": rendezvous,
        "note": "random weights of real shapes; forward = k tokens after the context, all rows' logits, work finished on the device (synchronize); medians",
    });
    write_json(args.out.as_deref(), &report)?;
    Ok(report)
}

fn ms_map(table: &BTreeMap<usize, f64>) -> Value {
    Value::Object(
        table
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect(),
    )
}

fn print_table(title: &str, table: &BTreeMap<usize, f64>) {
    let cells: Vec<String> = table
        .iter()
        .map(|(k, v)| format!("k={k}: {v:.2}"))
        .collect();
    println!("{title}, ms: {}", cells.join(", "));
}

// ---------------------------------------------------------------------------------------------
// projection

/// Milliseconds at `k` from a `forward_ms` object, interpolated linearly between measured k.
fn cost_at(forward_ms: &Value, k: usize) -> Res<f64> {
    let mut points: Vec<(usize, f64)> = forward_ms
        .as_object()
        .ok_or("forward_ms is not an object")?
        .iter()
        .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_f64()?)))
        .collect();
    points.sort_by_key(|p| p.0);
    let (first, last) = match (points.first(), points.last()) {
        (Some(f), Some(l)) => (*f, *l),
        _ => return Err("no forward costs".into()),
    };
    if k <= first.0 {
        return Ok(first.1);
    }
    if k >= last.0 {
        return Ok(last.1);
    }
    let upper = points
        .iter()
        .position(|p| p.0 >= k)
        .unwrap_or(points.len() - 1);
    let (a, b) = (points[upper - 1], points[upper]);
    Ok(a.1 + (b.1 - a.1) * (k - a.0) as f64 / (b.0 - a.0) as f64)
}

/// The latency model's linear cost through two measured points (ms in, seconds out).
fn fit(forward_ms: &Value, a: usize, b: usize) -> Res<ForwardCost> {
    Ok(ForwardCost::fit(
        (a, cost_at(forward_ms, a)? / 1e3),
        (b, cost_at(forward_ms, b)? / 1e3),
    ))
}

fn scaled(cost: ForwardCost, factor: f64) -> ForwardCost {
    ForwardCost {
        fixed: cost.fixed * factor,
        per_token: cost.per_token * factor,
    }
}

/// Roofline costs of the H200 for the `project --roofline h200` mode (no measurement).
///
/// GPU, bf16: weights streamed once per forward at 3.6 TB/s (75% of the 4.8 TB/s datasheet;
/// a device-to-device copy measured about 4.3 TB/s on such a machine here), 2 FLOP per
/// parameter per token at 400 TFLOP/s (half the measured bf16 matrix rate: small-m GEMMs),
/// and a host floor: candle launches `kernels_per_layer` kernels per decoder layer on this
/// decoder's path (norms, q/k/v/o and MLP GEMMs, biases, transposes, RoPE, cache writes,
/// attention, residuals), each costing `host_us` of host time (allocation, shape upload,
/// launch); a forward costs the larger of memory time and host time, plus compute. CPU draft
/// (16 cores of the GPU machine, Q8_0): weights streamed at an assumed 100 GB/s, and 25.7 ms
/// of one core per token (the 0.5B draft measured on one core here, k = 1..16), spread over
/// 14 cores.
fn roofline_costs(targets: &[String], host_us: f64, kernels_per_layer: f64) -> Res<Value> {
    const BANDWIDTH: f64 = 3.6e12;
    const FLOPS: f64 = 4.0e14;
    const CPU_BANDWIDTH: f64 = 100e9;
    const CPU_CORE_SECONDS_PER_TOKEN: f64 = 0.0257;
    const CPU_CORES: f64 = 14.0;
    let host_per_kernel = host_us * 1e-6;
    let gpu = |shape: &str| -> Res<Value> {
        let c = shape_config(shape)?;
        let params = shape_params(&c);
        let memory = params * 2.0 / BANDWIDTH;
        let host = c.num_hidden_layers as f64 * kernels_per_layer * host_per_kernel;
        let table: BTreeMap<usize, f64> = (1..=16)
            .map(|k| {
                (
                    k,
                    1e3 * (memory.max(host) + 2.0 * params * k as f64 / FLOPS),
                )
            })
            .collect();
        Ok(
            json!({"params": params, "weight_bytes": params * 2.0, "forward_ms": ms_map(&table),
                  "memory_ms": memory * 1e3, "host_ms": host * 1e3}),
        )
    };
    let mut out_targets = serde_json::Map::new();
    for t in targets {
        out_targets.insert(t.clone(), gpu(t)?);
    }
    let draft = shape_config("qwen2.5-0.5b")?;
    let params = shape_params(&draft);
    // Q8_0: 34 bytes per 32 weights.
    let bytes = params * 34.0 / 32.0;
    let cpu_table: BTreeMap<usize, f64> = (1..=16)
        .map(|k| {
            (
                k,
                1e3 * (bytes / CPU_BANDWIDTH + CPU_CORE_SECONDS_PER_TOKEN * k as f64 / CPU_CORES),
            )
        })
        .collect();
    Ok(json!({
        "kind": "roofline",
        "profile": format!("h200: 3.6 TB/s, 400 TFLOP/s bf16, host floor {kernels_per_layer} kernels/layer x {host_us} us; CPU draft Q8_0 at 100 GB/s, 25.7 core-ms/token over 14 cores"),
        "targets": out_targets,
        "drafts": {"device": gpu("qwen2.5-0.5b")?,
                   "cpu": {"weights": "q8_0", "weight_bytes": bytes, "forward_ms": ms_map(&cpu_table)}},
        "rendezvous_s": 20e-6,
    }))
}

#[derive(Clone, Copy)]
struct Acceptance {
    gamma: usize,
    kappa: usize,
    mean_accepted: f64,
    reuse: f64,
    exit_fraction: f64,
}

fn acceptance(args: &ProjectArgs) -> Res<(Acceptance, String)> {
    let mut a = Acceptance {
        gamma: args.gamma,
        kappa: args.kappa,
        mean_accepted: args.mean_accepted,
        reuse: args.reuse,
        exit_fraction: args.exit_fraction,
    };
    let Some(path) = &args.compare else {
        return Ok((a, "CPU-measured, Qwen2.5-Coder 1.5B target / 0.5B draft (BENCHMARKS.md section 4, or as given)".into()));
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let run: Value = serde_json::from_str(&text).map_err(err)?;
    let overall = |m: &str, key: &str| run["results"][m]["overall"][key].as_f64();
    a.gamma = run["gamma"].as_u64().unwrap_or(a.gamma as u64) as usize;
    a.kappa = run["kappa"].as_u64().unwrap_or(a.kappa as u64) as usize;
    a.exit_fraction = run["exit_fraction"].as_f64().unwrap_or(a.exit_fraction);
    if let (Some(acc), Some(w)) = (overall("sd", "accepted"), overall("sd", "windows")) {
        a.mean_accepted = acc / w.max(1.0);
    }
    if let (Some(r), Some(n)) = (overall("mirror", "reuse"), overall("mirror", "resolved")) {
        a.reuse = r / n.max(1.0);
    }
    Ok((a, format!("CPU-measured, from {}", path.display())))
}

fn project(args: &ProjectArgs) -> Res<Value> {
    let costs = match (&args.costs, &args.roofline) {
        (Some(path), _) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            serde_json::from_str::<Value>(&text).map_err(err)?
        }
        (None, Some(profile)) if profile == "h200" => {
            roofline_costs(&args.targets, args.host_us, args.kernels_per_layer)?
        }
        (None, Some(other)) => return Err(format!("no roofline profile `{other}` (h200)")),
        (None, None) => return Err("give --costs COSTS_JSON or --roofline h200".into()),
    };
    let measured = costs["kind"] == "measured";
    let label = if measured {
        format!(
            "measured (targets on {}, random weights of real shapes)",
            costs["target_device"].as_str().unwrap_or("?")
        )
    } else {
        format!(
            "roofline, not measured ({})",
            costs["profile"].as_str().unwrap_or("?")
        )
    };
    let (acc, acc_source) = acceptance(args)?;
    let window = acc.gamma + 1;
    let tree_rows = (acc.kappa * window).min(16);
    let rendezvous = costs["rendezvous_s"].as_f64().unwrap_or(20e-6);
    let base = |target: ForwardCost, draft: ForwardCost| Scenario {
        target,
        draft,
        gamma: acc.gamma,
        kappa: acc.kappa,
        eta: 1.0,
        mean_accepted: acc.mean_accepted,
        exit_fraction: acc.exit_fraction,
        rendezvous,
        fallback_frequency: (1.0 - acc.reuse).clamp(0.0, 1.0),
        schedule: TreeSchedule::Anytime {
            rows_per_pass: args.rows_per_pass,
        },
        shared_device: false,
    };
    let device_draft = &costs["drafts"]["device"];
    let cpu_draft = &costs["drafts"]["cpu"];
    let mut rows = Vec::new();
    let mut md = String::new();
    md.push_str(&format!(
        "Forward costs: **{label}**. Speeds: **projected** by the latency model (`mirror_scheduler::latency`).\n\
         Acceptance: {acc_source}: gamma {}, kappa {}, E[A] {:.2}, reuse {:.2} (FF {:.2}), exit {:.2}; \
         anytime drafting, {} rows per pass; rendezvous {:.0} us.\n\n",
        acc.gamma, acc.kappa, acc.mean_accepted, acc.reuse, 1.0 - acc.reuse, acc.exit_fraction,
        args.rows_per_pass, rendezvous * 1e6
    ));
    md.push_str("| target | draft for Mirror | t_T(1) ms | t_T(gamma+1) ms | draft step ms | target slowdown beside the draft | AR tok/s | SD draft | vanilla SD tok/s | Mirror tok/s | SD vs AR | Mirror vs AR | **Mirror vs SD** | reuse Mirror needs for 1.3x SD |\n");
    md.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let targets = costs["targets"]
        .as_object()
        .ok_or("the costs have no targets")?;
    for (name, target) in targets {
        let t_fit = fit(&target["forward_ms"], 1, window)?;
        // Vanilla SD runs target and draft in turn: its draft goes wherever a step is
        // cheaper (the GPU handle or the CPU), and Mirror is compared with that.
        let mut sd: Option<(mirror_sd::mirror_scheduler::latency::Prediction, &str, f64)> = None;
        for (draft, what) in [(device_draft, "GPU"), (cpu_draft, "CPU")] {
            if !draft.is_object() {
                continue;
            }
            let p = base(t_fit, fit(&draft["forward_ms"], 1, tree_rows)?).predict();
            if sd.is_none_or(|(best, _, _)| p.speculative > best.speculative) {
                sd = Some((p, what, cost_at(&draft["forward_ms"], 1)?));
            }
        }
        let (sd, sd_where, sd_step) = sd.ok_or("the costs have no draft")?;
        for (placement, draft, what) in [
            ("device", device_draft, "second CUDA stream"),
            ("cpu", cpu_draft, "CPU cores"),
        ] {
            if !draft.is_object() {
                continue;
            }
            let beside = &target["beside_draft"][placement];
            let t_slow = beside["target_slowdown"].as_f64().unwrap_or(1.0).max(1.0);
            let d_slow = beside["draft_slowdown"].as_f64().unwrap_or(1.0).max(1.0);
            let d_fit = fit(&draft["forward_ms"], 1, tree_rows)?;
            let scenario = base(scaled(t_fit, t_slow), scaled(d_fit, d_slow));
            let mirror = scenario.predict();
            let ar = sd.autoregressive;
            // The least tree reuse at which Mirror would reach 1.3x vanilla SD, these costs kept.
            let reuse_needed = (0..=100).map(|r| r as f64 / 100.0).find(|&r| {
                let m = Scenario {
                    fallback_frequency: 1.0 - r,
                    ..scenario
                }
                .predict()
                .mirror;
                m >= 1.3 * sd.speculative
            });
            let row = json!({
                "target": name, "mirror_draft": what,
                "target_ms_1": t_fit.time(1) * 1e3, "target_ms_window": t_fit.time(window) * 1e3,
                "draft_step_ms": d_fit.time(1) * 1e3, "sd_draft": sd_where, "sd_draft_step_ms": sd_step,
                "target_slowdown": t_slow, "draft_slowdown": d_slow,
                "ar_tok_s": ar, "sd_tok_s": sd.speculative, "mirror_tok_s": mirror.mirror,
                "sd_vs_ar": sd.speculative / ar, "mirror_vs_ar": mirror.mirror / ar,
                "mirror_vs_sd": mirror.mirror / sd.speculative,
                "reuse_needed_for_1_3x_sd": reuse_needed,
                "mirror_window_ms": {"critical": mirror.mirror_window.0 * 1e3,
                                     "draft_exposed": mirror.mirror_window.1 * 1e3,
                                     "draft_hidden": mirror.mirror_window.2 * 1e3},
            });
            md.push_str(&format!(
                "| {name} | {what} | {:.2} | {:.2} | {:.2} | {} | {:.1} | {sd_where} | {:.1} | {:.1} | {:.2}x | {:.2}x | **{:.2}x** | {} |\n",
                t_fit.time(1) * 1e3,
                t_fit.time(window) * 1e3,
                d_fit.time(1) * 1e3,
                if beside.is_object() { format!("{:.2}x", t_slow) } else { "not measured".into() },
                ar,
                sd.speculative,
                mirror.mirror,
                sd.speculative / ar,
                mirror.mirror / ar,
                mirror.mirror / sd.speculative,
                reuse_needed.map_or("none (even 1.0 is short)".to_string(), |r| format!("{r:.2}")),
            ));
            rows.push(row);
        }
    }
    md.push_str(&format!(
        "\nVanilla SD runs target and draft in turn, its draft where a step is cheaper (column `SD draft`); Mirror runs the draft beside the target, both costs scaled by the slowdowns {}.\n",
        if measured { "measured side by side" } else { "(none without a measurement: 1.0)" },
    ));
    let report = json!({
        "costs": label, "acceptance": acc_source,
        "gamma": acc.gamma, "kappa": acc.kappa, "mean_accepted": acc.mean_accepted,
        "reuse": acc.reuse, "exit_fraction": acc.exit_fraction, "rows_per_pass": args.rows_per_pass,
        "rendezvous_s": rendezvous, "rows": rows, "inputs": costs,
    });
    std::fs::create_dir_all(&args.out_dir).map_err(err)?;
    write_json(Some(&args.out_dir.join("projection.json")), &report)?;
    let md_path = args.out_dir.join("projection.md");
    std::fs::write(&md_path, &md).map_err(|e| format!("{}: {e}", md_path.display()))?;
    eprintln!("wrote {}", md_path.display());
    println!("{md}");
    Ok(report)
}
