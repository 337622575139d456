//! GGUF files (llama.cpp's single-file format): the tensors ([`GgufWeights`], by Hugging Face
//! names), and the model config and the tokenizer rebuilt from their metadata, under llama.cpp's
//! key names.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::config::{Architecture, ModelConfig, TokenIds};
use crate::error::{panic_message, Error, Result};
use crate::tokenizer::{guard_tokenizers, Tokenizer, TokenizerParts};
use crate::weights::{check_shape, ggml_type_name, WeightSource};

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
            panic_message(&*panic)
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

fn value_as_u64(value: &Value) -> Option<u64> {
    match value {
        Value::U8(v) => Some(u64::from(*v)),
        Value::U16(v) => Some(u64::from(*v)),
        Value::U32(v) => Some(u64::from(*v)),
        Value::U64(v) => Some(*v),
        Value::I8(v) => u64::try_from(*v).ok(),
        Value::I16(v) => u64::try_from(*v).ok(),
        Value::I32(v) => u64::try_from(*v).ok(),
        Value::I64(v) => u64::try_from(*v).ok(),
        _ => None,
    }
}

fn value_as_f64(value: &Value) -> Option<f64> {
    match value {
        Value::F32(v) => Some(f64::from(*v)),
        Value::F64(v) => Some(*v),
        other => value_as_u64(other).map(|v| v as f64),
    }
}

/// Typed reads of a GGUF file's metadata.
struct Metadata<'a> {
    content: &'a Content,
}

impl Metadata<'_> {
    fn u64(&self, key: &str) -> Option<u64> {
        self.content.metadata.get(key).and_then(value_as_u64)
    }

    fn f64(&self, key: &str) -> Option<f64> {
        self.content.metadata.get(key).and_then(value_as_f64)
    }

    fn string(&self, key: &str) -> Option<String> {
        self.content
            .metadata
            .get(key)
            .and_then(|v| v.to_string().ok())
            .cloned()
    }

    fn bool(&self, key: &str) -> Option<bool> {
        self.content
            .metadata
            .get(key)
            .and_then(|v| v.to_bool().ok())
    }

    /// An array of strings; `None` when absent or not an array, `Err` on a non-string item.
    fn strings(&self, key: &str) -> std::result::Result<Option<Vec<String>>, String> {
        let Some(values) = self.content.metadata.get(key).and_then(|v| v.to_vec().ok()) else {
            return Ok(None);
        };
        values
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| format!("`{key}` holds a non-string"))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(Some)
    }
}

/// Reads a model config from GGUF metadata (llama.cpp key names).
pub fn config_from_gguf(content: &Content, path: &Path) -> Result<ModelConfig> {
    let source_name = format!("GGUF metadata of {}", path.display());
    let missing = |key: &str| Error::InvalidConfig {
        source_name: source_name.clone(),
        reason: format!("missing or non-numeric key `{key}`"),
    };
    let meta = Metadata { content };
    let arch_name = match content.metadata.get("general.architecture") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(missing("general.architecture")),
    };
    let architecture = Architecture::parse(&arch_name, &source_name)?;
    let opt_int = |key: &str| meta.u64(&format!("{arch_name}.{key}")).map(|v| v as usize);
    let int = |key: &str| opt_int(key).ok_or_else(|| missing(&format!("{arch_name}.{key}")));
    let float = |key: &str| meta.f64(&format!("{arch_name}.{key}"));
    let token_id = |key: &str| meta.u64(key).map(|v| TokenIds::One(v as u32));
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(Error::InvalidConfig {
            source_name,
            reason: "GGUF files with baked RoPE frequency factors (rope_freqs.weight, Llama 3.1+) are not supported; load the Hugging Face safetensors checkpoint instead".into(),
        });
    }
    let embedding = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| Error::MissingTensor {
            name: "token_embd.weight".into(),
            path: path.to_path_buf(),
        })?;
    let vocab_size = match embedding.shape.dims() {
        &[vocab, _] => vocab,
        dims => {
            return Err(Error::InvalidConfig {
                source_name,
                reason: format!("token_embd.weight has shape {dims:?}, not (vocab, hidden)"),
            })
        }
    };
    let hidden_size = int("embedding_length")?;
    let num_attention_heads = int("attention.head_count")?;
    let config = ModelConfig {
        model_type: architecture.as_str().to_string(),
        vocab_size,
        hidden_size,
        intermediate_size: int("feed_forward_length")?,
        num_hidden_layers: int("block_count")?,
        num_attention_heads,
        num_key_value_heads: Some(
            opt_int("attention.head_count_kv").unwrap_or(num_attention_heads),
        ),
        head_dim: opt_int("attention.key_length"),
        rms_norm_eps: float("attention.layer_norm_rms_epsilon")
            .ok_or_else(|| missing(&format!("{arch_name}.attention.layer_norm_rms_epsilon")))?,
        rope_theta: float("rope.freq_base").unwrap_or(10_000.0),
        rope_scaling: None,
        max_position_embeddings: int("context_length")?,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: Some(content.tensor_infos.contains_key("blk.0.attn_q.bias")),
        sliding_window: opt_int("attention.sliding_window"),
        use_sliding_window: None,
        bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
        eos_token_id: token_id("tokenizer.ggml.eos_token_id"),
        hidden_act: "silu".into(),
        rope_interleaved: architecture.spec().gguf_rope_interleaved,
        lookahead: None,
    };
    config.validate(&source_name)?;
    Ok(config)
}

