//! Target-only decoding: the reference every speculative strategy must reproduce.

use std::sync::Arc;
use std::time::Instant;

use mirror_core::sampling;
use mirror_core::Model;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::config::{FinishReason, Generation, GenerationConfig, StreamControl};
use crate::error::Result;
use crate::progress::{capacity_for, Progress};
use crate::stats::Stats;
use crate::Decoder;

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

    fn generate_stream(
        &mut self,
        prompt: &[u32],
        config: &GenerationConfig,
        on_tokens: &mut dyn FnMut(&[u32]) -> StreamControl,
    ) -> Result<Generation> {
        let started = Instant::now();
        let capacity = capacity_for(&self.target, prompt, config, 0)?;
        let mut stats = Stats::new(0);
        let mut progress = Progress::new(config, &self.target, on_tokens);
        let mut rng = StdRng::seed_from_u64(config.seed);
        let mut cache = self.target.new_cache(1, capacity)?;
        let mut logits = self.target.next_token_logits(prompt, &mut cache)?;
        stats.time.prefill = started.elapsed();
        while !progress.done() {
            let token = if config.sampling.is_greedy() {
                sampling::argmax(&logits)
            } else {
                sampling::warp_probs(&logits, &config.sampling).sample(rng.random())
            };
            if !progress.commit(&[token]) {
                break;
            }
            if cache.len() + 1 > cache.capacity() {
                progress.finish = Some(FinishReason::ContextLimit);
                break;
            }
            let pass = Instant::now();
            logits = self.target.next_token_logits(&[token], &mut cache)?;
            stats.time.target_prefix += pass.elapsed();
            stats.target_passes += 1;
        }
        Ok(progress.finish(stats, started))
    }
}
