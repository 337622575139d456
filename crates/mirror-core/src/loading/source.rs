//! Where a model comes from, as a user names it: a local directory or GGUF file, or a hub
//! repository.

use std::path::{Path, PathBuf};

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A directory with `config.json`, `*.safetensors` and `tokenizer.json`.
    Dir(PathBuf),
    /// A GGUF file (weights, config and tokenizer in one).
    Gguf(PathBuf),
    /// A hub repository: safetensors layout, or one GGUF file of it when `file` is given.
    Hub {
        /// `org/name`.
        repo: String,
        /// Branch, tag or commit; `main` when absent.
        revision: Option<String>,
        /// A `.gguf` file in the repository.
        file: Option<String>,
    },
}

impl ModelSource {
    /// Reads a source from a string: an existing directory, a path ending in `.gguf`, or a hub id
    /// `org/name`, `org/name@revision`, `org/name:file.gguf` (`@revision` may follow the file).
    pub fn parse(text: &str) -> Self {
        let path = Path::new(text);
        if path.is_dir() {
            return Self::Dir(path.to_path_buf());
        }
        if text.ends_with(".gguf") && (path.exists() || !text.contains(':')) {
            return Self::Gguf(path.to_path_buf());
        }
        let (rest, revision) = match text.rsplit_once('@') {
            Some((rest, rev)) => (rest, Some(rev.to_string())),
            None => (text, None),
        };
        let (repo, file) = match rest.split_once(':') {
            Some((repo, file)) => (repo.to_string(), Some(file.to_string())),
            None => (rest.to_string(), None),
        };
        Self::Hub {
            repo,
            revision,
            file,
        }
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir(p) | Self::Gguf(p) => write!(f, "{}", p.display()),
            Self::Hub { repo, file, .. } => match file {
                Some(file) => write!(f, "{repo}:{file}"),
                None => write!(f, "{repo}"),
            },
        }
    }
}
