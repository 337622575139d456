//! AVX2 kernels: each 64-byte vector of 16 interleaved weight rows is read as two 8-row halves,
//! and 4-quant dot products go through `vpmaddubsw`. Activation rows go in tiles of up to four
//! (see [`TILE`]): each weight vector is loaded and its nibbles and high bits unpacked once per
//! tile, then multiplied with every row of the tile, both halves against one broadcast of the
//! row's activations. A pass over a column group
//! takes its blocks a step at a time through every tile (see [`PASS`]); with several tiles, a
//! k-quant block is decoded once for all of them (see [`DECODED`]). The float updates
//! follow `portable.rs` operation for operation, per row and column, so results match the
//! other paths bit for bit whatever the tile.
//!
//! Integer sums are exact, so how they are grouped is free: the 16-bit products of
//! `vpmaddubsw` (each at most `2 * qmax * 127`) are added in 16 bits for as many chunks as
//! cannot overflow (see [`flush_every`]) before one `vpmaddwd` widens them, by ones or
//! directly by the sub-block's scale.

// Row, half and lane loops index several arrays in step; iterators would hide that.
#![allow(clippy::needless_range_loop)]

mod k_quants;

use std::arch::x86_64::*;
use std::ops::Range;

use super::activations::Activations;
use super::formats::GroupLayout;
use super::operands::{Output, Weights};
use super::portable::zero_point;
use super::types::WeightType;

/// Activation rows per tile. Four rows keep each row's i32 sum and i16 partial sum (Q6_K: one
/// sub-block at a time, see `k6`) in registers beside the decoded chunk, the high bits, the
/// scales and the masks, in all 16 for every type; the rows' float sums, touched once per
/// block, may wait on the stack.
const TILE: usize = 4;

/// Activation rows per pass over a column group. Within a pass the group's weight blocks go by
/// once, each step of blocks applied to every tile of rows in turn, so that the weights stream
/// from memory while the tiles compute (rather than all at once for the first tile); the rows'
/// float sums wait on the stack between steps.
const PASS: usize = 64;

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
    // SAFETY: AVX2, F16C and the groups are this function's contract, so every tile is valid
    // (see `Tile`) once it points at the group, and `out` takes the group's `lanes` columns at
    // each row of the pass.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; PASS];
        let mut decoded = [_mm256_setzero_si256(); DECODED];
        let buffer = decoded.as_mut_ptr();
        let mut first = 0;
        while first < acts.rows {
            let rows = (acts.rows - first).min(PASS);
            // With several tiles, a k-quant block's quants are decoded once into `decoded` and
            // every tile reads them there.
            let decode = if rows > TILE { decoder_for(w.ty) } else { None };
            let pre = decode.is_some();
            let step4 = Tile::<TILE>::step_for(w.ty, pre);
            let step3 = Tile::<3>::step_for(w.ty, pre);
            let step2 = Tile::<2>::step_for(w.ty, pre);
            let step1 = Tile::<1>::step_for(w.ty, pre);
            let mut full: Vec<Tile<TILE>> = (0..rows / TILE)
                .map(|t| Tile::new(w, acts, first + t * TILE))
                .collect();
            let rest_at = rows / TILE * TILE;
            let rest = first + rest_at;
            let (mut t3, mut t2, mut t1) = match rows - rest_at {
                3 => (Some(Tile::<3>::new(w, acts, rest)), None, None),
                2 => (None, Some(Tile::<2>::new(w, acts, rest)), None),
                1 => (None, None, Some(Tile::<1>::new(w, acts, rest))),
                _ => (None, None, None),
            };
            // With one tile, all blocks in one step; otherwise about 256 weights per step, so
            // that the call and the sums' round trip through the stack stay small next to the
            // work.
            let per_step = if rows <= TILE {
                w.layout.blocks
            } else {
                (256 / w.ty.block_len()).max(w.layout.blocks_per_record())
            };
            debug_assert!(!pre || per_step == 1);
            full.iter_mut().for_each(|tile| tile.decoded = buffer);
            if let Some(tile) = &mut t3 {
                tile.decoded = buffer;
            }
            if let Some(tile) = &mut t2 {
                tile.decoded = buffer;
            }
            if let Some(tile) = &mut t1 {
                tile.decoded = buffer;
            }
            for g in groups.clone() {
                let group = w.group(g).as_ptr();
                full.iter_mut().for_each(|tile| tile.group = group);
                if let Some(tile) = &mut t3 {
                    tile.group = group;
                }
                if let Some(tile) = &mut t2 {
                    tile.group = group;
                }
                if let Some(tile) = &mut t1 {
                    tile.group = group;
                }
                acc[..rows].fill([_mm256_setzero_ps(); 2]);
                for b in (0..w.layout.blocks).step_by(per_step) {
                    let blocks = b..(b + per_step).min(w.layout.blocks);
                    if let Some(decode) = decode {
                        decode(group, &w.layout, b, buffer);
                    }
                    for (t, tile) in full.iter().enumerate() {
                        step4(tile, blocks.clone(), &mut acc[t * TILE..(t + 1) * TILE]);
                    }
                    let tail = &mut acc[rest_at..rows];
                    if let Some(tile) = &t3 {
                        step3(tile, blocks.clone(), tail);
                    } else if let Some(tile) = &t2 {
                        step2(tile, blocks.clone(), tail);
                    } else if let Some(tile) = &t1 {
                        step1(tile, blocks.clone(), tail);
                    }
                }
                let lanes = w.lanes(g);
                for (r, acc) in acc[..rows].iter().enumerate() {
                    let mut values = [0f32; 16];
                    _mm256_storeu_ps(values.as_mut_ptr(), acc[0]);
                    _mm256_storeu_ps(values.as_mut_ptr().add(8), acc[1]);
                    let dst = out.ptr.add((first + r) * out.ld + out.offset + g * 16);
                    std::ptr::copy_nonoverlapping(values.as_ptr(), dst, lanes);
                }
            }
            first += rows;
        }
    }
}

