//! Parity with Hugging Face transformers: logits of tiny random checkpoints of every supported
//! architecture (written by `scripts/make_fixtures.py`) for every position, within 1e-4.

mod common;

use common::{load_fixture, max_abs_diff, reference, reference_tokens, HF_FIXTURES};
use mirror_core::{AttentionInput, Tensor};

const TOLERANCE: f32 = 1e-4;

#[test]
fn full_sequence_logits_match_transformers() {
    for name in HF_FIXTURES {
        let model = load_fixture(name);
        let reference = reference(name);
        for i in 0..3 {
            let tokens = reference_tokens(&reference, i);
            let mut cache = model.new_cache(1, 32).unwrap();
            let logits = model.forward_causal(&tokens, &mut cache).unwrap();
            let diff = max_abs_diff(&logits, &reference[&format!("logits_{i}")]);
            assert!(diff < TOLERANCE, "{name} sequence {i}: max |diff| {diff}");
        }
    }
}

#[test]
fn incremental_decoding_matches_transformers() {
    // Prefill a prefix, then feed one token at a time through the KV cache.
    for name in HF_FIXTURES {
        let model = load_fixture(name);
        let reference = reference(name);
        let tokens = reference_tokens(&reference, 2);
        let expected = &reference["logits_2"];
        let mut cache = model.new_cache(1, 32).unwrap();
        let prefix = 5;
        let mut rows = vec![model.forward_causal(&tokens[..prefix], &mut cache).unwrap()];
        for t in prefix..tokens.len() {
            rows.push(model.forward_causal(&tokens[t..t + 1], &mut cache).unwrap());
        }
        let logits = Tensor::cat(&rows, 0).unwrap();
        let diff = max_abs_diff(&logits, expected);
        assert!(diff < TOLERANCE, "{name}: max |diff| {diff}");
    }
}

#[test]
fn early_exit_tap_matches_transformers_hidden_state_through_norm_and_head() {
    for name in HF_FIXTURES {
        let model = load_fixture(name);
        let reference = reference(name);
        for i in 0..3 {
            let tokens = reference_tokens(&reference, i);
            let mut cache = model.new_cache(1, 32).unwrap();
            let input = AttentionInput::causal(1, tokens.len(), 0, model.device()).unwrap();
            let hidden = model.embed(&[&tokens]).unwrap();
            let exit_layer = model.num_layers() / 2;
            let hidden = model
                .forward_layers(&hidden, 0..exit_layer, &input, &mut cache)
                .unwrap();
            let tap = model.logits(&hidden).unwrap().squeeze(0).unwrap();
            let diff = max_abs_diff(&tap, &reference[&format!("early_exit_logits_{i}")]);
            assert!(diff < TOLERANCE, "{name} sequence {i}: max |diff| {diff}");
        }
    }
}
