//! Loading a model and its tokenizer from a Hugging Face model directory, a GGUF file, or a hub
//! repository id: the layer above both the model and the file formats, which builds one from
//! the other. Here: the load functions and their options ([`LoadOptions`]), where a model comes
//! from ([`ModelSource`], `source`), the files of a model directory ([`DirFiles`],
//! `dir_files`) and lookahead checkpoints (`lookahead`). It may import everything below it
//! (formats, models, tokenizer, config, threads); nothing in the crate but the root imports it.

mod dir_files;
mod lookahead;
mod source;

use std::path::Path;

use candle_core::{DType, Device};

use crate::config::{ModelConfig, TokenIds};
use crate::error::{Error, Result};
use crate::formats::gguf::{config_from_gguf, GgufWeights};
use crate::formats::hub::HubRepo;
use crate::formats::safetensors::SafetensorsWeights;
use crate::models::{lookahead::LookaheadHead, transformer::Model};
use crate::threads::ThreadPlacement;
use crate::tokenizer::Tokenizer;
use crate::weights::{WeightFormat, WeightSource};
pub use dir_files::DirFiles;
pub use lookahead::LOOKAHEAD_CONFIG_KEY;
pub use source::ModelSource;

/// How to load: weight format, dtype, device and CPU threads.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// How weight matrices are kept: as stored (the default: GGUF stays quantized), quantized
    /// at load to a GGML type, or dequantized to `dtype`.
    pub weights: WeightFormat,
    /// Activations, and float weights; f32 by default (the CPU kernels for quantized weights
    /// take f32).
    pub dtype: DType,
    /// What KV caches store keys and values as: `None` (the default) for `dtype`, or f16 for
    /// half the cache's bytes, which long contexts and large batches read at every step (see
    /// [`Model::with_kv_dtype`]).
    pub kv_dtype: Option<DType>,
    /// Where the weights live.
    pub device: Device,
    /// The model's own rayon pool, if any: its threads and the cores they are pinned to (see
    /// [`crate::threads`] for the policy). By default the model runs in the caller's pool.
    pub placement: ThreadPlacement,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            weights: WeightFormat::AsStored,
            dtype: DType::F32,
            kv_dtype: None,
            device: Device::Cpu,
            placement: ThreadPlacement::default(),
        }
    }
}

impl LoadOptions {
    /// Builds the model of `config` from `weights` as these options say: weight format, dtype,
    /// device, KV cache dtype, then its thread pool ([`Model::load`], [`Model::with_kv_dtype`],
    /// then [`Model::with_placement`]).
    pub fn build_model(&self, config: ModelConfig, weights: &dyn WeightSource) -> Result<Model> {
        Model::load(config, weights, self.weights, self.dtype, &self.device)?
            .with_kv_dtype(self.kv_dtype.unwrap_or(self.dtype))?
            .with_placement(&self.placement)
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
    let mut model = options.build_model(config, &weights)?;
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
    let model = options.build_model(config, &weights)?;
    check_vocab(&tokenizer, &model)?;
    Ok(LoadedModel { model, tokenizer })
}
