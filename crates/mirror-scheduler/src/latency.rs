//! A latency model of the three strategies: the step-time law of Mirror-SD (Bhendawade et al.,
//! arXiv 2510.13161, section 4) extended with fallbacks and partial reuse, and a law for a draft
//! that shares the target's device (this crate's CPU runs), driven by measured forward costs or by
//! hardware profiles.
//!
//! Per window of gamma draft tokens that yields `E[A] + 1` tokens:
//!
//! - autoregressive: `T = t_T(1)` per token;
//! - vanilla SD: `T = J * t_D(ceil(eta)) + t_T(gamma + 1)`, with `J = ceil(gamma / eta)` draft
//!   steps, each feeding the previous step's `eta` tokens (`eta = 1` without lookahead);
//! - Mirror, separate devices: `T = t_T,pre + 2 rv + max(t_T,suf, T_tree) + exposed`, where
//!   `T_tree` is what the draft computes during the overlap and `exposed` the rollout steps still
//!   missing after the final rendezvous: all `J` on a fallback (frequency FF), the unfinished
//!   part of a partially drafted branch otherwise;
//! - Mirror, shared device: the draft's overlap work is not hidden but added, the two models
//!   taking turns on the same cores.

/// Cost of one forward pass as a function of the tokens it processes:
/// `t(k) = fixed + per_token * k` (a memory-bound floor plus compute).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForwardCost {
    /// Seconds per forward independent of tokens (weights streamed once, launch, syncs).
    pub fixed: f64,
    /// Seconds per processed token.
    pub per_token: f64,
}

impl ForwardCost {
    /// Seconds for a forward of `tokens` tokens.
    pub fn time(&self, tokens: usize) -> f64 {
        self.fixed + self.per_token * tokens as f64
    }

    /// Fits the linear law to two measurements `(tokens, seconds)`.
    pub fn fit(a: (usize, f64), b: (usize, f64)) -> Self {
        let per_token = ((b.1 - a.1) / (b.0 as f64 - a.0 as f64)).max(0.0);
        Self {
            fixed: (a.1 - per_token * a.0 as f64).max(0.0),
            per_token,
        }
    }
}

/// A device: memory bandwidth, arithmetic rate, and the latency of one collective or transfer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceProfile {
    /// Bytes per second of weight streaming (aggregate over the devices a model is sharded on).
    pub bandwidth: f64,
    /// Useful FLOP per second (aggregate).
    pub flops: f64,
    /// Seconds per synchronisation (all-reduce, or a hop between devices).
    pub sync_latency: f64,
    /// Synchronisations per layer (2 for Megatron tensor parallelism, 0 on one device).
    pub syncs_per_layer: f64,
}

/// The shape of a model, enough for a roofline estimate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelShape {
    /// Parameters.
    pub params: f64,
    /// Decoder layers.
    pub layers: usize,
    /// Bytes per parameter (2 for f16/bf16, 4 for f32).
    pub bytes_per_param: f64,
}

impl ModelShape {
    /// Roofline forward cost on `device`: weights streamed once per forward, 2 FLOP per parameter
    /// per token, plus the synchronisations of each layer.
    pub fn forward_cost(&self, device: &DeviceProfile) -> ForwardCost {
        ForwardCost {
            fixed: self.params * self.bytes_per_param / device.bandwidth
                + self.layers as f64 * device.syncs_per_layer * device.sync_latency,
            per_token: 2.0 * self.params / device.flops,
        }
    }
}

/// How the draft's tree work is scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeSchedule {
    /// Branches by likelihood until the target is done, `rows_per_pass` nodes per draft pass.
    Anytime {
        /// Tree nodes advanced per draft pass.
        rows_per_pass: usize,
    },
    /// All `kappa * (gamma + 1)` branches before the final rendezvous.
    FullGrid,
}

