//! A target and its draft: the checks that make them a pair, and [`SpeculativeSettings`], the
//! settings of vanilla SD, which Mirror's settings include.

use mirror_core::sampling::SamplingParams;
use mirror_core::Model;
use serde::{Deserialize, Serialize};

use crate::adaptive::WindowPolicy;
use crate::draft::lookup::LookupConfig;
use crate::error::{Error, Result};
use crate::generation::GenerationConfig;

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

/// Default of [`SpeculativeSettings::lookahead_confidence`]: a lookahead token is proposed when its
/// row puts at least this probability on it (measured on the Qwen2.5-Coder pair,
/// BENCHMARKS.md).
pub const DEFAULT_LOOKAHEAD_CONFIDENCE: f32 = 0.5;

/// The settings of [`crate::SpeculativeDecoding`]: how the draft proposes and how windows are
/// sized. [`crate::MirrorSettings`] holds one too. The builders, the server and the examples'
/// flags are all made from this struct and its `Default`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpeculativeSettings {
    /// Draft tokens per window (default 4).
    pub gamma: usize,
    /// Under sampling, propose the draft's argmax (a point mass) instead of sampling.
    pub greedy_draft: bool,
    /// With a draft that has lookahead tokens: propose one only when its top probability
    /// reaches this (0 proposes all).
    pub lookahead_confidence: f32,
    /// Prompt lookup tried before the draft model (`None`: the model alone). A strategy
    /// without a draft model drafts by lookup alone.
    pub lookup: Option<LookupConfig>,
    /// How each window's length is chosen (default: adaptive).
    pub window: WindowPolicy,
}

impl Default for SpeculativeSettings {
    fn default() -> Self {
        Self {
            gamma: 4,
            greedy_draft: false,
            lookahead_confidence: DEFAULT_LOOKAHEAD_CONFIDENCE,
            lookup: None,
            window: WindowPolicy::Adaptive,
        }
    }
}

impl SpeculativeSettings {
    pub(crate) fn check(&self) -> Result<()> {
        if self.gamma == 0 {
            return Err(Error::InvalidConfig("gamma must be at least 1".into()));
        }
        if !(0.0..=1.0).contains(&self.lookahead_confidence) {
            return Err(Error::InvalidConfig(format!(
                "lookahead_confidence must be within [0, 1], got {}",
                self.lookahead_confidence
            )));
        }
        if let Some(lookup) = &self.lookup {
            lookup.check()?;
        }
        Ok(())
    }

    /// The draft's sampling: a point mass when greedy, else the target's own warp.
    pub(crate) fn sampling(&self, config: &GenerationConfig) -> SamplingParams {
        if self.greedy_draft {
            SamplingParams::greedy()
        } else {
            config.sampling
        }
    }
}

/// The builder methods for [`SpeculativeSettings`], generated into both speculative builders
/// from this one definition; `$($field).+` is the builder's path to its `SpeculativeSettings`.
macro_rules! speculative_setters {
    ($($field:ident).+) => {
        /// Draft tokens per window (default 4).
        pub fn gamma(mut self, gamma: usize) -> Self {
            self.$($field).+.gamma = gamma;
            self
        }

        /// Under sampling, let the draft propose its argmax (a point mass) instead of sampling.
        pub fn greedy_draft(mut self, yes: bool) -> Self {
            self.$($field).+.greedy_draft = yes;
            self
        }

        /// With a draft that has lookahead tokens: propose one only when its top probability
        /// reaches `threshold` (default
        /// [`DEFAULT_LOOKAHEAD_CONFIDENCE`](crate::DEFAULT_LOOKAHEAD_CONFIDENCE); 0 proposes
        /// all).
        pub fn lookahead_confidence(mut self, threshold: f32) -> Self {
            self.$($field).+.lookahead_confidence = threshold;
            self
        }

        /// Tries prompt lookup ([`LookupConfig`](crate::LookupConfig)) before the draft model
        /// for every window: a window is looked up when the text so far repeats, drafted by
        /// the model otherwise.
        pub fn prompt_lookup(mut self, lookup: $crate::LookupConfig) -> Self {
            self.$($field).+.lookup = Some(lookup);
            self
        }

        /// How each window's length is chosen (default
        /// [`WindowPolicy::Adaptive`](crate::WindowPolicy::Adaptive)).
        pub fn window(mut self, policy: $crate::WindowPolicy) -> Self {
            self.$($field).+.window = policy;
            self
        }

        /// All the speculative settings at once.
        pub fn speculative_settings(mut self, settings: $crate::SpeculativeSettings) -> Self {
            self.$($field).+ = settings;
            self
        }
    };
}

pub(crate) use speculative_setters;
