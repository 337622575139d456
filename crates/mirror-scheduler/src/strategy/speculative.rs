//! Vanilla speculative decoding (Leviathan et al., "Fast Inference from Transformers via
//! Speculative Decoding", arXiv 2211.17192; Chen et al., arXiv 2302.01318): the draft proposes
//! gamma tokens autoregressively, then the target verifies the chain in one pass. Serial: the
//! draft's time is never hidden. The baseline Mirror-SD is measured against.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mirror_core::Model;
use rand::Rng;

use super::settings::{check_pair, speculative_setters, SpeculativeSettings};
use super::Decoder;
use crate::adaptive::{Offer, WindowChooser};
use crate::draft::lookup::LookupConfig;
use crate::draft::Drafter;
use crate::error::{Error, Result};
use crate::generation::{Generation, GenerationConfig, StreamControl, TokenLogprob};
use crate::host::host_rows;
use crate::run::Run;
use crate::seed::mix;
use crate::stats::time_phase;
use crate::verify::verify_window;
use crate::window::{DraftWindow, Source};

/// Builder of [`SpeculativeDecoding`].
pub struct SpeculativeBuilder {
    target: Arc<Model>,
    draft: Option<Arc<Model>>,
    settings: SpeculativeSettings,
}

impl SpeculativeBuilder {
    speculative_setters!(settings);

    /// Checks the pair and builds the decoder.
    pub fn build(self) -> Result<SpeculativeDecoding> {
        self.settings.check()?;
        let draft = match self.draft {
            Some(model) => {
                check_pair(&self.target, &model)?;
                let mut draft = Drafter::new(model);
                draft.lookahead_confidence = self.settings.lookahead_confidence;
                Some(draft)
            }
            None if self.settings.lookup.is_some() => None,
            None => {
                return Err(Error::InvalidConfig(
                    "speculative decoding without a draft model needs prompt lookup".into(),
                ))
            }
        };
        Ok(SpeculativeDecoding {
            draft,
            target: self.target,
            settings: self.settings,
        })
    }
}

/// Vanilla speculative decoding, with windows drafted by a draft model, by prompt lookup, or
/// by lookup first and the model where lookup finds nothing.
pub struct SpeculativeDecoding {
    target: Arc<Model>,
    draft: Option<Drafter>,
    settings: SpeculativeSettings,
}

impl SpeculativeDecoding {
    /// A builder for `target` verified against proposals of `draft`.
    pub fn builder(target: Arc<Model>, draft: Arc<Model>) -> SpeculativeBuilder {
        SpeculativeBuilder {
            target,
            draft: Some(draft),
            settings: SpeculativeSettings::default(),
        }
    }

    /// A builder for prompt-lookup decoding: `target` verifies windows looked up in the prompt
    /// and the text generated so far, with no draft model at all.
    pub fn prompt_lookup(target: Arc<Model>) -> SpeculativeBuilder {
        SpeculativeBuilder {
            target,
            draft: None,
            settings: SpeculativeSettings {
                lookup: Some(LookupConfig::default()),
                ..SpeculativeSettings::default()
            },
        }
    }

    /// A draft token's cost relative to a plain step, before it is measured: the ratio of the
    /// weights each reads per step (both are bound by memory bandwidth on a CPU).
    fn draft_cost_prior(&self) -> f64 {
        let bytes = |model: &Model| model.weight_report().total_bytes().max(1) as f64;
        self.draft.as_ref().map_or(0.0, |draft| {
            bytes(draft.draft_model()) / bytes(&self.target)
        })
    }

    /// The next window: looked up, drafted by the model, or empty (a plain step), as
    /// `chooser` decides from what each source offers. Also returns the draft's one-off
    /// catch-up time (feeding the tokens committed while it was not used), which is no price
    /// of this window's length.
    fn draft_window(
        &mut self,
        run: &mut Run,
        chooser: &mut WindowChooser,
        room: usize,
        seed: u64,
    ) -> Result<(DraftWindow, Option<Source>, Duration)> {
        let mut looked_up = match &self.settings.lookup {
            Some(lookup) => lookup.window(&run.seq, room, run.progress.stop()),
            None => DraftWindow::default(),
        };
        let mut offers = vec![Offer {
            source: Source::Lookup,
            tokens: looked_up.len(),
        }];
        if self.draft.is_some() {
            offers.push(Offer {
                source: Source::Model,
                tokens: room,
            });
        }
        match (chooser.choose(&offers), self.draft.as_mut()) {
            (Some((Source::Lookup, k)), _) => {
                looked_up.truncate(k);
                run.stats.lookup_windows += 1;
                Ok((looked_up, Some(Source::Lookup), Duration::ZERO))
            }
            (Some((Source::Model, k)), Some(draft)) => {
                let window = draft.rollout(&run.seq, k, seed)?;
                let counters = draft.take_counters();
                run.stats.record_draft(counters);
                let catch_up = counters.busy.saturating_sub(counters.steady_busy());
                Ok((window, Some(Source::Model), catch_up))
            }
            _ => Ok((DraftWindow::default(), None, Duration::ZERO)),
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
        let gamma = self.settings.gamma;
        let seed = mix(config.seed, 1);
        Run::refuse_constraint(config)?;
        Run::refuse_observers(config)?;
        let mut stream = |tokens: &[u32], _: &[TokenLogprob]| on_tokens(tokens);
        let mut run = Run::begin(&self.target, prompt, config, gamma, seed, &mut stream)?;
        // Prefill: the target and the draft cache everything but the prompt's last token.
        let n = run.seq.len();
        if n > 1 {
            self.target
                .next_token_logits(&run.seq[..n - 1], &mut run.cache)?;
        }
        let capacity = run.cache.capacity();
        let stop = run.progress.stop().clone();
        let sampling = self.settings.sampling(config);
        if let Some(draft) = self.draft.as_mut() {
            draft.reset(capacity, capacity, sampling, stop)?;
            draft.set_penalties(&config.penalties, prompt.len());
            if n > 1 {
                draft.sync(&run.seq[..n - 1])?;
            }
            draft.take_counters();
        }
        run.stats.time.prefill = run.started.elapsed();
        let mut chooser = WindowChooser::new(self.settings.window, self.draft_cost_prior());
        let mut step = 0u64;
        while !run.progress.done() && run.has_room() {
            let step_started = Instant::now();
            let room = gamma.min(run.window_room());
            let (window, source, catch_up) =
                self.draft_window(&mut run, &mut chooser, room, mix(config.seed, step))?;

            let base = run.cache.len();
            let mut fed = vec![run.seq[run.seq.len() - 1]];
            fed.extend_from_slice(&window.tokens);
            let mut rows = time_phase(&mut run.stats.time.target_prefix, || {
                host_rows(
                    &self
                        .target
                        .forward_causal(&fed, &mut run.cache)?
                        .unsqueeze(0)?,
                )
            })?;
            run.stats.target_passes += 1;

            run.penalize(config, &mut rows, &window.tokens);
            let rng = &mut run.rng;
            let verdict = time_phase(&mut run.stats.time.verify, || {
                let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
                verify_window(&refs, &window, &config.sampling, &mut || rng.random())
            })?;
            run.stats.record_window(window.len(), verdict.accepted);
            if let Some(source) = source {
                chooser.record_verdict(source, window.len(), verdict.accepted);
            }
            let step_time = step_started.elapsed().saturating_sub(catch_up);
            chooser.record_step(source, window.len(), step_time);
            run.commit(base, &window, verdict);
            step += 1;
        }
        Ok(run.finish())
    }
}
