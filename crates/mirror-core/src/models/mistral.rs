//! Mistral (Jiang et al., "Mistral 7B", arXiv 2310.06825).
//!
//! Llama layout with sliding-window attention. We run full attention and cap the context at the
//! window, which is exactly equivalent for every context that fits in it.

use super::ArchSpec;

pub(crate) const SPEC: ArchSpec = ArchSpec {
    forced_qkv_bias: false,
    qk_norm: false,
    attention_bias_covers_output: true,
    gguf_rope_interleaved: true,
};
