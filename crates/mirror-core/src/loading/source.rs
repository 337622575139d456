//! Where a model comes from, as a user names it: a local directory or GGUF file, or a hub
//! repository.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

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
    /// Reads a source from a string: an existing directory, an existing file (GGUF), a path
    /// ending in `.gguf`, or a hub id `org/name`, `org/name@revision`, `org/name:file.gguf`
    /// (`@revision` may follow the file).
    ///
    /// Text that is a local path by its form fails with [`Error::ModelPathNotFound`] when
    /// nothing exists there, instead of being sent to the hub: it starts with `.`, `/` or `~`,
    /// or its repository part (before any `:file` or `@revision`) has more than one `/`, or the
    /// first component of that part is an existing directory (`models/` in `models/qwen-dir`).
    pub fn parse(text: &str) -> Result<Self> {
        Self::parse_in(text, Path::new(""))
    }

    /// [`ModelSource::parse`] with relative paths looked up under `dir` (the current directory
    /// for an empty `dir`); the source keeps the path as written.
    fn parse_in(text: &str, dir: &Path) -> Result<Self> {
        let path = Path::new(text);
        let on_disk = dir.join(path);
        if on_disk.is_dir() {
            return Ok(Self::Dir(path.to_path_buf()));
        }
        if on_disk.is_file() {
            return Ok(Self::Gguf(path.to_path_buf()));
        }
        let (rest, revision) = match text.rsplit_once('@') {
            Some((rest, rev)) => (rest, Some(rev.to_string())),
            None => (text, None),
        };
        let (repo, file) = match rest.split_once(':') {
            Some((repo, file)) => (repo, Some(file.to_string())),
            None => (rest, None),
        };
        let first_is_dir = || {
            repo.split_once('/')
                .is_some_and(|(first, _)| dir.join(first).is_dir())
        };
        if text.starts_with(['.', '/', '~']) || repo.matches('/').count() > 1 || first_is_dir() {
            return Err(Error::ModelPathNotFound {
                path: path.to_path_buf(),
            });
        }
        if text.ends_with(".gguf") && !text.contains(':') {
            return Ok(Self::Gguf(path.to_path_buf()));
        }
        Ok(Self::Hub {
            repo: repo.to_string(),
            revision,
            file,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(repo: &str, revision: Option<&str>, file: Option<&str>) -> ModelSource {
        ModelSource::Hub {
            repo: repo.into(),
            revision: revision.map(Into::into),
            file: file.map(Into::into),
        }
    }

    fn is_missing_path(result: Result<ModelSource>, expected: &str) -> bool {
        matches!(result, Err(Error::ModelPathNotFound { path }) if path == Path::new(expected))
    }

    /// A temporary working directory holding `models/qwen-dir/` and `models/tiny.gguf`.
    fn workdir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("models/qwen-dir")).unwrap();
        std::fs::write(dir.path().join("models/tiny.gguf"), b"GGUF").unwrap();
        dir
    }

    #[test]
    fn existing_directories_and_files_are_local() {
        let work = workdir();
        let at = work.path();
        assert_eq!(
            ModelSource::parse_in("models/qwen-dir", at).unwrap(),
            ModelSource::Dir("models/qwen-dir".into())
        );
        assert_eq!(
            ModelSource::parse_in("models/tiny.gguf", at).unwrap(),
            ModelSource::Gguf("models/tiny.gguf".into())
        );
        let absolute = at.join("models/qwen-dir");
        assert_eq!(
            ModelSource::parse(absolute.to_str().unwrap()).unwrap(),
            ModelSource::Dir(absolute.clone())
        );
    }

    #[test]
    fn missing_paths_that_look_local_are_errors_naming_the_path() {
        let work = workdir();
        let at = work.path();
        for text in [
            "models/qwen-typo",
            "models/missing.gguf",
            "./qwen-dir",
            "../qwen-dir",
            "~/models/qwen-dir",
            "/no/such/model",
            "a/b/c",
            "models/qwen-typo@main",
        ] {
            assert!(
                is_missing_path(ModelSource::parse_in(text, at), text),
                "{text}"
            );
        }
        let message = ModelSource::parse_in("models/qwen-typo", at)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("models/qwen-typo") && message.contains("`org/name`"),
            "{message}"
        );
    }

    #[test]
    fn hub_ids_stay_hub_repositories_without_a_local_directory_of_their_name() {
        let work = workdir();
        let at = work.path();
        assert_eq!(
            ModelSource::parse_in("HuggingFaceTB/SmolLM2-135M-Instruct", at).unwrap(),
            hub("HuggingFaceTB/SmolLM2-135M-Instruct", None, None)
        );
        assert_eq!(
            ModelSource::parse_in("org/name@v1", at).unwrap(),
            hub("org/name", Some("v1"), None)
        );
        assert_eq!(
            ModelSource::parse_in("org/name:sub/file.gguf@refs/pr/1", at).unwrap(),
            hub("org/name", Some("refs/pr/1"), Some("sub/file.gguf"))
        );
        // A first component that is a local directory makes the same text a path.
        std::fs::create_dir(at.join("org")).unwrap();
        assert!(is_missing_path(
            ModelSource::parse_in("org/name", at),
            "org/name"
        ));
    }

    #[test]
    fn a_gguf_name_that_is_no_path_by_its_form_stays_a_gguf_file() {
        let work = workdir();
        assert_eq!(
            ModelSource::parse_in("x.gguf", work.path()).unwrap(),
            ModelSource::Gguf("x.gguf".into())
        );
    }
}
