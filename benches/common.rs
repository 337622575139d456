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

/// A group for whole generations: few samples, ten seconds each.
#[allow(dead_code)] // Not every bench times generations.
pub fn generation_group<'a>(
    c: &'a mut criterion::Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .measurement_time(std::time::Duration::from_secs(10))
        .warm_up_time(std::time::Duration::from_secs(1));
    group
}
