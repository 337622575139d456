//! The acceptance rules of speculative sampling, and the distributions a rejected token's
//! replacement is drawn from.

use super::probs::Probs;

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
