//! Setup shared by the examples: devices, the default model pair, loading with a spinner.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use mirror_sd::mirror_core::{
    load, threads, DType, Device, LoadOptions, LoadedModel, Model, ModelSource, ThreadPlacement,
    WeightFormat,
};
use mirror_sd::mirror_scheduler::{
    DraftSchedule, EarlyExit, LookupConfig, MirrorSettings, SpeculativeSettings, WindowPolicy,
    DEFAULT_BRANCHES_PER_PASS,
};

/// The default target and draft (Qwen2.5-Coder 1.5B and 0.5B, GGUF, run as stored).
pub const DEFAULT_TARGET: &str = "models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf";
pub const DEFAULT_DRAFT: &str = "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Resolves a model argument; the default pair's files are fetched when missing.
pub fn resolve_source(arg: &str) -> Result<ModelSource, String> {
    let is_default = arg == DEFAULT_TARGET || arg == DEFAULT_DRAFT;
    let local = repo_root().join(arg);
    if is_default {
        if !local.is_file() {
            eprintln!(
                "{} is missing: fetching the default pair (about 1.6 GB)...",
                local.display()
            );
            let status = Command::new("python3")
                .arg(repo_root().join("scripts/fetch_models.py"))
                .arg("qwen")
                .status()
                .map_err(|e| format!("cannot run python3 scripts/fetch_models.py: {e}"))?;
            if !status.success() {
                return Err("fetching the default models failed (see above)".into());
            }
        }
        return Ok(ModelSource::Gguf(local));
    }
    ModelSource::parse(arg).map_err(|e| e.to_string())
}

/// `cpu`, `cuda` / `cuda:N` (a handle with its own stream), or `metal` / `metal:N`.
pub fn parse_device(name: &str) -> Result<Device, String> {
    let (kind, ordinal) = match name.split_once(':') {
        Some((k, n)) => (
            k,
            n.parse::<usize>()
                .map_err(|_| format!("bad device ordinal in `{name}`"))?,
        ),
        None => (name, 0),
    };
    match kind {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda_with_stream(ordinal).map_err(|e| {
            if cfg!(feature = "cuda") {
                format!("{name}: {e}")
            } else {
                format!("{name}: {e} (build with --features cuda)")
            }
        }),
        "metal" => Device::new_metal(ordinal)
            .map_err(|e| format!("{name}: {e} (build with --features metal)")),
        other => Err(format!("unknown device `{other}` (cpu, cuda:N, metal:N)")),
    }
}

/// `as-stored` (default), `float`, or a GGML type to quantize to at load (`q8_0`, `q4_k`, ...).
pub fn parse_weights(text: &str) -> Result<WeightFormat, String> {
    WeightFormat::parse(text).map_err(|e| e.to_string())
}

/// Load options from the examples' flags: weight format, KV cache dtype, device, threads or
/// pinned cores.
pub fn load_options(
    weights: &str,
    kv_dtype: KvDtypeArg,
    device: &Device,
    threads: Option<usize>,
    cores: Option<Vec<usize>>,
) -> Result<LoadOptions, String> {
    Ok(LoadOptions {
        weights: parse_weights(weights)?,
        dtype: DType::F32,
        kv_dtype: Some(kv_dtype.dtype()),
        device: device.clone(),
        placement: ThreadPlacement { threads, cores },
    })
}

/// The model flags every example shares.
#[derive(clap::Args, Debug, Clone)]
pub struct PairArgs {
    /// Target: a model directory, a .gguf file, or a hub id (org/name or org/name:file.gguf).
    #[arg(long, default_value = DEFAULT_TARGET)]
    pub target: String,
    /// Draft, in the same forms as the target.
    #[arg(long, default_value = DEFAULT_DRAFT)]
    pub draft: String,
    /// Weight format: as-stored (GGUF stays quantized), float, or a GGML type to quantize to
    /// at load (q8_0, q4_k, ...).
    #[arg(long, default_value = "as-stored")]
    pub weights: String,
    /// Weight format of the draft (default: --weights).
    #[arg(long)]
    pub draft_weights: Option<String>,
    /// What both models' KV caches store keys and values as: f32, or f16 for half the bytes
    /// (long contexts and large batches decode faster; outputs differ from an f32 cache's).
    #[arg(long, value_enum, default_value = "f32")]
    pub kv_dtype: KvDtypeArg,
}

/// `--kv-dtype`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtypeArg {
    F32,
    F16,
}

impl KvDtypeArg {
    pub fn dtype(self) -> DType {
        match self {
            KvDtypeArg::F32 => DType::F32,
            KvDtypeArg::F16 => DType::F16,
        }
    }
}

