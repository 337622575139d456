//! The blocked attention kernel against the one-query algorithm, bit for bit.

use super::*;
use half::f16;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|f| f.to_bits()).collect()
}

/// The obvious algorithm, one query at a time: the scores of its visible keys in cache
/// order, their softmax, the weighted sum of values, one division. Same operations as the
/// blocked kernel promises, so the bits must match.
#[allow(clippy::too_many_arguments)]
fn one_query(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    mask: Option<&[f32]>,
    kv_len: usize,
    d: usize,
    scale: f32,
) -> Vec<f32> {
    let mut scores = Vec::new();
    let mut visible = Vec::new();
    for j in 0..kv_len {
        let bias = mask.map_or(0.0, |m| m[j]);
        if bias == f32::NEG_INFINITY {
            continue;
        }
        scores.push(simd::dot_lanes(q, &keys[j * d..(j + 1) * d]) * scale + bias);
        visible.push(j);
    }
    let mut out = vec![0f32; d];
    if scores.is_empty() {
        return out;
    }
    let max = scores
        .iter()
        .fold(f32::NEG_INFINITY, |m, &s| if s > m { s } else { m });
    let mut total = 0f32;
    for (s, &j) in scores.iter().zip(&visible) {
        let p = simd::exp(*s - max);
        total += p;
        for (o, &v) in out.iter_mut().zip(&values[j * d..(j + 1) * d]) {
            *o += p * v;
        }
    }
    out.iter().map(|o| o * (1.0 / total)).collect()
}

#[test]
fn sixteen_dots_at_once_equal_dot_lanes_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(11);
    for d in [16, 64, 128, 40] {
        for count in [16, 9, 1] {
            let mut random =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-3.0..3.0)).collect() };
            let query = random(d);
            let rows: Vec<Vec<f32>> = (0..count).map(|_| random(d)).collect();
            let keys: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
            let mut got = vec![0f32; count];
            dots(&query, &keys, &mut got);
            for (g, key) in got.iter().zip(&keys) {
                assert_eq!(g.to_bits(), simd::dot_lanes(&query, key).to_bits(), "d {d}");
            }
        }
    }
}

#[test]
fn accumulating_in_registers_equals_the_plain_loop_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(13);
    for d in [64, 128, 48] {
        for count in [16, 5, 1] {
            let mut random =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-3.0..3.0)).collect() };
            let start = random(d);
            let weights = random(count);
            let rows: Vec<Vec<f32>> = (0..count).map(|_| random(d)).collect();
            let values: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
            let mut got = start.clone();
            accumulate(&mut got, &weights, &values);
            let mut want = start;
            for (p, row) in weights.iter().zip(&rows) {
                for (o, v) in want.iter_mut().zip(row) {
                    *o += p * v;
                }
            }
            assert_eq!(bits(&got), bits(&want), "d {d}, {count} rows");
        }
    }
}

#[test]
fn f16_rows_give_the_bits_of_their_f32_values() {
    let mut rng = StdRng::seed_from_u64(17);
    // 64 and 128: the AVX-512 loops (widened in registers); 40 and 48: the plain ones.
    for d in [64, 128, 40, 48] {
        for count in [16, 7] {
            let mut random =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-3.0..3.0)).collect() };
            let query = random(d);
            let weights = random(count);
            let halves: Vec<Vec<f16>> = (0..count)
                .map(|_| random(d).into_iter().map(f16::from_f32).collect())
                .collect();
            let widened: Vec<Vec<f32>> = halves
                .iter()
                .map(|row| row.iter().map(|h| h.to_f32()).collect())
                .collect();
            let half_rows: Vec<&[f16]> = halves.iter().map(Vec::as_slice).collect();
            let wide_rows: Vec<&[f32]> = widened.iter().map(Vec::as_slice).collect();
            let (mut got, mut want) = (vec![0f32; count], vec![0f32; count]);
            dots(&query, &half_rows, &mut got);
            dots(&query, &wide_rows, &mut want);
            assert_eq!(bits(&got), bits(&want), "dots, d {d}, {count} rows");
            let (mut got, mut want) = (query.clone(), query.clone());
            accumulate(&mut got, &weights, &half_rows);
            accumulate(&mut want, &weights, &wide_rows);
            assert_eq!(bits(&got), bits(&want), "sums, d {d}, {count} rows");
        }
    }
}