/// Everything the model needs to predict tokens per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scenario {
    /// Target forward cost.
    pub target: ForwardCost,
    /// Draft forward cost.
    pub draft: ForwardCost,
    /// Window length.
    pub gamma: usize,
    /// Early-exit candidates per row.
    pub kappa: usize,
    /// Tokens per draft step (speculative streaming; 1 for a plain draft).
    pub eta: f64,
    /// Mean accepted draft tokens per window, `E[A]`.
    pub mean_accepted: f64,
    /// Early-exit layer as a fraction of the target's depth.
    pub exit_fraction: f64,
    /// Latency of one rendezvous (message between the devices), seconds.
    pub rendezvous: f64,
    /// Probability that the corrected prefix is not in the tree when the needed branch had time
    /// to be drafted (with a full tree: the probability that the correction lies outside the
    /// early-exit top-kappa; `1 - Omega` is an estimate of it, not a bound).
    pub fallback_frequency: f64,
    /// Tree scheduling.
    pub schedule: TreeSchedule,
    /// The draft shares the target's device (its overlap work is added, not hidden).
    pub shared_device: bool,
}

/// Predicted generation speed, tokens per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// Target alone.
    pub autoregressive: f64,
    /// Vanilla speculative decoding.
    pub speculative: f64,
    /// Mirror speculative decoding.
    pub mirror: f64,
    /// Seconds per Mirror window, split: target, draft exposed, draft hidden.
    pub mirror_window: (f64, f64, f64),
}

impl Scenario {
    /// Draft steps for a window of gamma tokens.
    pub fn draft_steps(&self) -> usize {
        (self.gamma as f64 / self.eta.max(1.0)).ceil() as usize
    }

