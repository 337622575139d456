//! Sampling and verification rules: pure functions over logits (`&[f32]`) and distributions
//! ([`Probs`]), no tensors. [`Probs`] is at the bottom (`probs`); `logits` (argmax,
//! log-softmax, top-k) and `warp` ([`SamplingParams`], [`warp_probs`]) make distributions from
//! logits, and `verify` holds the acceptance rules. Nothing here imports the rest of the crate.
//!
//! The same [`warp_probs`] turns target logits into `p` and draft logits into `q`, so the ratio
//! rule of speculative sampling (Leviathan et al., arXiv 2211.17192; Chen et al.,
//! arXiv 2302.01318) sees exactly the distribution each model sampled from. A distribution that
//! top-k or top-p cuts to a few tokens is kept sparse: a drafted token then carries its `q` in a
//! few entries instead of a vocabulary-sized vector. Sparse and dense forms hold the same values
//! and every rule below gives bit-identical results on either.
//!
//! One window is verified position by position: a sampled draft token by the ratio rule
//! ([`accept_sampled`], [`residual`]), a deterministic one (a greedy draft's argmax) by the
//! point-mass rule ([`accept_deterministic`], [`without_token`]); the bonus token after a fully
//! accepted window is drawn from `p` itself.

mod logits;
mod penalties;
mod probs;
mod verify;
mod warp;

pub use logits::{
    argmax, log_softmax, log_sum_exp, max_probability, softmax_entropy_into, top_k_log_probs,
};
pub use penalties::Penalties;
pub use probs::{sample, Probs};
pub use verify::{accept_deterministic, accept_sampled, residual, without_token};
pub use warp::{warp, warp_probs, SamplingParams};

#[cfg(test)]
mod tests;
