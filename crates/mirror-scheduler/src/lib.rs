//! # mirror-scheduler
//!
//! Decoding strategies over [`mirror_core`] models, behind one [`Decoder`] trait:
//!
//! - [`Autoregressive`]: the target alone, the reference for every other strategy;
//! - [`SpeculativeDecoding`]: vanilla SD, draft then verify, serially, with a draft model,
//!   prompt lookup ([`draft::lookup`]) or both;
//! - [`Mirror`]: Mirror speculative decoding (arXiv 2510.13161): the draft runs on its own worker
//!   thread and device handle, drafting a hypothesis tree from the target's early-exit tap while
//!   the target finishes its layers.
//!
//! Window lengths adapt to measured costs and acceptance by default ([`adaptive`]).
//!
//! All three are lossless: greedy output is token-identical to the target alone, and sampled
//! output follows the target's distribution (see [`verify`]).
//!
//! ## Layout, bottom-up
//! Each module imports only those above it in this list (`scripts/check_modules.py` checks
//! that no two import each other, directly or in a circle):
//!
//! 1. data: [`error`], [`stats`], [`monitor`] (generation monitors over distributions),
//!    [`generation`] (settings and results of one generation), [`window`] (a drafted window
//!    and its verdict), and the helpers `seed` and `host`;
//! 2. [`verify`] (judging a window), [`adaptive`] (sizing the next one) and [`constraint`]
//!    (masking it to a JSON schema, regex or grammar);
//! 3. `run` (one generation's bookkeeping, shared by every strategy);
//! 4. [`draft`]: the draft side (linear drafting, lookahead tokens, prompt lookup);
//! 5. [`strategy`]: the decoders, and Mirror's tree drafting, worker and target side;
//! 6. [`engine`]: text in, text out, streaming; the batched engine ([`EngineHandle`]).

pub mod adaptive;
pub mod constraint;
pub mod draft;
pub mod engine;
pub mod error;
pub mod generation;
mod host;
#[cfg(feature = "analysis")]
pub mod latency;
pub mod monitor;
mod run;
mod seed;
pub mod stats;
pub mod strategy;
pub mod verify;
pub mod window;

/// The draft side's internals, for the integration tests that check its bookkeeping against
/// fresh rollouts (`tests/draft_tree.rs`). Not part of the API: it may change at any time.
#[doc(hidden)]
pub mod testing {
    pub use crate::draft::Drafter;
    pub use crate::stats::DraftCounters;
    pub use crate::strategy::mirror::{Branch, TreeRequest};
}

pub use adaptive::WindowPolicy;
pub use constraint::{ConstraintCompiler, ConstraintState, LazyCompiler, TokenMask};
pub use draft::lookup::LookupConfig;
pub use engine::{
    BatchSettings, Engine, EngineHandle, EngineLoad, Event, Prompt, SequenceRequest,
    SequenceStream, Speculation, StepReport, TextStream,
};
pub use error::{Error, Result, WorkerFault};
pub use generation::{
    token_logprobs, Constraint, FinishReason, Generation, GenerationConfig, StopSet, StreamControl,
    TokenLogprob,
};
pub use monitor::{MonitorConfig, MonitorKind, MonitorReport, MonitorSummary};
pub use stats::{Reuse, Stats, TimeSplit};
pub use strategy::autoregressive::Autoregressive;
pub use strategy::mirror::{
    DraftSchedule, EarlyExit, Mirror, MirrorBuilder, MirrorSettings, DEFAULT_BRANCHES_PER_PASS,
};
pub use strategy::settings::{check_tokenizers, SpeculativeSettings, DEFAULT_LOOKAHEAD_CONFIDENCE};
pub use strategy::speculative::{SpeculativeBuilder, SpeculativeDecoding};
pub use strategy::Decoder;
