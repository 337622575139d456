//! AVX2 kernels: each 64-byte vector of 16 interleaved weight rows is read as two 8-row halves,
//! and 4-quant dot products go through `vpmaddubsw` + `vpmaddwd`. One activation row at a
//! time (16 registers hold no more). The float updates follow `portable.rs` operation for
//! operation, so results match the other paths bit for bit.

// Half and lane loops index several arrays in step; iterators would hide that.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::activations::Activations;
use super::formats::GroupLayout;
use super::operands::{Output, Weights};
use super::portable::zero_point;
use super::types::WeightType;

/// # Safety
/// The CPU must support AVX2 and F16C; `groups` must be column groups of `w`, `acts` rows of
/// `w`'s input width, and `out` valid for writing each group's columns at every row of `acts`.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn matmul_groups(
    w: &Weights,
    acts: &Activations,
    groups: Range<usize>,
    out: Output,
) {
    // SAFETY: AVX2, F16C and the groups are this function's contract, so each `Row` is valid;
    // `values` holds the 16 stored lanes, and `out` takes `lanes` of them at each row and group.
    unsafe {
        for g in groups {
            let lanes = w.lanes(g);
            for row in 0..acts.rows {
                let ctx = Row {
                    layout: &w.layout,
                    group: w.group(g).as_ptr(),
                    acts,
                    row,
                };
                let acc = ctx.run(w.ty);
                let mut values = [0f32; 16];
                _mm256_storeu_ps(values.as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(values.as_mut_ptr().add(8), acc[1]);
                let dst = out.ptr.add(row * out.ld + out.offset + g * 16);
                std::ptr::copy_nonoverlapping(values.as_ptr(), dst, lanes);
            }
        }
    }
}

/// One activation row against one column group. Valid when `group` points at a whole packed
/// group of `layout` and `acts` holds row `row` of the layout's input width: every method's
/// reads then stay inside the group and the row.
struct Row<'a> {
    layout: &'a GroupLayout,
    group: *const u8,
    acts: &'a Activations,
    row: usize,
}

/// # Safety
/// The CPU must support AVX2, and `at` must be valid for reading 4 bytes (unaligned).
#[inline(always)]
unsafe fn broadcast4(at: *const i8) -> __m256i {
    // SAFETY: AVX2 and 4 readable bytes at `at` are the caller's contract.
    unsafe { _mm256_set1_epi32(std::ptr::read_unaligned(at as *const i32)) }
}

/// 16-bit right shift of both halves by a small constant (the loops that call it unroll).
///
/// # Safety
/// The CPU must support AVX2.
#[inline(always)]
unsafe fn shift_right(v: [__m256i; 2], by: usize) -> [__m256i; 2] {
    // SAFETY: AVX2 is the caller's contract; no memory is read.
    unsafe {
        let one = |v: __m256i| match by {
            0 => v,
            1 => _mm256_srli_epi16::<1>(v),
            2 => _mm256_srli_epi16::<2>(v),
            _ => _mm256_srli_epi16::<3>(v),
        };
        [one(v[0]), one(v[1])]
    }
}

/// # Safety
/// The CPU must support AVX2.
#[inline(always)]
unsafe fn shift_left4(v: [__m256i; 2]) -> [__m256i; 2] {
    // SAFETY: AVX2 is the caller's contract; no memory is read.
    unsafe { [_mm256_slli_epi16::<4>(v[0]), _mm256_slli_epi16::<4>(v[1])] }
}

/// `q | (bits & mask)` for both halves.
///
/// # Safety
/// The CPU must support AVX2.
#[inline(always)]
unsafe fn or_masked(q: [__m256i; 2], bits: [__m256i; 2], mask: __m256i) -> [__m256i; 2] {
    // SAFETY: AVX2 is the caller's contract; no memory is read.
    unsafe {
        [
            _mm256_or_si256(q[0], _mm256_and_si256(bits[0], mask)),
            _mm256_or_si256(q[1], _mm256_and_si256(bits[1], mask)),
        ]
    }
}

