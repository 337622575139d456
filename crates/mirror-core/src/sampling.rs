//! Sampling and verification rules: pure functions over `&[f32]`, no tensors.
//!
//! The same [`warp`] turns target logits into `p` and draft logits into `q`, so the ratio rule of
//! speculative sampling (Leviathan et al., arXiv 2211.17192; Chen et al., arXiv 2302.01318) sees
//! exactly the distribution each model sampled from.

/// How logits become a distribution. `temperature == 0` means greedy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0.0` selects argmax decoding.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (`0` keeps all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose mass reaches `top_p` (`1.0` keeps all).
    pub top_p: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    /// Argmax decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        }
    }

    /// Whether this is argmax decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// Index of the largest value (the first one on ties), as greedy decoding picks it.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Probability of the most likely token under `softmax(logits)` (0 for empty or all `-inf`).
pub fn max_probability(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return 0.0;
    }
    let total: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    1.0 / total
}

/// `log softmax(logits)` in f64 for accuracy, returned as f32.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let log_sum = sum.ln() + max;
    logits
        .iter()
        .map(|&l| (l as f64 - log_sum) as f32)
        .collect()
}

/// The `k` largest values as `(index, log_prob)`, most likely first (ties: lower index first).
pub fn top_k_log_probs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let log_probs = log_softmax(logits);
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(order.len());
    let by_value_desc = |a: &u32, b: &u32| {
        log_probs[*b as usize]
            .total_cmp(&log_probs[*a as usize])
            .then(a.cmp(b))
    };
    if k < order.len() && k > 0 {
        order.select_nth_unstable_by(k - 1, by_value_desc);
    }
    order.truncate(k);
    order.sort_by(by_value_desc);
    order
        .into_iter()
        .map(|i| (i, log_probs[i as usize]))
        .collect()
}

/// The distribution `params` samples from: temperature, then top-k, then top-p, renormalised.
/// For greedy params this is the point mass on the argmax.
pub fn warp(logits: &[f32], params: &SamplingParams) -> Vec<f32> {
    let n = logits.len();
    let mut probs = vec![0.0f32; n];
    if n == 0 {
        return probs;
    }
    if params.is_greedy() {
        probs[argmax(logits) as usize] = 1.0;
        return probs;
    }
    let scaled: Vec<f64> = logits
        .iter()
        .map(|&l| l as f64 / params.temperature as f64)
        .collect();
    let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut weights: Vec<f64> = scaled.iter().map(|&s| (s - max).exp()).collect();
    // Sort once by descending weight (ties by index) and cut by rank and by cumulative mass.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
    let mut keep = if params.top_k > 0 {
        params.top_k.min(n)
    } else {
        n
    };
    if params.top_p < 1.0 {
        let total: f64 = order[..keep].iter().map(|&i| weights[i]).sum();
        let mut cumulative = 0.0;
        for (rank, &i) in order[..keep].iter().enumerate() {
            cumulative += weights[i] / total;
            if cumulative >= params.top_p as f64 {
                keep = rank + 1;
                break;
            }
        }
    }
    for &i in &order[keep..] {
        weights[i] = 0.0;
    }
    let total: f64 = weights.iter().sum();
    for (p, w) in probs.iter_mut().zip(&weights) {
        *p = (w / total) as f32;
    }
    probs
}

/// Draws from `probs` with a uniform number `u` in `[0, 1)` (inverse CDF, in index order).
pub fn sample(probs: &[f32], u: f64) -> u32 {
    let total: f64 = probs.iter().map(|&p| p as f64).sum();
    let target = u * total;
    let mut cumulative = 0.0;
    let mut last_positive = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            cumulative += p as f64;
            last_positive = i;
            if target < cumulative {
                return i as u32;
            }
        }
    }
    last_positive as u32
}

/// `normalize(max(0, p - q))`: where a rejected draft token's replacement is drawn from. Falls back
/// to `p` when `p <= q` everywhere (only possible through rounding when `p == q`).
pub fn residual(p: &[f32], q: &[f32]) -> Vec<f32> {
    let diff: Vec<f32> = p.iter().zip(q).map(|(&a, &b)| (a - b).max(0.0)).collect();
    let total: f64 = diff.iter().map(|&d| d as f64).sum();
    if total <= 0.0 {
        return p.to_vec();
    }
    diff.iter().map(|&d| (d as f64 / total) as f32).collect()
}

/// The ratio rule for a token `x` the draft sampled from `q`: accept when `u < p(x) / q(x)`.
pub fn accept_sampled(p: &[f32], q: &[f32], x: u32, u: f64) -> bool {
    let (px, qx) = (p[x as usize] as f64, q[x as usize] as f64);
    qx > 0.0 && u * qx < px
}

