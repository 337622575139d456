//! Where weights come from: safetensors files (one or sharded) or a GGUF file, both addressed by
//! Hugging Face tensor names and checked against the shapes the config implies.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file;
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// A store of named tensors (Hugging Face naming: `model.layers.0.self_attn.q_proj.weight`).
pub trait WeightSource: Send + Sync {
    /// Loads `name`, checks that its shape is `shape`, converts it to `dtype` on `device`.
    fn load(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor>;
    /// Whether the store holds `name`.
    fn contains(&self, name: &str) -> bool;
    /// The file or directory the weights come from, for error messages.
    fn path(&self) -> &Path;
}

fn check_shape(name: &str, path: &Path, expected: &[usize], actual: &[usize]) -> Result<()> {
    if expected != actual {
        return Err(Error::TensorShape {
            name: name.to_string(),
            path: path.to_path_buf(),
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        });
    }
    Ok(())
}

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

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn path(&self) -> &Path {
        &self.root
    }
}

/// A GGUF file; quantized tensors are dequantized on load to the requested dtype.
pub struct GgufWeights {
    path: PathBuf,
    content: gguf_file::Content,
    file: Mutex<File>,
}

impl GgufWeights {
    /// Opens `path` and reads its header and metadata. A truncated file fails here.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| Error::CorruptFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let file_size = file.metadata().map_err(|e| Error::io(path, e))?.len();
        // Check every tensor's extent now, so a truncated download is reported before any work.
        for (name, info) in &content.tensor_infos {
            let block = info.ggml_dtype.block_size();
            let bytes =
                (info.shape.elem_count() / block.max(1) * info.ggml_dtype.type_size()) as u64;
            let end = content.tensor_data_offset + info.offset + bytes;
            if end > file_size {
                return Err(Error::CorruptFile {
                    path: path.to_path_buf(),
                    reason: format!(
                        "tensor `{name}` ends at byte {end} but the file has {file_size} bytes (truncated download?)"
                    ),
                });
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
            file: Mutex::new(file),
        })
    }

    /// The parsed header: metadata and tensor infos.
    pub fn content(&self) -> &gguf_file::Content {
        &self.content
    }

    /// The GGUF tensor name for a Hugging Face tensor name.
    pub fn gguf_name(hf_name: &str) -> Option<String> {
        let direct = match hf_name {
            "model.embed_tokens.weight" => Some("token_embd.weight"),
            "model.norm.weight" => Some("output_norm.weight"),
            "lm_head.weight" => Some("output.weight"),
            _ => None,
        };
        if let Some(name) = direct {
            return Some(name.to_string());
        }
        let rest = hf_name.strip_prefix("model.layers.")?;
        let (layer, field) = rest.split_once('.')?;
        let (module, kind) = field.rsplit_once('.')?;
        let gguf_module = match module {
            "input_layernorm" => "attn_norm",
            "post_attention_layernorm" => "ffn_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "self_attn.q_norm" => "attn_q_norm",
            "self_attn.k_norm" => "attn_k_norm",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            _ => return None,
        };
        Some(format!("blk.{layer}.{gguf_module}.{kind}"))
    }
}

impl WeightSource for GgufWeights {
    fn load(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let missing = || Error::MissingTensor {
            name: name.to_string(),
            path: self.path.clone(),
        };
        let gguf_name = Self::gguf_name(name).ok_or_else(missing)?;
        let info = self
            .content
            .tensor_infos
            .get(&gguf_name)
            .ok_or_else(missing)?;
        check_shape(&gguf_name, &self.path, shape, info.shape.dims())?;
        let qtensor = {
            let mut file = self
                .file
                .lock()
                .map_err(|_| Error::invalid("GGUF reader lock poisoned"))?;
            info.read(&mut *file, self.content.tensor_data_offset, &Device::Cpu)
                .map_err(|e| Error::CorruptFile {
                    path: self.path.clone(),
                    reason: format!("tensor `{gguf_name}`: {e}"),
                })?
        };
        let tensor = qtensor.dequantize(&Device::Cpu)?.to_dtype(dtype)?;
        Ok(tensor.to_device(device)?)
    }

    fn contains(&self, name: &str) -> bool {
        Self::gguf_name(name).is_some_and(|n| self.content.tensor_infos.contains_key(&n))
    }

    fn path(&self) -> &Path {
        &self.path
    }
}
