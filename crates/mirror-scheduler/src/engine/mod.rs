//! Engines: text in, text out, chat and streaming over the strategies.
//!
//! [`Engine`] runs one sequence at a time with any [`Decoder`]. [`EngineHandle`] runs many at
//! once: a batched core (`batch`) steps every running sequence through one ragged target forward,
//! with KV caches from a byte-budgeted pool (`pool`), on a thread of its own; the handle is
//! `Clone + Send + Sync` and returns a stream of events per sequence.
//!
//! May import everything below it; only the server sits above.

mod batch;
mod handle;
mod pool;
mod prefix;
mod text;

pub use batch::EngineLoad;
pub use batch::StepReport;
pub use batch::{BatchSettings, SequenceRequest, Speculation};
pub use handle::{EngineHandle, Event, SequenceStream};
use text::IncrementalText;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Receiver};

use crate::error::{Error, Result};
use crate::generation::{Generation, GenerationConfig, StreamControl, TokenLogprob};
use crate::strategy::Decoder;
use mirror_core::{ChatMessage, Tokenizer, Tool};

/// What to generate from.
#[derive(Debug, Clone, Copy)]
pub enum Prompt<'a> {
    /// Raw text; the tokenizer adds its special tokens (such as BOS) as the model expects.
    Text(&'a str),
    /// Messages rendered with the model's chat template, ending where the assistant speaks.
    Chat(&'a [ChatMessage]),
    /// Messages with tools the model may call ([`Tokenizer::apply_chat_template_with_tools`]).
    ChatWithTools(&'a [ChatMessage], &'a [Tool]),
    /// Token ids, used as they are.
    Tokens(&'a [u32]),
}

/// `From` for each way to hold a prompt.
macro_rules! prompt_from {
    ($($source:ty => $variant:ident),* $(,)?) => {
        $(impl<'a> From<&'a $source> for Prompt<'a> {
            fn from(prompt: &'a $source) -> Self {
                Prompt::$variant(prompt)
            }
        })*
    };
}

impl Prompt<'_> {
    /// The token ids of the prompt under `tokenizer`: text gets the special tokens the model
    /// expects (such as BOS), chat messages are rendered with the chat template up to where the
    /// assistant speaks, token ids are used as they are.
    pub fn encode(self, tokenizer: &Tokenizer) -> Result<Vec<u32>> {
        Ok(match self {
            Prompt::Text(text) => tokenizer.encode(text, true)?,
            Prompt::Chat(messages) => {
                let text = tokenizer.apply_chat_template(messages, true)?;
                tokenizer.encode(&text, false)?
            }
            Prompt::ChatWithTools(messages, tools) => {
                let text = tokenizer.apply_chat_template_with_tools(messages, tools, true)?;
                tokenizer.encode(&text, false)?
            }
            Prompt::Tokens(tokens) => tokens.to_vec(),
        })
    }
}

prompt_from! {
    str => Text,
    String => Text,
    [ChatMessage] => Chat,
    Vec<ChatMessage> => Chat,
    [u32] => Tokens,
    Vec<u32> => Tokens,
}

/// A strategy plus a tokenizer, serving repeated generations: [`Engine::generate`],
/// [`Engine::generate_with`] (text pieces to a callback as they are committed, which can
/// cancel) and [`Engine::stream`] (the same as an iterator, on a thread of its own).
pub struct Engine {
    /// `None` only while a [`TextStream`] has it on its generation thread.
    decoder: Option<Box<dyn Decoder>>,
    tokenizer: Arc<Tokenizer>,
}

impl Engine {
    /// Pairs a decoding strategy with the target's tokenizer.
    pub fn new(decoder: Box<dyn Decoder>, tokenizer: Tokenizer) -> Self {
        Self {
            decoder: Some(decoder),
            tokenizer: Arc::new(tokenizer),
        }
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The strategy (`None` only if a [`TextStream`] was leaked with `mem::forget`).
    pub fn decoder(&mut self) -> Option<&mut dyn Decoder> {
        match &mut self.decoder {
            Some(d) => Some(d.as_mut()),
            None => None,
        }
    }

    /// The token ids of `prompt`.
    pub fn encode<'a>(&self, prompt: impl Into<Prompt<'a>>) -> Result<Vec<u32>> {
        prompt.into().encode(&self.tokenizer)
    }

    fn decoder_mut(&mut self) -> Result<&mut Box<dyn Decoder>> {
        self.decoder.as_mut().ok_or_else(|| {
            Error::InvalidConfig("the engine's decoder is held by a leaked stream".into())
        })
    }

    /// The config with the tokenizer's end-of-sequence ids among the stop tokens (the model's
    /// own are added by the decoder, see [`GenerationConfig::stop_ids`]).
    fn with_eos(&self, config: &GenerationConfig) -> GenerationConfig {
        let mut config = config.clone();
        if config.stop_at_eos {
            config
                .stop_tokens
                .extend_from_slice(self.tokenizer.eos_ids());
        }
        config
    }

