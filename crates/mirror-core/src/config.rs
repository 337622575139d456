//! Model configuration: a plain serde mirror of Hugging Face `config.json`, the architectures
//! and what each changes in the shared decoder, and the shape of lookahead tokens. Data types
//! only: this module imports nothing of the crate but its error type.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The decoder architectures this crate implements: pre-norm blocks of grouped-query attention
/// with RoPE and a SwiGLU MLP, and what each one changes in them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// Llama (Touvron et al., "LLaMA", arXiv 2302.13971; "Llama 2", arXiv 2307.09288; "The
    /// Llama 3 Herd of Models", arXiv 2407.21783) and models of its layout, such as SmolLM2
    /// (Allal et al., arXiv 2502.02737): no attention bias, optional llama3 RoPE scaling, tied
    /// or separate LM head. llama.cpp's GGUF export permutes the q/k weights for interleaved
    /// RoPE, so GGUF `llama` checkpoints rotate adjacent pairs.
    Llama,
    /// Qwen2 and Qwen2.5 (Qwen Team, arXiv 2407.10671 and 2412.15115), including Qwen2.5-Coder
    /// (arXiv 2409.12186): a bias on the q, k and v projections (none on the output). GGUF
    /// `qwen2` checkpoints keep the half-split (NeoX) RoPE layout of the Hugging Face weights.
    Qwen2,
    /// Qwen3 (Qwen Team, arXiv 2505.09388): no projection bias, an explicit `head_dim`, and an
    /// RMSNorm on every query and key head before RoPE (which keeps attention logits bounded).
    Qwen3,
    /// Mistral (Jiang et al., "Mistral 7B", arXiv 2310.06825): Llama layout with a sliding
    /// attention window. We run full attention and cap the context at the window, which is
    /// exactly equivalent for every context that fits in it.
    Mistral,
}

/// What distinguishes one architecture from the shared decoder.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ArchSpec {
    /// q/k/v projections always carry a bias, whatever `attention_bias` says.
    pub forced_qkv_bias: bool,
    /// Per-head RMSNorm on queries and keys.
    pub qk_norm: bool,
    /// `attention_bias` also puts a bias on the output projection.
    pub attention_bias_covers_output: bool,
    /// GGUF exports of this architecture use interleaved RoPE.
    pub gguf_rope_interleaved: bool,
}

impl Architecture {
    /// Parses a `model_type` string (`config.json`) or `general.architecture` (GGUF).
    pub fn parse(name: &str, source_name: &str) -> Result<Self> {
        match name {
            "llama" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            "qwen3" => Ok(Self::Qwen3),
            "mistral" => Ok(Self::Mistral),
            other => Err(Error::UnsupportedArchitecture {
                architecture: other.to_string(),
                source_name: source_name.to_string(),
            }),
        }
    }

    pub(crate) fn spec(self) -> ArchSpec {
        let llama = ArchSpec {
            forced_qkv_bias: false,
            qk_norm: false,
            attention_bias_covers_output: true,
            gguf_rope_interleaved: true,
        };
        match self {
            Self::Llama | Self::Mistral => llama,
            Self::Qwen2 => ArchSpec {
                forced_qkv_bias: true,
                attention_bias_covers_output: false,
                gguf_rope_interleaved: false,
                ..llama
            },
            Self::Qwen3 => ArchSpec {
                qk_norm: true,
                attention_bias_covers_output: false,
                gguf_rope_interleaved: false,
                ..llama
            },
        }
    }

    /// The `model_type` string of this architecture.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Mistral => "mistral",
        }
    }
}

/// `rope_scaling` of a config. Only the `llama3` scheme is implemented; `default` means none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// `rope_type` (newer configs) or `type` (older ones).
    #[serde(alias = "type")]
    pub rope_type: String,
    /// Overall frequency divisor for long wavelengths.
    #[serde(default)]
    pub factor: Option<f64>,
    /// Wavelength threshold factor below which frequencies are scaled.
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    /// Wavelength threshold factor above which frequencies are kept.
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    /// Context length the model was pre-trained with.
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

/// A token id, or several (`eos_token_id` is a list in some configs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// One id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a vector.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// The fields of a Hugging Face `config.json` that the decoder needs.
///
/// Unknown fields are ignored, so real configs deserialize as they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// `llama`, `qwen2`, `qwen3` or `mistral`.
    pub model_type: String,
    /// Rows of the embedding matrix and of the LM head.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// RoPE scaling (llama3 scheme).
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Longest context the model supports.
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Whether the LM head reuses the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v (and o) projections for llama-style configs; qwen2 always has q/k/v bias.
    #[serde(default)]
    pub attention_bias: Option<bool>,
    /// Mistral's attention window; contexts are capped at it (full attention inside).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Whether the sliding window is used (qwen2/qwen3 configs set this to false).
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// Beginning-of-sequence token.
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence token(s).
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Activation of the MLP; only `silu` is implemented.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// True when q/k weights are laid out for interleaved RoPE (llama.cpp's GGUF `llama` export);
    /// Hugging Face checkpoints use the half-split (NeoX) layout.
    #[serde(default)]
    pub rope_interleaved: bool,
    /// Lookahead tokens a draft declares, under Speculative Streaming's name:
    /// `"speculative_streams": {"num_streams": 2, "stream_layers": 4, "rank": 64}`; their
    /// weights come from a lookahead checkpoint (see [`crate::models::lookahead`]).
    #[serde(rename = "speculative_streams")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookahead: Option<LookaheadConfig>,
}