/// A type's step: `(tile, blocks, sums)` adds a range of the group's blocks to the `R` rows'
/// running sums (two halves of 8 columns per row).
type Step<'a, const R: usize> = unsafe fn(&Tile<'a, R>, Range<usize>, &mut [[__m256; 2]]);

/// The decoder of a k-quant type's blocks, if decoding them once for all tiles pays (see
/// [`DECODED`]): for the types with high bits. Q4_K's nibbles cost less to unpack in each tile
/// than to store and load again.
fn decoder_for(ty: WeightType) -> Option<Decode> {
    match ty {
        WeightType::Q5K => Some(decode_k4::<true>),
        WeightType::Q6K => Some(decode_k6),
        _ => None,
    }
}

/// One column group against `R` activation rows, with raw pointers to each row's data (read
/// without bounds checks in the inner loops; `new` takes them from checked slices). Valid when
/// `group` points at a whole packed group of `layout` and the rows' pointers come from
/// activations of the layout's input width: every method's reads then stay inside the group
/// and the rows. The steps that read decoded quants also need `decoded` to point at
/// [`DECODED`] vectors holding the current block.
struct Tile<'a, const R: usize> {
    layout: &'a GroupLayout,
    group: *const u8,
    /// The current block's decoded quants, for the steps that read them (see `k_quants`).
    decoded: *const __m256i,
    q: [*const i8; R],
    scales: [*const f32; R],
    sums32: [*const i32; R],
    pairs16: [*const i32; R],
    pairs32: [*const i32; R],
}

/// Four activation bytes broadcast to every lane.
///
/// # Safety
/// The CPU must support AVX2, and `at` must be valid for reading 4 bytes (unaligned).
#[inline(always)]
unsafe fn broadcast4(at: *const i8) -> __m256i {
    // SAFETY: AVX2 and 4 readable bytes at `at` are the caller's contract.
    unsafe { _mm256_set1_epi32(std::ptr::read_unaligned(at as *const i32)) }
}

