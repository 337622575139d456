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
//! Keys and values may be cached as f32 or f16 (`storage`): f16 rows are widened to f32
//! exactly before any arithmetic, so the storage changes no operation, only the values that
//! were rounded when cached.
//!
//! candle's matmul-softmax-matmul changes its summation order with the number of queries and
//! keys, so it is used only off the CPU and for training (where gradients must flow).

use candle_core::{CpuStorage, Device, Storage, Tensor};
use rayon::prelude::*;

use storage::{contiguous, each_wide, view, widened, CacheElement, Shape, View};

use super::cpu_ops::{self as simd, cpu_f32};
use crate::error::Result;

/// Attention of `q` `(b, heads, t, d)` over `keys`/`values` `(b, kv_heads, kv_len, d)` with an
/// optional additive mask `(1 or b, t, kv_len)` (0 or -inf), scores scaled by `scale`.
/// Returns `(b, t, heads * d)`, or `None` unless `q` and the mask are f32 on the CPU and the
/// keys and values both f32 or both f16 there.
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
    let Some((qs, ql)) = cpu_f32(q) else {
        return Ok(None);
    };
    let Some(qv) = simd::slice(&qs).and_then(|data| view(data, ql)) else {
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
    let shape = Shape {
        batch,
        heads,
        kv_heads,
        tokens,
        kv_len,
        head_dim,
    };
    let (ks, kl) = keys.storage_and_layout();
    let (vs, vl) = values.storage_and_layout();
    let output = match (&*ks, &*vs) {
        (Storage::Cpu(CpuStorage::F32(kd)), Storage::Cpu(CpuStorage::F32(vd))) => {
            let (Some(k), Some(v)) = (view(kd.as_slice(), kl), view(vd.as_slice(), vl)) else {
                return Ok(None);
            };
            attend(shape, qv, k, v, mask_rows, scale)
        }
        (Storage::Cpu(CpuStorage::F16(kd)), Storage::Cpu(CpuStorage::F16(vd))) => {
            let (Some(k), Some(v)) = (view(kd.as_slice(), kl), view(vd.as_slice(), vl)) else {
                return Ok(None);
            };
            if tokens >= WIDEN_FROM_TOKENS {
                let (k, v) = (widened(&k, shape), widened(&v, shape));
                let (k, v) = (contiguous(&k, shape), contiguous(&v, shape));
                attend(shape, qv, k, v, mask_rows, scale)
            } else {
                attend(shape, qv, k, v, mask_rows, scale)
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(Tensor::from_vec(
        output,
        (batch, tokens, heads * head_dim),
        &Device::Cpu,
    )?))
}

/// Queries per call from which f16 keys and values are widened to f32 once, up front, rather
/// than in registers at every use: a prompt's chunk reuses each row for every query, a decode
/// step (one query) reads each row about once, where half the bytes matter more.
const WIDEN_FROM_TOKENS: usize = 16;

/// [`attention`] over keys and values stored as `E`: the outputs `(b, t, heads * d)`.
fn attend<E: CacheElement>(
    shape: Shape,
    q: View<'_, f32>,
    k: View<'_, E>,
    v: View<'_, E>,
    mask: Option<(&[f32], usize)>,
    scale: f32,
) -> Vec<f32> {
    let (batch, heads, kv_heads) = (shape.batch, shape.heads, shape.kv_heads);
    let (tokens, kv_len, head_dim) = (shape.tokens, shape.kv_len, shape.head_dim);
    let group = heads / kv_heads;
    let job = HeadJob {
        q,
        k,
        v,
        mask,
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
    output
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
struct HeadJob<'a, E> {
    q: View<'a, f32>,
    k: View<'a, E>,
    v: View<'a, E>,
    /// The mask's rows and its batch size (1 or the batch).
    mask: Option<(&'a [f32], usize)>,
    tokens: usize,
    kv_len: usize,
    head_dim: usize,
    scale: f32,
}

impl<E: CacheElement> HeadJob<'_, E> {
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
        let mut biases = Vec::with_capacity(kv_len);
        for j in 0..kv_len {
            let bias = mask.map_or(0.0, |m| m[j]);
            if bias != f32::NEG_INFINITY {
                visible.push(j as u32);
                biases.push(bias);
            }
        }
        // Sixteen keys at a time: their rows stay in L1 while every head of the block uses them.
        let mut gathered = [&[][..]; 16];
        for (chunk, (indices, biases)) in visible.chunks(16).zip(biases.chunks(16)).enumerate() {
            let keys = self.k.rows16(b, kvh, indices, head_dim, &mut gathered);
            for (h, query) in queries.iter().enumerate() {
                let at = h * kv_len + chunk * 16;
                let row = &mut scores[at..at + keys.len()];
                dots(query, keys, row);
                for (s, &bias) in row.iter_mut().zip(biases) {
                    *s = *s * self.scale + bias;
                }
            }
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
        for (chunk, indices) in visible.chunks(16).enumerate() {
            let values = self.v.rows16(b, kvh, indices, head_dim, &mut gathered);
            for (h, (total, out)) in totals
                .iter_mut()
                .zip(out.chunks_exact_mut(head_dim))
                .enumerate()
            {
                let at = h * kv_len + chunk * 16;
                let weights = &scores[at..at + values.len()];
                for &p in weights {
                    *total += p;
                }
                accumulate(out, weights, values);
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

/// `out += weights[k] * values[k]` for each k in order, each element's multiply then add (the
/// per-query order of attending alone). On AVX-512 with rows of 64 or 128 values, `out` stays
/// in registers across the keys instead of going through memory once per key.
#[inline(always)]
fn accumulate<E: CacheElement>(out: &mut [f32], weights: &[f32], values: &[&[E]]) {
    #[cfg(target_arch = "x86_64")]
    {
        let d = out.len();
        if (d == 64 || d == 128)
            && values.iter().all(|v| v.len() == d)
            && std::arch::is_x86_feature_detected!("avx512f")
        {
            // SAFETY: AVX-512 F was detected; `out` and every value row hold `d` values, 4 or 8
            // vectors of 16.
            unsafe {
                if d == 64 {
                    accumulate_avx512::<E, 4>(out, weights, values);
                } else {
                    accumulate_avx512::<E, 8>(out, weights, values);
                }
            }
            return;
        }
    }
    each_wide(&values[..weights.len().min(values.len())], |k, value| {
        let p = weights[k];
        for (o, &v) in out.iter_mut().zip(value) {
            *o += p * v;
        }
    });
}

/// [`accumulate`] for rows of `16 * VECTORS` values on AVX-512.
///
/// # Safety
/// The CPU must support AVX-512 F; `out` and every row of `values` must hold `16 * VECTORS`
/// values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn accumulate_avx512<E: CacheElement, const VECTORS: usize>(
    out: &mut [f32],
    weights: &[f32],
    values: &[&[E]],
) {
    use std::arch::x86_64::*;
    // SAFETY: AVX-512 F and the row lengths are this function's contract: every load and
    // store covers 16 values at an offset below 16 * VECTORS.
    unsafe {
        let mut acc: [__m512; VECTORS] =
            std::array::from_fn(|c| _mm512_loadu_ps(out.as_ptr().add(16 * c)));
        for (&p, value) in weights.iter().zip(values) {
            let p = _mm512_set1_ps(p);
            for (c, acc) in acc.iter_mut().enumerate() {
                let v = E::load16(value.as_ptr().add(16 * c));
                *acc = _mm512_add_ps(*acc, _mm512_mul_ps(p, v));
            }
        }
        for (c, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(16 * c), *acc);
        }
    }
}

/// `out[i] = dot_lanes(query, keys[i])` for up to 16 keys, bit for bit: on AVX-512 with rows
/// a multiple of 16 long, the 16 keys' lane sums are transposed so that adding them in lane
/// order (what `dot_lanes` does one key at a time, a chain of 15 dependent adds) runs as 16
/// vector adds for all the keys at once.
#[inline(always)]
fn dots<E: CacheElement>(query: &[f32], keys: &[&[E]], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        let d = query.len();
        if keys.len() == 16
            && d.is_multiple_of(16)
            && keys.iter().all(|k| k.len() == d)
            && std::arch::is_x86_feature_detected!("avx512f")
        {
            // SAFETY: AVX-512 F was detected; the query and all 16 keys hold `d` values, a
            // multiple of 16, and `out` holds 16 (it is as long as `keys`).
            let sums = unsafe { dots16_avx512(query, keys) };
            out.copy_from_slice(&sums);
            return;
        }
    }
    each_wide(&keys[..out.len().min(keys.len())], |i, key| {
        out[i] = simd::dot_lanes(query, key);
    });
}

/// The 16 dot products of [`dots`] on AVX-512: `dot_lanes`' operations, lane for lane.
///
/// # Safety
/// The CPU must support AVX-512 F; `keys` must hold 16 rows, each as long as `query`, whose
/// length is a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots16_avx512<E: CacheElement>(query: &[f32], keys: &[&[E]]) -> [f32; 16] {
    use std::arch::x86_64::*;
    // SAFETY: AVX-512 F and the lengths are this function's contract: every load reads 16
    // values at an offset below `query.len()`, a multiple of 16, inside each row.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); 16];
        // Key by key, each row read front to back (without masked holes the 16 rows lie end to
        // end in the cache, one stream for the prefetcher).
        for (acc, key) in acc.iter_mut().zip(keys) {
            for c in (0..query.len()).step_by(16) {
                let q = _mm512_loadu_ps(query.as_ptr().add(c));
                let k = E::load16(key.as_ptr().add(c));
                *acc = _mm512_add_ps(*acc, _mm512_mul_ps(q, k));
            }
        }
        // Transpose: rows (keys) of lanes into rows (lanes) of keys.
        let mut t = [_mm512_setzero_ps(); 16];
        for m in 0..8 {
            t[2 * m] = _mm512_unpacklo_ps(acc[2 * m], acc[2 * m + 1]);
            t[2 * m + 1] = _mm512_unpackhi_ps(acc[2 * m], acc[2 * m + 1]);
        }
        let pd = _mm512_castps_pd;
        let ps = _mm512_castpd_ps;
        let mut r = [_mm512_setzero_ps(); 16];
        for i in 0..4 {
            r[4 * i] = ps(_mm512_unpacklo_pd(pd(t[4 * i]), pd(t[4 * i + 2])));
            r[4 * i + 1] = ps(_mm512_unpackhi_pd(pd(t[4 * i]), pd(t[4 * i + 2])));
            r[4 * i + 2] = ps(_mm512_unpacklo_pd(pd(t[4 * i + 1]), pd(t[4 * i + 3])));
            r[4 * i + 3] = ps(_mm512_unpackhi_pd(pd(t[4 * i + 1]), pd(t[4 * i + 3])));
        }
        // r[4i + j], 128-bit lane l: lane 4l + j of keys 4i..4i + 4.
        let mut lanes = [_mm512_setzero_ps(); 16];
        for j in 0..4 {
            let u0 = _mm512_shuffle_f32x4::<0x44>(r[j], r[4 + j]);
            let u1 = _mm512_shuffle_f32x4::<0xee>(r[j], r[4 + j]);
            let u2 = _mm512_shuffle_f32x4::<0x44>(r[8 + j], r[12 + j]);
            let u3 = _mm512_shuffle_f32x4::<0xee>(r[8 + j], r[12 + j]);
            lanes[j] = _mm512_shuffle_f32x4::<0x88>(u0, u2);
            lanes[4 + j] = _mm512_shuffle_f32x4::<0xdd>(u0, u2);
            lanes[8 + j] = _mm512_shuffle_f32x4::<0x88>(u1, u3);
            lanes[12 + j] = _mm512_shuffle_f32x4::<0xdd>(u1, u3);
        }
        let mut sum = _mm512_setzero_ps();
        for lane in lanes {
            sum = _mm512_add_ps(sum, lane);
        }
        let mut out = [0f32; 16];
        _mm512_storeu_ps(out.as_mut_ptr(), sum);
        out
    }
}

mod storage;
#[cfg(test)]
mod tests;
