//! Committed tokens as text, piece by piece.

use std::sync::Arc;

use mirror_core::Tokenizer;

/// Turns committed tokens into new text without decoding the whole output each time: only the
/// tokens since the last emitted piece are decoded, with a few tokens before them as context
/// (tokenizers merge spaces and byte pieces across token boundaries). An incomplete UTF-8
/// sequence (decoded as U+FFFD) is held back until its bytes arrive. The same scheme as
/// Hugging Face's text-generation-inference `decode_token`.
pub(crate) struct IncrementalText {
    /// Shared, not cloned: a tokenizer with a large vocabulary takes tens of MB, and every
    /// stream has one of these.
    tokenizer: Arc<Tokenizer>,
    tokens: Vec<u32>,
    /// Start of the context decoded together with the new tokens.
    prefix_offset: usize,
    /// Tokens up to here have been emitted as text.
    read_offset: usize,
}

impl IncrementalText {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        Self {
            tokenizer,
            tokens: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    pub fn push(&mut self, new: &[u32]) -> Option<String> {
        self.tokens.extend_from_slice(new);
        let prefix = self
            .tokenizer
            .decode(&self.tokens[self.prefix_offset..self.read_offset], true)
            .ok()?;
        let text = self
            .tokenizer
            .decode(&self.tokens[self.prefix_offset..], true)
            .ok()?;
        if text.ends_with('\u{FFFD}')
            || text.len() <= prefix.len()
            || !text.is_char_boundary(prefix.len())
        {
            return None;
        }
        let piece = text[prefix.len()..].to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.tokens.len();
        Some(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixture's byte-level BPE tokenizer (the repository's `tests/fixtures`).
    fn tokenizer() -> Tokenizer {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf");
        Tokenizer::from_files(&root.join("qwen2/tokenizer.json"), None).unwrap()
    }

    #[test]
    fn incremental_pieces_add_up_to_the_whole_decode_whatever_the_chunks() {
        let tokenizer = tokenizer();
        let text = "Hello, wörld! 日本語のテキスト 🦀🦀 and   spaces\n\ttabs; naïve café — done.";
        let tokens = tokenizer.encode(text, false).unwrap();
        let whole = tokenizer.decode(&tokens, true).unwrap();
        for chunk in [1usize, 2, 3, 7] {
            let mut incremental = IncrementalText::new(Arc::new(tokenizer.clone()));
            let mut pieces = String::new();
            for part in tokens.chunks(chunk) {
                if let Some(piece) = incremental.push(part) {
                    assert!(
                        !piece.contains('\u{FFFD}'),
                        "a half character escaped: {piece:?}"
                    );
                    pieces.push_str(&piece);
                }
            }
            assert_eq!(pieces, whole, "chunks of {chunk}");
        }
    }

    #[test]
    fn each_push_decodes_a_bounded_window_not_the_whole_output() {
        let tokenizer = tokenizer();
        let tokens = tokenizer.encode(&"word ".repeat(400), false).unwrap();
        let mut incremental = IncrementalText::new(Arc::new(tokenizer));
        for &token in &tokens {
            incremental.push(&[token]);
            // Whatever the output's length, the decoded context stays a few tokens.
            assert!(incremental.tokens.len() - incremental.prefix_offset <= 4);
        }
    }
}
