//! The one error type of `mirror-scheduler`.

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

    /// A builder or generation setting is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// The prompt is empty or does not fit in the context.
    #[error("invalid prompt: {0}")]
    InvalidPrompt(String),

    /// A drafted window cannot be verified: tokens and choices of different lengths, target rows
    /// that do not match it, or tokens and draft distributions outside the vocabulary.
    #[error("invalid draft window: {0}")]
    InvalidWindow(String),

    /// The draft worker thread failed (returned an error or panicked); generation was stopped.
    #[error("draft worker failed: {0}")]
    WorkerFailed(String),
}

/// Result alias for `mirror-scheduler`.
pub type Result<T> = std::result::Result<T, Error>;
