//! The decoder shared by every supported architecture: pre-norm blocks of grouped-query attention
//! with RoPE and a SwiGLU MLP (Touvron et al., "LLaMA", arXiv 2302.13971; Ainslie et al., "GQA",
//! arXiv 2305.13245), exposed layer by layer so a scheduler can tap any depth.
//!
//! The model knows nothing of decoding: it embeds tokens, runs a range of layers over hidden states
//! with explicit positions and mask, and maps any rows of any layer's states to logits through its
//! own final norm and LM head (after layer `l` that is the early-exit tap of Mirror-SD).

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::RmsNorm;

use super::layers::{DecoderLayer, Kernels};
use super::linear::{Embedding, Linear};
use super::loader::WeightLoader;
use super::lookahead::LookaheadHead;
use super::partial_head::PartialHead;
use super::rope::Rope;
use crate::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::mask::AttentionInput;
use crate::threads::{self, ThreadPlacement};
use crate::weights::{WeightFormat, WeightReport, WeightSource};

/// A decoder-only language model with weights behind `&self` (share it across threads with an
/// `Arc`) and all mutable state in a [`KvCache`] passed as `&mut`. Cloning shares the weights.
#[derive(Clone)]
pub struct Model {
    config: ModelConfig,
    architecture: Architecture,
    embed_tokens: Embedding,
    pub(crate) layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    /// Set by [`Model::with_head_tokens`]: the head over some tokens only (decoding's logits;
    /// training reads the full head).
    partial_head: Option<Arc<PartialHead>>,
    pub(crate) rope: Rope,
    dtype: DType,
    /// What new KV caches store keys and values as (see [`Model::with_kv_dtype`]).
    kv_dtype: DType,
    pub(crate) device: Device,
    pool: Option<Arc<rayon::ThreadPool>>,
    pub(crate) lookahead: Option<Arc<LookaheadHead>>,
    weights: Arc<WeightReport>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("architecture", &self.architecture)
            .field("layers", &self.layers.len())
            .field("hidden_size", &self.config.hidden_size)
            .field("vocab_size", &self.config.vocab_size)
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .field("lookahead", &self.lookahead.as_ref().map(|s| s.config()))
            .finish()
    }
}

