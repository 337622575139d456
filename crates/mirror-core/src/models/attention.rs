//! Scaled dot-product attention on the CPU in f32 (Vaswani et al., "Attention Is All You Need",
//! arXiv 1706.03762), written so that a query's output does not depend on what else is in the
//! pass: keys are visited in cache order, masked keys are skipped rather than added as zeros,
//! and every sum runs in a fixed order. A token's attention output is therefore bit-identical
//! whether it is decoded alone, verified inside a window, or sits in a tree pass — the
//! property that makes greedy speculative decoding reproduce plain decoding exactly.
//!
//! candle's matmul-softmax-matmul changes its summation order with the number of queries and
//! keys, so it is used only off the CPU and for training (where gradients must flow).

use candle_core::{Device, Layout, Tensor};
use rayon::prelude::*;

use super::linear::cpu_f32;
use crate::error::Result;

/// A strided f32 view: element `(i0, i1, i2, i3)` at `start + sum(i * stride)`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    start: usize,
    strides: [usize; 4],
}

impl View<'_> {
    /// Row `(i0, i1, i2)` of `len` contiguous values.
    fn row(&self, i0: usize, i1: usize, i2: usize, len: usize) -> &[f32] {
        let at = self.start + i0 * self.strides[0] + i1 * self.strides[1] + i2 * self.strides[2];
        &self.data[at..at + len]
    }
}

fn view<'a>(data: &'a [f32], layout: &Layout) -> Option<View<'a>> {
    let strides = layout.stride();
    if strides.len() != 4 || strides[3] != 1 && layout.dims()[3] > 1 {
        return None;
    }
    Some(View {
        data,
        start: layout.start_offset(),
        strides: [strides[0], strides[1], strides[2], strides[3]],
    })
}

/// Attention of `q` `(b, heads, t, d)` over `keys`/`values` `(b, kv_heads, kv_len, d)` with an
/// optional additive mask `(1 or b, t, kv_len)` (0 or -inf), scores scaled by `scale`.
/// Returns `(b, t, heads * d)`, or `None` when the inputs are not f32 on the CPU.
pub(crate) fn attention(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    mask: Option<&Tensor>,
    scale: f32,
) -> Result<Option<Tensor>> {
    let (batch, heads, tokens, head_dim) = q.dims4()?;
    let (_, kv_heads, kv_len, _) = keys.dims4()?;
    let mask = match mask {
        Some(m) => Some(m.contiguous()?),
        None => None,
    };
    let (Some((qs, ql)), Some((ks, kl)), Some((vs, vl))) =
        (cpu_f32(q), cpu_f32(keys), cpu_f32(values))
    else {
        return Ok(None);
    };
    let (Some(qd), Some(kd), Some(vd)) = (slice(&qs), slice(&ks), slice(&vs)) else {
        return Ok(None);
    };
    let (Some(qv), Some(kv), Some(vv)) = (view(qd, ql), view(kd, kl), view(vd, vl)) else {
        return Ok(None);
    };
    let mask_guard = match &mask {
        Some(m) => match cpu_f32(m) {
            Some(guard) => Some(guard),
            None => return Ok(None),
        },
        None => None,
    };
    let mask_rows = match &mask_guard {
        Some((storage, layout)) => {
            let Some(data) = slice(storage) else {
                return Ok(None);
            };
            let batches = layout.dims()[0];
            let start = layout.start_offset();
            Some((&data[start..start + batches * tokens * kv_len], batches))
        }
        None => None,
    };
    let group = heads / kv_heads;
    let run = |bh: usize| -> Vec<f32> {
        let (b, h) = (bh / heads, bh % heads);
        let mut out = vec![0f32; tokens * head_dim];
        let mut scores = vec![0f32; kv_len];
        let mut visible = vec![0u32; kv_len];
        for (i, out) in out.chunks_exact_mut(head_dim).enumerate() {
            let mask = mask_rows.map(|(rows, batches)| {
                let mb = if batches == 1 { 0 } else { b };
                &rows[(mb * tokens + i) * kv_len..(mb * tokens + i + 1) * kv_len]
            });
            let query = qv.row(b, h, i, head_dim);
            let keys = |j: usize| kv.row(b, h / group, j, head_dim);
            let values = |j: usize| vv.row(b, h / group, j, head_dim);
            attend_row(
                query,
                keys,
                values,
                mask,
                kv_len,
                scale,
                &mut scores,
                &mut visible,
                out,
            );
        }
        out
    };
    let work = batch * heads * tokens * kv_len * head_dim;
    let per_head: Vec<Vec<f32>> = if work >= 1 << 16 && rayon::current_num_threads() > 1 {
        (0..batch * heads).into_par_iter().map(run).collect()
    } else {
        (0..batch * heads).map(run).collect()
    };
    // (b, heads, t, d) -> (b, t, heads * d)
    let mut output = vec![0f32; batch * tokens * heads * head_dim];
    for (bh, values) in per_head.iter().enumerate() {
        let (b, h) = (bh / heads, bh % heads);
        for (i, row) in values.chunks_exact(head_dim).enumerate() {
            let at = ((b * tokens + i) * heads + h) * head_dim;
            output[at..at + head_dim].copy_from_slice(row);
        }
    }
    Ok(Some(Tensor::from_vec(
        output,
        (batch, tokens, heads * head_dim),
        &Device::Cpu,
    )?))
}

