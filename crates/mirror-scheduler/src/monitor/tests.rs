//! Each monitor against a plain f64 reference written here (slow, obvious loops, nothing shared
//! with the implementation), on seeded random distributions, and the edge cases.

// The references are plain index loops on purpose: obviously right, sharing nothing.
#![allow(clippy::needless_range_loop)]

use rand::{rngs::StdRng, Rng, SeedableRng};

use super::*;

const VOCAB: usize = 50;

/// `steps` random distributions over `VOCAB` tokens, some peaked, some flat.
fn distributions(seed: u64, steps: usize) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..steps)
        .map(|_| {
            let sharpness: f32 = rng.random_range(0.1..6.0);
            let weights: Vec<f32> = (0..VOCAB)
                .map(|_| (sharpness * rng.random::<f32>()).exp())
                .collect();
            let sum: f32 = weights.iter().sum();
            weights.iter().map(|w| w / sum).collect()
        })
        .collect()
}

fn observe_all(monitor: &mut dyn Monitor, probs: &[Vec<f32>], tokens: &[u32]) -> Vec<Verdict> {
    probs
        .iter()
        .zip(tokens)
        .map(|(p, &token)| monitor.observe(&TokenObservation::new(token, p, None)))
        .collect()
}

fn close(a: Option<f64>, b: Option<f64>, what: &str) {
    match (a, b) {
        (Some(a), Some(b)) => assert!((a - b).abs() < 1e-9 * (1.0 + b.abs()), "{what}: {a} vs {b}"),
        (a, b) => assert_eq!(a.is_some(), b.is_some(), "{what}: {a:?} vs {b:?}"),
    }
}

/// Reference instability: dense vectors over the vocabulary, a full sort for the top-k.
fn instability_reference(probs: &[Vec<f32>], k: usize, lambda: f64) -> (f64, f64, f64, usize) {
    let mut previous: Option<Vec<f64>> = None;
    let (mut entropy_sum, mut jsd_sum) = (0.0, 0.0);
    let (mut peak, mut peak_index) = (f64::NEG_INFINITY, 0);
    for (t, row) in probs.iter().enumerate() {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
        let mut dense = vec![0.0f64; row.len()];
        let mut total = 0.0;
        for &i in &order[..k.min(row.len())] {
            total += row[i] as f64;
        }
        for &i in &order[..k.min(row.len())] {
            dense[i] = row[i] as f64 / total;
        }
        let mut entropy = 0.0;
        for &p in &dense {
            if p > 0.0 {
                entropy -= p * p.log2();
            }
        }
        let mut jsd = 0.0;
        if let Some(q) = &previous {
            for i in 0..dense.len() {
                let m = 0.5 * (dense[i] + q[i]);
                if dense[i] > 0.0 {
                    jsd += 0.5 * dense[i] * (dense[i] / m).log2();
                }
                if q[i] > 0.0 {
                    jsd += 0.5 * q[i] * (q[i] / m).log2();
                }
            }
        }
        let strength = jsd + lambda * entropy;
        if strength > peak {
            peak = strength;
            peak_index = t;
        }
        entropy_sum += entropy;
        jsd_sum += jsd;
        previous = Some(dense);
    }
    let n = probs.len() as f64;
    (entropy_sum / n, jsd_sum / n, peak, peak_index)
}

fn instability_of(probs: &[Vec<f32>], config: InstabilityConfig) -> InstabilitySummary {
    let mut monitor = Instability::new(config);
    let tokens = vec![0; probs.len()];
    observe_all(&mut monitor, probs, &tokens);
    match monitor.summary() {
        MonitorSummary::Instability(s) => s,
        other => panic!("not an instability summary: {other:?}"),
    }
}

#[test]
fn instability_matches_the_reference() {
    for (seed, k, lambda) in [(1, 20, 1.0), (2, 5, 0.5), (3, 1, 1.0), (4, 50, 2.0)] {
        let probs = distributions(seed, 40);
        let got = instability_of(&probs, InstabilityConfig { lambda, top_k: k });
        let (entropy, jsd, peak, index) = instability_reference(&probs, k, lambda);
        close(got.entropy_mean, Some(entropy), "entropy");
        close(got.jsd_mean, Some(jsd), "jsd");
        close(got.peak, Some(peak), "peak");
        assert_eq!(got.peak_index, Some(index));
        close(got.peak_position, Some(index as f64 / 40.0), "position");
        let third = index as f64 / 40.0 * 3.0;
        let timing = [PeakTiming::Early, PeakTiming::Middle, PeakTiming::Late][third as usize];
        assert_eq!(got.peak_timing, Some(timing));
        assert_eq!(got.tokens, 40);
    }
}

