//! The draft side's bookkeeping, tested directly: for every branch `(row, token)` of a
//! hypothesis tree, resolving the tree to that outcome must give the same next window (tokens
//! and choices) as a fresh rollout from the same committed prefix on a draft that never saw the
//! tree, and must leave a cache that serves the window after it like the fresh draft's does.
//! Covered: complete branches at every row (compaction below the last row and at the bonus
//! row), partial branches completed at resolution, a branch cut by the position limit, the
//! draft's own bonus guess, an outcome outside the tree, greedy and sampled drafts, and a
//! greedy draft with lookahead tokens that its main row rejects.

mod common;

use std::sync::Arc;

use mirror_core::sampling::SamplingParams;
use mirror_core::{LookaheadConfig, Model};
use mirror_sd::mirror_scheduler::strategy::mirror::plan::BranchPlan;
use mirror_sd::mirror_scheduler::testing::{Drafter, TreeRequest};
use mirror_sd::mirror_scheduler::window::{DraftChoice, DraftWindow};
use mirror_sd::mirror_scheduler::{Reuse, StopSet};

const PROMPT: [u32; 6] = [5, 17, 101, 3, 250, 44];
const CAPACITY: usize = 256;
const STEP_SEED: u64 = 0x5eed;

fn sampled() -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
    }
}

/// A draft as Mirror's worker holds it before a tree: reset, prompt prefilled, and the current
/// window rolled out after the prompt. Returns the state and the window.
fn draft_after_rollout(
    model: &Arc<Model>,
    params: SamplingParams,
    position_limit: usize,
    stop_ids: &[u32],
    gamma: usize,
) -> (Drafter, DraftWindow) {
    let mut state = fresh_draft(model, params, position_limit, stop_ids);
    state.sync(&PROMPT[..PROMPT.len() - 1]).unwrap();
    let window = state.rollout(&PROMPT, gamma, 99).unwrap();
    (state, window)
}

/// A draft that never saw the tree.
fn fresh_draft(
    model: &Arc<Model>,
    params: SamplingParams,
    position_limit: usize,
    stop_ids: &[u32],
) -> Drafter {
    let mut state = Drafter::new(Arc::clone(model));
    state
        .reset(
            CAPACITY,
            position_limit,
            params,
            StopSet::from_tokens(stop_ids),
        )
        .unwrap();
    state
}

/// Same tokens, same kind of choice, and draft distributions equal up to the rounding that a
/// tree pass and a linear pass may differ by (NaN counts as a difference).
fn assert_same_window(tree: &DraftWindow, fresh: &DraftWindow, what: &str) {
    assert_eq!(tree.tokens, fresh.tokens, "{what}: tokens");
    assert_eq!(tree.choices.len(), tree.tokens.len(), "{what}: choices");
    assert_eq!(fresh.choices.len(), fresh.tokens.len(), "{what}: choices");
    for (j, (a, b)) in tree.choices.iter().zip(&fresh.choices).enumerate() {
        match (a, b) {
            (DraftChoice::PointMass, DraftChoice::PointMass) => {}
            (DraftChoice::Sampled(p), DraftChoice::Sampled(q)) => {
                let worst = common::max_abs_diff_slices(&p.to_dense(), &q.to_dense());
                assert!(
                    worst <= 1e-5,
                    "{what}: q at position {j} differs by {worst}"
                );
            }
            _ => panic!("{what}: choice {j} differs in kind: {a:?} vs {b:?}"),
        }
    }
}

/// The plan of a tree: for every row, a few candidates other than the draft's own token there.
fn plan(window: &DraftWindow, vocab: u32) -> Vec<BranchPlan> {
    let mut plans = Vec::new();
    for row in 0..=window.len() {
        let own = window.tokens.get(row).copied();
        let mut added = 0;
        for k in 0..vocab {
            let token = (row as u32 * 37 + k * 101 + 7) % vocab;
            if Some(token) == own
                || plans
                    .iter()
                    .any(|p: &BranchPlan| p.row == row && p.token == token)
            {
                continue;
            }
            plans.push(BranchPlan {
                row,
                token,
                priority: 1.0 / (1 + plans.len()) as f64,
            });
            added += 1;
            if added == 3 {
                break;
            }
        }
    }
    plans
}

