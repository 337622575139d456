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

use serde::{Deserialize, Serialize};

use crate::window::Source;

pub(crate) mod batch;

/// How the length of each window is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
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

/// What a source can propose for the next window: at most `tokens` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Offer {
    pub source: Source,
    pub tokens: usize,
}

/// Weight of the newest measurement in a running average: recent enough to follow the
/// machine's load, smooth enough to ride out one slow pass.
const SMOOTHING: f64 = 0.25;

/// Before a source's steps are timed, a target pass is assumed to grow by this fraction of a
/// one-row pass per extra row (about what the quantized kernels measure here: BENCHMARKS.md,
/// "Kernels").
const PRIOR_ROW_SLOPE: f64 = 0.1;

/// Acceptance memory: each verified window weighs this much less than the next one, so the
/// rate follows the text (code, then prose) within a few dozen windows.
const ACCEPTANCE_DECAY: f64 = 0.9;

/// The acceptance rate before any window: one acceptance in two judged tokens, worth this
/// many judged tokens of evidence.
const ACCEPTANCE_PRIOR: (f64, f64) = (1.0, 2.0);

/// After this many plain steps in a row, one short window is tried anyway: acceptance rates
/// learn only from windows, and the text may have become predictable.
const PROBE_AFTER: usize = 16;

/// Length of such a probing window: one token, the cheapest question to ask.
const PROBE_TOKENS: usize = 1;

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

/// The probability that the target accepts a draft token, pooled over window positions (a
/// geometric model: every token stands with the same probability once the ones before it
/// did). Pooling learns from every judged token at once, where a rate per position would wait
/// for windows that reach it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TokenAcceptance {
    /// Decayed (accepted, judged) counts, the prior's excluded.
    accepted: f64,
    judged: f64,
}

impl TokenAcceptance {
    /// A verified window of `proposed` tokens of which the first `accepted` stood: the
    /// accepted ones and the first rejected one (if any) were judged.
    pub fn record(&mut self, proposed: usize, accepted: usize) {
        let judged = proposed.min(accepted + 1);
        self.accepted = self.accepted * ACCEPTANCE_DECAY + accepted as f64;
        self.judged = self.judged * ACCEPTANCE_DECAY + judged as f64;
    }

    /// Discounts the evidence by one window's decay without adding a window (a plain step
    /// passed).
    pub fn fade(&mut self) {
        self.accepted *= ACCEPTANCE_DECAY;
        self.judged *= ACCEPTANCE_DECAY;
    }

    pub fn rate(&self) -> f64 {
        (self.accepted + ACCEPTANCE_PRIOR.0) / (self.judged + ACCEPTANCE_PRIOR.1)
    }

    /// Decayed judged tokens so far: how much evidence the rate rests on.
    pub fn judged(&self) -> f64 {
        self.judged
    }

    /// A fresh estimate that starts from `other`'s rate as `weight` judged tokens of evidence
    /// (a new sequence starting from what earlier sequences measured).
    pub fn seeded_from(other: &TokenAcceptance, weight: f64) -> Self {
        Self {
            accepted: other.rate() * weight,
            judged: weight,
        }
    }

    /// `1 + a + a^2 + ... + a^k`: tokens a window of `k` commits in expectation, the
    /// target's own token included.
    pub fn expected_tokens(&self, k: usize) -> f64 {
        let rate = self.rate();
        let mut reach = 1.0;
        let mut total = 1.0;
        for _ in 0..k {
            reach *= rate;
            total += reach;
        }
        total
    }
}

/// Seconds of a step as a function of its window length, for one source: running averages
/// by length, through which a least-squares line is fitted.
#[derive(Debug, Clone, Default)]
pub(crate) struct CostLine {
    /// Running average per window length (index: length).
    by_length: Vec<Average>,
}

impl CostLine {
    pub fn record(&mut self, length: usize, time: Duration) {
        if self.by_length.len() <= length {
            self.by_length.resize(length + 1, Average::default());
        }
        self.by_length[length].record(time.as_secs_f64());
    }

    pub(crate) fn points(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        (self.by_length.iter().enumerate()).filter_map(|(k, a)| a.0.map(|t| (k as f64, t)))
    }
}

