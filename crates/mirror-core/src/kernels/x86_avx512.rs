//! AVX-512 VNNI kernels: one `vpdpbusd` multiplies 4 quants of each of 16 interleaved weight
//! rows by 4 broadcast activation bytes. Tiles of up to four activation rows share every
//! decoded weight vector. The float updates follow `portable.rs` operation for operation (no
//! fused multiply-add), so results match the portable path bit for bit.
//!
//! With one row (decoding) the kernels are bound by the latency of dependent `vpdpbusd`s, so
//! the low and high nibbles of every chunk feed separate accumulators; integer sums are exact,
//! so how they are split does not change any result.

// Row and lane loops index several arrays in step; iterators would hide that.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::activations::Activations;
use super::formats::GroupLayout;
use super::operands::{Output, Weights};
use super::portable::zero_point;
use super::types::WeightType;

/// Activation rows per tile: four rows keep every accumulator of the widest kernel in the 32
/// vector registers.
const TILE: usize = 4;

/// Activation rows per pass over a column group. Within a pass the group's weight blocks
/// go by once, each block applied to every tile of rows in turn, so memory traffic is
/// spread evenly over the computation; the rows' sums wait on the stack between blocks.
const PASS: usize = 64;

/// # Safety
/// The CPU must support AVX-512 F/BW/VL, VNNI and F16C; `groups` must be column groups of `w`,
/// `acts` rows of `w`'s input width, and `out` valid for writing each group's columns at every
/// row of `acts`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
pub(super) unsafe fn matmul_groups(
    w: &Weights,
    acts: &Activations,
    groups: Range<usize>,
    out: Output,
) {
    // SAFETY: the CPU features and the groups are this function's contract, so every tile is valid
    // (see `Tile`) and `out` takes the group's `lanes` columns (the store's mask) at each row.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); PASS];
        let step4 = Tile::<TILE>::step_for(w.ty);
        let step3 = Tile::<3>::step_for(w.ty);
        let step2 = Tile::<2>::step_for(w.ty);
        let step1 = Tile::<1>::step_for(w.ty);
        for g in groups {
            let group = w.group(g).as_ptr();
            let lanes = w.lanes(g);
            let mask: __mmask16 = if lanes == 16 {
                0xffff
            } else {
                (1u16 << lanes) - 1
            };
            let mut first = 0;
            while first < acts.rows {
                let rows = (acts.rows - first).min(PASS);
                acc[..rows].fill(_mm512_setzero_ps());
                let full: Vec<Tile<TILE>> = (0..rows / TILE)
                    .map(|t| Tile::new(w, group, acts, first + t * TILE))
                    .collect();
                let rest_at = rows / TILE * TILE;
                let rest = first + rest_at;
                let (t3, t2, t1) = match rows - rest_at {
                    3 => (Some(Tile::<3>::new(w, group, acts, rest)), None, None),
                    2 => (None, Some(Tile::<2>::new(w, group, acts, rest)), None),
                    1 => (None, None, Some(Tile::<1>::new(w, group, acts, rest))),
                    _ => (None, None, None),
                };
                // With one tile, all blocks in one step; otherwise about 256 weights per step, so
                // that the call and the sums' round trip through the stack stay small next to
                // the work.
                let per_step = if rows <= TILE {
                    w.layout.blocks
                } else {
                    (256 / w.ty.block_len()).max(w.layout.blocks_per_record())
                };
                for b in (0..w.layout.blocks).step_by(per_step) {
                    let blocks = b..(b + per_step).min(w.layout.blocks);
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
                for (r, acc) in acc[..rows].iter().enumerate() {
                    let dst = out.ptr.add((first + r) * out.ld + out.offset + g * 16);
                    _mm512_mask_storeu_ps(dst, mask, *acc);
                }
                first += rows;
            }
        }
    }
}

/// A type's step: `(tile, blocks, sums)`.
type Step<'a, const R: usize> = unsafe fn(&Tile<'a, R>, Range<usize>, &mut [__m512]);

/// One column group against `R` activation rows, with raw pointers to each row's data (read
/// without bounds checks in the inner loops; `new` takes them from checked slices). Valid when
/// `group` points at a whole packed group of `layout`, 64-byte aligned, and the rows' pointers
/// come from activations of the layout's input width: every method's reads then stay inside
/// the group and the rows.
struct Tile<'a, const R: usize> {
    layout: &'a GroupLayout,
    group: *const u8,
    q: [*const i8; R],
    scales: [*const f32; R],
    sums32: [*const i32; R],
    pairs16: [*const i32; R],
    pairs32: [*const i32; R],
}

