//! The hypothesis tree of Mirror-SD: which branches to draft, in which order, and how the
//! corrected prefix is looked up. Pure logic over host data.
//!
//! A branch `(row, token)` is the window the draft would propose after the target accepts
//! `w_1..w_row` and then emits `token` (a correction at `row < gamma`, or the bonus at
//! `row == gamma`). Its priority estimates the probability of that outcome from the early-exit
//! distributions: reaching `row` (every earlier draft token accepted), stopping there, and the
//! correction being `token`.

/// How often the target accepts the draft's token at each window position, given that it
/// accepted the ones before: counts over the windows verified so far, from a prior of one
/// acceptance in two proposals. The tree planner orders branches by it.
#[derive(Debug, Clone, PartialEq)]
pub struct AcceptanceEstimate {
    /// Per position: (accepted, proposed).
    counts: Vec<(f64, f64)>,
}

impl AcceptanceEstimate {
    /// The prior for windows of `gamma` tokens.
    pub fn new(gamma: usize) -> Self {
        Self {
            counts: vec![(1.0, 2.0); gamma],
        }
    }

    /// An estimate fixed at `rates` (for planning by hand).
    pub fn from_rates(rates: &[f64]) -> Self {
        Self {
            counts: rates.iter().map(|&r| (r, 1.0)).collect(),
        }
    }

    /// Learns from a verified window of `proposed` tokens of which the first `accepted` stood:
    /// positions `0..accepted` were accepted, position `accepted` (if proposed) was not, and
    /// later positions were never judged.
    pub fn record(&mut self, proposed: usize, accepted: usize) {
        for (j, count) in self.counts.iter_mut().enumerate().take(proposed) {
            if j > accepted {
                break;
            }
            count.1 += 1.0;
            count.0 += f64::from(u8::from(j < accepted));
        }
    }

    /// The estimated acceptance probability at position `j` (0.5 beyond what is tracked).
    pub fn rate(&self, j: usize) -> f64 {
        self.counts.get(j).map_or(0.5, |(a, p)| a / p)
    }
}

/// One branch to draft.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BranchPlan {
    /// Window row the branch hangs from (0..=gamma).
    pub row: usize,
    /// Its root token: the correction or bonus it anticipates.
    pub token: u32,
    /// Estimated probability that this branch is the one needed.
    pub priority: f64,
}

/// Plans the branches of a window from the early-exit top-kappa of each row.
///
/// `top_k[d]` holds `(token, log_prob)` of row `d` (after `w_1..w_d`), most likely first;
/// `window` is `w_1..w_gamma'`, so `top_k.len() == window.len() + 1`. `acceptance` estimates
/// the probability that the target accepts the draft's token at each position given that it
/// accepted the ones before (learned from verified windows): the early-exit tap is too shallow
/// to predict acceptance, but it is a good guide to *which* token the target emits once it
/// rejects. A candidate equal to the draft's own next token is skipped (if the target
/// agrees with it, it is not a correction). Returned most likely first.
pub fn plan_branches(
    top_k: &[Vec<(u32, f32)>],
    window: &[u32],
    acceptance: &AcceptanceEstimate,
) -> Vec<BranchPlan> {
    let rows = top_k.len().min(window.len() + 1);
    let mut plans = Vec::new();
    let mut reach = 1.0f64;
    for (row, candidates) in top_k.iter().enumerate().take(rows) {
        let next_draft = window.get(row).copied();
        let accept = next_draft.map(|_| acceptance.rate(row).clamp(0.0, 1.0));
        let stop_here = reach * (1.0 - accept.unwrap_or(0.0));
        // Within the row, share the stopping probability by early-exit probability, without
        // the draft's own token (a rejected token is never the correction).
        let excluded: f64 = candidates
            .iter()
            .filter(|(t, _)| Some(*t) == next_draft)
            .map(|(_, lp)| (*lp as f64).exp())
            .sum();
        for &(token, log_prob) in candidates {
            if Some(token) == next_draft {
                continue;
            }
            let share = (log_prob as f64).exp() / (1.0 - excluded).max(1e-9);
            plans.push(BranchPlan {
                row,
                token,
                priority: stop_here * share,
            });
        }
        if let Some(a) = accept {
            reach *= a;
        }
    }
    plans.sort_by(|a, b| b.priority.total_cmp(&a.priority).then(a.row.cmp(&b.row)));
    plans
}

