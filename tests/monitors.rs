//! Generation monitors on the batched engine (SmolLM2, greedy): each summary equals an f64
//! reference computed here from the logits and hidden states of one plain forward over the
//! prompt and the generated tokens (also under a frequency penalty, which changes the output
//! but not the raw rows monitors read); summaries are identical under every speculation (the rows
//! and states are batch-invariant); early stop ends with `FinishReason::Monitor` on a prefix of
//! the unmonitored output. Mirror (one sequence) gives the same summaries against the same
//! reference and stops early the same way; the other one-sequence decoders refuse monitors.

// The references are plain index loops on purpose: obviously right, sharing nothing.
#![allow(clippy::needless_range_loop)]

mod common;

use std::sync::Arc;

use mirror_core::sampling::Penalties;
use mirror_core::{load, AttentionInput, LoadOptions, Model, ModelSource, Tokenizer};
use mirror_sd::mirror_scheduler::monitor::{
    InstabilityConfig, LatentTrajectoryConfig, MonitorSummary, PathDeviationConfig,
};
use mirror_sd::mirror_scheduler::{
    Autoregressive, Decoder, Error, FinishReason, GenerationConfig, Mirror, MonitorConfig,
    MonitorReport, SequenceRequest,
};

const TOKENS: usize = 40;

fn config() -> MonitorConfig {
    MonitorConfig {
        instability: Some(InstabilityConfig::default()),
        path_deviation: Some(PathDeviationConfig {
            window: 8,
            threshold: 1.5,
            min_steps: 8,
        }),
        latent_trajectory: Some(LatentTrajectoryConfig {
            layer: None,
            chunk: 8,
        }),
        early_stop: false,
    }
}

fn close(got: Option<f64>, want: Option<f64>, what: &str) {
    match (got, want) {
        (Some(g), Some(w)) => assert!(
            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
            "{what}: engine {g}, reference {w}"
        ),
        _ => assert_eq!(got.is_some(), want.is_some(), "{what}: {got:?} vs {want:?}"),
    }
}

/// Softmax in f64 of one logits row.
fn softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = row.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// (entropy mean, JSD mean, peak, peak index) of the instability monitor, k = 20, λ = 1, base 2.
fn instability_reference(dists: &[Vec<f64>]) -> (f64, f64, f64, usize) {
    let mut previous: Option<Vec<f64>> = None;
    let (mut entropies, mut jsds, mut peak, mut at) = (0.0, 0.0, f64::MIN, 0);
    for (t, p) in dists.iter().enumerate() {
        let mut order: Vec<usize> = (0..p.len()).collect();
        order.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap().then(a.cmp(&b)));
        let total: f64 = order[..20].iter().map(|&i| p[i]).sum();
        let mut dense = vec![0.0; p.len()];
        for &i in &order[..20] {
            dense[i] = p[i] / total;
        }
        let entropy: f64 = dense
            .iter()
            .filter(|&&x| x > 0.0)
            .map(|&x| -x * x.log2())
            .sum();
        let mut jsd = 0.0;
        if let Some(q) = &previous {
            for i in 0..p.len() {
                let m = (dense[i] + q[i]) / 2.0;
                if dense[i] > 0.0 {
                    jsd += 0.5 * dense[i] * (dense[i] / m).log2();
                }
                if q[i] > 0.0 {
                    jsd += 0.5 * q[i] * (q[i] / m).log2();
                }
            }
        }
        if jsd + entropy > peak {
            peak = jsd + entropy;
            at = t;
        }
        entropies += entropy;
        jsds += jsd;
        previous = Some(dense);
    }
    let n = dists.len() as f64;
    (entropies / n, jsds / n, peak, at)
}

