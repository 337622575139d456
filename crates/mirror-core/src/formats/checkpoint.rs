//! Small safetensors files with JSON metadata: lookahead weights and training state.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// A checkpoint read whole into memory.
pub(crate) struct Checkpoint {
    path: PathBuf,
    metadata: HashMap<String, String>,
    tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// Reads `path` (`what` names it in a missing-file error).
    pub(crate) fn read(path: &Path, device: &Device, what: &str) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::MissingFile {
                    path: path.to_path_buf(),
                    what: what.to_string(),
                }
            } else {
                Error::Io {
                    path: path.to_path_buf(),
                    source: e,
                }
            }
        })?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| corrupt(path, format!("not a safetensors file: {e}")))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| corrupt(path, e.to_string()))?;
        Ok(Self {
            path: path.to_path_buf(),
            metadata,
            tensors,
        })
    }

    /// The metadata entry `key`, parsed as JSON.
    pub(crate) fn meta<T: DeserializeOwned>(&self, key: &str) -> Result<T> {
        let text = self
            .metadata
            .get(key)
            .ok_or_else(|| corrupt(&self.path, format!("no `{key}` entry in the metadata")))?;
        serde_json::from_str(text).map_err(|e| corrupt(&self.path, format!("bad `{key}`: {e}")))
    }

    /// The tensor `name`.
    pub(crate) fn tensor(&self, name: &str) -> Result<Tensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
                path: self.path.clone(),
            })
    }
}

#[cfg(feature = "train")]
/// Writes `tensors` and `metadata` to `path` through a temporary file, so an interrupted write
/// never leaves a torn checkpoint.
pub(crate) fn write(
    path: &Path,
    tensors: Vec<(String, Tensor)>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let io = |e: String| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    };
    let partial = path.with_extension("partial");
    safetensors::tensor::serialize_to_file(tensors, Some(metadata), &partial)
        .map_err(|e| io(e.to_string()))?;
    std::fs::rename(&partial, path).map_err(|e| io(e.to_string()))
}

#[cfg(feature = "train")]
/// A JSON value for a metadata entry.
pub(crate) fn json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::invalid(e.to_string()))
}

fn corrupt(path: &Path, reason: String) -> Error {
    Error::CorruptFile {
        path: path.to_path_buf(),
        reason,
    }
}
