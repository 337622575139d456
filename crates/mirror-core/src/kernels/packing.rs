//! Weight matrices repacked at load into interleaved groups of 16 output rows (the layout of
//! [`formats`](super::formats)), and the work on them that is not a product with activations:
//! dequantization and the transposed product of training.

use std::ops::Range;

use rayon::prelude::*;

use super::formats::{self, DecodedBlock, GroupLayout, GROUP};
use super::memory::WeightBytes;
use super::operands::Weights;
use super::types::WeightType;
use crate::error::{Error, Result};

/// A weight matrix `(rows, cols)` (output features by input features) in a GGML type,
/// repacked for the kernels (in huge pages where the system has them, see
/// [`HUGE_PAGES_ENV`](super::HUGE_PAGES_ENV)). Immutable and shareable across threads.
pub struct PackedMatrix {
    ty: WeightType,
    rows: usize,
    cols: usize,
    layout: GroupLayout,
    groups: usize,
    data: WeightBytes,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("type", &self.ty)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

impl PackedMatrix {
    /// Repacks a GGML tensor's bytes: `rows` rows of `cols` weights, row-major, as in a GGUF
    /// file. Fails if `cols` is not a multiple of the block or the bytes do not match.
    pub fn from_ggml_bytes(ty: WeightType, bytes: &[u8], rows: usize, cols: usize) -> Result<Self> {
        let block = ty.block_len();
        if rows == 0 || cols == 0 || !cols.is_multiple_of(block) {
            return Err(Error::invalid(format!(
                "a {ty:?} matrix needs a positive shape with columns a multiple of {block}, got ({rows}, {cols})"
            )));
        }
        let row_bytes = cols / block * ty.block_bytes();
        if bytes.len() != rows * row_bytes {
            return Err(Error::invalid(format!(
                "a ({rows}, {cols}) {ty:?} matrix takes {} bytes, got {}",
                rows * row_bytes,
                bytes.len()
            )));
        }
        let layout = GroupLayout::new(ty, cols);
        let groups = rows.div_ceil(GROUP);
        let mut data = WeightBytes::zeroed(groups * layout.stride)?;
        data.as_mut_slice()
            .par_chunks_mut(layout.stride)
            .enumerate()
            .for_each(|(g, group)| {
                let mut cols_blocks: [DecodedBlock; GROUP] =
                    std::array::from_fn(|_| DecodedBlock::zero());
                for b in 0..layout.blocks {
                    for (c, decoded) in cols_blocks.iter_mut().enumerate() {
                        let row = g * GROUP + c;
                        if row < rows {
                            let at = row * row_bytes + b * ty.block_bytes();
                            formats::decode_block(ty, &bytes[at..at + ty.block_bytes()], decoded);
                        } else {
                            *decoded = DecodedBlock::zero();
                        }
                    }
                    formats::pack_block(ty, &layout, b, &cols_blocks, group);
                }
            });
        Ok(Self {
            ty,
            rows,
            cols,
            layout,
            groups,
            data,
        })
    }

    /// Quantizes f32 weights `(rows, cols)` row-major to `ty` (with candle's GGML quantizers,
    /// the same rounding as llama.cpp's `quantize`) and repacks them.
    pub fn quantize(ty: WeightType, weights: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if weights.len() != rows * cols {
            return Err(Error::invalid(format!(
                "{} weights do not form a ({rows}, {cols}) matrix",
                weights.len()
            )));
        }
        let tensor =
            candle_core::Tensor::from_slice(weights, (rows, cols), &candle_core::Device::Cpu)?;
        let qtensor = candle_core::quantized::QTensor::quantize(&tensor, ty.ggml())?;
        Self::from_ggml_bytes(ty, &qtensor.data()?, rows, cols)
    }

    /// A copy in memory of its own (fails when the system has no memory to map).
    pub fn try_clone(&self) -> Result<Self> {
        Ok(Self {
            data: self.data.try_clone()?,
            ..*self
        })
    }

