//! The three strategies agree: greedy output of vanilla SD and Mirror-SD is token-identical to
//! the target alone, across gamma, kappa, exit layers and drafting schedules; an identical draft
//! has every window accepted; Mirror's tree is actually reused. Drafts with lookahead tokens
//! (several tokens per step) keep all of that.

mod common;

use std::sync::Arc;

use mirror_core::{LookaheadConfig, Model};
use mirror_sd::mirror_scheduler::{
    Autoregressive, Decoder, DraftSchedule, EarlyExit, FinishReason, GenerationConfig, Mirror,
    SpeculativeDecoding,
};

const PROMPTS: [&[u32]; 3] = [&[1, 17, 42], &[5], &[300, 2, 99, 150, 7, 8, 9]];
const NEW_TOKENS: usize = 24;

fn config() -> GenerationConfig {
    GenerationConfig {
        stop_at_eos: false,
        ..GenerationConfig::greedy(NEW_TOKENS)
    }
}

struct Pair {
    target: Arc<Model>,
    drafts: Vec<(&'static str, Arc<Model>)>,
}

fn pair() -> Pair {
    let target = Arc::new(common::load_fixture("qwen2"));
    let drafts = vec![
        ("identical", Arc::clone(&target)),
        ("first layer", Arc::new(target.truncated(1).unwrap())),
        ("unrelated", Arc::new(common::load_fixture("llama"))),
    ];
    Pair { target, drafts }
}

fn reference(target: &Arc<Model>) -> Vec<Vec<u32>> {
    let mut ar = Autoregressive::new(Arc::clone(target));
    PROMPTS
        .iter()
        .map(|p| ar.generate(p, &config()).unwrap().tokens)
        .collect()
}

#[test]
fn greedy_speculative_decoding_is_token_identical() {
    let pair = pair();
    let expected = reference(&pair.target);
    for (name, draft) in &pair.drafts {
        for gamma in [1, 3, 7] {
            let mut sd = SpeculativeDecoding::builder(Arc::clone(&pair.target), Arc::clone(draft))
                .gamma(gamma)
                .build()
                .unwrap();
            for (prompt, want) in PROMPTS.iter().zip(&expected) {
                let got = sd.generate(prompt, &config()).unwrap();
                assert_eq!(&got.tokens, want, "SD draft={name} gamma={gamma}");
                assert_eq!(got.finish_reason, FinishReason::Length);
            }
        }
    }
}

#[test]
fn greedy_mirror_is_token_identical_across_settings() {
    let pair = pair();
    let expected = reference(&pair.target);
    let schedules = [
        DraftSchedule::FullGrid,
        DraftSchedule::Anytime {
            branches_per_pass: 1,
        },
        DraftSchedule::Anytime {
            branches_per_pass: 4,
        },
    ];
    for (name, draft) in &pair.drafts {
        for gamma in [1, 3, 7] {
            for kappa in [1, 4] {
                for exit in [1, 2] {
                    for schedule in schedules {
                        let mut mirror =
                            Mirror::builder(Arc::clone(&pair.target), Arc::clone(draft))
                                .gamma(gamma)
                                .kappa(kappa)
                                .early_exit(EarlyExit::Layer(exit))
                                .schedule(schedule)
                                .build()
                                .unwrap();
                        for (prompt, want) in PROMPTS.iter().zip(&expected) {
                            let got = mirror.generate(prompt, &config()).unwrap();
                            assert_eq!(
                                &got.tokens, want,
                                "Mirror draft={name} gamma={gamma} kappa={kappa} exit={exit} {schedule:?}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn identical_draft_has_every_window_accepted() {
    let pair = pair();
    let target = &pair.target;
    let gamma = 3;
    let mut sd = SpeculativeDecoding::builder(Arc::clone(target), Arc::clone(target))
        .gamma(gamma)
        .build()
        .unwrap();
    let mut mirror = Mirror::builder(Arc::clone(target), Arc::clone(target))
        .gamma(gamma)
        .schedule(DraftSchedule::FullGrid)
        .build()
        .unwrap();
    let decoders: [&mut dyn Decoder; 2] = [&mut sd, &mut mirror];
    for decoder in decoders {
        let out = decoder.generate(PROMPTS[0], &config()).unwrap();
        let stats = &out.stats;
        assert!(stats.windows > 0);
        assert_eq!(
            stats.accepted_histogram[gamma],
            stats.windows,
            "{}: {:?}",
            decoder.name(),
            stats.accepted_histogram
        );
        assert_eq!(stats.mean_accepted(), gamma as f64);
        // gamma + 1 tokens per target pass (the last window may be cut by the length limit).
        assert!(
            stats.tokens_per_target_pass() > gamma as f64,
            "{}",
            decoder.name()
        );
    }
}

#[test]
fn mirror_reuses_drafted_branches_and_stays_identical() {
    let pair = pair();
    let expected = reference(&pair.target);
    for (name, draft) in &pair.drafts[..2] {
        let mut mirror = Mirror::builder(Arc::clone(&pair.target), Arc::clone(draft))
            .gamma(3)
            .kappa(4)
            .schedule(DraftSchedule::FullGrid)
            .build()
            .unwrap();
        let mut hits = 0;
        for (prompt, want) in PROMPTS.iter().zip(&expected) {
            let out = mirror.generate(prompt, &config()).unwrap();
            assert_eq!(&out.tokens, want, "{name}");
            let s = &out.stats;
            hits += s.reuse_hits;
            assert_eq!(
                s.reuse_hits + s.reuse_partial + s.fallbacks,
                s.windows,
                "{name}"
            );
            // The paper's bound, for a full tree in greedy mode: a miss needs the target's
            // token outside the early-exit top-kappa, whose mass is at most 1 - Omega.
            assert!(s.omega() > 0.0 && s.omega() <= 1.0 + 1e-6);
        }
        assert!(hits > 0, "draft {name}: no branch was ever reused");
    }
}

#[test]
fn stop_tokens_inside_windows_end_generation_identically() {
    let pair = pair();
    let expected = reference(&pair.target);
    // Stop at the 10th token of the reference output: it lies inside some drafted window.
    let stop = expected[0][9];
    let config = GenerationConfig {
        stop_tokens: vec![stop],
        ..config()
    };
    let mut ar = Autoregressive::new(Arc::clone(&pair.target));
    let want = ar.generate(PROMPTS[0], &config).unwrap();
    assert_eq!(want.finish_reason, FinishReason::Stop);
    assert_eq!(*want.tokens.last().unwrap(), stop);
    for (name, draft) in &pair.drafts {
        let mut sd = SpeculativeDecoding::builder(Arc::clone(&pair.target), Arc::clone(draft))
            .gamma(4)
            .build()
            .unwrap();
        let mut mirror = Mirror::builder(Arc::clone(&pair.target), Arc::clone(draft))
            .gamma(4)
            .build()
            .unwrap();
        for decoder in [&mut sd as &mut dyn Decoder, &mut mirror] {
            let got = decoder.generate(PROMPTS[0], &config).unwrap();
            assert_eq!(got.tokens, want.tokens, "{} draft={name}", decoder.name());
            assert_eq!(got.finish_reason, FinishReason::Stop);
        }
    }
}

#[test]
fn context_limit_is_a_documented_stop() {
    let pair = pair();
    // The fixture's context is 256 positions; ask for more than fits after a 200-token prompt.
    let prompt: Vec<u32> = (0..200).map(|i| (i * 7 % 300) as u32).collect();
    let config = GenerationConfig {
        stop_at_eos: false,
        ..GenerationConfig::greedy(100)
    };
    let mut ar = Autoregressive::new(Arc::clone(&pair.target));
    let want = ar.generate(&prompt, &config).unwrap();
    assert_eq!(want.finish_reason, FinishReason::ContextLimit);
    let mut sd =
        SpeculativeDecoding::builder(Arc::clone(&pair.target), Arc::clone(&pair.drafts[1].1))
            .gamma(4)
            .build()
            .unwrap();
    let mut mirror = Mirror::builder(Arc::clone(&pair.target), Arc::clone(&pair.drafts[1].1))
        .gamma(4)
        .build()
        .unwrap();
    for decoder in [&mut sd as &mut dyn Decoder, &mut mirror] {
        let got = decoder.generate(&prompt, &config).unwrap();
        assert_eq!(
            got.finish_reason,
            FinishReason::ContextLimit,
            "{}",
            decoder.name()
        );
        assert_eq!(got.tokens, want.tokens, "{}", decoder.name());
    }
    // Drafts with lookahead stop the same way (their lookahead rows would reach past the context).
    for (name, draft) in lookahead_drafts(&pair.target) {
        let mut sd = SpeculativeDecoding::builder(Arc::clone(&pair.target), Arc::clone(&draft))
            .gamma(4)
            .build()
            .unwrap();
        let mut mirror_ss = Mirror::builder(Arc::clone(&pair.target), draft)
            .gamma(4)
            .build()
            .unwrap();
        for decoder in [&mut sd as &mut dyn Decoder, &mut mirror_ss] {
            let got = decoder.generate(&prompt, &config).unwrap();
            assert_eq!(got.finish_reason, FinishReason::ContextLimit, "{name}");
            assert_eq!(got.tokens, want.tokens, "{} {name}", decoder.name());
        }
    }
    // A prompt that does not fit at all is an error, not a panic.
    let long: Vec<u32> = vec![3; 300];
    assert!(ar.generate(&long, &config).is_err());
    assert!(mirror.generate(&long, &config).is_err());
}

/// Drafts with random lookahead tokens: one over the top layer, and three over two.
fn lookahead_drafts(target: &Arc<Model>) -> Vec<(&'static str, Arc<Model>)> {
    let one = LookaheadConfig {
        tokens: 1,
        layers: 1,
        rank: 4,
    };
    let three = LookaheadConfig {
        tokens: 3,
        layers: 2,
        rank: 8,
    };
    let with = |model: &Model, config: LookaheadConfig, seed| {
        let head = common::random_head(config, model.hidden_size(), seed);
        Arc::new(model.with_lookahead(Arc::new(head)).unwrap())
    };
    let first_layer = target.truncated(1).unwrap();
    let unrelated = common::load_fixture("llama");
    vec![
        ("identical+1 lookahead", with(target, one.clone(), 1)),
        ("first layer+1 lookahead", with(&first_layer, one, 2)),
        ("identical+3 lookahead", with(target, three.clone(), 3)),
        ("unrelated+3 lookahead", with(&unrelated, three, 4)),
    ]
}

#[test]
fn greedy_decoding_with_lookahead_drafts_is_token_identical() {
    let target = Arc::new(common::load_fixture("qwen2"));
    let expected = reference(&target);
    for (name, draft) in lookahead_drafts(&target) {
        for gamma in [1, 3, 7] {
            // Every lookahead token proposed, and only confident ones.
            for confidence in [0.0, 0.2] {
                let mut sd = SpeculativeDecoding::builder(Arc::clone(&target), Arc::clone(&draft))
                    .gamma(gamma)
                    .lookahead_confidence(confidence)
                    .build()
                    .unwrap();
                for (prompt, want) in PROMPTS.iter().zip(&expected) {
                    let got = sd.generate(prompt, &config()).unwrap();
                    assert_eq!(
                        &got.tokens, want,
                        "SD draft={name} gamma={gamma} confidence={confidence}"
                    );
                    assert!(got.stats.eta() >= 1.0, "{name}: eta {}", got.stats.eta());
                }
            }
            for schedule in [
                DraftSchedule::FullGrid,
                DraftSchedule::Anytime {
                    branches_per_pass: 2,
                },
            ] {
                let mut mirror = Mirror::builder(Arc::clone(&target), Arc::clone(&draft))
                    .gamma(gamma)
                    .kappa(3)
                    .early_exit(EarlyExit::Layer(1))
                    .schedule(schedule)
                    .lookahead_confidence(0.0)
                    .build()
                    .unwrap();
                for (prompt, want) in PROMPTS.iter().zip(&expected) {
                    let got = mirror.generate(prompt, &config()).unwrap();
                    assert_eq!(
                        &got.tokens, want,
                        "Mirror draft={name} gamma={gamma} {schedule:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn stream_drafts_propose_several_tokens_per_step() {
    let target = Arc::new(common::load_fixture("qwen2"));
    let plain = Arc::new(target.truncated(1).unwrap());
    let streamed = Arc::clone(&lookahead_drafts(&target)[2].1); // identical + 3 lookahead
    let gamma = 7;
    let run_with = |draft: &Arc<Model>, sampled: bool, confidence: f32| {
        let mut sd = SpeculativeDecoding::builder(Arc::clone(&target), Arc::clone(draft))
            .gamma(gamma)
            .lookahead_confidence(confidence)
            .build()
            .unwrap();
        let temperature = if sampled { 1.0 } else { 0.0 };
        let config = GenerationConfig {
            sampling: mirror_core::sampling::SamplingParams {
                temperature,
                ..mirror_core::sampling::SamplingParams::greedy()
            },
            ..config()
        };
        sd.generate(PROMPTS[2], &config).unwrap().stats
    };
    let run = |draft: &Arc<Model>, sampled: bool| run_with(draft, sampled, 0.0);
    // A plain draft: exactly one token per step.
    assert_eq!(run(&plain, true).eta(), 1.0);
    assert_eq!(run(&plain, false).eta(), 1.0);
    // A sampling draft keeps every lookahead token: windows of 7 take steps of 4 + 3 tokens.
    let sampled = run(&streamed, true);
    assert!((sampled.eta() - 3.5).abs() < 1e-9, "eta {}", sampled.eta());
    assert_eq!(sampled.draft_steps, 2 * sampled.windows);
    // Greedy: lookahead tokens the main row disagrees with are replaced by its own, so an
    // identical draft's windows are right up to the last step's unchecked lookahead tokens.
    let greedy = run(&streamed, false);
    assert!(greedy.eta() >= 1.0);
    assert_eq!(greedy.position_accepted[0], greedy.position_proposed[0]);
    assert!(
        greedy.mean_accepted() >= 3.0,
        "{:?}",
        greedy.accepted_histogram
    );
    // A threshold no lookahead row reaches turns lookahead off: one token per step again.
    assert_eq!(run_with(&streamed, true, 1.0).eta(), 1.0);
    assert_eq!(run_with(&streamed, false, 1.0).eta(), 1.0);
    // Out-of-range thresholds are configuration errors.
    let bad = SpeculativeDecoding::builder(Arc::clone(&target), Arc::clone(&streamed))
        .lookahead_confidence(1.5)
        .build();
    assert!(bad.is_err());
}