#[test]
fn monitor_summaries_equal_a_plain_forward_reference_under_every_speculation() {
    let Some(path) = common::smollm2_path() else {
        return;
    };
    let loaded = load(&ModelSource::Gguf(path), &LoadOptions::default()).expect("load SmolLM2");
    let tokenizer = loaded.tokenizer.clone();
    let target = Arc::new(loaded.model);
    let draft = Arc::new(target.truncated(10).unwrap());
    let prompt = tokenizer
        .encode("List the planets of the solar system, in order:", true)
        .unwrap();
    let base = GenerationConfig {
        stop_at_eos: false,
        ..GenerationConfig::greedy(TOKENS)
    };
    let monitored = GenerationConfig {
        monitors: Some(config()),
        ..base.clone()
    };
    let engine = common::engine_with_draft(&target, &draft, Some(tokenizer.clone()));
    let run = |config: &GenerationConfig, speculation| {
        let request = SequenceRequest {
            speculation,
            ..SequenceRequest::new(prompt.clone(), config.clone())
        };
        engine.generate(request).unwrap()
    };
    let runs: Vec<_> = common::batched_speculations()
        .into_iter()
        .map(|s| run(&monitored, s))
        .collect();
    let first = &runs[0];
    let plain = run(&base, common::batched_speculations()[0]);
    assert_eq!(
        first.tokens, plain.tokens,
        "monitors do not change the output"
    );
    assert_eq!(first.tokens.len(), TOKENS);
    let report = first.monitors.clone().expect("monitors asked for");
    assert_eq!(report.summaries.len(), 3);
    assert_eq!(report.stopped_by, None);
    for other in &runs[1..] {
        assert_eq!(other.tokens, first.tokens);
        assert_eq!(
            other.monitors.as_ref(),
            Some(&report),
            "identical under every speculation"
        );
    }

    check_against_reference(&target, &tokenizer, &prompt, &first.tokens, &report);

    // Mirror (one sequence, SmolLM2's first 10 layers drafting): the same output, and its
    // summaries against the same reference; its latent monitor reads the tap's states, here at
    // the middle layer the reference reads.
    let mut mirror = Mirror::builder(Arc::clone(&target), Arc::clone(&draft))
        .tokenizer(tokenizer.clone())
        .build()
        .unwrap();
    assert_eq!(mirror.early_exit_layer(), target.num_layers() / 2);
    let mirrored = mirror.generate(&prompt, &monitored).unwrap();
    assert_eq!(mirrored.tokens, first.tokens);
    let mirrored_report = mirrored.monitors.clone().expect("monitors asked for");
    check_against_reference(
        &target,
        &tokenizer,
        &prompt,
        &mirrored.tokens,
        &mirrored_report,
    );
    // Another layer than the tap's is refused.
    let elsewhere = GenerationConfig {
        monitors: Some(MonitorConfig {
            latent_trajectory: Some(LatentTrajectoryConfig {
                layer: Some(3),
                chunk: 8,
            }),
            ..config()
        }),
        ..base.clone()
    };
    assert!(matches!(
        mirror.generate(&prompt, &elsewhere),
        Err(Error::InvalidConfig(_))
    ));

    // Under a penalty the output differs, and the monitors still read the target's raw rows.
    let penalized = GenerationConfig {
        penalties: Penalties {
            frequency: 1.5,
            ..Penalties::default()
        },
        ..monitored.clone()
    };
    let other = run(&penalized, common::batched_speculations()[1]);
    assert_ne!(other.tokens, first.tokens, "the penalty changes the output");
    let other_report = other.monitors.clone().expect("monitors asked for");
    check_against_reference(&target, &tokenizer, &prompt, &other.tokens, &other_report);

    // Early stop at a low threshold: a prefix of the unmonitored output.
    let stopping = GenerationConfig {
        monitors: Some(MonitorConfig {
            path_deviation: Some(PathDeviationConfig {
                window: 2,
                threshold: 0.5,
                min_steps: 2,
            }),
            early_stop: true,
            ..config()
        }),
        ..base.clone()
    };
    let mut stopped_runs: Vec<_> = common::batched_speculations()
        .into_iter()
        .map(|speculation| run(&stopping, speculation))
        .collect();
    stopped_runs.push(mirror.generate(&prompt, &stopping).unwrap());
    for stopped in stopped_runs {
        assert_eq!(stopped.finish_reason, FinishReason::Monitor);
        assert!(stopped.tokens.len() < plain.tokens.len());
        assert_eq!(stopped.tokens[..], plain.tokens[..stopped.tokens.len()]);
        let reading = stopped
            .monitors
            .as_ref()
            .and_then(|m| m.stopped_by)
            .unwrap();
        assert_eq!(reading.token_index + 1, stopped.tokens.len());
        assert!(reading.value > 0.5);
    }

    // The one-sequence decoders refuse monitors, with a typed error.
    let mut ar = Autoregressive::new(Arc::clone(&target));
    assert!(matches!(
        ar.generate(&prompt, &monitored),
        Err(Error::BatchedOnly { .. })
    ));
}

