//! How attention reads cached keys and values: strided views of f32 or f16 rows, widened to
//! f32 exactly (every f16 is an f32), in registers where the loops are vectorized or once up
//! front for many queries.

use candle_core::Layout;
use half::{f16, slice::HalfFloatSliceExt};

/// The dimensions of one attention call.
#[derive(Clone, Copy)]
pub(super) struct Shape {
    pub(super) batch: usize,
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) tokens: usize,
    pub(super) kv_len: usize,
    pub(super) head_dim: usize,
}

/// A strided view of f32 or f16 values: element `(i0, i1, i2, i3)` at `start + sum(i * stride)`.
#[derive(Clone, Copy)]
pub(super) struct View<'a, E> {
    pub(super) data: &'a [E],
    pub(super) start: usize,
    pub(super) strides: [usize; 4],
}

impl<'a, E> View<'a, E> {
    /// Row `(i0, i1, i2)` of `len` contiguous values.
    pub(super) fn row(&self, i0: usize, i1: usize, i2: usize, len: usize) -> &'a [E] {
        let at = self.start + i0 * self.strides[0] + i1 * self.strides[1] + i2 * self.strides[2];
        &self.data[at..at + len]
    }

    /// Rows `(i0, i1, j)` for up to 16 `j` in `indices`, gathered into `into` (on the caller's
    /// stack: the attention loops gather once per 16 keys, too often to allocate).
    pub(super) fn rows16<'s>(
        &self,
        i0: usize,
        i1: usize,
        indices: &[u32],
        len: usize,
        into: &'s mut [&'a [E]; 16],
    ) -> &'s [&'a [E]] {
        for (slot, &j) in into.iter_mut().zip(indices) {
            *slot = self.row(i0, i1, j as usize, len);
        }
        &into[..indices.len().min(16)]
    }
}

/// What a KV cache stores keys and values as: f32, or f16 read through exact conversion to
/// f32 (every f16 is an f32), in registers where the loops are vectorized. A query's
/// operations and bits therefore do not depend on the storage beyond the rounding done when
/// the rows were cached.
pub(super) trait CacheElement: Copy + Send + Sync + Sized {
    /// Row `row` as f32 values: itself when it is f32, otherwise widened into `buffer`.
    fn as_f32<'r>(row: &'r [Self], buffer: &'r mut Vec<f32>) -> &'r [f32];

    /// Sixteen values at `at`, widened.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, and `at` must be valid for reading 16 values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(at: *const Self) -> std::arch::x86_64::__m512;
}

impl CacheElement for f32 {
    fn as_f32<'r>(row: &'r [f32], _: &'r mut Vec<f32>) -> &'r [f32] {
        row
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(at: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: AVX-512 F and 16 readable values are the caller's contract.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(at) }
    }
}

impl CacheElement for f16 {
    fn as_f32<'r>(row: &'r [f16], buffer: &'r mut Vec<f32>) -> &'r [f32] {
        buffer.resize(row.len(), 0.0);
        row.convert_to_f32_slice(buffer);
        buffer
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(at: *const f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: AVX-512 F (which has the 16-lane f16 conversion) and 16 readable values (32
        // bytes) are the caller's contract.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(at as *const __m256i)) }
    }
}

/// Calls `f` with each row as f32 values: f32 rows as they are, others widened into one
/// buffer (the loops that are not vectorized for f16).
pub(super) fn each_wide<E: CacheElement>(rows: &[&[E]], mut f: impl FnMut(usize, &[f32])) {
    let mut buffer = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        f(i, E::as_f32(row, &mut buffer));
    }
}

pub(super) fn view<'a, E>(data: &'a [E], layout: &Layout) -> Option<View<'a, E>> {
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

/// The rows of `view` as f32, `(b, kv_heads, kv_len, d)` contiguous (exact: every f16 is an
/// f32).
pub(super) fn widened(view: &View<'_, f16>, shape: Shape) -> Vec<f32> {
    let (rows, d) = (shape.kv_len, shape.head_dim);
    let mut out = vec![0f32; shape.batch * shape.kv_heads * rows * d];
    let mut chunks = out.chunks_exact_mut(d);
    for b in 0..shape.batch {
        for h in 0..shape.kv_heads {
            for (j, into) in (0..rows).zip(chunks.by_ref()) {
                view.row(b, h, j, d).convert_to_f32_slice(into);
            }
        }
    }
    out
}

/// A view of rows laid out `(b, kv_heads, kv_len, d)` contiguously.
pub(super) fn contiguous(data: &[f32], shape: Shape) -> View<'_, f32> {
    let d = shape.head_dim;
    View {
        data,
        start: 0,
        strides: [shape.kv_heads * shape.kv_len * d, shape.kv_len * d, d, 1],
    }
}
