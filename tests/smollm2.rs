//! Real-model tests on SmolLM2-135M-Instruct (GGUF Q4_1, run as stored): greedy decoding,
//! speculative decoding and Mirror against plain decoding, trained lookahead tokens.
//! Parity with candle-transformers' quantized models and batch invariance are in
//! `tests/quantized.rs`.
//!
//! The model is fetched by `python3 scripts/fetch_models.py smollm2` (`.ci/run` does it). Without
//! it these tests skip with a message, except under `CI=true`, where a missing model fails.

mod common;

use mirror_core::{load, sampling, LoadOptions, LoadedModel, ModelSource};

fn greedy_ours(loaded: &LoadedModel, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut cache = loaded.model.new_cache(1, prompt.len() + steps).unwrap();
    let mut logits = loaded.model.next_token_logits(prompt, &mut cache).unwrap();
    let mut out = Vec::new();
    for _ in 0..steps {
        let next = sampling::argmax(&logits);
        out.push(next);
        logits = loaded.model.next_token_logits(&[next], &mut cache).unwrap();
    }
    out
}

const PROMPTS: [&str; 3] = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
];

#[test]
fn greedy_continuation_names_paris() {
    let Some(path) = common::smollm2_path() else {
        return;
    };
    let loaded = load(&ModelSource::Gguf(path), &LoadOptions::default()).expect("load SmolLM2");
    let prompt = loaded
        .tokenizer
        .encode("The capital of France is", true)
        .unwrap();
    let next = greedy_ours(&loaded, &prompt, 1);
    let text = loaded.tokenizer.decode(&next, false).unwrap();
    assert_eq!(text, " Paris", "greedy continuation was {text:?}");
}

#[test]
fn speculative_and_mirror_greedy_equal_autoregressive_on_smollm2() {
    use mirror_sd::mirror_scheduler::{
        Autoregressive, Decoder, DraftSchedule, GenerationConfig, LookupConfig, Mirror,
        SpeculativeDecoding, WindowPolicy,
    };
    use std::sync::Arc;
    let Some(path) = common::smollm2_path() else {
        return;
    };
    let loaded = load(&ModelSource::Gguf(path), &LoadOptions::default()).unwrap();
    let target = Arc::new(loaded.model);
    // A self-speculative draft: SmolLM2's own first 10 of 30 layers, its norm and head.
    let draft = Arc::new(target.truncated(10).unwrap());
    let config = GenerationConfig::greedy(24);
    let mut decoders: Vec<Box<dyn Decoder>> = vec![
        Box::new(
            SpeculativeDecoding::builder(Arc::clone(&target), Arc::clone(&draft))
                .gamma(4)
                .window(WindowPolicy::Fixed)
                .build()
                .unwrap(),
        ),
        Box::new(
            Mirror::builder(Arc::clone(&target), Arc::clone(&draft))
                .gamma(4)
                .kappa(4)
                .window(WindowPolicy::Fixed)
                .build()
                .unwrap(),
        ),
        Box::new(
            Mirror::builder(Arc::clone(&target), Arc::clone(&draft))
                .gamma(3)
                .kappa(2)
                .schedule(DraftSchedule::FullGrid)
                .window(WindowPolicy::Fixed)
                .build()
                .unwrap(),
        ),
        // Prompt lookup: alone, before the model, and in Mirror's tree.
        Box::new(
            SpeculativeDecoding::prompt_lookup(Arc::clone(&target))
                .build()
                .unwrap(),
        ),
        Box::new(
            SpeculativeDecoding::builder(Arc::clone(&target), Arc::clone(&draft))
                .prompt_lookup(LookupConfig::default())
                .window(WindowPolicy::Fixed)
                .build()
                .unwrap(),
        ),
        Box::new(
            Mirror::builder(Arc::clone(&target), Arc::clone(&draft))
                .prompt_lookup(LookupConfig::default())
                .build()
                .unwrap(),
        ),
        // Adaptive windows over the model draft (they may well choose plain steps here, as
        // timings decide: no statistics are asserted for them).
        Box::new(
            SpeculativeDecoding::builder(Arc::clone(&target), Arc::clone(&draft))
                .build()
                .unwrap(),
        ),
        Box::new(
            Mirror::builder(Arc::clone(&target), Arc::clone(&draft))
                .gamma(4)
                .kappa(4)
                .build()
                .unwrap(),
        ),
    ];
    let mut ar = Autoregressive::new(Arc::clone(&target));
    // The third prompt repeats itself, so that lookup finds windows.
    let repeating = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef";
    let mut looked_up = 0;
    for prompt in [PROMPTS[0], PROMPTS[1], repeating] {
        let tokens = loaded.tokenizer.encode(prompt, true).unwrap();
        let want = ar.generate(&tokens, &config).unwrap();
        for (i, decoder) in decoders.iter_mut().enumerate() {
            let got = decoder.generate(&tokens, &config).unwrap();
            assert_eq!(got.tokens, want.tokens, "{} on {prompt:?}", decoder.name());
            looked_up += got.stats.lookup_windows;
            // The first three draft with the model alone, in fixed windows of gamma: the
            // self-draft must be accepted somewhere.
            assert!(
                i >= 3 || got.stats.mean_accepted() > 0.0,
                "{}: the self-draft never agreed",
                decoder.name()
            );
        }
    }
    assert!(looked_up > 0, "lookup never proposed a window");
}

