//! What the batched engine is asked: its settings, one sequence's request, and where the
//! sequence's tokens go. Data only.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::super::pool::PooledCache;
use crate::adaptive::WindowPolicy;
use crate::constraint::ConstraintState;
use crate::draft::lookup::LookupConfig;
use crate::error::{Error, Result};
use crate::generation::{Generation, GenerationConfig, StreamControl, TokenLogprob};
use crate::monitor::BoundaryTokens;
use crate::strategy::mirror::MirrorSettings;

/// The batched engine's settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchSettings {
    /// Most sequences running at once (default 16).
    pub max_batch: usize,
    /// Bytes the running sequences' KV caches may take together (default 4 GiB).
    pub kv_budget_bytes: u64,
    /// Most rows one step's forward takes, prompt chunks and windows included (default 256).
    pub step_tokens: usize,
    /// Most prompt tokens one sequence prefills in one step (default 128), so that a long prompt
    /// does not stall everyone's next token.
    pub prefill_chunk: usize,
    /// Keep finished sequences' caches in the pool for prompts that start like them (default
    /// on; see the `prefix` module).
    pub prefix_cache: bool,
    /// How much slower a step with prompt chunks may be than its decode rows alone (default
    /// 4): chunked prefill then delays the running sequences' next tokens by at most this
    /// factor, priced by the measured step-time line (see [`crate::adaptive`]).
    pub prefill_slowdown: f64,
    /// How many of a lookup window's tokens go into a step: all of them (`Fixed`, as
    /// [`crate::SpeculativeDecoding`] with fixed windows), or as many as raise the batch's
    /// committed tokens per second, from measured step times and each sequence's acceptance
    /// (`Adaptive`, the default; see [`crate::adaptive`]). Greedy output is the same either
    /// way; under sampling the output distribution is exact either way, but a seed reproduces a
    /// sequence's output alone only with `Fixed`.
    pub window: WindowPolicy,
    /// Under a constraint, propose the tokens the grammar forces as the window (default on);
    /// off, they are decoded one target pass each, as any token (for comparison).
    pub forced_drafts: bool,
    /// The settings of Mirror sequences ([`Speculation::Mirror`]): early-exit layer, kappa and
    /// its lowering with the batch ([`MirrorSettings::batch_candidates`]), drafting schedule,
    /// lookup and the draft's threads. Their windows' length is the sequence's own `gamma`.
    pub mirror: MirrorSettings,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            max_batch: 16,
            kv_budget_bytes: 4 << 30,
            step_tokens: 256,
            prefill_chunk: 128,
            prefix_cache: true,
            prefill_slowdown: 4.0,
            window: WindowPolicy::Adaptive,
            forced_drafts: true,
            mirror: MirrorSettings::default(),
        }
    }
}

