//! Mirror's target side: the prefix of the target's layers with the early-exit tap, the suffix,
//! and the verdict with the overlap mass Omega.

use std::sync::Arc;

use candle_core::Tensor;
use mirror_core::sampling;
use mirror_core::{AttentionInput, KvCache, Model};
use rand::Rng;

use super::plan::{overlap_mass, plan_branches, AcceptanceEstimate, BranchPlan};
use crate::constraint::TokenMask;
use crate::error::Result;
use crate::generation::GenerationConfig;
use crate::host::host_rows;
use crate::verify::verify_window;
use crate::window::{DraftWindow, Verdict};

/// The target's half of Mirror, and the settings of a run.
pub(crate) struct TargetSide {
    pub target: Arc<Model>,
    pub gamma: usize,
    pub kappa: usize,
    pub early_exit_layer: usize,
    /// Lookahead tokens of the draft (a step feeds up to `1 + draft_lookahead` rows a branch).
    pub draft_lookahead: usize,
}

/// The target's prefix `[0, l_e)` over a window, and what its early-exit tap says.
pub(crate) struct Tapped {
    /// Cache rows before the window.
    pub base: usize,
    input: AttentionInput,
    /// Hidden states after layer `l_e`.
    exit_states: Tensor,
    /// Early-exit top-kappa of every window row.
    top_k: Vec<Vec<(u32, f32)>>,
    /// Branches to draft, most likely first.
    pub plan: Vec<BranchPlan>,
}

impl TargetSide {
    /// Rows of the draft's cache a tree may take beyond the sequence: planned branches plus
    /// the bonus guess, each fed at most gamma times; a step of a draft with lookahead feeds
    /// up to `1 + lookahead` rows (lookahead tokens the main row rejects keep their rows until
    /// the tree is resolved).
    pub fn tree_cache_rows(&self) -> usize {
        tree_cache_rows(self.gamma, self.kappa, self.draft_lookahead)
    }

    /// Prefix and tap: the target runs its first `l_e` layers over the window, applies its
    /// final norm and LM head there, and plans the branches from the top-kappa of every row.
    pub fn prefix_and_tap(
        &self,
        cache: &mut KvCache,
        seq: &[u32],
        window: &DraftWindow,
        acceptance: &AcceptanceEstimate,
        masks: Option<&[TokenMask]>,
    ) -> Result<Tapped> {
        let base = cache.len();
        let mut fed = vec![seq[seq.len() - 1]];
        fed.extend_from_slice(&window.tokens);
        let input = AttentionInput::causal(1, fed.len(), base, self.target.device())?;
        let states = self.target.embed(&[&fed])?;
        let exit_states =
            self.target
                .forward_layers(&states, 0..self.early_exit_layer, &input, cache)?;
        let mut rows = host_rows(&self.target.logits(&exit_states)?)?;
        // Under a constraint the candidates are what the grammar allows at each row.
        for (row, mask) in rows.iter_mut().zip(masks.into_iter().flatten()) {
            mask.apply(row);
        }
        let top_k = candidates(&rows, self.kappa);
        let plan = plan_branches(&top_k, &window.tokens, acceptance);
        Ok(Tapped {
            base,
            input,
            exit_states,
            top_k,
            plan,
        })
    }

    /// The hidden states after layer `l_e` at each window row, on the host (what the latent
    /// monitor reads under Mirror: the tap's own states, no extra forward).
    pub fn exit_rows(&self, tapped: &Tapped) -> Result<Vec<Vec<f32>>> {
        host_rows(&tapped.exit_states)
    }

    /// Suffix: the target's layers `[l_e, N)` and its final distributions, while the draft
    /// drafts the tree.
    pub fn suffix(&self, cache: &mut KvCache, tapped: &Tapped) -> Result<Vec<Vec<f32>>> {
        let layers = self.early_exit_layer..self.target.num_layers();
        let states =
            self.target
                .forward_layers(&tapped.exit_states, layers, &tapped.input, cache)?;
        host_rows(&self.target.logits(&states)?)
    }
}

/// Rows of the draft's cache a tree may take beyond the sequence, for windows of `gamma`
/// tokens, `kappa` candidates a row and a draft of `lookahead` lookahead tokens (see
/// [`TargetSide::tree_cache_rows`]).
pub(crate) fn tree_cache_rows(gamma: usize, kappa: usize, lookahead: usize) -> usize {
    let branches = kappa * (gamma + 1) + 1;
    branches * gamma * (1 + lookahead) + gamma + 2
}

/// The early-exit candidates of every tapped row: its top-`kappa` (token, log-prob) pairs,
/// most likely first, without the tokens a mask ruled out.
pub(crate) fn candidates(rows: &[Vec<f32>], kappa: usize) -> Vec<Vec<(u32, f32)>> {
    rows.iter()
        .map(|row| {
            let mut top = sampling::top_k_log_probs(row, kappa);
            top.retain(|&(_, log_prob)| log_prob.is_finite());
            top
        })
        .collect()
}

/// The overlap mass Omega of the final distribution at the row that decided `verdict` on the
/// early-exit candidates there.
pub(crate) fn omega(rows: &[Vec<f32>], verdict: &Verdict, top_k: &[Vec<(u32, f32)>]) -> f64 {
    let (Some(row), Some(candidates)) = (rows.get(verdict.accepted), top_k.get(verdict.accepted))
    else {
        return 0.0;
    };
    let final_probs: Vec<f32> = sampling::log_softmax(row)
        .into_iter()
        .map(f32::exp)
        .collect();
    overlap_mass(&final_probs, candidates)
}

/// The target's verdict on the window, and the overlap mass Omega of its distribution at the
/// deciding row on the early-exit candidates there.
pub(crate) fn verify(
    config: &GenerationConfig,
    rows: &[Vec<f32>],
    window: &DraftWindow,
    tapped: &Tapped,
    rng: &mut rand::rngs::StdRng,
) -> Result<(Verdict, f64)> {
    let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
    let verdict = verify_window(&refs, window, &config.sampling, &mut || rng.random())?;
    let omega = omega(rows, &verdict, &tapped.top_k);
    Ok((verdict, omega))
}