/// Where each model runs: devices, CPU threads and core pinning (`generate`, `serve`).
#[derive(clap::Args, Debug, Clone)]
pub struct PlacementArgs {
    /// Target device: cpu, cuda:N, metal:N.
    #[arg(long, default_value = "cpu")]
    pub target_device: String,
    /// Draft device (a second handle: another GPU, another CUDA stream, or the CPU).
    #[arg(long, default_value = "cpu")]
    pub draft_device: String,
    /// CPU threads of the target's own pool (default: every core, or Mirror's share of them).
    #[arg(long)]
    pub target_threads: Option<usize>,
    /// CPU threads of the draft's own pool (default: as the target, or Mirror's share).
    #[arg(long)]
    pub draft_threads: Option<usize>,
    /// Do not pin target and draft to disjoint cores (pinned by default when Mirror runs).
    #[arg(long)]
    pub no_pin: bool,
}

impl PlacementArgs {
    /// Target and draft load options. Thread policy (`mirror_core::threads`): one model at a
    /// time (ar, sd) uses every core; models that run `side_by_side` (Mirror) get disjoint,
    /// pinned cores, unless their threads are given or `--no-pin`.
    pub fn load_options(
        &self,
        pair: &PairArgs,
        side_by_side: bool,
    ) -> Result<(LoadOptions, LoadOptions), String> {
        let (target_cores, draft_cores) = if side_by_side && !self.no_pin {
            let (t, d) = threads::split_cores(&threads::available_cores());
            (
                self.target_threads.is_none().then_some(t),
                self.draft_threads.is_none().then_some(d),
            )
        } else {
            (None, None)
        };
        Ok((
            load_options(
                &pair.weights,
                pair.kv_dtype,
                &parse_device(&self.target_device)?,
                self.target_threads,
                target_cores,
            )?,
            load_options(
                pair.draft_weights(),
                pair.kv_dtype,
                &parse_device(&self.draft_device)?,
                self.draft_threads,
                draft_cores,
            )?,
        ))
    }
}

impl PairArgs {
    /// The draft's weight format.
    pub fn draft_weights(&self) -> &str {
        self.draft_weights.as_deref().unwrap_or(&self.weights)
    }

    /// Target and draft options, unpinned, on `device`.
    pub fn options(&self, device: &Device) -> Result<(LoadOptions, LoadOptions), String> {
        Ok((
            self.target_options(device, None)?,
            self.draft_options(device, None)?,
        ))
    }

    /// The target's options, unpinned, on `device` with `threads`.
    pub fn target_options(
        &self,
        device: &Device,
        threads: Option<usize>,
    ) -> Result<LoadOptions, String> {
        load_options(&self.weights, self.kv_dtype, device, threads, None)
    }

    /// The draft's options, unpinned, on `device` with `threads`.
    pub fn draft_options(
        &self,
        device: &Device,
        threads: Option<usize>,
    ) -> Result<LoadOptions, String> {
        load_options(self.draft_weights(), self.kv_dtype, device, threads, None)
    }
}

/// How windows are sized.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowArg {
    /// Each window's length (0 = a plain step) from measured costs and acceptance.
    Adaptive,
    /// Always gamma draft tokens.
    Fixed,
}

impl WindowArg {
    pub fn policy(self) -> WindowPolicy {
        match self {
            WindowArg::Adaptive => WindowPolicy::Adaptive,
            WindowArg::Fixed => WindowPolicy::Fixed,
        }
    }
}

/// How Mirror's draft covers its hypothesis tree.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Branches by likelihood until the target is done (default).
    Anytime,
    /// The paper's full kappa x (gamma+1) grid.
    Full,
}

/// Mirror's flags (`generate`, `serve`); their defaults are [`MirrorSettings::default`]'s.
#[derive(clap::Args, Debug, Clone)]
pub struct MirrorArgs {
    /// Early-exit candidates per row (Mirror).
    #[arg(long, default_value_t = MirrorSettings::default().kappa)]
    pub kappa: usize,
    /// Early-exit layer index (Mirror); default: --exit-fraction.
    #[arg(long)]
    pub exit_layer: Option<usize>,
    /// Early-exit layer as a fraction of the target's depth.
    #[arg(long, default_value_t = 0.5)]
    pub exit_fraction: f64,
    #[arg(long, value_enum, default_value_t = Schedule::Anytime)]
    pub schedule: Schedule,
    /// Branches advanced per draft pass in anytime mode.
    #[arg(long, default_value_t = DEFAULT_BRANCHES_PER_PASS)]
    pub branches_per_pass: usize,
}

impl MirrorArgs {
    /// The early-exit layer: `--exit-layer`, else `--exit-fraction`.
    pub fn early_exit(&self) -> EarlyExit {
        match self.exit_layer {
            Some(layer) => EarlyExit::Layer(layer),
            None => EarlyExit::Fraction(self.exit_fraction),
        }
    }

