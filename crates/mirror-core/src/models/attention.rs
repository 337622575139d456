//! Scaled dot-product attention on the CPU in f32 (Vaswani et al., "Attention Is All You Need",
//! arXiv 1706.03762), written so that a query's output does not depend on what else is in the
//! pass: keys are visited in cache order, masked keys are skipped rather than added as zeros,
//! and every sum runs in a fixed order. A token's attention output is therefore bit-identical
//! whether it is decoded alone, verified inside a window, or sits in a tree pass — the
//! property that makes greedy speculative decoding reproduce plain decoding exactly.
//!
//! The query heads that share a kv head (grouped-query attention) run in blocks of up to four
//! for one token: each key and value row is read once per block, and each query's operations
//! are those of attending alone, so blocking changes no bit.
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
    let group = heads / kv_heads;
    let job = HeadJob {
        q: qv,
        k: kv,
        v: vv,
        mask: mask_rows,
        tokens,
        kv_len,
        head_dim,
        scale,
    };
    // The query heads of a kv group in near-equal blocks of at most BLOCK_HEADS.
    let parts = group.div_ceil(BLOCK_HEADS);
    let blocks: Vec<Block> = (0..batch)
        .flat_map(|b| (0..kv_heads).map(move |kvh| (b, kvh)))
        .flat_map(|(b, kvh)| (0..tokens).map(move |i| (b, kvh, i)))
        .flat_map(|(b, kvh, i)| {
            (0..parts).map(move |part| {
                let first = part * group / parts;
                Block {
                    b,
                    kvh,
                    i,
                    first_head: kvh * group + first,
                    heads: (part + 1) * group / parts - first,
                }
            })
        })
        .collect();
    let run = |block: &Block| job.run(block);
    let work = batch * heads * tokens * kv_len * head_dim;
    let per_block: Vec<Vec<f32>> = if work >= 1 << 16 && rayon::current_num_threads() > 1 {
        blocks.par_iter().map(run).collect()
    } else {
        blocks.iter().map(run).collect()
    };
    // Blocks' rows -> (b, t, heads * d)
    let mut output = vec![0f32; batch * tokens * heads * head_dim];
    for (block, values) in blocks.iter().zip(&per_block) {
        let at = ((block.b * tokens + block.i) * heads + block.first_head) * head_dim;
        output[at..at + values.len()].copy_from_slice(values);
    }
    Ok(Some(Tensor::from_vec(
        output,
        (batch, tokens, heads * head_dim),
        &Device::Cpu,
    )?))
}

/// Query heads per block at most: the heads of one kv group that share one pass over its keys
/// and values, so that each key and value row is read once per block and not once per head (at
/// long contexts the rows come from L3 or memory). Four keep a block's queries and sums in L1.
const BLOCK_HEADS: usize = 4;

/// Query heads `first_head..first_head + heads` (all of kv head `kvh`) at token `i` of batch
/// `b`: they see the same keys, through the same mask row.
#[derive(Clone, Copy)]
struct Block {
    b: usize,
    kvh: usize,
    i: usize,
    first_head: usize,
    heads: usize,
}

/// What every block of one attention call reads.
struct HeadJob<'a> {
    q: View<'a>,
    k: View<'a>,
    v: View<'a>,
    /// The mask's rows and its batch size (1 or the batch).
    mask: Option<(&'a [f32], usize)>,
    tokens: usize,
    kv_len: usize,
    head_dim: usize,
    scale: f32,
}

