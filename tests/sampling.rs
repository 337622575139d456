//! Sampling is lossless, checked over whole windows. On a 6-token vocabulary, the joint
//! distribution of the first 3 generated tokens (gamma 1) or 4 (gamma 2) under vanilla SD and
//! Mirror-SD must match the target's exact distribution (enumerated from the target model
//! itself), by a chi-square test. Those tokens cover a first window with rejections at every
//! position, the bonus token after a fully accepted window, and the next window after either.
//! Outcomes of probability exactly 0 (cut by top-k/top-p) must never be drawn.
//!
//! The test's own power is measured too: at the same number of draws it rejects a
//! deliberately biased verifier, and it detects a shift of the output distribution by a known
//! total-variation distance (see [`the_test_detects_a_small_shift`]).

mod common;

use std::sync::Arc;

use common::chi_square::chi_square;

use mirror_core::sampling::{self, Probs, SamplingParams};
use mirror_core::Model;
use mirror_sd::mirror_scheduler::verify::verify_window;
use mirror_sd::mirror_scheduler::window::{DraftChoice, DraftWindow};
use mirror_sd::mirror_scheduler::{
    BatchSettings, Decoder, DraftSchedule, EngineHandle, GenerationConfig, LookupConfig, Mirror,
    MirrorSettings, SequenceRequest, Speculation, SpeculativeDecoding, WindowPolicy,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

const VOCAB: usize = 6;
const PROMPT: [u32; 3] = [1, 4, 2];
/// Draws per chi-square test (one generation each).
const DRAWS: usize = 3000;

struct Models {
    target: Arc<Model>,
    draft: Arc<Model>,
    _dir: tempfile::TempDir,
}

/// The tiny pair. See [`common::tiny_model_threads`]: a forward of these models is a few
/// microseconds of arithmetic, and candle's multi-threaded matmul setup costs far more.
fn models() -> Models {
    common::tiny_model_threads();
    let dir = tempfile::tempdir().unwrap();
    let load = |name: &str, arch: &str, layers: usize, seed: u64| {
        Arc::new(common::random_model(
            &dir.path().join(name),
            arch,
            VOCAB,
            layers,
            seed,
        ))
    };
    let target = load("target", "qwen2", 2, 11);
    let draft = load("draft", "llama", 1, 12);
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

/// Index of an outcome `t_1..t_n` (base-VOCAB digits, first token most significant).
fn outcome_index(tokens: &[u32]) -> usize {
    tokens.iter().fold(0, |i, &t| i * VOCAB + t as usize)
}

/// Exact P(t_1..t_n) of `model` under `params`, by enumerating every prefix.
fn exact_joint(model: &Model, params: &SamplingParams, n: usize) -> Vec<f64> {
    exact_joint_with(model, params, n, &|_, _| {})
}

/// [`exact_joint`] with `change(logits, prefix)` applied to each row's logits first.
fn exact_joint_with(
    model: &Model,
    params: &SamplingParams,
    n: usize,
    change: &dyn Fn(&mut [f32], &[u32]),
) -> Vec<f64> {
    struct Walk<'a> {
        model: &'a Model,
        params: &'a SamplingParams,
        change: &'a dyn Fn(&mut [f32], &[u32]),
        joint: Vec<f64>,
    }
    impl Walk<'_> {
        fn walk(&mut self, prefix: &mut Vec<u32>, left: usize, mass: f64) {
            if left == 0 {
                self.joint[outcome_index(&prefix[PROMPT.len()..])] = mass;
                return;
            }
            let mut logits = last_logits(self.model, prefix);
            (self.change)(&mut logits, prefix);
            let p = sampling::warp(&logits, self.params);
            for (t, &pt) in p.iter().enumerate() {
                prefix.push(t as u32);
                self.walk(prefix, left - 1, mass * pt as f64);
                prefix.pop();
            }
        }
    }
    let mut walk = Walk {
        model,
        params,
        change,
        joint: vec![0.0; VOCAB.pow(n as u32)],
    };
    walk.walk(&mut PROMPT.to_vec(), n, 1.0);
    walk.joint
}

