//! Decoder architectures: the shared transformer and what each architecture changes.

pub(crate) mod attention;
pub(crate) mod cpu_ops;
pub mod layers;
pub(crate) mod linear;
pub mod llama;
pub(crate) mod loader;
pub mod lookahead;
pub mod mistral;
pub mod qwen2;
pub mod qwen3;
pub(crate) mod rope;
pub mod transformer;

pub use crate::gguf::config_from_gguf;

use crate::config::Architecture;

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
