//! The three strategies agree: greedy output of vanilla SD and Mirror-SD is token-identical to
//! the target alone, across gamma, kappa, exit layers and drafting schedules; an identical draft
//! has every window accepted; Mirror's tree is actually reused. Drafts with lookahead tokens
//! (several tokens per step) keep all of that.

mod common;

use std::sync::Arc;

use mirror_core::{AttentionInput, LookaheadConfig, Model};
use mirror_sd::mirror_scheduler::{
    Autoregressive, Decoder, DraftSchedule, EarlyExit, Error, FinishReason, GenerationConfig,
    LookupConfig, Mirror, SpeculativeDecoding, StreamControl, WindowPolicy,
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
    common::tiny_model_threads();
    common::tiny_model_threads();
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
        .window(WindowPolicy::Fixed)
        .build()
        .unwrap();
    let mut mirror = Mirror::builder(Arc::clone(target), Arc::clone(target))
        .gamma(gamma)
        .schedule(DraftSchedule::FullGrid)
        .window(WindowPolicy::Fixed)
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
            hits += out.stats.reuse_hits;
        }
        assert!(hits > 0, "draft {name}: no branch was ever reused");
    }
}

/// The last-position rows of `tokens` through the target: after `exit` layers through the final
/// norm and LM head (the early-exit tap), and after all layers. Plain fresh passes.
fn tap_and_final(target: &Model, tokens: &[u32], exit: usize) -> (Vec<f32>, Vec<f32>) {
    let mut cache = target.new_cache(1, tokens.len()).unwrap();
    let input = AttentionInput::causal(1, tokens.len(), 0, target.device()).unwrap();
    let hidden = target.embed(&[tokens]).unwrap();
    let early = target
        .forward_layers(&hidden, 0..exit, &input, &mut cache)
        .unwrap();
    let last = |h: &mirror_core::Tensor| {
        let rows = target.logits(h).unwrap().squeeze(0).unwrap();
        rows.get(tokens.len() - 1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let late = target
        .forward_layers(&early, exit..target.num_layers(), &input, &mut cache)
        .unwrap();
    (last(&early), last(&late))
}

/// The miss claim, made exact and checked: with a full tree, the next window is rolled out
/// afresh only when the target's token at the deciding row (the correction, or the bonus) lies
/// outside that row's early-exit top-kappa. Recomputed here, window by window, from the
/// committed tokens alone (each streamed batch is one window's `w_1..w_A, c`) with plain passes
/// through the target: the windows counted must match, misses may not exceed those
/// corrections, and Omega (the final distribution's mass on the candidates at the deciding row)
/// must match the decoder's own.
///
/// The paper's `FF <= 1 - Omega` is printed, not asserted: it is not a bound here. A greedy
/// correction is the argmax, and a sampled one after a rejection comes from a residual, not
/// from the final distribution, so a miss can be likelier than `1 - Omega`.
#[test]
fn full_tree_misses_need_a_correction_outside_the_early_exit_candidates() {
    let pair = pair();
    let target = &pair.target;
    // Plus a draft good enough to have whole windows accepted without guessing every bonus.
    let mut drafts = pair.drafts.clone();
    drafts.push(("first two layers", Arc::new(target.truncated(2).unwrap())));
    for (name, draft) in &drafts {
        for (kappa, exit) in [(1, 1), (4, 1), (4, 2)] {
            let mut mirror = Mirror::builder(Arc::clone(target), Arc::clone(draft))
                .gamma(3)
                .kappa(kappa)
                .early_exit(EarlyExit::Layer(exit))
                .schedule(DraftSchedule::FullGrid)
                .window(WindowPolicy::Fixed)
                .build()
                .unwrap();
            let (mut windows, mut misses, mut outside_total, mut omega_total) = (0, 0, 0, 0.0);
            for prompt in PROMPTS {
                let mut run = |max_new_tokens| {
                    let mut batches: Vec<Vec<u32>> = Vec::new();
                    let config = GenerationConfig {
                        max_new_tokens,
                        ..config()
                    };
                    let out = mirror
                        .generate_with(prompt, &config, &mut |new| {
                            batches.push(new.to_vec());
                            StreamControl::Continue
                        })
                        .unwrap();
                    (out.stats, batches)
                };
                let (s, cut) = run(NEW_TOKENS);
                // The length limit may cut the last window's batch: the same generation run
                // longer gives it whole (greedy Mirror with a full tree is deterministic).
                let (_, batches) = run(NEW_TOKENS + 4);
                let what = format!("{name} kappa={kappa} exit={exit} prompt {prompt:?}");
                assert_eq!(s.windows, cut.len(), "{what}: windows");
                let windows_of_cut = &batches[..cut.len()];
                let last = cut.len() - 1;
                assert_eq!(cut[..last], windows_of_cut[..last], "{what}");
                assert!(windows_of_cut[last].starts_with(&cut[last]), "{what}");
                let mut seq = prompt.to_vec();
                let (mut outside, mut omega) = (0, 0.0);
                for batch in windows_of_cut {
                    let (&c, accepted) = batch.split_last().unwrap();
                    seq.extend_from_slice(accepted);
                    let (tap, last) = tap_and_final(target, &seq, exit);
                    let mut order: Vec<usize> = (0..tap.len()).collect();
                    order.sort_by(|&a, &b| tap[b].total_cmp(&tap[a]).then(a.cmp(&b)));
                    let candidates = &order[..kappa];
                    outside += usize::from(!candidates.contains(&(c as usize)));
                    let max = last.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                    let total: f64 = last.iter().map(|&l| (l as f64 - max).exp()).sum();
                    omega += candidates
                        .iter()
                        .map(|&t| (last[t] as f64 - max).exp() / total)
                        .sum::<f64>();
                    seq.push(c);
                }
                assert!(
                    s.reuse_misses <= outside,
                    "{what}: {} misses but only {outside} corrections outside the candidates",
                    s.reuse_misses
                );
                assert!(
                    (s.omega_sum - omega).abs() <= 1e-4 * s.windows as f64,
                    "{what}: Omega summed {} by the decoder, {omega} recomputed",
                    s.omega_sum
                );
                windows += s.windows;
                misses += s.reuse_misses;
                outside_total += outside;
                omega_total += s.omega_sum;
            }
            eprintln!(
                "{name} kappa={kappa} exit={exit}: FF {:.2}, corrections outside {:.2}, 1 - Omega {:.2}",
                misses as f64 / windows as f64,
                outside_total as f64 / windows as f64,
                1.0 - omega_total / windows as f64
            );
        }
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

/// Prompts where lookup finds something: a repeated phrase, one token repeated, and a phrase
/// that recurs once.
const REPEATING: [&[u32]; 3] = [
    &[7, 8, 9, 10, 7, 8, 9, 10, 7, 8],
    &[5, 5, 5, 5, 5, 5],
    &[40, 41, 42, 43, 44, 45, 1, 2, 40, 41],
];

/// Every way to draft with lookup, and adaptive windows with and without it.
fn lookup_and_adaptive_decoders(target: &Arc<Model>, draft: &Arc<Model>) -> Vec<Box<dyn Decoder>> {
    let single = LookupConfig {
        max_ngram: 3,
        min_ngram: 1,
    };
    let sd = || SpeculativeDecoding::builder(Arc::clone(target), Arc::clone(draft));
    let lookup = || SpeculativeDecoding::prompt_lookup(Arc::clone(target));
    let mirror = || Mirror::builder(Arc::clone(target), Arc::clone(draft)).kappa(3);
    let full = DraftSchedule::FullGrid;
    vec![
        Box::new(lookup().build().unwrap()),
        Box::new(lookup().prompt_lookup(single).gamma(6).build().unwrap()),
        Box::new(lookup().window(WindowPolicy::Fixed).build().unwrap()),
        Box::new(sd().build().unwrap()),
        Box::new(sd().prompt_lookup(single).build().unwrap()),
        Box::new(
            sd().prompt_lookup(single)
                .window(WindowPolicy::Fixed)
                .build()
                .unwrap(),
        ),
        Box::new(mirror().build().unwrap()),
        Box::new(mirror().prompt_lookup(single).build().unwrap()),
        Box::new(
            mirror()
                .prompt_lookup(single)
                .schedule(full)
                .build()
                .unwrap(),
        ),
        Box::new(
            mirror()
                .prompt_lookup(single)
                .window(WindowPolicy::Fixed)
                .build()
                .unwrap(),
        ),
    ]
}

#[test]
fn greedy_lookup_and_adaptive_windows_are_token_identical() {
    let pair = pair();
    let target = &pair.target;
    let prompts: Vec<&[u32]> = PROMPTS.iter().chain(&REPEATING).copied().collect();
    let mut ar = Autoregressive::new(Arc::clone(target));
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| ar.generate(p, &config()).unwrap().tokens)
        .collect();
    let mut looked_up = 0;
    for (name, draft) in &pair.drafts {
        for mut decoder in lookup_and_adaptive_decoders(target, draft) {
            for (prompt, want) in prompts.iter().zip(&expected) {
                let got = decoder.generate(prompt, &config()).unwrap();
                assert_eq!(
                    &got.tokens,
                    want,
                    "{} draft={name} {prompt:?}",
                    decoder.name()
                );
                assert_eq!(got.finish_reason, FinishReason::Length);
                looked_up += got.stats.lookup_windows;
            }
        }
    }
    assert!(looked_up > 0, "no window was ever looked up");
}

#[test]
fn lookup_at_the_context_end_on_an_empty_prompt_and_in_repeated_text() {
    let pair = pair();
    let target = &pair.target;
    let draft = &pair.drafts[1].1;
    let mut ar = Autoregressive::new(Arc::clone(target));
    // A repeated phrase right up to the context's end (256 positions): lookup proposes whole
    // windows past the last position, which must be cut to what the cache can verify.
    let near_end: Vec<u32> = (0..250).map(|i| [11, 12, 13, 14, 15][i % 5]).collect();
    // One token repeated: lookup proposes more of it at every step.
    let repeated: Vec<u32> = vec![9; 40];
    let config = GenerationConfig {
        stop_at_eos: false,
        ..GenerationConfig::greedy(40)
    };
    for prompt in [&near_end, &repeated] {
        let want = ar.generate(prompt, &config).unwrap();
        for mut decoder in lookup_and_adaptive_decoders(target, draft) {
            let got = decoder.generate(prompt, &config).unwrap();
            assert_eq!(got.tokens, want.tokens, "{}", decoder.name());
            assert_eq!(got.finish_reason, want.finish_reason, "{}", decoder.name());
        }
    }
    assert_eq!(
        ar.generate(&near_end, &config).unwrap().finish_reason,
        FinishReason::ContextLimit
    );
    // An empty prompt is an error (there is nothing to continue), for every drafter.
    for mut decoder in lookup_and_adaptive_decoders(target, draft) {
        let err = decoder.generate(&[], &config).unwrap_err();
        assert!(matches!(err, Error::InvalidPrompt(_)), "{err}");
    }
    // Without a draft model there must be lookup, and its n-grams must make sense.
    let nothing = SpeculativeDecoding::prompt_lookup(Arc::clone(target))
        .speculative_settings(Default::default());
    assert!(matches!(nothing.build(), Err(Error::InvalidConfig(_))));
    let bad = SpeculativeDecoding::prompt_lookup(Arc::clone(target)).prompt_lookup(LookupConfig {
        max_ngram: 2,
        min_ngram: 3,
    });
    assert!(matches!(bad.build(), Err(Error::InvalidConfig(_))));
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
    common::tiny_model_threads();
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
                    // The draft's own count of tokens it put in windows equals the windows'
                    // lengths as verified (rejected lookahead tokens counted by neither).
                    let s = &got.stats;
                    assert_eq!(
                        s.draft_tokens,
                        s.position_proposed.iter().sum::<usize>(),
                        "{name}: eta {}",
                        s.eta()
                    );
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
fn lookahead_drafts_propose_several_tokens_per_step() {
    common::tiny_model_threads();
    let target = Arc::new(common::load_fixture("qwen2"));
    let plain = Arc::new(target.truncated(1).unwrap());
    let streamed = Arc::clone(&lookahead_drafts(&target)[2].1); // identical + 3 lookahead
    let gamma = 7;
    let run_with = |draft: &Arc<Model>, sampled: bool, confidence: f32| {
        let mut sd = SpeculativeDecoding::builder(Arc::clone(&target), Arc::clone(draft))
            .gamma(gamma)
            .lookahead_confidence(confidence)
            .window(WindowPolicy::Fixed)
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
    assert_eq!(
        greedy.draft_tokens,
        greedy.position_proposed.iter().sum::<usize>()
    );
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