/// Checks `report` against references computed here from one causal forward over `prompt` and
/// `tokens` (but the last): the logits of the rows that chose each token, and the states after
/// the first `num_layers / 2` layers there.
fn check_against_reference(
    target: &Model,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    tokens: &[u32],
    report: &MonitorReport,
) {
    assert_eq!(tokens.len(), TOKENS);
    let mut all = prompt.to_vec();
    all.extend_from_slice(&tokens[..TOKENS - 1]);
    let mut cache = target.new_cache(1, all.len()).unwrap();
    let logits = target.forward_causal(&all, &mut cache).unwrap();
    let logits = logits.to_vec2::<f32>().unwrap();
    let rows = &logits[prompt.len() - 1..];
    let dists: Vec<Vec<f64>> = rows.iter().map(|r| softmax(r)).collect();
    let layer = target.num_layers() / 2;
    let mut cache = target.new_cache(1, all.len()).unwrap();
    let input = AttentionInput::causal(1, all.len(), 0, target.device()).unwrap();
    let hidden = target.embed(&[&all]).unwrap();
    let hidden = target
        .forward_layers(&hidden, 0..layer, &input, &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_dtype(mirror_core::DType::F32)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let hidden = &hidden[prompt.len() - 1..];

    for summary in &report.summaries {
        match summary {
            MonitorSummary::Instability(s) => {
                let (entropy, jsd, peak, at) = instability_reference(&dists);
                assert_eq!(s.tokens, TOKENS);
                close(s.entropy_mean, Some(entropy), "entropy");
                close(s.jsd_mean, Some(jsd), "jsd");
                close(s.peak, Some(peak), "peak");
                assert_eq!(s.peak_index, Some(at));
            }
            MonitorSummary::PathDeviation(s) => {
                let entropy: Vec<f64> = dists
                    .iter()
                    .map(|p| p.iter().filter(|&&x| x > 0.0).map(|&x| -x * x.ln()).sum())
                    .collect();
                let boundary = |t: u32| {
                    let text = tokenizer.decode(&[t], false).unwrap();
                    text.chars().any(|c| ".\n;?!,".contains(c))
                };
                let (mut max_rpdi, mut last) = (None::<f64>, None);
                for t in 0..TOKENS {
                    let seen = t + 1;
                    let window = &entropy[seen.saturating_sub(8)..seen];
                    let rpdi = (window.iter().sum::<f64>() / window.len() as f64)
                        / (entropy[..seen].iter().sum::<f64>() / seen as f64);
                    last = (seen >= 8).then_some(rpdi);
                    if seen >= 8 && boundary(tokens[t]) {
                        max_rpdi = Some(max_rpdi.map_or(rpdi, |m| m.max(rpdi)));
                    }
                }
                close(s.max_rpdi, max_rpdi, "max rpdi");
                close(s.final_rpdi, last, "final rpdi");
                close(
                    s.entropy_mean,
                    Some(entropy.iter().sum::<f64>() / TOKENS as f64),
                    "entropy",
                );
            }
            MonitorSummary::LatentTrajectory(s) => {
                // 40 tokens in chunks of 8: five whole chunks.
                let means: Vec<Vec<f64>> = (0..5)
                    .map(|n| {
                        (0..hidden[0].len())
                            .map(|j| (0..8).map(|i| hidden[8 * n + i][j] as f64).sum::<f64>() / 8.0)
                            .collect()
                    })
                    .collect();
                let diff = |a: &[f64], b: &[f64]| -> Vec<f64> {
                    a.iter().zip(b).map(|(x, y)| x - y).collect()
                };
                let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
                let u = diff(&means[4], &means[0]);
                let mut cumulative = 0.0;
                let mut cosines = 0.0;
                for n in 1..5 {
                    let v = diff(&means[n], &means[n - 1]);
                    cumulative += norm(&v);
                    cosines +=
                        v.iter().zip(&u).map(|(a, b)| a * b).sum::<f64>() / (norm(&v) * norm(&u));
                }
                assert_eq!((s.tokens, s.chunks), (TOKENS, 5));
                close(s.net_change, Some(norm(&u) / 4.0), "net change");
                close(s.cumulative_change, Some(cumulative), "cumulative change");
                close(s.aligned_change, Some(cosines / 4.0), "aligned change");
            }
            other => panic!("unexpected summary {other:?}"),
        }
    }
}