/// SmolLM2 drafting for itself with the lookahead weights trained by `examples/train_lookahead.rs`
/// (shipped in `lookahead/`): greedy output equals the model alone, and the trained lookahead rows carry
/// information: the draft's main row is the target itself, so every window token the target
/// rejects is a wrong lookahead token, and E[A] with every lookahead token proposed measures lookahead
/// accuracy. Untrained (zero) lookahead rows, copies of their anchor, are the baseline.
#[test]
fn smollm2_with_its_trained_streams_equals_autoregressive() {
    use mirror_sd::mirror_core::{LookaheadConfig, LookaheadHead};
    use mirror_sd::mirror_scheduler::{
        Autoregressive, Decoder, GenerationConfig, Mirror, SpeculativeDecoding, WindowPolicy,
    };
    use std::sync::Arc;
    let Some(path) = common::smollm2_path() else {
        return;
    };
    let loaded = load(&ModelSource::Gguf(path), &LoadOptions::default()).unwrap();
    let target = Arc::new(loaded.model);
    let weights = common::repo_root().join("lookahead/smollm2-135m-instruct.safetensors");
    let trained = LookaheadHead::load(&weights, target.dtype(), target.device()).unwrap();
    let untrained = LookaheadHead::zeros(
        LookaheadConfig::clone(trained.config()),
        target.hidden_size(),
        target.dtype(),
        target.device(),
    )
    .unwrap();
    let config = GenerationConfig::greedy(32);
    let mut ar = Autoregressive::new(Arc::clone(&target));
    let prompts: Vec<Vec<u32>> = PROMPTS[..2]
        .iter()
        .map(|p| loaded.tokenizer.encode(p, true).unwrap())
        .collect();
    let wants: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| ar.generate(p, &config).unwrap().tokens)
        .collect();
    let mut mean_accepted = Vec::new();
    for head in [trained, untrained] {
        let draft = Arc::new(target.with_lookahead(Arc::new(head)).unwrap());
        let mut decoders: Vec<Box<dyn Decoder>> = vec![
            Box::new(
                SpeculativeDecoding::builder(Arc::clone(&target), Arc::clone(&draft))
                    .gamma(5)
                    .lookahead_confidence(0.0)
                    // Acceptance is compared across heads: windows must not depend on timing.
                    .window(WindowPolicy::Fixed)
                    .build()
                    .unwrap(),
            ),
            Box::new(
                Mirror::builder(Arc::clone(&target), Arc::clone(&draft))
                    .gamma(5)
                    .kappa(2)
                    .window(WindowPolicy::Fixed)
                    .build()
                    .unwrap(),
            ),
        ];
        let (mut windows, mut accepted) = (0, 0.0);
        for (prompt, want) in prompts.iter().zip(&wants) {
            for decoder in decoders.iter_mut() {
                let got = decoder.generate(prompt, &config).unwrap();
                assert_eq!(&got.tokens, want, "{}", decoder.name());
                if decoder.name() == "speculative" {
                    windows += got.stats.windows;
                    accepted += got.stats.mean_accepted() * got.stats.windows as f64;
                }
            }
        }
        mean_accepted.push(accepted / windows as f64);
    }
    eprintln!(
        "E[A]: trained lookahead {:.2}, untrained {:.2}",
        mean_accepted[0], mean_accepted[1]
    );
    assert!(
        mean_accepted[0] > mean_accepted[1] + 0.1,
        "E[A] with trained lookahead {:.2}, untrained {:.2}",
        mean_accepted[0],
        mean_accepted[1]
    );
}