fn config(params: SamplingParams, n: usize, seed: u64) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: n,
        sampling: params,
        seed,
        stop_at_eos: false,
        stop_tokens: Vec::new(),
        ..GenerationConfig::default()
    }
}

/// Counts of the first `n` tokens over `DRAWS` seeded generations.
fn sample_outcomes(decoder: &mut dyn Decoder, params: SamplingParams, n: usize) -> Vec<usize> {
    let mut counts = vec![0; VOCAB.pow(n as u32)];
    for seed in 0..DRAWS as u64 {
        let out = decoder.generate(&PROMPT, &config(params, n, seed)).unwrap();
        assert_eq!(out.tokens.len(), n);
        counts[outcome_index(&out.tokens)] += 1;
    }
    counts
}

fn params_list() -> [SamplingParams; 2] {
    [
        // No cuts, a little flatter than the models: at temperature 1 the tiny target is so
        // peaked that rows after different tokens look alike, and a bonus drawn from the wrong
        // row is barely visible (chi2 60 against 46 at gamma 1; 781 against 78 here).
        SamplingParams {
            temperature: 1.5,
            top_k: 0,
            top_p: 1.0,
        },
        // A flatter warp with both cuts active: several outcomes remain, many are impossible.
        SamplingParams {
            temperature: 2.0,
            top_k: 4,
            top_p: 0.9,
        },
    ]
}

/// Window length and the tokens observed with it: the first window, the bonus after it, and
/// at least one token of the next window.
const WINDOWS: [(usize, usize); 2] = [(1, 3), (2, 4)];

fn assert_matches(what: &str, counts: &[usize], expected: &[f64]) {
    let test = chi_square(counts, expected);
    eprintln!(
        "{what}: chi2 {:.1} < {:.1} over {} bins?",
        test.stat, test.critical, test.bins
    );
    assert_eq!(
        test.impossible, 0,
        "{what}: {} draws of outcomes of probability 0",
        test.impossible
    );
    assert!(!test.rejects(), "{what}: {test:?}");
}

#[test]
fn speculative_sampling_matches_the_target_over_whole_windows() {
    let m = models();
    for params in params_list() {
        for (gamma, n) in WINDOWS {
            let expected = exact_joint(&m.target, &params, n);
            for greedy_draft in [false, true] {
                let mut sd =
                    SpeculativeDecoding::builder(Arc::clone(&m.target), Arc::clone(&m.draft))
                        .gamma(gamma)
                        .greedy_draft(greedy_draft)
                        .window(WindowPolicy::Fixed)
                        .build()
                        .unwrap();
                let counts = sample_outcomes(&mut sd, params, n);
                let what = format!("SD gamma={gamma} greedy_draft={greedy_draft} {params:?}");
                assert_matches(&what, &counts, &expected);
            }
        }
    }
}

#[test]
fn mirror_sampling_matches_the_target_over_whole_windows() {
    let m = models();
    let anytime = DraftSchedule::Anytime {
        branches_per_pass: 2,
    };
    for params in params_list() {
        for (gamma, n) in WINDOWS {
            let expected = exact_joint(&m.target, &params, n);
            for (schedule, greedy_draft) in [
                (DraftSchedule::FullGrid, false),
                (anytime, false),
                (anytime, true),
            ] {
                let mut mirror = Mirror::builder(Arc::clone(&m.target), Arc::clone(&m.draft))
                    .gamma(gamma)
                    .kappa(3)
                    .schedule(schedule)
                    .greedy_draft(greedy_draft)
                    .window(WindowPolicy::Fixed)
                    .build()
                    .unwrap();
                let counts = sample_outcomes(&mut mirror, params, n);
                let what = format!(
                    "Mirror {schedule:?} gamma={gamma} greedy_draft={greedy_draft} {params:?}"
                );
                assert_matches(&what, &counts, &expected);
            }
        }
    }
}

