//! Prompt-lookup drafting (Saxena, "Prompt Lookup Decoding", 2023; llama.cpp's n-gram lookup,
//! vLLM's n-gram proposer): the draft for the next window is what followed the most recent
//! earlier occurrence of the sequence's last few tokens, in the prompt or in the text generated
//! so far. It costs no model at all, and it is lossless like any draft: a looked-up token is a
//! point mass, accepted with the target's own probability of it.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::generation::StopSet;
use crate::window::{DraftChoice, DraftWindow};

/// How lookup searches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LookupConfig {
    /// Longest suffix to match (tried first).
    pub max_ngram: usize,
    /// Shortest suffix to match: shorter matches are more often wrong.
    pub min_ngram: usize,
}

impl Default for LookupConfig {
    fn default() -> Self {
        // vLLM's n-gram proposer defaults to matches of 1 to 4 tokens; one-token matches
        // are mostly coincidences in a vocabulary of 150k, so they are not tried.
        Self {
            max_ngram: 4,
            min_ngram: 2,
        }
    }
}

impl LookupConfig {
    /// Checks the n-gram range.
    pub fn check(&self) -> Result<()> {
        if self.min_ngram == 0 || self.min_ngram > self.max_ngram {
            return Err(Error::InvalidConfig(format!(
                "lookup n-grams must satisfy 1 <= min_ngram <= max_ngram, got {}..={}",
                self.min_ngram, self.max_ngram
            )));
        }
        Ok(())
    }

    /// Up to `count` tokens that followed the most recent earlier occurrence of the longest
    /// suffix of `context` (from `max_ngram` tokens down to `min_ngram`) that occurs earlier.
    /// Empty when no suffix recurs. The continuation is copied as an overlapping LZ77 match
    /// is: where it reaches the end of the context it goes on with the tokens it has just
    /// proposed, so repeated text proposes more of the same repetition.
    pub fn propose(&self, context: &[u32], count: usize) -> Vec<u32> {
        let len = context.len();
        if count == 0 || self.min_ngram == 0 {
            return Vec::new();
        }
        let longest = self.max_ngram.min(len.saturating_sub(1));
        for n in (self.min_ngram..=longest).rev() {
            let pattern = &context[len - n..];
            // The most recent start whose match ends before the suffix itself begins to
            // overlap the end: the continuation must have at least one token.
            let found = (0..len - n)
                .rev()
                .find(|&start| &context[start..start + n] == pattern);
            if let Some(start) = found {
                return copy_overlapping(context, start + n, count);
            }
        }
        Vec::new()
    }

    /// [`LookupConfig::propose`] as a draft window of point masses, ending after a stop token.
    pub(crate) fn window(&self, context: &[u32], count: usize, stop: &StopSet) -> DraftWindow {
        let mut tokens = self.propose(context, count);
        if let Some(end) = tokens.iter().position(|&t| stop.contains(t)) {
            tokens.truncate(end + 1);
        }
        DraftWindow {
            choices: vec![DraftChoice::PointMass; tokens.len()],
            tokens,
            refused: None,
        }
    }
}

/// `count` tokens from `context[from..]`, continuing with the copied tokens themselves past
/// the end of `context` (`from < context.len()`).
fn copy_overlapping(context: &[u32], from: usize, count: usize) -> Vec<u32> {
    let period = context.len() - from;
    (0..count).map(|i| context[from + i % period]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slow, obvious reference: every earlier window compared token by token.
    fn reference(context: &[u32], config: &LookupConfig, count: usize) -> Vec<u32> {
        let len = context.len();
        for n in (config.min_ngram..=config.max_ngram).rev() {
            if n >= len {
                continue;
            }
            let suffix: Vec<u32> = context[len - n..].to_vec();
            let mut best: Option<usize> = None;
            for start in 0..len - n {
                let window: Vec<u32> = context[start..start + n].to_vec();
                if window == suffix {
                    best = Some(start);
                }
            }
            if let Some(start) = best {
                // Token by token, reading back what was just proposed past the end.
                let mut extended = context.to_vec();
                for i in 0..count {
                    let token = extended[start + n + i];
                    extended.push(token);
                }
                return extended[len..].to_vec();
            }
        }
        Vec::new()
    }

    #[test]
    fn proposes_what_followed_the_latest_longest_match() {
        let config = LookupConfig::default();
        // "1 2 3 4" then later "9 2 3" ... suffix "2 3" last seen before "7": the latest match.
        let context = [1, 2, 3, 4, 5, 2, 3, 7, 8, 9, 2, 3];
        assert_eq!(config.propose(&context, 3), vec![7, 8, 9]);
        // A longer match wins over a more recent shorter one.
        let context = [5, 6, 7, 1, 9, 9, 6, 7, 2, 5, 6, 7];
        assert_eq!(config.propose(&context, 2), vec![1, 9]);
        // Past the end of the context the copy goes on with what it proposed.
        assert_eq!(config.propose(&[4, 5, 4, 5], 5), vec![4, 5, 4, 5, 4]);
    }

    #[test]
    fn empty_short_and_unmatched_contexts_propose_nothing() {
        let config = LookupConfig::default();
        assert!(config.propose(&[], 4).is_empty());
        assert!(config.propose(&[7], 4).is_empty());
        assert!(config.propose(&[1, 2, 3, 4, 5], 4).is_empty());
        assert!(config.propose(&[1, 2, 1, 2], 0).is_empty());
        // Repeated text: one token repeated matches itself and proposes more of it.
        assert_eq!(config.propose(&[3, 3, 3, 3, 3], 3), vec![3, 3, 3]);
    }

    #[test]
    fn agrees_with_an_obvious_search_on_random_sequences() {
        let mut state = 12345u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 60) as u32
        };
        for config in [
            LookupConfig::default(),
            LookupConfig {
                max_ngram: 3,
                min_ngram: 1,
            },
        ] {
            for len in 0..60 {
                let context: Vec<u32> = (0..len).map(|_| next()).collect();
                for count in [1, 3, 8] {
                    assert_eq!(
                        config.propose(&context, count),
                        reference(&context, &config, count),
                        "{context:?} {count}"
                    );
                }
            }
        }
    }
}
