//! The decoder shared by every supported architecture: pre-norm blocks of grouped-query attention
//! with RoPE and a SwiGLU MLP (Touvron et al., "LLaMA", arXiv 2302.13971; Ainslie et al., "GQA",
//! arXiv 2305.13245), exposed layer by layer so a scheduler can tap any depth.
//!
//! The model knows nothing of decoding: it embeds tokens, runs a range of layers over hidden states
//! with explicit positions and mask, and maps any rows of any layer's states to logits through its
//! own final norm and LM head (after layer `l` that is the early-exit tap of Mirror-SD).

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::RmsNorm;

use super::attention;
use super::cpu_ops;
use super::linear::{Embedding, Linear};
use super::loader::WeightLoader;
use super::rope::Rope;
use super::streams::{stream_attention, StreamHead};
use crate::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::loading::LoadOptions;
use crate::mask::AttentionInput;
use crate::threads;
use crate::weights::{WeightReport, WeightSource};

#[derive(Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

#[derive(Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    /// `down(silu(gate(h)) * up(h))`; on the CPU with packed weights, gate and up run as one
    /// kernel call and the gate is applied in place of candle's element-wise ops.
    fn forward(&self, h: &Tensor, kernels: Kernels, width: usize) -> Result<Tensor> {
        let projections = [&self.gate_proj, &self.up_proj];
        if kernels == Kernels::Fused {
            if let Some(joint) = Linear::forward_joint(&projections, h)? {
                if let Some(gated) = cpu_ops::swiglu(&joint, width)? {
                    return self.down_proj.forward(&gated);
                }
            }
        }
        let [gate, up]: [Tensor; 2] = Linear::forward_many(&projections, h)?
            .try_into()
            .map_err(|_| Error::invalid("the MLP projections returned the wrong count"))?;
        self.down_proj
            .forward(&(candle_nn::ops::silu(&gate)? * up)?)
    }
}

#[derive(Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// Which implementation of the normalisation, RoPE and softmax kernels a pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// candle's fused kernels: fastest, but gradients do not flow through them.
    #[default]
    Fused,
    /// The same functions from differentiable tensor ops, for training (stream parameters).
    Autograd,
}

impl Kernels {
    fn norm(self, norm: &RmsNorm, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Kernels::Fused => norm.forward(x)?,
            Kernels::Autograd => norm.forward_diff(x)?,
        })
    }
}

/// Logits of one forward with speculative streams (batch 1).
#[derive(Debug, Clone)]
pub struct StreamLogits {
    /// Main-stream logits of the requested rows, `(rows, vocab)` f32.
    pub main: Tensor,
    /// Stream logits `(anchors, streams, vocab)` f32: stream `j` (1-based) of an anchor at
    /// position `p` predicts the token at `p + j + 1`.
    pub streams: Tensor,
}

/// A decoder-only language model with weights behind `&self` (share it across threads with an
/// `Arc`) and all mutable state in a [`KvCache`] passed as `&mut`. Cloning shares the weights.
#[derive(Clone)]
pub struct Model {
    config: ModelConfig,
    architecture: Architecture,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    dtype: DType,
    device: Device,
    pool: Option<Arc<rayon::ThreadPool>>,
    streams: Option<Arc<StreamHead>>,
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
            .field("streams", &self.streams.as_ref().map(|s| s.config()))
            .finish()
    }
}

