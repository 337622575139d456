//! Vanilla speculative decoding (Leviathan et al., "Fast Inference from Transformers via
//! Speculative Decoding", arXiv 2211.17192; Chen et al., arXiv 2302.01318): the draft proposes
//! gamma tokens autoregressively, then the target verifies the chain in one pass. Serial: the
//! draft's time is never hidden. The baseline Mirror-SD is measured against.

use std::sync::Arc;
use std::time::Instant;

use mirror_core::sampling::SamplingParams;
use mirror_core::Model;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::config::{FinishReason, Generation, GenerationConfig, StreamControl};
use crate::draft::{host_rows, mix, DraftState};
use crate::error::{Error, Result};
use crate::progress::{capacity_for, Progress};
use crate::stats::Stats;
use crate::verify::verify_window;
use crate::Decoder;

/// Checks that draft and target share a vocabulary (same LM head size).
pub(crate) fn check_pair(target: &Model, draft: &Model) -> Result<()> {
    if target.vocab_size() != draft.vocab_size() {
        return Err(Error::VocabularyMismatch {
            draft: draft.vocab_size(),
            target: target.vocab_size(),
            detail: String::new(),
        });
    }
    Ok(())
}

/// Checks that two tokenizers map every id to the same token, so that ids proposed by the draft
/// mean the same text to the target. Equal sizes are not enough: a reordered or extended
/// vocabulary silently turns proposals into garbage that the target rejects.
pub fn check_tokenizers(
    target: &mirror_core::Tokenizer,
    draft: &mirror_core::Tokenizer,
) -> Result<()> {
    let (t, d) = (target.vocab_size(), draft.vocab_size());
    let first_difference =
        (0..t.min(d) as u32).find(|&id| target.id_to_token(id) != draft.id_to_token(id));
    if t != d || first_difference.is_some() {
        let detail = match first_difference {
            Some(id) => format!(
                " (first difference at id {id}: target {:?}, draft {:?})",
                target.id_to_token(id),
                draft.id_to_token(id)
            ),
            None => String::new(),
        };
        return Err(Error::VocabularyMismatch {
            draft: d,
            target: t,
            detail,
        });
    }
    Ok(())
}

/// Default of `stream_confidence` on the builders: a stream token is proposed when its stream
/// puts at least this probability on it (measured on the Qwen2.5-Coder pair, BENCHMARKS.md).
pub const DEFAULT_STREAM_CONFIDENCE: f32 = 0.5;

/// Checks a stream-confidence threshold.
pub(crate) fn check_stream_confidence(threshold: f32) -> Result<()> {
    if !(0.0..=1.0).contains(&threshold) {
        return Err(Error::InvalidConfig(format!(
            "stream_confidence must be within [0, 1], got {threshold}"
        )));
    }
    Ok(())
}

/// Draft sampling settings: greedy drafts propose point masses, otherwise the draft samples from
/// the same warp as the target.
pub(crate) fn draft_params(config: &GenerationConfig, greedy_draft: bool) -> SamplingParams {
    if greedy_draft {
        SamplingParams::greedy()
    } else {
        config.sampling
    }
}

/// Builder of [`SpeculativeDecoding`].
pub struct SpeculativeBuilder {
    target: Arc<Model>,
    draft: Arc<Model>,
    gamma: usize,
    greedy_draft: bool,
    stream_confidence: f32,
}

impl SpeculativeBuilder {
    /// With a draft that has speculative streams: propose a stream's token only when its top
    /// probability reaches `threshold` (default [`DEFAULT_STREAM_CONFIDENCE`]; 0 proposes all).
    pub fn stream_confidence(mut self, threshold: f32) -> Self {
        self.stream_confidence = threshold;
        self
    }

    /// Window length (draft tokens per target pass), default 4.
    pub fn gamma(mut self, gamma: usize) -> Self {
        self.gamma = gamma;
        self
    }

    /// Under sampling, let the draft propose its argmax (point-mass rule) instead of sampling.
    pub fn greedy_draft(mut self, yes: bool) -> Self {
        self.greedy_draft = yes;
        self
    }

    /// Checks the pair and builds the decoder.
    pub fn build(self) -> Result<SpeculativeDecoding> {
        if self.gamma == 0 {
            return Err(Error::InvalidConfig("gamma must be at least 1".into()));
        }
        check_pair(&self.target, &self.draft)?;
        check_stream_confidence(self.stream_confidence)?;
        let mut draft = DraftState::new(Arc::clone(&self.draft));
        draft.stream_confidence = self.stream_confidence;
        Ok(SpeculativeDecoding {
            draft,
            target: self.target,
            gamma: self.gamma,
            greedy_draft: self.greedy_draft,
        })
    }
}

/// Vanilla speculative decoding.
pub struct SpeculativeDecoding {
    target: Arc<Model>,
    draft: DraftState,
    gamma: usize,
    greedy_draft: bool,
}

impl SpeculativeDecoding {
    /// A builder for `target` verified against proposals of `draft`.
    pub fn builder(target: Arc<Model>, draft: Arc<Model>) -> SpeculativeBuilder {
        SpeculativeBuilder {
            target,
            draft,
            gamma: 4,
            greedy_draft: false,
            stream_confidence: DEFAULT_STREAM_CONFIDENCE,
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

    fn generate_stream(
        &mut self,
        prompt: &[u32],
        config: &GenerationConfig,
        on_tokens: &mut dyn FnMut(&[u32]) -> StreamControl,
    ) -> Result<Generation> {
        let started = Instant::now();
        let gamma = self.gamma;
        let capacity = capacity_for(&self.target, prompt, config, gamma)?;
        let mut stats = Stats::new(gamma);
        let mut progress = Progress::new(config, &self.target, on_tokens);
        let mut rng = StdRng::seed_from_u64(mix(config.seed, 1));
        let mut cache = self.target.new_cache(1, capacity)?;
        let mut seq = prompt.to_vec();
        let n = seq.len();
        if n > 1 {
            self.target.next_token_logits(&seq[..n - 1], &mut cache)?;
        }
        self.draft.reset(
            capacity,
            capacity,
            draft_params(config, self.greedy_draft),
            progress.stop_ids().to_vec(),
        )?;
        if n > 1 {
            self.draft.sync(&seq[..n - 1])?;
        }
        self.draft.take_counters();
        stats.time.prefill = started.elapsed();
        let mut step = 0u64;
        while !progress.done() {
            if cache.len() + 1 > cache.capacity() {
                progress.finish = Some(FinishReason::ContextLimit);
                break;
            }
            let room = cache.capacity() - cache.len() - 1;
            let window = self
                .draft
                .rollout(&seq, gamma.min(room), mix(config.seed, step))?;
            stats.record_draft(self.draft.take_counters());

            let pass = Instant::now();
            let base = cache.len();
            let mut fed = vec![seq[seq.len() - 1]];
            fed.extend_from_slice(&window.tokens);
            let rows = host_rows(&self.target.forward_causal(&fed, &mut cache)?.unsqueeze(0)?)?;
            stats.time.target_prefix += pass.elapsed();
            stats.target_passes += 1;

            let verify = Instant::now();
            let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
            let verdict = verify_window(&refs, &window, &config.sampling, &mut || rng.random())?;
            stats.record_window(window.len(), verdict.accepted);
            cache.truncate(base + 1 + verdict.accepted);
            let mut new = window.tokens[..verdict.accepted].to_vec();
            new.push(verdict.token);
            seq.extend_from_slice(&new);
            stats.time.verify += verify.elapsed();
            progress.commit(&new);
            step += 1;
        }
        Ok(progress.finish(stats, started))
    }
}