fn slice(storage: &candle_core::Storage) -> Option<&[f32]> {
    match storage {
        candle_core::Storage::Cpu(cpu) => cpu.as_slice::<f32>().ok(),
        _ => None,
    }
}

/// One query row: softmax over the visible keys (in cache order), then the weighted sum of
/// their values. `scores` and `visible` are scratch of `kv_len`.
#[allow(clippy::too_many_arguments)]
fn attend_row<'k>(
    query: &[f32],
    keys: impl Fn(usize) -> &'k [f32],
    values: impl Fn(usize) -> &'k [f32],
    mask: Option<&[f32]>,
    kv_len: usize,
    scale: f32,
    scores: &mut [f32],
    visible: &mut [u32],
    out: &mut [f32],
) {
    let mut count = 0;
    for j in 0..kv_len {
        let bias = mask.map_or(0.0, |m| m[j]);
        if bias == f32::NEG_INFINITY {
            continue;
        }
        scores[count] = simd::dot(query, keys(j)) * scale + bias;
        visible[count] = j as u32;
        count += 1;
    }
    out.fill(0.0);
    if count == 0 {
        return;
    }
    let scores = &mut scores[..count];
    let max = scores
        .iter()
        .fold(f32::NEG_INFINITY, |m, &s| if s > m { s } else { m });
    simd::exp_shifted(scores, max);
    let mut total = 0f32;
    for (&p, &j) in scores.iter().zip(visible.iter()) {
        total += p;
        simd::add_scaled(out, p, values(j as usize));
    }
    let inverse = 1.0 / total;
    for v in out.iter_mut() {
        *v *= inverse;
    }
}

/// Lane-structured loops: the same arithmetic at any vector width, compiled for the widest
/// the CPU has (the results do not depend on which).
mod simd {
    /// `sum a[i] * b[i]`: 16 partial sums, then added in lane order.
    pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the feature was detected.
                return unsafe { dot_avx512(a, b) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the feature was detected.
                return unsafe { dot_avx2(a, b) };
            }
        }
        dot_body(a, b)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        dot_body(a, b)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        dot_body(a, b)
    }

    #[inline(always)]
    fn dot_body(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let mut lanes = [0f32; 16];
        let whole = n / 16 * 16;
        for (x, y) in a[..whole].chunks_exact(16).zip(b[..whole].chunks_exact(16)) {
            for i in 0..16 {
                lanes[i] += x[i] * y[i];
            }
        }
        let mut sum = 0f32;
        for lane in lanes {
            sum += lane;
        }
        for i in whole..n {
            sum += a[i] * b[i];
        }
        sum
    }

    /// `out[i] += scale * x[i]`.
    pub(super) fn add_scaled(out: &mut [f32], scale: f32, x: &[f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o += scale * v;
        }
    }

    /// `s = exp(s - shift)` for every score (all of them at most `shift`).
    pub(super) fn exp_shifted(scores: &mut [f32], shift: f32) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the feature was detected.
                return unsafe { exp_avx512(scores, shift) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the feature was detected.
                return unsafe { exp_avx2(scores, shift) };
            }
        }
        exp_body(scores, shift)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp_avx512(scores: &mut [f32], shift: f32) {
        exp_body(scores, shift)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn exp_avx2(scores: &mut [f32], shift: f32) {
        exp_body(scores, shift)
    }

    #[inline(always)]
    fn exp_body(scores: &mut [f32], shift: f32) {
        for s in scores.iter_mut() {
            *s = exp(*s - shift);
        }
    }

    /// `e^x` for `x <= 0` within about 2 ulp: `x = n ln2 + r` with `|r| <= ln2 / 2`, a degree-6
    /// Taylor polynomial for `e^r`, and `2^n` built in the exponent bits. Plain f32 operations,
    /// so it vectorizes and gives the same bits at every width.
    #[inline(always)]
    pub(super) fn exp(x: f32) -> f32 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_145_75;
        const LN2_LO: f32 = 1.428_606_8e-6;
        let x = if x < -87.0 { -87.0 } else { x };
        // Round to nearest with the 1.5 * 2^23 trick (no float-to-int conversion).
        let shifted = x * LOG2E + 12_582_912.0;
        let n = shifted - 12_582_912.0;
        let r = (x - n * LN2_HI) - n * LN2_LO;
        let p = 1.0 / 720.0;
        let p = p * r + 1.0 / 120.0;
        let p = p * r + 1.0 / 24.0;
        let p = p * r + 1.0 / 6.0;
        let p = p * r + 0.5;
        let p = p * r + 1.0;
        let p = p * r + 1.0;
        let exponent = (shifted.to_bits() as i32 - 0x4b40_0000 + 127) as u32;
        p * f32::from_bits(exponent << 23)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn exp_is_within_a_few_ulp_of_the_standard_library() {
            let mut worst = 0f64;
            let mut x = -87.0f32;
            while x <= 0.0 {
                let ours = super::exp(x) as f64;
                let exact = (x as f64).exp();
                worst = worst.max(((ours - exact) / exact).abs());
                x += 0.0137;
            }
            assert!(worst < 5e-7, "worst relative error {worst}");
            assert_eq!(super::exp(0.0), 1.0);
            assert_eq!(super::exp(-200.0), super::exp(-87.0));
        }

        #[test]
        fn dot_matches_an_f64_sum() {
            for n in [1usize, 15, 16, 17, 64, 100, 128] {
                let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
                let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
                let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
                assert!((super::dot(&a, &b) as f64 - exact).abs() < 1e-5, "n = {n}");
            }
        }
    }
}
