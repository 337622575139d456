//! Adaptive speculation windows: how many draft tokens to verify next.
//!
//! A window of `k` draft tokens commits `1 + a_1 + a_1 a_2 + ... + a_1...a_k` tokens in
//! expectation (`a_j`: the probability that the target accepts draft position `j` once it
//! accepted the ones before) and costs the draft's time for `k` tokens plus one target pass over
//! `k + 1` rows. On a CPU that pass grows with `k` (the quantized kernels are only partly
//! batch-free) and a model draft costs a large fraction of a target step, so a fixed window
//! often loses to plain decoding. The policy here measures both costs while it runs and picks,
//! before every window, the source and length with the most expected tokens per second;
//! `k = 0` is a plain decoding step. Which tokens are proposed never depends on the target's
//! randomness, so every choice stays lossless.

use std::time::Duration;

use crate::tree::AcceptanceEstimate;

/// How the length of each window is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WindowPolicy {
    /// Every window proposes gamma tokens (fewer near the end, or when lookup finds fewer).
    Fixed,
    /// Each window's length, from 0 (a plain decoding step) to gamma, maximises expected
    /// committed tokens per second, from costs measured while running and acceptance rates
    /// learned from recent windows (the default).
    ///
    /// Greedy output is unchanged. Under sampling the output distribution is exact, but the
    /// windows depend on timings, so a seed reproduces a sampled run only with
    /// [`WindowPolicy::Fixed`].
    #[default]
    Adaptive,
}

/// Where a window's tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The draft model.
    Model,
    /// Prompt lookup (point masses).
    Lookup,
}

impl Source {
    fn index(self) -> usize {
        match self {
            Source::Model => 0,
            Source::Lookup => 1,
        }
    }
}

/// What a source can propose for the next window: at most `tokens` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Offer {
    pub source: Source,
    pub tokens: usize,
}

/// Weight of the newest measurement in a running average: recent enough to follow the
/// machine's load, smooth enough to ride out one slow pass.
const SMOOTHING: f64 = 0.25;

/// Before two window lengths have been timed, a target pass is assumed to grow by this
/// fraction of a one-row pass per extra row (about what the quantized kernels measure here:
/// BENCHMARKS.md, "Kernels").
const PRIOR_ROW_SLOPE: f64 = 0.1;

/// Acceptance memory: each verified window weighs this much less than the next one, so the
/// rates follow the text (code, then prose) within a few dozen windows.
const ACCEPTANCE_DECAY: f64 = 0.95;

/// After this many plain steps in a row, one short window is tried anyway: acceptance rates
/// learn only from windows, and the text may have become predictable.
const PROBE_AFTER: usize = 16;

/// Length of such a probing window.
const PROBE_TOKENS: usize = 2;

/// An exponentially weighted running average.
#[derive(Debug, Clone, Copy, Default)]
struct Average(Option<f64>);

impl Average {
    fn record(&mut self, value: f64) {
        self.0 = Some(match self.0 {
            Some(old) => old + SMOOTHING * (value - old),
            None => value,
        });
    }
}

/// Seconds of a target pass as a function of the rows it verifies.
#[derive(Debug, Clone, Default)]
pub(crate) struct PassCosts {
    /// Running average per row count (index: rows).
    by_rows: Vec<Average>,
}

impl PassCosts {
    pub fn record(&mut self, rows: usize, time: Duration) {
        if self.by_rows.len() <= rows {
            self.by_rows.resize(rows + 1, Average::default());
        }
        self.by_rows[rows].record(time.as_secs_f64());
    }

    /// The estimated seconds of a pass over `rows` rows: a least-squares line through the
    /// averages measured so far (never decreasing with rows), or the nearest measurement with
    /// the prior slope while only one length has been timed. `None` before any pass.
    pub fn estimate(&self, rows: usize) -> Option<f64> {
        let points: Vec<(f64, f64)> = self
            .by_rows
            .iter()
            .enumerate()
            .filter_map(|(r, a)| a.0.map(|t| (r as f64, t)))
            .collect();
        let rows = rows as f64;
        match points.as_slice() {
            [] => None,
            [(r0, t0)] => Some(t0 + PRIOR_ROW_SLOPE * t0 / r0.max(1.0) * (rows - r0)),
            _ => {
                let n = points.len() as f64;
                let mean_r = points.iter().map(|p| p.0).sum::<f64>() / n;
                let mean_t = points.iter().map(|p| p.1).sum::<f64>() / n;
                let covariance: f64 = points
                    .iter()
                    .map(|(r, t)| (r - mean_r) * (t - mean_t))
                    .sum();
                let variance: f64 = points.iter().map(|(r, _)| (r - mean_r).powi(2)).sum();
                let slope = (covariance / variance).max(0.0);
                Some((mean_t + slope * (rows - mean_r)).max(f64::EPSILON))
            }
        }
    }
}

