//! Invariants of the layer API, the KV cache and the masks, each checked against the plainest
//! computation of the same thing: a full causal forward from an empty cache.

mod common;

use common::TokenTree;
use common::{load_fixture, max_abs_diff, HF_FIXTURES};
use mirror_core::{AttentionInput, KvCache, Model, RowVisibility, Tensor};

const TOLERANCE: f32 = 1e-4;

fn fresh(model: &Model, tokens: &[u32]) -> Tensor {
    let mut cache = model.new_cache(1, 64).unwrap();
    model.forward_causal(tokens, &mut cache).unwrap()
}

fn last_row(logits: &Tensor) -> Tensor {
    let n = logits.dim(0).unwrap();
    logits.narrow(0, n - 1, 1).unwrap()
}

const PREFIX: [u32; 7] = [5, 17, 101, 3, 250, 44, 9];

#[test]
fn split_forward_equals_full_forward_for_every_exit_layer() {
    for name in HF_FIXTURES {
        let model = load_fixture(name);
        let expected = fresh(&model, &PREFIX);
        let n = model.num_layers();
        for exit_layer in 0..=n {
            let mut cache = model.new_cache(1, 64).unwrap();
            let input = AttentionInput::causal(1, PREFIX.len(), 0, model.device()).unwrap();
            let h = model.embed(&[&PREFIX]).unwrap();
            let h = model
                .forward_layers(&h, 0..exit_layer, &input, &mut cache)
                .unwrap();
            let h = model
                .forward_layers(&h, exit_layer..n, &input, &mut cache)
                .unwrap();
            let logits = model.logits(&h).unwrap().squeeze(0).unwrap();
            let diff = max_abs_diff(&logits, &expected);
            assert!(diff < TOLERANCE, "{name} exit {exit_layer}: {diff}");
            // And the cache it leaves behind serves the next token like a full forward's would.
            let next = model.forward_causal(&[7], &mut cache).unwrap();
            let mut full = PREFIX.to_vec();
            full.push(7);
            let diff = max_abs_diff(&next, &last_row(&fresh(&model, &full)));
            assert!(
                diff < TOLERANCE,
                "{name} exit {exit_layer} next token: {diff}"
            );
        }
    }
}

#[test]
fn truncate_rolls_back_exactly() {
    for name in HF_FIXTURES {
        let model = load_fixture(name);
        let mut cache = model.new_cache(1, 64).unwrap();
        model.forward_causal(&PREFIX, &mut cache).unwrap();
        model.forward_causal(&[11, 12, 13], &mut cache).unwrap();
        cache.truncate(PREFIX.len());
        let logits = model.forward_causal(&[99], &mut cache).unwrap();
        let mut expected_tokens = PREFIX.to_vec();
        expected_tokens.push(99);
        let diff = max_abs_diff(&logits, &last_row(&fresh(&model, &expected_tokens)));
        assert!(diff < TOLERANCE, "{name}: {diff}");
        assert_eq!(cache.len(), PREFIX.len() + 1);
    }
}

/// A tree over the prefix: two branches at the root, one of which forks again.
fn sample_tree() -> TokenTree {
    let mut tree = TokenTree::new();
    let a = tree.push(20, None).unwrap();
    let a1 = tree.push(21, Some(a)).unwrap();
    tree.push(22, Some(a1)).unwrap();
    tree.push(23, Some(a1)).unwrap();
    let b = tree.push(30, None).unwrap();
    tree.push(31, Some(b)).unwrap();
    tree
}

