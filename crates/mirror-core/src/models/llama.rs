//! Llama (Touvron et al., "LLaMA: Open and Efficient Foundation Language Models", arXiv 2302.13971;
//! "Llama 2", arXiv 2307.09288; "The Llama 3 Herd of Models", arXiv 2407.21783) and models that
//! share its layout, such as SmolLM2 (Allal et al., arXiv 2502.02737).
//!
//! Pre-norm blocks, grouped-query attention without bias, SwiGLU MLP, optional llama3 RoPE
//! frequency scaling, tied or separate LM head. llama.cpp's GGUF export permutes the q/k weights
//! for interleaved RoPE, so GGUF `llama` checkpoints rotate adjacent pairs.

use super::ArchSpec;

pub(crate) const SPEC: ArchSpec = ArchSpec {
    forced_qkv_bias: false,
    qk_norm: false,
    attention_bias_covers_output: true,
    gguf_rope_interleaved: true,
};
