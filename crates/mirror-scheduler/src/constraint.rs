//! Constrained decoding: a [`Constraint`] compiled by llguidance into a per-sequence
//! [`ConstraintState`] that masks the target's logits row by row, validates draft tokens, and
//! proposes the tokens the grammar forces.
//!
//! At a verification window `w_1..w_k` row `j` is the target's distribution after `w_1..w_j`, so
//! it is masked by the grammar state those tokens reach: the state consumes the window as the
//! rows are masked, then rolls back to the committed prefix and consumes what was committed.
//! Masked logits are `-inf`, so sampling, argmax and the rejection rule all work on the masked,
//! renormalized distribution, and verification stays lossless with respect to it. A draft token
//! the grammar forbids cuts the window before the target sees it ([`ConstraintState::valid_prefix`]).
//! Where the grammar allows one token only (braces, keys, quotes), those tokens are the window
//! ([`ConstraintState::forced`]): point masses the masked target accepts with probability one,
//! at the cost of their rows.
//!
//! The token trie is built from the tokenizer's `tokenizer.json` with llguidance's own
//! [`llguidance::token_bytes_from_tokenizer_json`]; the only code of ours here is the tokenizer
//! environment (`toktrie_hf_tokenizers` does the same but pins an older `tokenizers` than ours).
//!
//! May import: [`crate::generation`], [`crate::window`] and [`crate::error`].

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use mirror_core::Tokenizer;

use crate::error::{Error, Result};
use crate::generation::Constraint;
use crate::window::{DraftChoice, DraftWindow};

/// The tokenizer as llguidance sees it: the token trie, and our tokenizer for text.
struct TokenizerBytes {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for TokenizerBytes {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        // Text the grammar forces is tokenized as the model would see it; bytes that are not
        // UTF-8 (part of a character) fall back to the trie's greedy split.
        match std::str::from_utf8(s) {
            Ok(text) => self
                .tokenizer
                .encode(text, false)
                .unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// Compiles constraints for one model's tokenizer (built once per engine: the token trie and
/// the mask slices take a while for a large vocabulary).
pub struct ConstraintCompiler {
    factory: ParserFactory,
    vocab_size: usize,
}

impl std::fmt::Debug for ConstraintCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintCompiler")
            .field("vocab_size", &self.vocab_size)
            .finish()
    }
}

fn invalid(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
    Error::InvalidConstraint {
        source: source.into(),
    }
}

fn failed(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
    Error::ConstraintFailed {
        source: source.into(),
    }
}

impl ConstraintCompiler {
    /// A compiler for `tokenizer` and a model whose logits have `vocab_size` entries (ids the
    /// tokenizer lacks are never allowed).
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize) -> Result<Self> {
        let json = tokenizer.to_json()?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(invalid)?;
        words.resize(vocab_size.max(words.len()), Vec::new());
        let eos = tokenizer.eos_ids().first().copied().ok_or_else(|| {
            Error::InvalidConfig("constrained decoding needs an end-of-sequence token".into())
        })?;
        let info = TokRxInfo::new(words.len() as u32, eos);
        let env: TokEnv = Arc::new(TokenizerBytes {
            trie: TokTrie::from(&info, &words),
            tokenizer: tokenizer.clone(),
        });
        let capabilities = InferenceCapabilities {
            ff_tokens: true,
            ..InferenceCapabilities::default()
        };
        let mut factory = ParserFactory::new(
            &env,
            capabilities,
            &llguidance::earley::SlicedBiasComputer::general_slices(),
        )
        .map_err(invalid)?;
        factory.quiet();
        Ok(Self {
            factory,
            vocab_size: words.len(),
        })
    }

    /// Compiles `constraint` into the state of a sequence that has generated nothing yet. An
    /// invalid schema, regex or grammar is [`Error::InvalidConstraint`] with the compiler's
    /// message.
    pub fn compile(&self, constraint: &Constraint) -> Result<ConstraintState> {
        let grammar = match constraint {
            Constraint::JsonSchema(schema) => TopLevelGrammar::from_json_schema(compact(schema)),
            Constraint::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(&serde_json::json!({"type": "object"})))
            }
            Constraint::Regex(regex) => TopLevelGrammar::from_regex(regex),
            Constraint::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        let parser = self.factory.create_parser(grammar).map_err(invalid)?;
        let mut matcher = Matcher::new(Ok(parser));
        // A grammar that matches nothing fails at its first mask, not halfway through.
        let first = matcher.compute_mask().map_err(invalid)?;
        if first.num_set() == 0 {
            return Err(invalid("the constraint allows no output at all"));
        }
        Ok(ConstraintState {
            matcher,
            vocab_size: self.vocab_size,
            ahead: 0,
        })
    }
}

