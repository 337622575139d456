//! Tokenizers from `tokenizer.json` or rebuilt from GGUF metadata, and chat templates rendered
//! with a real Jinja engine (minijinja), as Hugging Face `apply_chat_template` does.

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use serde::Serialize;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{Error, Result};

/// One chat message, as in Hugging Face chat templates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A text tokenizer with the special tokens and chat template of its model.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source_name: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    add_bos: bool,
    eos_ids: Vec<u32>,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source_name)
            .field("vocab_size", &self.vocab_size())
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

fn tok_err(source_name: &str, reason: impl std::fmt::Display) -> Error {
    Error::Tokenizer {
        source_name: source_name.to_string(),
        reason: reason.to_string(),
    }
}

/// Runs a call into the tokenizers library, turning a panic inside it into
/// [`Error::Tokenizer`]. tokenizers 0.23 panics on some malformed input instead of returning
/// an error (found by `tests/fuzz.rs`): a `decoder` that is not valid JSON in tokenizer.json
/// (`expect("Helper")` in its deserializer), and a BPE merge whose parts are shorter than the
/// continuing-subword prefix (a slice out of range in `BPE::build`).
fn guard_tokenizers<T>(source_name: &str, call: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(tok_err(
            source_name,
            format!("the tokenizers library panicked on this input: {message}"),
        ))
    })
}

