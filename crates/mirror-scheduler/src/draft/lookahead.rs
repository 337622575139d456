//! Lookahead tokens (Speculative Streaming, Bhendawade et al., arXiv 2402.11131) on the draft
//! side: what one draft step leaves a chain, and how a greedy draft checks the lookahead tokens
//! it fed against its own main row. Pure data and functions over `&[f32]`.
//!
//! A draft with lookahead tokens ([`mirror_core::Model::with_lookahead`]) proposes its main
//! token and one lookahead token per lookahead row each step. With a greedy draft, the next step
//! also checks those lookahead tokens against the main row (every fed row's main logits come
//! with the pass) and drops them from the first one it disagrees with; lookahead rows anchored
//! at every fed row make the step after a disagreement propose a full set again. A sampling
//! draft keeps its lookahead tokens as sampled from their own distributions (the distribution
//! each token was drawn from is what the target's verification divides by, so output stays
//! exact).

use mirror_core::sampling;

/// What one draft step leaves a chain: the main distribution after its newest fed token and the
/// lookahead distributions anchored there (empty without lookahead).
#[derive(Debug, Clone, Default)]
pub(crate) struct StepLogits {
    pub main: Vec<f32>,
    pub lookahead: Vec<Vec<f32>>,
}

/// How many of `fed` (a chain's newest tokens, the first already trusted) the main row
/// agrees with: token `i >= 1` stands if the main argmax after token `i - 1` is `fed[i]`.
pub(crate) fn agreed_prefix(fed: &[u32], main_rows: &[Vec<f32>]) -> usize {
    1 + fed
        .iter()
        .skip(1)
        .zip(main_rows)
        .take_while(|(&token, row)| sampling::argmax(row) == token)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row whose argmax is `token`.
    fn row_for(token: u32) -> Vec<f32> {
        let mut row = vec![0.0; 8];
        row[token as usize] = 1.0;
        row
    }

    #[test]
    fn the_first_fed_token_always_stands_and_the_rest_while_the_main_row_agrees() {
        let rows = [row_for(3), row_for(5), row_for(6)];
        assert_eq!(agreed_prefix(&[1], &rows), 1);
        assert_eq!(agreed_prefix(&[1, 3, 5, 7], &rows), 3);
        assert_eq!(agreed_prefix(&[1, 2, 5], &rows), 1);
        assert_eq!(agreed_prefix(&[1, 3, 5, 6], &rows), 4);
    }
}
