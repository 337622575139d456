//! The blocks of the shared decoder: grouped-query attention with RoPE (Ainslie et al., "GQA",
//! arXiv 2305.13245) and a SwiGLU MLP (Shazeer, "GLU Variants Improve Transformer",
//! arXiv 2002.05202) in pre-norm residual layers. Each block loads itself from a scoped
//! `WeightLoader` and owns its forward.

use candle_core::{Module, Tensor};
use candle_nn::RmsNorm;

use super::attention;
use super::cpu_ops;
use super::linear::Linear;
use super::loader::Scope;
use super::rope::Rope;
use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// Which implementation of the normalisation, RoPE and softmax kernels a pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// candle's fused kernels and mirror-core's CPU kernels: fastest, but gradients do not
    /// flow through them.
    #[default]
    Fused,
    /// The same functions from differentiable tensor ops, for training (lookahead parameters).
    #[cfg(feature = "train")]
    Autograd,
}

impl Kernels {
    pub(crate) fn norm(self, norm: &RmsNorm, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Kernels::Fused => norm.forward(x)?,
            #[cfg(feature = "train")]
            Kernels::Autograd => norm.forward_diff(x)?,
        })
    }
}

#[derive(Clone)]
pub(crate) struct Attention {
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

impl Attention {
    fn load(scope: &Scope, config: &ModelConfig) -> Result<Self> {
        let (hidden, eps) = (config.hidden_size, config.rms_norm_eps);
        let (heads, kv_heads, head_dim) = (
            config.num_attention_heads,
            config.num_kv_heads(),
            config.head_dim(),
        );
        let qkv_bias = config.qkv_bias();
        let (q_norm, k_norm) = if config.qk_norm() {
            (
                Some(scope.norm("q_norm", head_dim, eps)?),
                Some(scope.norm("k_norm", head_dim, eps)?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            q_proj: scope.linear("q_proj", heads * head_dim, hidden, qkv_bias)?,
            k_proj: scope.linear("k_proj", kv_heads * head_dim, hidden, qkv_bias)?,
            v_proj: scope.linear("v_proj", kv_heads * head_dim, hidden, qkv_bias)?,
            o_proj: scope.linear("o_proj", hidden, heads * head_dim, config.o_bias())?,
            q_norm,
            k_norm,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
        })
    }

    /// Queries `(b, heads, t, d)`, keys and values `(b, kv_heads, t, d)`, rotated.
    pub(crate) fn project_qkv(
        &self,
        x: &Tensor,
        rope: &Rope,
        cos: &Tensor,
        sin: &Tensor,
        kernels: Kernels,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (batch, tokens, _) = x.dims3()?;
        let (heads, kv_heads, head_dim) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let [q, k, v]: [Tensor; 3] =
            Linear::forward_many(&[&self.q_proj, &self.k_proj, &self.v_proj], x)?
                .try_into()
                .map_err(|_| {
                    Error::invalid("the attention projections returned the wrong count")
                })?;
        let q = q.reshape((batch, tokens, heads, head_dim))?;
        let k = k.reshape((batch, tokens, kv_heads, head_dim))?;
        let v = v.reshape((batch, tokens, kv_heads, head_dim))?;
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (
                kernels.norm(qn, &q.contiguous()?)?,
                kernels.norm(kn, &k.contiguous()?)?,
            ),
            _ => (q, k),
        };
        let rotate = |t: Tensor| -> Result<Tensor> {
            let t = t.transpose(1, 2)?.contiguous()?;
            match kernels {
                Kernels::Fused => rope.apply(&t, cos, sin),
                #[cfg(feature = "train")]
                Kernels::Autograd => rope.apply_differentiable(&t, cos, sin),
            }
        };
        let q = rotate(q)?;
        let k = rotate(k)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        Ok((q, k, v))
    }

    /// Attention of queries `q` over `keys`/`values` `(b, kv_heads, kv_len, d)` with an additive
    /// mask shaped `(b or 1, 1, 1, queries, kv_len)`, through the output projection.
    pub(crate) fn attend(
        &self,
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        mask: Option<&Tensor>,
        kernels: Kernels,
    ) -> Result<Tensor> {
        let heads = self.attend_heads(q, keys, values, mask, kernels)?;
        self.project_output(&heads)
    }

    /// The output projection over attended heads `(b, tokens, heads * d)`.
    pub(crate) fn project_output(&self, heads: &Tensor) -> Result<Tensor> {
        self.o_proj.forward(heads)
    }

    /// [`Attention::attend`] before the output projection: `(b, tokens, heads * d)`. A ragged
    /// batch attends each sequence on its own and projects all of them at once.
    pub(crate) fn attend_heads(
        &self,
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
                return Ok(out);
            }
        }
        // A cache stored in another dtype than the activations' (f16 keys and values) joins
        // candle's products in theirs.
        let keys = &keys.to_dtype(q.dtype())?;
        let values = &values.to_dtype(q.dtype())?;
        let kv_heads = self.num_kv_heads;
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
            #[cfg(feature = "train")]
            Kernels::Autograd => candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?,
        };
        let out = probs
            .matmul(values)?
            .reshape((batch, heads, tokens, head_dim))?
            .transpose(1, 2)?
            .reshape((batch, tokens, heads * head_dim))?;
        Ok(out)
    }
}

#[derive(Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    width: usize,
}

impl Mlp {
    fn load(scope: &Scope, config: &ModelConfig) -> Result<Self> {
        let (hidden, width) = (config.hidden_size, config.intermediate_size);
        Ok(Self {
            gate_proj: scope.linear("gate_proj", width, hidden, false)?,
            up_proj: scope.linear("up_proj", width, hidden, false)?,
            down_proj: scope.linear("down_proj", hidden, width, false)?,
            width,
        })
    }

    /// `down(silu(gate(h)) * up(h))`; on the CPU with packed weights, gate and up run as one
    /// kernel call and the gate is applied in place of candle's element-wise ops.
    fn forward(&self, h: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let projections = [&self.gate_proj, &self.up_proj];
        if kernels == Kernels::Fused {
            if let Some(joint) = Linear::forward_joint(&projections, h)? {
                if let Some(gated) = cpu_ops::swiglu(&joint, self.width)? {
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

/// One pre-norm decoder layer.
#[derive(Clone)]
pub(crate) struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    /// Loads layer `model.layers.{index}` (Hugging Face names).
    pub(crate) fn load(scope: &Scope, config: &ModelConfig) -> Result<Self> {
        let (hidden, eps) = (config.hidden_size, config.rms_norm_eps);
        Ok(Self {
            input_layernorm: scope.norm("input_layernorm", hidden, eps)?,
            self_attn: Attention::load(&scope.push("self_attn"), config)?,
            post_attention_layernorm: scope.norm("post_attention_layernorm", hidden, eps)?,
            mlp: Mlp::load(&scope.push("mlp"), config)?,
        })
    }

    /// The layer over `x`, with `attention` mapping the normed states to the attention output
    /// (so the cached main rows and the uncached lookahead rows share everything else).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        kernels: Kernels,
        attention: impl FnOnce(&Attention, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let h = kernels.norm(&self.input_layernorm, x)?;
        let h = attention(&self.self_attn, &h)?;
        let x = (x + h)?;
        let h = kernels.norm(&self.post_attention_layernorm, &x)?;
        let h = self.mlp.forward(&h, kernels)?;
        Ok((x + h)?)
    }
}