/// The estimated seconds at `length` from measured `(length, seconds)` points: a
/// least-squares line (never decreasing with length), or through a single point with
/// `prior_slope` (seconds per token, given that point). `None` without points.
fn fit(points: &[(f64, f64)], length: usize, prior_slope: impl Fn(f64, f64) -> f64) -> Option<f64> {
    let x = length as f64;
    match points {
        [] => None,
        [(k0, t0)] => Some(t0 + prior_slope(*k0, *t0) * (x - k0)),
        _ => {
            let n = points.len() as f64;
            let mean_k = points.iter().map(|p| p.0).sum::<f64>() / n;
            let mean_t = points.iter().map(|p| p.1).sum::<f64>() / n;
            let covariance: f64 = points
                .iter()
                .map(|(k, t)| (k - mean_k) * (t - mean_t))
                .sum();
            let variance: f64 = points.iter().map(|(k, _)| (k - mean_k).powi(2)).sum();
            let slope = (covariance / variance).max(0.0);
            Some((mean_t + slope * (x - mean_k)).max(f64::EPSILON))
        }
    }
}

/// Picks each window's source and length (see the module documentation).
///
/// Costs are whole steps: drafting, the target's pass and verification, timed together, so
/// that what a window costs beyond its tokens (launching the draft, moving logits, the
/// verifier) is counted too. Each source gets a line through its step times by window
/// length, anchored at length 0 by plain steps.
#[derive(Debug, Clone)]
pub(crate) struct WindowChooser {
    policy: WindowPolicy,
    /// Plain steps (no window).
    plain: Average,
    /// Per source, step time by window length.
    steps: [CostLine; 2],
    /// Before a source's steps are timed: what a token adds to a step, as a fraction of a
    /// plain step (its drafting, plus one more row in the target's pass).
    token_cost_prior: [f64; 2],
    /// Per source, the chance that a proposed token is accepted.
    acceptance: [TokenAcceptance; 2],
    /// Plain steps since the last window.
    plain_streak: usize,
}

impl WindowChooser {
    /// A chooser with a model draft whose token costs about `model_cost_prior` of a plain
    /// step until measured (its weight bytes over the target's are a fair guess on a CPU,
    /// where both are bound by memory bandwidth); lookup is taken to cost nothing.
    pub fn new(policy: WindowPolicy, model_cost_prior: f64) -> Self {
        Self {
            policy,
            plain: Average::default(),
            steps: [CostLine::default(), CostLine::default()],
            token_cost_prior: [model_cost_prior + PRIOR_ROW_SLOPE, PRIOR_ROW_SLOPE],
            acceptance: [TokenAcceptance::default(); 2],
            plain_streak: 0,
        }
    }

    /// The estimated seconds of a step with a window of `length` tokens from `source`.
    fn step_time(&self, source: Source, length: usize) -> Option<f64> {
        let own_points = self.steps[source.index()].points().next().is_some();
        let plain = match self.plain.0 {
            Some(plain) => Some(plain),
            // Neither plain steps nor this source's were timed: a plain step is what the
            // other source's line says at length 0.
            None if !own_points => self.line(source.other(), None, 0),
            None => None,
        };
        self.line(source, plain, length)
    }

    /// `source`'s line through its timed steps and a plain step's `plain` seconds at length 0,
    /// at `length`.
    fn line(&self, source: Source, plain: Option<f64>, length: usize) -> Option<f64> {
        let mut points: Vec<(f64, f64)> = self.steps[source.index()].points().collect();
        points.extend(plain.map(|t| (0.0, t)));
        let relative = self.token_cost_prior[source.index()];
        // Through one point (k0, t0): t0 is a plain step plus k0 tokens at the prior cost.
        fit(&points, length, |k0, t0| {
            t0 * relative / (1.0 + k0 * relative)
        })
    }

    /// The estimated seconds of a plain step.
    fn plain_time(&self) -> Option<f64> {
        self.plain.0.or_else(|| {
            [Source::Model, Source::Lookup]
                .into_iter()
                .filter_map(|s| self.step_time(s, 0))
                .min_by(f64::total_cmp)
        })
    }

