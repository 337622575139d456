//! Sampling is lossless: on a 6-token vocabulary, the joint distribution of the first two
//! generated tokens under vanilla SD and Mirror-SD matches the target's exact distribution
//! (computed from the target model itself), by a chi-square test. The same test rejects the
//! biased rule that judges a deterministic draft pick with the draft's soft q, so it has power.

mod common;

use std::sync::Arc;

use mirror_core::sampling::{self, SamplingParams};
use mirror_core::Model;
use mirror_sd::mirror_scheduler::verify::{verify_window, DraftChoice, DraftWindow};
use mirror_sd::mirror_scheduler::{
    Decoder, DraftSchedule, GenerationConfig, Mirror, SpeculativeDecoding,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

const VOCAB: usize = 6;
const PROMPT: [u32; 3] = [1, 4, 2];
const SAMPLES: usize = 2000;

struct Models {
    target: Arc<Model>,
    draft: Arc<Model>,
    _dir: tempfile::TempDir,
}

fn models() -> Models {
    let dir = tempfile::tempdir().unwrap();
    let target = Arc::new(common::random_model(
        &dir.path().join("target"),
        "qwen2",
        VOCAB,
        2,
        11,
    ));
    let draft = Arc::new(common::random_model(
        &dir.path().join("draft"),
        "llama",
        VOCAB,
        1,
        12,
    ));
    Models {
        target,
        draft,
        _dir: dir,
    }
}

fn last_logits(model: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache(1, 16).unwrap();
    model.next_token_logits(tokens, &mut cache).unwrap()
}

/// Exact P(t1, t2) of the target under `params`.
fn exact_joint(target: &Model, params: &SamplingParams) -> Vec<f64> {
    let p1 = sampling::warp(&last_logits(target, &PROMPT), params);
    let mut joint = vec![0.0; VOCAB * VOCAB];
    for t1 in 0..VOCAB {
        let mut prefix = PROMPT.to_vec();
        prefix.push(t1 as u32);
        let p2 = sampling::warp(&last_logits(target, &prefix), params);
        for t2 in 0..VOCAB {
            joint[t1 * VOCAB + t2] = p1[t1] as f64 * p2[t2] as f64;
        }
    }
    joint
}

/// Pearson chi-square of `counts` against `expected` probabilities; bins expecting fewer than
/// 5 observations are pooled. Returns (statistic, critical value at alpha = 1e-4).
fn chi_square(counts: &[usize], expected: &[f64]) -> (f64, f64) {
    let n: usize = counts.iter().sum();
    let (mut stat, mut bins) = (0.0, 0usize);
    let (mut pooled_obs, mut pooled_exp) = (0.0, 0.0);
    for (&c, &p) in counts.iter().zip(expected) {
        let e = p * n as f64;
        if e < 5.0 {
            pooled_obs += c as f64;
            pooled_exp += e;
        } else {
            stat += (c as f64 - e).powi(2) / e;
            bins += 1;
        }
    }
    if pooled_exp > 0.0 {
        stat += (pooled_obs - pooled_exp).powi(2) / pooled_exp.max(1e-9);
        bins += 1;
    }
    assert!(
        bins >= 3,
        "too few populated outcomes ({bins}) for a meaningful test"
    );
    let df = (bins - 1) as f64;
    // Wilson-Hilferty approximation of the chi-square quantile; z for alpha = 1e-4.
    let z = 3.719;
    let critical = df * (1.0 - 2.0 / (9.0 * df) + z * (2.0 / (9.0 * df)).sqrt()).powi(3);
    (stat, critical)
}

fn sample_pairs(decoder: &mut dyn Decoder, params: SamplingParams) -> Vec<usize> {
    let mut counts = vec![0; VOCAB * VOCAB];
    for seed in 0..SAMPLES as u64 {
        let config = GenerationConfig {
            max_new_tokens: 2,
            sampling: params,
            seed,
            stop_at_eos: false,
            stop_tokens: Vec::new(),
        };
        let out = decoder.generate(&PROMPT, &config).unwrap();
        assert_eq!(out.tokens.len(), 2);
        counts[out.tokens[0] as usize * VOCAB + out.tokens[1] as usize] += 1;
    }
    counts
}

fn params_list() -> [SamplingParams; 2] {
    [
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        },
        // A flatter warp with both cuts active, so that several outcomes remain.
        SamplingParams {
            temperature: 2.0,
            top_k: 4,
            top_p: 0.9,
        },
    ]
}

#[test]
fn speculative_sampling_matches_the_target_distribution() {
    let m = models();
    for params in params_list() {
        let expected = exact_joint(&m.target, &params);
        for greedy_draft in [false, true] {
            let mut sd = SpeculativeDecoding::builder(Arc::clone(&m.target), Arc::clone(&m.draft))
                .gamma(3)
                .greedy_draft(greedy_draft)
                .build()
                .unwrap();
            let (stat, critical) = chi_square(&sample_pairs(&mut sd, params), &expected);
            assert!(
                stat < critical,
                "SD greedy_draft={greedy_draft} {params:?}: chi2 {stat:.1} >= {critical:.1}"
            );
        }
    }
}

