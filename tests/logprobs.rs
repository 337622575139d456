//! Log-probabilities from the batched engine on SmolLM2, greedy: each generated token's value
//! equals a log-softmax computed here (in f64) from the logits of a plain one-token forward of
//! the target, its alternatives are the likeliest tokens there in order, and the values are the
//! same bit for bit under every speculation (the rows are batch-invariant). Mirror (one
//! sequence) returns them too, against the same reference, streamed with their tokens.

mod common;

use std::sync::Arc;

use mirror_core::{load, LoadOptions, Model, ModelSource};
use mirror_sd::mirror_scheduler::{
    Autoregressive, Decoder, Error, Generation, GenerationConfig, Mirror, SequenceRequest,
    StreamControl,
};

#[test]
fn logprobs_equal_a_log_softmax_of_plain_forwards_under_every_speculation() {
    let Some(path) = common::smollm2_path() else {
        return;
    };
    let loaded = load(&ModelSource::Gguf(path), &LoadOptions::default()).expect("load SmolLM2");
    let target = Arc::new(loaded.model);
    let draft = Arc::new(target.truncated(10).unwrap());
    let prompt = loaded
        .tokenizer
        .encode("The three primary colors are", true)
        .unwrap();
    let config = GenerationConfig {
        logprobs: Some(3),
        stop_at_eos: false,
        ..GenerationConfig::greedy(12)
    };
    let engine = common::engine_with_draft(&target, &draft, None);
    let runs: Vec<_> = common::batched_speculations()
        .into_iter()
        .map(|speculation| {
            let request = SequenceRequest {
                speculation,
                ..SequenceRequest::new(prompt.clone(), config.clone())
            };
            engine.generate(request).unwrap()
        })
        .collect();
    let first = &runs[0];
    assert_eq!(first.logprobs.len(), first.tokens.len());
    for run in &runs[1..] {
        assert_eq!(run.tokens, first.tokens);
        assert_eq!(
            run.logprobs, first.logprobs,
            "bit for bit under every speculation"
        );
    }
    // Mirror (one sequence, SmolLM2's first 10 layers drafting) returns them too, streamed
    // with their tokens.
    let mut mirror = Mirror::builder(Arc::clone(&target), Arc::clone(&draft))
        .build()
        .unwrap();
    let mut streamed = Vec::new();
    let mirrored = mirror
        .generate_streamed(&prompt, &config, &mut |tokens, logprobs| {
            assert_eq!(tokens.len(), logprobs.len());
            streamed.extend_from_slice(logprobs);
            StreamControl::Continue
        })
        .unwrap();
    assert_eq!(mirrored.tokens, first.tokens);
    assert_eq!(streamed, mirrored.logprobs);
    check_against_plain_forwards(&target, &prompt, first);
    check_against_plain_forwards(&target, &prompt, &mirrored);
    // The other one-sequence decoders say they do not return them.
    let mut ar = Autoregressive::new(Arc::clone(&target));
    assert!(matches!(
        ar.generate(&prompt, &config),
        Err(Error::InvalidConfig(_))
    ));
}

/// The reference: plain forwards, one token at a time, and a log-softmax in f64.
fn check_against_plain_forwards(target: &Model, prompt: &[u32], first: &Generation) {
    assert_eq!(first.logprobs.len(), first.tokens.len());
    let mut cache = target.new_cache(1, prompt.len() + 16).unwrap();
    let mut logits = target.next_token_logits(prompt, &mut cache).unwrap();
    for (j, entry) in first.logprobs.iter().enumerate() {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let log_sum = logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln()
            + max;
        let want = |t: u32| logits[t as usize] as f64 - log_sum;
        assert_eq!(entry.token, first.tokens[j]);
        assert!(
            (entry.logprob as f64 - want(entry.token)).abs() < 1e-4,
            "token {j}"
        );
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        let top: Vec<u32> = entry.top.iter().map(|&(t, _)| t).collect();
        assert_eq!(
            top,
            order[..3].to_vec(),
            "token {j}: the likeliest three, in order"
        );
        for &(t, lp) in &entry.top {
            assert!((lp as f64 - want(t)).abs() < 1e-4);
        }
        logits = target
            .next_token_logits(&[first.tokens[j]], &mut cache)
            .unwrap();
    }
}
