//! What one kernel call reads and writes: a packed matrix's bytes ([`Weights`]) and the rows of
//! the output ([`Output`]).

use super::formats::{GroupLayout, GROUP};
use super::types::WeightType;

/// What a kernel reads of a packed matrix.
pub(crate) struct Weights<'a> {
    pub ty: WeightType,
    pub rows: usize,
    pub layout: GroupLayout,
    pub data: &'a [u8],
}

impl<'a> Weights<'a> {
    /// The packed bytes of column group `g`.
    pub(crate) fn group(&self, g: usize) -> &'a [u8] {
        &self.data[g * self.layout.stride..(g + 1) * self.layout.stride]
    }

    /// Valid output columns of group `g` (16 except in a tail group).
    pub(crate) fn lanes(&self, g: usize) -> usize {
        (self.rows - g * GROUP).min(GROUP)
    }
}

/// Where one work item writes: row `r`, column `j` of its matrix at `ptr[r * ld + offset + j]`.
#[derive(Clone, Copy)]
pub(crate) struct Output {
    pub ptr: *mut f32,
    pub ld: usize,
    pub offset: usize,
}

impl Output {
    pub(crate) fn at(self, offset: usize) -> Self {
        Self { offset, ..self }
    }
}

// SAFETY: work items write disjoint column ranges of the output, see `matmul`.
unsafe impl Send for Output {}
// SAFETY: as for `Send`: no two threads write the same element through an `Output`.
unsafe impl Sync for Output {}
