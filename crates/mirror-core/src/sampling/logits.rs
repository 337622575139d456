//! Functions of raw logits: the argmax, softmax statistics and the top-k selection.

use std::cmp::Ordering;

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

/// Lanes of the vocabulary-wide passes below: wide enough for the compiler to keep a few
/// vector registers busy on any x86-64 (SSE2 and up), and free of a scalar `exp` call.
const LANES: usize = 16;
/// Terms summed in f32 lanes before they are folded into the f64 totals (64 per lane).
const BLOCK: usize = 1024;

/// `e^x` for `x <= 0`, to about 2e-6 relative (the rounding of `x · log2 e` in f32 dominates),
/// and exactly 0 below -87 (where `e^x` leaves f32's normal range) and at `-inf`. Written
/// without a libm call or a float-to-int conversion, so a loop over it vectorizes on plain
/// SSE2: `2^t = 2^n · 2^f` with `n` rounded to nearest by the 1.5·2^23 trick and `2^f`,
/// `|f| <= 1/2`, by its degree-6 Taylor polynomial (truncation below 2e-7).
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0;
    let clamped = if x < -87.0 { -87.0 } else { x };
    let t = clamped * std::f32::consts::LOG2_E;
    let shifted = t + ROUND;
    let n = shifted - ROUND;
    let f = t - n;
    let poly = 1.0
        + f * (std::f32::consts::LN_2
            + f * (0.240_226_5
                + f * (0.055_504_11
                    + f * (0.009_618_129 + f * (0.001_333_355 + f * 0.000_154_035_3)))));
    // The low bits of `shifted` hold `n` (two's complement around 0x4B40_0000).
    let exponent = shifted
        .to_bits()
        .wrapping_sub(0x4B40_0000)
        .wrapping_add(127)
        << 23;
    let e = poly * f32::from_bits(exponent);
    if x < -87.0 {
        0.0
    } else {
        e
    }
}

/// The largest of `values` (`-inf` when empty; NaN is ignored), in lanes.
fn max_value(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let mut max = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            if v > *lane {
                *lane = v;
            }
        }
    }
    for lane in lanes {
        max = max.max(lane);
    }
    max
}

/// `probs = softmax(logits)`, and the distribution's Shannon entropy in nats, in one pass of
/// exponentials without a logarithm per token: with `e = exp(l - max)` and `S = Σ e`,
/// `H = ln S - Σ e (l - max) / S`. Sums run in f32 lanes over blocks of 1024 and are folded in
/// f64 (150k f32 terms in one sum would lose digits). Each probability is within about 4e-6
/// relative of the exact one (see `exp_nonpositive`), which is what generation monitors need;
/// sampling uses [`crate::sampling::Probs`]. Empty or all `-inf` logits give NaN.
pub fn softmax_entropy_into(logits: &[f32], probs: &mut Vec<f32>) -> f64 {
    let max = max_value(logits);
    probs.clear();
    probs.resize(logits.len(), 0.0);
    let (mut sum, mut weighted) = (0.0f64, 0.0f64);
    for (block, out) in logits.chunks(BLOCK).zip(probs.chunks_mut(BLOCK)) {
        let (mut sums, mut weights) = ([0.0f32; LANES], [0.0f32; LANES]);
        let chunks = block.chunks_exact(LANES);
        let tail = chunks.remainder();
        let (body, rest) = out.split_at_mut(block.len() - tail.len());
        for (chunk, out) in chunks.zip(body.chunks_exact_mut(LANES)) {
            for i in 0..LANES {
                let shifted = chunk[i] - max;
                let e = exp_nonpositive(shifted);
                out[i] = e;
                sums[i] += e;
                // `e = 0` where `shifted` is `-inf`: the clamp keeps the product 0, not NaN.
                weights[i] += e * shifted.max(-87.0);
            }
        }
        for (&l, out) in tail.iter().zip(rest) {
            let shifted = l - max;
            let e = exp_nonpositive(shifted);
            *out = e;
            sum += f64::from(e);
            weighted += f64::from(e * shifted.max(-87.0));
        }
        sum += sums.iter().map(|&s| f64::from(s)).sum::<f64>();
        weighted += weights.iter().map(|&w| f64::from(w)).sum::<f64>();
    }
    let scale = (1.0 / sum) as f32;
    for p in probs.iter_mut() {
        *p *= scale;
    }
    sum.ln() - weighted / sum
}

/// `ln Σ exp(l)` over `logits`, to about 4e-6 (as [`softmax_entropy_into`]): the normalizer of
/// log-probabilities, `log p(t) = l_t - log_sum_exp`. Empty or all `-inf`: `-inf`.
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = max_value(logits);
    if max == f32::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let mut sum = 0.0f64;
    for block in logits.chunks(BLOCK) {
        let mut sums = [0.0f32; LANES];
        let chunks = block.chunks_exact(LANES);
        for &l in chunks.remainder() {
            sum += f64::from(exp_nonpositive(l - max));
        }
        for chunk in chunks {
            for (s, &l) in sums.iter_mut().zip(chunk) {
                *s += exp_nonpositive(l - max);
            }
        }
        sum += sums.iter().map(|&s| f64::from(s)).sum::<f64>();
    }
    f64::from(max) + sum.ln()
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
pub(super) fn top_k_indices(values: &[f32], k: usize) -> Vec<u32> {
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
