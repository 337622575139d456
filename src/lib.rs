//! # mirror-sd
//!
//! Fast, lossless LLM inference by Mirror speculative decoding (Bhendawade et al., "Mirror
//! Speculative Decoding: Breaking the Serial Barrier in LLM Inference", arXiv 2510.13161), on
//! candle. This facade re-exports the two crates:
//!
//! - [`mirror_core`]: the decoder (Llama, Qwen2, Qwen3, Mistral) with early-exit taps, the KV cache
//!   with rollback and tree compaction, masks, loading (safetensors, GGUF, hub), tokenizers with
//!   chat templates, sampling rules;
//! - [`mirror_scheduler`]: the strategies (autoregressive, vanilla SD, Mirror-SD), the draft
//!   worker, the tree verifier, statistics, the engine, and a latency model.
//!
//! See the README for the two commands (generation, tests) and BENCHMARKS.md for measured figures.

pub use mirror_core;
pub use mirror_scheduler;

#[cfg(feature = "server")]
pub mod serve;

/// The README's Rust snippets, compiled as doctests (`cargo test --doc`) so that they keep up
/// with the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
