//! What the benches share.

use std::path::PathBuf;

/// SmolLM2-135M-Instruct Q4_1 (fetched by `python3 scripts/fetch_models.py smollm2`).
pub fn smollm2_path() -> PathBuf {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "run `python3 scripts/fetch_models.py smollm2` first"
    );
    path
}