struct Case {
    name: &'static str,
    model: Arc<Model>,
    params: SamplingParams,
    gamma: usize,
    /// Tokens each branch is drafted to before resolution (less than gamma: partial branches).
    tree_gamma: usize,
    branches_per_pass: usize,
    position_limit: usize,
    stop_ids: Vec<u32>,
    /// The resolution every planned branch must get.
    expected: Reuse,
}

fn check(case: &Case) {
    let name = case.name;
    let model = &case.model;
    let (gamma, limit, stops) = (case.gamma, case.position_limit, case.stop_ids.as_slice());
    let draft = || draft_after_rollout(model, case.params, limit, stops, gamma);
    // The tree is drafted to `tree_gamma` tokens a branch and resolved to `gamma`: the same
    // request but for the window length, so that `tree_gamma < gamma` leaves partial branches.
    let request = |plan: &[BranchPlan], gamma: usize| TreeRequest {
        window_start: PROMPT.len() - 1,
        plan: plan.to_vec(),
        gamma,
        step_seed: STEP_SEED,
    };
    let build = |state: &mut Drafter, context: &[u32], plan: &[BranchPlan]| {
        state
            .build_tree(
                context,
                &request(plan, case.tree_gamma),
                case.branches_per_pass,
                None,
            )
            .unwrap()
    };
    let (_, window) = draft();
    let mut context = PROMPT.to_vec();
    context.extend_from_slice(&window.tokens);
    let window_start = PROMPT.len() - 1;
    let plan = plan(&window, model.vocab_size() as u32);
    // The outcomes: every branch the tree drafts (the plan and the draft's own bonus guess), and
    // one correction that is not in it.
    let tree = build(&mut draft().0, &context, &plan);
    assert!(
        tree.len() > plan.len(),
        "{name}: the draft's bonus guess was not added"
    );
    let mut outcomes: Vec<(usize, u32)> = tree.iter().map(|b| (b.plan.row, b.plan.token)).collect();
    let outside = (0..model.vocab_size() as u32)
        .find(|&t| window.tokens.first() != Some(&t) && !outcomes.contains(&(0, t)))
        .unwrap();
    outcomes.push((0, outside));
    let mut seen = Vec::new();
    for (row, token) in outcomes {
        let what = format!("{name}: outcome (row {row}, token {token})");
        // Draft, tree, resolve: as the worker does it.
        let mut state = draft().0;
        let branches = build(&mut state, &context, &plan);
        let (next, resolution, _) = state
            .resolve(&context, &request(&plan, gamma), &branches, row, token)
            .unwrap();
        // The reference: no tree at all, a rollout from the committed prefix.
        let mut fresh = fresh_draft(model, case.params, limit, stops);
        let (want_next, fresh_resolution, _) = fresh
            .resolve(&context, &request(&plan, gamma), &[], row, token)
            .unwrap();
        assert_eq!(fresh_resolution, Reuse::Miss);
        assert_same_window(&next, &want_next, &what);
        let branch = branches
            .iter()
            .find(|b| b.plan.row == row && b.plan.token == token);
        let want = match branch {
            None => Reuse::Miss,
            Some(b) if b.window.is_empty() => Reuse::Miss,
            // A branch the position limit cut short, or a stop token ended, is complete.
            Some(b) if b.window.len() < case.tree_gamma => Reuse::Hit,
            Some(_) => case.expected,
        };
        assert_eq!(resolution, want, "{what}");
        seen.push(resolution);
        // The caches both drafts are left with serve the next window alike: the one after the
        // committed prefix, the correction and the whole new window.
        let mut committed = context[..window_start + row + 1].to_vec();
        committed.push(token);
        committed.extend_from_slice(&next.tokens);
        if committed.len() < limit {
            let after = state.rollout(&committed, gamma, 7).unwrap();
            let want_after = fresh.rollout(&committed, gamma, 7).unwrap();
            assert_same_window(&after, &want_after, &format!("{what}, the window after"));
        }
    }
    assert!(
        seen.contains(&case.expected),
        "{name}: no {:?} at all",
        case.expected
    );
    assert!(seen.contains(&Reuse::Miss), "{name}: no miss");
    eprintln!("{name}: {} outcomes, {seen:?}", seen.len());
}