    /// The weight type.
    pub fn weight_type(&self) -> WeightType {
        self.ty
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held (what one pass over the matrix reads).
    pub fn storage_bytes(&self) -> usize {
        self.data.len()
    }

    /// Column groups of 16 output rows (the last one padded).
    pub(crate) fn groups(&self) -> usize {
        self.groups
    }

    /// The matrix of rows `rows` of this one (in that order; a row may repeat), repacked:
    /// row `i` of the result holds exactly the quants and scales of row `rows[i]` here, so
    /// its products are the same bits (the kernels give a row the same result in any group).
    pub fn select_rows(&self, rows: &[usize]) -> Result<Self> {
        if rows.is_empty() {
            return Err(Error::invalid(
                "a matrix of selected rows needs at least one row",
            ));
        }
        if let Some(&row) = rows.iter().find(|&&r| r >= self.rows) {
            return Err(Error::invalid(format!(
                "row {row} is not a row of a matrix of {} rows",
                self.rows
            )));
        }
        let layout = self.layout;
        let groups = rows.len().div_ceil(GROUP);
        let mut data = WeightBytes::zeroed(groups * layout.stride)?;
        data.as_mut_slice()
            .par_chunks_mut(layout.stride)
            .enumerate()
            .for_each(|(g, group)| {
                let mut cols: [DecodedBlock; GROUP] = std::array::from_fn(|_| DecodedBlock::zero());
                for b in 0..layout.blocks {
                    for (c, decoded) in cols.iter_mut().enumerate() {
                        match rows.get(g * GROUP + c) {
                            Some(&row) => {
                                let from = self.group(row / GROUP);
                                formats::unpack_block(
                                    self.ty,
                                    &layout,
                                    b,
                                    row % GROUP,
                                    from,
                                    decoded,
                                );
                            }
                            None => *decoded = DecodedBlock::zero(),
                        }
                    }
                    formats::pack_block(self.ty, &layout, b, &cols, group);
                }
            });
        Ok(Self {
            ty: self.ty,
            rows: rows.len(),
            cols: self.cols,
            layout,
            groups,
            data,
        })
    }

    /// The bytes and layout the kernels read.
    pub(crate) fn operand(&self) -> Weights<'_> {
        Weights {
            ty: self.ty,
            rows: self.rows,
            layout: self.layout,
            data: self.data.as_slice(),
        }
    }

    fn group(&self, g: usize) -> &[u8] {
        self.operand().group(g)
    }

    /// Dequantizes row `row` (one output feature's weights) into `out` (`cols` long).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<()> {
        if row >= self.rows || out.len() != self.cols {
            return Err(Error::invalid(format!(
                "row {row} of a ({}, {}) matrix into {} values",
                self.rows,
                self.cols,
                out.len()
            )));
        }
        let group = self.group(row / GROUP);
        let block = self.ty.block_len();
        let mut decoded = DecodedBlock::zero();
        for b in 0..self.layout.blocks {
            decoded.q = [0; 256];
            formats::unpack_block(self.ty, &self.layout, b, row % GROUP, group, &mut decoded);
            for (i, value) in out[b * block..(b + 1) * block].iter_mut().enumerate() {
                *value = formats::block_value(self.ty, &decoded, i);
            }
        }
        Ok(())
    }

    /// The whole matrix in f32, row-major `(rows, cols)`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(row, values)| {
                // Rows and lengths match by construction.
                let _ = self.dequantize_row(row, values);
            });
        out
    }

    /// `grad (m, rows) -> grad W (m, cols)`: the input gradient of [`PackedMatrix::matmul`],
    /// for training through frozen quantized layers (weights dequantized a group at a time).
    pub fn matmul_transposed(&self, grad: &[f32], m: usize) -> Result<Vec<f32>> {
        if grad.len() != m * self.rows {
            return Err(Error::invalid(format!(
                "a gradient of {} values does not have {m} rows of {}",
                grad.len(),
                self.rows
            )));
        }
        let cols = self.cols;
        let block = self.ty.block_len();
        // Each thread owns a range of input columns (blocks) and walks every group.
        let mut out = vec![0f32; m * cols];
        let blocks = self.layout.blocks;
        let chunk = blocks
            .div_ceil(rayon::current_num_threads().max(1) * 2)
            .max(1);
        let mut parts: Vec<(Range<usize>, Vec<f32>)> = (0..blocks)
            .step_by(chunk)
            .map(|start| (start..(start + chunk).min(blocks), Vec::new()))
            .collect();
        parts.par_iter_mut().for_each(|(range, part)| {
            let width = range.len() * block;
            *part = vec![0f32; m * width];
            let mut decoded = DecodedBlock::zero();
            let mut values = vec![0f32; block];
            for g in 0..self.groups {
                let group = self.group(g);
                for c in 0..GROUP {
                    let row = g * GROUP + c;
                    if row >= self.rows {
                        break;
                    }
                    for b in range.clone() {
                        decoded.q = [0; 256];
                        formats::unpack_block(self.ty, &self.layout, b, c, group, &mut decoded);
                        for (i, v) in values.iter_mut().enumerate() {
                            *v = formats::block_value(self.ty, &decoded, i);
                        }
                        let offset = (b - range.start) * block;
                        for r in 0..m {
                            let scale = grad[r * self.rows + row];
                            if scale == 0.0 {
                                continue;
                            }
                            let dst = &mut part[r * width + offset..r * width + offset + block];
                            for (d, v) in dst.iter_mut().zip(&values) {
                                *d += scale * v;
                            }
                        }
                    }
                }
            }
        });
        for (range, part) in parts {
            let width = range.len() * block;
            for r in 0..m {
                out[r * cols + range.start * block..r * cols + range.end * block]
                    .copy_from_slice(&part[r * width..(r + 1) * width]);
            }
        }
        Ok(out)
    }
}
