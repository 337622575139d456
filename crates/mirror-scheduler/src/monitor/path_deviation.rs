//! Path deviation: a windowed entropy ratio at boundary tokens, with an opt-in stop.
//!
//! From "Mitigating Overthinking in Large Reasoning Language Models via Reasoning Path
//! Deviation Monitoring" (arXiv 2603.14251): high-entropy transition tokens mark a reasoning
//! path drifting off course, and the path-deviation index compares the recent entropy with the
//! generation's so far. With `H_t` the entropy of the target's full distribution at token `t`
//! (nats),
//!
//! ```text
//! RPDI_t = mean(H_{t-W+1..=t}) / mean(H_{0..=t})
//! ```
//!
//! checked at boundary tokens once at least `min_steps` tokens are seen; the rule fires when
//! `RPDI_t > λ`.
//!
//! Our choices: `W = 16`, `λ = 1.5`, `min_steps = W`; a boundary token is one whose decoded
//! text contains one of [`BOUNDARY_CHARS`] (`.` newline `;` `?` `!` `,`), precomputed once per
//! tokenizer ([`BoundaryTokens`]); without a tokenizer every token is a boundary. While fewer
//! than `W` tokens are seen the window is all of them (so RPDI is 1). A mean entropy of 0 gives
//! no RPDI. A token is *high-entropy* when `H_t` exceeds the mean plus one (population)
//! standard deviation of the entropies before it (the first token never is); we report their
//! rate over the last `W` tokens and over the whole generation.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Monitor, MonitorKind, MonitorReading, MonitorSummary, TokenObservation, Verdict};

/// Characters whose presence in a token's text makes it a boundary token.
pub const BOUNDARY_CHARS: [char; 6] = ['.', '\n', ';', '?', '!', ','];

/// Which token ids are boundary tokens: shared by every sequence of an engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundaryTokens(Arc<[bool]>);

impl BoundaryTokens {
    /// From each token id's decoded text, in id order.
    pub fn from_texts<S: AsRef<str>>(texts: impl IntoIterator<Item = S>) -> Self {
        let flags: Vec<bool> = texts
            .into_iter()
            .map(|t| t.as_ref().contains(&BOUNDARY_CHARS[..]))
            .collect();
        Self(flags.into())
    }

    /// From `tokenizer`'s text of each id below `vocab_size` (an id it cannot decode is not a
    /// boundary). Decodes the whole vocabulary: build it once per model.
    pub fn of_tokenizer(tokenizer: &mirror_core::Tokenizer, vocab_size: usize) -> Self {
        let texts =
            (0..vocab_size as u32).map(|id| tokenizer.decode(&[id], false).unwrap_or_default());
        Self::from_texts(texts)
    }

    /// Whether `token` is a boundary (an id past the table is not).
    pub fn contains(&self, token: u32) -> bool {
        self.0.get(token as usize).copied().unwrap_or(false)
    }
}

/// [`PathDeviation`]'s parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PathDeviationConfig {
    /// Window `W` of recent tokens (default 16).
    pub window: usize,
    /// Threshold `λ` on RPDI (default 1.5).
    pub threshold: f64,
    /// Tokens seen before the index is checked (default 16, `W`).
    pub min_steps: usize,
}

impl Default for PathDeviationConfig {
    fn default() -> Self {
        Self {
            window: 16,
            threshold: 1.5,
            min_steps: 16,
        }
    }
}

impl PathDeviationConfig {
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.window == 0 {
            return Err("path_deviation.window must be at least 1".into());
        }
        if !self.threshold.is_finite() {
            return Err(format!(
                "path_deviation.threshold must be finite, got {}",
                self.threshold
            ));
        }
        Ok(())
    }
}