#[test]
fn instability_edge_cases() {
    let empty = instability_of(&[], InstabilityConfig::default());
    assert_eq!(
        (empty.tokens, empty.peak, empty.peak_timing),
        (0, None, None)
    );
    // One token: no JSD, the peak is its entropy, early.
    let one = instability_of(&distributions(5, 1), InstabilityConfig::default());
    assert_eq!(one.jsd_mean, Some(0.0));
    assert_eq!(one.peak_index, Some(0));
    assert_eq!(one.peak_timing, Some(PeakTiming::Early));
    // Uniform, repeated: JSD 0, entropy log2 k.
    let uniform = vec![vec![1.0 / VOCAB as f32; VOCAB]; 6];
    let flat = instability_of(&uniform, InstabilityConfig::default());
    close(flat.jsd_mean, Some(0.0), "uniform jsd");
    close(flat.entropy_mean, Some(20f64.log2()), "uniform entropy");
    // Point masses on different tokens: entropy 0, JSD 1 after the first.
    let mut a = vec![0.0f32; VOCAB];
    a[3] = 1.0;
    let mut b = vec![0.0f32; VOCAB];
    b[7] = 1.0;
    let points = instability_of(&[a.clone(), b, a], InstabilityConfig::default());
    close(points.entropy_mean, Some(0.0), "point entropy");
    close(points.jsd_mean, Some(2.0 / 3.0), "point jsd");
    close(points.peak, Some(1.0), "point peak");
    assert_eq!(points.peak_index, Some(1));
    assert_eq!(points.peak_timing, Some(PeakTiming::Middle));
}

/// Reference path deviation: recomputes every statistic from the full entropy list each token.
fn path_reference(
    probs: &[Vec<f32>],
    boundary: &[bool],
    config: &PathDeviationConfig,
) -> PathDeviationSummary {
    let mut entropies = Vec::new();
    let mut high = Vec::new();
    let (mut max_rpdi, mut last_rpdi, mut stop): (Option<f64>, Option<f64>, Option<usize>) =
        (None, None, None);
    for (t, row) in probs.iter().enumerate() {
        let mut h = 0.0f64;
        for &p in row {
            if p > 0.0 {
                h -= p as f64 * (p as f64).ln();
            }
        }
        let mut is_high = false;
        if t > 0 {
            let mean = entropies.iter().sum::<f64>() / t as f64;
            let var = entropies
                .iter()
                .map(|e| (e - mean) * (e - mean))
                .sum::<f64>()
                / t as f64;
            is_high = h > mean + var.sqrt();
        }
        entropies.push(h);
        high.push(is_high);
        let seen = t + 1;
        let start = seen.saturating_sub(config.window);
        let recent = entropies[start..].iter().sum::<f64>() / (seen - start) as f64;
        let overall = entropies.iter().sum::<f64>() / seen as f64;
        last_rpdi = None;
        if seen >= config.min_steps && overall > 0.0 {
            let rpdi = recent / overall;
            last_rpdi = Some(rpdi);
            if boundary[t] {
                max_rpdi = Some(max_rpdi.map_or(rpdi, |m: f64| m.max(rpdi)));
                if rpdi > config.threshold && stop.is_none() {
                    stop = Some(t);
                }
            }
        }
    }
    let n = probs.len();
    let start = n.saturating_sub(config.window);
    let window_high = high[start..].iter().filter(|&&h| h).count();
    PathDeviationSummary {
        tokens: n,
        entropy_mean: (n > 0).then(|| entropies.iter().sum::<f64>() / n as f64),
        max_rpdi,
        final_rpdi: last_rpdi,
        high_entropy_window_rate: (n > 0).then(|| window_high as f64 / (n - start) as f64),
        high_entropy_rate: (n > 0).then(|| high.iter().filter(|&&h| h).count() as f64 / n as f64),
        stop_index: stop,
    }
}

