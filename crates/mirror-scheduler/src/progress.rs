//! Bookkeeping shared by every strategy: committing tokens, stop conditions, streaming, context.

use std::sync::Arc;

use mirror_core::Model;

use crate::config::{FinishReason, Generation, GenerationConfig, StreamControl};
use crate::error::{Error, Result};
use crate::stats::Stats;

/// The committed output of one generation.
pub(crate) struct Progress<'a> {
    pub tokens: Vec<u32>,
    stop_ids: Vec<u32>,
    max_new_tokens: usize,
    pub finish: Option<FinishReason>,
    on_tokens: &'a mut dyn FnMut(&[u32]) -> StreamControl,
}

impl<'a> Progress<'a> {
    pub fn new(
        config: &GenerationConfig,
        target: &Model,
        on_tokens: &'a mut dyn FnMut(&[u32]) -> StreamControl,
    ) -> Self {
        Self {
            tokens: Vec::new(),
            stop_ids: stop_ids(config, target),
            max_new_tokens: config.max_new_tokens,
            finish: (config.max_new_tokens == 0).then_some(FinishReason::Length),
            on_tokens,
        }
    }

    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Commits `new` tokens in order, stopping at a stop token or the length limit, and streams
    /// them. Returns true while generation should go on.
    pub fn commit(&mut self, new: &[u32]) -> bool {
        let start = self.tokens.len();
        for &token in new {
            if self.finish.is_some() {
                break;
            }
            self.tokens.push(token);
            if self.stop_ids.contains(&token) {
                self.finish = Some(FinishReason::Stop);
            } else if self.tokens.len() >= self.max_new_tokens {
                self.finish = Some(FinishReason::Length);
            }
        }
        if self.tokens.len() > start
            && (self.on_tokens)(&self.tokens[start..]) == StreamControl::Stop
            && self.finish.is_none()
        {
            self.finish = Some(FinishReason::Cancelled);
        }
        self.finish.is_none()
    }

    pub fn done(&self) -> bool {
        self.finish.is_some()
    }

    /// Closes the generation: final counters and the result.
    pub fn finish(self, mut stats: Stats, started: std::time::Instant) -> Generation {
        stats.generated_tokens = self.tokens.len();
        stats.time.total = started.elapsed();
        Generation {
            finish_reason: self.finish.unwrap_or(FinishReason::Length),
            tokens: self.tokens,
            text: None,
            stats,
        }
    }
}

/// Stop ids of a generation: the config's own, plus the target's end-of-sequence ids.
pub(crate) fn stop_ids(config: &GenerationConfig, target: &Model) -> Vec<u32> {
    let mut ids = config.stop_tokens.clone();
    if config.stop_at_eos {
        ids.extend(target.config().eos_token_ids());
    }
    ids
}

/// Cache capacity for a generation: prompt, output and one window of slack, within the limit.
pub(crate) fn capacity_for(
    target: &Arc<Model>,
    prompt: &[u32],
    config: &GenerationConfig,
    gamma: usize,
) -> Result<usize> {
    let limit = target.context_limit();
    if prompt.is_empty() {
        return Err(Error::InvalidPrompt("the prompt is empty".into()));
    }
    if prompt.len() >= limit {
        return Err(Error::InvalidPrompt(format!(
            "the prompt has {} tokens but the context limit is {limit}",
            prompt.len()
        )));
    }
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= target.vocab_size()) {
        return Err(mirror_core::Error::TokenOutOfRange {
            token: bad,
            vocab_size: target.vocab_size(),
        }
        .into());
    }
    Ok((prompt.len() + config.max_new_tokens + gamma + 2).min(limit))
}
