//! An engine: a decoding strategy with its tokenizer, for text in and text out, chat, and
//! streaming with cancellation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Receiver};

use crate::config::{Generation, GenerationConfig, StreamControl};
use crate::error::{Error, Result};
use crate::Decoder;
use mirror_core::{ChatMessage, Tokenizer};

/// A strategy plus a tokenizer, serving repeated generations.
pub struct Engine {
    /// `None` only while a [`TextStream`] has it on its generation thread.
    decoder: Option<Box<dyn Decoder>>,
    tokenizer: Tokenizer,
}

impl Engine {
    /// Pairs a decoding strategy with the target's tokenizer.
    pub fn new(decoder: Box<dyn Decoder>, tokenizer: Tokenizer) -> Self {
        Self {
            decoder: Some(decoder),
            tokenizer,
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

    fn take_decoder(&mut self) -> Result<Box<dyn Decoder>> {
        self.decoder.take().ok_or_else(|| {
            Error::InvalidConfig("the engine's decoder is held by a leaked stream".into())
        })
    }

    fn with_eos(&self, config: &GenerationConfig) -> GenerationConfig {
        let mut config = config.clone();
        if config.stop_at_eos {
            config
                .stop_tokens
                .extend_from_slice(self.tokenizer.eos_ids());
        }
        config
    }

    /// Generates from raw text (special tokens such as BOS added as the model expects).
    pub fn generate(&mut self, prompt: &str, config: &GenerationConfig) -> Result<Generation> {
        self.generate_stream(prompt, config, |_| StreamControl::Continue)
    }

    /// Renders `messages` with the model's chat template and generates the assistant's reply.
    pub fn chat(
        &mut self,
        messages: &[ChatMessage],
        config: &GenerationConfig,
    ) -> Result<Generation> {
        let prompt = self.tokenizer.apply_chat_template(messages, true)?;
        self.generate_tokens_stream(&self.tokenizer.encode(&prompt, false)?, config, |_| {
            StreamControl::Continue
        })
    }

    /// Encodes a chat prompt (template rendered, no extra BOS).
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let prompt = self.tokenizer.apply_chat_template(messages, true)?;
        Ok(self.tokenizer.encode(&prompt, false)?)
    }

    /// Generates from text, calling `on_text` with each piece of text as it is committed;
    /// returning [`StreamControl::Stop`] cancels.
    pub fn generate_stream(
        &mut self,
        prompt: &str,
        config: &GenerationConfig,
        on_text: impl FnMut(&str) -> StreamControl,
    ) -> Result<Generation> {
        let tokens = self.tokenizer.encode(prompt, true)?;
        self.generate_tokens_stream(&tokens, config, on_text)
    }

    /// Generates from token ids, streaming text pieces to `on_text`.
    pub fn generate_tokens_stream(
        &mut self,
        prompt: &[u32],
        config: &GenerationConfig,
        mut on_text: impl FnMut(&str) -> StreamControl,
    ) -> Result<Generation> {
        let config = self.with_eos(config);
        let mut text = IncrementalText::new(self.tokenizer.clone());
        let mut on_tokens = |new: &[u32]| match text.push(new) {
            Some(piece) => on_text(&piece),
            None => StreamControl::Continue,
        };
        let decoder = self.decoder.as_mut().ok_or_else(|| {
            Error::InvalidConfig("the engine's decoder is held by a leaked stream".into())
        })?;
        let mut generation = decoder.generate_stream(prompt, &config, &mut on_tokens)?;
        generation.text = Some(self.tokenizer.decode(&generation.tokens, true)?);
        Ok(generation)
    }

    /// Starts generating from token ids on a background thread and returns an iterator over the
    /// text as it is committed. Dropping the stream cancels the generation, waits for its thread
    /// (and so for the draft worker to go idle) and hands the decoder back to the engine.
    pub fn stream(&mut self, prompt: &[u32], config: &GenerationConfig) -> Result<TextStream<'_>> {
        let decoder = self.take_decoder()?;
        let (tx, rx) = unbounded();
        let cancel = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&cancel);
        let tokenizer = self.tokenizer.clone();
        let config = self.with_eos(config);
        let prompt = prompt.to_vec();
        let spawned = std::thread::Builder::new()
            .name("mirror-generation".into())
            .spawn(move || {
                let mut decoder = decoder;
                let mut text = IncrementalText::new(tokenizer.clone());
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
                    .generate_stream(&prompt, &config, &mut on_tokens)
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
            Err(e) => Err(Error::WorkerFailed(format!(
                "cannot spawn the generation thread: {e}"
            ))),
        }
    }
}

/// Turns committed tokens into new text: decodes the whole output and returns what is new,
/// holding back an incomplete UTF-8 sequence (decoded as U+FFFD) until its bytes arrive.
struct IncrementalText {
    tokenizer: Tokenizer,
    tokens: Vec<u32>,
    emitted: usize,
}

impl IncrementalText {
    fn new(tokenizer: Tokenizer) -> Self {
        Self {
            tokenizer,
            tokens: Vec::new(),
            emitted: 0,
        }
    }

    fn push(&mut self, new: &[u32]) -> Option<String> {
        self.tokens.extend_from_slice(new);
        let text = self.tokenizer.decode(&self.tokens, true).ok()?;
        if text.ends_with('\u{FFFD}')
            || text.len() <= self.emitted
            || !text.is_char_boundary(self.emitted)
        {
            return None;
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        Some(piece)
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
        self.join()
    }

    fn join(&mut self) -> Result<Generation> {
        let handle = self
            .handle
            .take()
            .ok_or_else(|| Error::WorkerFailed("the stream was already finished".into()))?;
        let joined = handle.join();
        self.pieces = None;
        match joined {
            Ok((decoder, result)) => {
                self.engine.decoder = decoder;
                result
            }
            Err(_) => Err(Error::WorkerFailed("the generation thread panicked".into())),
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
        if self.handle.is_some() {
            // The generation stops at its next commit: the cancel flag, or the receiver gone.
            self.cancel.store(true, Ordering::Release);
            self.pieces = None;
            let _ = self.join();
        }
    }
}