fn path_of(
    probs: &[Vec<f32>],
    tokens: &[u32],
    boundaries: Option<BoundaryTokens>,
    config: PathDeviationConfig,
) -> (PathDeviationSummary, Vec<Verdict>) {
    let mut monitor = PathDeviation::new(config, boundaries);
    let verdicts = observe_all(&mut monitor, probs, tokens);
    match monitor.summary() {
        MonitorSummary::PathDeviation(s) => (s, verdicts),
        other => panic!("not a path-deviation summary: {other:?}"),
    }
}

fn assert_path_close(got: &PathDeviationSummary, want: &PathDeviationSummary) {
    assert_eq!(got.tokens, want.tokens);
    close(got.entropy_mean, want.entropy_mean, "entropy");
    close(got.max_rpdi, want.max_rpdi, "max rpdi");
    close(got.final_rpdi, want.final_rpdi, "final rpdi");
    close(
        got.high_entropy_window_rate,
        want.high_entropy_window_rate,
        "window rate",
    );
    close(got.high_entropy_rate, want.high_entropy_rate, "rate");
    assert_eq!(got.stop_index, want.stop_index);
}

#[test]
fn path_deviation_matches_the_reference() {
    // Flat then peaked then flat again: the index rises when the entropy comes back.
    let mut probs = distributions(11, 30);
    let mut rng = StdRng::seed_from_u64(12);
    for row in probs.iter_mut().take(20) {
        row.iter_mut().for_each(|p| *p = 0.0);
        row[rng.random_range(0..VOCAB)] = 1.0;
    }
    let tokens: Vec<u32> = (0..30).map(|t| (t * 7 % VOCAB) as u32).collect();
    let texts: Vec<String> = (0..VOCAB)
        .map(|t| {
            if t % 3 == 0 {
                format!("x{t}.")
            } else {
                format!("x{t}")
            }
        })
        .collect();
    let boundaries = BoundaryTokens::from_texts(&texts);
    let flags: Vec<bool> = tokens.iter().map(|&t| t % 3 == 0).collect();
    for config in [
        PathDeviationConfig::default(),
        PathDeviationConfig {
            window: 4,
            threshold: 1.2,
            min_steps: 6,
        },
        PathDeviationConfig {
            window: 50,
            threshold: 0.5,
            min_steps: 1,
        },
    ] {
        let (got, verdicts) = path_of(&probs, &tokens, Some(boundaries.clone()), config.clone());
        let want = path_reference(&probs, &flags, &config);
        assert_path_close(&got, &want);
        let stops: Vec<usize> = (0..30)
            .filter(|&t| matches!(verdicts[t], Verdict::Stop(_)))
            .collect();
        assert_eq!(stops, want.stop_index.into_iter().collect::<Vec<_>>());
        // Without a tokenizer every token is a boundary.
        let (got, _) = path_of(&probs, &tokens, None, config.clone());
        assert_path_close(&got, &path_reference(&probs, &[true; 30], &config));
    }
    // Random distributions throughout.
    let probs = distributions(13, 64);
    let config = PathDeviationConfig::default();
    let (got, _) = path_of(&probs, &[0; 64], None, config.clone());
    assert_path_close(&got, &path_reference(&probs, &[true; 64], &config));
}

#[test]
fn path_deviation_edge_cases() {
    let config = PathDeviationConfig::default();
    let (empty, _) = path_of(&[], &[], None, config.clone());
    assert_eq!(
        (empty.tokens, empty.entropy_mean, empty.final_rpdi),
        (0, None, None)
    );
    // One token: below min_steps, no index.
    let (one, _) = path_of(&distributions(3, 1), &[1], None, config.clone());
    assert_eq!((one.max_rpdi, one.high_entropy_rate), (None, Some(0.0)));
    // Uniform: RPDI exactly 1, nothing high.
    let uniform = vec![vec![1.0 / VOCAB as f32; VOCAB]; 20];
    let (flat, _) = path_of(&uniform, &[0; 20], None, config.clone());
    close(flat.final_rpdi, Some(1.0), "uniform rpdi");
    assert_eq!((flat.high_entropy_rate, flat.stop_index), (Some(0.0), None));
    // Point masses: zero entropy, no index.
    let mut point = vec![0.0f32; VOCAB];
    point[0] = 1.0;
    let (points, _) = path_of(&vec![point; 20], &[0; 20], None, config);
    assert_eq!((points.final_rpdi, points.max_rpdi), (None, None));
}

