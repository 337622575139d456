//! The one place where the server touches the scheduler's API: the batched engine
//! ([`EngineHandle`]) for the methods it runs (`ar`, `sd`, `lookup`), a one-sequence [`Engine`]
//! for Mirror, and prompt encoding. Keeping it here means a change to the scheduler's entry
//! points changes this file only.

use std::sync::Arc;

use mirror_core::{ChatMessage, Model, Tokenizer, Tool};
use mirror_scheduler::{
    BatchSettings, Engine, EngineHandle, Generation, GenerationConfig, LazyCompiler, Mirror,
    MirrorSettings, Prompt, SequenceRequest, Speculation, StreamControl, TokenLogprob,
};

use super::ServeError;

/// A decoding strategy a request can ask for (`"ar"`, `"sd"`, `"lookup"`, `"mirror"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Method {
    /// The target alone.
    Autoregressive,
    /// Vanilla speculative decoding with the draft model.
    Speculative,
    /// Speculation by prompt lookup (no draft model).
    Lookup,
    /// Mirror speculative decoding (one sequence at a time).
    Mirror,
}

impl Method {
    /// Every method, in the order the server lists them.
    pub const ALL: [Method; 4] = [
        Method::Autoregressive,
        Method::Speculative,
        Method::Lookup,
        Method::Mirror,
    ];

    /// The name used in requests, responses and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Autoregressive => "ar",
            Method::Speculative => "sd",
            Method::Lookup => "lookup",
            Method::Mirror => "mirror",
        }
    }

    /// Parses `ar`, `sd`, `lookup` or `mirror`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == name)
    }

    /// Whether the batched engine runs it (every method but Mirror, whose draft runs beside
    /// one target sequence).
    pub fn is_batched(self) -> bool {
        self != Method::Mirror
    }

    /// Whether it needs the draft model.
    pub fn needs_draft(self) -> bool {
        matches!(self, Method::Speculative | Method::Mirror)
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

    /// [`PromptEncoder::chat`] with `tools` the model may call.
    pub fn chat_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[Tool],
    ) -> mirror_scheduler::Result<Vec<u32>> {
        Prompt::ChatWithTools(messages, tools).encode(&self.tokenizer)
    }

    /// Encodes raw text, with BOS where the model expects one.
    pub fn text(&self, text: &str) -> mirror_scheduler::Result<Vec<u32>> {
        Prompt::Text(text).encode(&self.tokenizer)
    }

    /// One token's text (special tokens spelled out; a byte-level token that is not a whole
    /// character comes out with U+FFFD).
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    /// Size of the vocabulary (token-id prompts are checked against it).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.vocab_size()
    }
}

/// What the server runs: the batched engine's inputs for `ar`, `sd` and `lookup`, and a
/// one-sequence engine for Mirror when it is served.
pub struct Backend {
    target: Arc<Model>,
    draft: Option<Arc<Model>>,
    tokenizer: Tokenizer,
    methods: Vec<Method>,
    mirror: Option<Engine>,
    default_method: Method,
    settings: MirrorSettings,
    encoder: PromptEncoder,
    /// Mirror's constraint compiler, which also checks Mirror's constraints at admission.
    constraints: LazyCompiler,
}

