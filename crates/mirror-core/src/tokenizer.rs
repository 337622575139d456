//! Tokenizers from `tokenizer.json` (or rebuilt from GGUF metadata by
//! [`Tokenizer::from_gguf`], in [`formats::gguf`](crate::formats::gguf)), and chat templates
//! rendered with a real Jinja engine (minijinja), as Hugging Face `apply_chat_template` does.

use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::tools::{self, Tool, ToolCall};

/// One chat message, as in Hugging Face chat templates.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The message text.
    pub content: String,
    /// An assistant message's calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A `tool` message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
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
pub(crate) fn guard_tokenizers<T>(
    source_name: &str,
    call: impl FnOnce() -> Result<T>,
) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).unwrap_or_else(|panic| {
        Err(tok_err(
            source_name,
            format!(
                "the tokenizers library panicked on this input: {}",
                crate::error::panic_message(&*panic)
            ),
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

/// What a tokenizer is built from, wherever it is read.
pub(crate) struct TokenizerParts {
    pub inner: tokenizers::Tokenizer,
    pub source_name: String,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

/// The chat template of `tokenizer_config.json`: a string, or a list of named templates (the
/// default one is taken).
fn chat_template(config: &serde_json::Value) -> Option<String> {
    match config.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Assembles a tokenizer; its eos token, if the vocabulary has it, ends generation.
    pub(crate) fn from_parts(parts: TokenizerParts) -> Self {
        let mut tokenizer = Self {
            inner: parts.inner,
            source_name: parts.source_name,
            bos_token: parts.bos_token,
            eos_token: parts.eos_token,
            add_bos: parts.add_bos,
            eos_ids: Vec::new(),
            chat_template: parts.chat_template,
        };
        if let Some(id) = tokenizer
            .eos_token
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t))
        {
            tokenizer.eos_ids.push(id);
        }
        tokenizer
    }

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
        let config = match tokenizer_config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                serde_json::from_str(&text).map_err(|e| Error::CorruptFile {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?
            }
            None => serde_json::Value::Null,
        };
        Ok(Self::from_parts(TokenizerParts {
            inner,
            source_name,
            bos_token: token_string(config.get("bos_token")),
            eos_token: token_string(config.get("eos_token")),
            add_bos: config
                .get("add_bos_token")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false),
            chat_template: chat_template(&config),
        }))
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

    /// The tokenizer as Hugging Face's `tokenizer.json` would hold it (a GGUF tokenizer as
    /// rebuilt from its metadata): what a grammar engine reads each token's bytes from.
    pub fn to_json(&self) -> Result<serde_json::Value> {
        let text = self
            .inner
            .to_string(false)
            .map_err(|e| tok_err(&self.source_name, e))?;
        serde_json::from_str(&text).map_err(|e| tok_err(&self.source_name, e))
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
        self.apply_chat_template_with_tools(messages, &[], add_generation_prompt)
    }

    /// [`Tokenizer::apply_chat_template`] with `tools` the model may call: given to a template
    /// that takes them (its `tools` variable), or described in a Hermes system message to one
    /// that does not, whose calls and results are then written as Hermes blocks too
    /// ([`crate::tools`]).
    pub fn apply_chat_template_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[Tool],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::ChatTemplate(format!("{} has no chat template", self.source_name))
        })?;
        let (bos, eos) = (
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        );
        if self.template_takes_tools() {
            return render_chat_template_with_tools(
                template,
                messages,
                tools,
                add_generation_prompt,
                bos,
                eos,
            );
        }
        let messages = hermes_messages(messages, tools);
        render_chat_template(template, &messages, add_generation_prompt, bos, eos)
    }

    /// Whether the chat template renders tools itself (it reads a `tools` variable).
    pub fn template_takes_tools(&self) -> bool {
        self.chat_template
            .as_deref()
            .is_some_and(|t| t.contains("tools") && t.contains("tool_call"))
    }
}

/// `messages` for a template that knows no tools: the tools described in the system message,
/// calls and results as Hermes blocks in assistant and user messages.
fn hermes_messages(messages: &[ChatMessage], tools: &[Tool]) -> Vec<ChatMessage> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    if !tools.is_empty() {
        let description = tools::hermes_system_prompt(tools);
        match messages.first().filter(|m| m.role == "system") {
            Some(system) => out.push(ChatMessage::new(
                "system",
                format!("{}\n\n{description}", system.content),
            )),
            None => out.push(ChatMessage::new("system", description)),
        }
    }
    let skip =
        usize::from(!tools.is_empty() && messages.first().is_some_and(|m| m.role == "system"));
    for message in &messages[skip..] {
        out.push(match message.role.as_str() {
            "tool" => ChatMessage::new(
                "user",
                format!("<tool_response>\n{}\n</tool_response>", message.content),
            ),
            _ if !message.tool_calls.is_empty() => {
                let calls: Vec<String> = message
                    .tool_calls
                    .iter()
                    .map(|c| tools::call_block(&c.name, &c.arguments))
                    .collect();
                let text = [message.content.as_str()]
                    .into_iter()
                    .filter(|c| !c.is_empty())
                    .chain(calls.iter().map(String::as_str))
                    .collect::<Vec<_>>()
                    .join("\n");
                ChatMessage::new(message.role.clone(), text)
            }
            _ => message.clone(),
        });
    }
    out
}

/// Renders a Hugging Face chat template with minijinja.
pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    render_chat_template_with_tools(
        template,
        messages,
        &[],
        add_generation_prompt,
        bos_token,
        eos_token,
    )
}

/// [`render_chat_template`] with the template's `tools` variable (undefined when there are none,
/// as transformers leaves it).
pub fn render_chat_template_with_tools(
    template: &str,
    messages: &[ChatMessage],
    tools: &[Tool],
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
    let tools = if tools.is_empty() {
        minijinja::Value::UNDEFINED
    } else {
        minijinja::Value::from_serialize(tools)
    };
    let ctx = minijinja::context! {
        messages => messages,
        tools => tools,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    };
    env.get_template("chat")
        .and_then(|t| t.render(ctx))
        .map_err(|e| Error::ChatTemplate(e.to_string()))
}
