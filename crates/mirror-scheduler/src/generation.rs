//! What a generation is asked and what it gives: settings, stop tokens, the result. Data
//! only (with [`crate::stats`]).

use mirror_core::sampling::{log_sum_exp, Penalties, SamplingParams};
use mirror_core::Model;
use serde::Serialize;

use crate::monitor::{largest, MonitorConfig, MonitorReport};
use crate::stats::Stats;

/// Settings of one generation.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Temperature, top-k and top-p; greedy by default.
    pub sampling: SamplingParams,
    /// Seed of the random generator (sampling only); the same seed gives the same output.
    pub seed: u64,
    /// Stop at the model's end-of-sequence ids.
    pub stop_at_eos: bool,
    /// Further ids that end generation.
    pub stop_tokens: Vec<u32>,
    /// Output that must follow a JSON schema, a regex or a grammar (`None`: free text). Runs
    /// on the batched engine ([`crate::EngineHandle`]), under every speculation it has; the
    /// one-sequence decoders refuse it.
    pub constraint: Option<Constraint>,
    /// Frequency, presence and repetition penalties and logit bias, applied to the target's
    /// logits at every verified row (neutral by default); see [`Penalties`].
    pub penalties: Penalties,
    /// Return each generated token's log-probability and this many of the likeliest
    /// alternatives at its position (`None`: none). Read from the target's own distribution at
    /// the verified row, before penalties, constraint and sampling warp (vLLM's default), so
    /// they are the same under every speculation. Batched engine only.
    pub logprobs: Option<usize>,
    /// Generation monitors to run over the committed tokens (`None`: none), read from the same
    /// raw rows as `logprobs`; see [`crate::monitor`]. Their early stop is off unless
    /// [`MonitorConfig::early_stop`]. Batched engine only.
    pub monitors: Option<MonitorConfig>,
}

/// A generated token's log-probability under the target, and the likeliest tokens there.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprob {
    /// The token.
    pub token: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The likeliest tokens at its position with theirs, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Log-probabilities of `tokens`, token `j` read from `rows[j]` (raw logits), with the `top`
/// likeliest alternatives each: one vectorized pass for the log-sum-exp
/// ([`log_sum_exp`], to about 4e-6) and one for the `top` largest logits a row (the order of logits is that of log-probabilities).
pub fn token_logprobs(rows: &[Vec<f32>], tokens: &[u32], top: usize) -> Vec<TokenLogprob> {
    tokens
        .iter()
        .zip(rows)
        .map(|(&token, row)| {
            let log_sum = log_sum_exp(row) as f32;
            // The `top` largest, largest first, lower id first on ties.
            let best = largest(row, top);
            TokenLogprob {
                token,
                logprob: row
                    .get(token as usize)
                    .map_or(f32::NEG_INFINITY, |&l| l - log_sum),
                top: best.into_iter().map(|(t, l)| (t, l - log_sum)).collect(),
            }
        })
        .collect()
}

/// What a constrained generation's output must match. Every verified position samples (or takes
/// the argmax) from the target's distribution masked to the tokens the constraint allows there
/// and renormalized, so speculation stays lossless with respect to that constrained
/// distribution. A generation ends when the constraint is complete (its end-of-sequence token
/// is then the only one allowed), or at `max_new_tokens` with the output cut short.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Constraint {
    /// A JSON value valid under this JSON schema (llguidance's supported subset of draft
    /// 2020-12: an unsupported keyword is an error, not ignored).
    JsonSchema(serde_json::Value),
    /// Any JSON object (OpenAI's `{"type": "json_object"}`).
    JsonObject,
    /// Text matching this regular expression (whole output; Rust `regex` syntax).
    Regex(String),
    /// Text in the language of this Lark grammar (llguidance's Lark dialect, `start` rule).
    Lark(String),
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            sampling: SamplingParams::greedy(),
            seed: 0,
            stop_at_eos: true,
            stop_tokens: Vec::new(),
            constraint: None,
            penalties: Penalties::default(),
            logprobs: None,
            monitors: None,
        }
    }
}

impl GenerationConfig {
    /// Greedy decoding of up to `max_new_tokens`.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            ..Self::default()
        }
    }
}

/// The tokens that end a generation: the config's own, and the target's end-of-sequence ids
/// when `stop_at_eos` (an [`crate::Engine`] adds its tokenizer's too). Decided here, once per
/// generation, and handed to whatever needs it (the committed output, the draft, the tree).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopSet(Vec<u32>);

impl StopSet {
    /// The stop tokens of a generation with `config` on `target`.
    pub fn new(config: &GenerationConfig, target: &Model) -> Self {
        let mut ids = config.stop_tokens.clone();
        if config.stop_at_eos {
            ids.extend(target.config().eos_token_ids());
        }
        Self::from_tokens(&ids)
    }

    /// Exactly these stop tokens.
    pub fn from_tokens(tokens: &[u32]) -> Self {
        let mut ids = tokens.to_vec();
        ids.sort_unstable();
        ids.dedup();
        Self(ids)
    }

    /// Whether `token` ends the generation.
    pub fn contains(&self, token: u32) -> bool {
        self.0.binary_search(&token).is_ok()
    }

    /// Whether a window or branch ending in `tokens` has ended.
    pub fn ends(&self, tokens: &[u32]) -> bool {
        tokens.last().is_some_and(|&t| self.contains(t))
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub enum FinishReason {
    /// `max_new_tokens` were generated.
    Length,
    /// An end-of-sequence or stop token was generated (it is included in the output).
    Stop,
    /// The KV cache is full: the context limit was reached. Output so far is returned.
    ContextLimit,
    /// The caller cancelled a streaming generation.
    Cancelled,
    /// The sequence's deadline passed (batched engine); output so far is returned.
    Deadline,
    /// A monitor's stop rule fired under [`MonitorConfig::early_stop`] (batched engine); output
    /// so far, the token that fired it included, is returned.
    Monitor,
}

/// The result of a generation.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// Generated token ids (the prompt excluded).
    pub tokens: Vec<u32>,
    /// Their text, when generated through an [`crate::Engine`] with a tokenizer.
    pub text: Option<String>,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// Acceptance, reuse and timing statistics.
    pub stats: Stats,
    /// One per token when [`GenerationConfig::logprobs`] asked for them (else empty).
    pub logprobs: Vec<TokenLogprob>,
    /// The monitors' summaries when [`GenerationConfig::monitors`] asked for them.
    pub monitors: Option<MonitorReport>,
}

/// What a streaming callback tells the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamControl {
    /// Keep generating.
    Continue,
    /// Stop now; the generation ends with [`FinishReason::Cancelled`].
    Stop,
}
