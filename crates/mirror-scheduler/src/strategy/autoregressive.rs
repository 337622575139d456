//! Target-only decoding: the reference every speculative strategy must reproduce.

use std::sync::Arc;

use mirror_core::Model;

use super::Decoder;
use crate::error::Result;
use crate::generation::{Generation, GenerationConfig, StreamControl, TokenLogprob};
use crate::run::{next_token, Run};
use crate::stats::time_phase;

/// One token per target forward.
pub struct Autoregressive {
    target: Arc<Model>,
}

impl Autoregressive {
    /// Decodes with `target` alone.
    pub fn new(target: Arc<Model>) -> Self {
        Self { target }
    }
}

impl Decoder for Autoregressive {
    fn name(&self) -> &'static str {
        "autoregressive"
    }

    fn target(&self) -> &Arc<Model> {
        &self.target
    }

    fn generate_with(
        &mut self,
        prompt: &[u32],
        config: &GenerationConfig,
        on_tokens: &mut dyn FnMut(&[u32]) -> StreamControl,
    ) -> Result<Generation> {
        Run::refuse_constraint(config)?;
        Run::refuse_observers(config)?;
        let mut stream = |tokens: &[u32], _: &[TokenLogprob]| on_tokens(tokens);
        let mut run = Run::begin(&self.target, prompt, config, 0, config.seed, &mut stream)?;
        let mut logits = self.target.next_token_logits(prompt, &mut run.cache)?;
        run.stats.time.prefill = run.started.elapsed();
        loop {
            if !config.penalties.is_neutral() {
                let mut rows = [logits];
                run.penalize(config, &mut rows, &[]);
                [logits] = rows;
            }
            let token = next_token(&logits, &config.sampling, &mut run.rng);
            if !run.progress.commit(&[token], &[]) || !run.has_room() {
                break;
            }
            logits = time_phase(&mut run.stats.time.target_prefix, || {
                self.target.next_token_logits(&[token], &mut run.cache)
            })?;
            run.stats.target_passes += 1;
        }
        Ok(run.finish())
    }
}