/// A [`ConstraintCompiler`] built on first use (most generations have no constraint, and the
/// compiler takes a while for a large vocabulary), shared by whoever clones it.
#[derive(Debug, Clone)]
pub struct LazyCompiler {
    tokenizer: Option<Tokenizer>,
    vocab_size: usize,
    slot: Arc<std::sync::Mutex<Option<Arc<ConstraintCompiler>>>>,
}

impl LazyCompiler {
    /// A compiler for `tokenizer` (none: constrained requests are refused) and `vocab_size`.
    pub fn new(tokenizer: Option<Tokenizer>, vocab_size: usize) -> Self {
        Self {
            tokenizer,
            vocab_size,
            slot: Arc::default(),
        }
    }

    /// The tokenizer it compiles for, if any.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    /// Compiles `constraint` (see [`ConstraintCompiler::compile`]), building the compiler
    /// first if need be.
    pub fn compile(&self, constraint: &Constraint) -> Result<ConstraintState> {
        self.compiler()?.compile(constraint)
    }

    fn compiler(&self) -> Result<Arc<ConstraintCompiler>> {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(compiler) = slot.as_ref() {
            return Ok(Arc::clone(compiler));
        }
        let tokenizer = self.tokenizer.as_ref().ok_or_else(|| {
            Error::InvalidConfig("a constrained request needs a decoder with a tokenizer".into())
        })?;
        let compiler = Arc::new(ConstraintCompiler::new(tokenizer, self.vocab_size)?);
        *slot = Some(Arc::clone(&compiler));
        Ok(compiler)
    }
}

/// `schema` with llguidance told to write compact JSON (`", "` and `": "` between items and
/// keys, no other whitespace), unless the schema sets its own `x-guidance` options: a fixed
/// layout makes punctuation and keys forced tokens, which ride as free drafts, where flexible
/// whitespace would leave a choice at every gap.
fn compact(schema: &serde_json::Value) -> serde_json::Value {
    let mut schema = schema.clone();
    if schema.is_object() && schema.get("x-guidance").is_none() {
        JsonCompileOptions {
            item_separator: ", ".into(),
            key_separator: ": ".into(),
            whitespace_flexible: false,
            ..JsonCompileOptions::default()
        }
        .apply_to(&mut schema);
    }
    schema
}

/// The tokens a constraint allows at one row.
pub struct TokenMask {
    allowed: llguidance::toktrie::SimpleVob,
    /// Ids at or past this (the model's padding beyond the tokenizer) are never allowed.
    vocab_size: usize,
}

impl std::fmt::Debug for TokenMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenMask")
            .field("allowed", &self.allowed.num_set())
            .finish()
    }
}

impl TokenMask {
    /// Sets the logits of the tokens the constraint forbids to `-inf`.
    pub fn apply(&self, row: &mut [f32]) {
        for (id, logit) in row.iter_mut().enumerate() {
            if id >= self.vocab_size || !self.allowed.is_allowed(id as u32) {
                *logit = f32::NEG_INFINITY;
            }
        }
    }
}

/// One sequence's place in its constraint (see the [module](self) docs).
pub struct ConstraintState {
    matcher: Matcher,
    vocab_size: usize,
    /// Window tokens consumed past the committed prefix by the last
    /// [`ConstraintState::window_masks`], which [`ConstraintState::settle`] rolls back.
    ahead: usize,
}

