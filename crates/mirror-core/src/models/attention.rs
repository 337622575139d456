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

use super::cpu_ops::{self as simd, cpu_f32};
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
    let (Some(qd), Some(kd), Some(vd)) = (simd::slice(&qs), simd::slice(&ks), simd::slice(&vs))
    else {
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
            let Some(data) = simd::slice(storage) else {
                return Ok(None);
            };
            let batches = layout.dims()[0];
            let start = layout.start_offset();
            Some((&data[start..start + batches * tokens * kv_len], batches))
        }
        None => None,
    };
    let job = HeadJob {
        q: qv,
        k: kv,
        v: vv,
        mask: mask_rows,
        heads,
        group: heads / kv_heads,
        tokens,
        kv_len,
        head_dim,
        scale,
    };
    let run = |bh: usize| job.run(bh);
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

/// What every (batch, head) pair of one attention call reads.
struct HeadJob<'a> {
    q: View<'a>,
    k: View<'a>,
    v: View<'a>,
    /// The mask's rows and its batch size (1 or the batch).
    mask: Option<(&'a [f32], usize)>,
    heads: usize,
    group: usize,
    tokens: usize,
    kv_len: usize,
    head_dim: usize,
    scale: f32,
}

impl HeadJob<'_> {
    /// The outputs `(tokens, head_dim)` of head `bh = batch * heads + head`, compiled for the
    /// widest vectors the CPU has (the bits do not depend on which).
    fn run(&self, bh: usize) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the feature was detected.
                return unsafe { self.run_avx512(bh) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the feature was detected.
                return unsafe { self.run_avx2(bh) };
            }
        }
        self.run_body(bh)
    }

    /// [`HeadJob::run_body`] compiled for AVX-512.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512(&self, bh: usize) -> Vec<f32> {
        self.run_body(bh)
    }

    /// [`HeadJob::run_body`] compiled for AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(&self, bh: usize) -> Vec<f32> {
        self.run_body(bh)
    }

    #[inline(always)]
    fn run_body(&self, bh: usize) -> Vec<f32> {
        let (b, h) = (bh / self.heads, bh % self.heads);
        let (tokens, kv_len, head_dim) = (self.tokens, self.kv_len, self.head_dim);
        let mut out = vec![0f32; tokens * head_dim];
        let mut scores = vec![0f32; kv_len];
        let mut visible = vec![0u32; kv_len];
        for (i, out) in out.chunks_exact_mut(head_dim).enumerate() {
            let mask = self.mask.map(|(rows, batches)| {
                let mb = if batches == 1 { 0 } else { b };
                &rows[(mb * tokens + i) * kv_len..(mb * tokens + i + 1) * kv_len]
            });
            let query = self.q.row(b, h, i, head_dim);
            // Softmax over the visible keys, in cache order.
            let mut count = 0;
            for j in 0..kv_len {
                let bias = mask.map_or(0.0, |m| m[j]);
                if bias == f32::NEG_INFINITY {
                    continue;
                }
                let key = self.k.row(b, h / self.group, j, head_dim);
                scores[count] = simd::dot_lanes(query, key) * self.scale + bias;
                visible[count] = j as u32;
                count += 1;
            }
            out.fill(0.0);
            if count == 0 {
                continue;
            }
            let scores = &mut scores[..count];
            let max = scores
                .iter()
                .fold(f32::NEG_INFINITY, |m, &s| if s > m { s } else { m });
            for s in scores.iter_mut() {
                *s = simd::exp(*s - max);
            }
            // The weighted sum of their values, then one division.
            let mut total = 0f32;
            for (&p, &j) in scores.iter().zip(visible.iter()) {
                total += p;
                let value = self.v.row(b, h / self.group, j as usize, head_dim);
                for (o, &v) in out.iter_mut().zip(value) {
                    *o += p * v;
                }
            }
            let inverse = 1.0 / total;
            for v in out.iter_mut() {
                *v *= inverse;
            }
        }
        out
    }
}