#[test]
fn mirror_sampling_in_a_batch_matches_the_target_over_whole_windows() {
    // Mirror sequences sampled in the batched engine, eight at a time beside sampled plain
    // neighbours, the step's tap and trees shared out: kappa 3 alone, lowered to 2 at a full
    // batch (16 candidates a step), adaptive windows (the default), full-grid trees (so that
    // windows come from the trees whatever the machine's pace).
    let m = models();
    let params = params_list()[1];
    let (gamma, n) = WINDOWS[1];
    let expected = exact_joint(&m.target, &params, n);
    let settings = BatchSettings {
        max_batch: 8,
        mirror: MirrorSettings {
            kappa: 3,
            batch_candidates: 16,
            schedule: DraftSchedule::FullGrid,
            ..MirrorSettings::default()
        },
        ..BatchSettings::default()
    };
    let engine =
        EngineHandle::spawn_with_draft(Arc::clone(&m.target), Arc::clone(&m.draft), None, settings)
            .unwrap();
    let mut streams = Vec::new();
    for seed in 0..DRAWS as u64 {
        let request = |speculation| SequenceRequest {
            speculation,
            ..SequenceRequest::new(PROMPT.to_vec(), config(params, n, seed))
        };
        streams.push(
            engine
                .submit(request(Speculation::Mirror { gamma }))
                .unwrap(),
        );
        if seed % 4 == 0 {
            // A neighbour, whose output is not counted.
            drop(engine.submit(request(Speculation::None)).unwrap());
        }
    }
    let mut counts = vec![0; VOCAB.pow(n as u32)];
    let mut hits = 0;
    for stream in streams {
        let out = stream.wait().unwrap();
        assert_eq!(out.tokens.len(), n);
        hits += out.stats.reuse_hits;
        counts[outcome_index(&out.tokens)] += 1;
    }
    assert!(hits > 0, "no window came from a tree");
    assert_matches("Mirror in a batch", &counts, &expected);
}

#[test]
fn lookahead_draft_sampling_matches_the_target_over_whole_windows() {
    // The draft proposes two tokens per step (main row + one random lookahead row), so the
    // second token of a window comes from the lookahead row's own distribution: the verifier must divide by
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
    let (gamma, n) = WINDOWS[1];
    let expected = exact_joint(&m.target, &params, n);
    for greedy_draft in [false, true] {
        let mut sd = SpeculativeDecoding::builder(Arc::clone(&m.target), Arc::clone(&draft))
            .gamma(gamma)
            .greedy_draft(greedy_draft)
            .lookahead_confidence(0.0)
            .window(WindowPolicy::Fixed)
            .build()
            .unwrap();
        let counts = sample_outcomes(&mut sd, params, n);
        assert_matches(
            &format!("SD+lookahead greedy_draft={greedy_draft}"),
            &counts,
            &expected,
        );
        let mut mirror = Mirror::builder(Arc::clone(&m.target), Arc::clone(&draft))
            .gamma(gamma)
            .kappa(3)
            .schedule(DraftSchedule::FullGrid)
            .greedy_draft(greedy_draft)
            .lookahead_confidence(0.0)
            .window(WindowPolicy::Fixed)
            .build()
            .unwrap();
        let counts = sample_outcomes(&mut mirror, params, n);
        assert_matches(
            &format!("Mirror+lookahead greedy_draft={greedy_draft}"),
            &counts,
            &expected,
        );
    }
}

