//! What sampling penalties cost: the same greedy 32-token generations on SmolLM2-135M with
//! neutral settings and with frequency, presence and repetition penalties and a logit bias,
//! side by side (the target alone, and vanilla SD with SmolLM2's first 10 layers as the draft).
//! SmolLM2's decode step is short (a 135M model), so the penalties' share here is an upper
//! bound of their share on the 1.5B target.
//!
//! `apply_window/*` times the penalties alone on the 1.5B target's rows (151,936 logits), a
//! 5-row window after a 512-token prompt and 256 generated tokens: the work they add to each
//! verification step, to set against the step's forward (about 56-110 ms for 1-5 rows on the
//! AVX2 machine of BENCHMARKS.md).
//!
//! `token_logprobs/*` times one generated token's log-probabilities (a log-softmax over the
//! 1.5B's vocabulary and the 5 likeliest alternatives), what `logprobs` adds per token.
//!
//! `monitors/*` times every generation monitor taking one committed token (the softmax over
//! the 1.5B's vocabulary, the top-20, and a 1,536-wide hidden state), what `monitors` adds per
//! token and sequence; `cargo bench --bench penalties -- monitors` runs it alone.
//!
//! `python3 scripts/fetch_models.py smollm2 && cargo bench --bench penalties`

#[path = "common.rs"]
mod common;

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use mirror_sd::mirror_core::sampling::Penalties;
use mirror_sd::mirror_core::{load, LoadOptions, ModelSource};
use mirror_sd::mirror_scheduler::monitor::MonitorSet;
use mirror_sd::mirror_scheduler::{
    token_logprobs, Autoregressive, Decoder, GenerationConfig, MonitorConfig, SpeculativeDecoding,
    WindowPolicy,
};

fn apply_window(c: &mut Criterion) {
    let vocab = 151_936;
    let row: Vec<f32> = (0..vocab)
        .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0)
        .collect();
    let prompt: Vec<u32> = (0..512u32).map(|i| (i * 104_729) % vocab as u32).collect();
    let output: Vec<u32> = (0..256u32).map(|i| (i * 7_907) % vocab as u32).collect();
    let window = [11u32, 22, 33, 44];
    let penalties = Penalties {
        frequency: 0.5,
        presence: 0.3,
        repetition: Some(1.1),
        logit_bias: vec![(0, -5.0), (1, -5.0)],
    };
    let mut group = c.benchmark_group("apply_window");
    group.sample_size(20);
    let mut rows = vec![row.clone(); window.len() + 1];
    group.bench_function("5_rows_151936", |b| {
        b.iter(|| penalties.apply_window(&mut rows, &prompt, &output, &window))
    });
    group.finish();
    // Log-probabilities of one committed token with 5 alternatives (what `logprobs` adds per
    // generated token).
    let mut group = c.benchmark_group("token_logprobs");
    group.sample_size(20);
    let one = [row.clone()];
    group.bench_function("1_row_151936_top5", |b| {
        b.iter(|| token_logprobs(&one, &[7], 5))
    });
    group.finish();
    let mut group = c.benchmark_group("monitors");
    group.sample_size(20);
    let hidden: Vec<f32> = (0..1536).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect();
    let mut monitors = MonitorSet::new(&MonitorConfig::default(), None, 28);
    let mut token = 0u32;
    group.bench_function("all_1_token_151936", |b| {
        b.iter(|| {
            token = (token + 7_907) % vocab as u32;
            monitors.observe_logits(token, &row, Some(&hidden))
        })
    });
    group.finish();
}

fn bench(c: &mut Criterion) {
    let loaded = load(
        &ModelSource::Gguf(common::smollm2_path()),
        &LoadOptions::default(),
    )
    .unwrap();
    let target = Arc::new(loaded.model);
    let draft = Arc::new(target.truncated(10).unwrap());
    let prompt = loaded
        .tokenizer
        .encode("Write a short story about a lighthouse keeper:", true)
        .unwrap();
    let plain = GenerationConfig {
        stop_at_eos: false,
        ..GenerationConfig::greedy(32)
    };
    let penalized = GenerationConfig {
        penalties: Penalties {
            frequency: 0.5,
            presence: 0.3,
            repetition: Some(1.1),
            logit_bias: vec![(0, -5.0), (1, -5.0)],
        },
        ..plain.clone()
    };
    let mut decoders: Vec<Box<dyn Decoder>> = vec![
        Box::new(Autoregressive::new(Arc::clone(&target))),
        Box::new(
            SpeculativeDecoding::builder(Arc::clone(&target), draft)
                .window(WindowPolicy::Fixed)
                .build()
                .unwrap(),
        ),
    ];
    let mut group = common::generation_group(c, "generate_32_penalties");
    for decoder in decoders.iter_mut() {
        let name = decoder.name();
        for (setting, config) in [("neutral", &plain), ("penalized", &penalized)] {
            group.bench_function(format!("{name}/{setting}"), |b| {
                b.iter(|| decoder.generate(&prompt, config).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, apply_window, bench);
criterion_main!(benches);
