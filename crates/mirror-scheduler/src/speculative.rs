//! Vanilla speculative decoding (Leviathan et al., "Fast Inference from Transformers via
//! Speculative Decoding", arXiv 2211.17192; Chen et al., arXiv 2302.01318): the draft proposes
//! gamma tokens autoregressively, then the target verifies the chain in one pass. Serial: the
//! draft's time is never hidden. The baseline Mirror-SD is measured against.

use std::sync::Arc;

use mirror_core::Model;
use rand::Rng;

use crate::config::{Generation, GenerationConfig, StreamControl};
use crate::draft::DraftState;
use crate::error::Result;
use crate::host::host_rows;
use crate::pair::{check_pair, draft_option_setters, DraftOptions};
use crate::progress::Run;
use crate::seed::mix;
use crate::stats::timed;
use crate::verify::verify_window;
use crate::Decoder;

/// Builder of [`SpeculativeDecoding`].
pub struct SpeculativeBuilder {
    target: Arc<Model>,
    draft: Arc<Model>,
    options: DraftOptions,
}

impl SpeculativeBuilder {
    draft_option_setters!();

    /// Checks the pair and builds the decoder.
    pub fn build(self) -> Result<SpeculativeDecoding> {
        self.options.check()?;
        check_pair(&self.target, &self.draft)?;
        let mut draft = DraftState::new(Arc::clone(&self.draft));
        draft.lookahead_confidence = self.options.lookahead_confidence;
        Ok(SpeculativeDecoding {
            draft,
            target: self.target,
            options: self.options,
        })
    }
}

/// Vanilla speculative decoding.
pub struct SpeculativeDecoding {
    target: Arc<Model>,
    draft: DraftState,
    options: DraftOptions,
}

impl SpeculativeDecoding {
    /// A builder for `target` verified against proposals of `draft`.
    pub fn builder(target: Arc<Model>, draft: Arc<Model>) -> SpeculativeBuilder {
        SpeculativeBuilder {
            target,
            draft,
            options: DraftOptions::default(),
        }
    }
}

impl Decoder for SpeculativeDecoding {
    fn name(&self) -> &'static str {
        "speculative"
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
        let gamma = self.options.gamma;
        let seed = mix(config.seed, 1);
        let mut run = Run::begin(&self.target, prompt, config, gamma, seed, on_tokens)?;
        // Prefill: the target and the draft cache everything but the prompt's last token.
        let n = run.seq.len();
        if n > 1 {
            self.target
                .next_token_logits(&run.seq[..n - 1], &mut run.cache)?;
        }
        let capacity = run.cache.capacity();
        let stop = run.progress.stop().clone();
        self.draft
            .reset(capacity, capacity, self.options.sampling(config), stop)?;
        if n > 1 {
            self.draft.sync(&run.seq[..n - 1])?;
        }
        self.draft.take_counters();
        run.stats.time.prefill = run.started.elapsed();
        let mut step = 0u64;
        while !run.progress.done() && run.has_room() {
            let count = gamma.min(run.window_room());
            let window = self
                .draft
                .rollout(&run.seq, count, mix(config.seed, step))?;
            run.stats.record_draft(self.draft.take_counters());

            let base = run.cache.len();
            let mut fed = vec![run.seq[run.seq.len() - 1]];
            fed.extend_from_slice(&window.tokens);
            let rows = timed(&mut run.stats.time.target_prefix, || {
                host_rows(
                    &self
                        .target
                        .forward_causal(&fed, &mut run.cache)?
                        .unsqueeze(0)?,
                )
            })?;
            run.stats.target_passes += 1;

            let rng = &mut run.rng;
            let verdict = timed(&mut run.stats.time.verify, || {
                let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
                verify_window(&refs, &window, &config.sampling, &mut || rng.random())
            });
            run.stats.record_window(window.len(), verdict.accepted);
            run.commit(base, &window, verdict);
            step += 1;
        }
        Ok(run.finish())
    }
}
