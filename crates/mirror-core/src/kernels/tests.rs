//! Kernel tests against independent references: candle's GGML quantizers and dequantizers for
//! the weights, and f64 sums for the products.

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use super::activations::Activations;
use super::*;

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Heavy-ish tails, as real weights and activations have, so that scales differ per block.
    (0..len)
        .map(|i| {
            let v: f32 = rng.random_range(-1.0..1.0);
            if i % 97 == 0 {
                v * 8.0
            } else {
                v
            }
        })
        .collect()
}

/// A matrix of `ty` from random weights, with candle's own dequantization of the same bytes.
fn fixture(ty: WeightType, rows: usize, cols: usize, seed: u64) -> (PackedMatrix, Vec<f32>) {
    let weights = random(rows * cols, seed);
    let tensor = Tensor::from_vec(weights, (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&tensor, ty.ggml()).unwrap();
    let reference = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let packed = PackedMatrix::from_ggml_bytes(ty, &q.data().unwrap(), rows, cols).unwrap();
    (packed, reference)
}

fn paths() -> Vec<KernelPath> {
    [
        KernelPath::Avx512Vnni,
        KernelPath::Avx2,
        KernelPath::Portable,
    ]
    .into_iter()
    .filter(|p| p.is_supported())
    .collect()
}

fn run(path: KernelPath, w: &PackedMatrix, x: &[f32], m: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * w.rows()];
    matmul(path, &[w], x, m, &mut out).unwrap();
    out
}

fn shapes(ty: WeightType) -> Vec<(usize, usize)> {
    // Tails: rows that do not fill the last group of 16; several blocks per row.
    if ty.block_len() == 256 {
        vec![(16, 256), (37, 512), (5, 768)]
    } else {
        vec![(16, 32), (37, 96), (21, 896)]
    }
}

#[test]
fn unpacking_reproduces_candles_dequantization_exactly() {
    for ty in WeightType::ALL {
        for (rows, cols) in shapes(ty) {
            let (packed, reference) = fixture(ty, rows, cols, 7);
            let ours = packed.dequantize();
            assert_eq!(ours.len(), reference.len());
            for (i, (a, b)) in ours.iter().zip(&reference).enumerate() {
                assert!(
                    a.to_bits() == b.to_bits(),
                    "{ty:?} ({rows}, {cols}) weight {i}: ours {a}, candle {b}"
                );
            }
        }
    }
}

/// `sum_i x[i] * w[i]` in f64 and the bound on what int8 activations may change it by:
/// each activation moves by at most half its block's step, `amax / 127 / 2`.
fn reference_and_bound(x: &[f32], w: &[f32], block: usize) -> (f64, f64) {
    let mut sum = 0f64;
    let mut bound = 0f64;
    for (xs, ws) in x.chunks(block).zip(w.chunks(block)) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let step = amax / 127.0;
        for (&xv, &wv) in xs.iter().zip(ws) {
            sum += xv as f64 * wv as f64;
            bound += wv.abs() as f64 * step * 0.5;
        }
    }
    (sum, bound)
}