/// 32 bytes at `at`: one half of a 64-byte vector of the group.
///
/// # Safety
/// The CPU must support AVX, and `at` must be valid for reading 32 bytes (unaligned).
#[inline(always)]
unsafe fn load(at: *const u8) -> __m256i {
    // SAFETY: AVX and 32 readable bytes at `at` are the caller's contract.
    unsafe { _mm256_loadu_si256(at as *const __m256i) }
}

/// 8 f16 values at `at` as f32.
///
/// # Safety
/// The CPU must support AVX and F16C, and `at` must be valid for reading 16 bytes (unaligned).
#[inline(always)]
unsafe fn load_f16(at: *const u8) -> __m256 {
    // SAFETY: AVX, F16C and 16 readable bytes at `at` are the caller's contract.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(at as *const __m128i)) }
}

/// The 16-bit sums of pairs of products of unsigned quants (at most 63, so never saturating)
/// and signed activations (at most 127 in magnitude).
///
/// # Safety
/// The CPU must support AVX2.
#[inline(always)]
unsafe fn products(q: __m256i, a: __m256i) -> __m256i {
    // SAFETY: AVX2 is the caller's contract; no memory is read.
    unsafe { _mm256_maddubs_epi16(q, a) }
}

/// `acc + (the i32 sum of each lane's two i16 of p) * scale`, `scale` an i16 pair per lane.
///
/// # Safety
/// The CPU must support AVX2.
#[inline(always)]
unsafe fn widen(acc: __m256i, p: __m256i, scale: __m256i) -> __m256i {
    // SAFETY: AVX2 is the caller's contract; no memory is read.
    unsafe { _mm256_add_epi32(acc, _mm256_madd_epi16(p, scale)) }
}

/// After how many chunks (each adding two 16-bit products per lane, at most `2 * qmax * 127`
/// each) the 16-bit partial sums must be widened: 4 for 4-bit quants (8 * 3810 fits i16),
/// 2 for 5-bit (4 * 7874).
const fn flush_every(five: bool) -> usize {
    if five {
        2
    } else {
        4
    }
}

/// Low and high nibbles of one half of chunk `t`, with their fifth bits from the half's high-bit
/// vector `high` when `FIVE` (at bit `4 + t` of each byte for the low nibbles and `t` for the
/// high ones; see `formats::high_bit_slot`).
///
/// # Safety
/// The CPU must support AVX2.
#[inline(always)]
unsafe fn nibbles<const FIVE: bool>(chunk: __m256i, high: __m256i, t: usize) -> (__m256i, __m256i) {
    // SAFETY: AVX2 is the caller's contract; no memory is read.
    unsafe {
        let low = _mm256_set1_epi8(0x0f);
        let lo = _mm256_and_si256(chunk, low);
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(chunk), low);
        if !FIVE {
            return (lo, hi);
        }
        let bit4 = _mm256_set1_epi8(0x10);
        // Bit 4 + t (or t) of each byte moved to bit 4; 16-bit shifts by at most 4 never carry
        // a neighbour byte's bit into bit 4.
        let (lo_bits, hi_bits) = match t {
            0 => (high, _mm256_slli_epi16::<4>(high)),
            1 => (_mm256_srli_epi16::<1>(high), _mm256_slli_epi16::<3>(high)),
            2 => (_mm256_srli_epi16::<2>(high), _mm256_slli_epi16::<2>(high)),
            _ => (_mm256_srli_epi16::<3>(high), _mm256_slli_epi16::<1>(high)),
        };
        (
            _mm256_or_si256(lo, _mm256_and_si256(lo_bits, bit4)),
            _mm256_or_si256(hi, _mm256_and_si256(hi_bits, bit4)),
        )
    }
}

/// 32-byte vectors of one decoded k-quant block: its quants as bytes (at most 63), vector
/// [`decoded_at`]`(s, t, nibble, h)` holding half `h` of chunk `t` of 32-weight sub-block `s`,
/// low (`nibble` 0) or high (1) nibbles with their high bits.
const DECODED: usize = 8 * 4 * 2 * 2;