#[test]
fn lookup_drafts_and_adaptive_windows_sample_the_target_over_whole_windows() {
    // Lookup of single tokens proposes often in a 6-token vocabulary: after the first token
    // nearly every step has a looked-up window (point masses), alone, before the model, or in
    // Mirror's tree. Windows are adaptive: their lengths follow timings (and, after a few
    // windows, acceptance), never the target's randomness.
    let m = models();
    let lookup = LookupConfig {
        max_ngram: 2,
        min_ngram: 1,
    };
    let (gamma, n) = WINDOWS[1];
    for params in params_list() {
        let expected = exact_joint(&m.target, &params, n);
        let decoders: Vec<(&str, Box<dyn Decoder>)> = vec![
            (
                "lookup alone",
                Box::new(
                    SpeculativeDecoding::prompt_lookup(Arc::clone(&m.target))
                        .prompt_lookup(lookup)
                        .gamma(gamma)
                        .build()
                        .unwrap(),
                ),
            ),
            (
                "SD, lookup then model",
                Box::new(
                    SpeculativeDecoding::builder(Arc::clone(&m.target), Arc::clone(&m.draft))
                        .prompt_lookup(lookup)
                        .gamma(gamma)
                        .build()
                        .unwrap(),
                ),
            ),
            (
                "Mirror, lookup in the tree",
                Box::new(
                    Mirror::builder(Arc::clone(&m.target), Arc::clone(&m.draft))
                        .prompt_lookup(lookup)
                        .gamma(gamma)
                        .kappa(3)
                        .schedule(DraftSchedule::FullGrid)
                        .build()
                        .unwrap(),
                ),
            ),
            (
                "Mirror, adaptive, model only",
                Box::new(
                    Mirror::builder(Arc::clone(&m.target), Arc::clone(&m.draft))
                        .gamma(gamma)
                        .kappa(3)
                        .build()
                        .unwrap(),
                ),
            ),
        ];
        for (name, mut decoder) in decoders {
            let counts = sample_outcomes(decoder.as_mut(), params, n);
            assert_matches(&format!("{name} {params:?}"), &counts, &expected);
            if name.contains("lookup") {
                let stats = decoder
                    .generate(&PROMPT, &config(params, 16, 1))
                    .unwrap()
                    .stats;
                assert!(stats.lookup_windows > 0, "{name}: no window was looked up");
            }
        }
    }
}

/// How the test-local decoding loop below verifies its windows.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Verifier {
    /// The library's rule, as the decoders call it.
    Exact,
    /// The bonus token drawn from the row before the last one.
    BonusFromPreviousRow,
    /// The ratio rule divides by `(1 - eps) q + eps * uniform` instead of the `q` the draft
    /// sampled from.
    SkewedQ(f64),
}

/// Vanilla SD written out plainly over the public pieces (draft logits, `warp_probs`, one
/// causal target pass, `verify_window`), with a verifier that can be biased on purpose. Returns
/// the first `n` tokens.
fn local_sd(
    m: &Models,
    params: &SamplingParams,
    gamma: usize,
    n: usize,
    seed: u64,
    verifier: Verifier,
) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seq = PROMPT.to_vec();
    while seq.len() < PROMPT.len() + n {
        let mut window = DraftWindow::default();
        let mut context = seq.clone();
        for _ in 0..gamma {
            let q = sampling::warp_probs(&last_logits(&m.draft, &context), params);
            let x = q.sample(rng.random());
            let shown = match verifier {
                Verifier::SkewedQ(eps) => Probs::dense(
                    q.to_dense()
                        .iter()
                        .map(|&v| ((1.0 - eps) * v as f64 + eps / VOCAB as f64) as f32)
                        .collect(),
                ),
                _ => q,
            };
            window.tokens.push(x);
            window.choices.push(DraftChoice::Sampled(shown));
            context.push(x);
        }
        let mut cache = m.target.new_cache(1, 32).unwrap();
        let logits = m.target.forward_causal(&context, &mut cache).unwrap();
        let mut rows: Vec<Vec<f32>> = logits.to_vec2().unwrap()[seq.len() - 1..].to_vec();
        if verifier == Verifier::BonusFromPreviousRow {
            rows[gamma] = rows[gamma - 1].clone();
        }
        let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
        let verdict = verify_window(&refs, &window, params, &mut || rng.random()).unwrap();
        seq.extend_from_slice(&window.tokens[..verdict.accepted]);
        seq.push(verdict.token);
    }
    seq[PROMPT.len()..PROMPT.len() + n].to_vec()
}