impl Backend {
    /// Serves `methods` (deduplicated) over `target` and, for `sd` and `mirror`, `draft`.
    /// `default_method` serves requests that name none. Mirror runs with `settings`; `sd` and
    /// `lookup` draft windows of `settings.speculative.gamma` tokens.
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
        if let Some(method) = served.iter().find(|m| m.needs_draft()) {
            if draft.is_none() {
                return Err(ServeError::Config(format!(
                    "method `{method}` needs a draft model"
                )));
            }
        }
        let constraints = LazyCompiler::new(Some(tokenizer.clone()), target.vocab_size());
        let mirror = match (&draft, served.contains(&Method::Mirror)) {
            (Some(draft), true) => {
                let decoder = Mirror::builder(Arc::clone(&target), Arc::clone(draft))
                    .settings(*settings)
                    .constraints(constraints.clone())
                    .build()?;
                Some(Engine::new(Box::new(decoder), tokenizer.clone()))
            }
            _ => None,
        };
        Ok(Self {
            encoder: PromptEncoder {
                tokenizer: tokenizer.clone(),
            },
            target,
            draft,
            tokenizer,
            methods: served,
            mirror,
            default_method,
            settings: *settings,
            constraints,
        })
    }

    /// The methods this backend serves.
    pub fn methods(&self) -> Vec<Method> {
        self.methods.clone()
    }

    /// The method of requests that name none.
    pub fn default_method(&self) -> Method {
        self.default_method
    }

    /// Mirror's constraint compiler (to check a constraint before it is queued).
    pub fn constraints(&self) -> LazyCompiler {
        self.constraints.clone()
    }

    /// Mirror's settings and the target's depth (to check monitors before they are queued).
    pub fn mirror_layout(&self) -> (MirrorSettings, usize) {
        (self.settings, self.target.num_layers())
    }

    /// A prompt encoder for the HTTP side.
    pub fn encoder(&self) -> PromptEncoder {
        self.encoder.clone()
    }

    /// Longest context of the target (prompt plus output), in tokens.
    pub fn context_limit(&self) -> usize {
        self.target.context_limit()
    }

    /// Rows of the target's LM head: token ids must be below it.
    pub fn vocab_size(&self) -> usize {
        self.target.vocab_size()
    }

    /// Starts the batched engine with `settings` when a batched method is served (with the
    /// draft model when `sd` is).
    pub fn spawn_batched(&self, settings: BatchSettings) -> Result<Option<Batched>, ServeError> {
        if !self.methods.iter().any(|m| m.is_batched()) {
            return Ok(None);
        }
        let tokenizer = Some(self.tokenizer.clone());
        let target = Arc::clone(&self.target);
        let handle = match &self.draft {
            Some(draft) if self.methods.contains(&Method::Speculative) => {
                EngineHandle::spawn_with_draft(target, Arc::clone(draft), tokenizer, settings)?
            }
            _ => EngineHandle::spawn(target, tokenizer, settings)?,
        };
        Ok(Some(Batched {
            handle,
            speculative: self.settings.speculative,
        }))
    }

    /// Generates after `prompt` with Mirror, calling `on_text` with each committed piece of
    /// text and its tokens' log-probabilities (when asked for; the piece may then be empty);
    /// returning [`StreamControl::Stop`] cancels at the next commit.
    pub fn generate_mirror(
        &mut self,
        prompt: &[u32],
        config: &GenerationConfig,
        on_text: impl FnMut(&str, &[TokenLogprob]) -> StreamControl,
    ) -> Result<Generation, ServeError> {
        let engine = self
            .mirror
            .as_mut()
            .ok_or_else(|| ServeError::Config("method `mirror` is not served".into()))?;
        Ok(engine.generate_streamed(prompt, config, on_text)?)
    }
}

/// The batched engine as the server drives it.
#[derive(Clone)]
pub struct Batched {
    /// The engine.
    pub handle: EngineHandle,
    speculative: mirror_scheduler::SpeculativeSettings,
}

impl Batched {
    /// The batched request of `method` (`ar`, `sd` or `lookup`).
    pub fn request(
        &self,
        method: Method,
        prompt: Vec<u32>,
        config: GenerationConfig,
    ) -> SequenceRequest {
        let gamma = self.speculative.gamma;
        let speculation = match method {
            Method::Speculative => Speculation::Draft {
                gamma,
                greedy_draft: self.speculative.greedy_draft,
            },
            Method::Lookup => Speculation::Lookup {
                lookup: self.speculative.lookup.unwrap_or_default(),
                gamma,
            },
            Method::Autoregressive | Method::Mirror => Speculation::None,
        };
        SequenceRequest {
            speculation,
            ..SequenceRequest::new(prompt, config)
        }
    }
}
