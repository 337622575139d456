//! Where weights come from: safetensors files (one or sharded) or a GGUF file, both addressed by
//! Hugging Face tensor names and checked against the shapes the config implies; and in which
//! form the model keeps them ([`WeightFormat`], reported by [`WeightReport`]).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// A store of named tensors (Hugging Face naming: `model.layers.0.self_attn.q_proj.weight`).
pub trait WeightSource: Send + Sync {
    /// Loads `name`, checks that its shape is `shape`, converts it to `dtype` on `device`.
    fn load(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor>;
    /// `name` in its stored GGML type, when the store keeps it quantized (GGUF); `None` for
    /// float tensors and float stores. The shape is checked like [`WeightSource::load`]'s.
    fn load_quantized(&self, name: &str, shape: &[usize]) -> Result<Option<QTensor>> {
        let _ = (name, shape);
        Ok(None)
    }
    /// The type `name` is stored in (`BF16`, `Q4_K`, ...), if the store says.
    fn stored_type(&self, name: &str) -> Option<String> {
        let _ = name;
        None
    }
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

/// Runs one of candle's GGUF readers. Its errors, and any panic inside it (candle's reader is
/// not ours to fix; a panic on some malformed input must not unwind through a loader), become
/// [`Error::CorruptFile`] naming the file.
fn guard_gguf<T>(
    path: &Path,
    what: &str,
    read: impl FnOnce() -> candle_core::Result<T>,
) -> Result<T> {
    let corrupt = |reason: String| Error::CorruptFile {
        path: path.to_path_buf(),
        reason: format!("{what}{reason}"),
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)) {
        Ok(result) => result.map_err(|e| corrupt(e.to_string())),
        Err(panic) => Err(corrupt(format!(
            "the GGUF reader panicked: {}",
            crate::panic_message(&*panic)
        ))),
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
        let content = guard_gguf(path, "", || gguf_file::Content::read(&mut file))?;
        let file_size = file.metadata().map_err(|e| Error::io(path, e))?.len();
        // Check every tensor's extent now, so a truncated download is reported before any work;
        // in checked arithmetic, since a corrupt header can declare any dimensions.
        for (name, info) in &content.tensor_infos {
            let block = info.ggml_dtype.block_size().max(1) as u64;
            let end = info
                .shape
                .dims()
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
                .and_then(|elements| {
                    (elements / block).checked_mul(info.ggml_dtype.type_size() as u64)
                })
                .and_then(|bytes| bytes.checked_add(info.offset))
                .and_then(|end| end.checked_add(content.tensor_data_offset));
            match end {
                Some(end) if end <= file_size => {}
                _ => {
                    return Err(Error::CorruptFile {
                        path: path.to_path_buf(),
                        reason: format!(
                            "tensor `{name}` of shape {:?} at offset {} ends past the file's {file_size} bytes (truncated download?)",
                            info.shape.dims(),
                            info.offset
                        ),
                    })
                }
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

impl GgufWeights {
    /// Reads `name` (a Hugging Face name) as stored, checking its shape.
    fn read(&self, name: &str, shape: &[usize]) -> Result<QTensor> {
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
        let mut file = self
            .file
            .lock()
            .map_err(|_| Error::invalid("GGUF reader lock poisoned"))?;
        guard_gguf(&self.path, &format!("tensor `{gguf_name}`: "), || {
            info.read(&mut *file, self.content.tensor_data_offset, &Device::Cpu)
        })
    }
}

impl WeightSource for GgufWeights {
    fn load(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let tensor = self
            .read(name, shape)?
            .dequantize(&Device::Cpu)?
            .to_dtype(dtype)?;
        Ok(tensor.to_device(device)?)
    }

    fn load_quantized(&self, name: &str, shape: &[usize]) -> Result<Option<QTensor>> {
        let tensor = self.read(name, shape)?;
        Ok(match tensor.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => None,
            _ => Some(tensor),
        })
    }

    fn stored_type(&self, name: &str) -> Option<String> {
        let info = self.content.tensor_infos.get(&Self::gguf_name(name)?)?;
        Some(ggml_type_name(info.ggml_dtype))
    }

    fn contains(&self, name: &str) -> bool {
        Self::gguf_name(name).is_some_and(|n| self.content.tensor_infos.contains_key(&n))
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// How a model keeps its weight matrices (every linear layer, the LM head and the embedding
/// table; norms and biases are always float).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// As the file stores them. GGUF quantized tensors stay quantized and run through
    /// mirror-core's kernels on the CPU (candle's quantized matmul elsewhere); a GGML type the
    /// kernels do not read is requantized to Q8_0 at load. Float tensors load in
    /// [`LoadOptions::dtype`](crate::LoadOptions).
    #[default]
    AsStored,
    /// Quantized at load to this GGML type, from whatever the file holds (in-situ
    /// quantization, like mistral.rs's ISQ). A matrix whose width is not a multiple of the
    /// type's block takes Q8_0 instead (or stays float if that does not fit either).
    Quantize(GgmlDType),
    /// Dequantized to [`LoadOptions::dtype`](crate::LoadOptions): float matmuls everywhere.
    Float,
}

impl WeightFormat {
    /// Parses `as-stored`, `float`, or a GGML type name (`q8_0`, `q4_k`, ...).
    pub fn parse(text: &str) -> Result<Self> {
        let lower = text.trim().to_ascii_lowercase();
        Ok(match lower.as_str() {
            "as-stored" | "stored" | "native" => Self::AsStored,
            "float" | "f32" | "dequantize" => Self::Float,
            other => Self::Quantize(parse_ggml_type(other).ok_or_else(|| {
                Error::invalid(format!(
                    "unknown weight format `{text}` (expected as-stored, float, q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k or q6_k)"
                ))
            })?),
        })
    }
}

/// A GGML type by its llama.cpp name (`q4_k`, `Q4_K`, `q8_0`, ...), limited to the types the
/// CPU kernels read.
pub fn parse_ggml_type(name: &str) -> Option<GgmlDType> {
    Some(match name.to_ascii_lowercase().as_str() {
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        "q8_0" => GgmlDType::Q8_0,
        "q4_k" | "q4k" => GgmlDType::Q4K,
        "q5_k" | "q5k" => GgmlDType::Q5K,
        "q6_k" | "q6k" => GgmlDType::Q6K,
        _ => return None,
    })
}

/// The llama.cpp name of a GGML type (`Q4_K`, `Q8_0`, `F32`, ...).
pub fn ggml_type_name(dtype: GgmlDType) -> String {
    let name = format!("{dtype:?}");
    match name.strip_suffix('K') {
        Some(base) if base.starts_with('Q') => format!("{base}_K"),
        _ => name.to_uppercase(),
    }
}

/// What loading did with one weight matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorReport {
    /// The Hugging Face tensor name.
    pub name: String,
    /// Its type in the file (`Q5_0`, `F32`, `BF16`, ...).
    pub stored: String,
    /// The type it is multiplied in (`Q5_0`, `Q8_0`, `F32`, ...).
    pub used: String,
    /// Bytes it occupies in memory as used.
    pub bytes: usize,
}

/// What loading did with every weight matrix of a model: kept as stored, requantized or
/// dequantized, and the bytes each type takes. Printed by the examples and in
/// `generate --json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WeightReport {
    /// The kernel path of the CPU matmuls (`avx512`, `avx2`, `portable`), or the device.
    pub compute: String,
    /// Every weight matrix, in load order.
    pub tensors: Vec<TensorReport>,
}

impl WeightReport {
    /// Bytes per type as used: `{"Q4_K": 757_000_000, ...}`.
    pub fn bytes_by_type(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for t in &self.tensors {
            *out.entry(t.used.clone()).or_insert(0) += t.bytes;
        }
        out
    }

    /// Total bytes of the weight matrices as used.
    pub fn total_bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.bytes).sum()
    }

    /// The matrices whose type changed at load, as `(name, stored, used)`.
    pub fn converted(&self) -> Vec<(&str, &str, &str)> {
        self.tensors
            .iter()
            .filter(|t| t.stored != t.used)
            .map(|t| (t.name.as_str(), t.stored.as_str(), t.used.as_str()))
            .collect()
    }

    /// One line: bytes per type, and what was converted (`Q5_0->Q8_0 x 3`).
    pub fn summary(&self) -> String {
        let types: Vec<String> = self
            .bytes_by_type()
            .iter()
            .map(|(ty, bytes)| format!("{ty} {:.0} MB", *bytes as f64 / 1e6))
            .collect();
        let mut conversions: BTreeMap<(String, String), usize> = BTreeMap::new();
        for (_, from, to) in self.converted() {
            *conversions
                .entry((from.to_string(), to.to_string()))
                .or_insert(0) += 1;
        }
        let converted: Vec<String> = conversions
            .iter()
            .map(|((from, to), n)| format!("{from}->{to} x{n}"))
            .collect();
        format!(
            "weights {} ({}); converted at load: {}",
            types.join(", "),
            self.compute,
            if converted.is_empty() {
                "none".to_string()
            } else {
                converted.join(", ")
            }
        )
    }
}