/// `acc + sum of 4-products` of unsigned quants (at most 63) and signed activations.
///
/// # Safety
/// The CPU must support AVX2.
#[inline(always)]
unsafe fn dot4(acc: __m256i, q: __m256i, a: __m256i) -> __m256i {
    // SAFETY: AVX2 is the caller's contract; no memory is read.
    unsafe {
        let pairs = _mm256_maddubs_epi16(q, a);
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
}

/// `acc + sum of 4-products` of 8-bit quants stored with a +128 offset and signed activations,
/// without the offset (so without saturating `vpmaddubsw`): `sum (q - 128) * a`.
///
/// # Safety
/// The CPU must support AVX2.
#[inline(always)]
unsafe fn dot4_signed(acc: __m256i, q_offset: __m256i, a: __m256i) -> __m256i {
    // SAFETY: AVX2 is the caller's contract; no memory is read.
    unsafe {
        let q = _mm256_xor_si256(q_offset, _mm256_set1_epi8(-128));
        let magnitude = _mm256_sign_epi8(q, q);
        let signed_a = _mm256_sign_epi8(a, q);
        dot4(acc, magnitude, signed_a)
    }
}

/// # Safety
/// The CPU must support AVX2, and `at` must be valid for reading 64 bytes (unaligned).
#[inline(always)]
unsafe fn load2(at: *const u8) -> [__m256i; 2] {
    // SAFETY: AVX2 and 64 readable bytes at `at` are the caller's contract.
    unsafe {
        [
            _mm256_loadu_si256(at as *const __m256i),
            _mm256_loadu_si256(at.add(32) as *const __m256i),
        ]
    }
}

/// # Safety
/// The CPU must support AVX2.
#[inline(always)]
unsafe fn nibbles(p: [__m256i; 2]) -> ([__m256i; 2], [__m256i; 2]) {
    // SAFETY: AVX2 is the caller's contract; no memory is read.
    unsafe {
        let low = _mm256_set1_epi8(0x0f);
        (
            [_mm256_and_si256(p[0], low), _mm256_and_si256(p[1], low)],
            [
                _mm256_and_si256(_mm256_srli_epi16(p[0], 4), low),
                _mm256_and_si256(_mm256_srli_epi16(p[1], 4), low),
            ],
        )
    }
}

/// f16 values of 16 lanes at `at` as two halves.
///
/// # Safety
/// The CPU must support AVX2 and F16C, and `at` must be valid for reading 32 bytes
/// (unaligned).
#[inline(always)]
unsafe fn halves_f16(at: *const u8) -> [__m256; 2] {
    // SAFETY: AVX2, F16C and 32 readable bytes at `at` are the caller's contract.
    unsafe {
        [
            _mm256_cvtph_ps(_mm_loadu_si128(at as *const __m128i)),
            _mm256_cvtph_ps(_mm_loadu_si128(at.add(16) as *const __m128i)),
        ]
    }
}

/// 16 unsigned (or signed) bytes at `at` as two halves of i32.
///
/// # Safety
/// The CPU must support AVX2, and `at` must be valid for reading 16 bytes (unaligned).
#[inline(always)]
unsafe fn halves_u8(at: *const u8) -> [__m256i; 2] {
    // SAFETY: AVX2 and 16 readable bytes at `at` are the caller's contract.
    unsafe {
        [
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(at as *const __m128i)),
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(at.add(8) as *const __m128i)),
        ]
    }
}