impl Model {
    /// Builds the model from a weight source: weight matrices kept in `format`, activations and
    /// float weights in `dtype`, on `device`; it runs in the caller's rayon pool (see
    /// [`Model::with_placement`]). Every tensor's shape is checked against `config` and a
    /// mismatch names the tensor and the file. What happened to each weight matrix is in
    /// [`Model::weight_report`].
    pub fn load(
        config: ModelConfig,
        source: &dyn WeightSource,
        format: WeightFormat,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let source_name = source.path().display().to_string();
        config.validate(&source_name)?;
        let architecture = Architecture::parse(&config.model_type, &source_name)?;
        let loader = WeightLoader::new(source, format, dtype, device)?;
        let hidden = config.hidden_size;
        let embed_tokens =
            loader.embedding("model.embed_tokens.weight", config.vocab_size, hidden)?;
        // Collected through `Result`, the layers allocate as they load: a corrupt config's
        // count fails on the first missing layer, not on an allocation for 2^40 layers.
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::load(&loader.scope(&format!("model.layers.{i}")), &config))
            .collect::<Result<Vec<_>>>()?;
        let norm = loader
            .scope("model")
            .norm("norm", hidden, config.rms_norm_eps)?;
        let lm_head = if config.tie_word_embeddings {
            Linear::new(embed_tokens.table().clone(), None)
        } else {
            loader.linear("lm_head", config.vocab_size, hidden, false)?
        };
        let rope = Rope::new(&config, dtype, device)?;
        let weights = Arc::new(loader.into_report());
        if !weights.converted().is_empty() {
            log::info!("{}: {}", source_name, weights.summary());
        }
        Ok(Self {
            embed_tokens,
            architecture,
            layers,
            norm,
            lm_head,
            partial_head: None,
            rope,
            dtype,
            kv_dtype: dtype,
            device: device.clone(),
            pool: None,
            lookahead: None,
            weights,
            config,
        })
    }

    /// What loading did with every weight matrix: stored and used types, bytes.
    pub fn weight_report(&self) -> &WeightReport {
        &self.weights
    }

    /// A model made of this model's first `layers` layers, its final norm and LM head, sharing
    /// their weights (no copy): a self-speculative draft (Elhoushi et al., "LayerSkip",
    /// arXiv 2404.16710) with the target's vocabulary by construction.
    pub fn truncated(&self, layers: usize) -> Result<Self> {
        if layers == 0 || layers > self.num_layers() {
            return Err(Error::invalid(format!(
                "a truncated model needs 1..={} layers, got {layers}",
                self.num_layers()
            )));
        }
        let mut config = self.config.clone();
        config.num_hidden_layers = layers;
        // Lookahead rows belong to the top layers of the full model.
        config.lookahead = None;
        Ok(Self {
            config,
            architecture: self.architecture,
            embed_tokens: self.embed_tokens.clone(),
            layers: self.layers[..layers].to_vec(),
            norm: self.norm.clone(),
            lm_head: self.lm_head.clone(),
            partial_head: self.partial_head.clone(),
            rope: self.rope.clone(),
            dtype: self.dtype,
            kv_dtype: self.kv_dtype,
            device: self.device.clone(),
            pool: self.pool.clone(),
            lookahead: None,
            weights: Arc::clone(&self.weights),
        })
    }

    /// This model (the other weights shared) with an LM head that computes the logits of
    /// `tokens` only (a copy of those rows of the head); every other token's logit is negative
    /// infinity. For a draft model: its forward reads far fewer bytes, and it proposes only
    /// tokens it can score (FR-Spec, see `partial_head`). Verification stays exact whatever the
    /// draft proposes, so the target's output does not change; only the acceptance rate can.
    /// Needs packed head weights (GGUF or quantized on the CPU).
    pub fn with_head_tokens(&self, tokens: &[u32]) -> Result<Self> {
        if tokens.is_empty() {
            return Err(Error::invalid("a partial LM head needs at least one token"));
        }
        let mut model = self.clone();
        model.partial_head = Some(Arc::new(PartialHead::new(&self.lm_head, tokens)?));
        Ok(model)
    }

    /// Tokens the LM head computes logits for: the vocabulary, or fewer after
    /// [`Model::with_head_tokens`].
    pub fn head_tokens(&self) -> usize {
        self.partial_head
            .as_ref()
            .map_or(self.vocab_size(), |head| head.computed_tokens())
    }

    /// This model (weights shared, no copy) with lookahead parameters attached
    /// (Bhendawade et al., "Speculative Streaming", arXiv 2402.11131): a draft that proposes
    /// `1 + S` tokens per forward. The main row is unchanged.
    pub fn with_lookahead(&self, head: Arc<LookaheadHead>) -> Result<Self> {
        head.check_fits(self.hidden_size(), self.num_layers())?;
        if let Some(declared) = &self.config.lookahead {
            if declared != head.config() {
                return Err(Error::invalid(format!(
                    "the model's config declares lookahead {declared:?} but the lookahead weights are {:?}",
                    head.config()
                )));
            }
        }
        let mut model = self.truncated(self.num_layers())?;
        model.config = self.config.clone();
        model.config.lookahead = Some(head.config().clone());
        model.lookahead = Some(head);
        Ok(model)
    }

    /// This model without lookahead parameters (weights shared): a plain one-token-per-step model.
    pub fn without_lookahead(&self) -> Result<Self> {
        let mut model = self.truncated(self.num_layers())?;
        model.config.lookahead = None;
        Ok(model)
    }

    /// The attached lookahead tokens, if any.
    pub fn lookahead(&self) -> Option<&Arc<LookaheadHead>> {
        self.lookahead.as_ref()
    }

    /// Confines this model's CPU work to `pool` (gemm and candle's parallel ops run in the
    /// current rayon pool), so two models can run side by side without oversubscribing cores.
    pub fn with_thread_pool(mut self, pool: Arc<rayon::ThreadPool>) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Runs this model where `placement` says: in a new pool of its own (see
    /// [`Model::with_thread_pool`]), or unchanged for the default placement.
    pub fn with_placement(self, placement: &ThreadPlacement) -> Result<Self> {
        Ok(match placement.build_pool("mirror-model")? {
            Some(pool) => self.with_thread_pool(pool),
            None => self,
        })
    }

    /// Confines this model to a new pool of `threads` threads (see [`Model::with_thread_pool`]).
    pub fn with_threads(self, threads: usize) -> Result<Self> {
        self.with_placement(&ThreadPlacement {
            threads: Some(threads),
            cores: None,
        })
    }

    /// Confines this model to a new pool with one thread per core of `cores`, each pinned to
    /// those cores (Linux), so that models pinned to disjoint cores never compete for one.
    pub fn with_cores(self, cores: &[usize]) -> Result<Self> {
        self.with_placement(&ThreadPlacement {
            threads: None,
            cores: Some(cores.to_vec()),
        })
    }

    /// Threads of the model's own pool, or `None` when it runs in the caller's rayon pool.
    pub fn threads(&self) -> Option<usize> {
        self.pool.as_ref().map(|p| p.current_num_threads())
    }

    /// Runs `f`, the model's work on `rows` activation rows, in the model's pool (see
    /// [`threads::with_pool_awake`] for why few rows keep the pool's threads polling).
    pub(crate) fn run<T: Send>(
        &self,
        rows: usize,
        f: impl FnOnce() -> Result<T> + Send,
    ) -> Result<T> {
        let f = || threads::with_pool_awake(rows, f);
        match &self.pool {
            Some(pool) => pool.install(f),
            None => threads::in_current_pool(f),
        }
    }

    /// The config the model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The architecture.
    pub fn architecture(&self) -> Architecture {
        self.architecture
    }

    /// Number of decoder layers `N`.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Width of the hidden states.
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Rows of the LM head.
    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// What new KV caches store keys and values as: the activations' dtype unless
    /// [`Model::with_kv_dtype`] chose another.
    pub fn kv_dtype(&self) -> DType {
        self.kv_dtype
    }

    /// This model with KV caches that store keys and values as `dtype`: f16 halves the bytes
    /// each cached token holds and each attention step reads (on the CPU, where long contexts
    /// make decoding wait on them), at the cost of rounding every key and value to f16 once,
    /// when cached. Every path (alone, in a window, in a tree, in a batch) reads the same
    /// rounded rows, so greedy speculative output stays identical to this model's plain
    /// decoding; it is not identical to the same model with an f32 cache. Only f32, f16 and
    /// the activations' dtype are accepted.
    pub fn with_kv_dtype(mut self, dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F16) && dtype != self.dtype {
            return Err(Error::invalid(format!(
                "a KV cache stores f32, f16 or the activations' dtype ({:?}), not {dtype:?}",
                self.dtype
            )));
        }
        self.kv_dtype = dtype;
        Ok(self)
    }

    /// Longest context: the position table, capped by the config's context limit.
    pub fn context_limit(&self) -> usize {
        self.config.context_limit().min(self.rope.max_positions())
    }

    /// A KV cache for `batch` rows of `capacity` cached tokens each. Capacity counts cache rows,
    /// not positions: a token tree can hold more rows than the deepest position it reaches.
    /// Positions past [`Model::context_limit`] are refused by the forward passes.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        KvCache::new(
            self.num_layers(),
            batch,
            self.config.num_kv_heads(),
            self.config.head_dim(),
            capacity,
            self.kv_dtype,
            &self.device,
        )
    }

    /// Embeds rows of equal length: `(batch, tokens, hidden)`.
    pub fn embed(&self, rows: &[&[u32]]) -> Result<Tensor> {
        let batch = rows.len();
        let tokens = rows.first().map_or(0, |r| r.len());
        if batch == 0 || tokens == 0 || rows.iter().any(|r| r.len() != tokens) {
            return Err(Error::invalid(
                "embed needs at least one row, all rows non-empty and of equal length",
            ));
        }
        let vocab = self.vocab_size();
        let mut ids = Vec::with_capacity(batch * tokens);
        for &token in rows.iter().flat_map(|r| r.iter()) {
            if token as usize >= vocab {
                return Err(Error::TokenOutOfRange {
                    token,
                    vocab_size: vocab,
                });
            }
            ids.push(token);
        }
        self.run(ids.len(), || self.embed_tokens.forward(&ids, batch, tokens))
    }

    /// Runs `layers` (a sub-range of `0..N`) over `hidden` `(batch, tokens, hidden)`, appending
    /// their keys and values to `cache`. Returns the hidden states after the last layer of the
    /// range. Running `[0, l)` then `[l, N)` equals running `[0, N)`.
    pub fn forward_layers(
        &self,
        hidden: &Tensor,
        layers: Range<usize>,
        input: &AttentionInput,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        if layers.start > layers.end || layers.end > self.num_layers() {
            return Err(Error::invalid(format!(
                "layer range {layers:?} is not within 0..{}",
                self.num_layers()
            )));
        }
        if cache.num_layers() != self.num_layers() {
            return Err(Error::invalid(format!(
                "cache has {} layers, model has {}",
                cache.num_layers(),
                self.num_layers()
            )));
        }
        let (batch, tokens, _) = hidden.dims3()?;
        if cache.batch() != batch {
            return Err(Error::invalid(format!(
                "cache batch {} differs from input batch {batch}",
                cache.batch()
            )));
        }
        if layers.is_empty() {
            return Ok(hidden.clone());
        }
        let first_len = cache.layer_len(layers.start);
        if layers.clone().any(|l| cache.layer_len(l) != first_len) {
            return Err(Error::invalid(
                "layers of the range hold different cached lengths",
            ));
        }
        let (positions, mask) = self.prepare_input(input, batch, tokens, first_len + tokens)?;
        self.run(batch * tokens, || {
            let (cos, sin) = self.rope.tables(&positions)?;
            let mut x = hidden.clone();
            for index in layers {
                x = self.layers[index].forward(&x, Kernels::Fused, |attn, h| {
                    let (q, k, v) = attn.project_qkv(h, &self.rope, &cos, &sin, Kernels::Fused)?;
                    let (keys, values) = cache.append(index, &k, &v)?;
                    attn.attend(&q, &keys, &values, mask.as_ref(), Kernels::Fused)
                })?;
            }
            Ok(x)
        })
    }

    /// Checks `input` against `batch x tokens` new rows over `kv_len` keys and returns positions
    /// `(batch, tokens)` and the mask shaped `(b or 1, 1, 1, tokens, kv_len)` in the model's dtype.
    pub(crate) fn prepare_input(
        &self,
        input: &AttentionInput,
        batch: usize,
        tokens: usize,
        kv_len: usize,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (pos_batch, pos_tokens) = input.positions.dims2()?;
        if pos_tokens != tokens || (pos_batch != batch && pos_batch != 1) {
            return Err(Error::invalid(format!(
                "positions {:?} do not fit {batch} x {tokens} new rows",
                input.positions.dims(),
            )));
        }
        let mask = match &input.mask {
            None => None,
            Some(mask) => {
                let dims = mask.dims().to_vec();
                let (mask_batch, queries, keys) = match dims.as_slice() {
                    [q, k] => (1, *q, *k),
                    [b, q, k] => (*b, *q, *k),
                    _ => {
                        return Err(Error::invalid(format!(
                            "mask must be 2D or 3D, got {dims:?}"
                        )))
                    }
                };
                if queries != tokens || keys != kv_len || (mask_batch != 1 && mask_batch != batch) {
                    return Err(Error::invalid(format!(
                        "mask {dims:?} does not fit {tokens} new tokens over {kv_len} keys (batch {batch})"
                    )));
                }
                // (b, 1 kv-head, 1 group, queries, keys): broadcast over heads and groups.
                Some(
                    mask.to_dtype(self.dtype)?
                        .reshape((mask_batch, 1, 1, queries, keys))?,
                )
            }
        };
        let positions = if pos_batch == batch {
            input.positions.clone()
        } else {
            input
                .positions
                .broadcast_as((batch, tokens))?
                .contiguous()?
        };
        let max_position = positions.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
        if max_position >= self.context_limit() {
            return Err(Error::ContextOverflow {
                requested: max_position + 1,
                capacity: self.context_limit(),
            });
        }
        Ok((positions, mask))
    }

    /// Final norm and LM head over every row of `hidden` `(batch, tokens, hidden)`, from any
    /// layer: `(batch, tokens, vocab)`. Applied after layer `l < N` this is the early-exit tap.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.logits_with(hidden, Kernels::Fused)
    }

    /// [`Model::logits`] with a choice of kernels ([`Kernels::Autograd`] to train through it).
    pub fn logits_with(&self, hidden: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let rows = hidden.elem_count() / hidden.dim(candle_core::D::Minus1)?.max(1);
        self.run(rows, || {
            let h = kernels.norm(&self.norm, hidden)?;
            match (&self.partial_head, kernels) {
                (Some(head), Kernels::Fused) => head.forward(&h),
                _ => Ok(self.lm_head.forward(&h)?.to_dtype(DType::F32)?),
            }
        })
    }

    /// Like [`Model::logits`] but only for the token rows `rows` of every batch row:
    /// `(batch, rows.len(), vocab)`.
    pub fn logits_at(&self, hidden: &Tensor, rows: &[usize]) -> Result<Tensor> {
        let tokens = hidden.dim(1)?;
        if rows.is_empty() || rows.iter().any(|&r| r >= tokens) {
            return Err(Error::invalid(format!(
                "rows {rows:?} must be a non-empty subset of 0..{tokens}"
            )));
        }
        let index: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let index = Tensor::from_vec(index, rows.len(), hidden.device())?;
        let selected = hidden.index_select(&index, 1)?;
        self.logits(&selected)
    }

    /// Embeds `rows`, runs all layers, and returns the logits of every position
    /// `(batch, tokens, vocab)` in f32.
    pub fn forward(
        &self,
        rows: &[&[u32]],
        input: &AttentionInput,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let hidden = self.embed(rows)?;
        let hidden = self.forward_layers(&hidden, 0..self.num_layers(), input, cache)?;
        self.logits(&hidden)
    }

    /// Convenience for one sequence: causal forward of `tokens` after the cached prefix,
    /// returning logits `(tokens, vocab)` in f32.
    pub fn forward_causal(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let input = AttentionInput::causal(1, tokens.len(), cache.len(), &self.device)?;
        Ok(self.forward(&[tokens], &input, cache)?.squeeze(0)?)
    }

    /// Causal forward returning only the last position's logits as a host vector.
    pub fn next_token_logits(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let input = AttentionInput::causal(1, tokens.len(), cache.len(), &self.device)?;
        let hidden = self.embed(&[tokens])?;
        let hidden = self.forward_layers(&hidden, 0..self.num_layers(), &input, cache)?;
        let logits = self.logits_at(&hidden, &[tokens.len() - 1])?;
        Ok(logits.flatten_all()?.to_vec1::<f32>()?)
    }
}