    /// Predicts tokens per second for the three strategies.
    pub fn predict(&self) -> Prediction {
        let window = self.gamma + 1;
        let tokens = self.mean_accepted.min(self.gamma as f64) + 1.0;
        let steps = self.draft_steps();
        // A step feeds what the previous one proposed: about eta rows (lookahead tokens ride along).
        let step_rows = self.eta.max(1.0).ceil() as usize;
        let step = self.draft.time(step_rows);
        let autoregressive = 1.0 / self.target.time(1);
        let speculative = tokens / (steps as f64 * step + self.target.time(window));

        let target = self.target.time(window);
        let prefix = self.exit_fraction * target;
        let suffix = target - prefix;
        let rows = self.kappa * window * step_rows;
        // Draft work during the overlap, and how far the needed branch gets (in draft steps).
        let (overlap_work, drafted_steps) = match self.schedule {
            TreeSchedule::FullGrid => {
                // One pass per step over every branch, plus the pass that feeds the window tail.
                let work = (steps + 1) as f64 * self.draft.time(rows);
                (work, steps)
            }
            TreeSchedule::Anytime { rows_per_pass } => {
                let pass = self.draft.time(rows_per_pass.max(1) * step_rows);
                // Passes that fit in the suffix; the first also feeds the window tail, and the
                // pass in flight when the target finishes completes (one more).
                let passes = (suffix / pass).floor() as usize + 1;
                let steps_done = passes.saturating_sub(1).min(steps);
                (passes as f64 * pass, steps_done)
            }
        };
        let remaining = (steps - drafted_steps) as f64 * step;
        let exposed_rollout = self.fallback_frequency * steps as f64 * step
            + (1.0 - self.fallback_frequency) * remaining;
        let (critical, exposed, hidden) = if self.shared_device {
            // Both models on the same cores: the overlap work queues behind the target's.
            (target + overlap_work, exposed_rollout, 0.0)
        } else {
            let wait = (overlap_work - suffix).max(0.0);
            let wait = if matches!(self.schedule, TreeSchedule::FullGrid) {
                wait
            } else {
                0.0
            };
            (
                prefix + suffix.max(overlap_work.min(suffix)),
                exposed_rollout + wait,
                overlap_work.min(suffix),
            )
        };
        let mirror_time = critical + 2.0 * self.rendezvous + exposed;
        Prediction {
            autoregressive,
            speculative,
            mirror: tokens / mirror_time,
            mirror_window: (critical, exposed, hidden),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario() -> Scenario {
        Scenario {
            target: ForwardCost {
                fixed: 0.040,
                per_token: 0.001,
            },
            draft: ForwardCost {
                fixed: 0.002,
                per_token: 0.0001,
            },
            gamma: 7,
            kappa: 8,
            eta: 1.0,
            mean_accepted: 4.0,
            exit_fraction: 0.5,
            rendezvous: 0.0005,
            fallback_frequency: 0.2,
            schedule: TreeSchedule::Anytime { rows_per_pass: 8 },
            shared_device: false,
        }
    }

    #[test]
    fn linear_fit_recovers_the_law() {
        let cost = ForwardCost {
            fixed: 0.4,
            per_token: 0.05,
        };
        let fit = ForwardCost::fit((1, cost.time(1)), (8, cost.time(8)));
        assert!((fit.fixed - 0.4).abs() < 1e-12 && (fit.per_token - 0.05).abs() < 1e-12);
    }

    #[test]
    fn speculative_law_by_hand() {
        let s = scenario();
        // 5 tokens / (7 * 2.1 ms + 48 ms).
        let expected = 5.0 / (7.0 * 0.0021 + 0.048);
        assert!((s.predict().speculative - expected).abs() < 1e-9);
        assert!((s.predict().autoregressive - 1.0 / 0.041).abs() < 1e-9);
    }

    #[test]
    fn more_acceptance_is_faster_and_never_past_gamma() {
        let mut s = scenario();
        let slow = s.predict();
        s.mean_accepted = 6.0;
        let fast = s.predict();
        assert!(fast.speculative > slow.speculative && fast.mirror > slow.mirror);
        s.mean_accepted = 100.0;
        let capped = s.predict();
        s.mean_accepted = 7.0;
        assert_eq!(capped, s.predict());
    }

    #[test]
    fn mirror_beats_sd_when_the_draft_hides_and_fallbacks_are_rare() {
        let mut s = scenario();
        s.fallback_frequency = 0.0;
        let p = s.predict();
        assert!(p.mirror > p.speculative, "{p:?}");
        // With no fallbacks and a fully hidden draft the window costs the target's pass plus
        // the two rendezvous.
        let window = s.target.time(8);
        let drafted = p.mirror_window.1;
        assert!(drafted < 1e-12, "{p:?}");
        assert!((p.mirror - 5.0 / (window + 2.0 * s.rendezvous)).abs() < 1e-9);
    }

    #[test]
    fn the_gap_closes_as_kappa_and_fallbacks_grow() {
        let mut s = scenario();
        s.schedule = TreeSchedule::FullGrid;
        s.fallback_frequency = 0.1;
        let mut last = f64::INFINITY;
        for kappa in [1, 2, 4, 8, 16, 32] {
            s.kappa = kappa;
            let p = s.predict();
            let advantage = p.mirror / p.speculative;
            assert!(advantage <= last + 1e-12, "kappa {kappa}: {advantage}");
            last = advantage;
        }
        // Always falling back, on a shared device: no better than vanilla SD.
        s.kappa = 8;
        s.fallback_frequency = 1.0;
        s.shared_device = true;
        let p = s.predict();
        assert!(p.mirror <= p.speculative, "{p:?}");
    }

    #[test]
    fn speculative_streaming_cuts_draft_steps() {
        let mut s = scenario();
        let plain = s.predict();
        s.eta = 2.0;
        assert_eq!(s.draft_steps(), 4);
        let streamed = s.predict();
        assert!(streamed.speculative > plain.speculative && streamed.mirror >= plain.mirror);
    }

    #[test]
    fn roofline_cost() {
        let device = DeviceProfile {
            bandwidth: 1e12,
            flops: 1e14,
            sync_latency: 1e-5,
            syncs_per_layer: 2.0,
        };
        let shape = ModelShape {
            params: 1e9,
            layers: 10,
            bytes_per_param: 2.0,
        };
        let cost = shape.forward_cost(&device);
        assert!((cost.fixed - (2e-3 + 2e-4)).abs() < 1e-12);
        assert!((cost.per_token - 2e-5).abs() < 1e-15);
    }
}
