//! Verification of a drafted window against the target's distributions: pure functions over
//! `&[f32]`, tested without tensors.
//!
//! Greedy: accept while the draft token is the target's argmax; the correction is the argmax at
//! the first mismatch (or the bonus after a fully accepted window). Sampling: a token the draft
//! sampled from `q` is accepted with probability `min(1, p(x)/q(x))`, and on rejection the
//! correction is drawn from `normalize(max(0, p - q))`; a deterministic draft token (greedy draft)
//! has a point-mass `q`, so it is accepted with probability `p(x)` and the correction is drawn
//! from `p` without `x`. Both keep the target's distribution exactly.

use mirror_core::sampling::{self, SamplingParams};

use crate::error::{Error, Result};
use crate::window::{DraftChoice, DraftWindow, Verdict};

/// Checks that `window` can be verified against `target_logits`: one choice per token, one row
/// more than tokens, rows of one vocabulary, tokens and draft distributions within it.
fn check_window(target_logits: &[&[f32]], window: &DraftWindow) -> Result<()> {
    let bad = |reason: String| Err(Error::InvalidWindow(reason));
    if window.tokens.len() != window.choices.len() {
        return bad(format!(
            "{} tokens but {} choices",
            window.tokens.len(),
            window.choices.len()
        ));
    }
    if target_logits.len() != window.len() + 1 {
        return bad(format!(
            "{} target rows for {} tokens (one more row than tokens is needed)",
            target_logits.len(),
            window.len()
        ));
    }
    let vocab = target_logits[0].len();
    if vocab == 0 || target_logits.iter().any(|row| row.len() != vocab) {
        return bad("target rows are empty or of different lengths".into());
    }
    if let Some(q) = window.refused.as_ref().filter(|q| q.len() != vocab) {
        return bad(format!(
            "the refused proposal's distribution covers {} tokens, the target {vocab}",
            q.len()
        ));
    }
    for (j, (&token, choice)) in window.tokens.iter().zip(&window.choices).enumerate() {
        if token as usize >= vocab {
            return bad(format!(
                "token {token} at position {j} is outside the vocabulary of {vocab}"
            ));
        }
        if let DraftChoice::Sampled(q) = choice {
            if q.len() != vocab {
                return bad(format!(
                    "the draft distribution at position {j} covers {} tokens, the target {vocab}",
                    q.len()
                ));
            }
        }
    }
    Ok(())
}