/// Picks each window's source and length (see the module documentation).
#[derive(Debug, Clone)]
pub(crate) struct WindowChooser {
    policy: WindowPolicy,
    passes: PassCosts,
    /// Seconds per proposed token, per source.
    draft_cost: [Average; 2],
    /// Per source, acceptance by window position.
    acceptance: [AcceptanceEstimate; 2],
    /// Plain steps since the last window.
    plain_streak: usize,
}

impl WindowChooser {
    /// A chooser for windows of up to `gamma` tokens.
    pub fn new(policy: WindowPolicy, gamma: usize) -> Self {
        let estimate = AcceptanceEstimate::with_decay(gamma, ACCEPTANCE_DECAY);
        Self {
            policy,
            passes: PassCosts::default(),
            draft_cost: [Average::default(); 2],
            acceptance: [estimate.clone(), estimate],
            plain_streak: 0,
        }
    }

    /// The source and length of the next window among `offers` (in order of preference),
    /// or `None` for a plain decoding step.
    pub fn choose(&mut self, offers: &[Offer]) -> Option<(Source, usize)> {
        let offers: Vec<Offer> = offers.iter().copied().filter(|o| o.tokens > 0).collect();
        let first = *offers.first()?;
        if self.policy == WindowPolicy::Fixed {
            return Some((first.source, first.tokens));
        }
        // Until a pass has been timed there is nothing to compare: speculate as a fixed
        // window would, which times the pass and the draft at once.
        let Some(plain_cost) = self.passes.estimate(1) else {
            return Some((first.source, first.tokens));
        };
        // A source never timed is tried once at full length: that measures it.
        let untried = offers
            .iter()
            .find(|o| self.draft_cost[o.source.index()].0.is_none());
        if let Some(offer) = untried {
            return Some((offer.source, offer.tokens));
        }
        let mut best = (None, 1.0 / plain_cost);
        for offer in &offers {
            for k in 1..=offer.tokens {
                if let Some(rate) = self.rate(offer.source, k) {
                    if rate > best.1 {
                        best = (Some((offer.source, k)), rate);
                    }
                }
            }
        }
        if best.0.is_some() {
            self.plain_streak = 0;
            return best.0;
        }
        self.plain_streak += 1;
        if self.plain_streak >= PROBE_AFTER {
            self.plain_streak = 0;
            return Some((first.source, first.tokens.min(PROBE_TOKENS)));
        }
        None
    }

    /// Expected committed tokens per second of a window of `k` tokens from `source`.
    fn rate(&self, source: Source, k: usize) -> Option<f64> {
        let expected = expected_tokens(&self.acceptance[source.index()], k);
        let draft = self.draft_cost[source.index()].0?;
        let pass = self.passes.estimate(k + 1)?;
        Some(expected / (draft * k as f64 + pass))
    }

    /// A target pass over `rows` rows took `time`.
    pub fn record_pass(&mut self, rows: usize, time: Duration) {
        self.passes.record(rows, time);
    }

    /// `source` proposed `tokens` tokens in `time`.
    pub fn record_draft(&mut self, source: Source, tokens: usize, time: Duration) {
        if tokens > 0 {
            self.draft_cost[source.index()].record(time.as_secs_f64() / tokens as f64);
        }
    }

    /// The target accepted `accepted` of `proposed` tokens from `source`.
    pub fn record_verdict(&mut self, source: Source, proposed: usize, accepted: usize) {
        self.acceptance[source.index()].record(proposed, accepted);
    }
}

