//! The three strategies agree: greedy output of vanilla SD and Mirror-SD is token-identical to
//! the target alone, across gamma, kappa, exit layers and drafting schedules; an identical draft
//! has every window accepted; Mirror's tree is actually reused. Drafts with speculative streams
//! (several tokens per step) keep all of that.

mod common;

use std::sync::Arc;

use mirror_core::{AttentionInput, Model, StreamConfig};
use mirror_sd::mirror_scheduler::{
    Autoregressive, Decoder, DraftSchedule, EarlyExit, FinishReason, GenerationConfig, Mirror,
    SpeculativeDecoding, StreamControl,
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

/// The fallback claim, made exact and checked: with a full tree, the next window is rolled out
/// afresh only when the target's token at the deciding row (the correction, or the bonus) lies
/// outside that row's early-exit top-kappa. Recomputed here, window by window, from the
/// committed tokens alone (each streamed batch is one window's `w_1..w_A, c`) with plain passes
/// through the target: the windows counted must match, fallbacks may not exceed those
/// corrections, and Omega (the final distribution's mass on the candidates at the deciding row)
/// must match the decoder's own.
///
/// The paper's `FF <= 1 - Omega` is printed, not asserted: it is not a bound here. A greedy
/// correction is the argmax, and a sampled one after a rejection comes from a residual, not
/// from the final distribution, so a miss can be likelier than `1 - Omega`.
#[test]
fn full_tree_fallbacks_need_a_correction_outside_the_early_exit_candidates() {
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
                .build()
                .unwrap();
            let (mut windows, mut fallbacks, mut outside_total, mut omega_total) = (0, 0, 0, 0.0);
            for prompt in PROMPTS {
                let mut run = |max_new_tokens| {
                    let mut batches: Vec<Vec<u32>> = Vec::new();
                    let config = GenerationConfig {
                        max_new_tokens,
                        ..config()
                    };
                    let out = mirror
                        .generate_stream(prompt, &config, &mut |new| {
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
                    s.fallbacks <= outside,
                    "{what}: {} fallbacks but only {outside} corrections outside the candidates",
                    s.fallbacks
                );
                assert!(
                    (s.omega_sum - omega).abs() <= 1e-4 * s.windows as f64,
                    "{what}: Omega summed {} by the decoder, {omega} recomputed",
                    s.omega_sum
                );
                windows += s.windows;
                fallbacks += s.fallbacks;
                outside_total += outside;
                omega_total += s.omega_sum;
            }
            eprintln!(
                "{name} kappa={kappa} exit={exit}: FF {:.2}, corrections outside {:.2}, 1 - Omega {:.2}",
                fallbacks as f64 / windows as f64,
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
    // Drafts with streams stop the same way (their streams would reach past the context).
    for (name, draft) in stream_drafts(&pair.target) {
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

/// Drafts with random speculative streams: one stream over the top layer, and three over two.
fn stream_drafts(target: &Arc<Model>) -> Vec<(&'static str, Arc<Model>)> {
    let one = StreamConfig {
        num_streams: 1,
        stream_layers: 1,
        rank: 4,
    };
    let three = StreamConfig {
        num_streams: 3,
        stream_layers: 2,
        rank: 8,
    };
    let with = |model: &Model, config: StreamConfig, seed| {
        let head = common::random_head(config, model.hidden_size(), seed);
        Arc::new(model.with_streams(Arc::new(head)).unwrap())
    };
    let first_layer = target.truncated(1).unwrap();
    let unrelated = common::load_fixture("llama");
    vec![
        ("identical+1 stream", with(target, one.clone(), 1)),
        ("first layer+1 stream", with(&first_layer, one, 2)),
        ("identical+3 streams", with(target, three.clone(), 3)),
        ("unrelated+3 streams", with(&unrelated, three, 4)),
    ]
}

#[test]
fn greedy_decoding_with_stream_drafts_is_token_identical() {
    common::tiny_model_threads();
    let target = Arc::new(common::load_fixture("qwen2"));
    let expected = reference(&target);
    for (name, draft) in stream_drafts(&target) {
        for gamma in [1, 3, 7] {
            // Every stream token proposed, and only confident ones.
            for confidence in [0.0, 0.2] {
                let mut sd = SpeculativeDecoding::builder(Arc::clone(&target), Arc::clone(&draft))
                    .gamma(gamma)
                    .stream_confidence(confidence)
                    .build()
                    .unwrap();
                for (prompt, want) in PROMPTS.iter().zip(&expected) {
                    let got = sd.generate(prompt, &config()).unwrap();
                    assert_eq!(
                        &got.tokens, want,
                        "SD draft={name} gamma={gamma} confidence={confidence}"
                    );
                    // The draft's own count of tokens it put in windows equals the windows'
                    // lengths as verified (rejected stream tokens counted by neither).
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
                    .stream_confidence(0.0)
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
    common::tiny_model_threads();
    let target = Arc::new(common::load_fixture("qwen2"));
    let plain = Arc::new(target.truncated(1).unwrap());
    let streamed = Arc::clone(&stream_drafts(&target)[2].1); // identical + 3 streams
    let gamma = 7;
    let run_with = |draft: &Arc<Model>, sampled: bool, confidence: f32| {
        let mut sd = SpeculativeDecoding::builder(Arc::clone(&target), Arc::clone(draft))
            .gamma(gamma)
            .stream_confidence(confidence)
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
    // A sampling draft keeps every stream token: windows of 7 take steps of 4 + 3 tokens.
    let sampled = run(&streamed, true);
    assert!((sampled.eta() - 3.5).abs() < 1e-9, "eta {}", sampled.eta());
    assert_eq!(sampled.draft_steps, 2 * sampled.windows);
    // Greedy: stream tokens the main stream disagrees with are replaced by its own, so an
    // identical draft's windows are right up to the last step's unchecked stream tokens.
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
    // A threshold no stream reaches turns the streams off: one token per step again.
    assert_eq!(run_with(&streamed, true, 1.0).eta(), 1.0);
    assert_eq!(run_with(&streamed, false, 1.0).eta(), 1.0);
    // Out-of-range thresholds are configuration errors.
    let bad = SpeculativeDecoding::builder(Arc::clone(&target), Arc::clone(&streamed))
        .stream_confidence(1.5)
        .build();
    assert!(bad.is_err());
}