/// Shape of a draft's lookahead tokens (a plain serde struct, as in `config.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookaheadConfig {
    /// Lookahead tokens `S`: the draft proposes up to `1 + tokens` tokens per forward.
    #[serde(rename = "num_streams")]
    pub tokens: usize,
    /// Top layers the lookahead rows run through (`N_s`).
    #[serde(rename = "stream_layers")]
    pub layers: usize,
    /// Rank of the projection from the main row's state.
    pub rank: usize,
}

impl LookaheadConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.tokens == 0 || self.layers == 0 || self.rank == 0 {
            return Err(Error::invalid(format!(
                "a lookahead config needs lookahead_tokens, lookahead_layers and rank >= 1, got {self:?}"
            )));
        }
        Ok(())
    }
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_position_embeddings() -> usize {
    4096
}
fn default_hidden_act() -> String {
    "silu".into()
}

impl ModelConfig {
    /// Parses and validates a `config.json` text.
    ///
    /// Both layouts of RoPE settings are accepted: `rope_theta` + `rope_scaling` (most hub
    /// checkpoints) and transformers 5's `rope_parameters`.
    pub fn from_json(text: &str, source_name: &str) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidConfig {
            source_name: source_name.to_string(),
            reason,
        };
        let mut value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if let Some(object) = value.as_object_mut() {
            if let Some(serde_json::Value::Object(mut params)) = object.remove("rope_parameters") {
                if let Some(theta) = params.remove("rope_theta") {
                    object.insert("rope_theta".into(), theta);
                }
                let rope_type = params
                    .get("rope_type")
                    .and_then(|t| t.as_str())
                    .unwrap_or("default");
                if rope_type != "default" {
                    object.insert("rope_scaling".into(), serde_json::Value::Object(params));
                }
            }
        }
        let config: Self = serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
        config.validate(source_name)?;
        Ok(config)
    }

    /// The architecture named by `model_type`.
    pub fn architecture(&self) -> Result<Architecture> {
        Architecture::parse(&self.model_type, "config")
    }

    /// Key/value heads.
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(&self) -> bool {
        self.spec().is_some_and(|s| s.forced_qkv_bias) || self.attention_bias.unwrap_or(false)
    }

    /// Whether the output projection carries a bias.
    pub fn o_bias(&self) -> bool {
        self.spec().is_some_and(|s| s.attention_bias_covers_output)
            && self.attention_bias.unwrap_or(false)
    }

    /// Whether queries and keys are RMS-normalised per head (qwen3).
    pub fn qk_norm(&self) -> bool {
        self.spec().is_some_and(|s| s.qk_norm)
    }

    fn spec(&self) -> Option<ArchSpec> {
        Architecture::parse(&self.model_type, "config")
            .ok()
            .map(Architecture::spec)
    }

    /// End-of-sequence ids declared by the config.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// Longest context this model can be run with: the position limit, capped at Mistral's
    /// sliding window (we run full attention, which equals windowed attention inside the window).
    pub fn context_limit(&self) -> usize {
        match (self.model_type.as_str(), self.sliding_window) {
            ("mistral", Some(window)) if self.use_sliding_window != Some(false) => {
                window.min(self.max_position_embeddings)
            }
            _ => self.max_position_embeddings,
        }
    }

    /// Checks the config for values the decoder cannot run with.
    pub fn validate(&self, source_name: &str) -> Result<()> {
        let bad = |reason: String| Error::InvalidConfig {
            source_name: source_name.to_string(),
            reason,
        };
        Architecture::parse(&self.model_type, source_name)?;
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("head_dim", self.head_dim()),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(bad(format!("{name} must be positive")));
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return Err(bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_kv_heads()
            )));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(bad(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            )));
        }
        if !(self.rms_norm_eps > 0.0 && self.rope_theta > 0.0) {
            return Err(bad("rms_norm_eps and rope_theta must be positive".into()));
        }
        if self.hidden_act != "silu" {
            return Err(bad(format!(
                "hidden_act `{}` is not supported (only silu)",
                self.hidden_act
            )));
        }
        if let Some(scaling) = &self.rope_scaling {
            match scaling.rope_type.as_str() {
                "default" => {}
                "llama3" => {
                    if scaling.factor.is_none()
                        || scaling.low_freq_factor.is_none()
                        || scaling.high_freq_factor.is_none()
                        || scaling.original_max_position_embeddings.is_none()
                    {
                        return Err(bad("llama3 rope_scaling needs factor, low_freq_factor, high_freq_factor and original_max_position_embeddings".into()));
                    }
                }
                other => {
                    return Err(bad(format!(
                        "rope_scaling type `{other}` is not supported (only llama3)"
                    )))
                }
            }
        }
        Ok(())
    }
}