/// `1 + a_1 + a_1 a_2 + ... + a_1...a_k`: tokens a window of `k` commits in expectation,
/// the target's own token included.
pub(crate) fn expected_tokens(acceptance: &AcceptanceEstimate, k: usize) -> f64 {
    let mut reach = 1.0;
    let mut total = 1.0;
    for j in 0..k {
        reach *= acceptance.rate(j);
        total += reach;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(value: f64) -> Duration {
        Duration::from_secs_f64(value / 1e3)
    }

    #[test]
    fn expected_tokens_is_the_sum_of_reach_probabilities() {
        let a = AcceptanceEstimate::from_rates(&[0.5, 0.5, 1.0]);
        assert_eq!(expected_tokens(&a, 0), 1.0);
        assert_eq!(expected_tokens(&a, 1), 1.5);
        assert_eq!(expected_tokens(&a, 3), 1.0 + 0.5 + 0.25 + 0.25);
    }

    #[test]
    fn pass_costs_fit_a_line_and_use_the_prior_slope_from_one_point() {
        let mut costs = PassCosts::default();
        assert_eq!(costs.estimate(3), None);
        costs.record(1, ms(30.0));
        let prior = costs.estimate(3).unwrap();
        assert!((prior - 0.030 * 1.2).abs() < 1e-9, "{prior}");
        costs.record(3, ms(40.0));
        costs.record(5, ms(50.0));
        // Exactly on the line t = 25 ms + 5 ms per row.
        assert!((costs.estimate(9).unwrap() - 0.070).abs() < 1e-9);
        // A noisy point never makes longer windows look cheaper.
        let mut noisy = PassCosts::default();
        noisy.record(1, ms(50.0));
        noisy.record(2, ms(40.0));
        assert!(noisy.estimate(4).unwrap() >= 0.045 - 1e-9);
    }

    /// A brute-force reference: every (source, k), plain included, rated directly.
    fn best_by_enumeration(
        plain: f64,
        slope: f64,
        sources: &[(Source, f64, Vec<f64>, usize)],
    ) -> Option<(Source, usize)> {
        let mut best = (None, 1.0 / plain);
        for (source, draft, rates, max) in sources {
            for k in 1..=*max {
                let mut reach = 1.0;
                let mut expected = 1.0;
                for rate in rates.iter().take(k) {
                    reach *= rate;
                    expected += reach;
                }
                let rate = expected / (draft * k as f64 + plain + slope * k as f64);
                if rate > best.1 {
                    best = (Some((*source, k)), rate);
                }
            }
        }
        best.0
    }

    fn chooser_with(
        plain: f64,
        slope: f64,
        sources: &[(Source, f64, Vec<f64>, usize)],
    ) -> WindowChooser {
        let mut chooser = WindowChooser::new(WindowPolicy::Adaptive, 8);
        for rows in 1..=9 {
            chooser.record_pass(
                rows,
                Duration::from_secs_f64(plain + slope * (rows - 1) as f64),
            );
        }
        for (source, draft, rates, _) in sources {
            chooser.record_draft(*source, 1, Duration::from_secs_f64(*draft));
            chooser.acceptance[source.index()] = AcceptanceEstimate::from_rates(rates);
        }
        chooser
    }

    #[test]
    fn the_choice_matches_an_enumeration_of_every_window() {
        let cases = [
            // A cheap, accurate lookup beats an expensive model draft.
            vec![
                (Source::Lookup, 0.0, vec![0.9, 0.8, 0.7, 0.6], 4),
                (Source::Model, 0.018, vec![0.8, 0.7, 0.6, 0.5], 4),
            ],
            // An expensive draft with poor acceptance: plain decoding wins.
            vec![(Source::Model, 0.02, vec![0.3, 0.2, 0.1, 0.1], 4)],
            // A good draft at moderate cost: a short window.
            vec![(Source::Model, 0.008, vec![0.8, 0.5, 0.3, 0.2], 4)],
            // Lookup offers only two tokens: the model may still win at more.
            vec![
                (Source::Lookup, 0.0, vec![0.5, 0.5], 2),
                (Source::Model, 0.002, vec![0.95, 0.95, 0.95, 0.95], 4),
            ],
        ];
        for sources in cases {
            let (plain, slope) = (0.035, 0.0035);
            let mut chooser = chooser_with(plain, slope, &sources);
            let offers: Vec<Offer> = sources
                .iter()
                .map(|&(source, _, _, tokens)| Offer { source, tokens })
                .collect();
            assert_eq!(
                chooser.choose(&offers),
                best_by_enumeration(plain, slope, &sources),
                "{sources:?}"
            );
        }
    }

    #[test]
    fn plain_steps_are_broken_by_a_short_probe() {
        let sources = [(Source::Model, 0.05, vec![0.1; 4], 4)];
        let mut chooser = chooser_with(0.035, 0.0035, &sources);
        let offers = [Offer {
            source: Source::Model,
            tokens: 4,
        }];
        for _ in 0..PROBE_AFTER - 1 {
            assert_eq!(chooser.choose(&offers), None);
        }
        assert_eq!(chooser.choose(&offers), Some((Source::Model, PROBE_TOKENS)));
        assert_eq!(chooser.choose(&offers), None);
    }

    #[test]
    fn fixed_windows_take_the_first_offer_whole() {
        let mut chooser = WindowChooser::new(WindowPolicy::Fixed, 4);
        let offers = [
            Offer {
                source: Source::Lookup,
                tokens: 0,
            },
            Offer {
                source: Source::Model,
                tokens: 4,
            },
        ];
        assert_eq!(chooser.choose(&offers), Some((Source::Model, 4)));
        assert_eq!(chooser.choose(&[]), None);
    }

    #[test]
    fn untried_sources_and_untimed_passes_speculate() {
        let mut chooser = WindowChooser::new(WindowPolicy::Adaptive, 4);
        let offers = [Offer {
            source: Source::Model,
            tokens: 3,
        }];
        assert_eq!(chooser.choose(&offers), Some((Source::Model, 3)));
        chooser.record_pass(1, ms(30.0));
        // Timed target, untried draft: tried at full length.
        assert_eq!(chooser.choose(&offers), Some((Source::Model, 3)));
    }
}
