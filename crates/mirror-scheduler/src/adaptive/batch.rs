//! Speculation inside a batch: how many draft tokens each sequence puts in the next step, for
//! the batch's goodput (committed tokens per second of step time; SmartSpec, arXiv 2406.14066).
//!
//! A step's time grows with its rows, and on a busy CPU every row costs: a draft token is worth
//! its row only while its chance of being committed, weighed against what the row adds to the
//! whole step, beats the step's current rate. So the price of a row depends on the rows already
//! in the step, through a least-squares line of measured step times by row count. Draft tokens
//! are added one at a time, most likely first (a sequence's `j`-th draft token is committed with
//! probability `a^j`, `a` its acceptance rate), while the expected committed tokens per second
//! grow; with a step time linear in the rows, that rate is unimodal in the tokens added, so the
//! first drop ends the search at the best allocation. Which tokens are proposed never depends
//! on the target's randomness, so every allocation stays lossless.

use std::time::Duration;

use super::{fit, CostLine, PRIOR_ROW_SLOPE};

/// Step time by row count, measured while the batch runs.
#[derive(Debug, Clone, Default)]
pub(crate) struct StepCost {
    line: CostLine,
}

impl StepCost {
    /// A step of `rows` rows took `time`.
    pub fn record(&mut self, rows: usize, time: Duration) {
        self.line.record(rows, time);
    }

    /// The estimated seconds of a step of `rows` rows; `None` before any step was timed. Through
    /// a single measured point, each row beyond it adds [`PRIOR_ROW_SLOPE`] of a one-row step.
    pub fn seconds(&self, rows: usize) -> Option<f64> {
        let points: Vec<(f64, f64)> = self.line.points().collect();
        fit(&points, rows, |k0, t0| {
            t0 * PRIOR_ROW_SLOPE / (1.0 + (k0 - 1.0).max(0.0) * PRIOR_ROW_SLOPE)
        })
    }
}

/// What one sequence could add to the step: up to `tokens` draft tokens, each committed with
/// probability `rate` once the ones before it were.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct DraftOffer {
    pub rate: f64,
    pub tokens: usize,
}

/// How many draft tokens of each offer go into a step that already has `rows` rows committing
/// `committed` tokens in expectation, with `seconds(rows)` the step's estimated time: the
/// allocation with the most expected committed tokens per second (see the module docs).
pub(crate) fn allocate(
    rows: usize,
    committed: f64,
    offers: &[DraftOffer],
    seconds: impl Fn(usize) -> f64,
) -> Vec<usize> {
    let mut taken = vec![0usize; offers.len()];
    let (mut rows, mut expected) = (rows, committed);
    loop {
        // The most likely next draft token among the offers.
        let best = offers
            .iter()
            .enumerate()
            .filter(|(i, offer)| taken[*i] < offer.tokens)
            .map(|(i, offer)| (i, offer.rate.powi(taken[i] as i32 + 1)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let Some((index, gain)) = best else {
            break;
        };
        let now = expected / seconds(rows);
        let with = (expected + gain) / seconds(rows + 1);
        // Also stops on NaN (a step estimate of zero).
        if with.partial_cmp(&now) != Some(std::cmp::Ordering::Greater) {
            break;
        }
        taken[index] += 1;
        rows += 1;
        expected += gain;
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected committed tokens per second of a step that adds `taken[i]` draft tokens of
    /// offer `i`: the obvious sum, `a + a^2 + ... + a^k` per offer.
    fn rate_of(
        rows: usize,
        committed: f64,
        offers: &[DraftOffer],
        taken: &[usize],
        seconds: &dyn Fn(usize) -> f64,
    ) -> f64 {
        let added: usize = taken.iter().sum();
        let expected: f64 = committed
            + offers
                .iter()
                .zip(taken)
                .map(|(o, &k)| (1..=k).map(|j| o.rate.powi(j as i32)).sum::<f64>())
                .sum::<f64>();
        expected / seconds(rows + added)
    }

    /// Every allocation of up to `offer.tokens` tokens per offer, by brute force: the best
    /// expected rate.
    fn best_by_enumeration(
        rows: usize,
        committed: f64,
        offers: &[DraftOffer],
        seconds: &dyn Fn(usize) -> f64,
    ) -> f64 {
        let mut best = f64::MIN;
        let mut counts = vec![0usize; offers.len()];
        loop {
            best = best.max(rate_of(rows, committed, offers, &counts, seconds));
            // Next combination, odometer style.
            let mut i = 0;
            loop {
                if i == offers.len() {
                    return best;
                }
                if counts[i] < offers[i].tokens {
                    counts[i] += 1;
                    break;
                }
                counts[i] = 0;
                i += 1;
            }
        }
    }

    #[test]
    fn the_greedy_allocation_is_the_best_one_for_linear_step_costs() {
        let rates = [0.95, 0.8, 0.6, 0.3, 0.05];
        let lines: [(f64, f64); 4] = [(0.0967, 0.027), (0.0365, 0.0047), (0.05, 0.05), (0.1, 0.0)];
        let mut checked = 0;
        for &(fixed, per_row) in &lines {
            let seconds = move |rows: usize| fixed + per_row * rows as f64;
            for batch in 1..=4usize {
                for first in 0..rates.len() {
                    let offers: Vec<DraftOffer> = (0..batch)
                        .map(|i| DraftOffer {
                            rate: rates[(first + i) % rates.len()],
                            tokens: 1 + (first + i) % 4,
                        })
                        .collect();
                    let taken = allocate(batch, batch as f64, &offers, seconds);
                    let got = rate_of(batch, batch as f64, &offers, &taken, &seconds);
                    let best = best_by_enumeration(batch, batch as f64, &offers, &seconds);
                    assert!(
                        (got - best).abs() <= 1e-9 * best,
                        "line {fixed}+{per_row}/row, offers {offers:?}: greedy {taken:?} gives {got}, best {best}"
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 80);
    }

    #[test]
    fn free_rows_take_every_token_and_costly_rows_only_likely_ones() {
        let offers = [
            DraftOffer {
                rate: 0.9,
                tokens: 4,
            },
            DraftOffer {
                rate: 0.2,
                tokens: 4,
            },
        ];
        // Rows that cost nothing: everything goes in.
        assert_eq!(allocate(2, 2.0, &offers, |_| 1.0), vec![4, 4]);
        // A row costs as much as the whole step: nothing is worth it.
        assert_eq!(allocate(2, 2.0, &offers, |rows| rows as f64), vec![0, 0]);
    }

    #[test]
    fn the_step_cost_line_follows_measured_steps() {
        let mut cost = StepCost::default();
        assert_eq!(cost.seconds(4), None);
        cost.record(1, Duration::from_millis(100));
        // One point: the prior slope.
        let two = cost.seconds(2).unwrap();
        assert!((two - 0.1 * (1.0 + PRIOR_ROW_SLOPE)).abs() < 1e-9, "{two}");
        cost.record(9, Duration::from_millis(300));
        let five = cost.seconds(5).unwrap();
        assert!((five - 0.2).abs() < 1e-9, "{five}");
    }
}
