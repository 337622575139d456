//! Activation quantization: each call's input rows to int8 with one f32 scale per block, once
//! per call, with the sums the kernels need.

use super::types::KernelPath;

/// Activations quantized to int8 with one f32 scale per `block` values (Q8_0 / Q8_K style).
pub(crate) struct Activations {
    pub rows: usize,
    pub k: usize,
    pub block: usize,
    /// `rows * k` quants.
    pub q: Vec<i8>,
    /// `rows * k / block` scales.
    pub scales: Vec<f32>,
    /// Sums of every 16 quants, `rows * k / 16`.
    pub sums16: Vec<i32>,
    /// Sums of every 32 quants, `rows * k / 32`.
    pub sums32: Vec<i32>,
    /// Pairs of `sums16` packed as two i16 in one i32 (low half first), `rows * k / 32`: one
    /// broadcast operand of `vpdpwssd`. The sums fit: at most 16 * 127.
    pub pairs16: Vec<i32>,
    /// Pairs of `sums32` packed the same way, `rows * k / 64` (at most 32 * 127 each).
    pub pairs32: Vec<i32>,
}

/// Two i16 in one i32, `low` in the low half.
fn pack_pair(low: i32, high: i32) -> i32 {
    (low as i16 as u16 as u32 | (high as i16 as u16 as u32) << 16) as i32
}

/// Round to nearest, ties to even, for |v| < 2^22 (llama.cpp's `nearest_int`): plain f32
/// additions, so every path and every compiler target rounds alike.
#[inline(always)]
fn nearest_int(v: f32) -> i32 {
    let t = v + 12_582_912.0;
    (t.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

impl Activations {
    /// Quantizes `rows` rows of `k` values. The arithmetic is the same on every path (exact
    /// maxima, one IEEE multiply and the rounding trick per value); only the vector width of
    /// the compiled loop differs.
    pub(crate) fn quantize(
        path: KernelPath,
        x: &[f32],
        rows: usize,
        k: usize,
        block: usize,
    ) -> Self {
        debug_assert_eq!(x.len(), rows * k);
        debug_assert_eq!(k % block, 0);
        let mut acts = Self {
            rows,
            k,
            block,
            q: vec![0i8; rows * k],
            scales: vec![0f32; rows * k / block],
            sums16: vec![0i32; rows * k / 16],
            sums32: vec![0i32; rows * k / 32],
            pairs16: vec![0i32; rows * k / 32],
            pairs32: vec![0i32; rows * k / 64],
        };
        match path {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the callers (`matmul`, the kernel tests) pass a path the CPU supports.
            KernelPath::Avx512Vnni => unsafe { quantize_avx512(x, &mut acts) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            KernelPath::Avx2 => unsafe { quantize_avx2(x, &mut acts) },
            _ => quantize_rows(x, &mut acts),
        }
        acts
    }
}

/// [`quantize_rows`] compiled for AVX-512.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VL.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_avx512(x: &[f32], acts: &mut Activations) {
    quantize_rows(x, acts)
}

/// [`quantize_rows`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_avx2(x: &[f32], acts: &mut Activations) {
    quantize_rows(x, acts)
}

/// The body of [`Activations::quantize`], written in 16-lane chunks so that it vectorizes at
/// whatever width the caller is compiled for.
#[inline(always)]
fn quantize_rows(x: &[f32], acts: &mut Activations) {
    let block = acts.block;
    for ((src, dst), scale) in x
        .chunks_exact(block)
        .zip(acts.q.chunks_exact_mut(block))
        .zip(acts.scales.iter_mut())
    {
        let mut lanes = [0f32; 16];
        let mut non_finite = [false; 16];
        for chunk in src.chunks_exact(16) {
            for i in 0..16 {
                let magnitude = chunk[i].abs();
                non_finite[i] |= magnitude.is_nan() || magnitude == f32::INFINITY;
                lanes[i] = if magnitude > lanes[i] {
                    magnitude
                } else {
                    lanes[i]
                };
            }
        }
        if non_finite.iter().any(|&b| b) {
            // Poison the block's outputs instead of hiding a non-finite activation.
            *scale = f32::NAN;
            dst.fill(0);
            continue;
        }
        let amax = lanes.iter().fold(0f32, |m, &v| if v > m { v } else { m });
        *scale = amax / 127.0;
        let inverse = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = nearest_int(v * inverse).clamp(-127, 127) as i8;
        }
    }
    for (q, sum) in acts.q.chunks_exact(16).zip(acts.sums16.iter_mut()) {
        let mut total = 0i32;
        for &v in q {
            total += v as i32;
        }
        *sum = total;
    }
    for (pair, sum) in acts.sums16.chunks_exact(2).zip(acts.sums32.iter_mut()) {
        *sum = pair[0] + pair[1];
    }
    // The pairs serve the k-quants (rows of whole 256-blocks, so pairs never straddle rows).
    if acts.block == 256 {
        for (pair, packed) in acts.sums16.chunks_exact(2).zip(acts.pairs16.iter_mut()) {
            *packed = pack_pair(pair[0], pair[1]);
        }
        for (pair, packed) in acts.sums32.chunks_exact(2).zip(acts.pairs32.iter_mut()) {
            *packed = pack_pair(pair[0], pair[1]);
        }
    }
}
