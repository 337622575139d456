//! From logits to the distribution a model samples from: temperature, top-k, top-p.

use super::logits::{argmax, top_k_indices};
use super::probs::Probs;

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