/// Removes `x` from `p` and renormalises: after a deterministic candidate is rejected, the next
/// candidate (or the correction) is judged against what remains.
pub fn without_token(p: &[f32], x: u32) -> Vec<f32> {
    let mut out = p.to_vec();
    out[x as usize] = 0.0;
    let total: f64 = out.iter().map(|&v| v as f64).sum();
    if total > 0.0 {
        for v in &mut out {
            *v = (*v as f64 / total) as f32;
        }
    }
    out
}

/// The point-mass rule for a deterministic candidate `x` (greedy draft token, top-kappa seed):
/// accept with probability `p(x)`.
pub fn accept_deterministic(p: &[f32], x: u32, u: f64) -> bool {
    u < p[x as usize] as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_first_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[-1.0]), 0);
    }

    #[test]
    fn max_probability_matches_hand_computation() {
        // softmax(0, ln 3) = (1/4, 3/4)
        assert!((max_probability(&[0.0, (3.0f32).ln()]) - 0.75).abs() < 1e-6);
        assert!((max_probability(&[5.0, 5.0, 5.0, 5.0]) - 0.25).abs() < 1e-6);
        assert_eq!(max_probability(&[]), 0.0);
        assert_eq!(max_probability(&[f32::NEG_INFINITY]), 0.0);
    }

    #[test]
    fn log_softmax_matches_hand_computation() {
        let lp = log_softmax(&[0.0, (3.0f32).ln()]);
        assert!((lp[0] - (0.25f32).ln()).abs() < 1e-6);
        assert!((lp[1] - (0.75f32).ln()).abs() < 1e-6);
    }

    #[test]
    fn top_k_orders_by_probability() {
        let top = top_k_log_probs(&[0.1, 5.0, 2.0, 5.0, -1.0], 3);
        let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        assert!(top[0].1 >= top[2].1);
    }

    #[test]
    fn warp_greedy_is_point_mass() {
        assert_eq!(
            warp(&[0.0, 2.0, 1.0], &SamplingParams::greedy()),
            vec![0.0, 1.0, 0.0]
        );
    }

    #[test]
    fn warp_temperature_top_k_top_p_against_hand_values() {
        let logits = [(1.0f32).ln(), (2.0f32).ln(), (3.0f32).ln(), (4.0f32).ln()];
        let full = warp(
            &logits,
            &SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
            },
        );
        for (p, want) in full.iter().zip([0.1, 0.2, 0.3, 0.4]) {
            assert!((p - want).abs() < 1e-6);
        }
        let k2 = warp(
            &logits,
            &SamplingParams {
                temperature: 1.0,
                top_k: 2,
                top_p: 1.0,
            },
        );
        for (p, want) in k2.iter().zip([0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0]) {
            assert!((p - want).abs() < 1e-6);
        }
        // Mass 0.4, then 0.7 >= 0.6: keeps the top two.
        let p6 = warp(
            &logits,
            &SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 0.6,
            },
        );
        for (p, want) in p6.iter().zip([0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0]) {
            assert!((p - want).abs() < 1e-6);
        }
        // Temperature 0.5 squares the odds: 1, 4, 9, 16 over 30.
        let t = warp(
            &logits,
            &SamplingParams {
                temperature: 0.5,
                top_k: 0,
                top_p: 1.0,
            },
        );
        for (p, want) in t
            .iter()
            .zip([1.0 / 30.0, 4.0 / 30.0, 9.0 / 30.0, 16.0 / 30.0])
        {
            assert!((p - want).abs() < 1e-6);
        }
    }

    #[test]
    fn sample_is_inverse_cdf() {
        let probs = [0.0, 0.25, 0.0, 0.75];
        assert_eq!(sample(&probs, 0.0), 1);
        assert_eq!(sample(&probs, 0.2499), 1);
        assert_eq!(sample(&probs, 0.25), 3);
        assert_eq!(sample(&probs, 0.999_999), 3);
    }

    #[test]
    fn residual_and_ratio_rule() {
        let p = [0.5, 0.3, 0.2];
        let q = [0.2, 0.6, 0.2];
        let r = residual(&p, &q);
        assert!((r[0] - 1.0).abs() < 1e-6 && r[1] == 0.0 && r[2] == 0.0);
        // p/q for token 1 is 0.5: accepted below, rejected above.
        assert!(accept_sampled(&p, &q, 1, 0.49));
        assert!(!accept_sampled(&p, &q, 1, 0.51));
        assert!(accept_sampled(&p, &q, 0, 0.999));
    }

    #[test]
    fn deterministic_rule_and_removal() {
        let p = [0.5, 0.3, 0.2];
        assert!(accept_deterministic(&p, 1, 0.29));
        assert!(!accept_deterministic(&p, 1, 0.31));
        let rest = without_token(&p, 0);
        assert!((rest[1] - 0.6).abs() < 1e-6 && (rest[2] - 0.4).abs() < 1e-6 && rest[0] == 0.0);
    }
}
