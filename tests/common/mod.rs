//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The repository root (where `models/` lives).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Path of a pinned model file in `models/`, or `None` (with a message) when it is absent.
/// Under `CI=true` a missing model is a failure, not a skip.
pub fn model_path(file: &str, fetch_hint: &str) -> Option<PathBuf> {
    let path = repo_root().join("models").join(file);
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{} is missing under CI=true; run `{fetch_hint}`",
            path.display()
        );
    }
    eprintln!(
        "skipping: {} is missing; run `{fetch_hint}`",
        path.display()
    );
    None
}

/// SmolLM2-135M-Instruct Q4_1.
pub fn smollm2_path() -> Option<PathBuf> {
    model_path(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "python3 scripts/fetch_models.py smollm2",
    )
}

use std::collections::HashMap;

use mirror_core::{load_model_dir, DirFiles, LoadOptions, Model, Tensor};

/// The tiny Hugging Face fixtures written by `scripts/make_fixtures.py`.
pub const HF_FIXTURES: [&str; 5] = ["llama", "llama3_scaled", "qwen2", "qwen3", "mistral"];

/// Directory of a fixture checkpoint.
pub fn fixture_dir(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/hf").join(name)
}

/// Loads a fixture checkpoint (model only) in f32 on the CPU.
pub fn load_fixture(name: &str) -> Model {
    let files = DirFiles::local(&fixture_dir(name)).expect("fixture files");
    load_model_dir(&files, &LoadOptions::default()).unwrap_or_else(|e| panic!("load {name}: {e}"))
}

/// transformers' reference tensors for a fixture (`tokens_i`, `logits_i`, `early_exit_logits_i`).
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixture_dir(name).join("reference.safetensors"),
        &candle_core::Device::Cpu,
    )
    .expect("reference.safetensors")
}

/// Token ids of a reference sequence.
pub fn reference_tokens(reference: &HashMap<String, Tensor>, i: usize) -> Vec<u32> {
    reference[&format!("tokens_{i}")]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|t| t as u32)
        .collect()
}

/// Largest absolute elementwise difference of two tensors of equal shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