impl Tokenizer {
    /// Rebuilds the tokenizer stored in GGUF metadata (`tokenizer.ggml.*`, byte-level BPE).
    pub fn from_gguf(content: &Content, path: &Path) -> Result<Self> {
        guard_tokenizers(&path.display().to_string(), || {
            tokenizer_from_gguf(content, path)
        })
    }
}

/// Rebuilds the tokenizer stored in GGUF metadata (`tokenizer.ggml.*`, byte-level BPE), with
/// the pre-tokenizer that `tokenizer.ggml.pre` names.
fn tokenizer_from_gguf(content: &Content, path: &Path) -> Result<Tokenizer> {
    let source_name = path.display().to_string();
    let err = |reason: String| Error::Tokenizer {
        source_name: source_name.clone(),
        reason,
    };
    let meta = Metadata { content };
    let model = meta.string("tokenizer.ggml.model").unwrap_or_default();
    if model != "gpt2" {
        return Err(err(format!(
            "tokenizer model `{model}` is not supported (byte-level BPE `gpt2` only)"
        )));
    }
    let strings = |key: &str| {
        meta.strings(key)
            .map_err(&err)?
            .ok_or_else(|| err(format!("GGUF metadata `{key}` is missing or not an array")))
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let mut inner =
        tokenizers::Tokenizer::new(bpe(&tokens, strings("tokenizer.ggml.merges")?).map_err(&err)?);
    let pre = meta
        .string("tokenizer.ggml.pre")
        .unwrap_or_else(|| "gpt2".into());
    if pre == "qwen2" {
        inner
            .with_normalizer(Some(NFC))
            .map_err(|e| err(e.to_string()))?;
    }
    inner.with_pre_tokenizer(Some(pre_tokenizer(&pre).map_err(&err)?));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    inner
        .add_special_tokens(special_tokens(content, &tokens))
        .map_err(|e| err(e.to_string()))?;
    let token_at = |key: &str| {
        meta.u64(key)
            .and_then(|id| tokens.get(id as usize).cloned())
    };
    Ok(Tokenizer::from_parts(TokenizerParts {
        inner,
        source_name,
        bos_token: token_at("tokenizer.ggml.bos_token_id"),
        eos_token: token_at("tokenizer.ggml.eos_token_id"),
        add_bos: meta.bool("tokenizer.ggml.add_bos_token").unwrap_or(false),
        chat_template: meta.string("tokenizer.chat_template"),
    }))
}

/// A byte-level BPE over `tokens` (ids in order) and `merges` (`"a b"` strings).
fn bpe(tokens: &[String], merges: Vec<String>) -> std::result::Result<BPE, String> {
    let merges: Vec<(String, String)> = merges
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| format!("merge `{m}` has no space"))
        })
        .collect::<std::result::Result<_, _>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| e.to_string())
}

/// The Hugging Face pre-tokenizer that llama.cpp labels `pre` (GPT-2's byte-level split for
/// names it does not know).
fn pre_tokenizer(pre: &str) -> std::result::Result<PreTokenizerWrapper, String> {
    let split = |pattern: &str| -> std::result::Result<PreTokenizerWrapper, String> {
        Ok(Split::new(
            SplitPattern::Regex(pattern.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| e.to_string())?
        .into())
    };
    Ok(match pre {
        "qwen2" => Sequence::new(vec![
            split(QWEN2_PATTERN)?,
            ByteLevel::new(false, false, false).into(),
        ])
        .into(),
        "llama3" | "llama-bpe" | "smaug-bpe" => Sequence::new(vec![
            split(LLAMA3_PATTERN)?,
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
        // SmolLM2 (cosmo2 tokenizer): single digits, then GPT-2's byte-level split without a
        // prefix space, so "The" stays "The".
        "smollm" => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        _ => ByteLevel::new(false, true, true).into(),
    })
}

/// Control (type 3) and user-defined (type 4) tokens, matched whole before BPE.
fn special_tokens(content: &Content, tokens: &[String]) -> Vec<AddedToken> {
    let Some(types) = content
        .metadata
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
    else {
        return Vec::new();
    };
    types
        .iter()
        .zip(tokens)
        .filter_map(|(kind, token)| match kind {
            Value::I32(3) | Value::U32(3) => Some(AddedToken::from(token.clone(), true)),
            Value::I32(4) | Value::U32(4) => Some(AddedToken::from(token.clone(), false)),
            _ => None,
        })
        .collect()
}

const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