/// Reference latent statistics: chunk membership written out token by token.
fn latent_reference(
    hidden: &[Vec<f32>],
    c: usize,
) -> (usize, Option<f64>, Option<f64>, Option<f64>) {
    let t = hidden.len();
    let full = t / c;
    let rest = t % c;
    // chunk_of[i]: which chunk token i averages into.
    let mut chunk_of = vec![0usize; t];
    let chunks = if rest == 0 {
        full
    } else if 2 * rest >= c || full == 0 {
        full + 1
    } else {
        full
    };
    for (i, slot) in chunk_of.iter_mut().enumerate() {
        *slot = (i / c).min(chunks.saturating_sub(1));
    }
    let d = hidden.first().map_or(0, |h| h.len());
    let mut means = vec![vec![0.0f64; d]; chunks];
    let mut counts = vec![0usize; chunks];
    for i in 0..t {
        for j in 0..d {
            means[chunk_of[i]][j] += hidden[i][j] as f64;
        }
        counts[chunk_of[i]] += 1;
    }
    for n in 0..chunks {
        for j in 0..d {
            means[n][j] /= counts[n] as f64;
        }
    }
    if chunks < 2 {
        return (chunks, None, None, None);
    }
    let u: Vec<f64> = (0..d).map(|j| means[chunks - 1][j] - means[0][j]).collect();
    let u_norm = u.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mut cumulative = 0.0;
    let mut cos_sum = 0.0;
    for n in 1..chunks {
        let v: Vec<f64> = (0..d).map(|j| means[n][j] - means[n - 1][j]).collect();
        let v_norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        cumulative += v_norm;
        let dot: f64 = (0..d).map(|j| v[j] * u[j]).sum();
        cos_sum += dot / (v_norm * u_norm);
    }
    let aligned = cos_sum / (chunks - 1) as f64;
    (
        chunks,
        Some(u_norm / (chunks - 1) as f64),
        Some(cumulative),
        aligned.is_finite().then_some(aligned),
    )
}

fn latent_of(hidden: &[Vec<f32>], chunk: usize) -> LatentTrajectorySummary {
    let mut monitor = LatentTrajectory::new(LatentTrajectoryConfig { layer: None, chunk });
    let probs = [1.0f32];
    for h in hidden {
        monitor.observe(&TokenObservation::new(0, &probs, Some(h)));
    }
    match monitor.summary() {
        MonitorSummary::LatentTrajectory(s) => s,
        other => panic!("not a latent summary: {other:?}"),
    }
}

#[test]
fn latent_trajectory_matches_the_reference() {
    let mut rng = StdRng::seed_from_u64(21);
    for (tokens, chunk) in [(64, 16), (70, 16), (75, 16), (9, 4), (33, 1), (20, 7)] {
        // A drift plus noise, as hidden states along a generation.
        let hidden: Vec<Vec<f32>> = (0..tokens)
            .map(|i| {
                (0..24)
                    .map(|j| i as f32 * 0.01 * j as f32 + rng.random_range(-1.0..1.0))
                    .collect()
            })
            .collect();
        let got = latent_of(&hidden, chunk);
        let (chunks, net, cumulative, aligned) = latent_reference(&hidden, chunk);
        assert_eq!(
            (got.tokens, got.chunks),
            (tokens, chunks),
            "{tokens} by {chunk}"
        );
        close(got.net_change, net, "net");
        close(got.cumulative_change, cumulative, "cumulative");
        close(got.aligned_change, aligned, "aligned");
    }
}

#[test]
fn latent_trajectory_edge_cases() {
    // No hidden states, one token, one chunk: N < 2.
    for hidden in [vec![], vec![vec![1.0f32; 4]], vec![vec![1.0f32; 4]; 23]] {
        let got = latent_of(&hidden, 16);
        assert!(got.chunks < 2);
        assert_eq!((got.net_change, got.aligned_change), (None, None));
    }
    // Constant states: zero change, undefined alignment.
    let still = latent_of(&vec![vec![0.5f32; 4]; 32], 16);
    assert_eq!(
        (still.chunks, still.net_change, still.cumulative_change),
        (2, Some(0.0), Some(0.0))
    );
    assert_eq!(still.aligned_change, None);
    // A straight line: every step aligned.
    let line: Vec<Vec<f32>> = (0..48).map(|i| vec![i as f32, -2.0 * i as f32]).collect();
    let straight = latent_of(&line, 16);
    close(straight.aligned_change, Some(1.0), "straight");
}