fn tree_pass(model: &Model, tree: &TokenTree) -> (Tensor, KvCache) {
    let mut cache = model.new_cache(1, 64).unwrap();
    model.forward_causal(&PREFIX, &mut cache).unwrap();
    let input = tree.attention_input(PREFIX.len(), model.device()).unwrap();
    let logits = model
        .forward(&[tree.tokens()], &input, &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap();
    (logits, cache)
}

#[test]
fn tree_pass_equals_separate_causal_passes_along_each_path() {
    let tree = sample_tree();
    for name in HF_FIXTURES {
        let model = load_fixture(name);
        let (logits, _) = tree_pass(&model, &tree);
        for node in 0..tree.len() {
            let mut path_tokens = PREFIX.to_vec();
            path_tokens.extend(tree.path_to(node).iter().map(|&n| tree.tokens()[n]));
            let expected = last_row(&fresh(&model, &path_tokens));
            let got = logits.narrow(0, node, 1).unwrap();
            let diff = max_abs_diff(&got, &expected);
            assert!(diff < TOLERANCE, "{name} node {node}: {diff}");
        }
    }
}

#[test]
fn compacting_an_accepted_path_then_continuing_equals_a_fresh_run() {
    let tree = sample_tree();
    for name in HF_FIXTURES {
        let model = load_fixture(name);
        for leaf in tree.leaves() {
            let (_, mut cache) = tree_pass(&model, &tree);
            let path = tree.path_to(leaf);
            let rows: Vec<usize> = path.iter().map(|&n| PREFIX.len() + n).collect();
            cache.compact(PREFIX.len(), &rows).unwrap();
            assert_eq!(cache.len(), PREFIX.len() + path.len());
            let logits = model.forward_causal(&[77, 78], &mut cache).unwrap();
            let mut tokens = PREFIX.to_vec();
            tokens.extend(path.iter().map(|&n| tree.tokens()[n]));
            tokens.extend([77, 78]);
            let expected = fresh(&model, &tokens);
            let n = expected.dim(0).unwrap();
            let diff = max_abs_diff(&logits, &expected.narrow(0, n - 2, 2).unwrap());
            assert!(diff < TOLERANCE, "{name} leaf {leaf}: {diff}");
        }
    }
}

#[test]
fn rows_with_their_own_visibility_equal_causal_runs() {
    // Branches grown in place after a linear window, as a draft does: row 0 continues after the
    // first window token, row 1 after the third; they share the cache, not each other's keys.
    let model = load_fixture("qwen2");
    let window = [40u32, 41, 42];
    let mut cache = model.new_cache(1, 64).unwrap();
    model.forward_causal(&PREFIX, &mut cache).unwrap();
    model.forward_causal(&window, &mut cache).unwrap();
    let base = cache.len();
    let rows = vec![
        RowVisibility {
            position: PREFIX.len() + 1,
            prefix_len: PREFIX.len() + 1,
            extra: vec![base],
        },
        RowVisibility {
            position: PREFIX.len() + 3,
            prefix_len: PREFIX.len() + 3,
            extra: vec![base + 1],
        },
    ];
    let input = AttentionInput::from_rows(&rows, base + 2, model.device()).unwrap();
    let logits = model
        .forward(&[&[50, 60]], &input, &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap();
    for (row, (cut, token)) in [(1usize, 50u32), (3, 60)].into_iter().enumerate() {
        let mut tokens = PREFIX.to_vec();
        tokens.extend_from_slice(&window[..cut]);
        tokens.push(token);
        let diff = max_abs_diff(
            &logits.narrow(0, row, 1).unwrap(),
            &last_row(&fresh(&model, &tokens)),
        );
        assert!(diff < TOLERANCE, "row {row}: {diff}");
    }
}

#[test]
fn batch_rows_equal_separate_runs() {
    for name in ["qwen3", "llama"] {
        let model = load_fixture(name);
        let rows: [&[u32]; 3] = [&[1, 2, 3, 4], &[9, 8, 7, 6], &[100, 200, 300, 50]];
        let mut cache = model.new_cache(3, 16).unwrap();
        let input = AttentionInput::causal(3, 4, 0, model.device()).unwrap();
        let logits = model.forward(&rows, &input, &mut cache).unwrap();
        // Then one more token per row through the batched cache.
        let input = AttentionInput::causal(3, 1, 4, model.device()).unwrap();
        let next = model
            .forward(&[&[5], &[5], &[5]], &input, &mut cache)
            .unwrap();
        for (b, row) in rows.iter().enumerate() {
            let expected = fresh(&model, row);
            let diff = max_abs_diff(&logits.get(b).unwrap(), &expected);
            assert!(diff < TOLERANCE, "{name} row {b}: {diff}");
            let mut longer = row.to_vec();
            longer.push(5);
            let diff = max_abs_diff(&next.get(b).unwrap(), &last_row(&fresh(&model, &longer)));
            assert!(diff < TOLERANCE, "{name} row {b} next: {diff}");
        }
        // A row taken out of the batch continues like a batch-1 run.
        let mut single = cache.select_batch_row(1).unwrap();
        let got = model.forward_causal(&[3], &mut single).unwrap();
        let diff = max_abs_diff(&got, &last_row(&fresh(&model, &[9, 8, 7, 6, 5, 3])));
        assert!(diff < TOLERANCE, "{name} selected row: {diff}");
    }
}

#[test]
fn deep_copy_is_independent() {
    let model = load_fixture("qwen2");
    let mut cache = model.new_cache(1, 32).unwrap();
    model.forward_causal(&PREFIX, &mut cache).unwrap();
    let mut copy = cache.deep_copy().unwrap();
    // Overwrite the original's tail, then continue from the copy.
    cache.truncate(3);
    model.forward_causal(&[1, 1, 1, 1], &mut cache).unwrap();
    let got = model.forward_causal(&[2], &mut copy).unwrap();
    let mut tokens = PREFIX.to_vec();
    tokens.push(2);
    assert!(max_abs_diff(&got, &last_row(&fresh(&model, &tokens))) < TOLERANCE);
}

#[test]
fn logit_comparisons_see_nan() {
    let device = candle_core::Device::Cpu;
    let a = Tensor::new(&[[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &device).unwrap();
    let mut values = vec![1.0f32, 2.0, 3.0, 4.0, f32::NAN, 6.0];
    let b = Tensor::from_vec(values.clone(), (2, 3), &device).unwrap();
    assert_eq!(max_abs_diff(&a, &b), f32::INFINITY);
    assert_eq!(max_abs_diff(&b, &a), f32::INFINITY);
    // A NaN first, where a fold starting from it would keep it.
    values[0] = f32::NAN;
    values[4] = 5.0;
    let c = Tensor::from_vec(values, (2, 3), &device).unwrap();
    assert_eq!(max_abs_diff(&a, &c), f32::INFINITY);
    // Matching infinities agree; mismatched ones do not.
    let inf = Tensor::new(&[f32::INFINITY, 1.0], &device).unwrap();
    let neg = Tensor::new(&[f32::NEG_INFINITY, 1.0], &device).unwrap();
    assert_eq!(max_abs_diff(&inf, &inf), 0.0);
    assert_eq!(max_abs_diff(&inf, &neg), f32::INFINITY);
    assert_eq!(max_abs_diff(&a, &a), 0.0);
}
