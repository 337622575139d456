//! The decoder shared by every supported architecture: pre-norm blocks of grouped-query attention
//! with RoPE and a SwiGLU MLP (Touvron et al., "LLaMA", arXiv 2302.13971; Ainslie et al., "GQA",
//! arXiv 2305.13245), exposed layer by layer so a scheduler can tap any depth.
//!
//! The model knows nothing of decoding: it embeds tokens, runs a range of layers over hidden states
//! with explicit positions and mask, and maps any rows of any layer's states to logits through its
//! own final norm and LM head (after layer `l` that is the early-exit tap of Mirror-SD).

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear, RmsNorm};

use super::rope::Rope;
use crate::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::mask::AttentionInput;
use crate::weights::WeightSource;

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

#[derive(Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// A decoder-only language model with weights behind `&self` (share it across threads with an
/// `Arc`) and all mutable state in a [`KvCache`] passed as `&mut`.
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
            .finish()
    }
}

/// Reads weights by their Hugging Face names, checking shapes against the config.
struct Loader<'a> {
    source: &'a dyn WeightSource,
    dtype: DType,
    device: &'a Device,
}

impl Loader<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.source.load(name, shape, self.dtype, self.device)
    }

    fn linear(&self, prefix: &str, out_dim: usize, in_dim: usize, bias: bool) -> Result<Linear> {
        let weight = self.get(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let bias = if bias {
            Some(self.get(&format!("{prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        Ok(Linear::new(weight, bias))
    }

    fn norm(&self, name: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm::new(self.get(name, &[dim])?, eps))
    }
}

impl Model {
    /// Builds the model from a weight source on `device` in `dtype`. Every tensor's shape is
    /// checked against `config` and a mismatch names the tensor and the file.
    pub fn load(
        config: ModelConfig,
        source: &dyn WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let source_name = source.path().display().to_string();
        config.validate(&source_name)?;
        let architecture = Architecture::parse(&config.model_type, &source_name)?;
        let loader = Loader {
            source,
            dtype,
            device,
        };
        let hidden = config.hidden_size;
        let heads = config.num_attention_heads;
        let kv_heads = config.num_kv_heads();
        let head_dim = config.head_dim();
        let eps = config.rms_norm_eps;
        let embed_weight = loader.get("model.embed_tokens.weight", &[config.vocab_size, hidden])?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
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
            Linear::new(embed_weight.clone(), None)
        } else {
            loader.linear("lm_head", config.vocab_size, hidden, false)?
        };
        let rope = Rope::new(&config, dtype, device)?;
        Ok(Self {
            embed_tokens: Embedding::new(embed_weight, hidden),
            architecture,
            layers,
            norm,
            lm_head,
            rope,
            dtype,
            device: device.clone(),
            pool: None,
            config,
        })
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
        })
    }

    /// Confines this model's CPU work to `pool` (gemm and candle's parallel ops run in the
    /// current rayon pool), so two models can run side by side without oversubscribing cores.
    pub fn with_thread_pool(mut self, pool: Arc<rayon::ThreadPool>) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Confines this model to a new pool of `threads` threads (see [`Model::with_thread_pool`]).
    pub fn with_threads(self, threads: usize) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("mirror-model-{i}"))
            .build()
            .map_err(|e| Error::ThreadPool(e.to_string()))?;
        Ok(self.with_thread_pool(Arc::new(pool)))
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
        let ids = Tensor::from_vec(ids, (batch, tokens), &self.device)?;
        self.run(|| Ok(self.embed_tokens.forward(&ids)?))
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
        let (pos_batch, pos_tokens) = input.positions.dims2()?;
        if pos_tokens != tokens || (pos_batch != batch && pos_batch != 1) {
            return Err(Error::invalid(format!(
                "positions {:?} do not fit hidden states {:?}",
                input.positions.dims(),
                hidden.dims()
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
        let kv_len = first_len + tokens;
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
        self.run(|| {
            let (cos, sin) = self.rope.tables(&positions)?;
            let mut x = hidden.clone();
            for index in layers {
                x = self.layer_forward(index, &x, &cos, &sin, mask.as_ref(), cache)?;
            }
            Ok(x)
        })
    }

    fn layer_forward(
        &self,
        index: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let layer = &self.layers[index];
        let residual = x;
        let h = layer.input_layernorm.forward(x)?;
        let h = self.attention(index, &layer.self_attn, &h, cos, sin, mask, cache)?;
        let x = (residual + h)?;
        let h = layer.post_attention_layernorm.forward(&x)?;
        let mlp = &layer.mlp;
        let gate = candle_nn::ops::silu(&mlp.gate_proj.forward(&h)?)?;
        let h = mlp.down_proj.forward(&(gate * mlp.up_proj.forward(&h)?)?)?;
        Ok((x + h)?)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        index: usize,
        attn: &Attention,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (batch, tokens, _) = x.dims3()?;
        let (heads, kv_heads, head_dim) = (attn.num_heads, attn.num_kv_heads, attn.head_dim);
        let q = attn
            .q_proj
            .forward(x)?
            .reshape((batch, tokens, heads, head_dim))?;
        let k = attn
            .k_proj
            .forward(x)?
            .reshape((batch, tokens, kv_heads, head_dim))?;
        let v = attn
            .v_proj
            .forward(x)?
            .reshape((batch, tokens, kv_heads, head_dim))?;
        let (q, k) = match (&attn.q_norm, &attn.k_norm) {
            (Some(qn), Some(kn)) => (qn.forward(&q.contiguous()?)?, kn.forward(&k.contiguous()?)?),
            _ => (q, k),
        };
        let q = self
            .rope
            .apply(&q.transpose(1, 2)?.contiguous()?, cos, sin)?;
        let k = self
            .rope
            .apply(&k.transpose(1, 2)?.contiguous()?, cos, sin)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let (keys, values) = cache.append(index, &k, &v)?;
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
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs
            .matmul(&values)?
            .reshape((batch, heads, tokens, head_dim))?
            .transpose(1, 2)?
            .reshape((batch, tokens, heads * head_dim))?;
        Ok(attn.o_proj.forward(&out)?)
    }

    /// Final norm and LM head over every row of `hidden` `(batch, tokens, hidden)`, from any
    /// layer: `(batch, tokens, vocab)`. Applied after layer `l < N` this is the early-exit tap.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.run(|| {
            let h = self.norm.forward(hidden)?;
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
