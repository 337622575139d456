//! The matmul entry point: checks a call, quantizes its input once, splits the output columns
//! into work items over the current rayon pool and runs each on the selected code path.

use std::ops::Range;

use std::sync::atomic::{AtomicUsize, Ordering};

use super::activations::Activations;
use super::operands::Output;
use super::packing::PackedMatrix;
use super::portable;
use super::types::KernelPath;
#[cfg(target_arch = "x86_64")]
use super::{x86_avx2, x86_avx512};
use crate::error::{Error, Result};

/// `out = x W_1^T | x W_2^T | ...`: one call for several matrices that share the input (q/k/v,
/// gate/up), their outputs side by side in each row of `out` (`m * sum(rows)`).
///
/// `x` is `m` rows of `cols` f32 values, row-major. Threads of the current rayon pool split the
/// output columns.
pub fn matmul(
    path: KernelPath,
    matrices: &[&PackedMatrix],
    x: &[f32],
    m: usize,
    out: &mut [f32],
) -> Result<()> {
    let Some(first) = matrices.first() else {
        return Err(Error::invalid("a matmul needs at least one matrix"));
    };
    let k = first.cols();
    if matrices.iter().any(|w| w.cols() != k) {
        return Err(Error::invalid(
            "matrices of one matmul call must share their input width",
        ));
    }
    let width: usize = matrices.iter().map(|w| w.rows()).sum();
    if m == 0 || x.len() != m * k || out.len() != m * width {
        return Err(Error::invalid(format!(
            "matmul of {} inputs as {m} rows of {k} into {} outputs of {width} columns",
            x.len(),
            out.len()
        )));
    }
    if !path.is_supported() {
        return Err(Error::invalid(format!(
            "the {path:?} kernels need CPU features this machine lacks"
        )));
    }
    // One quantization of the input per activation block size in use.
    let needs = |block: usize| {
        matrices
            .iter()
            .any(|w| w.weight_type().activation_block() == block)
    };
    let acts32 = needs(32).then(|| Activations::quantize(path, x, m, k, 32));
    let acts256 = needs(256).then(|| Activations::quantize(path, x, m, k, 256));

    // Work items: ranges of column groups of one matrix, claimed in order from a shared counter
    // by every thread that joins the call. Small items (about eight per thread, at most
    // MAX_GROUPS_PER_ITEM groups) keep the threads' finishing times within one item of each
    // other, and a thread that joins late takes fewer; a claim is one atomic add.
    let threads = rayon::current_num_threads().max(1);
    let total_groups: usize = matrices.iter().map(|w| w.groups()).sum();
    let per_item = total_groups
        .div_ceil(threads * ITEMS_PER_THREAD)
        .clamp(1, MAX_GROUPS_PER_ITEM);
    let mut items = Vec::new();
    let mut offset = 0;
    for (index, w) in matrices.iter().enumerate() {
        let mut g = 0;
        while g < w.groups() {
            let end = (g + per_item).min(w.groups());
            items.push((index, g..end, offset));
            g = end;
        }
        offset += w.rows();
    }
    let base = Output {
        ptr: out.as_mut_ptr(),
        ld: width,
        offset: 0,
    };
    let run = |&(index, ref groups, offset): &(usize, Range<usize>, usize)| {
        let w = matrices[index];
        let acts = match w.weight_type().activation_block() {
            32 => acts32.as_ref(),
            _ => acts256.as_ref(),
        };
        let Some(acts) = acts else { return };
        let output = base.at(offset);
        // SAFETY: the path is supported (checked above); groups are within the matrix; every
        // item writes only columns `offset + groups*16 ..` (clipped to the matrix's rows) of
        // each output row, disjoint from every other item's, and `out` outlives the call.
        unsafe { run_groups(path, w, acts, groups.clone(), output) }
    };
    if items.len() == 1 || threads == 1 {
        items.iter().for_each(run);
    } else {
        let next = AtomicUsize::new(0);
        let claim = || {
            while let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
                run(item);
            }
        };
        // The caller claims too: when the pool's other threads are busy or asleep, it does the
        // whole call itself, and a spawned job that no thread took returns at once.
        rayon::in_place_scope(|scope| {
            for _ in 1..threads.min(items.len()) {
                scope.spawn(|_| claim());
            }
            claim();
        });
    }
    Ok(())
}

/// # Safety
/// `path` must be supported by the CPU, `groups` must be column groups of `w`, `acts` must be
/// the call's input quantized for `w`'s type, and `out` must be valid for writing the groups'
/// columns at every row of `acts`.
unsafe fn run_groups(
    path: KernelPath,
    w: &PackedMatrix,
    acts: &Activations,
    groups: Range<usize>,
    out: Output,
) {
    let weights = w.operand();
    // SAFETY: the path's CPU features, the groups and the output are this function's
    // contract, which is each kernel's.
    unsafe {
        match path {
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512Vnni => x86_avx512::matmul_groups(&weights, acts, groups, out),
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => x86_avx2::matmul_groups(&weights, acts, groups, out),
            _ => portable::matmul_groups(&weights, acts, groups, out),
        }
    }
}

impl PackedMatrix {
    /// `x (m, cols) -> x W^T (m, rows)`, `x` row-major; see [`matmul`].
    pub fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; m * self.rows()];
        matmul(KernelPath::selected(), &[self], x, m, &mut out)?;
        Ok(out)
    }
}

/// Work items per thread of a call (see [`matmul`]).
const ITEMS_PER_THREAD: usize = 8;

/// Most column groups in one work item: at one row, 16 groups of a 1536-wide Q4_K matrix are
/// about 230 KB, 7 us of streaming.
const MAX_GROUPS_PER_ITEM: usize = 16;

/// Largest number of activation rows one call takes.
pub const MAX_ROWS: usize = 64;
