//! A draft's LM head over some tokens only (`Model::with_head_tokens`): the kept tokens' logits
//! equal the full head's bit for bit, every other token's is negative infinity, and greedy
//! speculative decoding with such a draft stays token-identical to the target alone.

mod common;

use std::sync::Arc;

use mirror_core::{load, LoadOptions, ModelSource};
use mirror_sd::mirror_scheduler::{Autoregressive, Decoder, GenerationConfig, SpeculativeDecoding};

#[test]
fn kept_tokens_get_the_full_heads_logits_and_the_others_none() {
    let Some(path) = common::smollm2_path() else {
        return;
    };
    let loaded = load(&ModelSource::Gguf(path), &LoadOptions::default()).unwrap();
    let full = &loaded.model;
    let vocab = full.vocab_size();
    // Scattered tokens, out of order and repeated: a prefix, a few apart, the last one.
    let tokens: Vec<u32> = (0..40).chain([1007, 1000, 7, vocab as u32 - 1]).collect();
    let partial = full.with_head_tokens(&tokens).unwrap();
    assert_eq!(partial.head_tokens(), 43);

    let prompt = loaded.tokenizer.encode("def fibonacci(n):", true).unwrap();
    let mut cache = full.new_cache(1, 64).unwrap();
    let want = full.forward_causal(&prompt, &mut cache).unwrap();
    let mut cache = partial.new_cache(1, 64).unwrap();
    let got = partial.forward_causal(&prompt, &mut cache).unwrap();
    let want = want.to_vec2::<f32>().unwrap();
    let got = got.to_vec2::<f32>().unwrap();
    let kept = |t: usize| t < 40 || t == 1000 || t == 1007 || t == vocab - 1;
    for (want, got) in want.iter().zip(&got) {
        assert_eq!(got.len(), vocab);
        for t in 0..vocab {
            if kept(t) {
                assert_eq!(got[t].to_bits(), want[t].to_bits(), "token {t}");
            } else {
                assert_eq!(got[t], f32::NEG_INFINITY, "token {t}");
            }
        }
    }
}

#[test]
fn bad_head_tokens_are_refused() {
    let Some(path) = common::smollm2_path() else {
        return;
    };
    let loaded = load(&ModelSource::Gguf(path), &LoadOptions::default()).unwrap();
    let vocab = loaded.model.vocab_size() as u32;
    assert!(loaded.model.with_head_tokens(&[]).is_err());
    assert!(loaded.model.with_head_tokens(&[1, vocab]).is_err());
}

#[test]
fn greedy_sd_with_a_partial_draft_head_equals_the_target_alone() {
    let Some(path) = common::smollm2_path() else {
        return;
    };
    let loaded = load(&ModelSource::Gguf(path), &LoadOptions::default()).unwrap();
    let target = Arc::new(loaded.model.clone());
    // The same model as its own draft, its head cut to a tenth of the vocabulary: drafts go
    // wrong wherever the target's token lies outside it, and the output must not change.
    let tokens: Vec<u32> = (0..4096)
        .chain(loaded.tokenizer.eos_ids().to_vec())
        .collect();
    let draft = Arc::new(loaded.model.with_head_tokens(&tokens).unwrap());
    let config = GenerationConfig {
        max_new_tokens: 40,
        ..GenerationConfig::default()
    };
    let mut sd = SpeculativeDecoding::builder(Arc::clone(&target), draft)
        .gamma(4)
        .build()
        .unwrap();
    let mut ar = Autoregressive::new(Arc::clone(&target));
    for text in ["def fibonacci(n):", "Once upon a time, in a small village,"] {
        let prompt = loaded.tokenizer.encode(text, true).unwrap();
        let want = ar.generate(&prompt, &config).unwrap().tokens;
        let got = sd.generate(&prompt, &config).unwrap();
        assert_eq!(got.tokens, want, "{text}");
        assert!(got.stats.windows > 0, "{text}: nothing was drafted");
    }
}
