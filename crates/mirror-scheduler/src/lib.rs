//! # mirror-scheduler
//!
//! Decoding strategies over [`mirror_core`] models, behind one [`Decoder`] trait:
//!
//! - [`Autoregressive`]: the target alone, the reference for every other strategy;
//! - [`SpeculativeDecoding`]: vanilla SD, draft then verify, serially, with a draft model,
//!   prompt lookup ([`lookup`]) or both;
//! - [`Mirror`]: Mirror speculative decoding (arXiv 2510.13161): the draft runs on its own worker
//!   thread and device handle, drafting a hypothesis tree from the target's early-exit tap while
//!   the target finishes its layers.
//!
//! Window lengths adapt to measured costs and acceptance by default ([`window`]).
//!
//! All three are lossless: greedy output is token-identical to the target alone, and sampled
//! output follows the target's distribution (see [`verify`]).

pub mod autoregressive;
pub mod config;
mod draft;
pub mod engine;
pub mod error;
mod host;
#[cfg(feature = "analysis")]
pub mod latency;
pub mod lookup;
pub mod mirror;
pub mod pair;
mod progress;
mod seed;
pub mod speculative;
pub mod stats;
pub mod tree;
pub mod verify;
pub mod window;
mod worker;

/// The draft side's internals, for the integration tests that check its bookkeeping against
/// fresh rollouts (`tests/draft_tree.rs`). Not part of the API: it may change at any time.
#[doc(hidden)]
pub mod testing {
    pub use crate::draft::{Branch, DraftCounters, DraftState, TreeRequest};
}

use std::sync::Arc;

use mirror_core::Model;

pub use autoregressive::Autoregressive;
pub use config::{FinishReason, Generation, GenerationConfig, StopSet, StreamControl};
pub use draft::Resolution;
pub use engine::{Engine, Prompt, TextStream};
pub use error::{Error, Result};
pub use lookup::LookupConfig;
pub use mirror::{DraftSchedule, EarlyExit, Mirror, MirrorBuilder};
pub use pair::{check_tokenizers, DraftOptions, DEFAULT_LOOKAHEAD_CONFIDENCE};
pub use speculative::{SpeculativeBuilder, SpeculativeDecoding};
pub use stats::{Stats, TimeSplit};
pub use window::WindowPolicy;

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

    /// Generates after `prompt`.
    fn generate(&mut self, prompt: &[u32], config: &GenerationConfig) -> Result<Generation> {
        self.generate_with(prompt, config, &mut |_| StreamControl::Continue)
    }
}
