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
