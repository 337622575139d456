//! The settings of Mirror: where the target taps its early exit, how many candidates a row
//! sends, and how much of the hypothesis tree the draft computes. Data only.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::monitor::MonitorConfig;
use crate::strategy::settings::SpeculativeSettings;

/// Default of [`DraftSchedule::Anytime`]'s `branches_per_pass` (BENCHMARKS.md, "Branches per
/// pass": 2 against 4 on the Qwen2.5-Coder pair).
pub const DEFAULT_BRANCHES_PER_PASS: usize = 2;

/// Where the target taps its early exit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EarlyExit {
    /// After this many layers.
    Layer(usize),
    /// After this fraction of the layers (0.5 is the paper's N/2).
    Fraction(f64),
}

impl EarlyExit {
    /// The layer index for a model of `layers` layers.
    pub fn resolve(self, layers: usize) -> Result<usize> {
        let layer = match self {
            EarlyExit::Layer(l) => l,
            EarlyExit::Fraction(f) if (0.0..=1.0).contains(&f) => {
                (f * layers as f64).round() as usize
            }
            EarlyExit::Fraction(f) => {
                return Err(Error::InvalidConfig(format!(
                    "early-exit fraction {f} is not in [0, 1]"
                )))
            }
        };
        if layer == 0 || layer >= layers {
            return Err(Error::InvalidConfig(format!(
                "early-exit layer {layer} must be in 1..{layers} (the target has {layers} layers)"
            )));
        }
        Ok(layer)
    }
}

/// How much of the hypothesis tree the draft computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DraftSchedule {
    /// Branches in order of need, `branches_per_pass` per draft forward, until the target's final
    /// distributions are ready (default).
    ///
    /// Greedy output is identical in every run. Under sampling, every branch draws from its own
    /// seeded random sequence, so a window is the same whether it was drafted in the tree or
    /// rolled out later; the logits of a tree pass and of a linear pass can still differ in the
    /// last bits, so a draw on a boundary may differ between runs that drafted different amounts.
    /// The output distribution is exact either way. Use [`DraftSchedule::FullGrid`] for
    /// bit-reproducible sampled runs.
    Anytime {
        /// Branches advanced together in one tree-masked draft pass.
        branches_per_pass: usize,
    },
    /// Every branch of the kappa x (gamma + 1) grid, all at once, before the final rendezvous
    /// (the paper's mode).
    FullGrid,
}

impl Default for DraftSchedule {
    fn default() -> Self {
        DraftSchedule::Anytime {
            branches_per_pass: DEFAULT_BRANCHES_PER_PASS,
        }
    }
}

/// The settings of [`crate::Mirror`]: vanilla SD's, and Mirror's own. The builder, the server
/// and the examples' flags are all made from this struct and its `Default`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MirrorSettings {
    /// Window length, lookup, lookahead confidence and window policy, as for vanilla SD.
    pub speculative: SpeculativeSettings,
    /// Early-exit candidates per row, kappa (default 4; the paper uses 8).
    pub kappa: usize,
    /// Where the target taps its early exit (default N/2).
    pub early_exit: EarlyExit,
    /// Anytime (default) or full-grid drafting.
    pub schedule: DraftSchedule,
    /// Runs the draft on a thread pool of its own of this many threads (CPU), so that the two
    /// models do not compete for one pool; `None` keeps the draft's own pool.
    pub draft_threads: Option<usize>,
    /// Under a constraint, propose the tokens the grammar forces as the window, before the
    /// draft's (default on).
    pub forced_drafts: bool,
    /// In the batched engine, the early-exit candidates one step sends for all its Mirror
    /// sequences together: a sequence's kappa is `batch_candidates / batch`, within
    /// `1..=kappa` (default 64, the paper's schedule: kappa 8 at batch 8, 4 at 16, 2 at 32 and
    /// 1 at 64). See [`MirrorSettings::kappa_at`].
    pub batch_candidates: usize,
}

impl Default for MirrorSettings {
    fn default() -> Self {
        Self {
            speculative: SpeculativeSettings::default(),
            kappa: 4,
            early_exit: EarlyExit::Fraction(0.5),
            schedule: DraftSchedule::default(),
            draft_threads: None,
            forced_drafts: true,
            batch_candidates: 64,
        }
    }
}

impl MirrorSettings {
    /// `monitors` as Mirror runs them on a target of `num_layers` layers, checked: the latent
    /// trajectory reads the early-exit tap's states, so its layer defaults to the tap's, `l_e`,
    /// and any other is an `InvalidConfig`.
    pub fn monitors_for(
        &self,
        monitors: &MonitorConfig,
        num_layers: usize,
    ) -> Result<MonitorConfig> {
        let tap = self.early_exit.resolve(num_layers)?;
        let mut monitors = monitors.clone();
        if let Some(latent) = monitors.latent_trajectory.as_mut() {
            let layer = *latent.layer.get_or_insert(tap);
            if layer != tap {
                return Err(Error::InvalidConfig(format!(
                    "under Mirror the latent trajectory reads the early-exit tap's layer {tap}, \
                     not {layer}: leave latent_trajectory.layer unset or set it to {tap}"
                )));
            }
        }
        monitors.check(num_layers).map_err(Error::InvalidConfig)?;
        Ok(monitors)
    }

    /// Candidates per row for a sequence in a step of `batch` Mirror sequences: kappa lowered
    /// as the batch grows (`batch_candidates / batch`, within `1..=kappa`).
    pub fn kappa_at(&self, batch: usize) -> usize {
        (self.batch_candidates / batch.max(1)).clamp(1, self.kappa.max(1))
    }

    /// Checks every knob but the early exit (which needs the target's depth).
    pub(crate) fn check(&self) -> Result<()> {
        self.speculative.check()?;
        if self.kappa == 0 {
            return Err(Error::InvalidConfig("kappa must be at least 1".into()));
        }
        if self.batch_candidates == 0 {
            return Err(Error::InvalidConfig(
                "batch_candidates must be at least 1".into(),
            ));
        }
        if let DraftSchedule::Anytime {
            branches_per_pass: 0,
        } = self.schedule
        {
            return Err(Error::InvalidConfig(
                "branches_per_pass must be at least 1".into(),
            ));
        }
        Ok(())
    }
}
