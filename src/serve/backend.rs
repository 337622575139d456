//! The one place where the server touches the scheduler's API: building a decoder per method,
//! encoding prompts, and running one generation with a streaming callback. Keeping it here
//! means a change to the [`Engine`] entry points changes this file only.

use std::sync::Arc;

use mirror_core::{ChatMessage, Model, Tokenizer};
use mirror_scheduler::{
    Autoregressive, Decoder, Engine, Generation, GenerationConfig, Mirror, MirrorSettings, Prompt,
    SpeculativeDecoding, StreamControl,
};

use super::ServeError;

/// A decoding strategy a request can ask for (`"ar"`, `"sd"`, `"mirror"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Method {
    /// The target alone.
    Autoregressive,
    /// Vanilla speculative decoding.
    Speculative,
    /// Mirror speculative decoding.
    Mirror,
}

impl Method {
    /// Every method, in the order the server lists them.
    pub const ALL: [Method; 3] = [Method::Autoregressive, Method::Speculative, Method::Mirror];

    /// The name used in requests, responses and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Autoregressive => "ar",
            Method::Speculative => "sd",
            Method::Mirror => "mirror",
        }
    }

    /// Parses `ar`, `sd` or `mirror`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == name)
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Turns requests' messages and text into token ids, as [`Engine::encode`] does. Cheap to
/// clone; used on the HTTP side so that prompts are measured against the context before they
/// are queued.
#[derive(Clone)]
pub struct PromptEncoder {
    tokenizer: Tokenizer,
}

impl PromptEncoder {
    /// Whether the model has a chat template (needed by chat completions).
    pub fn has_chat_template(&self) -> bool {
        self.tokenizer.chat_template().is_some()
    }

    /// Renders `messages` with the chat template (generation prompt added) and encodes them.
    pub fn chat(&self, messages: &[ChatMessage]) -> mirror_scheduler::Result<Vec<u32>> {
        Prompt::Chat(messages).encode(&self.tokenizer)
    }

    /// Encodes raw text, with BOS where the model expects one.
    pub fn text(&self, text: &str) -> mirror_scheduler::Result<Vec<u32>> {
        Prompt::Text(text).encode(&self.tokenizer)
    }

    /// Size of the vocabulary (token-id prompts are checked against it).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.vocab_size()
    }
}

/// One engine per served method, over shared target and draft weights.
pub struct Backend {
    engines: Vec<(Method, Engine)>,
    default_method: Method,
    encoder: PromptEncoder,
    context_limit: usize,
    vocab_size: usize,
}

impl Backend {
    /// Builds an engine for each of `methods` (deduplicated) over `target` and, for the
    /// speculative methods, `draft`. `default_method` serves requests that name none. Mirror
    /// runs with `settings`, vanilla SD with their `speculative` part.
    pub fn new(
        target: Arc<Model>,
        draft: Option<Arc<Model>>,
        tokenizer: Tokenizer,
        methods: &[Method],
        default_method: Method,
        settings: &MirrorSettings,
    ) -> Result<Self, ServeError> {
        let mut served: Vec<Method> = methods.to_vec();
        served.sort();
        served.dedup();
        if !served.contains(&default_method) {
            return Err(ServeError::Config(format!(
                "the default method `{default_method}` is not among the served methods"
            )));
        }
        let mut engines = Vec::with_capacity(served.len());
        for method in served {
            let decoder: Box<dyn Decoder> = match method {
                Method::Autoregressive => Box::new(Autoregressive::new(Arc::clone(&target))),
                Method::Speculative | Method::Mirror => {
                    let draft = draft.as_ref().ok_or_else(|| {
                        ServeError::Config(format!("method `{method}` needs a draft model"))
                    })?;
                    speculative_decoder(method, &target, draft, settings)?
                }
            };
            engines.push((method, Engine::new(decoder, tokenizer.clone())));
        }
        Ok(Self {
            engines,
            default_method,
            encoder: PromptEncoder {
                tokenizer: tokenizer.clone(),
            },
            context_limit: target.context_limit(),
            vocab_size: target.vocab_size(),
        })
    }

    /// The methods this backend serves.
    pub fn methods(&self) -> Vec<Method> {
        self.engines.iter().map(|(m, _)| *m).collect()
    }

    /// The method of requests that name none.
    pub fn default_method(&self) -> Method {
        self.default_method
    }

    /// A prompt encoder for the HTTP side.
    pub fn encoder(&self) -> PromptEncoder {
        self.encoder.clone()
    }

    /// Longest context of the target (prompt plus output), in tokens.
    pub fn context_limit(&self) -> usize {
        self.context_limit
    }

    /// Rows of the target's LM head: token ids must be below it.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Generates after `prompt` with `method`, calling `on_text` with each committed piece of
    /// text; returning [`StreamControl::Stop`] cancels at the next commit.
    pub fn generate(
        &mut self,
        method: Method,
        prompt: &[u32],
        config: &GenerationConfig,
        on_text: impl FnMut(&str) -> StreamControl,
    ) -> Result<Generation, ServeError> {
        let engine = self
            .engines
            .iter_mut()
            .find(|(m, _)| *m == method)
            .map(|(_, e)| e)
            .ok_or_else(|| ServeError::Config(format!("method `{method}` is not served")))?;
        Ok(engine.generate_with(prompt, config, on_text)?)
    }
}

fn speculative_decoder(
    method: Method,
    target: &Arc<Model>,
    draft: &Arc<Model>,
    settings: &MirrorSettings,
) -> Result<Box<dyn Decoder>, ServeError> {
    Ok(if method == Method::Mirror {
        Box::new(
            Mirror::builder(Arc::clone(target), Arc::clone(draft))
                .settings(*settings)
                .build()?,
        )
    } else {
        Box::new(
            SpeculativeDecoding::builder(Arc::clone(target), Arc::clone(draft))
                .speculative_settings(settings.speculative)
                .build()?,
        )
    })
}
