//! Generation monitors: training-free signals of a generation going wrong, read from the
//! target's own distribution at each committed token (and, for one of them, a layer's hidden
//! state). Data and pure functions over `&[f32]` only: no tensors, no model.
//!
//! Three monitors ship, each documented with its paper, formula and our choices:
//! [`Instability`] (JSD between consecutive top-k distributions plus entropy),
//! [`PathDeviation`] (a windowed entropy ratio at boundary tokens, the one monitor that can
//! stop a generation) and [`LatentTrajectory`] (how a layer's chunk-averaged hidden states move).
//!
//! A sequence's monitors are a [`MonitorSet`], built from a [`MonitorConfig`]; the batched
//! engine feeds it every committed token's raw logits row ([`MonitorSet::observe_logits`]).
//! Early stop is off by default: stopping changes the output, so it is not lossless.

mod instability;
mod latent;
mod path_deviation;

use serde::{Deserialize, Serialize};

pub use instability::{Instability, InstabilityConfig, InstabilitySummary, PeakTiming};
pub use latent::{LatentTrajectory, LatentTrajectoryConfig, LatentTrajectorySummary};
pub use path_deviation::{
    BoundaryTokens, PathDeviation, PathDeviationConfig, PathDeviationSummary, BOUNDARY_CHARS,
};

/// What a monitor sees of one committed token.
#[derive(Debug, Clone, Copy)]
pub struct TokenObservation<'a> {
    /// The committed token.
    pub token: u32,
    /// The target's raw softmax distribution at the row that chose it (before penalties,
    /// constraint and the temperature/top-k/top-p warp), summing to 1.
    pub probs: &'a [f32],
    /// The hidden state at the monitored layer, at that same row, when one was captured.
    pub hidden: Option<&'a [f32]>,
    /// The Shannon entropy of `probs` in nats (computed with the softmax, see
    /// [`softmax_into`]; [`TokenObservation::new`] computes it from `probs`).
    pub entropy: f64,
}

impl<'a> TokenObservation<'a> {
    /// An observation of `token` chosen from `probs`, its entropy computed from them.
    pub fn new(token: u32, probs: &'a [f32], hidden: Option<&'a [f32]>) -> Self {
        Self {
            token,
            probs,
            hidden,
            entropy: entropy_nats(probs),
        }
    }
}

/// Which monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MonitorKind {
    /// [`Instability`].
    Instability,
    /// [`PathDeviation`].
    PathDeviation,
    /// [`LatentTrajectory`].
    LatentTrajectory,
}

impl MonitorKind {
    /// Every monitor, in summary order.
    pub const ALL: [MonitorKind; 3] = [
        MonitorKind::Instability,
        MonitorKind::PathDeviation,
        MonitorKind::LatentTrajectory,
    ];

    /// Its name in configs and the server (`"instability"`, `"path_deviation"`,
    /// `"latent_trajectory"`).
    pub fn name(self) -> &'static str {
        match self {
            MonitorKind::Instability => "instability",
            MonitorKind::PathDeviation => "path_deviation",
            MonitorKind::LatentTrajectory => "latent_trajectory",
        }
    }

    /// The monitor named `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// A monitor's reading when it asks to stop: at which output token (0-based) and its value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MonitorReading {
    /// The monitor that read it.
    pub monitor: MonitorKind,
    /// Index of the output token at which it read it (that token is kept).
    pub token_index: usize,
    /// The value that crossed its threshold.
    pub value: f64,
    /// The threshold.
    pub threshold: f64,
}

/// What a monitor says after a token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Keep generating.
    Continue,
    /// The monitor's stop rule fired (the engine stops only under
    /// [`MonitorConfig::early_stop`]).
    Stop(MonitorReading),
}

