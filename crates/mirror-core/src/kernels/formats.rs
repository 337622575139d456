//! GGML block formats (as llama.cpp's `ggml-common.h` defines them) decoded into one plain form,
//! and the column-interleaved layout the matmul kernels read.
//!
//! Every supported type is `value = scale * (q - zero_point) [+ min]` over small unsigned
//! integers `q`, with integer sub-block scales for the k-quants. Decoding keeps exactly those
//! integers and the stored f16 scales, so the packed matrix holds the very weights of the file.

use half::f16;

use super::types::WeightType;

/// One GGML block of one weight row, decoded.
#[derive(Clone)]
pub(crate) struct DecodedBlock {
    /// Unsigned quant of every weight (`block` of them): the value before the zero point.
    pub q: [u8; 256],
    /// Integer sub-block scales: 8 six-bit scales (Q4_K, Q5_K) or 16 signed ones (Q6_K).
    pub scales: [i8; 16],
    /// Six-bit sub-block mins (Q4_K, Q5_K).
    pub mins: [u8; 8],
    /// Block scale `d`, f16 bits.
    pub d: u16,
    /// Block min `m` (Q4_1, Q5_1) or `dmin` (Q4_K, Q5_K), f16 bits.
    pub m: u16,
}

impl DecodedBlock {
    pub(crate) fn zero() -> Self {
        Self {
            q: [0; 256],
            scales: [0; 16],
            mins: [0; 8],
            d: 0,
            m: 0,
        }
    }
}

fn f16_bits(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

/// Six-bit scale and min `j` (0..8) of a Q4_K/Q5_K block's 12 packed bytes.
fn scale_min_k4(j: usize, packed: &[u8]) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        let scale = (packed[j + 4] & 0x0f) | ((packed[j - 4] >> 6) << 4);
        let min = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
        (scale, min)
    }
}

/// Decodes one GGML block of type `ty` from `bytes` (exactly `ty.block_bytes()` long).
pub(crate) fn decode_block(ty: WeightType, bytes: &[u8], out: &mut DecodedBlock) {
    debug_assert_eq!(bytes.len(), ty.block_bytes());
    match ty {
        WeightType::Q4_0 => decode_32(bytes, None, false, out),
        WeightType::Q4_1 => decode_32(bytes, None, true, out),
        WeightType::Q5_0 => decode_32(bytes, Some(2), false, out),
        WeightType::Q5_1 => decode_32(bytes, Some(4), true, out),
        WeightType::Q8_0 => {
            out.d = f16_bits(bytes, 0);
            out.m = 0;
            for j in 0..32 {
                out.q[j] = (bytes[2 + j] as i8 as i16 + 128) as u8;
            }
        }
        WeightType::Q4K => decode_k4(bytes, None, &bytes[16..144], out),
        WeightType::Q5K => decode_k4(bytes, Some(&bytes[16..48]), &bytes[48..176], out),
        WeightType::Q6K => decode_k6(bytes, out),
    }
}

/// Q4_0/Q4_1/Q5_0/Q5_1: `d`, then `m` when `has_min`, then the 32 fifth bits at `high_at`
/// (five-bit types), then 16 bytes of nibbles: weight `j` low, weight `j + 16` high.
fn decode_32(bytes: &[u8], high_at: Option<usize>, has_min: bool, out: &mut DecodedBlock) {
    out.d = f16_bits(bytes, 0);
    out.m = if has_min { f16_bits(bytes, 2) } else { 0 };
    let after_scales = if has_min { 4 } else { 2 };
    let (qh, qs_at) = match high_at {
        Some(at) => (
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]),
            at + 4,
        ),
        None => (0, after_scales),
    };
    for (j, &byte) in bytes[qs_at..qs_at + 16].iter().enumerate() {
        let high_lo = (((qh >> j) & 1) as u8) << 4;
        let high_hi = (((qh >> (j + 16)) & 1) as u8) << 4;
        out.q[j] = (byte & 0x0f) | high_lo;
        out.q[j + 16] = (byte >> 4) | high_hi;
    }
}

