//! The k-quant kernels of the AVX2 path (Q4_K, Q5_K, Q6_K): one super-block of 256 weights at a
//! time, each half of each chunk decoded once and applied to every row of the tile, or read
//! already decoded (once for every tile of a pass, see `super::DECODED`).

// Row and half loops index several arrays in step; iterators would hide that.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::{
    broadcast4, decoded_at, flush_every, load, load_f16, nibbles, products, six_bits, widen, Tile,
};

impl<const R: usize> Tile<'_, R> {
    /// Q4_K and Q5_K: `A = sum_j scale_j * isum_j` with each sub-block's 16-bit partial sums
    /// widened straight by its scale, `B = sum_j min_j * asum_j` two sub-blocks per `vpmaddwd`
    /// (see `formats::min_at`). With `PRE` the quants come decoded (see `super::DECODED`).
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C, the tile must be valid (see [`Tile`]), `blocks` must
    /// be blocks of its layout and `sums` must hold `R` rows. With `PRE`, `blocks` must be the
    /// one block decoded at the tile's `decoded`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn k4<const FIVE: bool, const PRE: bool>(
        &self,
        blocks: Range<usize>,
        sums: &mut [[__m256; 2]],
    ) {
        // SAFETY: AVX2, F16C, a valid tile and blocks of its layout are the caller's contract:
        // the layout's offsets of each block stay inside the group, and the activations'
        // offsets inside each row.
        unsafe {
            let mut acc: [[__m256; 2]; R] = std::array::from_fn(|r| sums[r]);
            for b in blocks {
                let (meta, quants, planes) = self.block(b);
                // Both halves of each chunk at once, so that each activation broadcast serves
                // both; the rows' i32 sums `big_a`, touched once per sub-block, may wait on the
                // stack.
                let mut big_a = [[_mm256_setzero_si256(); 2]; R];
                for s in 0..8 {
                    let high: [__m256i; 2] = std::array::from_fn(|h| {
                        if FIVE && !PRE {
                            load(planes.add(64 * s + 32 * h))
                        } else {
                            _mm256_setzero_si256()
                        }
                    });
                    let mut part = [[_mm256_setzero_si256(); 2]; R];
                    for t in 0..4 {
                        let quants: [(__m256i, __m256i); 2] = std::array::from_fn(|h| {
                            if PRE {
                                (
                                    *self.decoded.add(decoded_at(s, t, 0, h)),
                                    *self.decoded.add(decoded_at(s, t, 1, h)),
                                )
                            } else {
                                let chunk = load(quants.add(64 * (4 * s + t) + 32 * h));
                                nibbles::<FIVE>(chunk, high[h], t)
                            }
                        });
                        for r in 0..R {
                            let at = self.q[r].add(b * 256 + 32 * s + 4 * t);
                            let (a_lo, a_hi) = (broadcast4(at), broadcast4(at.add(16)));
                            for h in 0..2 {
                                let (lo, hi) = quants[h];
                                let p = _mm256_add_epi16(products(lo, a_lo), products(hi, a_hi));
                                part[r][h] = _mm256_add_epi16(part[r][h], p);
                            }
                        }
                        if (t + 1) % flush_every(FIVE) == 0 {
                            for h in 0..2 {
                                // The sub-block's scale of each column, an i16 pair per lane.
                                let scale = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                                    meta.add(64 + 16 * s + 8 * h) as *const __m128i,
                                ));
                                let scale = _mm256_or_si256(scale, _mm256_slli_epi32::<16>(scale));
                                for r in 0..R {
                                    big_a[r][h] = widen(big_a[r][h], part[r][h], scale);
                                    part[r][h] = _mm256_setzero_si256();
                                }
                            }
                        }
                    }
                }
                for h in 0..2 {
                    let mut big_b = [_mm256_setzero_si256(); R];
                    for pair in 0..4 {
                        let mins = _mm256_cvtepu8_epi16(_mm_loadu_si128(
                            meta.add(192 + 32 * pair + 16 * h) as *const __m128i,
                        ));
                        for r in 0..R {
                            let sums = _mm256_set1_epi32(*self.pairs32[r].add(4 * b + pair));
                            big_b[r] = widen(big_b[r], mins, sums);
                        }
                    }
                    let d = load_f16(meta.add(16 * h));
                    let dmin = load_f16(meta.add(32 + 16 * h));
                    for r in 0..R {
                        let da = _mm256_set1_ps(*self.scales[r].add(b));
                        let plus =
                            _mm256_mul_ps(_mm256_mul_ps(da, d), _mm256_cvtepi32_ps(big_a[r][h]));
                        let minus =
                            _mm256_mul_ps(_mm256_mul_ps(da, dmin), _mm256_cvtepi32_ps(big_b[r]));
                        acc[r][h] = _mm256_sub_ps(_mm256_add_ps(acc[r][h], plus), minus);
                    }
                }
            }
            sums[..R].copy_from_slice(&acc);
        }
    }

    /// Q6_K: `A = sum_j scale_j * isum_j - 32 * sum_j scale_j * asum_j` over the 16-weight
    /// sub-blocks, the second sum two sub-blocks per `vpmaddwd` (see `formats::q6_scale_at`).
    /// Quants reach 63, so the 16-bit partial sums are widened every two chunks.
    /// The two sub-blocks of each 32 weights go in turn, so that a tile of four rows fits. With
    /// `PRE` the quants come decoded (see `super::DECODED`).
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C, the tile must be valid (see [`Tile`]), `blocks` must
    /// be blocks of its layout and `sums` must hold `R` rows. With `PRE`, `blocks` must be the
    /// one block decoded at the tile's `decoded`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn k6<const PRE: bool>(
        &self,
        blocks: Range<usize>,
        sums: &mut [[__m256; 2]],
    ) {
        // SAFETY: AVX2, F16C, a valid tile and blocks of its layout are the caller's contract:
        // the layout's offsets of each block stay inside the group, and the activations'
        // offsets inside each row.
        unsafe {
            let mut acc: [[__m256; 2]; R] = std::array::from_fn(|r| sums[r]);
            for b in blocks {
                let (meta, quants, planes) = self.block(b);
                // Both halves of each chunk at once, as in `k4`.
                let mut big_a = [[_mm256_setzero_si256(); 2]; R];
                for s in 0..8 {
                    // Lane c holds the scales of sub-blocks 2s and 2s + 1 as two i16.
                    let pair: [__m256i; 2] = std::array::from_fn(|h| {
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(
                            meta.add(32 + 32 * s + 16 * h) as *const __m128i
                        ))
                    });
                    // The low nibbles (sub-block 2s) and then the high ones (2s + 1), each
                    // pass with one partial sum per row and half, so that four rows fit.
                    for second in [false, true] {
                        let high: [__m256i; 2] = std::array::from_fn(|h| {
                            if PRE {
                                _mm256_setzero_si256()
                            } else {
                                load(planes.add(128 * s + 64 * second as usize + 32 * h))
                            }
                        });
                        let mut part = [[_mm256_setzero_si256(); 2]; R];
                        for t in 0..4 {
                            let q: [__m256i; 2] = std::array::from_fn(|h| {
                                if PRE {
                                    *self.decoded.add(decoded_at(s, t, second as usize, h))
                                } else {
                                    let chunk = load(quants.add(64 * (4 * s + t) + 32 * h));
                                    let nibble = if second {
                                        _mm256_srli_epi16::<4>(chunk)
                                    } else {
                                        chunk
                                    };
                                    six_bits(nibble, high[h], t)
                                }
                            });
                            let offset = if second { 16 } else { 0 };
                            for r in 0..R {
                                let at = self.q[r].add(b * 256 + 32 * s + 4 * t + offset);
                                let a = broadcast4(at);
                                for h in 0..2 {
                                    part[r][h] = _mm256_add_epi16(part[r][h], products(q[h], a));
                                }
                            }
                            if t % 2 == 1 {
                                for h in 0..2 {
                                    // Each sub-block's scale in both halves of the lane.
                                    let scale = if second {
                                        _mm256_shufflehi_epi16::<0xf5>(
                                            _mm256_shufflelo_epi16::<0xf5>(pair[h]),
                                        )
                                    } else {
                                        _mm256_shufflehi_epi16::<0xa0>(
                                            _mm256_shufflelo_epi16::<0xa0>(pair[h]),
                                        )
                                    };
                                    for r in 0..R {
                                        big_a[r][h] = widen(big_a[r][h], part[r][h], scale);
                                        part[r][h] = _mm256_setzero_si256();
                                    }
                                }
                            }
                        }
                    }
                    for r in 0..R {
                        let sums = _mm256_set1_epi32(*self.pairs16[r].add(8 * b + s));
                        for h in 0..2 {
                            let offset = _mm256_madd_epi16(pair[h], sums);
                            big_a[r][h] =
                                _mm256_sub_epi32(big_a[r][h], _mm256_slli_epi32::<5>(offset));
                        }
                    }
                }
                for h in 0..2 {
                    let d = load_f16(meta.add(16 * h));
                    for r in 0..R {
                        let da = _mm256_set1_ps(*self.scales[r].add(b));
                        let update =
                            _mm256_mul_ps(_mm256_mul_ps(da, d), _mm256_cvtepi32_ps(big_a[r][h]));
                        acc[r][h] = _mm256_add_ps(acc[r][h], update);
                    }
                }
            }
            sums[..R].copy_from_slice(&acc);
        }
    }
}
