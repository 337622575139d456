//! # mirror-core
//!
//! The model layer of [mirror-sd](https://github.com/mirror-sd/mirror-sd): a decoder for Llama,
//! Qwen2, Qwen3 and Mistral checkpoints built on candle, with what Mirror speculative decoding
//! (Bhendawade et al., arXiv 2510.13161) needs from a model:
//!
//! - layer ranges run over hidden states with explicit positions and masks, and the final norm
//!   plus LM head applicable to any layer's states: the **early-exit tap**;
//! - logits for every position, so a window is verified in one pass;
//! - a preallocated [`KvCache`] with O(1) rollback and tree-path compaction;
//! - causal and tree [masks](mask) with per-token positions;
//! - [loading] from Hugging Face directories, GGUF files and the hub (cache first);
//! - [tokenizers](tokenizer) with chat templates, and pure [sampling] and verification rules;
//! - [lookahead tokens](models::lookahead) that let a draft propose several tokens per forward,
//!   and their [training] on a frozen draft.
//!
//! ```no_run
//! use mirror_core::{load, AttentionInput, LoadOptions, ModelSource};
//! # fn main() -> mirror_core::Result<()> {
//! let loaded = load(&ModelSource::parse("models/SmolLM2-135M-Instruct.Q4_1.gguf")?, &LoadOptions::default())?;
//! let model = &loaded.model;
//! let tokens = loaded.tokenizer.encode("The capital of France is", true)?;
//! let mut cache = model.new_cache(1, 256)?;
//! let input = AttentionInput::causal(1, tokens.len(), 0, model.device())?;
//! let half = model.num_layers() / 2;
//! let hidden = model.embed(&[&tokens])?;
//! let hidden = model.forward_layers(&hidden, 0..half, &input, &mut cache)?;
//! let early_exit_logits = model.logits(&hidden)?; // the tap after layer N/2
//! let hidden = model.forward_layers(&hidden, half..model.num_layers(), &input, &mut cache)?;
//! let final_logits = model.logits(&hidden)?;
//! # Ok(()) }
//! ```

#![deny(unsafe_op_in_unsafe_fn)]

pub mod config;
pub mod error;
pub mod formats;
pub mod kernels;
pub mod kv_cache;
pub mod loading;
pub mod mask;
pub mod models;
pub mod sampling;
pub mod threads;
pub mod tokenizer;
pub mod tools;
#[cfg(feature = "train")]
pub mod training;
pub mod weights;

pub use candle_core::quantized::GgmlDType;
pub use config::{Architecture, LookaheadConfig, ModelConfig};
pub use error::{panic_message, Error, Result};
pub use formats::hub::HubRepo;
pub use kv_cache::KvCache;
pub use loading::{
    load, load_dir, load_gguf, load_hub, load_model_dir, DirFiles, LoadOptions, LoadedModel,
    ModelSource,
};
pub use mask::{AttentionInput, RowVisibility};
pub use models::layers::Kernels;
pub use models::lookahead::{lookahead_attention, LookaheadHead, LookaheadLogits};
pub use models::ragged::{RaggedPass, RaggedSequence, RowLogits};
pub use models::transformer::Model;
pub use threads::{ThreadPlacement, POLL_ENV};
pub use tokenizer::{ChatMessage, Tokenizer};
pub use tools::{Tool, ToolCall};
pub use weights::{WeightFormat, WeightReport};

pub use candle_core::{DType, Device, Tensor};
