//! An engine: a decoding strategy with its tokenizer, for text in and text out, chat, and
//! streaming with cancellation.

use crate::config::{Generation, GenerationConfig, StreamControl};
use crate::error::Result;
use crate::Decoder;
use mirror_core::{ChatMessage, Tokenizer};

/// A strategy plus a tokenizer, serving repeated generations.
pub struct Engine {
    decoder: Box<dyn Decoder>,
    tokenizer: Tokenizer,
}

impl Engine {
    /// Pairs a decoding strategy with the target's tokenizer.
    pub fn new(decoder: Box<dyn Decoder>, tokenizer: Tokenizer) -> Self {
        Self { decoder, tokenizer }
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The strategy.
    pub fn decoder(&mut self) -> &mut dyn Decoder {
        self.decoder.as_mut()
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
        let tokenizer = self.tokenizer.clone();
        let mut all: Vec<u32> = Vec::new();
        let mut emitted = 0usize;
        let mut on_tokens = |new: &[u32]| {
            all.extend_from_slice(new);
            // Decode the whole output and emit what is new, holding back an incomplete UTF-8
            // sequence (decoded as U+FFFD) until its remaining bytes arrive.
            let Ok(text) = tokenizer.decode(&all, true) else {
                return StreamControl::Continue;
            };
            if text.ends_with('\u{FFFD}')
                || text.len() <= emitted
                || !text.is_char_boundary(emitted)
            {
                return StreamControl::Continue;
            }
            let piece = text[emitted..].to_string();
            emitted = text.len();
            on_text(&piece)
        };
        let mut generation = self
            .decoder
            .generate_stream(prompt, &config, &mut on_tokens)?;
        generation.text = Some(self.tokenizer.decode(&generation.tokens, true)?);
        Ok(generation)
    }
}
