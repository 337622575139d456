//! Files from the Hugging Face hub, cache first: a file already in the local hub cache is used
//! without touching the network, and with `HF_HUB_OFFLINE=1` the network is never used.

use std::path::PathBuf;

use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// A model repository on the hub, resolved through a local cache.
#[derive(Debug, Clone)]
pub struct HubRepo {
    repo_id: String,
    revision: String,
    cache: Cache,
    offline: bool,
}

impl HubRepo {
    /// `repo_id` at `revision` (default `main`), with the cache of `HF_HOME`/`HF_HUB_CACHE` and
    /// offline mode from `HF_HUB_OFFLINE`.
    pub fn new(repo_id: &str, revision: Option<&str>) -> Self {
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"))
            .unwrap_or(false);
        let cache = match std::env::var_os("HF_HUB_CACHE") {
            Some(dir) => Cache::new(PathBuf::from(dir)),
            None => Cache::from_env(),
        };
        Self {
            repo_id: repo_id.to_string(),
            revision: revision.unwrap_or("main").to_string(),
            cache,
            offline,
        }
    }

    /// Uses the hub cache rooted at `dir` (the folder holding `models--org--name`).
    pub fn with_cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache = Cache::new(dir.into());
        self
    }

    /// Never goes to the network when `offline` is true.
    pub fn offline(mut self, offline: bool) -> Self {
        self.offline = offline;
        self
    }

    /// The repository id.
    pub fn repo_id(&self) -> &str {
        &self.repo_id
    }

    fn repo(&self) -> Repo {
        Repo::with_revision(self.repo_id.clone(), RepoType::Model, self.revision.clone())
    }

    /// The local path of `file`: from the cache, else downloaded into it (unless offline).
    pub fn get(&self, file: &str) -> Result<PathBuf> {
        if let Some(path) = self.cache.repo(self.repo()).get(file) {
            return Ok(path);
        }
        let err = |reason: String| Error::Hub {
            repo: self.repo_id.clone(),
            file: file.to_string(),
            reason,
        };
        if self.offline {
            return Err(err(format!(
                "not in the local cache {} and offline mode is on",
                self.cache.path().display()
            )));
        }
        let api = hf_hub::api::sync::ApiBuilder::from_cache(self.cache.clone())
            .with_progress(true)
            .build()
            .map_err(|e| err(e.to_string()))?;
        api.repo(self.repo())
            .get(file)
            .map_err(|e| err(e.to_string()))
    }

    /// Like [`HubRepo::get`], but `Ok(None)` when the file does not exist in the repository or
    /// cannot be had (for optional files such as `generation_config.json`).
    pub fn get_optional(&self, file: &str) -> Option<PathBuf> {
        self.get(file).ok()
    }
}