fn local_counts(
    m: &Models,
    params: &SamplingParams,
    gamma: usize,
    n: usize,
    verifier: Verifier,
) -> Vec<usize> {
    let mut counts = vec![0; VOCAB.pow(n as u32)];
    for seed in 0..DRAWS as u64 {
        counts[outcome_index(&local_sd(m, params, gamma, n, seed, verifier))] += 1;
    }
    counts
}

/// The window test at the same draws rejects verifiers that are wrong: one that draws the
/// bonus from the wrong row, and one whose ratio rule divides by a slightly wrong q. The exact
/// rule through the same loop passes, so the loop itself is sound.
#[test]
fn the_window_test_rejects_biased_verifiers() {
    let m = models();
    let params = params_list()[0];
    let (gamma, n) = WINDOWS[0];
    let expected = exact_joint(&m.target, &params, n);
    for (verifier, should_reject) in [
        (Verifier::Exact, false),
        (Verifier::BonusFromPreviousRow, true),
        (Verifier::SkewedQ(0.1), true),
    ] {
        let test = chi_square(&local_counts(&m, &params, gamma, n, verifier), &expected);
        eprintln!("{verifier:?}: {test:?}");
        assert_eq!(test.rejects(), should_reject, "{verifier:?}: {test:?}");
    }
}

/// The test's power against a known shift of the output distribution: draws from
/// `(1 - d) P + d R`, where `P` is the target's exact joint of 4 tokens, are rejected in at least
/// 9 of 10 repetitions once the total variation distance `d * TV(P, R)` reaches the value
/// printed here, for three directions `R`: the draft's joint (mass moved to outcomes the target
/// finds unlikely), the uniform distribution, and the target's own joint at temperature 1 (mass
/// moved towards the likely outcomes: the hardest of the three). None is rejected at `d = 0`.
/// Measured at 3000 draws: TV 0.016 (draft), 0.044 (uniform), 0.072 (sharper target).
#[test]
fn the_test_detects_a_small_shift() {
    let m = models();
    let params = params_list()[0];
    let n = WINDOWS[1].1;
    let p = exact_joint(&m.target, &params, n);
    let sharper = SamplingParams {
        temperature: 1.0,
        ..params
    };
    let directions = [
        ("draft joint", exact_joint(&m.draft, &params, n)),
        ("uniform", vec![1.0 / p.len() as f64; p.len()]),
        (
            "target at temperature 1",
            exact_joint(&m.target, &sharper, n),
        ),
    ];
    for (name, r) in &directions {
        let tv_pr: f64 = 0.5 * p.iter().zip(r).map(|(a, b)| (a - b).abs()).sum::<f64>();
        let draw_counts = |d: f64, seed: u64| {
            let mixed: Vec<f32> = p
                .iter()
                .zip(r)
                .map(|(a, b)| ((1.0 - d) * a + d * b) as f32)
                .collect();
            let mut rng = StdRng::seed_from_u64(seed);
            let mut counts = vec![0; p.len()];
            for _ in 0..DRAWS {
                counts[sampling::sample(&mixed, rng.random()) as usize] += 1;
            }
            counts
        };
        let rejections = |d: f64| {
            (0..10)
                .filter(|&s| chi_square(&draw_counts(d, s), &p).rejects())
                .count()
        };
        assert_eq!(rejections(0.0), 0, "{name}");
        let mut d = 0.002;
        let tv = loop {
            let hits = rejections(d);
            if hits >= 9 {
                break d * tv_pr;
            }
            assert!(d < 1.0, "{name}: no shift was detected");
            d = (d * 1.1).min(1.0);
        };
        eprintln!("{name}: smallest detected shift TV {tv:.4} (d = {d:.3}, TV(P, R) = {tv_pr:.3})");
        assert!(
            tv <= 0.1,
            "{name}: the test detects only shifts of TV {tv:.4}"
        );
    }
}