impl HeadJob<'_> {
    /// The outputs `(heads, head_dim)` of a block, compiled for the widest vectors the CPU has
    /// (the bits do not depend on which).
    fn run(&self, block: &Block) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the feature was detected.
                return unsafe { self.run_avx512(block) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the feature was detected.
                return unsafe { self.run_avx2(block) };
            }
        }
        self.run_body(block)
    }

    /// [`HeadJob::run_body`] compiled for AVX-512.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512(&self, block: &Block) -> Vec<f32> {
        self.run_body(block)
    }

    /// [`HeadJob::run_body`] compiled for AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(&self, block: &Block) -> Vec<f32> {
        self.run_body(block)
    }

    /// Each query's operations are those of attending alone, in the same order (softmax over
    /// the visible keys in cache order, then the weighted sum of their values and one
    /// division); the block only interleaves its queries' work key by key.
    #[inline(always)]
    fn run_body(&self, block: &Block) -> Vec<f32> {
        let Block { b, kvh, i, .. } = *block;
        let (n, tokens, kv_len, head_dim) = (block.heads, self.tokens, self.kv_len, self.head_dim);
        let mask = self.mask.map(|(rows, batches)| {
            let mb = if batches == 1 { 0 } else { b };
            &rows[(mb * tokens + i) * kv_len..(mb * tokens + i + 1) * kv_len]
        });
        let queries: Vec<&[f32]> = (0..n)
            .map(|h| self.q.row(b, block.first_head + h, i, head_dim))
            .collect();
        // Each query's scores in its own row of `kv_len`, so that the softmax runs over
        // contiguous values (and vectorizes).
        let mut scores = vec![0f32; n * kv_len];
        let mut visible = Vec::with_capacity(kv_len);
        for j in 0..kv_len {
            let bias = mask.map_or(0.0, |m| m[j]);
            if bias == f32::NEG_INFINITY {
                continue;
            }
            let key = self.k.row(b, kvh, j, head_dim);
            let at = visible.len();
            for (h, query) in queries.iter().enumerate() {
                scores[h * kv_len + at] = simd::dot_lanes(query, key) * self.scale + bias;
            }
            visible.push(j as u32);
        }
        let mut out = vec![0f32; n * head_dim];
        let count = visible.len();
        if count == 0 {
            return out;
        }
        for row in scores.chunks_exact_mut(kv_len) {
            let row = &mut row[..count];
            let max = row
                .iter()
                .fold(f32::NEG_INFINITY, |m, &s| if s > m { s } else { m });
            for s in row.iter_mut() {
                *s = simd::exp(*s - max);
            }
        }
        let mut totals = vec![0f32; n];
        for (at, &j) in visible.iter().enumerate() {
            let value = self.v.row(b, kvh, j as usize, head_dim);
            for (h, (total, out)) in totals
                .iter_mut()
                .zip(out.chunks_exact_mut(head_dim))
                .enumerate()
            {
                let p = scores[h * kv_len + at];
                *total += p;
                for (o, &v) in out.iter_mut().zip(value) {
                    *o += p * v;
                }
            }
        }
        for (total, out) in totals.iter().zip(out.chunks_exact_mut(head_dim)) {
            let inverse = 1.0 / total;
            for v in out.iter_mut() {
                *v *= inverse;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

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
    fn blocks_of_query_heads_give_each_query_its_own_bits() {
        let mut rng = StdRng::seed_from_u64(7);
        // Groups of 6 (blocks of 3 + 3), 7 (4 + 3), 3 and 1; a causal mask per batch, a shared
        // mask, no mask; one query and several.
        let cases = [
            (2, 12, 2, 3, 37, 32, true, true),
            (1, 14, 2, 1, 300, 64, false, false),
            (1, 9, 3, 4, 20, 48, true, false),
            (2, 4, 4, 2, 5, 16, false, true),
        ];
        for (batch, heads, kv_heads, tokens, kv_len, d, masked, per_batch) in cases {
            let mut random =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0..2.0)).collect() };
            let q = random(batch * heads * tokens * d);
            let k = random(batch * kv_heads * kv_len * d);
            let v = random(batch * kv_heads * kv_len * d);
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
            let kt = tensor(&k, (batch, kv_heads, kv_len, d));
            let vt = tensor(&v, (batch, kv_heads, kv_len, d));
            let mt = Tensor::from_vec(mask.clone(), (mask_batches, tokens, kv_len), &Device::Cpu)
                .unwrap();
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
                            x[(b * kv_heads + kvh) * kv_len * d
                                ..(b * kv_heads + kvh + 1) * kv_len * d]
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
                        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(&got[out..out + d]),
                            bits(&want),
                            "batch {b} head {h} token {i} of case {heads}/{kv_heads} heads"
                        );
                    }
                }
            }
        }
    }
}
