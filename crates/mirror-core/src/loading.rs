//! Loading a model and its tokenizer from a Hugging Face model directory, a GGUF file, or a hub
//! repository id.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::config::{ModelConfig, TokenIds};
use crate::error::{Error, Result};
use crate::hub::HubRepo;
use crate::models::{config_from_gguf, lookahead::LookaheadHead, transformer::Model};
use crate::tokenizer::Tokenizer;
use crate::weights::{GgufWeights, SafetensorsWeights, WeightFormat, WeightSource};

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

/// How to load: weight format, dtype, device and CPU threads.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// How weight matrices are kept: as stored (the default: GGUF stays quantized), quantized
    /// at load to a GGML type, or dequantized to `dtype`.
    pub weights: WeightFormat,
    /// Activations, and float weights; f32 by default (the CPU kernels for quantized weights
    /// take f32).
    pub dtype: DType,
    /// Where the weights live.
    pub device: Device,
    /// Give the model its own rayon pool of this many threads (CPU).
    pub threads: Option<usize>,
    /// Pin the model's pool to these cores (one thread each unless `threads` says otherwise).
    /// See [`crate::threads`] for the policy.
    pub cores: Option<Vec<usize>>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            weights: WeightFormat::AsStored,
            dtype: DType::F32,
            device: Device::Cpu,
            threads: None,
            cores: None,
        }
    }
}

/// A model with its tokenizer.
#[derive(Debug)]
pub struct LoadedModel {
    /// The decoder.
    pub model: Model,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
}

/// Loads model and tokenizer from `source`.
pub fn load(source: &ModelSource, options: &LoadOptions) -> Result<LoadedModel> {
    let loaded = match source {
        ModelSource::Dir(dir) => load_dir(&DirFiles::local(dir)?, options)?,
        ModelSource::Gguf(path) => load_gguf(path, options)?,
        ModelSource::Hub {
            repo,
            revision,
            file,
        } => load_hub(
            &HubRepo::new(repo, revision.as_deref()),
            file.as_deref(),
            options,
        )?,
    };
    Ok(loaded)
}

/// Loads from a hub repository (cache first): one GGUF `file` of it, or its safetensors layout.
pub fn load_hub(hub: &HubRepo, file: Option<&str>, options: &LoadOptions) -> Result<LoadedModel> {
    match file {
        Some(file) => load_gguf(&hub.get(file)?, options),
        None => load_dir(&DirFiles::hub(hub)?, options),
    }
}

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

fn check_vocab(tokenizer: &Tokenizer, model: &Model) -> Result<()> {
    if tokenizer.vocab_size() > model.vocab_size() {
        return Err(Error::VocabularyMismatch {
            source_name: tokenizer.source_name().to_string(),
            tokenizer_vocab: tokenizer.vocab_size(),
            model_vocab: model.vocab_size(),
        });
    }
    Ok(())
}

fn read_config(path: &Path) -> Result<ModelConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::MissingFile {
            path: path.to_path_buf(),
            what: "the model config (config.json)".into(),
        },
        _ => Error::io(path, e),
    })?;
    ModelConfig::from_json(&text, &path.display().to_string())
}

/// Loads only the model (config and weights) of a Hugging Face directory, without a tokenizer.
///
/// A config that declares lookahead tokens (`speculative_streams`) loads their weights from `streams.safetensors` next to
/// `config.json` (their shape must match the declaration).
pub fn load_model_dir(files: &DirFiles, options: &LoadOptions) -> Result<Model> {
    let config = read_config(&files.config)?;
    let declares_streams = config.lookahead.is_some();
    let weights = SafetensorsWeights::open(&files.weights)?;
    let mut model = Model::load(config, &weights as &dyn WeightSource, options)?;
    if declares_streams {
        let path = files
            .config
            .parent()
            .unwrap_or(Path::new("."))
            .join(LOOKAHEAD_FILE);
        if !path.is_file() {
            return Err(Error::MissingFile {
                path,
                what: "lookahead weights declared by config.json".into(),
            });
        }
        let head = LookaheadHead::load(&path, options.dtype, &options.device)?;
        model = model.with_lookahead(std::sync::Arc::new(head))?;
    }
    Ok(model)
}

/// File of a model directory's lookahead weights.
pub const LOOKAHEAD_FILE: &str = "streams.safetensors";

/// Loads a Hugging Face model directory's files: model and tokenizer.
pub fn load_dir(files: &DirFiles, options: &LoadOptions) -> Result<LoadedModel> {
    let mut tokenizer = Tokenizer::from_files(&files.tokenizer, files.tokenizer_config.as_deref())?;
    let model = load_model_dir(files, options)?;
    for id in model.config().eos_token_ids() {
        tokenizer.add_eos_id(id);
    }
    if let Some(path) = &files.chat_template {
        let template = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        tokenizer.set_chat_template(Some(template));
    }
    if let Some(path) = &files.generation_config {
        let ids = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("eos_token_id").cloned())
            .and_then(|v| serde_json::from_value::<TokenIds>(v).ok());
        for id in ids.map(|ids| ids.to_vec()).unwrap_or_default() {
            tokenizer.add_eos_id(id);
        }
    }
    check_vocab(&tokenizer, &model)?;
    Ok(LoadedModel { model, tokenizer })
}

/// Loads a GGUF file: config and tokenizer from its metadata, weights in `options.weights`
/// (as stored by default).
pub fn load_gguf(path: &Path, options: &LoadOptions) -> Result<LoadedModel> {
    let weights = GgufWeights::open(path)?;
    let config = config_from_gguf(weights.content(), path)?;
    let mut tokenizer = Tokenizer::from_gguf(weights.content(), path)?;
    for id in config.eos_token_ids() {
        tokenizer.add_eos_id(id);
    }
    let model = Model::load(config, &weights as &dyn WeightSource, options)?;
    check_vocab(&tokenizer, &model)?;
    Ok(LoadedModel { model, tokenizer })
}