/// Q4_K and Q5_K: `d`, `dmin`, 12 bytes of six-bit scales and mins, the fifth bits `qh` (Q5_K),
/// then `qs`: 64 weights per 32 bytes, the low nibbles then the high nibbles.
fn decode_k4(bytes: &[u8], qh: Option<&[u8]>, qs: &[u8], out: &mut DecodedBlock) {
    out.d = f16_bits(bytes, 0);
    out.m = f16_bits(bytes, 2);
    for j in 0..8 {
        let (scale, min) = scale_min_k4(j, &bytes[4..16]);
        out.scales[j] = scale as i8;
        out.mins[j] = min;
    }
    for chunk in 0..4 {
        let qs = &qs[chunk * 32..chunk * 32 + 32];
        for l in 0..32 {
            let (mut lo, mut hi) = (qs[l] & 0x0f, qs[l] >> 4);
            if let Some(qh) = qh {
                lo |= ((qh[l] >> (2 * chunk)) & 1) << 4;
                hi |= ((qh[l] >> (2 * chunk + 1)) & 1) << 4;
            }
            out.q[chunk * 64 + l] = lo;
            out.q[chunk * 64 + 32 + l] = hi;
        }
    }
}

/// Q6_K: low nibbles `ql`, two high bits each in `qh`, 16 signed scales, then `d`.
fn decode_k6(bytes: &[u8], out: &mut DecodedBlock) {
    let ql = &bytes[0..128];
    let qh = &bytes[128..192];
    for j in 0..16 {
        out.scales[j] = bytes[192 + j] as i8;
    }
    out.d = f16_bits(bytes, 208);
    out.m = 0;
    for half in 0..2 {
        let ql = &ql[half * 64..half * 64 + 64];
        let qh = &qh[half * 32..half * 32 + 32];
        let q = &mut out.q[half * 128..half * 128 + 128];
        for l in 0..32 {
            q[l] = (ql[l] & 0x0f) | ((qh[l] & 3) << 4);
            q[l + 32] = (ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4);
            q[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            q[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
}

/// The value of weight `i` of a decoded block, in the order llama.cpp's dequantization uses.
pub(crate) fn block_value(ty: WeightType, block: &DecodedBlock, i: usize) -> f32 {
    let d = f16::from_bits(block.d).to_f32();
    let m = f16::from_bits(block.m).to_f32();
    let q = block.q[i] as i32;
    match ty {
        WeightType::Q4_0 => d * (q - 8) as f32,
        WeightType::Q5_0 => d * (q - 16) as f32,
        WeightType::Q8_0 => d * (q - 128) as f32,
        WeightType::Q4_1 | WeightType::Q5_1 => d * q as f32 + m,
        WeightType::Q4K | WeightType::Q5K => {
            let j = i / 32;
            let scale = d * block.scales[j] as u8 as f32;
            let min = m * block.mins[j] as f32;
            scale * q as f32 - min
        }
        WeightType::Q6K => d * block.scales[i / 16] as f32 * (q - 32) as f32,
    }
}

/// Byte offsets within one column group (16 weight rows interleaved).
///
/// A group is a run of *records* in the order the kernels read them, so that one matmul
/// reads memory in a single sequential pass: each record is `per_record` blocks as
/// `[meta of its blocks, padded to 64][quants][high bits]`. Types whose per-block meta is
/// 32 bytes pair their blocks, so that every quant vector stays 64-byte aligned without
/// padding; the others take one block per record.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupLayout {
    pub blocks: usize,
    pub meta: usize,
    pub quants: usize,
    pub planes: usize,
    per_record: usize,
    meta_span: usize,
    record: usize,
    pub stride: usize,
}
/// Columns per group: the lanes of one AVX-512 register of i32.
pub(crate) const GROUP: usize = 16;

fn round64(n: usize) -> usize {
    n.div_ceil(64) * 64
}

impl GroupLayout {
    pub(crate) fn new(ty: WeightType, k: usize) -> Self {
        let blocks = k / ty.block_len();
        let (meta, quants, planes) = match ty {
            WeightType::Q4_0 => (32, 256, 0),
            WeightType::Q4_1 => (64, 256, 0),
            WeightType::Q5_0 => (32, 256, 64),
            WeightType::Q5_1 => (64, 256, 64),
            WeightType::Q8_0 => (32, 512, 0),
            WeightType::Q4K => (64 + 128 + 128, 2048, 0),
            WeightType::Q5K => (64 + 128 + 128, 2048, 512),
            WeightType::Q6K => (32 + 256, 2048, 1024),
        };
        // A power of two (see `record_shift`).
        let per_record = if meta == 32 { 2 } else { 1 };
        let meta_span = round64(meta * per_record);
        let record = meta_span + (quants + planes) * per_record;
        Self {
            blocks,
            meta,
            quants,
            planes,
            per_record,
            meta_span,
            record,
            stride: blocks.div_ceil(per_record) * record,
        }
    }

    /// Blocks that share one record (and one meta line).
    pub(crate) fn blocks_per_record(&self) -> usize {
        self.per_record
    }

    /// Bytes of one record (a multiple of 64).
    pub(crate) fn record_bytes(&self) -> usize {
        self.record
    }

    /// Offset of the record that holds block `b`.
    #[inline(always)]
    pub(crate) fn record_start(&self, b: usize) -> usize {
        (b >> self.record_shift()) * self.record
    }

    /// Where block `b` sits within its record.
    #[inline(always)]
    pub(crate) fn index_in_record(&self, b: usize) -> usize {
        b & ((1 << self.record_shift()) - 1)
    }

    /// `log2(per_record)`: records hold one or two blocks (see `new`), so a shift and a mask
    /// replace the division and remainder, which cost a `div` per block in every kernel step
    /// (2-5% of a 4- to 16-row matmul on AVX-512).
    #[inline(always)]
    fn record_shift(&self) -> u32 {
        self.per_record.trailing_zeros()
    }

    /// Offset of block `b`'s meta (scales, mins, sub-block scales).
    #[inline(always)]
    pub(crate) fn meta_at(&self, b: usize) -> usize {
        self.record_start(b) + self.index_in_record(b) * self.meta
    }

    /// Offset of block `b`'s quant vectors (64-byte aligned).
    #[inline(always)]
    pub(crate) fn quants_at(&self, b: usize) -> usize {
        self.record_start(b) + self.meta_span + self.index_in_record(b) * self.quants
    }

    /// Offset of block `b`'s high-bit vectors (64-byte aligned).
    #[inline(always)]
    pub(crate) fn planes_at(&self, b: usize) -> usize {
        self.record_start(b)
            + self.meta_span
            + self.per_record * self.quants
            + self.index_in_record(b) * self.planes
    }
}

/// Where min `j` (0..8) of column `c` sits in a Q4_K/Q5_K block's meta: in pairs of
/// sub-blocks, `[pair][column][2]`, so that a kernel multiplies a pair by the two activation
/// sums in one `vpdpwssd`. The scales before them are `[sub-block][column]` (one multiply per
/// sub-block).
pub(crate) fn min_at(j: usize, c: usize) -> usize {
    192 + (j / 2) * 2 * GROUP + 2 * c + j % 2
}

/// Where scale `j` (0..16) of column `c` sits in a Q6_K block's meta: in pairs,
/// `[pair][column][2]`, as the mins of [`min_at`].
pub(crate) fn q6_scale_at(j: usize, c: usize) -> usize {
    32 + (j / 2) * 2 * GROUP + 2 * c + j % 2
}

/// Writes block `b` of the 16 decoded columns `cols` into one group's bytes.
///
/// Quants: per 32 weights, four 64-byte chunks; chunk `t` holds in its low nibbles weights
/// `4t..4t+4` of each column (bytes `4c..4c+4`) and in its high nibbles weights `16+4t..`.
/// 8-bit quants take eight chunks of whole bytes. Bits above the nibble go to high-bit vectors
/// laid out like the chunks (byte `4c + j`), see [`high_bit_slot`].
pub(crate) fn pack_block(
    ty: WeightType,
    layout: &GroupLayout,
    b: usize,
    cols: &[DecodedBlock; GROUP],
    group: &mut [u8],
) {
    let meta_at = layout.meta_at(b);
    let meta = &mut group[meta_at..meta_at + layout.meta];
    for (c, col) in cols.iter().enumerate() {
        meta[2 * c..2 * c + 2].copy_from_slice(&col.d.to_le_bytes());
    }
    match ty {
        WeightType::Q4_1 | WeightType::Q5_1 | WeightType::Q4K | WeightType::Q5K => {
            for (c, col) in cols.iter().enumerate() {
                meta[32 + 2 * c..34 + 2 * c].copy_from_slice(&col.m.to_le_bytes());
            }
        }
        _ => {}
    }
    match ty {
        WeightType::Q4K | WeightType::Q5K => {
            for j in 0..8 {
                for (c, col) in cols.iter().enumerate() {
                    meta[64 + j * GROUP + c] = col.scales[j] as u8;
                    meta[min_at(j, c)] = col.mins[j];
                }
            }
        }
        WeightType::Q6K => {
            for j in 0..16 {
                for (c, col) in cols.iter().enumerate() {
                    meta[q6_scale_at(j, c)] = col.scales[j] as u8;
                }
            }
        }
        _ => {}
    }
    let quants_at = layout.quants_at(b);
    let quants = &mut group[quants_at..quants_at + layout.quants];
    let block = ty.block_len();
    if ty == WeightType::Q8_0 {
        for t in 0..8 {
            for (c, col) in cols.iter().enumerate() {
                for j in 0..4 {
                    quants[t * 64 + 4 * c + j] = col.q[4 * t + j];
                }
            }
        }
    } else {
        for s in 0..block / 32 {
            for t in 0..4 {
                for (c, col) in cols.iter().enumerate() {
                    for j in 0..4 {
                        let lo = col.q[32 * s + 4 * t + j] & 0x0f;
                        let hi = col.q[32 * s + 16 + 4 * t + j] & 0x0f;
                        quants[(s * 4 + t) * 64 + 4 * c + j] = lo | (hi << 4);
                    }
                }
            }
        }
    }
    let high_bits = ty.high_bits();
    if high_bits > 0 {
        let planes_at = layout.planes_at(b);
        let planes = &mut group[planes_at..planes_at + layout.planes];
        for s in 0..block / 32 {
            for (c, col) in cols.iter().enumerate() {
                for j in 0..4 {
                    for t in 0..8 {
                        let high = col.q[32 * s + 4 * t + j] >> 4;
                        let (vector, bit) = high_bit_slot(high_bits, s, t);
                        planes[vector * 64 + 4 * c + j] |= high << bit;
                    }
                }
            }
        }
    }
}

/// Where the bits above the nibble of 4-weight group `t` (0..8) of 32-weight sub-block `s` sit:
/// (64-byte vector index within the block's high-bit section, lowest bit within each byte).
/// Groups 0..4 are the low nibbles of the sub-block's four chunks, groups 4..8 the high ones.
///
/// Five-bit types keep one vector per sub-block: group `t < 4` at bit `4 + t`, group `4 + t` at
/// bit `t`. Q6_K keeps two: groups 0..4 in the first, 4..8 in the second, two bits each at
/// `2 * (t % 4)`. Either way a kernel moves a group's bits to bit 4 with at most two 16-bit
/// shifts (one of them shared by the sub-block) and a mask.
pub(crate) fn high_bit_slot(high_bits: usize, s: usize, t: usize) -> (usize, u32) {
    if high_bits == 1 {
        (s, if t < 4 { 4 + t as u32 } else { t as u32 - 4 })
    } else {
        (2 * s + t / 4, 2 * (t % 4) as u32)
    }
}

/// Reads block `b` of column `c` back out of a group (the inverse of [`pack_block`]).
pub(crate) fn unpack_block(
    ty: WeightType,
    layout: &GroupLayout,
    b: usize,
    c: usize,
    group: &[u8],
    out: &mut DecodedBlock,
) {
    let meta = &group[layout.meta_at(b)..layout.meta_at(b) + layout.meta];
    out.d = f16_bits(meta, 2 * c);
    out.m = match ty {
        WeightType::Q4_1 | WeightType::Q5_1 | WeightType::Q4K | WeightType::Q5K => {
            f16_bits(meta, 32 + 2 * c)
        }
        _ => 0,
    };
    match ty {
        WeightType::Q4K | WeightType::Q5K => {
            for j in 0..8 {
                out.scales[j] = meta[64 + j * GROUP + c] as i8;
                out.mins[j] = meta[min_at(j, c)];
            }
        }
        WeightType::Q6K => {
            for j in 0..16 {
                out.scales[j] = meta[q6_scale_at(j, c)] as i8;
            }
        }
        _ => {}
    }
    let quants = &group[layout.quants_at(b)..];
    let block = ty.block_len();
    if ty == WeightType::Q8_0 {
        for t in 0..8 {
            for j in 0..4 {
                out.q[4 * t + j] = quants[t * 64 + 4 * c + j];
            }
        }
    } else {
        for s in 0..block / 32 {
            for t in 0..4 {
                for j in 0..4 {
                    let byte = quants[(s * 4 + t) * 64 + 4 * c + j];
                    out.q[32 * s + 4 * t + j] = byte & 0x0f;
                    out.q[32 * s + 16 + 4 * t + j] = byte >> 4;
                }
            }
        }
    }
    let high_bits = ty.high_bits();
    if high_bits > 0 {
        let planes = &group[layout.planes_at(b)..];
        let mask = (1u8 << high_bits) - 1;
        for s in 0..block / 32 {
            for j in 0..4 {
                for t in 0..8 {
                    let (vector, bit) = high_bit_slot(high_bits, s, t);
                    let high = (planes[vector * 64 + 4 * c + j] >> bit) & mask;
                    out.q[32 * s + 4 * t + j] |= high << 4;
                }
            }
        }
    }
}