#[test]
fn monitor_set_stops_only_under_early_stop() {
    // Point masses then flat rows: the index jumps once the entropy appears.
    let mut logits = vec![vec![-100.0f32; VOCAB]; 24];
    for (t, row) in logits.iter_mut().enumerate() {
        if t < 16 {
            row[t] = 0.0;
        } else {
            row.iter_mut().for_each(|l| *l = 0.0);
        }
    }
    let config = MonitorConfig {
        path_deviation: Some(PathDeviationConfig {
            window: 4,
            threshold: 1.5,
            min_steps: 4,
        }),
        ..MonitorConfig::only(&[MonitorKind::Instability, MonitorKind::PathDeviation])
    };
    for early_stop in [false, true] {
        let mut set = MonitorSet::new(
            &MonitorConfig {
                early_stop,
                ..config.clone()
            },
            None,
            24,
        );
        let stops: Vec<usize> = (0..24)
            .filter(|&t| set.observe_logits(t as u32, &logits[t], None).is_some())
            .collect();
        let report = set.report(early_stop);
        assert_eq!(report.summaries.len(), 2);
        let MonitorSummary::PathDeviation(path) = &report.summaries[1] else {
            panic!("order: instability, then path deviation");
        };
        assert_eq!(path.stop_index, Some(16));
        assert_eq!(stops, if early_stop { vec![16] } else { vec![] });
        assert_eq!(
            report.stopped_by.map(|r| r.token_index),
            early_stop.then_some(16)
        );
    }
}

#[test]
fn softmax_sums_to_one_and_config_checks() {
    let mut probs = Vec::new();
    let entropy = softmax_into(&[1.0, 2.0, 3.0, f32::NEG_INFINITY], &mut probs);
    let sum = 1f64.exp() + 2f64.exp() + 3f64.exp();
    let want_entropy: f64 = [1.0f64, 2.0, 3.0]
        .iter()
        .map(|l| -(l.exp() / sum) * (l.exp() / sum).ln())
        .sum();
    // The lane exponential: about 2e-6 relative.
    assert!(
        (entropy - want_entropy).abs() < 1e-6,
        "{entropy} vs {want_entropy}"
    );
    let want: Vec<f64> = [1.0f64, 2.0, 3.0]
        .iter()
        .map(|l| l.exp() / (1f64.exp() + 2f64.exp() + 3f64.exp()))
        .collect();
    for (p, w) in probs.iter().zip(&want) {
        assert!((*p as f64 - w).abs() < 1e-6);
    }
    assert_eq!(probs[3], 0.0);
    assert!(MonitorConfig::default().check(24).is_ok());
    assert_eq!(MonitorConfig::default().hidden_layer(24), Some(12));
    let bad = MonitorConfig {
        latent_trajectory: Some(LatentTrajectoryConfig {
            layer: Some(25),
            chunk: 16,
        }),
        ..MonitorConfig::default()
    };
    assert!(bad.check(24).is_err());
    assert_eq!(
        MonitorKind::from_name("path_deviation"),
        Some(MonitorKind::PathDeviation)
    );
    assert_eq!(MonitorKind::from_name("nope"), None);
}

#[test]
fn largest_matches_a_full_sort_with_ties_and_tails() {
    let mut rng = StdRng::seed_from_u64(7);
    for n in [0usize, 1, 5, 63, 64, 65, 200, 1_000, 4_099] {
        // Few distinct values, so that ties cross the k-th place and chunk edges.
        let values: Vec<f32> = (0..n).map(|_| rng.random_range(0..40) as f32).collect();
        for k in [0usize, 1, 3, 20, 64, 70, 5_000] {
            let mut sorted: Vec<(u32, f32)> = (0..n).map(|i| (i as u32, values[i])).collect();
            sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            sorted.truncate(k);
            assert_eq!(largest(&values, k), sorted, "n {n}, k {k}");
        }
    }
}
