//! One decode step and k-token verification forwards on SmolLM2-135M with its weights as
//! stored (Q4_1, Q8_0 embeddings), ours beside candle-transformers' `quantized_llama` on the
//! same file, in the same run. Context: 64 tokens already cached. (The whole-model costs of
//! the default pair are in `cargo run --release --example bench -- --candle`.)
//!
//! `python3 scripts/fetch_models.py smollm2 && cargo bench --bench forward`

#[path = "common.rs"]
mod common;

use std::time::Duration;

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use mirror_sd::mirror_core::{load, LoadOptions, ModelSource};

const CONTEXT: usize = 64;

fn context_tokens(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 100 + (i * 37) % 4000).collect()
}

fn bench_forward(c: &mut Criterion) {
    let path = common::smollm2_path();
    let loaded = load(&ModelSource::Gguf(path.clone()), &LoadOptions::default()).unwrap();
    let model = &loaded.model;
    let device = Device::Cpu;

    let mut file = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let mut reference = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        content, &mut file, &device,
    )
    .unwrap();
    let prefix = context_tokens(CONTEXT);
    let input = Tensor::new(prefix.as_slice(), &device)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    reference.forward(&input, 0).unwrap();

    let mut cache = model.new_cache(1, CONTEXT + 32).unwrap();
    model.forward_causal(&prefix, &mut cache).unwrap();

    let mut group = c.benchmark_group("smollm2_as_stored_after_64");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(6))
        .warm_up_time(Duration::from_secs(2));
    for k in [1usize, 4, 8, 16] {
        let window = context_tokens(k);
        group.bench_function(format!("mirror_core/verify_{k}"), |b| {
            b.iter(|| {
                let logits = model.forward_causal(&window, &mut cache).unwrap();
                device.synchronize().unwrap();
                cache.truncate(CONTEXT);
                logits
            })
        });
        let x = Tensor::new(window.as_slice(), &device)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        // Its cache cannot be rolled back: each iteration starts from a clone of the prefilled
        // model (clones share weights; cached K/V are immutable tensors), cloned outside the clock.
        group.bench_function(format!("candle_quantized_llama/verify_{k}"), |b| {
            b.iter_batched(
                || reference.clone(),
                |mut m| {
                    let logits = m.forward(&x, CONTEXT).unwrap();
                    device.synchronize().unwrap();
                    logits
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench_forward);
criterion_main!(benches);
