//! Qwen3 (Qwen Team, "Qwen3 Technical Report", arXiv 2505.09388).
//!
//! Llama layout without projection bias, an explicit `head_dim`, and an RMSNorm on every query
//! and key head before RoPE (q/k norm, which keeps attention logits bounded).

use super::ArchSpec;

pub(crate) const SPEC: ArchSpec = ArchSpec {
    forced_qkv_bias: false,
    qk_norm: true,
    attention_bias_covers_output: false,
    gguf_rope_interleaved: false,
};
