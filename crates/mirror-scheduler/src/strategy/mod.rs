//! Decoding strategies, behind one [`Decoder`] trait: the target alone ([`autoregressive`]),
//! vanilla speculative decoding ([`speculative`]) and Mirror ([`mirror`]), with the settings
//! and pairing checks they share ([`settings`]).
//!
//! May import everything below it (data, [`crate::verify`], [`crate::adaptive`],
//! [`crate::run`], [`crate::draft`]); only [`crate::engine`] and the server sit above.

pub mod autoregressive;
pub mod mirror;
pub mod settings;
pub mod speculative;

use std::sync::Arc;

use mirror_core::Model;

use crate::error::Result;
use crate::generation::{Generation, GenerationConfig, StreamControl, TokenLogprob};

/// A decoding strategy over a target model.
pub trait Decoder: Send {
    /// Short name for reports (`autoregressive`, `speculative`, `mirror`).
    fn name(&self) -> &'static str;

    /// The model whose output this strategy reproduces.
    fn target(&self) -> &Arc<Model>;

    /// Generates after `prompt`, calling `on_tokens` with each batch of newly committed tokens;
    /// returning [`StreamControl::Stop`] cancels the generation.
    fn generate_with(
        &mut self,
        prompt: &[u32],
        config: &GenerationConfig,
        on_tokens: &mut dyn FnMut(&[u32]) -> StreamControl,
    ) -> Result<Generation>;

    /// [`Decoder::generate_with`], streaming each batch of committed tokens with their
    /// log-probabilities when [`GenerationConfig::logprobs`] asks for them. The decoders that
    /// return log-probabilities ([`crate::Mirror`]) stream them here; by default none are
    /// streamed (an empty slice).
    fn generate_streamed(
        &mut self,
        prompt: &[u32],
        config: &GenerationConfig,
        on_tokens: &mut dyn FnMut(&[u32], &[TokenLogprob]) -> StreamControl,
    ) -> Result<Generation> {
        self.generate_with(prompt, config, &mut |tokens| on_tokens(tokens, &[]))
    }

    /// Generates after `prompt`.
    fn generate(&mut self, prompt: &[u32], config: &GenerationConfig) -> Result<Generation> {
        self.generate_with(prompt, config, &mut |_| StreamControl::Continue)
    }
}
