//! Dynamic instability: Jensen-Shannon divergence between consecutive steps' distributions,
//! plus their entropy.
//!
//! From "I May Not Have Articulated Myself Clearly: Diagnosing Dynamic Instability in LLM
//! Reasoning at Inference Time" (arXiv 2602.02863). The instability strength at step `t` is
//!
//! ```text
//! I_t = JSD(p̃_t, p̃_{t-1}) + λ · H(p̃_t)
//! ```
//!
//! where `p̃_t` is the top-k of the target's distribution at step `t`, renormalized. The JSD is
//! taken over the union of both steps' top-k tokens, a step's distribution being zero on the
//! tokens outside its own top-k. A generation is summarized by its peak `S = max_t I_t` and
//! the peak's position: the paper finds early peaks recoverable and late ones fatal.
//!
//! Our choices: `λ = 1`, `k = 20`, logarithms in base 2 (so the JSD is within `[0, 1]` and the
//! entropy within `[0, log2 k]`); the first token has JSD 0; ties in the top-k go to the lower
//! token id; the peak's relative position is `t* / T` (`t*` 0-based, `T` tokens), labelled
//! early below 1/3, middle below 2/3, late otherwise; the first of equal peaks is the peak.

use serde::{Deserialize, Serialize};

use super::{largest, Monitor, MonitorSummary, TokenObservation, Verdict};

/// [`Instability`]'s parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InstabilityConfig {
    /// Weight `λ` of the entropy (default 1).
    pub lambda: f64,
    /// Tokens `k` of each step's renormalized distribution (default 20).
    pub top_k: usize,
}

impl Default for InstabilityConfig {
    fn default() -> Self {
        Self {
            lambda: 1.0,
            top_k: 20,
        }
    }
}

impl InstabilityConfig {
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.top_k == 0 {
            return Err("instability.top_k must be at least 1".into());
        }
        if !self.lambda.is_finite() || self.lambda < 0.0 {
            return Err(format!(
                "instability.lambda must be finite and non-negative, got {}",
                self.lambda
            ));
        }
        Ok(())
    }
}

/// Where in the generation the peak fell (by thirds of its relative position).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PeakTiming {
    /// `t* / T < 1/3`.
    Early,
    /// `1/3 <= t* / T < 2/3`.
    Middle,
    /// `t* / T >= 2/3`.
    Late,
}

/// [`Instability`]'s summary (every mean over the `tokens`; `None` without tokens).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstabilitySummary {
    /// Tokens observed, `T`.
    pub tokens: usize,
    /// Mean entropy `H(p̃_t)` in bits.
    pub entropy_mean: Option<f64>,
    /// Mean JSD to the previous step (bits; the first token's is 0).
    pub jsd_mean: Option<f64>,
    /// The peak instability `S = max_t I_t`.
    pub peak: Option<f64>,
    /// The peak's token index `t*` (0-based).
    pub peak_index: Option<usize>,
    /// `t* / T`.
    pub peak_position: Option<f64>,
    /// Early, middle or late, by thirds of `peak_position`.
    pub peak_timing: Option<PeakTiming>,
}

/// The dynamic-instability monitor (see the module doc).
#[derive(Debug, Clone)]
pub struct Instability {
    config: InstabilityConfig,
    /// The previous step's renormalized top-k, `(token, probability)`.
    previous: Vec<(u32, f64)>,
    tokens: usize,
    entropy_sum: f64,
    jsd_sum: f64,
    peak: Option<(usize, f64)>,
}

impl Instability {
    /// A monitor with `config`'s parameters.
    pub fn new(config: InstabilityConfig) -> Self {
        Self {
            config,
            previous: Vec::new(),
            tokens: 0,
            entropy_sum: 0.0,
            jsd_sum: 0.0,
            peak: None,
        }
    }
}

/// The `k` likeliest tokens of `probs` (ties to the lower id), renormalized to sum to 1.
fn top_k_renormalized(probs: &[f32], k: usize) -> Vec<(u32, f64)> {
    let best = largest(probs, k);
    let sum: f64 = best.iter().map(|&(_, p)| f64::from(p)).sum();
    best.into_iter()
        .map(|(t, p)| (t, if sum > 0.0 { f64::from(p) / sum } else { 0.0 }))
        .collect()
}

/// `-Σ p log2 p` over a sparse distribution.
fn entropy_bits(dist: &[(u32, f64)]) -> f64 {
    dist.iter()
        .filter(|&&(_, p)| p > 0.0)
        .map(|&(_, p)| -p * p.log2())
        .sum()
}

/// Jensen-Shannon divergence (base 2) of two sparse distributions, each zero off its support.
fn jsd_bits(p: &[(u32, f64)], q: &[(u32, f64)]) -> f64 {
    let q_of = |t: u32| q.iter().find(|&&(u, _)| u == t).map_or(0.0, |&(_, v)| v);
    let p_of = |t: u32| p.iter().find(|&&(u, _)| u == t).map_or(0.0, |&(_, v)| v);
    // `½ Σ a log2(2a / (a + b))` over one side's support (terms with a = 0 vanish).
    let half = |a: f64, b: f64| {
        if a > 0.0 {
            0.5 * a * (2.0 * a / (a + b)).log2()
        } else {
            0.0
        }
    };
    let from_p: f64 = p.iter().map(|&(t, a)| half(a, q_of(t))).sum();
    let from_q: f64 = q.iter().map(|&(t, b)| half(b, p_of(t))).sum();
    // Rounding may leave a hair below 0 or above 1.
    (from_p + from_q).clamp(0.0, 1.0)
}

impl Monitor for Instability {
    fn observe(&mut self, observation: &TokenObservation<'_>) -> Verdict {
        let current = top_k_renormalized(observation.probs, self.config.top_k);
        let jsd = if self.tokens == 0 {
            0.0
        } else {
            jsd_bits(&current, &self.previous)
        };
        let entropy = entropy_bits(&current);
        let strength = jsd + self.config.lambda * entropy;
        if self.peak.is_none_or(|(_, peak)| strength > peak) {
            self.peak = Some((self.tokens, strength));
        }
        self.tokens += 1;
        self.entropy_sum += entropy;
        self.jsd_sum += jsd;
        self.previous = current;
        Verdict::Continue
    }

    fn summary(&self) -> MonitorSummary {
        let tokens = self.tokens;
        let mean = |sum: f64| (tokens > 0).then(|| sum / tokens as f64);
        let position = self.peak.map(|(t, _)| t as f64 / tokens as f64);
        MonitorSummary::Instability(InstabilitySummary {
            tokens,
            entropy_mean: mean(self.entropy_sum),
            jsd_mean: mean(self.jsd_sum),
            peak: self.peak.map(|(_, s)| s),
            peak_index: self.peak.map(|(t, _)| t),
            peak_position: position,
            peak_timing: position.map(|r| {
                if r < 1.0 / 3.0 {
                    PeakTiming::Early
                } else if r < 2.0 / 3.0 {
                    PeakTiming::Middle
                } else {
                    PeakTiming::Late
                }
            }),
        })
    }
}
