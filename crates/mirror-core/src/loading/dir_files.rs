//! The files of a Hugging Face model directory, local or in the hub cache.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::formats::hub::HubRepo;

/// The files of a Hugging Face model directory, wherever they are.
#[derive(Debug, Clone)]
pub struct DirFiles {
    /// `config.json`.
    pub config: PathBuf,
    /// The safetensors shards, in index order.
    pub weights: Vec<PathBuf>,
    /// `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// `tokenizer_config.json`, if present.
    pub tokenizer_config: Option<PathBuf>,
    /// `generation_config.json`, if present.
    pub generation_config: Option<PathBuf>,
    /// `chat_template.jinja` (newer layout; takes precedence over `tokenizer_config.json`).
    pub chat_template: Option<PathBuf>,
}

const INDEX_FILE: &str = "model.safetensors.index.json";

/// Shard file names listed in a safetensors index, in first-appearance order.
fn shards_from_index(index_path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let corrupt = |reason: &str| Error::CorruptFile {
        path: index_path.to_path_buf(),
        reason: reason.to_string(),
    };
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| corrupt(&e.to_string()))?;
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| corrupt("no `weight_map` object"))?;
    let mut shards: Vec<String> = Vec::new();
    for file in map.values() {
        let file = file
            .as_str()
            .ok_or_else(|| corrupt("non-string shard name"))?;
        if !shards.iter().any(|s| s == file) {
            shards.push(file.to_string());
        }
    }
    Ok(shards)
}

impl DirFiles {
    /// The files of a local directory.
    pub fn local(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
                what: "a model directory".into(),
            });
        }
        let existing = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        let weights = if let Some(index) = existing(INDEX_FILE) {
            shards_from_index(&index)?
                .into_iter()
                .map(|s| dir.join(s))
                .collect()
        } else if let Some(single) = existing("model.safetensors") {
            vec![single]
        } else {
            // Other *.safetensors files in a directory (adapters, references) are not guessed at.
            return Err(Error::MissingFile {
                path: dir.join("model.safetensors"),
                what: format!("the weights (model.safetensors or {INDEX_FILE})"),
            });
        };
        Ok(Self {
            config: dir.join("config.json"),
            weights,
            tokenizer: dir.join("tokenizer.json"),
            tokenizer_config: existing("tokenizer_config.json"),
            generation_config: existing("generation_config.json"),
            chat_template: existing("chat_template.jinja"),
        })
    }

    /// The files of a hub repository, fetched into (or found in) the hub cache.
    pub fn hub(hub: &HubRepo) -> Result<Self> {
        let config = hub.get("config.json")?;
        let weights = match hub.get_optional(INDEX_FILE) {
            Some(index) => shards_from_index(&index)?
                .iter()
                .map(|s| hub.get(s))
                .collect::<Result<Vec<_>>>()?,
            None => vec![hub.get("model.safetensors")?],
        };
        Ok(Self {
            config,
            weights,
            tokenizer: hub.get("tokenizer.json")?,
            tokenizer_config: hub.get_optional("tokenizer_config.json"),
            generation_config: hub.get_optional("generation_config.json"),
            chat_template: hub.get_optional("chat_template.jinja"),
        })
    }
}
