//! What the model reads its weights through: a [`WeightSource`] of tensors addressed by Hugging
//! Face names and checked against the shapes the config implies (implemented by the files of
//! [`formats`](crate::formats)); and in which form the model keeps them ([`WeightFormat`],
//! reported by [`WeightReport`]).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor};
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

/// Fails with [`Error::TensorShape`] unless a stored tensor has the shape the config implies.
pub(crate) fn check_shape(
    name: &str,
    path: &Path,
    expected: &[usize],
    actual: &[usize],
) -> Result<()> {
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

    /// Bytes of weights a one-token forward reads: every matrix but the token embedding
    /// table, of which it reads one row, unless that table is also the LM head (tied
    /// embeddings, no `lm_head.weight` of its own).
    pub fn bytes_read_per_token(&self) -> usize {
        const EMBEDDING: &str = "model.embed_tokens.weight";
        let own_head = self.tensors.iter().any(|t| t.name == "lm_head.weight");
        self.tensors
            .iter()
            .filter(|t| !(own_head && t.name == EMBEDDING))
            .map(|t| t.bytes)
            .sum()
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

#[cfg(test)]
mod tests {
    use super::{TensorReport, WeightReport};

    fn report(names: &[(&str, usize)]) -> WeightReport {
        WeightReport {
            compute: "portable".into(),
            tensors: names
                .iter()
                .map(|&(name, bytes)| TensorReport {
                    name: name.into(),
                    stored: "Q4_K".into(),
                    used: "Q4_K".into(),
                    bytes,
                })
                .collect(),
        }
    }

    #[test]
    fn a_token_reads_the_embedding_table_only_when_it_is_the_head() {
        let own_head = report(&[
            ("model.embed_tokens.weight", 100),
            ("model.layers.0.mlp.up_proj.weight", 10),
            ("lm_head.weight", 50),
        ]);
        assert_eq!(own_head.total_bytes(), 160);
        assert_eq!(own_head.bytes_read_per_token(), 60);
        let tied = report(&[
            ("model.embed_tokens.weight", 100),
            ("model.layers.0.mlp.up_proj.weight", 10),
        ]);
        assert_eq!(tied.bytes_read_per_token(), 110);
    }
}