/// One monitor: observes committed tokens in order, and summarizes them.
pub trait Monitor: Send {
    /// Takes the next committed token.
    fn observe(&mut self, observation: &TokenObservation<'_>) -> Verdict;
    /// What it read over the tokens so far.
    fn summary(&self) -> MonitorSummary;
}

/// One monitor's summary of a generation.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "monitor", rename_all = "snake_case")]
#[non_exhaustive]
pub enum MonitorSummary {
    /// [`Instability`]'s.
    Instability(InstabilitySummary),
    /// [`PathDeviation`]'s.
    PathDeviation(PathDeviationSummary),
    /// [`LatentTrajectory`]'s.
    LatentTrajectory(LatentTrajectorySummary),
}

/// Which monitors a generation runs, their parameters, and whether one may stop it.
/// `Default`: all three with their default parameters, early stop off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MonitorConfig {
    /// [`Instability`] (`None`: not run).
    pub instability: Option<InstabilityConfig>,
    /// [`PathDeviation`] (`None`: not run).
    pub path_deviation: Option<PathDeviationConfig>,
    /// [`LatentTrajectory`] (`None`: not run).
    pub latent_trajectory: Option<LatentTrajectoryConfig>,
    /// End the generation when a monitor's stop rule fires ([`PathDeviation`]'s), with
    /// `FinishReason::Monitor`. Off by default: the output is then cut short, not the target's.
    pub early_stop: bool,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            instability: Some(InstabilityConfig::default()),
            path_deviation: Some(PathDeviationConfig::default()),
            latent_trajectory: Some(LatentTrajectoryConfig::default()),
            early_stop: false,
        }
    }
}

impl MonitorConfig {
    /// Exactly `kinds`, each with its default parameters; early stop off.
    pub fn only(kinds: &[MonitorKind]) -> Self {
        let has = |k: MonitorKind| kinds.contains(&k);
        Self {
            instability: has(MonitorKind::Instability).then(InstabilityConfig::default),
            path_deviation: has(MonitorKind::PathDeviation).then(PathDeviationConfig::default),
            latent_trajectory: has(MonitorKind::LatentTrajectory)
                .then(LatentTrajectoryConfig::default),
            early_stop: false,
        }
    }

    /// The layer whose output hidden states [`LatentTrajectory`] reads, for a target of
    /// `num_layers` layers (`None` when it does not run): the states after the first `layer`
    /// layers, as the early-exit tap; by default the middle, `num_layers / 2`.
    pub fn hidden_layer(&self, num_layers: usize) -> Option<usize> {
        self.latent_trajectory
            .as_ref()
            .map(|c| c.layer.unwrap_or(num_layers / 2))
    }

    /// A message saying what is wrong with the parameters, if anything (`num_layers`: the
    /// target's).
    pub fn check(&self, num_layers: usize) -> Result<(), String> {
        if let Some(c) = &self.instability {
            c.check()?;
        }
        if let Some(c) = &self.path_deviation {
            c.check()?;
        }
        if let Some(c) = &self.latent_trajectory {
            c.check()?;
        }
        match self.hidden_layer(num_layers) {
            Some(layer) if layer == 0 || layer > num_layers => Err(format!(
                "latent_trajectory.layer must be within 1..={num_layers}, got {layer}"
            )),
            _ => Ok(()),
        }
    }
}

/// Every monitor taken together, whether they stopped the generation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MonitorReport {
    /// One per monitor run, in [`MonitorKind::ALL`]'s order.
    pub summaries: Vec<MonitorSummary>,
    /// The reading that ended the generation, under early stop (else `None`).
    pub stopped_by: Option<MonitorReading>,
}

/// One sequence's monitors, with the buffer its softmax is computed into.
pub struct MonitorSet {
    monitors: Vec<Box<dyn Monitor>>,
    hidden_layer: Option<usize>,
    early_stop: bool,
    probs: Vec<f32>,
    stopped_by: Option<MonitorReading>,
}

impl MonitorSet {
    /// The monitors of `config` for a target of `num_layers` layers; `boundaries` are
    /// [`PathDeviation`]'s boundary tokens (`None`: every token is one, as without a tokenizer).
    pub fn new(
        config: &MonitorConfig,
        boundaries: Option<BoundaryTokens>,
        num_layers: usize,
    ) -> Self {
        let mut monitors: Vec<Box<dyn Monitor>> = Vec::new();
        if let Some(c) = &config.instability {
            monitors.push(Box::new(Instability::new(c.clone())));
        }
        if let Some(c) = &config.path_deviation {
            monitors.push(Box::new(PathDeviation::new(c.clone(), boundaries)));
        }
        if let Some(c) = &config.latent_trajectory {
            monitors.push(Box::new(LatentTrajectory::new(c.clone())));
        }
        Self {
            monitors,
            hidden_layer: config.hidden_layer(num_layers),
            early_stop: config.early_stop,
            probs: Vec::new(),
            stopped_by: None,
        }
    }

