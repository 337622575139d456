//! The one error type of `mirror-scheduler`, and how a draft worker's failure is told.

/// What can go wrong while decoding.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A model, cache or tokenizer operation failed.
    #[error(transparent)]
    Core(#[from] mirror_core::Error),

    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Draft and target cannot be paired: their vocabularies differ.
    #[error(
        "draft and target vocabularies differ: draft has {draft} entries, target {target}{detail}"
    )]
    VocabularyMismatch {
        /// Rows of the draft's LM head.
        draft: usize,
        /// Rows of the target's LM head.
        target: usize,
        /// Further detail (first differing token), or empty.
        detail: String,
    },

    /// A constraint (JSON schema, regex, grammar) could not be compiled, or matches nothing;
    /// the source is the grammar compiler's message.
    #[error("invalid constraint: {source}")]
    InvalidConstraint {
        /// What the compiler said.
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A constrained sequence's grammar engine failed while decoding.
    #[error("the constraint failed while decoding: {source}")]
    ConstraintFailed {
        /// What the grammar engine said.
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A builder or generation setting is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// A generation setting that only the batched engine ([`crate::EngineHandle`]) implements
    /// was given to a one-sequence decoder.
    #[error(
        "{feature} run on the batched engine (EngineHandle); the one-sequence decoders do not"
    )]
    BatchedOnly {
        /// What was asked (`"generation monitors"`).
        feature: &'static str,
    },

    /// The prompt is empty or does not fit in the context.
    #[error("invalid prompt: {0}")]
    InvalidPrompt(String),

    /// A drafted window cannot be verified: tokens and choices of different lengths, target rows
    /// that do not match it, or tokens and draft distributions outside the vocabulary.
    #[error("invalid draft window: {0}")]
    InvalidWindow(String),

    /// A sequence's KV cache is larger than the batched engine's whole memory budget: it could
    /// never be admitted.
    #[error(
        "the sequence needs {needed} bytes of KV cache but the engine's budget is {budget} bytes \
         (raise BatchSettings::kv_budget_bytes or shorten the prompt or max_new_tokens)"
    )]
    MemoryBudget {
        /// Bytes of the sequence's cache.
        needed: u64,
        /// The pool's budget.
        budget: u64,
    },

    /// The batched engine's step failed in the target's forward; every sequence of that step
    /// ends with this error, sharing its source.
    #[error("the batched step failed: {source}")]
    StepFailed {
        /// The forward's error.
        #[source]
        source: std::sync::Arc<Error>,
    },

    /// The batched engine has stopped (its thread ended), so it takes no more sequences.
    #[error("the batched engine has stopped")]
    EngineStopped,

    /// Mirror's draft worker failed; the generation was stopped.
    #[error("draft worker failed: {source}")]
    WorkerFailed {
        /// What failed on the worker's side.
        #[source]
        source: WorkerFault,
    },

    /// The thread of a streamed generation ([`crate::Engine::stream`]) could not be started.
    #[error("cannot spawn the generation thread: {0}")]
    SpawnFailed(#[source] std::io::Error),

    /// The thread of a streamed generation panicked; the message is the panic's.
    #[error("the generation thread panicked: {0}")]
    GenerationPanicked(String),
}

/// Why Mirror's draft worker failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerFault {
    /// The draft model raised this error (a forward, its cache, its tensors).
    #[error(transparent)]
    Model(mirror_core::Error),

    /// The draft's own bookkeeping raised this error.
    #[error(transparent)]
    Drafting(Box<Error>),

    /// The draft panicked; the message is the panic's.
    #[error("panicked: {0}")]
    Panicked(String),

    /// The worker thread is gone (it panicked earlier, or was never started).
    #[error("the worker thread has exited")]
    Exited,

    /// The worker thread could not be started.
    #[error("cannot spawn the worker thread: {0}")]
    Spawn(#[source] std::io::Error),

    /// A fault injected by a test ([`crate::MirrorBuilder::inject_draft_fault`]).
    #[error("injected fault after {forwards} forward passes")]
    Injected {
        /// Draft forwards before the fault.
        forwards: usize,
    },
}

impl From<Error> for WorkerFault {
    /// Sorts an error the draft raised: the model's own errors stay matchable as
    /// [`WorkerFault::Model`].
    fn from(error: Error) -> Self {
        match error {
            Error::Core(e) => WorkerFault::Model(e),
            Error::Candle(e) => WorkerFault::Model(mirror_core::Error::Candle(e)),
            Error::WorkerFailed { source } => source,
            other => WorkerFault::Drafting(Box::new(other)),
        }
    }
}

impl From<WorkerFault> for Error {
    fn from(source: WorkerFault) -> Self {
        Error::WorkerFailed { source }
    }
}

/// Result alias for `mirror-scheduler`.
pub type Result<T> = std::result::Result<T, Error>;