impl Row<'_> {
    /// # Safety
    /// The CPU must support AVX2 and F16C, the row must be valid (see [`Row`]) and `ty` must be
    /// the group's weight type.
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn run(&self, ty: WeightType) -> [__m256; 2] {
        // SAFETY: the kernels' contract is this function's (AVX2, F16C, a valid row of type `ty`).
        unsafe {
            match ty {
                WeightType::Q4_0 => self.blocks32::<false, false, false>(zero_point(ty)),
                WeightType::Q4_1 => self.blocks32::<false, false, true>(zero_point(ty)),
                WeightType::Q5_0 => self.blocks32::<true, false, false>(zero_point(ty)),
                WeightType::Q5_1 => self.blocks32::<true, false, true>(zero_point(ty)),
                // The signed dot product already removes the offset of 128.
                WeightType::Q8_0 => self.blocks32::<false, true, false>(0),
                WeightType::Q4K => self.k4::<false>(),
                WeightType::Q5K => self.k4::<true>(),
                WeightType::Q6K => self.k6(),
            }
        }
    }

    /// Block `b`'s meta, quants and high bits.
    ///
    /// # Safety
    /// The row must be valid (see [`Row`]) and `b` one of the layout's blocks.
    unsafe fn block(&self, b: usize) -> (*const u8, *const u8, *const u8) {
        // SAFETY: the offsets of a block of the layout stay inside the group (a valid row).
        unsafe {
            let layout = self.layout;
            (
                self.group.add(layout.meta_at(b)),
                self.group.add(layout.quants_at(b)),
                self.group.add(layout.planes_at(b)),
            )
        }
    }

    fn q(&self) -> *const i8 {
        self.acts.q[self.row * self.acts.k..].as_ptr()
    }

    fn scale(&self, b: usize) -> f32 {
        self.acts.scales[self.row * (self.acts.k / self.acts.block) + b]
    }

    fn sum32(&self, j: usize) -> i32 {
        self.acts.sums32[self.row * (self.acts.k / 32) + j]
    }

    fn pair32(&self, j: usize) -> i32 {
        self.acts.pairs32[self.row * (self.acts.k / 64) + j]
    }

    fn sum16(&self, j: usize) -> i32 {
        self.acts.sums16[self.row * (self.acts.k / 16) + j]
    }

    /// # Safety
    /// The CPU must support AVX2 and F16C, and the row must be valid (see [`Row`]).
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn blocks32<const FIVE: bool, const BYTES: bool, const MIN: bool>(
        &self,
        zp: i32,
    ) -> [__m256; 2] {
        // SAFETY: AVX2, F16C and a valid row are the caller's contract: the layout's offsets
        // of each block stay inside the group, and the activations' offsets inside the row.
        unsafe {
            let layout = self.layout;
            let bit4 = _mm256_set1_epi8(0x10);
            let a_row = self.q();
            let mut acc = [_mm256_setzero_ps(); 2];
            for b in 0..layout.blocks {
                let meta = self.group.add(layout.meta_at(b));
                let quants = self.group.add(layout.quants_at(b));
                let mut isum = [_mm256_setzero_si256(); 2];
                if BYTES {
                    for t in 0..8 {
                        let v = load2(quants.add(64 * t));
                        let a = broadcast4(a_row.add(b * 32 + 4 * t));
                        for h in 0..2 {
                            isum[h] = dot4_signed(isum[h], v[h], a);
                        }
                    }
                } else {
                    let high = load2(self.group.add(layout.planes_at(b)));
                    let high4 = shift_left4(high);
                    for t in 0..4 {
                        let (mut lo, mut hi) = nibbles(load2(quants.add(64 * t)));
                        if FIVE {
                            lo = or_masked(lo, shift_right(high, t), bit4);
                            hi = or_masked(hi, shift_right(high4, t), bit4);
                        }
                        let a_lo = broadcast4(a_row.add(b * 32 + 4 * t));
                        let a_hi = broadcast4(a_row.add(b * 32 + 16 + 4 * t));
                        for h in 0..2 {
                            isum[h] = dot4(isum[h], lo[h], a_lo);
                            isum[h] = dot4(isum[h], hi[h], a_hi);
                        }
                    }
                }
                let d = halves_f16(meta);
                let m = if MIN {
                    halves_f16(meta.add(32))
                } else {
                    [_mm256_setzero_ps(); 2]
                };
                let asum = self.sum32(b);
                let da = _mm256_set1_ps(self.scale(b));
                for h in 0..2 {
                    let ints = _mm256_sub_epi32(isum[h], _mm256_set1_epi32(zp * asum));
                    let update = _mm256_mul_ps(_mm256_mul_ps(da, d[h]), _mm256_cvtepi32_ps(ints));
                    acc[h] = _mm256_add_ps(acc[h], update);
                    if MIN {
                        let update =
                            _mm256_mul_ps(_mm256_mul_ps(da, m[h]), _mm256_set1_ps(asum as f32));
                        acc[h] = _mm256_add_ps(acc[h], update);
                    }
                }
            }
            acc
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and F16C, and the row must be valid (see [`Row`]).
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn k4<const FIVE: bool>(&self) -> [__m256; 2] {
        // SAFETY: AVX2, F16C and a valid row are the caller's contract: the layout's offsets
        // of each block stay inside the group, and the activations' offsets inside the row.
        unsafe {
            let layout = self.layout;
            let bit4 = _mm256_set1_epi8(0x10);
            let a_row = self.q();
            let mut acc = [_mm256_setzero_ps(); 2];
            for b in 0..layout.blocks {
                let (meta, quants, planes) = self.block(b);
                let mut big_a = [_mm256_setzero_si256(); 2];
                let mut big_b = [_mm256_setzero_si256(); 2];
                for s in 0..8 {
                    let high = if FIVE {
                        load2(planes.add(64 * s))
                    } else {
                        [_mm256_setzero_si256(); 2]
                    };
                    let high4 = shift_left4(high);
                    let mut isum = [_mm256_setzero_si256(); 2];
                    for t in 0..4 {
                        let (mut lo, mut hi) = nibbles(load2(quants.add(64 * (4 * s + t))));
                        if FIVE {
                            lo = or_masked(lo, shift_right(high, t), bit4);
                            hi = or_masked(hi, shift_right(high4, t), bit4);
                        }
                        let at = b * 256 + 32 * s + 4 * t;
                        let a_lo = broadcast4(a_row.add(at));
                        let a_hi = broadcast4(a_row.add(at + 16));
                        for h in 0..2 {
                            isum[h] = dot4(isum[h], lo[h], a_lo);
                            isum[h] = dot4(isum[h], hi[h], a_hi);
                        }
                    }
                    let scale = halves_u8(meta.add(64 + 16 * s));
                    for h in 0..2 {
                        big_a[h] =
                            _mm256_add_epi32(big_a[h], _mm256_mullo_epi32(isum[h], scale[h]));
                    }
                }
                // B: two sub-blocks' mins per vpmaddwd (see formats::min_at).
                for pair in 0..4 {
                    let sums = _mm256_set1_epi32(self.pair32(4 * b + pair));
                    for h in 0..2 {
                        let mins = _mm256_cvtepu8_epi16(_mm_loadu_si128(
                            meta.add(192 + 32 * pair + 16 * h) as *const __m128i,
                        ));
                        big_b[h] = _mm256_add_epi32(big_b[h], _mm256_madd_epi16(mins, sums));
                    }
                }
                let d = halves_f16(meta);
                let dmin = halves_f16(meta.add(32));
                let da = _mm256_set1_ps(self.scale(b));
                for h in 0..2 {
                    let plus = _mm256_mul_ps(_mm256_mul_ps(da, d[h]), _mm256_cvtepi32_ps(big_a[h]));
                    let minus =
                        _mm256_mul_ps(_mm256_mul_ps(da, dmin[h]), _mm256_cvtepi32_ps(big_b[h]));
                    acc[h] = _mm256_sub_ps(_mm256_add_ps(acc[h], plus), minus);
                }
            }
            acc
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and F16C, and the row must be valid (see [`Row`]).
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn k6(&self) -> [__m256; 2] {
        // SAFETY: AVX2, F16C and a valid row are the caller's contract: the layout's offsets
        // of each block stay inside the group, and the activations' offsets inside the row.
        unsafe {
            let layout = self.layout;
            let bits45 = _mm256_set1_epi8(0x30);
            let a_row = self.q();
            let mut acc = [_mm256_setzero_ps(); 2];
            for b in 0..layout.blocks {
                let (meta, quants, planes) = self.block(b);
                let mut big_a = [_mm256_setzero_si256(); 2];
                for s in 0..8 {
                    let high_lo = load2(planes.add(128 * s));
                    let high_hi = load2(planes.add(128 * s + 64));
                    let (high_lo4, high_hi4) = (shift_left4(high_lo), shift_left4(high_hi));
                    let mut isum_lo = [_mm256_setzero_si256(); 2];
                    let mut isum_hi = [_mm256_setzero_si256(); 2];
                    for t in 0..4 {
                        let (lo, hi) = nibbles(load2(quants.add(64 * (4 * s + t))));
                        // Two bits per group at 2t, see `formats::high_bit_slot`.
                        let (bits_lo, bits_hi) = match t {
                            0 => (high_lo4, high_hi4),
                            1 => (shift_right(high_lo4, 2), shift_right(high_hi4, 2)),
                            2 => (high_lo, high_hi),
                            _ => (shift_right(high_lo, 2), shift_right(high_hi, 2)),
                        };
                        let lo = or_masked(lo, bits_lo, bits45);
                        let hi = or_masked(hi, bits_hi, bits45);
                        let at = b * 256 + 32 * s + 4 * t;
                        let a_lo = broadcast4(a_row.add(at));
                        let a_hi = broadcast4(a_row.add(at + 16));
                        for h in 0..2 {
                            isum_lo[h] = dot4(isum_lo[h], lo[h], a_lo);
                            isum_hi[h] = dot4(isum_hi[h], hi[h], a_hi);
                        }
                    }
                    // Lane c holds the scales of sub-blocks 2s and 2s + 1 as two i16.
                    let offset_lo = _mm256_set1_epi32(32 * self.sum16(16 * b + 2 * s));
                    let offset_hi = _mm256_set1_epi32(32 * self.sum16(16 * b + 2 * s + 1));
                    for h in 0..2 {
                        let pair = _mm256_cvtepi8_epi16(_mm_loadu_si128(
                            meta.add(32 + 32 * s + 16 * h) as *const __m128i,
                        ));
                        let scale_lo = _mm256_srai_epi32::<16>(_mm256_slli_epi32::<16>(pair));
                        let scale_hi = _mm256_srai_epi32::<16>(pair);
                        let lo = _mm256_sub_epi32(isum_lo[h], offset_lo);
                        let hi = _mm256_sub_epi32(isum_hi[h], offset_hi);
                        let lo = _mm256_mullo_epi32(lo, scale_lo);
                        let hi = _mm256_mullo_epi32(hi, scale_hi);
                        big_a[h] = _mm256_add_epi32(big_a[h], _mm256_add_epi32(lo, hi));
                    }
                }
                let d = halves_f16(meta);
                let da = _mm256_set1_ps(self.scale(b));
                for h in 0..2 {
                    let update =
                        _mm256_mul_ps(_mm256_mul_ps(da, d[h]), _mm256_cvtepi32_ps(big_a[h]));
                    acc[h] = _mm256_add_ps(acc[h], update);
                }
            }
            acc
        }
    }
}