    /// Generates after `prompt`.
    pub fn generate<'a>(
        &mut self,
        prompt: impl Into<Prompt<'a>>,
        config: &GenerationConfig,
    ) -> Result<Generation> {
        self.generate_with(prompt, config, |_| StreamControl::Continue)
    }

    /// Generates after `prompt`, calling `on_text` with each piece of text as it is committed;
    /// returning [`StreamControl::Stop`] cancels.
    pub fn generate_with<'a>(
        &mut self,
        prompt: impl Into<Prompt<'a>>,
        config: &GenerationConfig,
        mut on_text: impl FnMut(&str) -> StreamControl,
    ) -> Result<Generation> {
        self.generate_streamed(prompt, config, |piece, _| match piece.is_empty() {
            true => StreamControl::Continue,
            false => on_text(piece),
        })
    }

    /// [`Engine::generate_with`], each piece of text with the log-probabilities of the tokens
    /// committed with it when the decoder streams them ([`Decoder::generate_streamed`]). A
    /// piece is empty when its tokens' bytes end inside a character (the text follows with the
    /// next piece) and only their log-probabilities come.
    pub fn generate_streamed<'a>(
        &mut self,
        prompt: impl Into<Prompt<'a>>,
        config: &GenerationConfig,
        mut on_text: impl FnMut(&str, &[TokenLogprob]) -> StreamControl,
    ) -> Result<Generation> {
        let prompt = self.encode(prompt)?;
        let config = self.with_eos(config);
        let mut text = IncrementalText::new(Arc::clone(&self.tokenizer));
        let mut on_tokens = |new: &[u32], logprobs: &[TokenLogprob]| match text.push(new) {
            Some(piece) => on_text(&piece, logprobs),
            None if !logprobs.is_empty() => on_text("", logprobs),
            None => StreamControl::Continue,
        };
        let decoder = self.decoder_mut()?;
        let mut generation = decoder.generate_streamed(&prompt, &config, &mut on_tokens)?;
        generation.text = Some(self.tokenizer.decode(&generation.tokens, true)?);
        Ok(generation)
    }

    /// Starts generating after `prompt` on a background thread and returns an iterator over the
    /// text as it is committed. Dropping the stream cancels the generation, waits for its thread
    /// (and so for the draft worker to go idle) and hands the decoder back to the engine.
    pub fn stream<'a>(
        &mut self,
        prompt: impl Into<Prompt<'a>>,
        config: &GenerationConfig,
    ) -> Result<TextStream<'_>> {
        let prompt = self.encode(prompt)?;
        let config = self.with_eos(config);
        let decoder = self.decoder.take().ok_or_else(|| {
            Error::InvalidConfig("the engine's decoder is held by a leaked stream".into())
        })?;
        let (tx, rx) = unbounded();
        let cancel = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&cancel);
        let tokenizer = Arc::clone(&self.tokenizer);
        let spawned = std::thread::Builder::new()
            .name("mirror-generation".into())
            .spawn(move || {
                let mut decoder = decoder;
                let mut text = IncrementalText::new(Arc::clone(&tokenizer));
                // Checked at every commit, whether or not it completes a character.
                let mut on_tokens = |new: &[u32]| {
                    let gone = match text.push(new) {
                        Some(piece) => tx.send(piece).is_err(),
                        None => false,
                    };
                    if gone || stop.load(Ordering::Acquire) {
                        StreamControl::Stop
                    } else {
                        StreamControl::Continue
                    }
                };
                let result = decoder
                    .generate_with(&prompt, &config, &mut on_tokens)
                    .and_then(|mut generation| {
                        generation.text = Some(tokenizer.decode(&generation.tokens, true)?);
                        Ok(generation)
                    });
                (Some(decoder), result)
            });
        match spawned {
            Ok(handle) => Ok(TextStream {
                engine: self,
                pieces: Some(rx),
                cancel,
                handle: Some(handle),
            }),
            Err(e) => Err(Error::SpawnFailed(e)),
        }
    }
}

type StreamResult = (Option<Box<dyn Decoder>>, Result<Generation>);

/// Text committed by a generation running on its own thread; see [`Engine::stream`].
pub struct TextStream<'a> {
    engine: &'a mut Engine,
    pieces: Option<Receiver<String>>,
    cancel: Arc<AtomicBool>,
    handle: Option<JoinHandle<StreamResult>>,
}

impl TextStream<'_> {
    /// Waits for the end and returns the whole generation (the pieces not yet read included).
    pub fn finish(mut self) -> Result<Generation> {
        match self.handle.take() {
            Some(handle) => self.join(handle),
            // Only `Drop` takes the handle otherwise, and it runs after this.
            None => unreachable!("a TextStream's thread is joined once"),
        }
    }

    fn join(&mut self, handle: JoinHandle<StreamResult>) -> Result<Generation> {
        let joined = handle.join();
        self.pieces = None;
        match joined {
            Ok((decoder, result)) => {
                self.engine.decoder = decoder;
                result
            }
            Err(panic) => Err(Error::GenerationPanicked(mirror_core::panic_message(
                &*panic,
            ))),
        }
    }
}

impl Iterator for TextStream<'_> {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        self.pieces.as_ref()?.recv().ok()
    }
}

impl Drop for TextStream<'_> {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            // The generation stops at its next commit: the cancel flag, or the receiver gone.
            self.cancel.store(true, Ordering::Release);
            self.pieces = None;
            let _ = self.join(handle);
        }
    }
}