#[test]
fn the_test_rejects_a_biased_rule() {
    // One window of one greedy draft token after the prompt, verified by the correct point-mass
    // rule and by the biased rule (the draft's soft q for a deterministic pick); the first
    // committed token's distribution is compared with the target's, with the same statistic.
    let m = models();
    // The flatter of the two warps: there the draft's q is spread enough for the biased rule to
    // move the first token's distribution.
    let params = params_list()[1];
    let p_logits = last_logits(&m.target, &PROMPT);
    let q_logits = last_logits(&m.draft, &PROMPT);
    let expected = sampling::warp(&p_logits, &params);
    let expected: Vec<f64> = expected.iter().map(|&p| p as f64).collect();
    let q = sampling::warp_probs(&q_logits, &params);
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
            refused: None,
        };
        let mut counts = vec![0; VOCAB];
        for _ in 0..DRAWS {
            let v = verify_window(&rows, &window, &params, &mut || rng.random()).unwrap();
            let first = if v.accepted == 1 { pick } else { v.token };
            counts[first as usize] += 1;
        }
        let test = chi_square(&counts, &expected);
        eprintln!("{choice:?}: {test:?}");
        assert_eq!(!test.rejects(), should_pass, "{choice:?}: {test:?}");
    }
}

#[test]
fn sampled_generation_is_reproducible_with_a_seed() {
    // Adaptive windows follow timings, so a seed reproduces a sampled run with fixed windows
    // (and, for Mirror, the full grid, whose tree does not depend on when the target is done).
    let m = models();
    let params = params_list()[0];
    let config = config(params, 12, 42);
    let mut mirror = Mirror::builder(Arc::clone(&m.target), Arc::clone(&m.draft))
        .gamma(3)
        .schedule(DraftSchedule::FullGrid)
        .window(WindowPolicy::Fixed)
        .build()
        .unwrap();
    let a = mirror.generate(&PROMPT, &config).unwrap().tokens;
    let b = mirror.generate(&PROMPT, &config).unwrap().tokens;
    assert_eq!(a, b);
    let mut sd = SpeculativeDecoding::builder(Arc::clone(&m.target), Arc::clone(&m.draft))
        .gamma(3)
        .window(WindowPolicy::Fixed)
        .build()
        .unwrap();
    assert_eq!(
        sd.generate(&PROMPT, &config).unwrap().tokens,
        sd.generate(&PROMPT, &config).unwrap().tokens
    );
}

#[test]
fn sequences_sampled_in_a_batch_beside_others_follow_the_target() {
    use mirror_sd::mirror_scheduler::{BatchSettings, EngineHandle, SequenceRequest, Speculation};
    // Batched lookup windows are sized for the batch's goodput (adaptive: measured step times
    // and acceptance), among neighbours that sample with other settings; plain sequences too.
    let m = models();
    let lookup = Speculation::Lookup {
        lookup: LookupConfig {
            max_ngram: 2,
            min_ngram: 1,
        },
        gamma: 2,
    };
    let (_, n) = WINDOWS[1];
    let engine = EngineHandle::spawn(
        Arc::clone(&m.target),
        None,
        BatchSettings {
            max_batch: 16,
            ..BatchSettings::default()
        },
    )
    .unwrap();
    let neighbour = SamplingParams {
        temperature: 0.7,
        top_k: 3,
        top_p: 1.0,
    };
    for params in params_list() {
        let expected = exact_joint(&m.target, &params, n);
        for speculation in [lookup, Speculation::None] {
            let mut streams = Vec::with_capacity(2 * DRAWS);
            for seed in 0..DRAWS as u64 {
                let tested = SequenceRequest {
                    speculation,
                    ..SequenceRequest::new(PROMPT.to_vec(), config(params, n, seed))
                };
                let other = SequenceRequest {
                    speculation: lookup,
                    ..SequenceRequest::new(vec![3, 1, 4, 1, 5], config(neighbour, 7, seed))
                };
                streams.push((true, engine.submit(tested).unwrap()));
                streams.push((false, engine.submit(other).unwrap()));
            }
            let mut counts = vec![0; VOCAB.pow(n as u32)];
            for (tested, stream) in streams {
                let out = stream.wait().unwrap();
                if tested {
                    assert_eq!(out.tokens.len(), n);
                    counts[outcome_index(&out.tokens)] += 1;
                }
            }
            assert_matches(
                &format!("batched {speculation:?} {params:?}"),
                &counts,
                &expected,
            );
        }
    }
}

