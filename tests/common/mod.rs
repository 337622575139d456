//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod chi_square;

/// The batched engine's speculations, each with windows of up to 4 tokens: none, prompt
/// lookup, the draft model.
pub fn batched_speculations() -> [mirror_sd::mirror_scheduler::Speculation; 3] {
    use mirror_sd::mirror_scheduler::{LookupConfig, Speculation};
    [
        Speculation::None,
        Speculation::Lookup {
            lookup: LookupConfig::default(),
            gamma: 4,
        },
        Speculation::Draft {
            gamma: 4,
            greedy_draft: false,
        },
    ]
}

/// The batched engine over `target` with `draft` for the draft-model speculation, default
/// settings.
pub fn engine_with_draft(
    target: &std::sync::Arc<Model>,
    draft: &std::sync::Arc<Model>,
    tokenizer: Option<mirror_sd::mirror_core::Tokenizer>,
) -> mirror_sd::mirror_scheduler::EngineHandle {
    use mirror_sd::mirror_scheduler::{BatchSettings, EngineHandle};
    let (target, draft) = (std::sync::Arc::clone(target), std::sync::Arc::clone(draft));
    EngineHandle::spawn_with_draft(target, draft, tokenizer, BatchSettings::default())
        .expect("spawn the batched engine")
}

use std::path::PathBuf;

/// Runs candle's matmuls single-threaded in this test binary (`RAYON_NUM_THREADS=1` unless the
/// caller set it), for tests of tiny models: candle 0.11 reads the variable on every f32
/// matmul and, when it is unset, counts physical cores by parsing `/proc/cpuinfo` each time,
/// then splits a 6x32 product across threads. That costs ~10x the work itself (measured: 8.7
/// against 0.8 ms per 4-token SD generation on the 6-token pair). Call it first thing in every
/// test of the binary: the variable is set once, while the other tests wait on the `Once`, and
/// `std::env` serialises it with candle's reads.
pub fn tiny_model_threads() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            std::env::set_var("RAYON_NUM_THREADS", "1");
        }
    });
}

/// The repository root (where `models/` lives).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where a skipped real-model test leaves a line, so that `scripts/test.sh` can say in its
/// summary what did not run and why (the test runner's own summary counts a skip as a pass).
pub fn skip_log() -> PathBuf {
    repo_root().join("target").join("test-skips.log")
}

/// Fetches the pinned model `name` with `scripts/fetch_models.py`, once per test binary (the
/// other tests wait for the first); true when the script succeeded.
fn fetch_model(name: &str) -> bool {
    static FETCHED: std::sync::Mutex<Vec<(String, bool)>> = std::sync::Mutex::new(Vec::new());
    let mut fetched = FETCHED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, ok)) = fetched.iter().find(|(n, _)| n == name) {
        return *ok;
    }
    eprintln!("fetching {name}: python3 scripts/fetch_models.py {name}");
    let ok = std::process::Command::new("python3")
        .arg(repo_root().join("scripts").join("fetch_models.py"))
        .arg(name)
        .current_dir(repo_root())
        .status()
        .is_ok_and(|status| status.success());
    fetched.push((name.to_string(), ok));
    ok
}

/// Path of a pinned model file in `models/`. When it is absent and `auto_fetch` names it
/// (small models only), it is fetched first; when it is still absent, `None`, with a message
/// and a line in [`skip_log`]. Under `CI=true` a missing model is a failure, not a skip.
pub fn model_path(file: &str, fetch_name: &str, auto_fetch: bool) -> Option<PathBuf> {
    let path = repo_root().join("models").join(file);
    if path.is_file() || (auto_fetch && fetch_model(fetch_name) && path.is_file()) {
        return Some(path);
    }
    let hint = format!("python3 scripts/fetch_models.py {fetch_name}");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{} is missing under CI=true; run `{hint}`", path.display());
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    eprintln!("skipping: {} is missing; run `{hint}`", path.display());
    let line = format!("{test}: {file} is missing (`{hint}`)\n");
    if let Some(dir) = skip_log().parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(mut log) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(skip_log())
    {
        use std::io::Write;
        let _ = log.write_all(line.as_bytes());
    }
    None
}

/// SmolLM2-135M-Instruct Q4_1 (98 MB), fetched when missing.
pub fn smollm2_path() -> Option<PathBuf> {
    model_path("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2", true)
}

use std::collections::HashMap;

use mirror_core::{load_model_dir, DirFiles, LoadOptions, Model, Tensor};

