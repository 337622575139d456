//! What a speculation window is: the drafted tokens, how each was chosen, where they came
//! from, and the target's verdict on them. Data only; [`crate::verify`] judges windows and
//! [`crate::adaptive`] sizes them.

use mirror_core::sampling::Probs;

/// How the draft chose a proposed token.
#[derive(Debug, Clone, PartialEq)]
pub enum DraftChoice {
    /// Deterministically (argmax): a point mass.
    PointMass,
    /// Sampled from this distribution (after the same warp as the target's; sparse when the
    /// warp left few tokens).
    Sampled(Probs),
}

/// A drafted window: tokens and how each was chosen.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DraftWindow {
    /// Proposed tokens `w_1..w_gamma`.
    pub tokens: Vec<u32>,
    /// How each token was chosen (same length as `tokens`; [`crate::verify::verify_window`] rejects a window
    /// where they differ).
    pub choices: Vec<DraftChoice>,
    /// The distribution of a sampled proposal that came right after `tokens` and was refused
    /// without a target comparison (by a constraint, see [`DraftWindow::refuse_from`]): the row
    /// after the window then draws from the residual `p - q`, as that proposal's rejection would.
    pub refused: Option<Probs>,
}

impl DraftWindow {
    /// Number of proposed tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// True when nothing is proposed.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Keeps the first `len` proposals. A cut for room or length is not a refusal: it forgets
    /// any [`DraftWindow::refused`] proposal, and the row after the window draws from the
    /// target's own distribution.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len() {
            self.refused = None;
        }
        self.tokens.truncate(len);
        self.choices.truncate(len);
    }

    /// Cuts the window before proposal `index`, which was refused without a target comparison
    /// (a constraint forbids it). Its rejection is certain (the masked target gives it no
    /// mass), so the row before it decides as that rejection would: from the residual of its
    /// sampling distribution, or from the target's distribution for a point mass (where the
    /// two agree). Cutting at the first refused proposal is a stopping rule, so the window
    /// stays lossless.
    pub fn refuse_from(&mut self, index: usize) {
        if index >= self.len() {
            return;
        }
        let refused = match &self.choices[index] {
            DraftChoice::Sampled(q) => Some(q.clone()),
            DraftChoice::PointMass => None,
        };
        self.truncate(index);
        self.refused = refused;
    }
}

/// The outcome of verifying one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Number of draft tokens accepted (A).
    pub accepted: usize,
    /// The target's token after them: the correction, or the bonus when all were accepted.
    pub token: u32,
}

impl Verdict {
    /// The tokens this verdict commits after a window of `drafted` tokens: the accepted ones,
    /// then the target's own token. The one place where a commit is computed, for the target's
    /// sequence and the draft's alike.
    pub fn committed(&self, drafted: &[u32]) -> Vec<u32> {
        let mut tokens = drafted[..self.accepted.min(drafted.len())].to_vec();
        tokens.push(self.token);
        tokens
    }
}

/// Where a window's tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The draft model.
    Model,
    /// Prompt lookup (point masses).
    Lookup,
}

impl Source {
    pub(crate) fn index(self) -> usize {
        match self {
            Source::Model => 0,
            Source::Lookup => 1,
        }
    }

    pub(crate) fn other(self) -> Source {
        match self {
            Source::Model => Source::Lookup,
            Source::Lookup => Source::Model,
        }
    }
}