#[test]
fn products_match_an_f64_reference_within_the_activation_rounding_bound() {
    for path in paths() {
        for ty in WeightType::ALL {
            for (rows, cols) in shapes(ty) {
                let (packed, weights) = fixture(ty, rows, cols, 11);
                for m in [1, 3, 8, 33, 64] {
                    let x = random(m * cols, 100 + m as u64);
                    let ours = run(path, &packed, &x, m);
                    for r in 0..m {
                        for n in 0..rows {
                            let (exact, bound) = reference_and_bound(
                                &x[r * cols..(r + 1) * cols],
                                &weights[n * cols..(n + 1) * cols],
                                ty.block_len(),
                            );
                            // Plus f32 accumulation error: far below 1e-4 of the magnitude.
                            let magnitude: f64 = x[r * cols..(r + 1) * cols]
                                .iter()
                                .zip(&weights[n * cols..(n + 1) * cols])
                                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                                .sum();
                            let got = ours[r * rows + n] as f64;
                            assert!(
                                (got - exact).abs() <= bound + 1e-4 * magnitude + 1e-6,
                                "{path:?} {ty:?} ({rows},{cols}) m={m} [{r},{n}]: {got} vs {exact} (bound {bound})"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// With the activations replaced by exactly what the kernel multiplies (their int8 values
/// times their scales), the only difference left is f32 rounding.
#[test]
fn products_of_the_quantized_activations_are_exact_up_to_f32_rounding() {
    for ty in WeightType::ALL {
        let (rows, cols) = shapes(ty)[1];
        let (packed, weights) = fixture(ty, rows, cols, 13);
        let m = 5;
        let x = random(m * cols, 17);
        let acts = Activations::quantize(KernelPath::Portable, &x, m, cols, ty.block_len());
        for path in paths() {
            let ours = run(path, &packed, &x, m);
            for r in 0..m {
                for n in 0..rows {
                    let mut exact = 0f64;
                    let mut magnitude = 0f64;
                    for i in 0..cols {
                        let xq = acts.q[r * cols + i] as f64
                            * acts.scales[r * (cols / acts.block) + i / acts.block] as f64;
                        exact += xq * weights[n * cols + i] as f64;
                        magnitude += (xq * weights[n * cols + i] as f64).abs();
                    }
                    let got = ours[r * rows + n] as f64;
                    assert!(
                        (got - exact).abs() <= 2e-6 * magnitude + 1e-7,
                        "{path:?} {ty:?} [{r},{n}]: {got} vs {exact}"
                    );
                }
            }
        }
    }
}

#[test]
fn every_row_is_bit_identical_alone_and_among_up_to_64_rows() {
    for path in paths() {
        for ty in WeightType::ALL {
            let (rows, cols) = shapes(ty)[1];
            let (packed, _) = fixture(ty, rows, cols, 19);
            let x = random(64 * cols, 23);
            let alone: Vec<Vec<f32>> = (0..64)
                .map(|r| run(path, &packed, &x[r * cols..(r + 1) * cols], 1))
                .collect();
            for m in 1..=64 {
                let together = run(path, &packed, &x[..m * cols], m);
                for (r, alone) in alone.iter().enumerate().take(m) {
                    let row = &together[r * rows..(r + 1) * rows];
                    assert!(
                        row.iter()
                            .zip(alone)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{path:?} {ty:?}: row {r} of {m} differs from the row alone"
                    );
                }
            }
        }
    }
}

#[test]
fn every_code_path_gives_the_same_bits() {
    let paths = paths();
    eprintln!("kernel paths supported here: {paths:?}");
    for ty in WeightType::ALL {
        for (rows, cols) in shapes(ty) {
            let (packed, _) = fixture(ty, rows, cols, 29);
            let x = random(7 * cols, 31);
            let reference = run(KernelPath::Portable, &packed, &x, 7);
            for &path in &paths {
                let ours = run(path, &packed, &x, 7);
                assert!(
                    ours.iter()
                        .zip(&reference)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{path:?} {ty:?} ({rows},{cols}) differs from the portable path"
                );
            }
        }
    }
}

/// Row counts that fill the SIMD paths' row tiles (of 2, 3 or 4 rows), leave them part full,
/// and run several tiles with a tail.
const TILE_ROWS: [usize; 11] = [1, 2, 3, 4, 5, 7, 8, 9, 16, 33, 64];

/// Checks every row of `path` on `x` (`64` rows of `cols`) at each of [`TILE_ROWS`]: the same
/// bits as the portable path, the same bits as the row computed alone, and within the
/// activation rounding bound of an f64 reference.
fn check_tiles(path: KernelPath, ty: WeightType, shape: (usize, usize), seed: u64, x: &[f32]) {
    let (rows, cols) = shape;
    let (packed, weights) = fixture(ty, rows, cols, seed);
    let alone: Vec<Vec<f32>> = (0..64)
        .map(|r| run(path, &packed, &x[r * cols..(r + 1) * cols], 1))
        .collect();
    for m in TILE_ROWS {
        let x = &x[..m * cols];
        let ours = run(path, &packed, x, m);
        let portable = run(KernelPath::Portable, &packed, x, m);
        for r in 0..m {
            let row = &ours[r * rows..(r + 1) * rows];
            for n in 0..rows {
                let got = row[n];
                assert!(
                    got.to_bits() == portable[r * rows + n].to_bits(),
                    "{path:?} {ty:?} {shape:?} m={m} [{r},{n}]: {got} vs portable {}",
                    portable[r * rows + n]
                );
                assert!(
                    got.to_bits() == alone[r][n].to_bits(),
                    "{path:?} {ty:?} {shape:?} m={m} [{r},{n}]: {got} vs the row alone {}",
                    alone[r][n]
                );
                let (xs, ws) = (
                    &x[r * cols..(r + 1) * cols],
                    &weights[n * cols..(n + 1) * cols],
                );
                let (exact, bound) = reference_and_bound(xs, ws, ty.block_len());
                let magnitude: f64 = xs
                    .iter()
                    .zip(ws)
                    .map(|(a, b)| (*a as f64 * *b as f64).abs())
                    .sum();
                assert!(
                    (got as f64 - exact).abs() <= bound + 1e-4 * magnitude + 1e-6,
                    "{path:?} {ty:?} {shape:?} m={m} [{r},{n}]: {got} vs f64 {exact} (bound {bound})"
                );
            }
        }
    }
}

#[test]
fn row_tiles_and_their_tails_match_portable_the_row_alone_and_f64() {
    for path in paths() {
        for ty in WeightType::ALL {
            for (i, shape) in shapes(ty).into_iter().enumerate() {
                let x = random(64 * shape.1, 73 + i as u64);
                check_tiles(path, ty, shape, 79 + i as u64, &x);
            }
        }
    }
}

/// Weights at the top quant of their type almost everywhere (one value per 16 sets the scale,
/// the rest sit at the far end) against activations at +-127: the 16-bit partial sums of the
/// SIMD paths reach their largest values, where an overflow would show.
#[test]
fn extreme_quants_and_activations_keep_every_path_exact() {
    let extreme = |rows: usize, cols: usize, sign: f32| -> Vec<f32> {
        (0..rows * cols)
            .map(|i| if i % 16 == 0 { -sign } else { 0.97 * sign })
            .collect()
    };
    for path in paths() {
        for ty in WeightType::ALL {
            let (rows, cols) = shapes(ty)[2];
            for sign in [1.0f32, -1.0] {
                let weights = extreme(rows, cols, sign);
                let tensor = Tensor::from_vec(weights, (rows, cols), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&tensor, ty.ggml()).unwrap();
                let packed =
                    PackedMatrix::from_ggml_bytes(ty, &q.data().unwrap(), rows, cols).unwrap();
                // Rows of all +1, all -1, and alternating blocks of both.
                let x: Vec<f32> = (0..9 * cols)
                    .map(|i| {
                        let (r, c) = (i / cols, i % cols);
                        match r % 3 {
                            0 => 1.0,
                            1 => -1.0,
                            _ if (c / 32) % 2 == 0 => 1.0,
                            _ => -1.0,
                        }
                    })
                    .collect();
                for m in [1, 4, 9] {
                    let ours = run(path, &packed, &x[..m * cols], m);
                    let portable = run(KernelPath::Portable, &packed, &x[..m * cols], m);
                    assert!(
                        ours.iter()
                            .zip(&portable)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{path:?} {ty:?} sign {sign} m={m}: differs from the portable path"
                    );
                }
            }
        }
    }
}

#[test]
fn fused_matrices_equal_separate_calls() {
    let (q, _) = fixture(WeightType::Q4K, 48, 512, 37);
    let (k, _) = fixture(WeightType::Q6K, 16, 512, 41);
    let (v, _) = fixture(WeightType::Q8_0, 21, 512, 43);
    let x = random(3 * 512, 47);
    for path in paths() {
        let mut fused = vec![0f32; 3 * (48 + 16 + 21)];
        matmul(path, &[&q, &k, &v], &x, 3, &mut fused).unwrap();
        let parts = [
            run(path, &q, &x, 3),
            run(path, &k, &x, 3),
            run(path, &v, &x, 3),
        ];
        let widths = [48, 16, 21];
        for r in 0..3 {
            let mut at = r * 85;
            for (part, &width) in parts.iter().zip(&widths) {
                assert_eq!(&fused[at..at + width], &part[r * width..(r + 1) * width]);
                at += width;
            }
        }
    }
}

#[test]
fn selected_rows_keep_their_weights_and_products_bit_for_bit() {
    for ty in WeightType::ALL {
        for (rows, cols) in shapes(ty) {
            let (w, reference) = fixture(ty, rows, cols, 53);
            // Out of order, repeated, the tail group's last row, fewer than a group and more.
            let picks: Vec<usize> = [rows - 1, 0, 3, 3, rows / 2]
                .into_iter()
                .chain((1..rows).step_by(2))
                .collect();
            let selected = w.select_rows(&picks).unwrap();
            assert_eq!(selected.rows(), picks.len());
            let mut row = vec![0f32; cols];
            for (i, &from) in picks.iter().enumerate() {
                selected.dequantize_row(i, &mut row).unwrap();
                assert_eq!(
                    row,
                    reference[from * cols..(from + 1) * cols],
                    "{ty:?} row {from}"
                );
            }
            for path in paths() {
                for m in [1, 5] {
                    let x = random(m * cols, 59);
                    let full = run(path, &w, &x, m);
                    let got = run(path, &selected, &x, m);
                    for r in 0..m {
                        for (i, &from) in picks.iter().enumerate() {
                            let (a, b) = (got[r * picks.len() + i], full[r * rows + from]);
                            assert_eq!(a.to_bits(), b.to_bits(), "{ty:?} {path:?} row {from}");
                        }
                    }
                }
            }
        }
    }
    let (w, _) = fixture(WeightType::Q8_0, 16, 32, 61);
    assert!(w.select_rows(&[]).is_err());
    assert!(w.select_rows(&[16]).is_err());
}

#[test]
fn transposed_product_matches_the_dequantized_matrix() {
    let (packed, weights) = fixture(WeightType::Q5_0, 37, 96, 53);
    let grad = random(2 * 37, 59);
    let ours = packed.matmul_transposed(&grad, 2).unwrap();
    for r in 0..2 {
        for i in 0..96 {
            let exact: f64 = (0..37)
                .map(|n| grad[r * 37 + n] as f64 * weights[n * 96 + i] as f64)
                .sum();
            assert!((ours[r * 96 + i] as f64 - exact).abs() < 1e-4);
        }
    }
}

#[test]
fn non_finite_activations_poison_their_outputs_instead_of_vanishing() {
    let (packed, _) = fixture(WeightType::Q8_0, 16, 64, 61);
    let mut x = random(2 * 64, 67);
    x[70] = f32::NAN;
    let out = run(KernelPath::selected(), &packed, &x, 2);
    assert!(out[..16].iter().all(|v| v.is_finite()));
    assert!(out[16..].iter().all(|v| v.is_nan()));
}

#[test]
fn bad_shapes_are_errors() {
    assert!(PackedMatrix::from_ggml_bytes(WeightType::Q4K, &[0; 144], 1, 128).is_err());
    assert!(PackedMatrix::from_ggml_bytes(WeightType::Q8_0, &[0; 33], 1, 32).is_err());
    let (packed, _) = fixture(WeightType::Q8_0, 16, 64, 71);
    let mut out = vec![0f32; 16];
    assert!(matmul(KernelPath::Portable, &[&packed], &[0.0; 63], 1, &mut out).is_err());
}