    /// The draft's schedule over the tree.
    pub fn schedule(&self) -> DraftSchedule {
        match self.schedule {
            Schedule::Anytime => DraftSchedule::Anytime {
                branches_per_pass: self.branches_per_pass,
            },
            Schedule::Full => DraftSchedule::FullGrid,
        }
    }

    /// Mirror's settings: these flags over `speculative`.
    pub fn settings(&self, speculative: SpeculativeSettings) -> MirrorSettings {
        MirrorSettings {
            speculative,
            kappa: self.kappa,
            early_exit: self.early_exit(),
            schedule: self.schedule(),
            ..MirrorSettings::default()
        }
    }
}

/// The drafting flags the speculative examples share; their defaults are
/// [`SpeculativeSettings::default`]'s.
#[derive(clap::Args, Debug, Clone)]
pub struct DraftArgs {
    /// Draft tokens per window (the most an adaptive window proposes).
    #[arg(long, default_value_t = SpeculativeSettings::default().gamma)]
    pub gamma: usize,
    /// Window lengths: adaptive, or fixed at gamma.
    #[arg(long, value_enum, default_value_t = WindowArg::Adaptive)]
    pub window: WindowArg,
    /// Try prompt lookup (matches in the prompt and the output so far) before the draft model.
    #[arg(long)]
    pub lookup: bool,
    /// Under sampling, let the draft propose its argmax instead of sampling.
    #[arg(long)]
    pub greedy_draft: bool,
    /// With --draft-lookahead: propose a lookahead token only when its top probability reaches
    /// this.
    #[arg(long, default_value_t = SpeculativeSettings::default().lookahead_confidence)]
    pub lookahead_confidence: f32,
}

impl DraftArgs {
    /// The settings these flags describe.
    pub fn settings(&self) -> SpeculativeSettings {
        SpeculativeSettings {
            gamma: self.gamma,
            greedy_draft: self.greedy_draft,
            lookahead_confidence: self.lookahead_confidence,
            lookup: self.lookup.then(LookupConfig::default),
            window: self.window.policy(),
        }
    }
}

/// Loads a model with a spinner on stderr.
pub fn load_with_spinner(
    what: &str,
    source: &ModelSource,
    options: &LoadOptions,
) -> Result<LoadedModel, String> {
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message(format!("loading {what}: {source}"));
    spinner.enable_steady_tick(Duration::from_millis(120));
    let started = std::time::Instant::now();
    let loaded = load(source, options).map_err(|e| format!("loading {what}: {e}"))?;
    spinner.finish_with_message(format!(
        "loaded {what}: {} layers, d={}, vocab {} in {:.1} s; {}",
        loaded.model.num_layers(),
        loaded.model.hidden_size(),
        loaded.model.vocab_size(),
        started.elapsed().as_secs_f64(),
        loaded.model.weight_report().summary()
    ));
    Ok(loaded)
}

/// The draft with its LM head over its `vocab` most frequent tokens and its end-of-sequence
/// tokens (`--draft-vocab`; 0 keeps the whole vocabulary): the first `vocab` ids of `ranking`
/// (a file of token ids, most frequent first, one per line), or else ids `0..vocab`.
/// Lossless whatever the tokens (see `Model::with_head_tokens`); only the acceptance can drop.
pub fn partial_draft_head(
    draft: &Model,
    tokenizer: &mirror_sd::mirror_core::Tokenizer,
    vocab: usize,
    ranking: Option<&Path>,
) -> Result<Model, String> {
    if vocab == 0 || vocab >= draft.vocab_size() {
        return Ok(draft.clone());
    }
    let mut tokens: Vec<u32> = match ranking {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--draft-vocab-ranking {}: {e}", path.display()))?;
            (text.lines().take(vocab))
                .map(|line| line.trim().parse::<u32>())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("--draft-vocab-ranking {}: {e}", path.display()))?
        }
        None => (0..vocab as u32).collect(),
    };
    tokens.extend_from_slice(tokenizer.eos_ids());
    let model = draft
        .with_head_tokens(&tokens)
        .map_err(|e| format!("--draft-vocab {vocab}: {e}"))?;
    eprintln!(
        "draft LM head over {} of {} tokens",
        model.head_tokens(),
        model.vocab_size()
    );
    Ok(model)
}

/// The draft: a separate model, or the target's own first `layers` layers (self-speculation).
/// A separate draft's tokenizer is checked against `target_tokenizer` id by id.
pub fn draft_model(
    draft: &str,
    self_draft_layers: Option<usize>,
    target: &Arc<Model>,
    target_tokenizer: Option<&mirror_sd::mirror_core::Tokenizer>,
    options: &LoadOptions,
) -> Result<Arc<Model>, String> {
    if let Some(layers) = self_draft_layers {
        return target
            .truncated(layers)
            .map(Arc::new)
            .map_err(|e| e.to_string());
    }
    let source = resolve_source(draft)?;
    let loaded = load_with_spinner("draft", &source, options)?;
    if let Some(target_tokenizer) = target_tokenizer {
        mirror_sd::mirror_scheduler::check_tokenizers(target_tokenizer, &loaded.tokenizer)
            .map_err(|e| e.to_string())?;
    }
    Ok(Arc::new(loaded.model))
}