/// The tiny Hugging Face fixtures written by `scripts/make_fixtures.py`.
pub const HF_FIXTURES: [&str; 5] = ["llama", "llama3_scaled", "qwen2", "qwen3", "mistral"];

/// Directory of a fixture checkpoint.
pub fn fixture_dir(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/hf").join(name)
}

/// Loads a fixture checkpoint (model only) in f32 on the CPU.
pub fn load_fixture(name: &str) -> Model {
    let files = DirFiles::local(&fixture_dir(name)).expect("fixture files");
    load_model_dir(&files, &LoadOptions::default()).unwrap_or_else(|e| panic!("load {name}: {e}"))
}

/// transformers' reference tensors for a fixture (`tokens_i`, `logits_i`, `early_exit_logits_i`).
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixture_dir(name).join("reference.safetensors"),
        &candle_core::Device::Cpu,
    )
    .expect("reference.safetensors")
}

/// Token ids of a reference sequence.
pub fn reference_tokens(reference: &HashMap<String, Tensor>, i: usize) -> Vec<u32> {
    reference[&format!("tokens_{i}")]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|t| t as u32)
        .collect()
}

/// Largest absolute elementwise difference of two tensors of equal shape; infinite when either
/// holds a NaN (a reduction with `max` would skip it and report agreement).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let flat = |t: &Tensor| {
        t.to_dtype(candle_core::DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    max_abs_diff_slices(&flat(a), &flat(b))
}

/// Largest `|a_i - b_i|` of two slices of equal length; infinite when either holds a NaN or the
/// two hold infinities that do not match.
pub fn max_abs_diff_slices(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).fold(0.0f32, |worst, (x, y)| {
        let d = if x == y { 0.0 } else { (x - y).abs() };
        if d.is_nan() {
            f32::INFINITY
        } else {
            worst.max(d)
        }
    })
}

/// Writes a random llama/qwen2/qwen3 checkpoint (config.json + model.safetensors) into `dir` and
/// loads it: a tiny model of any vocabulary size for strategy tests.
pub fn random_model(
    dir: &std::path::Path,
    model_type: &str,
    vocab: usize,
    layers: usize,
    seed: u64,
) -> Model {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let (hidden, inter, heads, kv_heads) = (32usize, 64usize, 4usize, 2usize);
    let head_dim = hidden / heads;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut random = |shape: &[usize], scale: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| offset + scale * (rng.random::<f32>() * 2.0 - 1.0))
            .collect();
        Tensor::from_vec(data, shape, &candle_core::Device::Cpu).unwrap()
    };
    let mut w: HashMap<String, Tensor> = HashMap::new();
    let lin = |out: usize, inp: usize| (vec![out, inp], 2.0 / (inp as f32).sqrt());
    w.insert(
        "model.embed_tokens.weight".into(),
        random(&[vocab, hidden], 1.0, 0.0),
    );
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        w.insert(
            format!("{p}.input_layernorm.weight"),
            random(&[hidden], 0.2, 1.0),
        );
        w.insert(
            format!("{p}.post_attention_layernorm.weight"),
            random(&[hidden], 0.2, 1.0),
        );
        for (name, out) in [
            ("q_proj", heads * head_dim),
            ("k_proj", kv_heads * head_dim),
            ("v_proj", kv_heads * head_dim),
        ] {
            let (shape, scale) = lin(out, hidden);
            w.insert(
                format!("{p}.self_attn.{name}.weight"),
                random(&shape, scale, 0.0),
            );
            if model_type == "qwen2" {
                w.insert(
                    format!("{p}.self_attn.{name}.bias"),
                    random(&[out], 0.2, 0.0),
                );
            }
        }
        if model_type == "qwen3" {
            w.insert(
                format!("{p}.self_attn.q_norm.weight"),
                random(&[head_dim], 0.2, 1.0),
            );
            w.insert(
                format!("{p}.self_attn.k_norm.weight"),
                random(&[head_dim], 0.2, 1.0),
            );
        }
        let (shape, scale) = lin(hidden, heads * head_dim);
        w.insert(
            format!("{p}.self_attn.o_proj.weight"),
            random(&shape, scale, 0.0),
        );
        for (name, out, inp) in [
            ("gate_proj", inter, hidden),
            ("up_proj", inter, hidden),
            ("down_proj", hidden, inter),
        ] {
            let (shape, scale) = lin(out, inp);
            w.insert(format!("{p}.mlp.{name}.weight"), random(&shape, scale, 0.0));
        }
    }
    w.insert("model.norm.weight".into(), random(&[hidden], 0.2, 1.0));
    let (shape, scale) = lin(vocab, hidden);
    w.insert("lm_head.weight".into(), random(&shape, 2.0 * scale, 0.0));
    let config = serde_json::json!({
        "model_type": model_type, "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 512, "tie_word_embeddings": false
    });
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    load_model_dir(&DirFiles::local(dir).unwrap(), &LoadOptions::default()).unwrap()
}

