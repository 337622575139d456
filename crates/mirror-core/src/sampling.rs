//! Sampling and verification rules: pure functions over logits (`&[f32]`) and distributions
//! ([`Probs`]), no tensors.
//!
//! The same [`warp_probs`] turns target logits into `p` and draft logits into `q`, so the ratio
//! rule of speculative sampling (Leviathan et al., arXiv 2211.17192; Chen et al.,
//! arXiv 2302.01318) sees exactly the distribution each model sampled from. A distribution that
//! top-k or top-p cuts to a few tokens is kept sparse: a drafted token then carries its `q` in a
//! few entries instead of a vocabulary-sized vector. Sparse and dense forms hold the same values
//! and every rule below gives bit-identical results on either.
//!
//! One window is verified position by position: a sampled draft token by the ratio rule
//! ([`accept_sampled`], [`residual`]), a deterministic one (a greedy draft's argmax) by the
//! point-mass rule ([`accept_deterministic`], [`without_token`]); the bonus token after a fully
//! accepted window is drawn from `p` itself.

use std::cmp::Ordering;

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

/// A probability distribution over a vocabulary of [`Probs::len`] tokens, stored densely or, when
/// few tokens have mass, as `(token, probability)` entries in ascending token order.
#[derive(Debug, Clone, PartialEq)]
pub struct Probs {
    len: usize,
    repr: Repr,
}

#[derive(Debug, Clone, PartialEq)]
enum Repr {
    Dense(Vec<f32>),
    /// Ascending token order; tokens absent have probability 0.
    Sparse(Vec<(u32, f32)>),
}

impl From<Vec<f32>> for Probs {
    fn from(values: Vec<f32>) -> Self {
        Self::dense(values)
    }
}

impl Probs {
    /// A dense distribution.
    pub fn dense(values: Vec<f32>) -> Self {
        Self {
            len: values.len(),
            repr: Repr::Dense(values),
        }
    }

    /// A sparse distribution over `len` tokens: the given entries, every other token 0. Entries
    /// are sorted by token; `None` if a token is out of range or repeated.
    pub fn sparse(len: usize, mut entries: Vec<(u32, f32)>) -> Option<Self> {
        entries.sort_by_key(|e| e.0);
        let in_range = entries.last().is_none_or(|e| (e.0 as usize) < len);
        let distinct = entries.windows(2).all(|w| w[0].0 < w[1].0);
        (in_range && distinct).then_some(Self {
            len,
            repr: Repr::Sparse(entries),
        })
    }

    /// The point mass on `token` over `len` tokens.
    pub fn point(len: usize, token: u32) -> Self {
        let entries = if (token as usize) < len {
            vec![(token, 1.0)]
        } else {
            Vec::new()
        };
        Self {
            len,
            repr: Repr::Sparse(entries),
        }
    }

    /// Size of the vocabulary.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a distribution over no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the entries are stored sparsely.
    pub fn is_sparse(&self) -> bool {
        matches!(self.repr, Repr::Sparse(_))
    }

    /// Number of stored values (the vocabulary size when dense).
    pub fn stored(&self) -> usize {
        match &self.repr {
            Repr::Dense(v) => v.len(),
            Repr::Sparse(e) => e.len(),
        }
    }

    /// Probability of `token` (0 outside the vocabulary).
    pub fn get(&self, token: u32) -> f32 {
        match &self.repr {
            Repr::Dense(v) => v.get(token as usize).copied().unwrap_or(0.0),
            Repr::Sparse(e) => e
                .binary_search_by_key(&token, |x| x.0)
                .map_or(0.0, |i| e[i].1),
        }
    }

