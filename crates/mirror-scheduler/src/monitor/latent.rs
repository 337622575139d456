//! Latent trajectory: how a layer's hidden states move over the generation.
//!
//! From "Tracing the Traces: Latent Temporal Signals for Efficient and Accurate Reasoning"
//! (arXiv 2510.10494). The hidden states of the generated tokens at one layer are averaged in
//! non-overlapping chunks of `C` tokens, giving `h̃^1 .. h̃^N`; with `u = h̃^N − h̃^1` (start to
//! end) and `v^n = h̃^n − h̃^(n−1)` (one step),
//!
//! ```text
//! Net Change        = ‖u‖ / (N − 1)
//! Cumulative Change = Σ_{n=2..N} ‖v^n‖
//! Aligned Change    = mean_{n=2..N} cos(v^n, u)
//! ```
//!
//! Our choices: `C = 16` by default (the paper's 500 is longer than our outputs); a last partial
//! chunk is kept when it has at least `C / 2` tokens (`2·len >= C`), else merged into the
//! previous chunk (or kept alone when it is the only one); the states are those of the row
//! that chose each token (the state at the position before it: the row whose logits are
//! verified, so no extra forward is needed), after the first `layer` layers (default the
//! middle, `num_layers / 2`); sums are in f64; a statistic that is undefined (`N < 2`, or a
//! zero vector in a cosine) is `None`.

use serde::{Deserialize, Serialize};

use super::{Monitor, MonitorSummary, TokenObservation, Verdict};

/// [`LatentTrajectory`]'s parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LatentTrajectoryConfig {
    /// Hidden states after the first `layer` layers (`None`: the middle, `num_layers / 2`).
    pub layer: Option<usize>,
    /// Tokens `C` per chunk (default 16).
    pub chunk: usize,
}

impl Default for LatentTrajectoryConfig {
    fn default() -> Self {
        Self {
            layer: None,
            chunk: 16,
        }
    }
}

impl LatentTrajectoryConfig {
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.chunk == 0 {
            return Err("latent_trajectory.chunk must be at least 1".into());
        }
        Ok(())
    }
}

/// [`LatentTrajectory`]'s summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LatentTrajectorySummary {
    /// Tokens whose hidden state was observed.
    pub tokens: usize,
    /// Chunks `N` (after merging the last partial one).
    pub chunks: usize,
    /// `‖u‖ / (N − 1)` (`None` when `N < 2`).
    pub net_change: Option<f64>,
    /// `Σ ‖v^n‖` (`None` when `N < 2`).
    pub cumulative_change: Option<f64>,
    /// `mean cos(v^n, u)` (`None` when `N < 2` or a vector is zero).
    pub aligned_change: Option<f64>,
}

/// The latent-trajectory monitor (see the module doc).
#[derive(Debug, Clone)]
pub struct LatentTrajectory {
    config: LatentTrajectoryConfig,
    /// Finished chunks' sums and token counts.
    chunks: Vec<(Vec<f64>, usize)>,
    /// The chunk being filled.
    current: (Vec<f64>, usize),
    tokens: usize,
}

impl LatentTrajectory {
    /// A monitor with `config`'s parameters.
    pub fn new(config: LatentTrajectoryConfig) -> Self {
        Self {
            config,
            chunks: Vec::new(),
            current: (Vec::new(), 0),
            tokens: 0,
        }
    }

    /// The chunk means `h̃^1 .. h̃^N`, the last partial chunk kept or merged.
    fn chunk_means(&self) -> Vec<Vec<f64>> {
        let mut chunks = self.chunks.clone();
        let (sum, len) = &self.current;
        if *len > 0 {
            match chunks.last_mut() {
                Some((last, count)) if 2 * len < self.config.chunk => {
                    for (a, b) in last.iter_mut().zip(sum) {
                        *a += b;
                    }
                    *count += len;
                }
                _ => chunks.push((sum.clone(), *len)),
            }
        }
        chunks
            .into_iter()
            .map(|(sum, count)| sum.into_iter().map(|s| s / count as f64).collect())
            .collect()
    }
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn minus(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

impl Monitor for LatentTrajectory {
    fn observe(&mut self, observation: &TokenObservation<'_>) -> Verdict {
        let Some(hidden) = observation.hidden else {
            return Verdict::Continue;
        };
        let (sum, len) = &mut self.current;
        if sum.is_empty() {
            sum.resize(hidden.len(), 0.0);
        }
        for (s, &h) in sum.iter_mut().zip(hidden) {
            *s += f64::from(h);
        }
        *len += 1;
        self.tokens += 1;
        if *len == self.config.chunk {
            self.chunks.push(std::mem::take(&mut self.current));
        }
        Verdict::Continue
    }

    fn summary(&self) -> MonitorSummary {
        let means = self.chunk_means();
        let n = means.len();
        let finite = |x: f64| Some(x).filter(|x| x.is_finite());
        let (mut net, mut cumulative, mut aligned) = (None, None, None);
        if let (true, Some(first), Some(last)) = (n >= 2, means.first(), means.last()) {
            let u = minus(last, first);
            let u_norm = norm(&u);
            let steps: Vec<Vec<f64>> = means.windows(2).map(|w| minus(&w[1], &w[0])).collect();
            net = finite(u_norm / (n - 1) as f64);
            cumulative = finite(steps.iter().map(|v| norm(v)).sum());
            let cosines: f64 = steps
                .iter()
                .map(|v| v.iter().zip(&u).map(|(a, b)| a * b).sum::<f64>() / (norm(v) * u_norm))
                .sum();
            aligned = finite(cosines / steps.len() as f64);
        }
        MonitorSummary::LatentTrajectory(LatentTrajectorySummary {
            tokens: self.tokens,
            chunks: n,
            net_change: net,
            cumulative_change: cumulative,
            aligned_change: aligned,
        })
    }
}
