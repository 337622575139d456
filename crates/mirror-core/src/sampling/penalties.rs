//! Sampling penalties and logit bias: changes to a row of logits that depend on the tokens before
//! it, applied before the distribution is made ([`super::warp`]).
//!
//! - Frequency and presence penalties, as OpenAI defines them: `logit[t] -= count(t) *
//!   frequency + (count(t) > 0) * presence`, where `count(t)` counts `t` among the **generated**
//!   tokens before the row (the prompt excluded, as OpenAI and vLLM count).
//! - Repetition penalty, as transformers and llama.cpp define it (Keskar et al., CTRL,
//!   arXiv 1909.05858): every token that occurs in the **prompt or the output** before the row
//!   has its logit divided by `repetition` when positive, multiplied by it when negative. It
//!   looks at the whole context (transformers' choice), not at a last-N window.
//! - Logit bias, as OpenAI defines it: `logit[t] += bias(t)`.
//!
//! Under speculation, verification row `j` of a window is penalized by the tokens before it,
//! the window's first `j` draft tokens included; the verifier then accepts against the
//! penalized distribution, so decoding stays lossless with respect to it.

use std::collections::{HashMap, HashSet};

/// The penalties of one generation (all neutral by default).
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Penalties {
    /// OpenAI's `frequency_penalty`, in [-2, 2].
    pub frequency: f32,
    /// OpenAI's `presence_penalty`, in [-2, 2].
    pub presence: f32,
    /// The repetition penalty, above 0 (1 is neutral; above 1 discourages repeats).
    pub repetition: Option<f32>,
    /// OpenAI's `logit_bias`: (token id, bias in [-100, 100]).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Penalties {
    /// Whether they change nothing.
    pub fn is_neutral(&self) -> bool {
        self.frequency == 0.0
            && self.presence == 0.0
            && self.repetition.is_none_or(|r| r == 1.0)
            && self.logit_bias.iter().all(|&(_, b)| b == 0.0)
    }

    /// Checks the ranges, and the biased token ids against a vocabulary of `vocab` rows.
    pub fn check(&self, vocab: usize) -> Result<(), String> {
        for (name, value) in [("frequency", self.frequency), ("presence", self.presence)] {
            if !(-2.0..=2.0).contains(&value) {
                return Err(format!("the {name} penalty {value} is not in [-2, 2]"));
            }
        }
        if let Some(r) = self.repetition {
            if !(r.is_finite() && r > 0.0) {
                return Err(format!(
                    "the repetition penalty {r} is not a positive number"
                ));
            }
        }
        for &(token, bias) in &self.logit_bias {
            if token as usize >= vocab {
                return Err(format!(
                    "logit_bias names token {token}, outside the vocabulary of {vocab}"
                ));
            }
            if !(-100.0..=100.0).contains(&bias) {
                return Err(format!(
                    "the logit bias {bias} of token {token} is not in [-100, 100]"
                ));
            }
        }
        Ok(())
    }

    /// Penalizes `rows`, the verification rows of one window: row `j` follows `prompt`, then
    /// `output` (the generated tokens so far), then `window[..j]`.
    pub fn apply_window(
        &self,
        rows: &mut [Vec<f32>],
        prompt: &[u32],
        output: &[u32],
        window: &[u32],
    ) {
        if self.is_neutral() {
            return;
        }
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in output {
            *counts.entry(t).or_default() += 1;
        }
        // Tokens of the whole context, for the repetition penalty (counts of the prompt's
        // tokens kept apart, since they do not count for frequency and presence).
        let mut in_prompt: HashSet<u32> = HashSet::new();
        if self.repetition.is_some() {
            in_prompt.extend(prompt.iter().copied());
        }
        for (j, row) in rows.iter_mut().enumerate() {
            self.apply_row(row, &counts, &in_prompt);
            if let Some(&t) = window.get(j) {
                *counts.entry(t).or_default() += 1;
            }
        }
    }

    /// `logits` penalized as the row after `prompt`, `output` and then `drafted` (a draft's
    /// next proposal, which the target's row there will see the same way).
    pub fn penalized_next(
        &self,
        logits: &[f32],
        prompt: &[u32],
        output: &[u32],
        drafted: &[u32],
    ) -> Vec<f32> {
        let before: Vec<u32> = output.iter().chain(drafted).copied().collect();
        let mut rows = [logits.to_vec()];
        self.apply_window(&mut rows, prompt, &before, &[]);
        let [row] = rows;
        row
    }

    fn apply_row(&self, row: &mut [f32], counts: &HashMap<u32, u32>, in_prompt: &HashSet<u32>) {
        if let Some(r) = self.repetition.filter(|&r| r != 1.0) {
            let seen = counts
                .keys()
                .chain(in_prompt.iter().filter(|t| !counts.contains_key(t)));
            for &t in seen {
                if let Some(logit) = row.get_mut(t as usize) {
                    *logit = if *logit > 0.0 { *logit / r } else { *logit * r };
                }
            }
        }
        if self.frequency != 0.0 || self.presence != 0.0 {
            for (&t, &n) in counts {
                if let Some(logit) = row.get_mut(t as usize) {
                    *logit -= n as f32 * self.frequency + self.presence;
                }
            }
        }
        for &(t, bias) in &self.logit_bias {
            if let Some(logit) = row.get_mut(t as usize) {
                *logit += bias;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definitions written out for one row, token by token (the slow, obvious way).
    fn reference(logits: &[f32], p: &Penalties, prompt: &[u32], before: &[u32]) -> Vec<f32> {
        (0..logits.len() as u32)
            .map(|t| {
                let mut l = logits[t as usize];
                let count = before.iter().filter(|&&b| b == t).count() as f32;
                if let Some(r) = p.repetition {
                    if prompt.contains(&t) || count > 0.0 {
                        l = if l > 0.0 { l / r } else { l * r };
                    }
                }
                l -= count * p.frequency + if count > 0.0 { p.presence } else { 0.0 };
                l + p
                    .logit_bias
                    .iter()
                    .filter(|(b, _)| *b == t)
                    .map(|(_, v)| v)
                    .sum::<f32>()
            })
            .collect()
    }

    #[test]
    fn each_row_is_penalized_by_the_tokens_before_it() {
        let logits: Vec<f32> = (0..12).map(|i| (i as f32 - 5.5) * 0.7).collect();
        let p = Penalties {
            frequency: 0.5,
            presence: 0.25,
            repetition: Some(1.3),
            logit_bias: vec![(2, 3.0), (11, -100.0)],
        };
        let (prompt, output, window) = ([1u32, 7, 7], [3u32, 3, 9], [9u32, 4, 1]);
        let mut rows = vec![logits.clone(); window.len() + 1];
        p.apply_window(&mut rows, &prompt, &output, &window);
        for (j, row) in rows.iter().enumerate() {
            let before: Vec<u32> = output.iter().chain(&window[..j]).copied().collect();
            let want = reference(&logits, &p, &prompt, &before);
            for (got, want) in row.iter().zip(&want) {
                assert!(
                    (got - want).abs() < 1e-6,
                    "row {j}: {row:?} against {want:?}"
                );
            }
        }
    }

    #[test]
    fn neutral_penalties_change_nothing_and_bad_ones_are_refused() {
        let logits = vec![0.5f32, -1.0, 2.0];
        let mut rows = vec![logits.clone()];
        Penalties::default().apply_window(&mut rows, &[0, 1], &[2, 2], &[]);
        assert_eq!(rows[0], logits);
        assert!(Penalties::default().check(3).is_ok());
        let bad = [
            Penalties {
                frequency: 2.5,
                ..Default::default()
            },
            Penalties {
                presence: -3.0,
                ..Default::default()
            },
            Penalties {
                repetition: Some(0.0),
                ..Default::default()
            },
            Penalties {
                logit_bias: vec![(3, 1.0)],
                ..Default::default()
            },
            Penalties {
                logit_bias: vec![(0, 101.0)],
                ..Default::default()
            },
        ];
        for p in bad {
            assert!(p.check(3).is_err(), "{p:?}");
        }
    }
}