/// `bos_token`/`eos_token` in `tokenizer_config.json` are a string or `{ "content": ... }`.
fn token_string(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(map) => map.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`, and `tokenizer_config.json` beside it when given.
    pub fn from_files(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        let source_name = tokenizer_json.display().to_string();
        if !tokenizer_json.is_file() {
            return Err(Error::MissingFile {
                path: tokenizer_json.to_path_buf(),
                what: "the tokenizer (tokenizer.json)".into(),
            });
        }
        let inner = guard_tokenizers(&source_name, || {
            tokenizers::Tokenizer::from_file(tokenizer_json).map_err(|e| tok_err(&source_name, e))
        })?;
        let mut tokenizer = Self {
            inner,
            source_name,
            bos_token: None,
            eos_token: None,
            add_bos: false,
            eos_ids: Vec::new(),
            chat_template: None,
        };
        if let Some(path) = tokenizer_config {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let config: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::CorruptFile {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?;
            tokenizer.bos_token = token_string(config.get("bos_token"));
            tokenizer.eos_token = token_string(config.get("eos_token"));
            tokenizer.add_bos = config
                .get("add_bos_token")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false);
            tokenizer.chat_template = match config.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // A list of named templates: take the default one.
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or_else(|| list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_string),
                _ => None,
            };
            if let Some(id) = tokenizer
                .eos_token
                .as_deref()
                .and_then(|t| tokenizer.token_to_id(t))
            {
                tokenizer.eos_ids.push(id);
            }
        }
        Ok(tokenizer)
    }

    /// Rebuilds the tokenizer stored in GGUF metadata (`tokenizer.ggml.*`, byte-level BPE).
    pub fn from_gguf(content: &Content, path: &Path) -> Result<Self> {
        let source_name = path.display().to_string();
        guard_tokenizers(&source_name, || Self::build_from_gguf(content, path))
    }

    fn build_from_gguf(content: &Content, path: &Path) -> Result<Self> {
        let source_name = path.display().to_string();
        let err = |reason: String| tok_err(&source_name, reason);
        let meta = |key: &str| content.metadata.get(key);
        let strings = |key: &str| -> Result<Vec<String>> {
            let values = meta(key)
                .and_then(|v| v.to_vec().ok())
                .ok_or_else(|| err(format!("GGUF metadata `{key}` is missing or not an array")))?;
            values
                .iter()
                .map(|v| {
                    v.to_string()
                        .cloned()
                        .map_err(|_| err(format!("`{key}` holds a non-string")))
                })
                .collect()
        };
        let model = meta("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer model `{model}` is not supported (byte-level BPE `gpt2` only)"
            )));
        }
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| err(format!("merge `{m}` has no space")))
            })
            .collect::<Result<_>>()?;
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| err(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre = meta("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "gpt2".into());
        let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
            Ok(Split::new(
                SplitPattern::Regex(pattern.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| err(e.to_string()))?
            .into())
        };
        // Each `pre` name is llama.cpp's label for a Hugging Face pre-tokenizer; rebuild that one.
        let pre_tokenizer: PreTokenizerWrapper = match pre.as_str() {
            "qwen2" => {
                inner
                    .with_normalizer(Some(NFC))
                    .map_err(|e| err(e.to_string()))?;
                Sequence::new(vec![
                    split(QWEN2_PATTERN)?,
                    ByteLevel::new(false, false, false).into(),
                ])
                .into()
            }
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
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control (3) and user-defined (4) tokens are matched whole before BPE.
        if let Some(types) = meta("tokenizer.ggml.token_type").and_then(|v| v.to_vec().ok()) {
            let added: Vec<AddedToken> = types
                .iter()
                .zip(&tokens)
                .filter_map(|(kind, token)| match kind {
                    Value::I32(3) | Value::U32(3) => Some(AddedToken::from(token.clone(), true)),
                    Value::I32(4) | Value::U32(4) => Some(AddedToken::from(token.clone(), false)),
                    _ => None,
                })
                .collect();
            inner
                .add_special_tokens(added)
                .map_err(|e| err(e.to_string()))?;
        }
        let token_at = |key: &str| {
            meta(key)
                .and_then(|v| v.to_u32().ok())
                .and_then(|id| tokens.get(id as usize).cloned())
        };
        let eos_token = token_at("tokenizer.ggml.eos_token_id");
        let mut tokenizer = Self {
            inner,
            bos_token: token_at("tokenizer.ggml.bos_token_id"),
            add_bos: meta("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(false),
            eos_ids: Vec::new(),
            chat_template: meta("tokenizer.chat_template")
                .and_then(|v| v.to_string().ok())
                .cloned(),
            eos_token,
            source_name,
        };
        if let Some(id) = tokenizer
            .eos_token
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t))
        {
            tokenizer.eos_ids.push(id);
        }
        Ok(tokenizer)
    }

    /// The file the tokenizer came from.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// Number of ids the tokenizer can produce (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Ids that end generation (the tokenizer's eos, plus any added with [`Tokenizer::add_eos_id`]).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Adds an id that ends generation (from `config.json` or `generation_config.json`).
    pub fn add_eos_id(&mut self, id: u32) {
        if !self.eos_ids.contains(&id) {
            self.eos_ids.push(id);
        }
    }

    /// The chat template, if the model ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Replaces the chat template.
    pub fn set_chat_template(&mut self, template: Option<String>) {
        self.chat_template = template;
    }

    /// Encodes `text`. With `add_special_tokens`, a BOS is prepended where the model asks for one.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| tok_err(&self.source_name, e))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if add_special_tokens && self.add_bos {
            if let Some(bos) = self.bos_token.as_deref().and_then(|t| self.token_to_id(t)) {
                ids.push(bos);
            }
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Decodes ids to text.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| tok_err(&self.source_name, e))
    }

    /// Renders `messages` with the model's chat template (Hugging Face conventions: `messages`,
    /// `add_generation_prompt`, `bos_token`, `eos_token`; `trim_blocks` and `lstrip_blocks` on).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::ChatTemplate(format!("{} has no chat template", self.source_name))
        })?;
        render_chat_template(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        )
    }
}

/// Renders a Hugging Face chat template with minijinja.
pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    // Python string methods (`.strip()`, `.startswith()`, ...) that templates call.
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| Error::ChatTemplate(e.to_string()))?;
    let ctx = minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    };
    env.get_template("chat")
        .and_then(|t| t.render(ctx))
        .map_err(|e| Error::ChatTemplate(e.to_string()))
}

const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
