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