    /// Feeds every monitor the committed `token`, chosen at a row of raw `logits`, with that
    /// row's `hidden` state. Returns the reading that stops the generation, under early stop,
    /// the first time a monitor's rule fires.
    pub fn observe_logits(
        &mut self,
        token: u32,
        logits: &[f32],
        hidden: Option<&[f32]>,
    ) -> Option<MonitorReading> {
        let entropy = softmax_into(logits, &mut self.probs);
        let observation = TokenObservation {
            token,
            probs: &self.probs,
            hidden,
            entropy,
        };
        let mut stop = None;
        for monitor in &mut self.monitors {
            if let Verdict::Stop(reading) = monitor.observe(&observation) {
                stop = stop.or(Some(reading));
            }
        }
        match stop {
            Some(reading) if self.early_stop && self.stopped_by.is_none() => {
                self.stopped_by = Some(reading);
                Some(reading)
            }
            _ => None,
        }
    }

    /// Feeds the monitors the first `taken` tokens of `committed` (those the output takes),
    /// token `j` chosen at raw `rows[j]` with hidden state `hidden[j]` (if captured). Under
    /// early stop a firing rule cuts `committed` after its token and returns true.
    pub fn observe_committed(
        &mut self,
        committed: &mut Vec<u32>,
        taken: usize,
        rows: &[Vec<f32>],
        hidden: &[Vec<f32>],
    ) -> bool {
        let taken = taken.min(committed.len());
        for (j, (&token, row)) in committed[..taken].iter().zip(rows).enumerate() {
            let state = hidden.get(j).map(Vec::as_slice);
            if self.observe_logits(token, row, state).is_some() {
                committed.truncate(j + 1);
                return true;
            }
        }
        false
    }

    /// The layer whose output hidden states the monitors read (see
    /// [`MonitorConfig::hidden_layer`]), if any.
    pub fn hidden_layer(&self) -> Option<usize> {
        self.hidden_layer
    }

    /// Every monitor's summary, and the reading that stopped the generation when `stopped` (a
    /// rule that fired on the token that ended the output anyway did not stop it).
    pub fn report(&self, stopped: bool) -> MonitorReport {
        MonitorReport {
            summaries: self.monitors.iter().map(|m| m.summary()).collect(),
            stopped_by: self.stopped_by.filter(|_| stopped),
        }
    }
}

impl std::fmt::Debug for MonitorSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MonitorSet")
            .field("monitors", &self.monitors.len())
            .field("early_stop", &self.early_stop)
            .finish()
    }
}

/// `probs` = softmax(`logits`), returning the entropy in nats: mirror-core's
/// [`softmax_entropy_into`](mirror_core::sampling::softmax_entropy_into), one vectorized pass
/// of exponentials (to about 4e-6 relative) and no logarithm per token.
pub use mirror_core::sampling::softmax_entropy_into as softmax_into;

/// The `k` largest of `values` with their indices, largest first (the lower index first on
/// ties): one pass keeping a sorted list of at most `k`. Once the list is full, a chunk of 64
/// values none of which beats its weakest is passed over in one vectorized comparison, which is
/// most of a vocabulary.
pub fn largest(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    const CHUNK: usize = 64;
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return best;
    }
    let offer = |best: &mut Vec<(u32, f32)>, t: usize, v: f32| {
        if best.len() == k && best.last().is_none_or(|&(_, b)| v <= b) {
            return;
        }
        let at = best.partition_point(|&(_, b)| b >= v);
        best.insert(at, (t as u32, v));
        best.truncate(k);
    };
    let chunks = values.chunks_exact(CHUNK);
    let tail_start = values.len() - chunks.remainder().len();
    for (c, chunk) in chunks.enumerate() {
        if let Some(&(_, weakest)) = best.get(k - 1) {
            if !chunk.iter().fold(false, |any, &v| any | (v > weakest)) {
                continue;
            }
        }
        for (i, &v) in chunk.iter().enumerate() {
            offer(&mut best, c * CHUNK + i, v);
        }
    }
    for (i, &v) in values[tail_start..].iter().enumerate() {
        offer(&mut best, tail_start + i, v);
    }
    best
}

/// Shannon entropy of `probs` in nats, accumulated in f64 (zero terms contribute nothing).
pub fn entropy_nats(probs: &[f32]) -> f64 {
    probs
        .iter()
        .filter(|&&p| p > 0.0)
        .map(|&p| {
            let p = f64::from(p);
            -p * p.ln()
        })
        .sum()
}

#[cfg(test)]
mod tests;