    /// The tokens of positive probability with their probabilities, in ascending token order.
    pub fn nonzero(&self) -> Box<dyn Iterator<Item = (u32, f32)> + '_> {
        match &self.repr {
            Repr::Dense(v) => Box::new(
                v.iter()
                    .enumerate()
                    .filter(|(_, &p)| p > 0.0)
                    .map(|(i, &p)| (i as u32, p)),
            ),
            Repr::Sparse(e) => Box::new(e.iter().copied().filter(|&(_, p)| p > 0.0)),
        }
    }

    /// The distribution as a vocabulary-sized vector.
    pub fn to_dense(&self) -> Vec<f32> {
        match &self.repr {
            Repr::Dense(v) => v.clone(),
            Repr::Sparse(e) => {
                let mut out = vec![0.0; self.len];
                for &(t, p) in e {
                    out[t as usize] = p;
                }
                out
            }
        }
    }

    /// Draws a token with a uniform number `u` in `[0, 1)`: the inverse CDF in token order, as
    /// [`sample`] does on the dense vector.
    pub fn sample(&self, u: f64) -> u32 {
        match &self.repr {
            Repr::Dense(v) => sample(v, u),
            Repr::Sparse(e) => {
                let total: f64 = e.iter().map(|&(_, p)| p as f64).sum();
                let target = u * total;
                let mut cumulative = 0.0;
                let mut last_positive = 0;
                for &(t, p) in e {
                    if p > 0.0 {
                        cumulative += p as f64;
                        last_positive = t;
                        if target < cumulative {
                            return t;
                        }
                    }
                }
                last_positive
            }
        }
    }

    /// The same distribution with every value divided by `total` (entries of value 0 dropped
    /// from a sparse form).
    fn scaled(len: usize, entries: Vec<(u32, f64)>, total: f64, dense: bool) -> Self {
        if dense {
            let mut out = vec![0.0f32; len];
            for (t, w) in entries {
                out[t as usize] = (w / total) as f32;
            }
            Self::dense(out)
        } else {
            Self {
                len,
                repr: Repr::Sparse(
                    entries
                        .into_iter()
                        .filter(|&(_, w)| w > 0.0)
                        .map(|(t, w)| (t, (w / total) as f32))
                        .collect(),
                ),
            }
        }
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

/// `f32::total_cmp` as an unsigned key: `a.total_cmp(&b) == key(a).cmp(&key(b))`.
fn total_order_key(v: f32) -> u32 {
    let bits = v.to_bits();
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// Indices of the `k` largest `values` (descending by `total_cmp`, ties: lower index first), in
/// ascending index order. Linear in `values.len()`: one pass with a heap of `k` entries for a
/// small `k` (most values lose one comparison with the heap's weakest), a selection otherwise.
fn top_k_indices(values: &[f32], k: usize) -> Vec<u32> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let n = values.len();
    if k >= n {
        return (0..n as u32).collect();
    }
    if k == 0 {
        return Vec::new();
    }
    let mut out = if k <= 4096 {
        // A min-heap of (key, Reverse(index)): its top is the weakest kept value. Values come
        // in index order, so an equal key never displaces a kept (lower) index.
        let mut heap: BinaryHeap<Reverse<(u32, Reverse<u32>)>> = BinaryHeap::with_capacity(k + 1);
        for (i, &v) in values.iter().take(k).enumerate() {
            heap.push(Reverse((total_order_key(v), Reverse(i as u32))));
        }
        let mut weakest = heap.peek().map_or(0, |e| (e.0).0);
        for (i, &v) in values.iter().enumerate().skip(k) {
            let key = total_order_key(v);
            if key > weakest {
                if let Some(mut top) = heap.peek_mut() {
                    *top = Reverse((key, Reverse(i as u32)));
                }
                weakest = heap.peek().map_or(0, |e| (e.0).0);
            }
        }
        heap.into_iter().map(|Reverse((_, Reverse(i)))| i).collect()
    } else {
        let mut copy = values.to_vec();
        let (_, kth, _) = copy.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let kth = *kth;
        let above = values
            .iter()
            .filter(|v| v.total_cmp(&kth) == Ordering::Greater)
            .count();
        let mut ties_left = k - above;
        let mut out = Vec::with_capacity(k);
        for (i, v) in values.iter().enumerate() {
            match v.total_cmp(&kth) {
                Ordering::Greater => out.push(i as u32),
                Ordering::Equal if ties_left > 0 => {
                    ties_left -= 1;
                    out.push(i as u32);
                }
                _ => {}
            }
        }
        out
    };
    out.sort_unstable();
    out
}

/// A warp keeps a sparse form when at most this fraction of the vocabulary survives.
const SPARSE_FRACTION: usize = 8;

/// The distribution `params` samples from: temperature, then top-k, then top-p, renormalised.
/// For greedy params this is the point mass on the argmax.
///
/// Definition, which the result equals exactly: tokens are ranked by logit (descending, ties:
/// lower index first); weights are `w_i = exp(l_i / T - max_j l_j / T)` in f64; top-k keeps the
/// `k` first-ranked tokens; top-p keeps the shortest run of the survivors, in rank order, whose
/// cumulative share of the survivors' total weight (summed in index order) reaches `top_p`; the
/// kept weights are divided by their sum (in index order) and rounded to f32.
///
/// Nothing is sorted: top-k is one pass with a heap of `k` entries, top-p ranks the first 64
/// survivors, then 512, ... until their share reaches `top_p`, and without either cut the
/// weights are only normalised. The result is sparse when at most an eighth of the vocabulary
/// survives.
pub fn warp_probs(logits: &[f32], params: &SamplingParams) -> Probs {
    let n = logits.len();
    if n == 0 {
        return Probs::dense(Vec::new());
    }
    if params.is_greedy() {
        return Probs::point(n, argmax(logits));
    }
    let temperature = params.temperature as f64;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64 / temperature;
    let weight = |l: f32| (l as f64 / temperature - max).exp();
    let k = if params.top_k > 0 {
        params.top_k.min(n)
    } else {
        n
    };
    if k == n && params.top_p >= 1.0 {
        // Nothing is cut.
        let weights: Vec<f64> = logits.iter().map(|&l| weight(l)).collect();
        let total: f64 = weights.iter().sum();
        return Probs::dense(weights.iter().map(|w| (w / total) as f32).collect());
    }
    // Survivors of top-k in ascending index order (all tokens when k == n).
    let survivors: Vec<u32> = if k < n {
        top_k_indices(logits, k)
    } else {
        (0..n as u32).collect()
    };
    let kept: Vec<u32> = if params.top_p < 1.0 {
        let pool: Vec<f32> = if k < n {
            survivors.iter().map(|&i| logits[i as usize]).collect()
        } else {
            logits.to_vec()
        };
        let total: f64 = pool.iter().map(|&l| weight(l)).sum();
        let top_p = params.top_p as f64;
        let mut chunk = 64;
        loop {
            let m = chunk.min(pool.len());
            // Positions in the pool follow token order, so position ties are index ties.
            let mut ranked = top_k_indices(&pool, m);
            ranked.sort_unstable_by(|&a, &b| {
                pool[b as usize]
                    .total_cmp(&pool[a as usize])
                    .then(a.cmp(&b))
            });
            let mut cumulative = 0.0;
            let cut = ranked.iter().position(|&r| {
                cumulative += weight(pool[r as usize]) / total;
                cumulative >= top_p
            });
            if let Some(cut) = cut {
                ranked.truncate(cut + 1);
            } else if m < pool.len() {
                chunk *= 8;
                continue;
            }
            let mut kept: Vec<u32> = ranked.iter().map(|&r| survivors[r as usize]).collect();
            kept.sort_unstable();
            break kept;
        }
    } else {
        survivors
    };
    let weights: Vec<(u32, f64)> = kept
        .into_iter()
        .map(|i| (i, weight(logits[i as usize])))
        .collect();
    let total: f64 = weights.iter().map(|e| e.1).sum();
    let dense = weights.len() > n / SPARSE_FRACTION;
    Probs::scaled(n, weights, total, dense)
}

/// [`warp_probs`] as a vocabulary-sized vector.
pub fn warp(logits: &[f32], params: &SamplingParams) -> Vec<f32> {
    warp_probs(logits, params).to_dense()
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
/// to `p` when `p <= q` everywhere (only possible through rounding when `p == q`). Sparse when
/// `p` is.
pub fn residual(p: &Probs, q: &Probs) -> Probs {
    let diff: Vec<(u32, f64)> = p
        .nonzero()
        .map(|(t, pt)| (t, (pt - q.get(t)).max(0.0) as f64))
        .collect();
    let total: f64 = diff.iter().map(|d| d.1).sum();
    if total <= 0.0 {
        return p.clone();
    }
    Probs::scaled(p.len(), diff, total, !p.is_sparse())
}

/// The ratio rule for a token `x` the draft sampled from `q`: accept when `u < p(x) / q(x)`.
pub fn accept_sampled(p: &Probs, q: &Probs, x: u32, u: f64) -> bool {
    let (px, qx) = (p.get(x) as f64, q.get(x) as f64);
    qx > 0.0 && u * qx < px
}

/// Removes `x` from `p` and renormalises: after a deterministic draft token `x` is rejected, the
/// correction is drawn from what remains. Sparse when `p` is.
pub fn without_token(p: &Probs, x: u32) -> Probs {
    let rest: Vec<(u32, f64)> = p
        .nonzero()
        .map(|(t, pt)| (t, if t == x { 0.0 } else { pt as f64 }))
        .collect();
    let total: f64 = rest.iter().map(|d| d.1).sum();
    if total <= 0.0 {
        // `x` held all the mass: nothing remains to renormalise (`p` unchanged but for `x`).
        return Probs::scaled(p.len(), rest, 1.0, !p.is_sparse());
    }
    Probs::scaled(p.len(), rest, total, !p.is_sparse())
}

/// The point-mass rule for a deterministic draft token `x` (a greedy draft's argmax): accept
/// with probability `p(x)`.
pub fn accept_deterministic(p: &Probs, x: u32, u: f64) -> bool {
    u < p.get(x) as f64
}

#[cfg(test)]
mod tests {
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
}