impl std::fmt::Debug for ConstraintState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintState")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl ConstraintState {
    /// An independent copy (a fork's).
    pub fn fork(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            vocab_size: self.vocab_size,
            ahead: self.ahead,
        }
    }

    /// Whether the constraint is complete: nothing may follow.
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// The tokens the grammar forces next (empty when it allows a choice).
    pub fn forced(&mut self) -> Vec<u32> {
        if self.matcher.is_stopped() {
            return Vec::new();
        }
        self.matcher.compute_ff_tokens()
    }

    /// The window a constrained step verifies: the drafted `window` cut at its first proposal
    /// the grammar refuses ([`DraftWindow::refuse_from`]), or, with `forced_drafts`, the tokens
    /// the grammar forces (up to `room`) when the draft's valid part does not already hold them
    /// all (a draft that proposes the forced run and more keeps its longer window: the forced
    /// tokens in it are accepted all the same). Returns whether the window is forced.
    pub fn constrain_window(
        &mut self,
        window: &mut DraftWindow,
        room: usize,
        forced_drafts: bool,
    ) -> Result<bool> {
        let valid = self.valid_prefix(&window.tokens)?;
        if forced_drafts {
            let mut forced = self.forced();
            forced.truncate(room);
            if !forced.is_empty() && !window.tokens[..valid].starts_with(&forced) {
                *window = DraftWindow {
                    choices: vec![DraftChoice::PointMass; forced.len()],
                    tokens: forced,
                    refused: None,
                };
                return Ok(true);
            }
        }
        window.refuse_from(valid);
        Ok(false)
    }

    /// How many leading `tokens` the grammar allows from here: up to the first it refuses, or
    /// up to the one that completes it (nothing may follow that one, though a grammar whose
    /// end token is still allowed lets `validate_tokens` count that token too).
    pub fn valid_prefix(&mut self, tokens: &[u32]) -> Result<usize> {
        if tokens.is_empty() || self.matcher.is_stopped() {
            return Ok(0);
        }
        let valid = self.matcher.validate_tokens(tokens).map_err(failed)?;
        let mut kept = 0;
        while kept < valid && !self.matcher.is_stopped() {
            self.matcher.consume_token(tokens[kept]).map_err(failed)?;
            kept += 1;
        }
        self.matcher.rollback(kept).map_err(failed)?;
        Ok(kept)
    }

    /// Masks the logits `rows` of a verification window after `window` (row `j` by the state
    /// after `window[..j]`), leaving the state after the whole window (see
    /// [`ConstraintState::settle`]).
    pub fn mask_window(&mut self, window: &[u32], rows: &mut [Vec<f32>]) -> Result<()> {
        let masks = self.window_masks(window)?;
        for (row, mask) in rows.iter_mut().zip(&masks) {
            mask.apply(row);
        }
        Ok(())
    }

    /// The masks of the `window.len() + 1` rows of a verification window after `window` (row
    /// `j` by the state after `window[..j]`), leaving the state after the whole window (see
    /// [`ConstraintState::settle`]). Computed once, they can mask a row twice (Mirror's
    /// early-exit tap, then the final row).
    pub fn window_masks(&mut self, window: &[u32]) -> Result<Vec<TokenMask>> {
        let mut masks = Vec::with_capacity(window.len() + 1);
        for j in 0..=window.len() {
            let allowed = self.matcher.compute_mask_or_eos().map_err(failed)?;
            if allowed.num_set() == 0 {
                return Err(failed("the constraint allows no token here"));
            }
            masks.push(TokenMask {
                allowed,
                vocab_size: self.vocab_size,
            });
            match window.get(j) {
                // Rows past the token that completes the grammar allow only the end token.
                Some(&token) if !self.matcher.is_stopped() => {
                    self.matcher.consume_token(token).map_err(failed)?;
                    self.ahead += 1;
                }
                _ => {}
            }
        }
        Ok(masks)
    }

    /// After a window was masked ([`ConstraintState::window_masks`]) and verified: back to the committed prefix,
    /// then forward over the `committed` tokens. Returns how many of them the output keeps: all,
    /// or those up to the one that completes the constraint (a window's bonus after it, the end
    /// token of an "end only" row, is dropped, so that where a constrained output ends does not
    /// depend on how its windows fell).
    pub fn settle(&mut self, committed: &[u32]) -> Result<usize> {
        self.matcher
            .rollback(std::mem::take(&mut self.ahead))
            .map_err(failed)?;
        for (kept, &token) in committed.iter().enumerate() {
            if self.matcher.is_stopped() {
                return Ok(kept);
            }
            self.matcher.consume_token(token).map_err(failed)?;
        }
        Ok(committed.len())
    }
}