impl BatchSettings {
    pub(crate) fn check(&self) -> Result<()> {
        let positive = [
            ("max_batch", self.max_batch),
            ("step_tokens", self.step_tokens),
            ("prefill_chunk", self.prefill_chunk),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::InvalidConfig(format!("{name} must be at least 1")));
            }
        }
        if self.prefill_slowdown.is_nan() || self.prefill_slowdown < 1.0 {
            return Err(Error::InvalidConfig(format!(
                "prefill_slowdown must be at least 1, got {}",
                self.prefill_slowdown
            )));
        }
        self.mirror.check()?;
        if self.kv_budget_bytes == 0 {
            return Err(Error::InvalidConfig(
                "kv_budget_bytes must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// How a batched sequence speculates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Speculation {
    /// One token per step (as [`crate::Autoregressive`]).
    #[default]
    None,
    /// Windows of up to `gamma` tokens drafted by prompt lookup, verified in the same forward (as
    /// [`crate::SpeculativeDecoding::prompt_lookup`] with fixed windows).
    Lookup {
        /// The lookup's n-gram range.
        lookup: LookupConfig,
        /// Most draft tokens per window.
        gamma: usize,
    },
    /// Windows of up to `gamma` tokens drafted by the engine's draft model (as
    /// [`crate::SpeculativeDecoding`] with fixed windows and no lookahead tokens). Every drafting
    /// sequence advances in the same ragged draft forward, one per draft step; the engine must
    /// have been started with a draft model ([`crate::EngineHandle::spawn_with_draft`]).
    Draft {
        /// Most draft tokens per window.
        gamma: usize,
        /// Draft greedily (a point mass) even when the sequence samples, as
        /// [`crate::SpeculativeSettings::greedy_draft`].
        greedy_draft: bool,
    },
    /// Mirror speculative decoding (as [`crate::Mirror`]), windows of up to `gamma` tokens: the
    /// step's target forward taps its early exit for the sequence's rows, and the sequence's
    /// draft worker (the engine's draft model on a thread of its own) drafts the hypothesis
    /// tree while the target runs its remaining layers; the rest of its settings are
    /// [`BatchSettings::mirror`]. The engine must have been started with a draft model.
    Mirror {
        /// Most draft tokens per window.
        gamma: usize,
    },
}

impl Speculation {
    /// Whether the sequence drafts with the engine's draft model in the batch's draft phase
    /// (vanilla SD; Mirror sequences draft on workers of their own).
    pub fn uses_draft_model(&self) -> bool {
        matches!(self, Speculation::Draft { .. })
    }

    /// Whether the sequence runs Mirror.
    pub fn is_mirror(&self) -> bool {
        matches!(self, Speculation::Mirror { .. })
    }
}

/// One sequence for the batched engine.
#[derive(Debug, Clone)]
pub struct SequenceRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Its own length, sampling, seed and stop tokens.
    pub config: GenerationConfig,
    /// How it speculates.
    pub speculation: Speculation,
    /// When it must end; output so far is returned with [`FinishReason::Deadline`].
    pub deadline: Option<Instant>,
}

impl SequenceRequest {
    /// Greedy, no speculation, no deadline.
    pub fn new(prompt: Vec<u32>, config: GenerationConfig) -> Self {
        Self {
            prompt,
            config,
            speculation: Speculation::None,
            deadline: None,
        }
    }
}

/// Where a batched sequence's committed tokens go, and how it ends: the callback may cancel.
pub(crate) trait Sink: Send {
    /// Newly committed tokens, with their log-probabilities when the sequence asked for them;
    /// `Stop` cancels the sequence.
    fn tokens(&mut self, tokens: &[u32], logprobs: &[TokenLogprob]) -> StreamControl;
    /// Whether the consumer has gone (checked before every step, prefill included).
    fn cancelled(&self) -> bool;
    /// The end.
    fn finish(self: Box<Self>, result: Result<Generation>);
}

/// A sequence waiting for admission, with the forks that share its prompt.
pub(crate) struct Waiting {
    pub request: SequenceRequest,
    pub sink: Box<dyn Sink>,
    pub submitted: Instant,
    pub forks: Vec<Fork>,
    /// The compiled constraint of `request.config.constraint`.
    pub constraint: Option<ConstraintState>,
    /// The engine's boundary tokens, for the monitors of `request.config.monitors`.
    pub boundaries: Option<BoundaryTokens>,
}

impl Waiting {
    /// Ends this request with `error`, and its forks, which share its prompt, with
    /// `fork_error()`.
    pub fn fail(self, error: Error, fork_error: impl Fn() -> Error) {
        self.sink.finish(Err(error));
        for fork in self.forks {
            fork.sink.finish(Err(fork_error()));
        }
    }
}

/// Why a fork ends when the request whose prompt it shares cannot run.
pub(crate) fn shared_prompt_refused() -> Error {
    Error::InvalidPrompt("the prompt it shares was refused".into())
}

/// A sequence that shares another's prompt: the prompt is prefilled once, then its cache is
/// copied into each fork, which goes on with its own settings (seed, length, sampling).
pub(crate) struct Fork {
    pub config: GenerationConfig,
    pub sink: Box<dyn Sink>,
    pub constraint: Option<ConstraintState>,
}

/// The caches lent to one sequence: the target's, and the draft model's when it drafts.
pub(crate) struct Lent {
    pub target: PooledCache,
    pub draft: Option<PooledCache>,
}

/// A running engine's load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineLoad {
    /// Sequences running.
    pub running: usize,
    /// Sequences waiting for admission.
    pub waiting: usize,
    /// KV pool bytes in use.
    pub pool_used: u64,
    /// KV pool bytes free.
    pub pool_free: u64,
    /// Nodes of the prefix cache's radix trees (the target's and the draft model's), each the
    /// rows of one edge's tokens: a prefix shared by many finished sequences counts once.
    pub prefix_entries: usize,
    /// Bytes those take (part of `pool_used`).
    pub prefix_bytes: u64,
    /// Steps that ran a forward since the engine started.
    pub steps: u64,
    /// Rows those forwards had, in all (`rows / steps` is the mean rows of a step).
    pub rows: u64,
    /// Sequences that fed those forwards, summed over the steps (`stepped_sequences / steps`
    /// is the mean batch of a step).
    pub stepped_sequences: u64,
}

/// What one step did, for statistics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Sequences that contributed rows.
    pub sequences: usize,
    /// Rows of the forward.
    pub rows: usize,
}

pub(crate) fn gamma_of(request: &SequenceRequest) -> usize {
    match request.speculation {
        Speculation::None => 0,
        Speculation::Lookup { gamma, .. }
        | Speculation::Draft { gamma, .. }
        | Speculation::Mirror { gamma } => gamma,
    }
}

/// Checks a sequence's speculation against the engine (`has_draft`: started with a draft model).
pub(crate) fn check_speculation(speculation: Speculation, has_draft: bool) -> Result<()> {
    let gamma = match speculation {
        Speculation::None => return Ok(()),
        Speculation::Lookup { lookup, gamma } => {
            lookup.check()?;
            gamma
        }
        Speculation::Draft { gamma, .. } | Speculation::Mirror { gamma } => {
            if !has_draft {
                return Err(Error::InvalidConfig(
                    "draft-model speculation needs an engine started with a draft model".into(),
                ));
            }
            gamma
        }
    };
    if gamma == 0 {
        return Err(Error::InvalidConfig("gamma must be at least 1".into()));
    }
    Ok(())
}