/// `draft` with the lookahead tokens of the checkpoint at `path` attached (weights shared).
pub fn attach_lookahead(draft: &Arc<Model>, path: &Path) -> Result<Arc<Model>, String> {
    let head = mirror_sd::mirror_core::LookaheadHead::load(path, draft.dtype(), draft.device())
        .map_err(|e| format!("draft lookahead: {e}"))?;
    eprintln!(
        "draft lookahead: {:?} from {}",
        head.config(),
        path.display()
    );
    draft
        .with_lookahead(Arc::new(head))
        .map(Arc::new)
        .map_err(|e| format!("draft lookahead: {e}"))
}

/// Which draft model `generate` and `serve` run: `--draft` (from [`PairArgs`]) or the
/// target's own first layers, with lookahead tokens or without.
#[derive(clap::Args, Debug, Clone)]
pub struct DraftModelArgs {
    /// Use the target's own first N layers as the draft instead of --draft.
    #[arg(long)]
    pub self_draft_layers: Option<usize>,
    /// Speculative-lookahead checkpoint for the draft: it then proposes 1 + S tokens a step.
    #[arg(long)]
    pub draft_lookahead: Option<PathBuf>,
    #[command(flatten)]
    pub vocab: DraftVocabArgs,
}

/// The draft's LM head over part of the vocabulary (`Model::with_head_tokens`).
#[derive(clap::Args, Debug, Clone)]
pub struct DraftVocabArgs {
    /// The draft's LM head computes the logits of N tokens only (and of its end-of-sequence
    /// tokens): lossless, a cheaper draft forward, and proposals only among those tokens
    /// (0: the whole vocabulary).
    #[arg(long, default_value_t = 0)]
    pub draft_vocab: usize,
    /// Token ids most frequent first, one per line (the `draft_vocab` example writes them from
    /// a corpus): --draft-vocab keeps the first N (default: ids 0..N, the merge order).
    #[arg(long)]
    pub draft_vocab_ranking: Option<PathBuf>,
}

impl DraftVocabArgs {
    /// `draft` with its LM head cut as these flags say (see [`partial_draft_head`]).
    pub fn apply(
        &self,
        draft: &Model,
        tokenizer: &mirror_sd::mirror_core::Tokenizer,
    ) -> Result<Model, String> {
        partial_draft_head(
            draft,
            tokenizer,
            self.draft_vocab,
            self.draft_vocab_ranking.as_deref(),
        )
    }
}

impl DraftModelArgs {
    /// Loads the draft these flags and `pair` name (see [`draft_model`]) and attaches the
    /// lookahead checkpoint, if any.
    pub fn load(
        &self,
        pair: &PairArgs,
        target: &Arc<Model>,
        target_tokenizer: &mirror_sd::mirror_core::Tokenizer,
        options: &LoadOptions,
    ) -> Result<Arc<Model>, String> {
        let draft = draft_model(
            &pair.draft,
            self.self_draft_layers,
            target,
            Some(target_tokenizer),
            options,
        )?;
        let draft = match &self.draft_lookahead {
            Some(path) => attach_lookahead(&draft, path)?,
            None => draft,
        };
        Ok(Arc::new(self.vocab.apply(&draft, target_tokenizer)?))
    }
}

/// Reads the prompt suite (`{"id", "category", "messages"}` per line).
pub fn read_prompts(
    path: &Path,
) -> Result<Vec<(String, String, Vec<mirror_sd::mirror_core::ChatMessage>)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format!("{}: {e}", path.display()))?;
            let id = v["id"].as_str().unwrap_or("?").to_string();
            let category = v["category"].as_str().unwrap_or("?").to_string();
            let messages =
                serde_json::from_value(v["messages"].clone()).map_err(|e| format!("{id}: {e}"))?;
            Ok((id, category, messages))
        })
        .collect()
}

/// The CPU's model name and its vector flags that the kernels care about, from `/proc/cpuinfo`
/// (benchmarks print it beside every figure).
pub fn cpu_description() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = field("flags");
    let vector: Vec<&str> = flags
        .split_whitespace()
        .filter(|f| f.starts_with("avx") || *f == "fma" || *f == "f16c")
        .collect();
    let cores = info.lines().filter(|l| l.starts_with("processor")).count();
    format!(
        "{} ({cores} cores; {})",
        field("model name"),
        vector.join(" ")
    )
}

/// The median of `values` (the upper one of an even count; 0 for none).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}
