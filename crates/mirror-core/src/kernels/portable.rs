//! The kernels in plain Rust: the definition of the arithmetic that the SIMD paths reproduce
//! bit for bit, and the path for CPUs without them.
//!
//! Per output (row `r`, column `c`) and weight block, exact integer dot products are combined
//! into one f32 update of the running sum, always in this order:
//!
//! - 32-weight types: `acc = acc + (da * d) * (isum - zp * asum)`, then for types with a min
//!   `acc = acc + (da * m) * asum`;
//! - Q4_K, Q5_K: `acc = (acc + (da * d) * A) - (da * dmin) * B` with `A = sum_j scale_j * isum_j`
//!   and `B = sum_j min_j * asum_j` over the 32-weight sub-blocks;
//! - Q6_K: `acc = acc + (da * d) * A` with `A = sum_j scale_j * (isum_j - 32 * asum_j)` over the
//!   16-weight sub-blocks;
//!
//! where `da` is the activation block's scale, `isum` the integer dot product of the unsigned
//! quants with the int8 activations, and `asum` the sum of those activations.

use std::ops::Range;

use half::f16;

use super::activations::Activations;
use super::formats::{self, DecodedBlock, GROUP};
use super::operands::{Output, Weights};
use super::types::WeightType;

/// The zero point subtracted from the unsigned quants of a 32-weight type.
pub(crate) const fn zero_point(ty: WeightType) -> i32 {
    match ty {
        WeightType::Q4_0 => 8,
        WeightType::Q5_0 => 16,
        WeightType::Q8_0 => 128,
        _ => 0,
    }
}

pub(crate) fn has_min(ty: WeightType) -> bool {
    matches!(ty, WeightType::Q4_1 | WeightType::Q5_1)
}

fn dot(q: &[u8], a: &[i8]) -> i32 {
    q.iter().zip(a).map(|(&q, &a)| q as i32 * a as i32).sum()
}

/// One block's update of one output's running sum.
fn block_update(
    ty: WeightType,
    block: &DecodedBlock,
    acts: &Activations,
    row: usize,
    b: usize,
    acc: f32,
) -> f32 {
    let len = ty.block_len();
    let a = &acts.q[row * acts.k + b * len..row * acts.k + (b + 1) * len];
    let da = acts.scales[row * (acts.k / acts.block) + b];
    let d = f16::from_bits(block.d).to_f32();
    let m = f16::from_bits(block.m).to_f32();
    match ty {
        WeightType::Q4K | WeightType::Q5K => {
            let (mut big_a, mut big_b) = (0i32, 0i32);
            for j in 0..8 {
                let isum = dot(&block.q[32 * j..32 * j + 32], &a[32 * j..32 * j + 32]);
                big_a += block.scales[j] as u8 as i32 * isum;
                big_b += block.mins[j] as i32 * acts.sums32[row * (acts.k / 32) + b * 8 + j];
            }
            (acc + (da * d) * big_a as f32) - (da * m) * big_b as f32
        }
        WeightType::Q6K => {
            let mut big_a = 0i32;
            for j in 0..16 {
                let isum = dot(&block.q[16 * j..16 * j + 16], &a[16 * j..16 * j + 16]);
                let asum = acts.sums16[row * (acts.k / 16) + b * 16 + j];
                big_a += block.scales[j] as i32 * (isum - 32 * asum);
            }
            acc + (da * d) * big_a as f32
        }
        _ => {
            let isum = dot(&block.q[..32], a);
            let asum = acts.sums32[row * (acts.k / 32) + b];
            let acc = acc + (da * d) * (isum - zero_point(ty) * asum) as f32;
            if has_min(ty) {
                acc + (da * m) * asum as f32
            } else {
                acc
            }
        }
    }
}

/// # Safety
/// `groups` must be column groups of `w`, and `out` valid for writing each group's columns at
/// every row of `acts`.
pub(super) unsafe fn matmul_groups(
    w: &Weights,
    acts: &Activations,
    groups: Range<usize>,
    out: Output,
) {
    let mut blocks: [DecodedBlock; GROUP] = std::array::from_fn(|_| DecodedBlock::zero());
    let mut acc = vec![[0f32; GROUP]; acts.rows];
    for g in groups {
        let group = w.group(g);
        let lanes = w.lanes(g);
        acc.iter_mut().for_each(|a| *a = [0.0; GROUP]);
        for b in 0..w.layout.blocks {
            for (c, block) in blocks.iter_mut().enumerate().take(lanes) {
                block.q = [0; 256];
                formats::unpack_block(w.ty, &w.layout, b, c, group, block);
            }
            for (row, acc) in acc.iter_mut().enumerate() {
                for c in 0..lanes {
                    acc[c] = block_update(w.ty, &blocks[c], acts, row, b, acc[c]);
                }
            }
        }
        for (row, acc) in acc.iter().enumerate() {
            // SAFETY: `out` takes the group's `lanes` columns at every row (this function's
            // contract), and `acc` holds at least `lanes` values.
            unsafe {
                let dst = out.ptr.add(row * out.ld + out.offset + g * GROUP);
                std::ptr::copy_nonoverlapping(acc.as_ptr(), dst, lanes);
            }
        }
    }
}
