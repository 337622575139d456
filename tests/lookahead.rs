//! Lookahead tokens: the lookahead pass against an independent computation through the cached
//! attention path, the main row untouched, checkpoints, and training that must learn.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use mirror_sd::mirror_core::training::{freeze, FrozenSequence, LookaheadTrainer, TrainSettings};
use mirror_sd::mirror_core::{
    AttentionInput, Error, Kernels, LookaheadConfig, LookaheadHead, Model, RowVisibility,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Lookahead logits recomputed the slow way: the main rows through every layer (cached), then the
/// lookahead rows, as extra "tree nodes" with hand-written visibility, through the top layers of the
/// ordinary cached forward, rolled back afterwards.
fn reference_lookahead(
    model: &Model,
    head: &LookaheadHead,
    prefix: &[u32],
    fed: &[u32],
    anchors: &[usize],
) -> Vec<Vec<f32>> {
    let count = head.config().tokens;
    let split = model.num_layers() - head.config().layers;
    let mut cache = model.new_cache(1, 64).unwrap();
    model.forward_causal(prefix, &mut cache).unwrap();
    let base = cache.len();
    let input = AttentionInput::causal(1, fed.len(), base, model.device()).unwrap();
    let hidden = model.embed(&[fed]).unwrap();
    let middle = model
        .forward_layers(&hidden, 0..split, &input, &mut cache)
        .unwrap();
    model
        .forward_layers(&middle, split..model.num_layers(), &input, &mut cache)
        .unwrap();
    let after_main = base + fed.len();
    let mut rows = Vec::new();
    let mut states = Vec::new();
    for (a, &anchor) in anchors.iter().enumerate() {
        let anchor_state = middle.narrow(1, anchor, 1).unwrap();
        let init = head.initial_states(&anchor_state).unwrap();
        for j in 1..=count {
            let own: Vec<usize> = (1..=j).map(|i| after_main + a * count + i - 1).collect();
            rows.push(RowVisibility {
                position: base + anchor + j,
                prefix_len: base + anchor + 1,
                extra: own,
            });
            states.push(init.narrow(1, j - 1, 1).unwrap());
        }
    }
    let states = Tensor::cat(&states, 1).unwrap();
    // Layers below the split see nothing of the lookahead rows: give them the same length by hand.
    let input = AttentionInput::from_rows(&rows, after_main + rows.len(), model.device()).unwrap();
    let mut top_cache = cache.deep_copy().unwrap();
    let out = model
        .forward_layers(&states, split..model.num_layers(), &input, &mut top_cache)
        .unwrap();
    model
        .logits(&out)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

/// NaN-aware (a NaN is an infinite difference).
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    common::max_abs_diff_slices(a, b)
}

#[test]
fn lookahead_pass_matches_the_cached_path_and_leaves_the_main_row_alone() {
    for fixture in ["llama", "qwen2", "qwen3"] {
        let base = common::load_fixture(fixture);
        let config = LookaheadConfig {
            tokens: 3,
            layers: 2,
            rank: 4,
        };
        let head = common::random_head(config, base.hidden_size(), 7);
        let model = base.with_lookahead(Arc::new(head.clone())).unwrap();
        let prefix = [5u32, 17, 33, 2, 90];
        let fed = [11u32, 12, 13, 14];
        let anchors = [1usize, 3];
        let mut cache = model.new_cache(1, 64).unwrap();
        model.forward_causal(&prefix, &mut cache).unwrap();
        let input = AttentionInput::causal(1, fed.len(), cache.len(), model.device()).unwrap();
        let out = model
            .forward_with_lookahead(&fed, &input, &mut cache, &[0, 1, 2, 3], &anchors)
            .unwrap();
        assert_eq!(
            cache.len(),
            prefix.len() + fed.len(),
            "lookahead K/V were cached"
        );

        // Main row: the base model's logits (to float rounding: the LM head runs over main
        // and lookahead rows in one matmul, whose blocking depends on the row count).
        let mut base_cache = base.new_cache(1, 64).unwrap();
        base.forward_causal(&prefix, &mut base_cache).unwrap();
        let expected = base.forward_causal(&fed, &mut base_cache).unwrap();
        let d = common::max_abs_diff(&out.main, &expected);
        assert!(d < 1e-5, "{fixture}: the main row changed by {d}");

        // Lookahead rows: the independent cached-path computation.
        let reference = reference_lookahead(&base, &head, &prefix, &fed, &anchors);
        let got = out.lookahead.to_vec3::<f32>().unwrap();
        for (a, per_anchor) in got.iter().enumerate() {
            for (j, logits) in per_anchor.iter().enumerate() {
                let d = max_diff(logits, &reference[a * 3 + j]);
                assert!(
                    d < 1e-4,
                    "{fixture}: anchor {a} lookahead {j} differs by {d}"
                );
            }
        }
    }
}

#[test]
fn zero_initialised_lookahead_drafts_exactly_like_the_base_model() {
    let base = common::load_fixture("qwen2");
    let config = LookaheadConfig {
        tokens: 2,
        layers: 1,
        rank: 2,
    };
    let head = LookaheadHead::zeros(config, base.hidden_size(), DType::F32, &Device::Cpu).unwrap();
    let model = base.with_lookahead(Arc::new(head)).unwrap();
    // Greedy chains of the main row, one token per step, with and without lookahead.
    let mut tokens_base = vec![3u32, 9, 27];
    let mut tokens_ss = tokens_base.clone();
    let mut cache_base = base.new_cache(1, 64).unwrap();
    let mut cache_ss = model.new_cache(1, 64).unwrap();
    let mut feed_base = tokens_base.clone();
    let mut feed_ss = tokens_ss.clone();
    for _ in 0..10 {
        let logits = base.next_token_logits(&feed_base, &mut cache_base).unwrap();
        let input =
            AttentionInput::causal(1, feed_ss.len(), cache_ss.len(), model.device()).unwrap();
        let last = feed_ss.len() - 1;
        let out = model
            .forward_with_lookahead(&feed_ss, &input, &mut cache_ss, &[last], &[last])
            .unwrap();
        let main = out.main.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Equal to float rounding (one LM-head matmul over main and lookahead rows), and the same
        // greedy choice.
        assert!(max_diff(&logits, &main) < 1e-5);
        let next = mirror_sd::mirror_core::sampling::argmax(&logits);
        assert_eq!(next, mirror_sd::mirror_core::sampling::argmax(&main));
        tokens_base.push(next);
        tokens_ss.push(next);
        feed_base = vec![next];
        feed_ss = vec![next];
    }
    assert_eq!(tokens_base, tokens_ss);
}

#[test]
fn differentiable_kernels_compute_the_same_lookahead_rows() {
    let model = common::load_fixture("qwen3");
    let config = LookaheadConfig {
        tokens: 2,
        layers: 2,
        rank: 3,
    };
    let head = common::random_head(config, model.hidden_size(), 3);
    let tokens: Vec<u32> = (0..12).map(|i| (i * 7 + 1) % 300).collect();
    let frozen = freeze(&model, 2, &tokens).unwrap();
    let mut cache = model.new_cache(1, 16).unwrap();
    let input = AttentionInput::causal(1, tokens.len(), 0, model.device()).unwrap();
    model
        .forward_layers(
            &frozen.middle.unsqueeze(0).unwrap(),
            1..3,
            &input,
            &mut cache,
        )
        .unwrap();
    let anchors = frozen.middle.narrow(0, 4, 3).unwrap().unsqueeze(0).unwrap();
    let mask: Vec<f32> = (4..7)
        .flat_map(|a| (0..12).map(move |k| if k <= a { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (3, 12), &Device::Cpu).unwrap();
    let input =
        mirror_sd::mirror_core::lookahead_attention(&[4, 5, 6], Some(&mask), 12, 2, &Device::Cpu)
            .unwrap();
    let fused = model
        .lookahead_hidden(&head, &anchors, &input, &cache, Kernels::Fused)
        .unwrap();
    let autograd = model
        .lookahead_hidden(&head, &anchors, &input, &cache, Kernels::Autograd)
        .unwrap();
    let d = common::max_abs_diff(&fused, &autograd);
    assert!(d < 1e-4, "kernels differ by {d}");
}

#[test]
fn lookahead_checkpoints_round_trip_and_bad_ones_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = LookaheadConfig {
        tokens: 2,
        layers: 2,
        rank: 4,
    };
    let head = common::random_head(config.clone(), 32, 11);
    let path = dir.path().join("streams.safetensors");
    head.save(&path, &HashMap::new()).unwrap();
    let loaded = LookaheadHead::load(&path, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(loaded.config(), &config);
    for (a, b) in head.tensors().iter().zip(loaded.tensors()) {
        assert_eq!(common::max_abs_diff(a, b), 0.0);
    }
    // Missing, truncated, and the wrong model.
    let missing = LookaheadHead::load(&dir.path().join("nope"), DType::F32, &Device::Cpu);
    assert!(
        matches!(missing, Err(Error::MissingFile { .. })),
        "{missing:?}"
    );
    let bytes = std::fs::read(&path).unwrap();
    let torn = dir.path().join("torn.safetensors");
    std::fs::write(&torn, &bytes[..bytes.len() / 2]).unwrap();
    let torn = LookaheadHead::load(&torn, DType::F32, &Device::Cpu);
    assert!(matches!(torn, Err(Error::CorruptFile { .. })), "{torn:?}");
    let wide = common::load_fixture("llama"); // hidden 32, 3 layers: fits
    assert!(wide.with_lookahead(Arc::new(loaded.clone())).is_ok());
    let narrow_head = common::random_head(config, 16, 1);
    let err = wide.with_lookahead(Arc::new(narrow_head));
    assert!(matches!(err, Err(Error::InvalidArgument(_))), "{err:?}");
}

/// Sequences that follow a fixed random permutation of the vocabulary: the token two places
/// ahead is a function of the current one, so a working lookahead token 1 can learn it exactly.
fn permutation_corpus(vocab: u32, count: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut next: Vec<u32> = (0..vocab).collect();
    for i in (1..next.len()).rev() {
        next.swap(i, rng.random_range(0..=i));
    }
    (0..count)
        .map(|_| {
            let mut t = rng.random_range(0..vocab);
            (0..len)
                .map(|_| {
                    let out = t;
                    t = next[t as usize];
                    out
                })
                .collect()
        })
        .collect()
}

#[test]
fn training_learns_a_pattern_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = 24;
    let model = common::random_model(dir.path(), "llama", vocab, 3, 5);
    let config = LookaheadConfig {
        tokens: 2,
        layers: 2,
        rank: 16,
    };
    let corpus = permutation_corpus(vocab as u32, 40, 16, 1);
    let frozen: Vec<FrozenSequence> = corpus
        .iter()
        .map(|t| freeze(&model, config.layers, t).unwrap())
        .collect();
    let (train, held_out) = frozen.split_at(32);
    let mut settings = TrainSettings::new(2, 42);
    settings.learning_rate = 2e-2;
    settings.anchors_per_step = 8;
    let mut trainer = LookaheadTrainer::new(&model, config.clone(), settings.clone()).unwrap();
    let before = trainer.evaluate(held_out).unwrap();
    let batches: Vec<Vec<&FrozenSequence>> = train.chunks(8).map(|c| c.iter().collect()).collect();
    let run = |trainer: &mut LookaheadTrainer, from: usize, to: usize| {
        for step in from..to {
            trainer.step(&batches[step % batches.len()]).unwrap();
        }
    };
    run(&mut trainer, 0, 150);
    let checkpoint = dir.path().join("state.safetensors");
    trainer.save_state(&checkpoint).unwrap();
    run(&mut trainer, 150, 300);
    let after = trainer.evaluate(held_out).unwrap();
    assert!(
        after.loss < 0.5 * before.loss,
        "loss {} -> {}",
        before.loss,
        after.loss
    );
    assert!(
        after.lookahead_accuracy[0] >= 0.9,
        "lookahead 1 held-out accuracy {} (before {})",
        after.lookahead_accuracy[0],
        before.lookahead_accuracy[0]
    );
    // Resuming from the checkpoint replays the same steps bit for bit.
    let mut resumed = LookaheadTrainer::resume(&model, &checkpoint).unwrap();
    assert_eq!(resumed.step_count(), 150);
    run(&mut resumed, 150, 300);
    for (a, b) in trainer
        .head()
        .unwrap()
        .tensors()
        .iter()
        .zip(resumed.head().unwrap().tensors())
    {
        assert_eq!(common::max_abs_diff(a, b), 0.0, "resume diverged");
    }
}

#[test]
fn a_config_that_declares_lookahead_loads_it_from_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let source = common::fixture_dir("qwen2");
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let config = LookaheadConfig {
        tokens: 2,
        layers: 1,
        rank: 4,
    };
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    json["speculative_streams"] = serde_json::to_value(&config).unwrap();
    std::fs::write(dir.path().join("config.json"), json.to_string()).unwrap();
    let files = mirror_sd::mirror_core::DirFiles::local(dir.path()).unwrap();
    let options = mirror_sd::mirror_core::LoadOptions::default();
    // Declared but absent: a typed error naming the file.
    let missing = mirror_sd::mirror_core::load_model_dir(&files, &options);
    assert!(
        matches!(&missing, Err(Error::MissingFile { path, .. }) if path.ends_with("streams.safetensors")),
        "{missing:?}"
    );
    let head = common::random_head(config.clone(), 32, 5);
    let weights = dir.path().join("streams.safetensors");
    head.save(&weights, &HashMap::new()).unwrap();
    let model = mirror_sd::mirror_core::load_model_dir(&files, &options).unwrap();
    assert_eq!(model.lookahead().map(|h| h.config()), Some(&config));
    // Weights of another shape than declared: refused.
    common::random_head(
        LookaheadConfig {
            tokens: 3,
            ..config
        },
        32,
        5,
    )
    .save(&weights, &HashMap::new())
    .unwrap();
    let wrong = mirror_sd::mirror_core::load_model_dir(&files, &options);
    assert!(matches!(wrong, Err(Error::InvalidArgument(_))), "{wrong:?}");
}