/// Verifies `window` against target logits `target_logits[j]` (the distribution after the
/// window's first `j` tokens; `window.len() + 1` rows). `uniform` yields numbers in `[0, 1)`.
/// An inconsistent window (see [`Error::InvalidWindow`]) is an error.
pub fn verify_window(
    target_logits: &[&[f32]],
    window: &DraftWindow,
    params: &SamplingParams,
    uniform: &mut dyn FnMut() -> f64,
) -> Result<Verdict> {
    check_window(target_logits, window)?;
    if params.is_greedy() {
        for (j, &w) in window.tokens.iter().enumerate() {
            let best = sampling::argmax(target_logits[j]);
            if best != w {
                return Ok(Verdict {
                    accepted: j,
                    token: best,
                });
            }
        }
        let last = window.len();
        return Ok(Verdict {
            accepted: last,
            token: sampling::argmax(target_logits[last]),
        });
    }
    for (j, (&w, choice)) in window.tokens.iter().zip(&window.choices).enumerate() {
        let p = sampling::warp_probs(target_logits[j], params);
        let u = uniform();
        let accept = match choice {
            DraftChoice::PointMass => sampling::accept_deterministic(&p, w, u),
            DraftChoice::Sampled(q) => sampling::accept_sampled(&p, q, w, u),
        };
        if !accept {
            let rest = match choice {
                DraftChoice::PointMass => sampling::without_token(&p, w),
                DraftChoice::Sampled(q) => sampling::residual(&p, q),
            };
            return Ok(Verdict {
                accepted: j,
                token: rest.sample(uniform()),
            });
        }
    }
    let last = window.len();
    let p = sampling::warp_probs(target_logits[last], params);
    let p = match &window.refused {
        Some(q) => sampling::residual(&p, q),
        None => p,
    };
    Ok(Verdict {
        accepted: last,
        token: p.sample(uniform()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn logits_of(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    #[test]
    fn greedy_accepts_prefix_then_corrects() {
        let rows = [
            vec![0.0, 5.0, 1.0],
            vec![3.0, 0.0, 1.0],
            vec![0.0, 0.0, 9.0],
        ];
        let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
        let window = DraftWindow {
            tokens: vec![1, 2],
            choices: vec![DraftChoice::PointMass; 2],
            refused: None,
        };
        let mut u = || 0.5;
        let v = verify_window(&refs, &window, &SamplingParams::greedy(), &mut u).unwrap();
        assert_eq!(
            v,
            Verdict {
                accepted: 1,
                token: 0
            }
        );
        let window = DraftWindow {
            tokens: vec![1, 0],
            choices: vec![DraftChoice::PointMass; 2],
            refused: None,
        };
        let v = verify_window(&refs, &window, &SamplingParams::greedy(), &mut u).unwrap();
        assert_eq!(
            v,
            Verdict {
                accepted: 2,
                token: 2
            }
        );
    }

    /// Monte Carlo: the first committed token must be distributed as p, for sampled and
    /// deterministic drafts alike (compared with p itself, an independent reference).
    #[test]
    fn first_token_is_distributed_as_the_target() {
        let p = [0.5f32, 0.3, 0.15, 0.05];
        let q = [0.1f32, 0.6, 0.1, 0.2];
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        };
        let target = [logits_of(&p), logits_of(&[0.25; 4])];
        let refs: Vec<&[f32]> = target.iter().map(|r| r.as_slice()).collect();
        let mut rng = StdRng::seed_from_u64(7);
        let n = 200_000;
        for deterministic in [false, true] {
            let mut counts = [0usize; 4];
            for _ in 0..n {
                let (w, choice) = if deterministic {
                    (1, DraftChoice::PointMass)
                } else {
                    let x = mirror_core::sampling::sample(&q, rng.random());
                    (x, DraftChoice::Sampled(q.to_vec().into()))
                };
                let window = DraftWindow {
                    tokens: vec![w],
                    choices: vec![choice],
                    refused: None,
                };
                let mut u = || rng.random::<f64>();
                let v = verify_window(&refs, &window, &params, &mut u).unwrap();
                let first = if v.accepted == 1 { w } else { v.token };
                counts[first as usize] += 1;
            }
            assert_frequencies_match(&counts, &p, &format!("deterministic={deterministic}"));
        }
    }

    /// A sampled proposal a constraint refuses (token 3, which the masked target gives no
    /// mass) cuts the window before it; the row before it must still decide as its rejection
    /// would, so the first token stays distributed as p. Plain truncation would draw from p
    /// itself there and give token 1 a frequency of 0.39 instead of 0.3.
    #[test]
    fn a_refused_proposal_keeps_the_first_token_distributed_as_the_target() {
        let p = [0.5f32, 0.3, 0.2, 0.0];
        let q = [0.1f32, 0.6, 0.0, 0.3];
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        };
        let masked: Vec<f32> = p.iter().map(|&x| x.ln()).collect();
        let target = [masked.clone(), masked];
        let mut rng = StdRng::seed_from_u64(11);
        let n = 200_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            let x = mirror_core::sampling::sample(&q, rng.random());
            let mut window = DraftWindow {
                tokens: vec![x],
                choices: vec![DraftChoice::Sampled(q.to_vec().into())],
                refused: None,
            };
            if x == 3 {
                window.refuse_from(0);
            }
            let refs: Vec<&[f32]> = target[..window.len() + 1]
                .iter()
                .map(|r| r.as_slice())
                .collect();
            let v = verify_window(&refs, &window, &params, &mut || rng.random::<f64>()).unwrap();
            let first = if v.accepted == 1 { x } else { v.token };
            counts[first as usize] += 1;
        }
        assert_frequencies_match(&counts, &p, "refused");
    }

    /// Each token's frequency within 5 standard deviations of a binomial frequency of `p`.
    fn assert_frequencies_match(counts: &[usize], p: &[f32], label: &str) {
        let n = counts.iter().sum::<usize>() as f64;
        for (i, (&c, &p)) in counts.iter().zip(p).enumerate() {
            let (freq, p) = (c as f64 / n, p as f64);
            let sd = (p * (1.0 - p) / n).sqrt();
            assert!(
                (freq - p).abs() <= 5.0 * sd,
                "{label} token {i}: {freq} vs {p}"
            );
        }
    }

    #[test]
    fn inconsistent_windows_are_typed_errors() {
        let rows = [vec![0.0f32, 1.0, 2.0], vec![2.0, 1.0, 0.0], vec![1.0; 3]];
        let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        };
        let q = || DraftChoice::Sampled(vec![0.2f32, 0.3, 0.5].into());
        let cases = [
            // Tokens and choices of different lengths (zipping would drop a token).
            (refs.as_slice(), vec![1, 2], vec![q()], "choices"),
            (refs.as_slice(), vec![1], vec![q(), q()], "choices"),
            // Rows that do not match the window.
            (&refs[..2], vec![1, 2], vec![q(), q()], "rows"),
            // A token outside the vocabulary.
            (refs.as_slice(), vec![1, 3], vec![q(), q()], "vocabulary"),
            // A draft distribution over another vocabulary.
            (
                refs.as_slice(),
                vec![1, 2],
                vec![q(), DraftChoice::Sampled(vec![0.5f32, 0.5].into())],
                "covers",
            ),
        ];
        for (rows, tokens, choices, what) in cases {
            let window = DraftWindow {
                tokens,
                choices,
                refused: None,
            };
            for params in [params, SamplingParams::greedy()] {
                let err = verify_window(rows, &window, &params, &mut || 0.5).unwrap_err();
                assert!(
                    matches!(&err, Error::InvalidWindow(m) if m.contains(what)),
                    "{what}: {err}"
                );
            }
        }
    }
}