/// The final rendezvous: mass of the final distribution `probs` on the early-exit candidates.
pub fn overlap_mass(probs: &[f32], candidates: &[(u32, f32)]) -> f64 {
    candidates
        .iter()
        .map(|(t, _)| probs.get(*t as usize).copied().unwrap_or(0.0) as f64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(p: f32) -> f32 {
        p.ln()
    }

    #[test]
    fn skips_the_draft_token_and_orders_by_probability() {
        // Row 0: candidates 7 (the draft token, early-exit probability 0.6, accepted with
        // probability 0.6) and 3.
        // Row 1 (bonus row for a 1-token window): candidates 9 and 4.
        let top_k = vec![
            vec![(7, lp(0.6)), (3, lp(0.3))],
            vec![(9, lp(0.8)), (4, lp(0.1))],
        ];
        let plans = plan_branches(&top_k, &[7], &AcceptanceEstimate::from_rates(&[0.6]));
        let keys: Vec<(usize, u32)> = plans.iter().map(|p| (p.row, p.token)).collect();
        // (1,9): 0.6 * 0.8 = 0.48; (0,3): 0.4 * 0.3/0.4 = 0.3; (1,4): 0.6 * 0.1 = 0.06.
        assert_eq!(keys, vec![(1, 9), (0, 3), (1, 4)]);
        assert!((plans[0].priority - 0.48).abs() < 1e-6);
        assert!((plans[1].priority - 0.3).abs() < 1e-6);
        assert!((plans[2].priority - 0.06).abs() < 1e-6);
    }

    #[test]
    fn acceptance_rates_move_the_tree_towards_the_bonus_row() {
        // Two draft tokens accepted 90% of the time each: the bonus row dominates.
        let top_k = vec![
            vec![(1, lp(0.5)), (2, lp(0.4))],
            vec![(3, lp(0.5)), (4, lp(0.4))],
            vec![(5, lp(0.7)), (6, lp(0.2))],
        ];
        let plans = plan_branches(
            &top_k,
            &[1, 3],
            &AcceptanceEstimate::from_rates(&[0.9, 0.9]),
        );
        assert_eq!((plans[0].row, plans[0].token), (2, 5));
        assert!((plans[0].priority - 0.81 * 0.7).abs() < 1e-6);
        // Row 0 stops with probability 0.1; its only non-draft candidate takes all of it.
        let row0 = plans.iter().find(|p| p.row == 0).unwrap();
        assert!((row0.priority - 0.1 * 0.4 / 0.5).abs() < 1e-6);
    }

    #[test]
    fn the_estimate_counts_judged_positions_only() {
        let mut estimate = AcceptanceEstimate::new(3);
        // Prior: 1 of 2 everywhere.
        assert_eq!(estimate.rate(0), 0.5);
        // Three proposed, first accepted, second rejected, third never judged.
        estimate.record(3, 1);
        assert_eq!(estimate.rate(0), 2.0 / 3.0);
        assert_eq!(estimate.rate(1), 1.0 / 3.0);
        assert_eq!(estimate.rate(2), 0.5);
        // A full window: every position accepted.
        estimate.record(3, 3);
        assert_eq!(estimate.rate(2), 2.0 / 3.0);
        // A shorter window judges only what it proposed.
        estimate.record(1, 1);
        assert_eq!(estimate.rate(1), 2.0 / 4.0);
    }

    #[test]
    fn overlap_mass_sums_candidates() {
        let probs = [0.1, 0.2, 0.3, 0.4];
        assert!((overlap_mass(&probs, &[(3, 0.0), (1, 0.0)]) - 0.6).abs() < 1e-6);
    }
}