#[test]
fn mirror_sampling_matches_the_target_distribution() {
    let m = models();
    for params in params_list() {
        let expected = exact_joint(&m.target, &params);
        for (schedule, greedy_draft) in [
            (DraftSchedule::FullGrid, false),
            (
                DraftSchedule::Anytime {
                    branches_per_pass: 2,
                },
                true,
            ),
        ] {
            let mut mirror = Mirror::builder(Arc::clone(&m.target), Arc::clone(&m.draft))
                .gamma(2)
                .kappa(3)
                .schedule(schedule)
                .greedy_draft(greedy_draft)
                .build()
                .unwrap();
            let (stat, critical) = chi_square(&sample_pairs(&mut mirror, params), &expected);
            assert!(stat < critical, "Mirror {schedule:?} greedy_draft={greedy_draft} {params:?}: chi2 {stat:.1} >= {critical:.1}");
        }
    }
}

#[test]
fn the_test_rejects_a_biased_rule() {
    // One window of one greedy draft token after the prompt, verified by the correct point-mass
    // rule and by the biased rule (the draft's soft q for a deterministic pick); the first
    // committed token's distribution is compared with the target's, with the same statistic.
    let m = models();
    // The flatter of the two warps the lossless tests use: there the draft's q is spread
    // enough for the biased rule to move the first token's distribution.
    let params = params_list()[1];
    let p_logits = last_logits(&m.target, &PROMPT);
    let q_logits = last_logits(&m.draft, &PROMPT);
    let expected = sampling::warp(&p_logits, &params);
    let expected: Vec<f64> = expected.iter().map(|&p| p as f64).collect();
    let q = sampling::warp(&q_logits, &params);
    let pick = sampling::argmax(&q_logits);
    let mut next = PROMPT.to_vec();
    next.push(pick);
    let bonus = last_logits(&m.target, &next);
    let rows: [&[f32]; 2] = [&p_logits, &bonus];
    let mut rng = StdRng::seed_from_u64(3);
    for (choice, should_pass) in [
        (DraftChoice::PointMass, true),
        (DraftChoice::Sampled(q.clone()), false),
    ] {
        let window = DraftWindow {
            tokens: vec![pick],
            choices: vec![choice.clone()],
        };
        let mut counts = vec![0; VOCAB];
        for _ in 0..SAMPLES {
            let v = verify_window(&rows, &window, &params, &mut || rng.random());
            let first = if v.accepted == 1 { pick } else { v.token };
            counts[first as usize] += 1;
        }
        let (stat, critical) = chi_square(&counts, &expected);
        eprintln!("{choice:?}: chi2 {stat:.1}, critical {critical:.1}");
        assert_eq!(
            stat < critical,
            should_pass,
            "{choice:?}: chi2 {stat:.1} vs {critical:.1}"
        );
    }
}

#[test]
fn sampled_generation_is_reproducible_with_a_seed() {
    let m = models();
    let params = params_list()[0];
    let config = GenerationConfig {
        max_new_tokens: 12,
        sampling: params,
        seed: 42,
        stop_at_eos: false,
        stop_tokens: vec![],
    };
    let mut mirror = Mirror::builder(Arc::clone(&m.target), Arc::clone(&m.draft))
        .gamma(3)
        .schedule(DraftSchedule::FullGrid)
        .build()
        .unwrap();
    let a = mirror.generate(&PROMPT, &config).unwrap().tokens;
    let b = mirror.generate(&PROMPT, &config).unwrap().tokens;
    assert_eq!(a, b);
    let mut sd = SpeculativeDecoding::builder(Arc::clone(&m.target), Arc::clone(&m.draft))
        .gamma(3)
        .build()
        .unwrap();
    assert_eq!(
        sd.generate(&PROMPT, &config).unwrap().tokens,
        sd.generate(&PROMPT, &config).unwrap().tokens
    );
}

#[test]
fn lookahead_draft_sampling_matches_the_target_distribution() {
    // The draft proposes two tokens per step (main row + one random lookahead row), so the second
    // token of each pair comes from the lookahead row's own distribution: the verifier must divide by
    // exactly that distribution for the output to stay the target's.
    let m = models();
    let config = mirror_core::LookaheadConfig {
        tokens: 1,
        layers: 1,
        rank: 4,
    };
    // Large lookahead embeddings: the lookahead distribution differs clearly from the main one's.
    let head = common::random_head_scaled(config, m.draft.hidden_size(), 21, 20.0);
    let draft = Arc::new(m.draft.with_lookahead(Arc::new(head)).unwrap());
    let params = params_list()[0];
    let expected = exact_joint(&m.target, &params);
    for greedy_draft in [false, true] {
        let mut sd = SpeculativeDecoding::builder(Arc::clone(&m.target), Arc::clone(&draft))
            .gamma(3)
            .greedy_draft(greedy_draft)
            .lookahead_confidence(0.0)
            .build()
            .unwrap();
        let (stat, critical) = chi_square(&sample_pairs(&mut sd, params), &expected);
        assert!(
            stat < critical,
            "SD+lookahead greedy_draft={greedy_draft}: chi2 {stat:.1} >= {critical:.1}"
        );
        let mut mirror = Mirror::builder(Arc::clone(&m.target), Arc::clone(&draft))
            .gamma(2)
            .kappa(3)
            .schedule(DraftSchedule::FullGrid)
            .greedy_draft(greedy_draft)
            .lookahead_confidence(0.0)
            .build()
            .unwrap();
        let (stat, critical) = chi_square(&sample_pairs(&mut mirror, params), &expected);
        assert!(
            stat < critical,
            "Mirror+lookahead greedy_draft={greedy_draft}: chi2 {stat:.1} >= {critical:.1}"
        );
    }
}