    /// The source and length of the next window among `offers` (in order of preference),
    /// or `None` for a plain decoding step.
    pub fn choose(&mut self, offers: &[Offer]) -> Option<(Source, usize)> {
        let offers: Vec<Offer> = offers.iter().copied().filter(|o| o.tokens > 0).collect();
        let first = *offers.first()?;
        if self.policy == WindowPolicy::Fixed {
            return Some((first.source, first.tokens));
        }
        // Until a step has been timed there is nothing to compare: speculate as a fixed
        // window would, which times a step.
        let Some(plain_cost) = self.plain_time() else {
            return Some((first.source, first.tokens));
        };
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
        // Nothing is learned about acceptance during plain steps, and the text moves on: what
        // was learned fades towards the prior, so a source is tried again once its evidence
        // is old enough to be doubted.
        for source in &offers {
            self.acceptance[source.source.index()].fade();
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
        let expected = self.acceptance[source.index()].expected_tokens(k);
        Some(expected / self.step_time(source, k)?)
    }

    /// A step took `time`: a plain one (`source` `None`), or a window of `length` tokens.
    pub fn record_step(&mut self, source: Option<Source>, length: usize, time: Duration) {
        match source {
            Some(source) if length > 0 => self.steps[source.index()].record(length, time),
            _ => self.plain.record(time.as_secs_f64()),
        }
    }

    /// The target accepted `accepted` of `proposed` tokens from `source`.
    pub fn record_verdict(&mut self, source: Source, proposed: usize, accepted: usize) {
        self.acceptance[source.index()].record(proposed, accepted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(value: f64) -> Duration {
        Duration::from_secs_f64(value / 1e3)
    }

    /// An acceptance rate known exactly (the prior drowned in evidence).
    fn known(rate: f64) -> TokenAcceptance {
        TokenAcceptance {
            accepted: rate * 1e12,
            judged: 1e12,
        }
    }

    #[test]
    fn a_seeded_estimate_starts_at_the_pooled_rate_and_follows_its_own_windows() {
        // Seeded from a pooled rate of 0.8 with 4 judged tokens: (0.8 * 4 + 1) / (4 + 2).
        let seeded = TokenAcceptance::seeded_from(&known(0.8), 4.0);
        assert!((seeded.rate() - 4.2 / 6.0).abs() < 1e-12);
        assert_eq!(seeded.judged(), 4.0);
        // Twenty fully rejected windows of 4 outweigh the seed: far below 0.8.
        let mut learning = seeded;
        for _ in 0..20 {
            learning.record(4, 0);
        }
        assert!(learning.rate() < 0.2, "{}", learning.rate());
    }

    #[test]
    fn acceptance_pools_judged_tokens_and_forgets_old_windows() {
        let mut a = TokenAcceptance::default();
        assert_eq!(a.rate(), 0.5);
        // 3 proposed, 1 accepted: two tokens judged (the accepted one and the rejected one).
        a.record(3, 1);
        assert_eq!(a.rate(), 2.0 / 4.0);
        // A full window: every token judged and accepted; the old window weighs 0.9.
        a.record(2, 2);
        let want = (1.0 + 0.9 * 1.0 + 2.0) / (2.0 + 0.9 * 2.0 + 2.0);
        assert!((a.rate() - want).abs() < 1e-12);
        // Long runs of rejections pull the rate towards zero.
        for _ in 0..200 {
            a.record(1, 0);
        }
        assert!(a.rate() < 0.1, "{}", a.rate());
        assert_eq!(known(0.5).expected_tokens(0), 1.0);
        assert!((known(0.5).expected_tokens(3) - 1.875).abs() < 1e-9);
    }

    #[test]
    fn step_costs_fit_a_line_and_use_the_prior_through_one_point() {
        assert_eq!(fit(&[], 3, |_, _| 1.0), None);
        // One point: the prior slope through it.
        let one = fit(&[(2.0, 0.050)], 4, |_, _| 0.005).unwrap();
        assert!((one - 0.060).abs() < 1e-12, "{one}");
        // Exactly on the line t = 25 ms + 5 ms per token.
        let points = [(0.0, 0.025), (2.0, 0.035), (4.0, 0.045)];
        assert!((fit(&points, 8, |_, _| 1.0).unwrap() - 0.065).abs() < 1e-12);
        // A noisy point never makes longer windows look cheaper.
        let noisy = fit(&[(1.0, 0.050), (2.0, 0.040)], 4, |_, _| 1.0).unwrap();
        assert!(noisy >= 0.045 - 1e-12);
        // The chooser's prior: a plain step plus the prior cost per token, anchored at plain.
        let mut chooser = WindowChooser::new(WindowPolicy::Adaptive, 0.4);
        chooser.record_step(None, 0, ms(30.0));
        let prior = chooser.step_time(Source::Model, 2).unwrap();
        assert!((prior - 0.030 * (1.0 + 2.0 * 0.5)).abs() < 1e-9, "{prior}");
    }

    /// (source, seconds per drafted token, acceptance rate, tokens offered)
    type Case = (Source, f64, f64, usize);

    /// A brute-force reference: every (source, k), plain included, rated directly.
    fn best_by_enumeration(plain: f64, slope: f64, sources: &[Case]) -> Option<(Source, usize)> {
        let mut best = (None, 1.0 / plain);
        for &(source, draft, rate, max) in sources {
            for k in 1..=max {
                let expected: f64 = (0..=k).map(|i| rate.powi(i as i32)).sum();
                let rate = expected / (draft * k as f64 + plain + slope * k as f64);
                if rate > best.1 {
                    best = (Some((source, k)), rate);
                }
            }
        }
        best.0
    }

    /// A chooser that has timed plain steps and windows of 1 and 4 tokens from each source,
    /// on the lines `plain + (draft + slope) k`.
    fn chooser_with(plain: f64, slope: f64, sources: &[Case]) -> WindowChooser {
        let mut chooser = WindowChooser::new(WindowPolicy::Adaptive, 0.5);
        chooser.record_step(None, 0, Duration::from_secs_f64(plain));
        for &(source, draft, rate, _) in sources {
            for k in [1, 4] {
                let time = plain + (draft + slope) * k as f64;
                chooser.record_step(Some(source), k, Duration::from_secs_f64(time));
            }
            chooser.acceptance[source.index()] = known(rate);
        }
        chooser
    }

    #[test]
    fn the_choice_matches_an_enumeration_of_every_window() {
        let cases: [Vec<Case>; 5] = [
            // A cheap, accurate lookup beats an expensive model draft.
            vec![
                (Source::Lookup, 0.0, 0.8, 4),
                (Source::Model, 0.018, 0.7, 4),
            ],
            // An expensive draft with poor acceptance: plain decoding wins.
            vec![(Source::Model, 0.02, 0.3, 4)],
            // A good draft at moderate cost: a window of some length.
            vec![(Source::Model, 0.008, 0.7, 4)],
            // A very good, cheap draft: the whole window.
            vec![(Source::Model, 0.002, 0.95, 4)],
            // Lookup offers only two tokens: the model may still win at more.
            vec![
                (Source::Lookup, 0.0, 0.5, 2),
                (Source::Model, 0.002, 0.95, 4),
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
        let sources = [(Source::Model, 0.05, 0.1, 4)];
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
    fn old_evidence_fades_during_plain_steps_until_a_window_is_tried() {
        let (plain, slope, draft) = (0.035, 0.0035, 0.010);
        let mut chooser = chooser_with(plain, slope, &[(Source::Model, draft, 0.5, 4)]);
        chooser.acceptance[0] = TokenAcceptance::default();
        // One window rejected at its first token: 1 judged, 0 accepted.
        chooser.record_verdict(Source::Model, 4, 0);
        let offers = [Offer {
            source: Source::Model,
            tokens: 4,
        }];
        // Reference: after n plain steps the evidence weighs 0.9^n, over the prior (1, 2).
        let first_window = (0..PROBE_AFTER)
            .map(|n| {
                let rate = 1.0 / (2.0 + ACCEPTANCE_DECAY.powi(n as i32));
                best_by_enumeration(plain, slope, &[(Source::Model, draft, rate, 4)])
            })
            .position(|choice| choice.is_some())
            .expect("the prior's rate is worth a window");
        assert!(
            (1..PROBE_AFTER - 1).contains(&first_window),
            "{first_window}"
        );
        for _ in 0..first_window {
            assert_eq!(chooser.choose(&offers), None);
        }
        assert!(chooser.choose(&offers).is_some());
    }

    #[test]
    fn a_source_without_timed_steps_is_priced_from_the_other_sources_line() {
        // Model windows timed, never a plain step nor a lookup window: lookup's steps are
        // priced from the model's line at length 0, and an accurate lookup is chosen.
        let mut chooser = WindowChooser::new(WindowPolicy::Adaptive, 0.5);
        for k in [2, 4] {
            chooser.record_step(Some(Source::Model), k, ms(35.0 + 15.0 * k as f64));
        }
        chooser.acceptance[0] = known(0.6);
        chooser.acceptance[1] = known(0.9);
        let offers = [
            Offer {
                source: Source::Lookup,
                tokens: 4,
            },
            Offer {
                source: Source::Model,
                tokens: 4,
            },
        ];
        assert_eq!(chooser.choose(&offers), Some((Source::Lookup, 4)));
    }

    #[test]
    fn fixed_windows_take_the_first_offer_whole() {
        let mut chooser = WindowChooser::new(WindowPolicy::Fixed, 0.5);
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
    fn untimed_steps_speculate_and_unmeasured_drafts_use_the_prior() {
        let offers = [Offer {
            source: Source::Model,
            tokens: 3,
        }];
        // Nothing timed yet: a full window, which times a step.
        let mut cheap = WindowChooser::new(WindowPolicy::Adaptive, 0.01);
        assert_eq!(cheap.choose(&offers), Some((Source::Model, 3)));
        // A timed plain step and a draft priced by its prior only: a nearly free draft at the
        // prior acceptance (0.5) is worth a window, a draft as costly as the target is not.
        cheap.record_step(None, 0, ms(30.0));
        assert!(cheap.choose(&offers).is_some());
        let mut costly = WindowChooser::new(WindowPolicy::Adaptive, 1.0);
        costly.record_step(None, 0, ms(30.0));
        assert_eq!(costly.choose(&offers), None);
    }
}