/// Four activation bytes broadcast to every lane.
///
/// # Safety
/// The CPU must support AVX-512 F, and `at` must be valid for reading 4 bytes (unaligned).
#[inline(always)]
unsafe fn broadcast4(at: *const i8) -> __m512i {
    // SAFETY: AVX-512 F and 4 readable bytes at `at` are the caller's contract.
    unsafe { _mm512_set1_epi32(std::ptr::read_unaligned(at as *const i32)) }
}

/// `a | (b & c)` in one instruction.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[inline(always)]
unsafe fn or_masked(a: __m512i, b: __m512i, c: __m512i) -> __m512i {
    // SAFETY: AVX-512 F is the caller's contract; no memory is read.
    unsafe { _mm512_ternarylogic_epi32::<0xf8>(a, b, c) }
}

/// 16-bit right shift by a small constant (the loops that call it are unrolled).
///
/// # Safety
/// The CPU must support AVX-512 BW.
#[inline(always)]
unsafe fn shift_right(v: __m512i, by: usize) -> __m512i {
    // SAFETY: AVX-512 BW is the caller's contract; no memory is read.
    unsafe {
        match by {
            0 => v,
            1 => _mm512_srli_epi16::<1>(v),
            2 => _mm512_srli_epi16::<2>(v),
            _ => _mm512_srli_epi16::<3>(v),
        }
    }
}

/// Loads 64 bytes and, for a tile of rows, prefetches further along the weights. The weights
/// are read from memory once per call, and the kernels do too little work per byte for the
/// hardware prefetcher alone to keep enough requests in flight. Distances and cache levels were
/// tuned on the pair's 1.5B model with interleaved runs: for a tile of rows (more work per
/// byte), 2 KB ahead into L1; one row prefetches whole records ([`prefetch_record`]) for
/// every type but Q4_K and Q5_K. Their records are one block of quants after a short meta,
/// which the hardware prefetcher follows alone: on a Zen 4 EPYC, a prefetch of each line 3 KB
/// ahead into L2 (kept earlier because distances from 0 to 12 KB had differed by less than the
/// hosts' noise) cost 14% of decode on 2 threads and a third on one (BENCHMARKS.md,
/// 2026-12-08).
///
/// # Safety
/// The CPU must support AVX-512 F, and `at` must be 64-byte aligned and valid for reading 64
/// bytes. The prefetched addresses may lie anywhere: a prefetch never faults.
#[inline(always)]
unsafe fn load<const R: usize>(at: *const u8) -> __m512i {
    // SAFETY: AVX-512 F and 64 aligned readable bytes at `at` are the caller's contract; the
    // prefetch addresses are computed with `wrapping_add` and never dereferenced.
    unsafe {
        if R > 1 {
            _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(2048) as *const i8);
        }
        _mm512_load_si512(at as *const _)
    }
}

/// How far ahead of the block in hand a one-row tile prefetches its group's records. Q6_K
/// and the 32-weight types interleave quants, high bits and meta in their records, a pattern
/// the hardware prefetcher follows poorly: one core streamed Q6_K at 17 GB/s and Q5_0 at 17
/// with a prefetch per load, 20-21 and 22 with whole records 4 KB ahead (AVX-512 Zen 5 class,
/// `kbench`-style timing of the pair's matrices, one thread).
const RECORD_AHEAD: usize = 4096;

/// Prefetches part `part` of `parts` of the record [`RECORD_AHEAD`] bytes past block `b`'s in
/// `group`: a group's records lie one after another, so these are the bytes of the blocks a
/// few steps on, fetched as one stream whatever the record's inner layout. `parts` must be a
/// power of two.
#[inline(always)]
fn prefetch_record(group: *const u8, layout: &GroupLayout, b: usize, part: usize, parts: usize) {
    let lines = layout.record_bytes() / 64;
    let start = layout.record_start(b) + RECORD_AHEAD;
    // A record's blocks or Q6_K's 8 sub-blocks: shifts, not divisions by a runtime `parts`.
    let shift = parts.trailing_zeros();
    for line in (part * lines) >> shift..((part + 1) * lines) >> shift {
        // SAFETY: a prefetch reads nothing and cannot fault; the address is only computed
        // (wrapping, so it may point past the group or the matrix).
        unsafe { _mm_prefetch::<_MM_HINT_T0>(group.wrapping_add(start + 64 * line) as *const i8) };
    }
}

