//! Decoder architectures: the shared transformer and what each architecture changes.

pub(crate) mod attention;
pub(crate) mod cpu_ops;
pub(crate) mod linear;
pub mod llama;
pub(crate) mod loader;
pub mod mistral;
pub mod qwen2;
pub mod qwen3;
pub(crate) mod rope;
pub mod streams;
pub mod transformer;

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};

use crate::config::{Architecture, ModelConfig, TokenIds};
use crate::error::{Error, Result};

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
    pub(crate) fn spec(self) -> ArchSpec {
        match self {
            Architecture::Llama => llama::SPEC,
            Architecture::Qwen2 => qwen2::SPEC,
            Architecture::Qwen3 => qwen3::SPEC,
            Architecture::Mistral => mistral::SPEC,
        }
    }
}

fn value_as_u64(value: &Value) -> Option<u64> {
    match value {
        Value::U8(v) => Some(u64::from(*v)),
        Value::U16(v) => Some(u64::from(*v)),
        Value::U32(v) => Some(u64::from(*v)),
        Value::U64(v) => Some(*v),
        Value::I8(v) => u64::try_from(*v).ok(),
        Value::I16(v) => u64::try_from(*v).ok(),
        Value::I32(v) => u64::try_from(*v).ok(),
        Value::I64(v) => u64::try_from(*v).ok(),
        _ => None,
    }
}

fn value_as_f64(value: &Value) -> Option<f64> {
    match value {
        Value::F32(v) => Some(f64::from(*v)),
        Value::F64(v) => Some(*v),
        other => value_as_u64(other).map(|v| v as f64),
    }
}

/// Reads a model config from GGUF metadata (llama.cpp key names).
pub fn config_from_gguf(content: &Content, path: &Path) -> Result<ModelConfig> {
    let source_name = format!("GGUF metadata of {}", path.display());
    let missing = |key: &str| Error::InvalidConfig {
        source_name: source_name.clone(),
        reason: format!("missing or non-numeric key `{key}`"),
    };
    let arch_name = match content.metadata.get("general.architecture") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(missing("general.architecture")),
    };
    let architecture = Architecture::parse(&arch_name, &source_name)?;
    let int = |key: &str| -> Result<usize> {
        let full = format!("{arch_name}.{key}");
        content
            .metadata
            .get(&full)
            .and_then(value_as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| missing(&full))
    };
    let opt_int = |key: &str| {
        content
            .metadata
            .get(&format!("{arch_name}.{key}"))
            .and_then(value_as_u64)
            .map(|v| v as usize)
    };
    let float = |key: &str| {
        content
            .metadata
            .get(&format!("{arch_name}.{key}"))
            .and_then(value_as_f64)
    };
    let token_id = |key: &str| {
        content
            .metadata
            .get(key)
            .and_then(value_as_u64)
            .map(|v| TokenIds::One(v as u32))
    };
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(Error::InvalidConfig {
            source_name,
            reason: "GGUF files with baked RoPE frequency factors (rope_freqs.weight, Llama 3.1+) are not supported; load the Hugging Face safetensors checkpoint instead".into(),
        });
    }
    let embedding = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| Error::MissingTensor {
            name: "token_embd.weight".into(),
            path: path.to_path_buf(),
        })?;
    let vocab_size = match embedding.shape.dims() {
        &[vocab, _] => vocab,
        dims => {
            return Err(Error::InvalidConfig {
                source_name,
                reason: format!("token_embd.weight has shape {dims:?}, not (vocab, hidden)"),
            })
        }
    };
    let hidden_size = int("embedding_length")?;
    let num_attention_heads = int("attention.head_count")?;
    let config = ModelConfig {
        model_type: architecture.as_str().to_string(),
        vocab_size,
        hidden_size,
        intermediate_size: int("feed_forward_length")?,
        num_hidden_layers: int("block_count")?,
        num_attention_heads,
        num_key_value_heads: Some(
            opt_int("attention.head_count_kv").unwrap_or(num_attention_heads),
        ),
        head_dim: opt_int("attention.key_length"),
        rms_norm_eps: float("attention.layer_norm_rms_epsilon")
            .ok_or_else(|| missing(&format!("{arch_name}.attention.layer_norm_rms_epsilon")))?,
        rope_theta: float("rope.freq_base").unwrap_or(10_000.0),
        rope_scaling: None,
        max_position_embeddings: int("context_length")?,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: Some(content.tensor_infos.contains_key("blk.0.attn_q.bias")),
        sliding_window: opt_int("attention.sliding_window"),
        use_sliding_window: None,
        bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
        eos_token_id: token_id("tokenizer.ggml.eos_token_id"),
        hidden_act: "silu".into(),
        rope_interleaved: architecture.spec().gguf_rope_interleaved,
        speculative_streams: None,
    };
    config.validate(&source_name)?;
    Ok(config)
}