#[test]
fn penalized_sampling_matches_the_penalized_target_over_whole_windows() {
    use mirror_core::sampling::Penalties;
    use mirror_sd::mirror_scheduler::{
        Autoregressive, BatchSettings, EngineHandle, SequenceRequest, Speculation,
    };
    let m = models();
    let penalties = Penalties {
        frequency: 0.6,
        presence: 0.4,
        repetition: Some(1.5),
        logit_bias: vec![(3, 1.0)],
    };
    // The definitions, written out here: frequency and presence count the generated tokens,
    // the repetition penalty every token of prompt and output, the bias adds.
    let reference = |logits: &mut [f32], prefix: &[u32]| {
        let output = &prefix[PROMPT.len()..];
        for (t, logit) in logits.iter_mut().enumerate() {
            let t = t as u32;
            let count = output.iter().filter(|&&o| o == t).count() as f32;
            if prefix.contains(&t) {
                *logit = if *logit > 0.0 {
                    *logit / 1.5
                } else {
                    *logit * 1.5
                };
            }
            *logit -= 0.6 * count + if count > 0.0 { 0.4 } else { 0.0 };
            if t == 3 {
                *logit += 1.0;
            }
        }
    };
    let params = params_list()[0];
    let (gamma, n) = WINDOWS[1];
    let expected = exact_joint_with(&m.target, &params, n, &reference);
    let penalized = |seed| GenerationConfig {
        penalties: penalties.clone(),
        ..config(params, n, seed)
    };
    let mut decoders: Vec<(&str, Box<dyn Decoder>)> = vec![
        ("AR", Box::new(Autoregressive::new(Arc::clone(&m.target)))),
        (
            "SD",
            Box::new(
                SpeculativeDecoding::builder(Arc::clone(&m.target), Arc::clone(&m.draft))
                    .gamma(gamma)
                    .window(WindowPolicy::Fixed)
                    .build()
                    .unwrap(),
            ),
        ),
        (
            "Mirror",
            Box::new(
                Mirror::builder(Arc::clone(&m.target), Arc::clone(&m.draft))
                    .gamma(gamma)
                    .kappa(3)
                    .window(WindowPolicy::Fixed)
                    .build()
                    .unwrap(),
            ),
        ),
    ];
    for (name, decoder) in &mut decoders {
        let mut counts = vec![0; VOCAB.pow(n as u32)];
        for seed in 0..DRAWS as u64 {
            let out = decoder.generate(&PROMPT, &penalized(seed)).unwrap();
            counts[outcome_index(&out.tokens)] += 1;
        }
        assert_matches(&format!("{name} penalized"), &counts, &expected);
    }
    // The batched engine: draft-model windows, each sequence beside the others.
    let engine = EngineHandle::spawn_with_draft(
        Arc::clone(&m.target),
        Arc::clone(&m.draft),
        None,
        BatchSettings {
            max_batch: 16,
            window: WindowPolicy::Fixed,
            ..BatchSettings::default()
        },
    )
    .unwrap();
    let speculation = Speculation::Draft {
        gamma,
        greedy_draft: false,
    };
    let streams: Vec<_> = (0..DRAWS as u64)
        .map(|seed| {
            let request = SequenceRequest {
                speculation,
                ..SequenceRequest::new(PROMPT.to_vec(), penalized(seed))
            };
            engine.submit(request).unwrap()
        })
        .collect();
    let mut counts = vec![0; VOCAB.pow(n as u32)];
    for stream in streams {
        counts[outcome_index(&stream.wait().unwrap().tokens)] += 1;
    }
    assert_matches("batched SD penalized", &counts, &expected);
    // And the test can tell: the unpenalized target is rejected against these counts.
    let unpenalized = exact_joint(&m.target, &params, n);
    assert!(
        chi_square(&counts, &unpenalized).rejects(),
        "the penalties make no visible difference: the test would not see them missing"
    );
}