/// Lookahead parameters drawn uniformly (seeded): lookahead rows that propose something, mostly
/// wrong.
pub fn random_head(
    config: mirror_core::LookaheadConfig,
    hidden: usize,
    seed: u64,
) -> mirror_core::LookaheadHead {
    random_head_scaled(config, hidden, seed, 0.5)
}

/// [`random_head`] with lookahead embeddings of scale `embedding_scale` (larger: lookahead
/// distributions further from the main row's).
pub fn random_head_scaled(
    config: mirror_core::LookaheadConfig,
    hidden: usize,
    seed: u64,
    embedding_scale: f32,
) -> mirror_core::LookaheadHead {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(seed);
    let mut random = |shape: (usize, usize), scale: f32| {
        let data: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| scale * (rng.random::<f32>() * 2.0 - 1.0))
            .collect();
        Tensor::from_vec(data, shape, &candle_core::Device::Cpu).unwrap()
    };
    let (r, s) = (config.rank, config.tokens);
    mirror_core::LookaheadHead::from_tensors(
        config,
        random((r, hidden), 0.3),
        random((hidden, r), 0.3),
        random((s, hidden), embedding_scale),
    )
    .unwrap()
}

/// A tree of tokens for tests, in topological order: every node's parent comes before it; roots attach to
/// the end of the cached prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenTree {
    tokens: Vec<u32>,
    parents: Vec<Option<usize>>,
    depths: Vec<usize>,
}

impl TokenTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a node and returns its index. `parent` must be an existing node.
    pub fn push(&mut self, token: u32, parent: Option<usize>) -> Result<usize, String> {
        let depth = match parent {
            None => 0,
            Some(p) if p < self.tokens.len() => self.depths[p] + 1,
            Some(p) => {
                return Err(format!(
                    "parent {p} does not exist in a tree of {} nodes",
                    self.tokens.len()
                ))
            }
        };
        self.tokens.push(token);
        self.parents.push(parent);
        self.depths.push(depth);
        Ok(self.tokens.len() - 1)
    }

    /// Adds a chain of tokens under `parent`, returning the index of its last node.
    pub fn push_path(
        &mut self,
        tokens: &[u32],
        mut parent: Option<usize>,
    ) -> Result<Option<usize>, String> {
        for &t in tokens {
            parent = Some(self.push(t, parent)?);
        }
        Ok(parent)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// True for a tree without nodes.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Node tokens in order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Parent of a node.
    pub fn parent(&self, node: usize) -> Option<usize> {
        self.parents[node]
    }

    /// Depth of a node (roots are 0).
    pub fn depth(&self, node: usize) -> usize {
        self.depths[node]
    }

    /// Node indices from the root down to `node`, inclusive.
    pub fn path_to(&self, node: usize) -> Vec<usize> {
        let mut path = vec![node];
        let mut current = node;
        while let Some(p) = self.parents[current] {
            path.push(p);
            current = p;
        }
        path.reverse();
        path
    }

    /// The attention input of a pass over the tree after `prefix_len` cached positions: node
    /// `i` sees the prefix, its ancestors and itself, never its siblings; its position is
    /// `prefix_len + depth` (an independent construction of what the draft builds row by row).
    pub fn attention_input(
        &self,
        prefix_len: usize,
        device: &mirror_core::Device,
    ) -> mirror_core::Result<mirror_core::AttentionInput> {
        let rows: Vec<mirror_core::RowVisibility> = (0..self.len())
            .map(|i| mirror_core::RowVisibility {
                position: prefix_len + self.depth(i),
                prefix_len,
                extra: self
                    .path_to(i)
                    .into_iter()
                    .map(|n| prefix_len + n)
                    .collect(),
            })
            .collect();
        mirror_core::AttentionInput::from_rows(&rows, prefix_len + self.len(), device)
    }

    /// Nodes without children.
    pub fn leaves(&self) -> Vec<usize> {
        let mut has_child = vec![false; self.len()];
        for p in self.parents.iter().flatten() {
            has_child[*p] = true;
        }
        (0..self.len()).filter(|&i| !has_child[i]).collect()
    }
}