impl<'a, const R: usize> Tile<'a, R> {
    fn new(w: &'a Weights, group: *const u8, acts: &'a Activations, row0: usize) -> Self {
        let k = acts.k;
        Self {
            layout: &w.layout,
            group,
            q: std::array::from_fn(|r| acts.q[(row0 + r) * k..(row0 + r + 1) * k].as_ptr()),
            scales: std::array::from_fn(|r| {
                let n = k / acts.block;
                acts.scales[(row0 + r) * n..(row0 + r + 1) * n].as_ptr()
            }),
            sums32: std::array::from_fn(|r| {
                acts.sums32[(row0 + r) * (k / 32)..(row0 + r + 1) * (k / 32)].as_ptr()
            }),
            pairs16: std::array::from_fn(|r| {
                let n = if acts.block == 256 { k / 32 } else { 0 };
                acts.pairs16[(row0 + r) * n..(row0 + r + 1) * n].as_ptr()
            }),
            pairs32: std::array::from_fn(|r| {
                let n = if acts.block == 256 { k / 64 } else { 0 };
                acts.pairs32[(row0 + r) * n..(row0 + r + 1) * n].as_ptr()
            }),
        }
    }

    /// The step function for `ty`: adds a range of the group's blocks to the `R` rows'
    /// running sums. Chosen once per call, so each type's loop is compiled on its own.
    fn step_for(ty: WeightType) -> Step<'a, R> {
        match ty {
            WeightType::Q4_0 => {
                Self::step32::<false, false, false, { zero_point(WeightType::Q4_0) }>
            }
            WeightType::Q4_1 => Self::step32::<false, false, true, 0>,
            WeightType::Q5_0 => {
                Self::step32::<true, false, false, { zero_point(WeightType::Q5_0) }>
            }
            WeightType::Q5_1 => Self::step32::<true, false, true, 0>,
            WeightType::Q8_0 => {
                Self::step32::<false, true, false, { zero_point(WeightType::Q8_0) }>
            }
            WeightType::Q4K => Self::step_k4::<false>,
            WeightType::Q5K => Self::step_k4::<true>,
            WeightType::Q6K => Self::step_k6,
        }
    }

    /// # Safety
    /// The CPU must support AVX-512 F/BW/VL, VNNI and F16C, the tile must be valid (see
    /// [`Tile`]) and `blocks` must be blocks of its layout.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn step32<const FIVE: bool, const BYTES: bool, const MIN: bool, const ZP: i32>(
        &self,
        blocks: Range<usize>,
        acc: &mut [__m512],
    ) {
        // SAFETY: the caller's contract (CPU features, a valid tile, blocks of its layout) is the
        // block kernels' contract.
        unsafe {
            let mut sums: [__m512; R] = std::array::from_fn(|r| acc[r]);
            for b in blocks {
                self.blocks32::<FIVE, BYTES, MIN>(b, ZP, &mut sums);
            }
            acc[..R].copy_from_slice(&sums);
        }
    }

    /// # Safety
    /// The CPU must support AVX-512 F/BW/VL, VNNI and F16C, the tile must be valid (see
    /// [`Tile`]) and `blocks` must be blocks of its layout.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn step_k4<const FIVE: bool>(&self, blocks: Range<usize>, acc: &mut [__m512]) {
        // SAFETY: the caller's contract (CPU features, a valid tile, blocks of its layout) is the
        // block kernels' contract.
        unsafe {
            let mut sums: [__m512; R] = std::array::from_fn(|r| acc[r]);
            for b in blocks {
                self.k4::<FIVE>(b, &mut sums);
            }
            acc[..R].copy_from_slice(&sums);
        }
    }

    /// # Safety
    /// The CPU must support AVX-512 F/BW/VL, VNNI and F16C, the tile must be valid (see
    /// [`Tile`]) and `blocks` must be blocks of its layout.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn step_k6(&self, blocks: Range<usize>, acc: &mut [__m512]) {
        // SAFETY: the caller's contract (CPU features, a valid tile, blocks of its layout) is the
        // block kernels' contract.
        unsafe {
            let mut sums: [__m512; R] = std::array::from_fn(|r| acc[r]);
            for b in blocks {
                self.k6(b, &mut sums);
            }
            acc[..R].copy_from_slice(&sums);
        }
    }

    /// Low and high nibbles of chunk `t` of a 32-weight sub-block, with their fifth bits from
    /// the sub-block's high-bit vector `high` (and `high << 4`) when `FIVE`.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F and BW.
    #[inline(always)]
    unsafe fn nibbles<const FIVE: bool>(
        chunk: __m512i,
        high: __m512i,
        high4: __m512i,
        t: usize,
    ) -> (__m512i, __m512i) {
        // SAFETY: AVX-512 F and BW are the caller's contract; no memory is read.
        unsafe {
            let low = _mm512_set1_epi8(0x0f);
            let lo = _mm512_and_si512(chunk, low);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(chunk), low);
            if FIVE {
                let bit4 = _mm512_set1_epi8(0x10);
                (
                    or_masked(lo, shift_right(high, t), bit4),
                    or_masked(hi, shift_right(high4, t), bit4),
                )
            } else {
                (lo, hi)
            }
        }
    }

    /// Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0: `FIVE` for a fifth bit, `BYTES` for whole-byte quants,
    /// `MIN` for a block min.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW/VL, VNNI and F16C, the tile must be valid (see
    /// [`Tile`]) and `b` must be a block of its layout.
    #[inline(always)]
    unsafe fn blocks32<const FIVE: bool, const BYTES: bool, const MIN: bool>(
        &self,
        b: usize,
        zp: i32,
        acc: &mut [__m512; R],
    ) {
        // SAFETY: the CPU features, a valid tile and a block of its layout are the caller's
        // contract: the layout's offsets of block `b` stay inside the group (aligned where
        // loaded as such), and the activations' offsets inside each row.
        unsafe {
            let layout = self.layout;
            if R == 1 {
                let per = layout.blocks_per_record();
                prefetch_record(self.group, layout, b, layout.index_in_record(b), per);
            }
            {
                let meta = self.group.add(layout.meta_at(b));
                let quants = self.group.add(layout.quants_at(b));
                let mut isum = [[_mm512_setzero_si512(); 2]; R];
                if BYTES {
                    for t in 0..8 {
                        let v = load::<R>(quants.add(64 * t));
                        for r in 0..R {
                            let a = broadcast4(self.q[r].add(b * 32 + 4 * t));
                            isum[r][t % 2] = _mm512_dpbusd_epi32(isum[r][t % 2], v, a);
                        }
                    }
                } else {
                    let (high, high4) = if FIVE {
                        let high = load::<R>(self.group.add(layout.planes_at(b)));
                        (high, _mm512_slli_epi16::<4>(high))
                    } else {
                        (_mm512_setzero_si512(), _mm512_setzero_si512())
                    };
                    for t in 0..4 {
                        let chunk = load::<R>(quants.add(64 * t));
                        let (lo, hi) = Self::nibbles::<FIVE>(chunk, high, high4, t);
                        for r in 0..R {
                            let a_lo = broadcast4(self.q[r].add(b * 32 + 4 * t));
                            let a_hi = broadcast4(self.q[r].add(b * 32 + 16 + 4 * t));
                            isum[r][0] = _mm512_dpbusd_epi32(isum[r][0], lo, a_lo);
                            isum[r][1] = _mm512_dpbusd_epi32(isum[r][1], hi, a_hi);
                        }
                    }
                }
                let d = _mm512_cvtph_ps(_mm256_load_si256(meta as *const __m256i));
                let m = if MIN {
                    _mm512_cvtph_ps(_mm256_load_si256(meta.add(32) as *const __m256i))
                } else {
                    _mm512_setzero_ps()
                };
                for r in 0..R {
                    let asum = *self.sums32[r].add(b);
                    let da = _mm512_set1_ps(*self.scales[r].add(b));
                    let isum = _mm512_add_epi32(isum[r][0], isum[r][1]);
                    let ints = _mm512_sub_epi32(isum, _mm512_set1_epi32(zp.wrapping_mul(asum)));
                    let update = _mm512_mul_ps(_mm512_mul_ps(da, d), _mm512_cvtepi32_ps(ints));
                    acc[r] = _mm512_add_ps(acc[r], update);
                    if MIN {
                        let update =
                            _mm512_mul_ps(_mm512_mul_ps(da, m), _mm512_set1_ps(asum as f32));
                        acc[r] = _mm512_add_ps(acc[r], update);
                    }
                }
            }
        }
    }

    /// Q4_K and Q5_K. With one or two rows, the low and high nibbles feed separate accumulators
    /// (the chains of dependent `vpdpbusd`s are the limit); with more rows, the rows do.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW/VL, VNNI and F16C, the tile must be valid (see
    /// [`Tile`]) and `b` must be a block of its layout.
    #[inline(always)]
    unsafe fn k4<const FIVE: bool>(&self, b: usize, acc: &mut [__m512; R]) {
        // SAFETY: the CPU features, a valid tile and a block of its layout are the caller's
        // contract: the layout's offsets of block `b` stay inside the group (aligned where
        // loaded as such), and the activations' offsets inside each row.
        unsafe {
            let layout = self.layout;
            let meta = self.group.add(layout.meta_at(b));
            let quants = self.group.add(layout.quants_at(b));
            let planes = self.group.add(layout.planes_at(b));
            // One or two rows: two chains per row (a 2-row forward of the 1.5B took 7-13% less
            // time split so, 6 of 7 alternated runs); more rows are chains enough.
            let split = R <= 2;
            let mut big_a = [_mm512_setzero_si512(); R];
            let mut big_b = [_mm512_setzero_si512(); R];
            for s in 0..8 {
                let (high, high4) = if FIVE {
                    let high = load::<R>(planes.add(64 * s));
                    (high, _mm512_slli_epi16::<4>(high))
                } else {
                    (_mm512_setzero_si512(), _mm512_setzero_si512())
                };
                let mut isum = [[_mm512_setzero_si512(); 2]; R];
                for t in 0..4 {
                    let chunk = load::<R>(quants.add(64 * (4 * s + t)));
                    let (lo, hi) = Self::nibbles::<FIVE>(chunk, high, high4, t);
                    for r in 0..R {
                        let at = self.q[r].add(b * 256 + 32 * s + 4 * t);
                        isum[r][0] = _mm512_dpbusd_epi32(isum[r][0], lo, broadcast4(at));
                        let second = if split { 1 } else { 0 };
                        isum[r][second] =
                            _mm512_dpbusd_epi32(isum[r][second], hi, broadcast4(at.add(16)));
                    }
                }
                let scale = _mm512_cvtepu8_epi32(_mm_load_si128(meta.add(64 + 16 * s) as *const _));
                for r in 0..R {
                    let isum = if split {
                        _mm512_add_epi32(isum[r][0], isum[r][1])
                    } else {
                        isum[r][0]
                    };
                    big_a[r] = _mm512_add_epi32(big_a[r], _mm512_mullo_epi32(isum, scale));
                }
            }
            // B = sum_j min_j * asum_j, two sub-blocks per vpdpwssd (see formats::min_at).
            for pair in 0..4 {
                let mins =
                    _mm512_cvtepu8_epi16(_mm256_load_si256(meta.add(192 + 32 * pair) as *const _));
                for r in 0..R {
                    let sums = _mm512_set1_epi32(*self.pairs32[r].add(4 * b + pair));
                    big_b[r] = _mm512_dpwssd_epi32(big_b[r], mins, sums);
                }
            }
            let d = _mm512_cvtph_ps(_mm256_load_si256(meta as *const __m256i));
            let dmin = _mm512_cvtph_ps(_mm256_load_si256(meta.add(32) as *const __m256i));
            for r in 0..R {
                let da = _mm512_set1_ps(*self.scales[r].add(b));
                let plus = _mm512_mul_ps(_mm512_mul_ps(da, d), _mm512_cvtepi32_ps(big_a[r]));
                let minus = _mm512_mul_ps(_mm512_mul_ps(da, dmin), _mm512_cvtepi32_ps(big_b[r]));
                acc[r] = _mm512_sub_ps(_mm512_add_ps(acc[r], plus), minus);
            }
        }
    }

    /// Q6_K: `A = sum_j scale_j * isum_j - 32 * sum_j scale_j * asum_j`, the second sum two
    /// sub-blocks per `vpdpwssd` (see formats::q6_scale_at).
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW/VL, VNNI and F16C, the tile must be valid (see
    /// [`Tile`]) and `b` must be a block of its layout.
    #[inline(always)]
    unsafe fn k6(&self, b: usize, acc: &mut [__m512; R]) {
        // SAFETY: the CPU features, a valid tile and a block of its layout are the caller's
        // contract: the layout's offsets of block `b` stay inside the group (aligned where
        // loaded as such), and the activations' offsets inside each row.
        unsafe {
            let layout = self.layout;
            let low = _mm512_set1_epi8(0x0f);
            let bits45 = _mm512_set1_epi8(0x30);
            let meta = self.group.add(layout.meta_at(b));
            let quants = self.group.add(layout.quants_at(b));
            let planes = self.group.add(layout.planes_at(b));
            let mut big_a = [_mm512_setzero_si512(); R];
            let mut offset = [_mm512_setzero_si512(); R];
            for s in 0..8 {
                if R == 1 {
                    prefetch_record(self.group, layout, b, s, 8);
                }
                // Two bits per group at 2t: t = 0 and 1 need a left shift by 4 first.
                let high_lo = load::<R>(planes.add(128 * s));
                let high_hi = load::<R>(planes.add(128 * s + 64));
                let high_lo4 = _mm512_slli_epi16::<4>(high_lo);
                let high_hi4 = _mm512_slli_epi16::<4>(high_hi);
                let mut isum_lo = [_mm512_setzero_si512(); R];
                let mut isum_hi = [_mm512_setzero_si512(); R];
                for t in 0..4 {
                    let chunk = load::<R>(quants.add(64 * (4 * s + t)));
                    let (bits_lo, bits_hi) = match t {
                        0 => (high_lo4, high_hi4),
                        1 => (
                            _mm512_srli_epi16::<2>(high_lo4),
                            _mm512_srli_epi16::<2>(high_hi4),
                        ),
                        2 => (high_lo, high_hi),
                        _ => (
                            _mm512_srli_epi16::<2>(high_lo),
                            _mm512_srli_epi16::<2>(high_hi),
                        ),
                    };
                    let lo = or_masked(_mm512_and_si512(chunk, low), bits_lo, bits45);
                    let hi = or_masked(
                        _mm512_and_si512(_mm512_srli_epi16::<4>(chunk), low),
                        bits_hi,
                        bits45,
                    );
                    for r in 0..R {
                        let at = self.q[r].add(b * 256 + 32 * s + 4 * t);
                        isum_lo[r] = _mm512_dpbusd_epi32(isum_lo[r], lo, broadcast4(at));
                        isum_hi[r] = _mm512_dpbusd_epi32(isum_hi[r], hi, broadcast4(at.add(16)));
                    }
                }
                // Lane c holds the scales of sub-blocks 2s and 2s + 1 as two i16.
                let pair =
                    _mm512_cvtepi8_epi16(_mm256_load_si256(meta.add(32 + 32 * s) as *const _));
                let scale_lo = _mm512_srai_epi32::<16>(_mm512_slli_epi32::<16>(pair));
                let scale_hi = _mm512_srai_epi32::<16>(pair);
                for r in 0..R {
                    let lo = _mm512_mullo_epi32(isum_lo[r], scale_lo);
                    let hi = _mm512_mullo_epi32(isum_hi[r], scale_hi);
                    big_a[r] = _mm512_add_epi32(big_a[r], _mm512_add_epi32(lo, hi));
                    let sums = _mm512_set1_epi32(*self.pairs16[r].add(8 * b + s));
                    offset[r] = _mm512_dpwssd_epi32(offset[r], pair, sums);
                }
            }
            let d = _mm512_cvtph_ps(_mm256_load_si256(meta as *const __m256i));
            for r in 0..R {
                let ints = _mm512_sub_epi32(big_a[r], _mm512_slli_epi32::<5>(offset[r]));
                let da = _mm512_set1_ps(*self.scales[r].add(b));
                let update = _mm512_mul_ps(_mm512_mul_ps(da, d), _mm512_cvtepi32_ps(ints));
                acc[r] = _mm512_add_ps(acc[r], update);
            }
        }
    }
}
