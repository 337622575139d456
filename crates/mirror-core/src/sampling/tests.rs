//! Sampling and verification rules against hand-computed values and a full-sort reference.

use super::*;

/// The definition of [`warp_probs`] computed the obvious way: every weight, one full sort.
fn warp_reference(logits: &[f32], params: &SamplingParams) -> Vec<f32> {
    let n = logits.len();
    let t = params.temperature as f64;
    let max = logits
        .iter()
        .map(|&l| l as f64 / t)
        .fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = logits.iter().map(|&l| (l as f64 / t - max).exp()).collect();
    let mut by_logit: Vec<usize> = (0..n).collect();
    by_logit.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let k = if params.top_k > 0 {
        params.top_k.min(n)
    } else {
        n
    };
    let mut alive = vec![false; n];
    for &i in &by_logit[..k] {
        alive[i] = true;
    }
    if params.top_p < 1.0 {
        let total: f64 = (0..n).filter(|&i| alive[i]).map(|i| weights[i]).sum();
        let mut order: Vec<usize> = (0..n).filter(|&i| alive[i]).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let mut cumulative = 0.0;
        let mut cut = order.len();
        for (r, &i) in order.iter().enumerate() {
            cumulative += weights[i] / total;
            if cumulative >= params.top_p as f64 {
                cut = r + 1;
                break;
            }
        }
        for &i in &order[cut..] {
            alive[i] = false;
        }
    }
    let total: f64 = (0..n).filter(|&i| alive[i]).map(|i| weights[i]).sum();
    (0..n)
        .map(|i| {
            if alive[i] {
                (weights[i] / total) as f32
            } else {
                0.0
            }
        })
        .collect()
}

/// A small deterministic generator (xorshift), enough for test inputs.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
    }
}

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
    let cases: [(SamplingParams, [f32; 4]); 4] = [
        (params(1.0, 0, 1.0), [0.1, 0.2, 0.3, 0.4]),
        (params(1.0, 2, 1.0), [0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0]),
        // Mass 0.4, then 0.7 >= 0.6: keeps the top two.
        (params(1.0, 0, 0.6), [0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0]),
        // Temperature 0.5 squares the odds: 1, 4, 9, 16 over 30.
        (
            params(0.5, 0, 1.0),
            [1.0 / 30.0, 4.0 / 30.0, 9.0 / 30.0, 16.0 / 30.0],
        ),
    ];
    for (p, want) in cases {
        let got = warp(&logits, &p);
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{p:?}: {got:?} vs {want:?}");
        }
    }
    // Mass that reaches top_p exactly stops there; equal logits rank by index.
    assert_eq!(
        warp(&[0.0; 4], &params(1.0, 0, 0.5)),
        vec![0.5, 0.5, 0.0, 0.0]
    );
    assert_eq!(
        warp(&[0.0; 4], &params(1.0, 3, 1.0)),
        vec![1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 0.0]
    );
}

/// The selection-based warp equals the full-sort definition bit for bit, on vocabularies
/// with ties, large and small cuts, and sparse and dense results.
#[test]
fn warp_equals_the_full_sort_definition() {
    let mut rng = Lcg(0x9e37_79b9_7f4a_7c15);
    let mut sparse_seen = (false, false);
    for case in 0..400 {
        let n = [1usize, 2, 7, 64, 1000, 5000, 12000][case % 7];
        // Coarse logits make ties common.
        let coarse = case % 3 == 0;
        let logits: Vec<f32> = (0..n)
            .map(|_| {
                let v = (rng.next() * 12.0 - 6.0) as f32;
                if coarse {
                    v.round()
                } else {
                    v
                }
            })
            .collect();
        let temperature = [0.3f32, 0.7, 1.0, 2.5][case % 4];
        let top_k = [0usize, 1, 3, 20, 700, 6000, 5000][(case / 4) % 7];
        let top_p = [1.0f32, 0.95, 0.8, 0.5, 0.0][(case / 7) % 5];
        let p = params(temperature, top_k, top_p);
        let fast = warp_probs(&logits, &p);
        if fast.is_sparse() {
            sparse_seen.0 = true;
        } else {
            sparse_seen.1 = true;
        }
        assert_eq!(fast.len(), n);
        assert_eq!(fast.to_dense(), warp_reference(&logits, &p), "{p:?} n={n}");
    }
    assert_eq!(sparse_seen, (true, true), "both forms must be exercised");
}

#[test]
fn few_survivors_are_stored_sparsely() {
    let logits: Vec<f32> = (0..10_000)
        .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
        .collect();
    let q = warp_probs(&logits, &params(0.7, 40, 1.0));
    assert!(q.is_sparse());
    assert_eq!(q.stored(), 40);
    let q = warp_probs(&logits, &params(1.0, 0, 1.0));
    assert!(!q.is_sparse());
}

