//! Real-model tests on SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to f32).
//!
//! The model is fetched by `python3 scripts/fetch_models.py smollm2` (`.ci/run` does it). Without
//! it these tests skip with a message, except under `CI=true`, where a missing model fails.

mod common;

use mirror_core::{load, sampling, LoadOptions, ModelSource};

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
    let mut cache = loaded.model.new_cache(1, 64).unwrap();
    let logits = loaded.model.next_token_logits(&prompt, &mut cache).unwrap();
    let next = sampling::argmax(&logits);
    let text = loaded.tokenizer.decode(&[next], false).unwrap();
    assert_eq!(text, " Paris", "greedy continuation was {text:?}");
}
