//! Speculation inside a batch: how many draft tokens each sequence puts in the next step, for
//! the batch's goodput (committed tokens per second of step time; SmartSpec, arXiv 2406.14066).
//!
//! A step's time grows with its rows, and on a busy CPU every row costs: a draft token is worth
//! its row only while its chance of being committed, weighed against what the row adds to the
//! whole step, beats the step's current rate. So the price of a row depends on the rows already
//! in the step, through a least-squares line of the measured step times at the row counts
//! nearest the one priced. Draft tokens are added one at a time, most likely first (a
//! sequence's `j`-th draft token is committed with probability `a^j`, `a` its acceptance rate),
//! while the expected committed tokens per second grow; with a step time linear in the rows,
//! that rate is unimodal in the tokens added, so the first drop ends the search at the best
//! allocation. Which tokens are proposed never depends on the target's randomness, so every
//! allocation stays lossless.
//!
//! Draft-model tokens cost more than their target rows: the draft runs one forward per window
//! position for every sequence still drafting there. That cost is paid before the target's
//! step, so it is priced before drafting, by [`plan_draft_depth`]: every drafting sequence
//! drafts up to a common depth `D`, the one with the most expected committed tokens per second of
//! target step plus draft forwards. A full batch then drafts nothing, where drafting costs more
//! than its accepted tokens save.

use std::time::Duration;

use super::{fit, CostLine, PRIOR_ROW_SLOPE};

/// Measured row counts a step-time estimate fits its line through (see [`StepCost::seconds`]).
const LOCAL_POINTS: usize = 4;

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

    /// The estimated seconds of a step of `rows` rows; `None` before any step was timed: a
    /// least-squares line through the [`LOCAL_POINTS`] measured row counts nearest `rows`.
    /// Through a single measured point, each row beyond it adds [`PRIOR_ROW_SLOPE`] of a
    /// one-row step.
    ///
    /// Local, because step time is not one line over every row count the batch sees: a
    /// forward's fixed cost (reading the weights) dominates a few decode rows, while prefill
    /// chunks of a hundred rows pay per row. One line through both priced a 2-row draft forward
    /// at 1.8x its measured time (AVX-512 machine), and batched SD stopped drafting.
    pub fn seconds(&self, rows: usize) -> Option<f64> {
        let mut points: Vec<(f64, f64)> = self.line.points().collect();
        let x = rows as f64;
        // Nearest first; on ties the smaller row count (the sort is stable, points ascend).
        points.sort_by(|a, b| (a.0 - x).abs().total_cmp(&(b.0 - x).abs()));
        points.truncate(LOCAL_POINTS);
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

/// A sequence that may draft with the draft model: its acceptance rate, the most tokens it may
/// draft, and the rows its first draft forward feeds (the committed tokens its draft cache
/// lacks, at least one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct DraftPlanOffer {
    pub rate: f64,
    pub tokens: usize,
    pub catch_up: usize,
}

/// The common draft depth `D` for a step with `rows` target rows committing `committed` tokens
/// before any draft: each offer drafts `min(D, tokens)`, at a price of one target row per token
/// (`target_seconds` by rows) and one draft forward per depth over the sequences drafting there
/// (`draft_seconds` by rows; the first forward feeds every drafting sequence's catch-up). The
/// depth with the most expected committed tokens per second, the smallest on ties; 0 drafts
/// nothing. Tried exhaustively: the fixed cost of a draft forward makes the rate not unimodal.
pub(crate) fn plan_draft_depth(
    rows: usize,
    committed: f64,
    offers: &[DraftPlanOffer],
    target_seconds: impl Fn(usize) -> f64,
    draft_seconds: impl Fn(usize) -> f64,
) -> usize {
    let deepest = offers.iter().map(|o| o.tokens).max().unwrap_or(0);
    let rate_at = |depth: usize| {
        let (mut expected, mut drafted, mut seconds) = (committed, 0usize, 0.0);
        for d in 1..=depth {
            let drafting: Vec<&DraftPlanOffer> = offers.iter().filter(|o| o.tokens >= d).collect();
            let draft_rows = match d {
                1 => drafting.iter().map(|o| o.catch_up.max(1)).sum(),
                _ => drafting.len(),
            };
            seconds += draft_seconds(draft_rows);
            drafted += drafting.len();
            expected += drafting.iter().map(|o| o.rate.powi(d as i32)).sum::<f64>();
        }
        expected / (seconds + target_seconds(rows + drafted))
    };
    let mut best = (0, rate_at(0));
    for depth in 1..=deepest {
        let rate = rate_at(depth);
        if rate > best.1 {
            best = (depth, rate);
        }
    }
    best.0
}

