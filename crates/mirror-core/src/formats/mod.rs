//! The file formats models and tokenizers come in, and where the files come from: GGUF
//! ([`gguf`]), safetensors checkpoints ([`safetensors`]) and the small safetensors files of
//! lookahead weights and training state (`checkpoint`), and the Hugging Face hub cache
//! ([`hub`]).
//!
//! Formats read files into the crate's data types (config, tokenizer, the
//! [`WeightSource`](crate::weights::WeightSource) the model reads): they may import `config`,
//! `tokenizer`, `weights` and `error`, never `models` or `loading`, and the models never import
//! them; [`loading`](crate::loading) puts the two together.

pub(crate) mod checkpoint;
pub mod gguf;
pub mod hub;
pub mod safetensors;
