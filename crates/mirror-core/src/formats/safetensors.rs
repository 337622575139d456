//! Safetensors checkpoints (one file or shards), memory-mapped and read tensor by tensor.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::weights::{check_shape, WeightSource};

/// Memory-mapped safetensors files; a sharded checkpoint is several files.
pub struct SafetensorsWeights {
    files: Vec<(PathBuf, memmap2::Mmap)>,
    index: HashMap<String, usize>,
    root: PathBuf,
}

impl SafetensorsWeights {
    /// Maps `paths` and indexes their tensors. Truncated or corrupt files fail here, naming the file.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the map is read-only; like every mmap-based loader we rely on the file not
            // being modified while the model is loading.
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let tensors =
                safetensors::SafeTensors::deserialize(&mmap).map_err(|e| Error::CorruptFile {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            for name in tensors.names() {
                index.insert(name.to_string(), i);
            }
            files.push((path.clone(), mmap));
        }
        let root = paths
            .first()
            .and_then(|p| p.parent())
            .map(Path::to_path_buf)
            .unwrap_or_default();
        Ok(Self { files, index, root })
    }
}

impl WeightSource for SafetensorsWeights {
    fn load(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let &file_index = self.index.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            path: self.root.clone(),
        })?;
        let (path, mmap) = &self.files[file_index];
        let corrupt = |reason: String| Error::CorruptFile {
            path: path.clone(),
            reason,
        };
        let tensors =
            safetensors::SafeTensors::deserialize(mmap).map_err(|e| corrupt(e.to_string()))?;
        let view = tensors.tensor(name).map_err(|e| corrupt(e.to_string()))?;
        check_shape(name, path, shape, view.shape())?;
        let tensor = view
            .load(device)
            .map_err(|e| corrupt(format!("tensor `{name}`: {e}")))?;
        Ok(tensor.to_dtype(dtype)?)
    }

    fn stored_type(&self, name: &str) -> Option<String> {
        let &file_index = self.index.get(name)?;
        let tensors = safetensors::SafeTensors::deserialize(&self.files[file_index].1).ok()?;
        let dtype = tensors.tensor(name).ok()?.dtype();
        Some(format!("{dtype:?}").to_uppercase())
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn path(&self) -> &Path {
        &self.root
    }
}