/// Where half `h` of the low or high quants of chunk `t` of sub-block `s` sits in a decoded
/// block.
#[inline(always)]
fn decoded_at(s: usize, t: usize, nibble: usize, h: usize) -> usize {
    ((4 * s + t) * 2 + nibble) * 2 + h
}

/// Decodes block `b` of a group into [`DECODED`] vectors at `out`.
type Decode = unsafe fn(*const u8, &GroupLayout, usize, *mut __m256i);

/// Q4_K and Q5_K quants (see [`Decode`]).
///
/// # Safety
/// The CPU must support AVX2, `group` must point at a whole packed group of `layout`, `b` must
/// be one of its blocks and `out` must be valid for writing [`DECODED`] vectors.
#[target_feature(enable = "avx2")]
unsafe fn decode_k4<const FIVE: bool>(
    group: *const u8,
    layout: &GroupLayout,
    b: usize,
    out: *mut __m256i,
) {
    // SAFETY: AVX2, a whole group, one of its blocks and `out` are the caller's contract; the
    // layout's offsets of the block stay inside the group.
    unsafe {
        let quants = group.add(layout.quants_at(b));
        let planes = group.add(layout.planes_at(b));
        for s in 0..8 {
            for h in 0..2 {
                let high = if FIVE {
                    load(planes.add(64 * s + 32 * h))
                } else {
                    _mm256_setzero_si256()
                };
                for t in 0..4 {
                    let chunk = load(quants.add(64 * (4 * s + t) + 32 * h));
                    let (lo, hi) = nibbles::<FIVE>(chunk, high, t);
                    _mm256_storeu_si256(out.add(decoded_at(s, t, 0, h)), lo);
                    _mm256_storeu_si256(out.add(decoded_at(s, t, 1, h)), hi);
                }
            }
        }
    }
}

/// Q6_K quants (see [`Decode`]).
///
/// # Safety
/// As for [`decode_k4`].
#[target_feature(enable = "avx2")]
unsafe fn decode_k6(group: *const u8, layout: &GroupLayout, b: usize, out: *mut __m256i) {
    // SAFETY: AVX2, a whole group, one of its blocks and `out` are the caller's contract; the
    // layout's offsets of the block stay inside the group.
    unsafe {
        let quants = group.add(layout.quants_at(b));
        let planes = group.add(layout.planes_at(b));
        for s in 0..8 {
            for h in 0..2 {
                let high_lo = load(planes.add(128 * s + 32 * h));
                let high_hi = load(planes.add(128 * s + 64 + 32 * h));
                for t in 0..4 {
                    let chunk = load(quants.add(64 * (4 * s + t) + 32 * h));
                    let lo = six_bits(chunk, high_lo, t);
                    let hi = six_bits(_mm256_srli_epi16::<4>(chunk), high_hi, t);
                    _mm256_storeu_si256(out.add(decoded_at(s, t, 0, h)), lo);
                    _mm256_storeu_si256(out.add(decoded_at(s, t, 1, h)), hi);
                }
            }
        }
    }
}

/// A Q6_K quant: the low nibble of each byte of `nibble` with the two bits of chunk `t` from
/// `high` (at `2t`, see `formats::high_bit_slot`) above it.
///
/// # Safety
/// The CPU must support AVX2.
#[inline(always)]
unsafe fn six_bits(nibble: __m256i, high: __m256i, t: usize) -> __m256i {
    // SAFETY: AVX2 is the caller's contract; no memory is read.
    unsafe {
        let bits = match t {
            0 => _mm256_slli_epi16::<4>(high),
            1 => _mm256_slli_epi16::<2>(high),
            2 => high,
            _ => _mm256_srli_epi16::<2>(high),
        };
        _mm256_or_si256(
            _mm256_and_si256(nibble, _mm256_set1_epi8(0x0f)),
            _mm256_and_si256(bits, _mm256_set1_epi8(0x30)),
        )
    }
}

