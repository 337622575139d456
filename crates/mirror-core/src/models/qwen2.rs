//! Qwen2 and Qwen2.5 (Qwen Team, "Qwen2 Technical Report", arXiv 2407.10671; "Qwen2.5 Technical
//! Report", arXiv 2412.15115), including the Qwen2.5-Coder models (arXiv 2409.12186).
//!
//! Llama layout with a bias on the q, k and v projections (none on the output projection).
//! GGUF `qwen2` checkpoints keep the half-split (NeoX) RoPE layout of the Hugging Face weights.

use super::ArchSpec;

pub(crate) const SPEC: ArchSpec = ArchSpec {
    forced_qkv_bias: true,
    qk_norm: false,
    attention_bias_covers_output: false,
    gguf_rope_interleaved: false,
};
