//! Draft tree construction and short end-to-end generations per strategy on SmolLM2-135M (f32).
//!
//! - `tree_pass/rows_R`: one tree-masked forward of R branch nodes over a 64-token context (one
//!   step of hypothesis-tree drafting with R = kappa x (gamma + 1) branches), beside a causal
//!   forward of the same number of tokens.
//! - `draft_step_after_64/*`: one draft step, plain (1 or 3 tokens fed) or with 2 speculative
//!   lookahead (3 tokens fed, main and lookahead logits at every fed row).
//! - `generate_32/*`: 32 greedy tokens after a short prompt with each strategy; the draft is
//!   SmolLM2's own first 10 layers (no trained exit head, so acceptance is low: this measures the
//!   machinery on a real model, not the speedup of a trained pair; see BENCHMARKS.md for that).
//!
//! `python3 scripts/fetch_models.py smollm2 && cargo bench --bench strategies`

#[path = "common.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use mirror_sd::mirror_core::{
    load, AttentionInput, LoadOptions, LookaheadConfig, LookaheadHead, ModelSource, RowVisibility,
};
use mirror_sd::mirror_scheduler::{
    Autoregressive, Decoder, GenerationConfig, Mirror, SpeculativeDecoding,
};

fn bench(c: &mut Criterion) {
    let loaded = load(
        &ModelSource::Gguf(common::smollm2_path()),
        &LoadOptions::default(),
    )
    .unwrap();
    let target = Arc::new(loaded.model);
    let device = target.device().clone();
    let context: Vec<u32> = (0..64u32).map(|i| 100 + (i * 37) % 4000).collect();

    let mut group = c.benchmark_group("tree_pass_after_64");
    group
        .sample_size(15)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    let mut cache = target.new_cache(1, 256).unwrap();
    target.forward_causal(&context, &mut cache).unwrap();
    for rows in [4usize, 8, 20, 40] {
        // `rows` branch roots hanging from the last context token (depth 0 each).
        let tokens: Vec<u32> = (0..rows as u32).map(|r| 200 + r).collect();
        let visibility: Vec<RowVisibility> = (0..rows)
            .map(|r| RowVisibility {
                position: context.len(),
                prefix_len: context.len(),
                extra: vec![context.len() + r],
            })
            .collect();
        let input = AttentionInput::from_rows(&visibility, context.len() + rows, &device).unwrap();
        group.bench_function(format!("tree/rows_{rows}"), |b| {
            b.iter(|| {
                let out = target.forward(&[&tokens], &input, &mut cache).unwrap();
                device.synchronize().unwrap();
                cache.truncate(context.len());
                out
            })
        });
        group.bench_function(format!("causal/rows_{rows}"), |b| {
            b.iter(|| {
                let out = target.forward_causal(&tokens, &mut cache).unwrap();
                device.synchronize().unwrap();
                cache.truncate(context.len());
                out
            })
        });
    }
    group.finish();

    // One draft step: a plain draft feeds one token and returns one distribution; a draft with
    // 2 lookahead tokens over its top 4 layers (rank 64) feeds the previous step's 3 tokens and returns
    // main and lookahead distributions at all 3 rows (what a self-checking greedy step computes).
    let mut group = c.benchmark_group("draft_step_after_64");
    group
        .sample_size(15)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    let stream_config = LookaheadConfig {
        tokens: 2,
        layers: 4,
        rank: 64,
    };
    let head =
        LookaheadHead::zeros(stream_config, target.hidden_size(), target.dtype(), &device).unwrap();
    let streamed = target.with_lookahead(Arc::new(head)).unwrap();
    for (name, fed, lookahead) in [
        ("plain/1_token", 1usize, false),
        ("plain/3_tokens", 3, false),
        ("lookahead/3_tokens", 3, true),
    ] {
        let tokens: Vec<u32> = (0..fed as u32).map(|i| 300 + i).collect();
        let rows: Vec<usize> = if lookahead {
            (0..fed).collect()
        } else {
            vec![fed - 1]
        };
        let lookahead_rows = if lookahead { rows.clone() } else { Vec::new() };
        group.bench_function(name, |b| {
            b.iter(|| {
                let input = AttentionInput::causal(1, fed, context.len(), &device).unwrap();
                let out = streamed
                    .forward_with_lookahead(&tokens, &input, &mut cache, &rows, &lookahead_rows)
                    .unwrap();
                device.synchronize().unwrap();
                cache.truncate(context.len());
                out
            })
        });
    }
    group.finish();

    let prompt = loaded
        .tokenizer
        .encode("The history of the printing press begins", true)
        .unwrap();
    let draft = Arc::new(target.truncated(10).unwrap());
    let config = GenerationConfig::greedy(32);
    let mut decoders: Vec<Box<dyn Decoder>> = vec![
        Box::new(Autoregressive::new(Arc::clone(&target))),
        Box::new(
            SpeculativeDecoding::builder(Arc::clone(&target), Arc::clone(&draft))
                .gamma(3)
                .build()
                .unwrap(),
        ),
        Box::new(
            Mirror::builder(Arc::clone(&target), Arc::clone(&draft))
                .gamma(3)
                .kappa(2)
                .build()
                .unwrap(),
        ),
    ];
    let mut group = common::generation_group(c, "generate_32");
    for decoder in decoders.iter_mut() {
        let name = decoder.name();
        group.bench_function(name, |b| {
            b.iter(|| decoder.generate(&prompt, &config).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