/// [`PathDeviation`]'s summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PathDeviationSummary {
    /// Tokens observed.
    pub tokens: usize,
    /// Mean full-vocabulary entropy in nats (`None` without tokens).
    pub entropy_mean: Option<f64>,
    /// Largest RPDI at a checked boundary (`None`: none checked).
    pub max_rpdi: Option<f64>,
    /// RPDI at the last token, boundary or not (`None` before `min_steps` tokens).
    pub final_rpdi: Option<f64>,
    /// Share of the last `W` tokens that were high-entropy (`None` without tokens).
    pub high_entropy_window_rate: Option<f64>,
    /// Share of all tokens that were high-entropy (`None` without tokens).
    pub high_entropy_rate: Option<f64>,
    /// The first token index where `RPDI > λ` at a boundary: where early stop stops (or would
    /// have, when off).
    pub stop_index: Option<usize>,
}

/// The path-deviation monitor (see the module doc).
#[derive(Debug, Clone)]
pub struct PathDeviation {
    config: PathDeviationConfig,
    boundaries: Option<BoundaryTokens>,
    /// The last `W` tokens' entropies, and whether each was high-entropy.
    recent: VecDeque<(f64, bool)>,
    tokens: usize,
    sum: f64,
    sum_squares: f64,
    high: usize,
    max_rpdi: Option<f64>,
    last_rpdi: Option<f64>,
    stop_index: Option<usize>,
}

impl PathDeviation {
    /// A monitor with `config`, whose boundary tokens are `boundaries` (`None`: every token).
    pub fn new(config: PathDeviationConfig, boundaries: Option<BoundaryTokens>) -> Self {
        Self {
            config,
            boundaries,
            recent: VecDeque::new(),
            tokens: 0,
            sum: 0.0,
            sum_squares: 0.0,
            high: 0,
            max_rpdi: None,
            last_rpdi: None,
            stop_index: None,
        }
    }
}

impl Monitor for PathDeviation {
    fn observe(&mut self, observation: &TokenObservation<'_>) -> Verdict {
        let entropy = observation.entropy;
        // High against the tokens before this one.
        let high = self.tokens > 0 && {
            let n = self.tokens as f64;
            let mean = self.sum / n;
            let variance = (self.sum_squares / n - mean * mean).max(0.0);
            entropy > mean + variance.sqrt()
        };
        let index = self.tokens;
        self.tokens += 1;
        self.sum += entropy;
        self.sum_squares += entropy * entropy;
        self.high += usize::from(high);
        self.recent.push_back((entropy, high));
        if self.recent.len() > self.config.window {
            self.recent.pop_front();
        }
        let overall = self.sum / self.tokens as f64;
        let recent = self.recent.iter().map(|&(h, _)| h).sum::<f64>() / self.recent.len() as f64;
        self.last_rpdi =
            (self.tokens >= self.config.min_steps && overall > 0.0).then(|| recent / overall);
        let boundary = self
            .boundaries
            .as_ref()
            .is_none_or(|b| b.contains(observation.token));
        let Some(rpdi) = self.last_rpdi.filter(|_| boundary) else {
            return Verdict::Continue;
        };
        self.max_rpdi = Some(self.max_rpdi.map_or(rpdi, |m| m.max(rpdi)));
        if rpdi > self.config.threshold && self.stop_index.is_none() {
            self.stop_index = Some(index);
            return Verdict::Stop(MonitorReading {
                monitor: MonitorKind::PathDeviation,
                token_index: index,
                value: rpdi,
                threshold: self.config.threshold,
            });
        }
        Verdict::Continue
    }

    fn summary(&self) -> MonitorSummary {
        let some = self.tokens > 0;
        let window_high = self.recent.iter().filter(|&&(_, h)| h).count();
        MonitorSummary::PathDeviation(PathDeviationSummary {
            tokens: self.tokens,
            entropy_mean: some.then(|| self.sum / self.tokens as f64),
            max_rpdi: self.max_rpdi,
            final_rpdi: self.last_rpdi,
            high_entropy_window_rate: some.then(|| window_high as f64 / self.recent.len() as f64),
            high_entropy_rate: some.then(|| self.high as f64 / self.tokens as f64),
            stop_index: self.stop_index,
        })
    }
}