#[test]
fn sparse_and_dense_forms_give_identical_results() {
    let mut rng = Lcg(42);
    for case in 0..200 {
        let n = 50;
        let logits: Vec<f32> = (0..n).map(|_| (rng.next() * 8.0) as f32).collect();
        let draft: Vec<f32> = (0..n).map(|_| (rng.next() * 8.0) as f32).collect();
        let top_k = [2usize, 5, 6][case % 3];
        let p_params = params(0.8, top_k, 0.9);
        let p = warp_probs(&logits, &p_params);
        let q = warp_probs(&draft, &p_params);
        assert!(p.is_sparse() && q.is_sparse());
        let (pd, qd) = (Probs::dense(p.to_dense()), Probs::dense(q.to_dense()));
        for _ in 0..20 {
            let u = rng.next();
            assert_eq!(p.sample(u), sample(&p.to_dense(), u));
            assert_eq!(p.sample(u), pd.sample(u));
            let x = (rng.next() * n as f64) as u32;
            assert_eq!(accept_sampled(&p, &q, x, u), accept_sampled(&pd, &qd, x, u));
            assert_eq!(
                accept_deterministic(&p, x, u),
                accept_deterministic(&pd, x, u)
            );
            assert_eq!(
                without_token(&p, x).to_dense(),
                without_token(&pd, x).to_dense()
            );
        }
        assert_eq!(residual(&p, &q).to_dense(), residual(&pd, &qd).to_dense());
        assert_eq!(residual(&p, &qd).to_dense(), residual(&pd, &q).to_dense());
    }
}

#[test]
fn sample_is_inverse_cdf() {
    let probs = [0.0, 0.25, 0.0, 0.75];
    assert_eq!(sample(&probs, 0.0), 1);
    assert_eq!(sample(&probs, 0.2499), 1);
    assert_eq!(sample(&probs, 0.25), 3);
    assert_eq!(sample(&probs, 0.999_999), 3);
    let sparse = Probs::sparse(4, vec![(3, 0.75), (1, 0.25)]).unwrap();
    for u in [0.0, 0.2499, 0.25, 0.999_999] {
        assert_eq!(sparse.sample(u), sample(&probs, u));
    }
    assert!(Probs::sparse(4, vec![(4, 1.0)]).is_none());
    assert!(Probs::sparse(4, vec![(1, 0.5), (1, 0.5)]).is_none());
}

#[test]
fn residual_and_ratio_rule() {
    let p = Probs::from(vec![0.5, 0.3, 0.2]);
    let q = Probs::from(vec![0.2, 0.6, 0.2]);
    let r = residual(&p, &q).to_dense();
    assert!((r[0] - 1.0).abs() < 1e-6 && r[1] == 0.0 && r[2] == 0.0);
    // p/q for token 1 is 0.5: accepted below, rejected above.
    assert!(accept_sampled(&p, &q, 1, 0.49));
    assert!(!accept_sampled(&p, &q, 1, 0.51));
    assert!(accept_sampled(&p, &q, 0, 0.999));
    // Equal distributions leave no residual: the fallback is p itself.
    assert_eq!(residual(&p, &p), p);
}

#[test]
fn deterministic_rule_and_removal() {
    let p = Probs::from(vec![0.5, 0.3, 0.2]);
    assert!(accept_deterministic(&p, 1, 0.29));
    assert!(!accept_deterministic(&p, 1, 0.31));
    let rest = without_token(&p, 0).to_dense();
    assert!((rest[1] - 0.6).abs() < 1e-6 && (rest[2] - 0.4).abs() < 1e-6 && rest[0] == 0.0);
}

/// A pseudo-random row of `n` logits spread over `[-spread, spread)`.
fn spread_logits(n: usize, spread: f32, mut seed: u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * spread
        })
        .collect()
}

#[test]
fn the_lane_softmax_and_entropy_match_an_f64_reference() {
    // Lengths that leave tails in the lanes and the blocks, up to a real vocabulary, and
    // spreads from flat to peaked (logits 100 apart reach the exponential's cut below -87).
    for (n, spread) in [
        (1, 1.0),
        (17, 3.0),
        (1_000, 8.0),
        (4_097, 50.0),
        (151_936, 20.0),
    ] {
        let logits = spread_logits(n, spread, n as u64);
        let max = logits
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, |m, l| m.max(f64::from(l)));
        let weights: Vec<f64> = logits.iter().map(|&l| (f64::from(l) - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let entropy: f64 = weights
            .iter()
            .map(|&w| w / total)
            .filter(|&p| p > 0.0)
            .map(|p| -p * p.ln())
            .sum();
        let mut probs = Vec::new();
        let got = softmax_entropy_into(&logits, &mut probs);
        assert!(
            (got - entropy).abs() < 1e-5,
            "n {n}: entropy {got} against {entropy}"
        );
        for (i, (&p, &w)) in probs.iter().zip(&weights).enumerate() {
            let want = w / total;
            let close = (f64::from(p) - want).abs() <= 1e-5 * want + 1e-37;
            assert!(close, "n {n}, token {i}: {p} against {want}");
        }
        let lse = max + total.ln();
        assert!(
            (log_sum_exp(&logits) - lse).abs() < 1e-5,
            "n {n}: log-sum-exp"
        );
    }
}

#[test]
fn the_lane_softmax_gives_zero_to_minus_infinity_and_stays_finite() {
    let logits = [1.0, 2.0, 3.0, f32::NEG_INFINITY, -200.0];
    let mut probs = Vec::new();
    let entropy = softmax_entropy_into(&logits, &mut probs);
    assert_eq!(probs[3], 0.0);
    assert_eq!(probs[4], 0.0);
    let z: f64 = [1.0f64, 2.0, 3.0].iter().map(|l| (l - 3.0).exp()).sum();
    let want: f64 = [1.0f64, 2.0, 3.0]
        .iter()
        .map(|l| (l - 3.0).exp() / z)
        .map(|p| -p * p.ln())
        .sum();
    assert!((entropy - want).abs() < 1e-6, "{entropy} against {want}");
    assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 3]), f64::NEG_INFINITY);
}