impl<'a, const R: usize> Tile<'a, R> {
    /// The tile of rows `row0..row0 + R`, pointing at no group yet.
    fn new(w: &'a Weights, acts: &'a Activations, row0: usize) -> Self {
        let k = acts.k;
        let rows = row0..row0 + R;
        let slice = |n: usize, r: usize| (row0 + r) * n..(row0 + r + 1) * n;
        debug_assert!(rows.end <= acts.rows);
        let pairs = |n: usize| if acts.block == 256 { n } else { 0 };
        Self {
            layout: &w.layout,
            group: std::ptr::null(),
            decoded: std::ptr::null(),
            q: std::array::from_fn(|r| acts.q[slice(k, r)].as_ptr()),
            scales: std::array::from_fn(|r| acts.scales[slice(k / acts.block, r)].as_ptr()),
            sums32: std::array::from_fn(|r| acts.sums32[slice(k / 32, r)].as_ptr()),
            pairs16: std::array::from_fn(|r| acts.pairs16[slice(pairs(k / 32), r)].as_ptr()),
            pairs32: std::array::from_fn(|r| acts.pairs32[slice(pairs(k / 64), r)].as_ptr()),
        }
    }

    /// The step function for `ty`, reading a k-quant's quants from the decoded block when
    /// `pre`. Chosen once per pass, so each type's loop is compiled on its own.
    fn step_for(ty: WeightType, pre: bool) -> Step<'a, R> {
        match ty {
            WeightType::Q4_0 => {
                Self::blocks32::<false, false, false, { zero_point(WeightType::Q4_0) }>
            }
            WeightType::Q4_1 => Self::blocks32::<false, false, true, 0>,
            WeightType::Q5_0 => {
                Self::blocks32::<true, false, false, { zero_point(WeightType::Q5_0) }>
            }
            WeightType::Q5_1 => Self::blocks32::<true, false, true, 0>,
            // The signed dot product already removes the offset of 128.
            WeightType::Q8_0 => Self::blocks32::<false, true, false, 0>,
            WeightType::Q4K if pre => Self::k4::<false, true>,
            WeightType::Q4K => Self::k4::<false, false>,
            WeightType::Q5K if pre => Self::k4::<true, true>,
            WeightType::Q5K => Self::k4::<true, false>,
            WeightType::Q6K if pre => Self::k6::<true>,
            WeightType::Q6K => Self::k6::<false>,
        }
    }

    /// Block `b`'s meta, quants and high bits.
    ///
    /// # Safety
    /// The tile must be valid (see [`Tile`]) and `b` one of the layout's blocks.
    #[inline(always)]
    unsafe fn block(&self, b: usize) -> (*const u8, *const u8, *const u8) {
        // SAFETY: the offsets of a block of the layout stay inside the group (a valid tile).
        unsafe {
            let layout = self.layout;
            (
                self.group.add(layout.meta_at(b)),
                self.group.add(layout.quants_at(b)),
                self.group.add(layout.planes_at(b)),
            )
        }
    }

    /// Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0: `FIVE` for a fifth bit, `BYTES` for whole-byte quants,
    /// `MIN` for a block min, `ZP` the zero point; adds `blocks` to the rows' `sums`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C, the tile must be valid (see [`Tile`]), `blocks` must
    /// be blocks of its layout and `sums` must hold `R` rows.
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn blocks32<const FIVE: bool, const BYTES: bool, const MIN: bool, const ZP: i32>(
        &self,
        blocks: Range<usize>,
        sums: &mut [[__m256; 2]],
    ) {
        // SAFETY: AVX2, F16C, a valid tile and blocks of its layout are the caller's contract:
        // the layout's offsets of each block stay inside the group, and the activations'
        // offsets inside each row.
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let mut acc: [[__m256; 2]; R] = std::array::from_fn(|r| sums[r]);
            for b in blocks {
                let (meta, quants, planes) = self.block(b);
                // Both halves of each chunk at once, as in the k-quants (but for the fifth bit).
                let mut isum = [[_mm256_setzero_si256(); 2]; R];
                if BYTES {
                    // `sum (q - 128) * a` as `|q - 128| * (a signed like q - 128)`: a product
                    // pair reaches 2 * 128 * 127, so each is widened at once.
                    for t in 0..8 {
                        let q: [__m256i; 2] = std::array::from_fn(|h| {
                            _mm256_xor_si256(
                                load(quants.add(64 * t + 32 * h)),
                                _mm256_set1_epi8(-128),
                            )
                        });
                        let magnitude = q.map(|q| _mm256_sign_epi8(q, q));
                        for r in 0..R {
                            let a = broadcast4(self.q[r].add(b * 32 + 4 * t));
                            for h in 0..2 {
                                let p = products(magnitude[h], _mm256_sign_epi8(a, q[h]));
                                isum[r][h] = widen(isum[r][h], p, ones);
                            }
                        }
                    }
                } else if FIVE {
                    // One half at a time: the high bits of both would not fit beside the sums.
                    for h in 0..2 {
                        let high = load(planes.add(32 * h));
                        let mut part = [_mm256_setzero_si256(); R];
                        for t in 0..4 {
                            let chunk = load(quants.add(64 * t + 32 * h));
                            let (lo, hi) = nibbles::<FIVE>(chunk, high, t);
                            for r in 0..R {
                                let at = self.q[r].add(b * 32 + 4 * t);
                                let p = _mm256_add_epi16(
                                    products(lo, broadcast4(at)),
                                    products(hi, broadcast4(at.add(16))),
                                );
                                part[r] = _mm256_add_epi16(part[r], p);
                            }
                            if (t + 1) % flush_every(FIVE) == 0 {
                                for r in 0..R {
                                    isum[r][h] = widen(isum[r][h], part[r], ones);
                                    part[r] = _mm256_setzero_si256();
                                }
                            }
                        }
                    }
                } else {
                    let mut part = [[_mm256_setzero_si256(); 2]; R];
                    for t in 0..4 {
                        let quants: [(__m256i, __m256i); 2] = std::array::from_fn(|h| {
                            let none = _mm256_setzero_si256();
                            nibbles::<FIVE>(load(quants.add(64 * t + 32 * h)), none, t)
                        });
                        for r in 0..R {
                            let at = self.q[r].add(b * 32 + 4 * t);
                            let (a_lo, a_hi) = (broadcast4(at), broadcast4(at.add(16)));
                            for h in 0..2 {
                                let (lo, hi) = quants[h];
                                let p = _mm256_add_epi16(products(lo, a_lo), products(hi, a_hi));
                                part[r][h] = _mm256_add_epi16(part[r][h], p);
                            }
                        }
                    }
                    // Eight products of at most 2 * 15 * 127 fit in 16 bits.
                    for r in 0..R {
                        for h in 0..2 {
                            isum[r][h] = widen(isum[r][h], part[r][h], ones);
                        }
                    }
                }
                for h in 0..2 {
                    let d = load_f16(meta.add(16 * h));
                    let m = if MIN {
                        load_f16(meta.add(32 + 16 * h))
                    } else {
                        _mm256_setzero_ps()
                    };
                    for r in 0..R {
                        let asum = *self.sums32[r].add(b);
                        let da = _mm256_set1_ps(*self.scales[r].add(b));
                        let ints =
                            _mm256_sub_epi32(isum[r][h], _mm256_set1_epi32(ZP.wrapping_mul(asum)));
                        let update = _mm256_mul_ps(_mm256_mul_ps(da, d), _mm256_cvtepi32_ps(ints));
                        acc[r][h] = _mm256_add_ps(acc[r][h], update);
                        if MIN {
                            let update =
                                _mm256_mul_ps(_mm256_mul_ps(da, m), _mm256_set1_ps(asum as f32));
                            acc[r][h] = _mm256_add_ps(acc[r][h], update);
                        }
                    }
                }
            }
            sums[..R].copy_from_slice(&acc);
        }
    }
}