#[test]
fn blocks_of_query_heads_give_each_query_its_own_bits() {
    let mut rng = StdRng::seed_from_u64(7);
    // Groups of 6 (blocks of 3 + 3), 7 (4 + 3), 3 and 1; a causal mask per batch, a shared
    // mask, no mask; one query and several (17: past `WIDEN_FROM_TOKENS`).
    let cases = [
        (2, 12, 2, 3, 37, 32, true, true),
        (1, 14, 2, 1, 300, 64, false, false),
        (1, 9, 3, 4, 20, 48, true, false),
        (2, 4, 4, 2, 5, 16, false, true),
        // Enough queries that f16 rows are widened once, up front.
        (2, 6, 2, 17, 40, 64, true, true),
    ];
    // Keys and values stored as f32, then as f16: the reference reads the f16 rows rounded
    // one value at a time (half's scalar conversion).
    let stores = [false, true];
    for (case, half_store) in cases.iter().flat_map(|c| stores.map(|h| (*c, h))) {
        let (batch, heads, kv_heads, tokens, kv_len, d, masked, per_batch) = case;
        let mut random =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0..2.0)).collect() };
        let q = random(batch * heads * tokens * d);
        let stored = |x: Vec<f32>| -> Vec<f32> {
            if half_store {
                x.into_iter().map(|x| f16::from_f32(x).to_f32()).collect()
            } else {
                x
            }
        };
        let k = stored(random(batch * kv_heads * kv_len * d));
        let v = stored(random(batch * kv_heads * kv_len * d));
        let mask_batches = if per_batch { batch } else { 1 };
        let mask: Vec<f32> = (0..mask_batches * tokens * kv_len)
            .map(|at| {
                let (row, j) = ((at / kv_len) % tokens, at % kv_len);
                // Causal over the last `tokens` keys, plus a hole that differs per batch.
                let hole = (at / (tokens * kv_len) + 1) * 3 % kv_len.max(1) == j;
                if j + tokens > kv_len + row || hole {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let tensor = |data: &[f32], shape: (usize, usize, usize, usize)| {
            Tensor::from_vec(data.to_vec(), shape, &Device::Cpu).unwrap()
        };
        let qt = tensor(&q, (batch, heads, tokens, d));
        let store = |t: Tensor| {
            if half_store {
                t.to_dtype(candle_core::DType::F16).unwrap()
            } else {
                t
            }
        };
        let kt = store(tensor(&k, (batch, kv_heads, kv_len, d)));
        let vt = store(tensor(&v, (batch, kv_heads, kv_len, d)));
        let mt =
            Tensor::from_vec(mask.clone(), (mask_batches, tokens, kv_len), &Device::Cpu).unwrap();
        let scale = 1.0 / (d as f32).sqrt();
        let got = attention(&qt, &kt, &vt, masked.then_some(&mt), scale)
            .unwrap()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let group = heads / kv_heads;
        for b in 0..batch {
            for h in 0..heads {
                for i in 0..tokens {
                    let kvh = h / group;
                    let kv = |x: &[f32]| {
                        x[(b * kv_heads + kvh) * kv_len * d..(b * kv_heads + kvh + 1) * kv_len * d]
                            .to_vec()
                    };
                    let mb = if per_batch { b } else { 0 };
                    let row = &mask[(mb * tokens + i) * kv_len..(mb * tokens + i + 1) * kv_len];
                    let at = ((b * heads + h) * tokens + i) * d;
                    let want = one_query(
                        &q[at..at + d],
                        &kv(&k),
                        &kv(&v),
                        masked.then_some(row),
                        kv_len,
                        d,
                        scale,
                    );
                    let out = ((b * tokens + i) * heads + h) * d;
                    assert_eq!(
                        bits(&got[out..out + d]),
                        bits(&want),
                        "batch {b} head {h} token {i} of case {heads}/{kv_heads} heads, f16 {half_store}"
                    );
                }
            }
        }
    }
}