fn fixture_draft(name: &str) -> Arc<Model> {
    common::tiny_model_threads();
    Arc::new(common::load_fixture(name))
}

#[test]
fn resolved_trees_equal_fresh_rollouts() {
    let llama = fixture_draft("llama");
    let qwen3 = fixture_draft("qwen3");
    let base = |name, model: &Arc<Model>, params| Case {
        name,
        model: Arc::clone(model),
        params,
        gamma: 3,
        tree_gamma: 3,
        branches_per_pass: 4,
        position_limit: CAPACITY,
        stop_ids: Vec::new(),
        expected: Reuse::Hit,
    };
    let cases = [
        // Complete branches, every row: compaction below the last row and at the bonus row.
        base("greedy, complete", &llama, SamplingParams::greedy()),
        base("sampled, complete", &qwen3, sampled()),
        Case {
            branches_per_pass: 100,
            ..base("sampled, one wave", &llama, sampled())
        },
        // Branches of one or two tokens, completed at resolution.
        Case {
            tree_gamma: 1,
            expected: Reuse::Partial,
            ..base("greedy, partial", &llama, SamplingParams::greedy())
        },
        Case {
            tree_gamma: 2,
            branches_per_pass: 3,
            expected: Reuse::Partial,
            ..base("sampled, partial", &qwen3, sampled())
        },
        // The position limit cuts the deeper rows' branches short (and some away).
        Case {
            position_limit: PROMPT.len() + 5,
            ..base("greedy, position limit", &llama, SamplingParams::greedy())
        },
    ];
    for case in &cases {
        check(case);
    }
}

#[test]
fn resolved_trees_equal_fresh_rollouts_with_stop_tokens() {
    let llama = fixture_draft("llama");
    // Stop at a token the greedy draft proposes after the prompt: branches end early on it.
    let (_, window) = draft_after_rollout(&llama, SamplingParams::greedy(), CAPACITY, &[], 3);
    let case = Case {
        name: "greedy, stop token",
        model: llama,
        params: SamplingParams::greedy(),
        gamma: 3,
        tree_gamma: 3,
        branches_per_pass: 4,
        position_limit: CAPACITY,
        stop_ids: vec![window.tokens[1]],
        expected: Reuse::Hit,
    };
    check(&case);
}

#[test]
fn resolved_trees_equal_fresh_rollouts_with_rejected_lookahead_tokens() {
    common::tiny_model_threads();
    let base = common::load_fixture("llama");
    let config = LookaheadConfig {
        tokens: 2,
        layers: 2,
        rank: 4,
    };
    let head = common::random_head(config, base.hidden_size(), 5);
    // Random lookahead rows propose mostly wrong tokens: a greedy draft checks each step's
    // lookahead tokens against its main row and drops them, so branches hold rows of rejected tokens
    // until the tree is resolved. (Drafter proposes every lookahead token: confidence 0.)
    let model = Arc::new(base.with_lookahead(Arc::new(head)).unwrap());
    for (params, tree_gamma, expected) in [
        (SamplingParams::greedy(), 4, Reuse::Hit),
        (SamplingParams::greedy(), 2, Reuse::Partial),
        (sampled(), 4, Reuse::Hit),
    ] {
        let case = Case {
            name: "lookahead",
            model: Arc::clone(&model),
            params,
            gamma: 4,
            tree_gamma,
            branches_per_pass: 4,
            position_limit: CAPACITY,
            stop_ids: Vec::new(),
            expected,
        };
        check(&case);
    }
    // The greedy draft did reject lookahead tokens: fewer tokens per step than it proposes.
    let mut state = fresh_draft(&model, SamplingParams::greedy(), CAPACITY, &[]);
    state.take_counters();
    state.rollout(&PROMPT, 8, 0).unwrap();
    let counters = state.take_counters();
    let eta = counters.tokens as f64 / counters.steps as f64;
    eprintln!("lookahead: eta {eta:.2} over {} steps", counters.steps);
    assert!(eta < 3.0, "no lookahead token was rejected (eta {eta})");
}