impl Model {
    /// Builds the model from a weight source with `options` (weight format, activation dtype,
    /// device, threads). Every tensor's shape is checked against `config` and a mismatch names
    /// the tensor and the file. What happened to each weight matrix is in
    /// [`Model::weight_report`].
    pub fn load(
        config: ModelConfig,
        source: &dyn WeightSource,
        options: &LoadOptions,
    ) -> Result<Self> {
        let source_name = source.path().display().to_string();
        config.validate(&source_name)?;
        let architecture = Architecture::parse(&config.model_type, &source_name)?;
        let (dtype, device) = (options.dtype, &options.device);
        let loader = WeightLoader::new(source, options.weights, dtype, device)?;
        let hidden = config.hidden_size;
        let heads = config.num_attention_heads;
        let kv_heads = config.num_kv_heads();
        let head_dim = config.head_dim();
        let eps = config.rms_norm_eps;
        let embed_tokens =
            loader.embedding("model.embed_tokens.weight", config.vocab_size, hidden)?;
        // Not `with_capacity(num_hidden_layers)`: a corrupt config's count must fail on the
        // first missing layer, not on an allocation for 2^40 layers.
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let (q_norm, k_norm) = if config.qk_norm() {
                (
                    Some(loader.norm(&format!("{p}.self_attn.q_norm.weight"), head_dim, eps)?),
                    Some(loader.norm(&format!("{p}.self_attn.k_norm.weight"), head_dim, eps)?),
                )
            } else {
                (None, None)
            };
            let qkv_bias = config.qkv_bias();
            layers.push(DecoderLayer {
                input_layernorm: loader.norm(
                    &format!("{p}.input_layernorm.weight"),
                    hidden,
                    eps,
                )?,
                self_attn: Attention {
                    q_proj: loader.linear(
                        &format!("{p}.self_attn.q_proj"),
                        heads * head_dim,
                        hidden,
                        qkv_bias,
                    )?,
                    k_proj: loader.linear(
                        &format!("{p}.self_attn.k_proj"),
                        kv_heads * head_dim,
                        hidden,
                        qkv_bias,
                    )?,
                    v_proj: loader.linear(
                        &format!("{p}.self_attn.v_proj"),
                        kv_heads * head_dim,
                        hidden,
                        qkv_bias,
                    )?,
                    o_proj: loader.linear(
                        &format!("{p}.self_attn.o_proj"),
                        hidden,
                        heads * head_dim,
                        config.o_bias(),
                    )?,
                    q_norm,
                    k_norm,
                    num_heads: heads,
                    num_kv_heads: kv_heads,
                    head_dim,
                },
                post_attention_layernorm: loader.norm(
                    &format!("{p}.post_attention_layernorm.weight"),
                    hidden,
                    eps,
                )?,
                mlp: Mlp {
                    gate_proj: loader.linear(
                        &format!("{p}.mlp.gate_proj"),
                        config.intermediate_size,
                        hidden,
                        false,
                    )?,
                    up_proj: loader.linear(
                        &format!("{p}.mlp.up_proj"),
                        config.intermediate_size,
                        hidden,
                        false,
                    )?,
                    down_proj: loader.linear(
                        &format!("{p}.mlp.down_proj"),
                        hidden,
                        config.intermediate_size,
                        false,
                    )?,
                },
            });
        }
        let norm = loader.norm("model.norm.weight", hidden, eps)?;
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
        let model = Self {
            embed_tokens,
            architecture,
            layers,
            norm,
            lm_head,
            rope,
            dtype,
            device: device.clone(),
            pool: None,
            streams: None,
            weights,
            config,
        };
        match (&options.cores, options.threads) {
            (Some(cores), threads) => {
                let pool = threads::build_pool(
                    "mirror-model",
                    threads.unwrap_or(cores.len()),
                    Some(cores),
                )?;
                Ok(model.with_thread_pool(pool))
            }
            (None, Some(threads)) => model.with_threads(threads),
            (None, None) => Ok(model),
        }
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
        // Streams belong to the top layers of the full model.
        config.speculative_streams = None;
        Ok(Self {
            config,
            architecture: self.architecture,
            embed_tokens: self.embed_tokens.clone(),
            layers: self.layers[..layers].to_vec(),
            norm: self.norm.clone(),
            lm_head: self.lm_head.clone(),
            rope: self.rope.clone(),
            dtype: self.dtype,
            device: self.device.clone(),
            pool: self.pool.clone(),
            streams: None,
            weights: Arc::clone(&self.weights),
        })
    }

    /// This model (weights shared, no copy) with speculative-stream parameters attached
    /// (Bhendawade et al., "Speculative Streaming", arXiv 2402.11131): a draft that proposes
    /// `1 + streams` tokens per forward. The main stream is unchanged.
    pub fn with_streams(&self, head: Arc<StreamHead>) -> Result<Self> {
        head.check_fits(self.hidden_size(), self.num_layers())?;
        if let Some(declared) = &self.config.speculative_streams {
            if declared != head.config() {
                return Err(Error::invalid(format!(
                    "the model's config declares streams {declared:?} but the stream weights are {:?}",
                    head.config()
                )));
            }
        }
        let mut model = self.truncated(self.num_layers())?;
        model.config = self.config.clone();
        model.config.speculative_streams = Some(head.config().clone());
        model.streams = Some(head);
        Ok(model)
    }

    /// This model without stream parameters (weights shared): a plain one-token-per-step model.
    pub fn without_streams(&self) -> Result<Self> {
        let mut model = self.truncated(self.num_layers())?;
        model.config.speculative_streams = None;
        Ok(model)
    }

    /// The attached speculative streams, if any.
    pub fn streams(&self) -> Option<&Arc<StreamHead>> {
        self.streams.as_ref()
    }

    /// Confines this model's CPU work to `pool` (gemm and candle's parallel ops run in the
    /// current rayon pool), so two models can run side by side without oversubscribing cores.
    pub fn with_thread_pool(mut self, pool: Arc<rayon::ThreadPool>) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Confines this model to a new pool of `threads` threads (see [`Model::with_thread_pool`]).
    pub fn with_threads(self, threads: usize) -> Result<Self> {
        Ok(self.with_thread_pool(threads::build_pool("mirror-model", threads, None)?))
    }

    /// Confines this model to a new pool with one thread per core of `cores`, each pinned to
    /// those cores (Linux), so that models pinned to disjoint cores never compete for one.
    pub fn with_cores(self, cores: &[usize]) -> Result<Self> {
        let pool = threads::build_pool("mirror-model", cores.len(), Some(cores))?;
        Ok(self.with_thread_pool(pool))
    }

    /// Threads of the model's own pool, or `None` when it runs in the caller's rayon pool.
    pub fn threads(&self) -> Option<usize> {
        self.pool.as_ref().map(|p| p.current_num_threads())
    }

    fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        match &self.pool {
            Some(pool) => pool.install(f),
            None => f(),
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
            self.dtype,
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
        self.run(|| self.embed_tokens.forward(&ids, batch, tokens))
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
        self.run(|| {
            let (cos, sin) = self.rope.tables(&positions)?;
            let mut x = hidden.clone();
            for index in layers {
                x = self.layer_forward(index, &x, Kernels::Fused, |attn, h| {
                    let (q, k, v) = self.project_qkv(attn, h, &cos, &sin, Kernels::Fused)?;
                    let (keys, values) = cache.append(index, &k, &v)?;
                    self.attend(attn, &q, &keys, &values, mask.as_ref(), Kernels::Fused)
                })?;
            }
            Ok(x)
        })
    }

    /// Checks `input` against `batch x tokens` new rows over `kv_len` keys and returns positions
    /// `(batch, tokens)` and the mask shaped `(b or 1, 1, 1, tokens, kv_len)` in the model's dtype.
    fn prepare_input(
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

    /// One decoder block over `x`, with `attention` mapping the normed states to the attention
    /// output (so the cached main rows and the uncached stream rows share everything else).
    fn layer_forward(
        &self,
        index: usize,
        x: &Tensor,
        kernels: Kernels,
        attention: impl FnOnce(&Attention, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let layer = &self.layers[index];
        let h = kernels.norm(&layer.input_layernorm, x)?;
        let h = attention(&layer.self_attn, &h)?;
        let x = (x + h)?;
        let h = kernels.norm(&layer.post_attention_layernorm, &x)?;
        let h = layer
            .mlp
            .forward(&h, kernels, self.config.intermediate_size)?;
        Ok((x + h)?)
    }

    /// Queries `(b, heads, t, d)`, keys and values `(b, kv_heads, t, d)`, rotated.
    fn project_qkv(
        &self,
        attn: &Attention,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        kernels: Kernels,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (batch, tokens, _) = x.dims3()?;
        let (heads, kv_heads, head_dim) = (attn.num_heads, attn.num_kv_heads, attn.head_dim);
        let [q, k, v]: [Tensor; 3] =
            Linear::forward_many(&[&attn.q_proj, &attn.k_proj, &attn.v_proj], x)?
                .try_into()
                .map_err(|_| {
                    Error::invalid("the attention projections returned the wrong count")
                })?;
        let q = q.reshape((batch, tokens, heads, head_dim))?;
        let k = k.reshape((batch, tokens, kv_heads, head_dim))?;
        let v = v.reshape((batch, tokens, kv_heads, head_dim))?;
        let (q, k) = match (&attn.q_norm, &attn.k_norm) {
            (Some(qn), Some(kn)) => (
                kernels.norm(qn, &q.contiguous()?)?,
                kernels.norm(kn, &k.contiguous()?)?,
            ),
            _ => (q, k),
        };
        let rotate = |t: Tensor| -> Result<Tensor> {
            let t = t.transpose(1, 2)?.contiguous()?;
            match kernels {
                Kernels::Fused => self.rope.apply(&t, cos, sin),
                Kernels::Autograd => self.rope.apply_differentiable(&t, cos, sin),
            }
        };
        let q = rotate(q)?;
        let k = rotate(k)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        Ok((q, k, v))
    }

    /// Attention of queries `q` over `keys`/`values` `(b, kv_heads, kv_len, d)` with an additive
    /// mask shaped `(b or 1, 1, 1, queries, kv_len)`, through the output projection.
    fn attend(
        &self,
        attn: &Attention,
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        mask: Option<&Tensor>,
        kernels: Kernels,
    ) -> Result<Tensor> {
        let (batch, heads, tokens, head_dim) = q.dims4()?;
        if kernels == Kernels::Fused {
            let scale = 1.0 / (head_dim as f32).sqrt();
            if let Some(out) = attention::attention(q, keys, values, mask, scale)? {
                return attn.o_proj.forward(&out);
            }
        }
        let kv_heads = attn.num_kv_heads;
        let kv_len = keys.dim(2)?;
        // Grouped-query attention without copying K/V: fold the query heads that share a kv head
        // into the row dimension, (b, kv_heads, group * tokens, head_dim).
        let group = heads / kv_heads;
        let q = q.reshape((batch, kv_heads, group * tokens, head_dim))?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let scores = (q.matmul(&keys.t()?)? * scale)?;
        let scores = match mask {
            Some(mask) => scores
                .reshape((batch, kv_heads, group, tokens, kv_len))?
                .broadcast_add(mask)?
                .reshape((batch, kv_heads, group * tokens, kv_len))?,
            None => scores,
        };
        let probs = match kernels {
            Kernels::Fused => candle_nn::ops::softmax_last_dim(&scores)?,
            Kernels::Autograd => candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?,
        };
        let out = probs
            .matmul(values)?
            .reshape((batch, heads, tokens, head_dim))?
            .transpose(1, 2)?
            .reshape((batch, tokens, heads * head_dim))?;
        attn.o_proj.forward(&out)
    }

    /// Runs speculative streams through the top `stream_layers` layers.
    ///
    /// `anchors` `(batch, anchors, hidden)` are the main stream's states entering layer
    /// `N - stream_layers` at the anchor rows; `input` comes from
    /// [`stream_attention`] (stream rows anchor-major, their
    /// mask over the cache's keys then over the stream rows). The cache must already hold the
    /// main rows of the top layers; stream keys and values are never written to it.
    /// Returns the streams' states after the last layer, `(batch, anchors * streams, hidden)`.
    pub fn stream_hidden(
        &self,
        head: &StreamHead,
        anchors: &Tensor,
        input: &AttentionInput,
        cache: &KvCache,
        kernels: Kernels,
    ) -> Result<Tensor> {
        head.check_fits(self.hidden_size(), self.num_layers())?;
        let (batch, anchor_rows, _) = anchors.dims3()?;
        let rows = anchor_rows * head.config().num_streams;
        let split = self.num_layers() - head.config().stream_layers;
        if cache.batch() != batch || cache.num_layers() != self.num_layers() {
            return Err(Error::invalid("the cache does not belong to these anchors"));
        }
        let cached = cache.layer_len(split);
        if (split..self.num_layers()).any(|l| cache.layer_len(l) != cached) {
            return Err(Error::invalid(
                "the stream layers hold different cached lengths",
            ));
        }
        let (positions, mask) = self.prepare_input(input, batch, rows, cached + rows)?;
        let positions = match kernels {
            // Differentiable RoPE takes one table for the whole batch.
            Kernels::Autograd => positions.i(0..1)?,
            Kernels::Fused => positions,
        };
        self.run(|| {
            let (cos, sin) = self.rope.tables(&positions)?;
            let mut x = head.initial_states(anchors)?;
            for index in split..self.num_layers() {
                x = self.layer_forward(index, &x, kernels, |attn, h| {
                    let (q, k, v) = self.project_qkv(attn, h, &cos, &sin, kernels)?;
                    let (cached_keys, cached_values) = cache.view(index)?;
                    let keys = Tensor::cat(&[&cached_keys, &k], 2)?;
                    let values = Tensor::cat(&[&cached_values, &v], 2)?;
                    self.attend(attn, &q, &keys, &values, mask.as_ref(), kernels)
                })?;
            }
            Ok(x)
        })
    }

    /// One draft step with the attached streams (batch 1): feeds `tokens` after the cache under
    /// `input`, returns the main logits of `logit_rows` and the stream logits anchored at
    /// `stream_rows` (indices into `tokens`). Without streams, `stream_rows` must be empty.
    pub fn forward_with_streams(
        &self,
        tokens: &[u32],
        input: &AttentionInput,
        cache: &mut KvCache,
        logit_rows: &[usize],
        stream_rows: &[usize],
    ) -> Result<StreamLogits> {
        let head = match (&self.streams, stream_rows.is_empty()) {
            (Some(head), false) => Arc::clone(head),
            (None, false) => {
                return Err(Error::invalid(
                    "stream rows requested from a model without streams",
                ))
            }
            (_, true) => {
                let hidden = self.embed(&[tokens])?;
                let hidden = self.forward_layers(&hidden, 0..self.num_layers(), input, cache)?;
                let main = self.logits_at(&hidden, logit_rows)?.squeeze(0)?;
                let vocab = self.vocab_size();
                let streams = Tensor::zeros((0, 0, vocab), DType::F32, &self.device)?;
                return Ok(StreamLogits { main, streams });
            }
        };
        if stream_rows.iter().any(|&r| r >= tokens.len()) {
            return Err(Error::invalid(format!(
                "stream rows {stream_rows:?} must index the {} fed tokens",
                tokens.len()
            )));
        }
        let split = self.num_layers() - head.config().stream_layers;
        let kv_before = cache.len();
        let hidden = self.embed(&[tokens])?;
        let middle = self.forward_layers(&hidden, 0..split, input, cache)?;
        let hidden = self.forward_layers(&middle, split..self.num_layers(), input, cache)?;
        if logit_rows.is_empty() || logit_rows.iter().any(|&r| r >= tokens.len()) {
            return Err(Error::invalid(format!(
                "rows {logit_rows:?} must be a non-empty subset of 0..{}",
                tokens.len()
            )));
        }
        let main_rows: Vec<u32> = logit_rows.iter().map(|&r| r as u32).collect();
        let main_rows = Tensor::from_vec(main_rows, logit_rows.len(), &self.device)?;
        let main_hidden = hidden.index_select(&main_rows, 1)?;
        let index: Vec<u32> = stream_rows.iter().map(|&r| r as u32).collect();
        let index = Tensor::from_vec(index, stream_rows.len(), &self.device)?;
        let anchors = middle.index_select(&index, 1)?;
        let all_positions = input.positions.i(0)?.to_vec1::<u32>()?;
        let anchor_positions: Vec<u32> = stream_rows.iter().map(|&r| all_positions[r]).collect();
        let anchor_mask = match &input.mask {
            Some(mask) => Some(mask.flatten_to(mask.rank() - 2)?.index_select(&index, 0)?),
            None => None,
        };
        let stream_input = stream_attention(
            &anchor_positions,
            anchor_mask.as_ref(),
            kv_before + tokens.len(),
            head.config().num_streams,
            &self.device,
        )?;
        let states = self.stream_hidden(&head, &anchors, &stream_input, cache, Kernels::Fused)?;
        // One LM-head pass for main and stream rows: on a small draft the head's weights are
        // a large share of a step, and streaming them once instead of twice is most of the
        // difference between a stream step and a plain one.
        let logits = self
            .logits(&Tensor::cat(&[&main_hidden, &states], 1)?)?
            .squeeze(0)?;
        let main = logits.narrow(0, 0, logit_rows.len())?;
        let streams = logits
            .narrow(0, logit_rows.len(), states.dim(1)?)?
            .reshape((
                stream_rows.len(),
                head.config().num_streams,
                self.vocab_size(),
            ))?;
        Ok(StreamLogits { main, streams })
    }

    /// Final norm and LM head over every row of `hidden` `(batch, tokens, hidden)`, from any
    /// layer: `(batch, tokens, vocab)`. Applied after layer `l < N` this is the early-exit tap.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.logits_with(hidden, Kernels::Fused)
    }

    /// [`Model::logits`] with a choice of kernels ([`Kernels::Autograd`] to train through it).
    pub fn logits_with(&self, hidden: &Tensor, kernels: Kernels) -> Result<Tensor> {
        self.run(|| {
            let h = kernels.norm(&self.norm, hidden)?;
            Ok(self.lm_head.forward(&h)?.to_dtype(DType::F32)?)
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
