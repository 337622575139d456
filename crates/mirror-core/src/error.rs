//! The one error type of `mirror-core`.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
///
/// Every variant names the file or the value at fault, so that a user can act on the message
/// without reading our code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor operation failed inside candle (shape mismatch, device error, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A file or directory that loading needs does not exist.
    #[error("missing file {path}: {what}")]
    MissingFile {
        /// The path that was looked for.
        path: PathBuf,
        /// What the file was expected to hold.
        what: String,
    },

    /// A file exists but could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },

    /// A file is truncated or its contents do not parse as the expected format.
    #[error("corrupt or truncated file {path}: {reason}")]
    CorruptFile {
        /// The file that failed to parse.
        path: PathBuf,
        /// What the parser reported.
        reason: String,
    },

    /// `config.json` (or GGUF metadata) is invalid or inconsistent.
    #[error("invalid model config ({source_name}): {reason}")]
    InvalidConfig {
        /// Where the config came from (a path or `GGUF metadata of <path>`).
        source_name: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The model declares an architecture this crate does not implement.
    #[error("unsupported architecture `{architecture}` in {source_name}; supported: llama, qwen2, qwen3, mistral")]
    UnsupportedArchitecture {
        /// The architecture string found.
        architecture: String,
        /// Where it was found.
        source_name: String,
    },

    /// A weight the architecture needs is absent from the checkpoint.
    #[error("tensor `{name}` is missing from {path}")]
    MissingTensor {
        /// The tensor's name in the checkpoint's naming scheme.
        name: String,
        /// The checkpoint file or directory.
        path: PathBuf,
    },

    /// A weight has a shape that does not match the config.
    #[error("tensor `{name}` in {path} has shape {actual:?}, but the config implies {expected:?}")]
    TensorShape {
        /// The tensor's name.
        name: String,
        /// The checkpoint file.
        path: PathBuf,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape found in the file.
        actual: Vec<usize>,
    },

    /// The tokenizer could not be loaded or used.
    #[error("tokenizer error ({source_name}): {reason}")]
    Tokenizer {
        /// The tokenizer file or GGUF file.
        source_name: String,
        /// What failed.
        reason: String,
    },

    /// The tokenizer produces ids the model has no embedding for.
    #[error("tokenizer {source_name} has {tokenizer_vocab} tokens but the model's vocabulary has only {model_vocab}")]
    VocabularyMismatch {
        /// The tokenizer file.
        source_name: String,
        /// Number of ids the tokenizer can produce.
        tokenizer_vocab: usize,
        /// Rows of the model's embedding matrix.
        model_vocab: usize,
    },

    /// A chat template failed to parse or render.
    #[error("chat template error: {0}")]
    ChatTemplate(String),

    /// A token id is outside the model's vocabulary.
    #[error("token id {token} is out of range for a vocabulary of {vocab_size}")]
    TokenOutOfRange {
        /// The offending id.
        token: u32,
        /// The model's vocabulary size.
        vocab_size: usize,
    },

    /// Appending to a KV cache would exceed its capacity (the context limit).
    #[error("context overflow: {requested} positions requested but the KV cache holds at most {capacity}")]
    ContextOverflow {
        /// Length the cache would reach.
        requested: usize,
        /// Capacity the cache was created with.
        capacity: usize,
    },

    /// A call's arguments are inconsistent (layer range, mask shape, rows to keep, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The Hugging Face hub could not provide a file (offline and not cached, or a network error).
    #[error("hub: cannot get {file} of {repo}: {reason}")]
    Hub {
        /// The repository id.
        repo: String,
        /// The file within it.
        file: String,
        /// Why it could not be obtained.
        reason: String,
    },

    /// A model named as a local path (by its form: see
    /// [`ModelSource::parse`](crate::ModelSource::parse)) does not exist.
    #[error("model path {path} does not exist; to load from the Hugging Face hub instead, name the repository as `org/name` (or `org/name:file.gguf`)")]
    ModelPathNotFound {
        /// The path as given.
        path: PathBuf,
    },

    /// The system refused memory for a model's weights (the mapping failed).
    #[error("cannot allocate {bytes} bytes for weights: {source}")]
    Allocation {
        /// The bytes asked for.
        bytes: usize,
        /// The operating system's error.
        source: std::io::Error,
    },

    /// A worker thread pool could not be built.
    #[error("thread pool: {0}")]
    ThreadPool(String),
}

/// Result alias for `mirror-core`.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile {
                path,
                what: "file not found".into(),
            }
        } else {
            Error::Io { path, source }
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}

/// The message of a caught panic (`std::panic::catch_unwind`'s payload): the text given to
/// `panic!`, or "unknown panic" for a payload that is not a string. Used wherever a panic in
/// a library or a worker thread is turned into a typed error.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
