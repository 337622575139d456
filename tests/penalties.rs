//! Sampling penalties and logit bias on SmolLM2, greedy: the output of every decoder (the
//! target alone, vanilla SD with a self-draft, prompt lookup, Mirror, and the batched engine
//! under each of its speculations) equals a reference decoded here, step by step, from the
//! model's plain one-token forwards with the penalties written out in this file. The
//! distributional side (sampled windows under penalties) is in `tests/sampling.rs`.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use mirror_core::sampling::{argmax, Penalties};
use mirror_core::{load, LoadOptions, Model, ModelSource};
use mirror_sd::mirror_scheduler::{
    Autoregressive, Decoder, Error, GenerationConfig, LookupConfig, Mirror, SequenceRequest,
    SpeculativeDecoding, WindowPolicy,
};

const NEW_TOKENS: usize = 24;

fn penalties(banned: u32) -> Penalties {
    Penalties {
        frequency: 0.8,
        presence: 0.5,
        repetition: Some(1.3),
        // The unpenalized greedy output's first token, banned: the output must differ at once.
        logit_bias: vec![(banned, -100.0)],
    }
}

/// Greedy decoding with the penalties applied by their definitions, one plain forward a token.
fn reference(target: &Model, prompt: &[u32], p: &Penalties) -> Vec<u32> {
    let mut cache = target.new_cache(1, prompt.len() + NEW_TOKENS + 1).unwrap();
    let mut logits = target.next_token_logits(prompt, &mut cache).unwrap();
    let mut output: Vec<u32> = Vec::new();
    while output.len() < NEW_TOKENS {
        let mut counts: HashMap<u32, f32> = HashMap::new();
        for &t in &output {
            *counts.entry(t).or_default() += 1.0;
        }
        for (t, logit) in logits.iter_mut().enumerate() {
            let t = t as u32;
            let count = counts.get(&t).copied().unwrap_or(0.0);
            if prompt.contains(&t) || count > 0.0 {
                let r = p.repetition.unwrap();
                *logit = if *logit > 0.0 { *logit / r } else { *logit * r };
            }
            if count > 0.0 {
                *logit -= count * p.frequency + p.presence;
            }
            for &(b, bias) in &p.logit_bias {
                if b == t {
                    *logit += bias;
                }
            }
        }
        let token = argmax(&logits) as u32;
        output.push(token);
        logits = target.next_token_logits(&[token], &mut cache).unwrap();
    }
    output
}

#[test]
fn penalized_greedy_output_equals_the_reference_under_every_decoder() {
    let Some(path) = common::smollm2_path() else {
        return;
    };
    let loaded = load(&ModelSource::Gguf(path), &LoadOptions::default()).expect("load SmolLM2");
    let target = Arc::new(loaded.model);
    let draft = Arc::new(target.truncated(10).unwrap());
    let prompt = loaded
        .tokenizer
        .encode(
            "List the days of the week, then the months of the year:",
            true,
        )
        .unwrap();
    let plain = GenerationConfig {
        stop_at_eos: false,
        ..GenerationConfig::greedy(NEW_TOKENS)
    };
    let mut ar = Autoregressive::new(Arc::clone(&target));
    let unpenalized = ar.generate(&prompt, &plain).unwrap().tokens;
    let p = penalties(unpenalized[0]);
    let want = reference(&target, &prompt, &p);
    assert_ne!(want, unpenalized, "the penalties change nothing here");
    let config = GenerationConfig {
        penalties: p,
        ..plain
    };
    let mut decoders: Vec<(&str, Box<dyn Decoder>)> = vec![
        ("ar", Box::new(ar)),
        (
            "sd",
            Box::new(
                SpeculativeDecoding::builder(Arc::clone(&target), Arc::clone(&draft))
                    .window(WindowPolicy::Fixed)
                    .build()
                    .unwrap(),
            ),
        ),
        (
            "lookup",
            Box::new(
                SpeculativeDecoding::prompt_lookup(Arc::clone(&target))
                    .prompt_lookup(LookupConfig::default())
                    .build()
                    .unwrap(),
            ),
        ),
        (
            "mirror",
            Box::new(
                Mirror::builder(Arc::clone(&target), Arc::clone(&draft))
                    .build()
                    .unwrap(),
            ),
        ),
    ];
    for (name, decoder) in &mut decoders {
        let got = decoder.generate(&prompt, &config).unwrap().tokens;
        assert_eq!(got, want, "{name}");
    }
    let engine = common::engine_with_draft(&target, &draft, None);
    let speculations = common::batched_speculations();
    // All at once, beside each other in the batch.
    let streams: Vec<_> = speculations
        .iter()
        .map(|&speculation| {
            let request = SequenceRequest {
                speculation,
                ..SequenceRequest::new(prompt.clone(), config.clone())
            };
            (speculation, engine.submit(request).unwrap())
        })
        .collect();
    for (speculation, stream) in streams {
        assert_eq!(
            stream.wait().unwrap().tokens,
            want,
            "batched {speculation:?}"
        );
    }
    // Out-of-range penalties are configuration errors, not panics.
    let bad = GenerationConfig {
        penalties: Penalties {
            logit_bias: vec![(u32::MAX, 1.0)],
            ..Penalties::default()
        },
        ..GenerationConfig::greedy(4)
    };
    let mut ar = Autoregressive::new(Arc::clone(&target));
    assert!(matches!(
        ar.generate(&prompt, &bad),
        Err(Error::InvalidConfig(_))
    ));
    let refused = engine.generate(SequenceRequest::new(prompt.clone(), bad));
    assert!(
        matches!(refused, Err(Error::InvalidConfig(_))),
        "{refused:?}"
    );
}