/// Whether any acceptance could make drafting pay this step: [`plan_draft_depth`] with every
/// offer's rate raised to at least `optimistic_rate` drafts something. Where it does not (a
/// full batch on a CPU whose rows are dear), a sequence measuring its acceptance by drafting
/// learns nothing the planner could use, and its exploring drafts are pure cost.
pub(crate) fn drafting_could_pay(
    rows: usize,
    committed: f64,
    offers: &[DraftPlanOffer],
    optimistic_rate: f64,
    target_seconds: impl Fn(usize) -> f64,
    draft_seconds: impl Fn(usize) -> f64,
) -> bool {
    let optimistic: Vec<DraftPlanOffer> = offers
        .iter()
        .map(|o| DraftPlanOffer {
            rate: o.rate.max(optimistic_rate),
            ..*o
        })
        .collect();
    plan_draft_depth(rows, committed, &optimistic, target_seconds, draft_seconds) > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_draft_depth_is_the_best_common_depth_and_a_full_batch_drafts_nothing() {
        let offer = |rate, tokens| DraftPlanOffer {
            rate,
            tokens,
            catch_up: 2,
        };
        // Free draft forwards and target rows: draft everything.
        let free = plan_draft_depth(2, 2.0, &[offer(0.5, 4), offer(0.5, 3)], |_| 1.0, |_| 0.0);
        assert_eq!(free, 4);
        // The target's rows cost nothing but the draft forward costs a whole step: nothing.
        let costly = plan_draft_depth(2, 2.0, &[offer(0.9, 4)], |_| 1.0, |_| 1.0);
        assert_eq!(costly, 0);
        // Against the obvious computation on lines like the 2-core machine's (target 56 ms +
        // 10 ms a row, draft 26 ms + 4 ms a row): one sequence drafts, eight do not.
        let target = |r: usize| 0.046 + 0.010 * r as f64;
        let draft = |r: usize| 0.022 + 0.004 * r as f64;
        for (batch, rate) in [(1usize, 0.8), (8, 0.8), (4, 0.6), (2, 0.95)] {
            let offers = vec![offer(rate, 4); batch];
            let got = plan_draft_depth(batch, batch as f64, &offers, target, draft);
            let by_hand = |d: usize| {
                let expected =
                    batch as f64 * (1.0 + (1..=d).map(|j| rate.powi(j as i32)).sum::<f64>());
                let drafts: f64 = (1..=d)
                    .map(|j| draft(if j == 1 { 2 * batch } else { batch }))
                    .sum();
                expected / (drafts + target(batch * (1 + d)))
            };
            let want = (0..=4).fold(0, |b, d| if by_hand(d) > by_hand(b) { d } else { b });
            assert_eq!(got, want, "batch {batch}, rate {rate}");
        }
        assert!(plan_draft_depth(1, 1.0, &[offer(0.8, 4)], target, draft) > 0);
        assert_eq!(
            plan_draft_depth(8, 8.0, &[offer(0.6, 4); 8], target, draft),
            0
        );
    }

    #[test]
    fn drafting_could_pay_for_one_sequence_but_not_for_four_where_rows_are_dear() {
        let offer = |rate| DraftPlanOffer {
            rate,
            tokens: 4,
            catch_up: 2,
        };
        // Lines like the Zen 4 host's of 2026-12-05 (target 50 ms at 4 rows, 73 ms at 8; draft
        // 29 ms at 8 rows, 0.38 of a target step at one).
        let target = |r: usize| 0.027 + 0.00575 * r as f64;
        let draft = |r: usize| 0.0105 + 0.00231 * r as f64;
        // By hand, at rate 0.9 and depth 1 (the best depth for one sequence): one sequence
        // commits 1.9 tokens in draft(2) + target(2) = 53.6 ms against 1 in 32.8 ms; four
        // commit 7.6 in draft(8) + target(8) = 102 ms against 4 in 50 ms.
        assert!(1.9 / (draft(2) + target(2)) > 1.0 / target(1));
        assert!(7.6 / (draft(8) + target(8)) < 4.0 / target(4));
        assert!(drafting_could_pay(
            1,
            1.0,
            &[offer(0.1)],
            0.9,
            target,
            draft
        ));
        assert!(!drafting_could_pay(
            4,
            4.0,
            &[offer(0.1); 4],
            0.9,
            target,
            draft
        ));
        // Four sequences accepting 95% do not pay there either; the rate is a floor, so a
        // sequence measured above it keeps its own rate (every draft accepted pays at depth 4).
        assert!(!drafting_could_pay(
            4,
            4.0,
            &[offer(0.95); 4],
            0.9,
            target,
            draft
        ));
        assert!(drafting_could_pay(
            4,
            4.0,
            &[offer(1.0); 4],
            0.9,
            target,
            draft
        ));
        // Without the raise, a sequence whose prior is low would not draft: the raise is what
        // lets it explore.
        assert_eq!(plan_draft_depth(1, 1.0, &[offer(0.1)], target, draft), 0);
    }

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

    #[test]
    fn the_step_cost_follows_the_row_counts_near_the_one_priced() {
        // Decode rows on a line of 30 ms + 2 ms a row, prefill chunks on 10 ms + 5 ms a row.
        let decode = |r: usize| 0.030 + 0.002 * r as f64;
        let prefill = |r: usize| 0.010 + 0.005 * r as f64;
        let mut cost = StepCost::default();
        for r in [1, 2, 3, 4, 6] {
            cost.record(r, Duration::from_secs_f64(decode(r)));
        }
        for r in [64, 96, 128] {
            cost.record(r, Duration::from_secs_f64(prefill(r)));
        }
        for r in [1, 2, 5, 8] {
            let got = cost.seconds(r).unwrap();
            assert!((got - decode(r)).abs() < 1e-9, "{r} rows: {got}");
        }
        let got = cost.seconds(112).unwrap();
        // The four nearest are 64, 96, 128 and 6: near the prefill line, far from the decode one.
        assert!((got - prefill(112)).abs() < 0.1 * prefill(112), "{got}");
    }
}
