//! Decoder architectures: the shared transformer and what each architecture changes.

pub(crate) mod attention;
pub(crate) mod cpu_ops;
pub mod layers;
pub(crate) mod linear;
pub(crate) mod loader;
pub mod lookahead;
pub(crate) mod rope;
pub mod transformer;

pub use crate::gguf::config_from_gguf;
