//! Linear layers and embedding tables over weights in whichever form loading chose: float
//! tensors, GGML-quantized matrices repacked for mirror-core's CPU kernels ([`crate::kernels`]),
//! or candle's quantized tensors (other devices, other types).
//!
//! Projections that read the same input (q/k/v, gate/up) run as one kernel call when all of
//! them are packed, so the input is quantized once and the threads are woken once.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{CpuStorage, DType, Device, Layout, Module, Shape, Tensor};

use crate::error::{Error, Result};
use crate::kernels::{self, KernelPath, PackedMatrix};

/// A weight matrix `(out, in)` as the layer multiplies it.
#[derive(Clone)]
pub(crate) enum Matrix {
    /// A float tensor (the model's dtype).
    Float(Tensor),
    /// GGML blocks repacked for mirror-core's CPU kernels.
    Packed(Arc<PackedMatrix>),
    /// A candle quantized tensor on the model's device.
    Quantized(Arc<QTensor>),
}

/// `y = x W^T + b`.
#[derive(Clone)]
pub(crate) struct Linear {
    weight: Matrix,
    bias: Option<Tensor>,
}

fn kernel_error(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// One call of the packed kernels for several matrices sharing the input; the outputs sit
/// side by side in the last dimension. The backward pass gives the input's gradient (the
/// weights are frozen), so training can run through quantized layers.
struct PackedMatmul {
    matrices: Vec<Arc<PackedMatrix>>,
}

impl PackedMatmul {
    fn width(&self) -> usize {
        self.matrices.iter().map(|m| m.rows()).sum()
    }
}

impl candle_core::CustomOp1 for PackedMatmul {
    fn name(&self) -> &'static str {
        "mirror-packed-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("the packed matmul takes f32 inputs")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("the packed matmul takes a contiguous input")
        };
        let dims = layout.shape().dims();
        let k = *dims.last().unwrap_or(&0);
        let x = &data[start..end];
        if k == 0 || x.len() % k != 0 {
            candle_core::bail!("the packed matmul cannot read {dims:?} as rows")
        }
        let m = x.len() / k;
        let width = self.width();
        let mut out = vec![0f32; m * width];
        let matrices: Vec<&PackedMatrix> = self.matrices.iter().map(|m| m.as_ref()).collect();
        kernels::matmul(KernelPath::selected(), &matrices, x, m, &mut out).map_err(kernel_error)?;
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = width;
        }
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let dims = grad_res.dims().to_vec();
        let width = self.width();
        let m = grad_res.elem_count() / width;
        let grad = grad_res
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .reshape((m, width))?;
        let mut total: Option<Vec<f32>> = None;
        let mut offset = 0;
        for matrix in &self.matrices {
            let part = grad
                .narrow(1, offset, matrix.rows())?
                .contiguous()?
                .flatten_all()?
                .to_vec1::<f32>()?;
            offset += matrix.rows();
            let g = matrix.matmul_transposed(&part, m).map_err(kernel_error)?;
            total = Some(match total {
                None => g,
                Some(mut acc) => {
                    acc.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
                    acc
                }
            });
        }
        let mut in_dims = dims;
        if let Some(last) = in_dims.last_mut() {
            *last = arg.dim(candle_core::D::Minus1)?;
        }
        let grad = Tensor::from_vec(total.unwrap_or_default(), in_dims, &Device::Cpu)?;
        Ok(Some(grad.to_dtype(arg.dtype())?))
    }
}

impl Linear {
    pub(crate) fn new(weight: Matrix, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The packed weight of a layer without bias; `None` for other layers.
    pub(crate) fn packed(&self) -> Option<&Arc<PackedMatrix>> {
        match (&self.weight, &self.bias) {
            (Matrix::Packed(p), None) => Some(p),
            _ => None,
        }
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        })
    }

    /// `x (..., in) -> (..., out)`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Matrix::Float(w) => candle_nn::Linear::new(w.clone(), None).forward(x)?,
            Matrix::Packed(p) => packed_forward(std::slice::from_ref(p), x)?,
            Matrix::Quantized(q) => {
                // candle's quantized matmul on a device reads a contiguous input, and its
                // general kernels (past its fast paths for a few rows) read f32 only: give it
                // that, and return the model's dtype (both steps are no-ops for f32 rows).
                let dtype = x.dtype();
                let input = x.to_dtype(DType::F32)?.contiguous()?;
                QMatMul::from_arc(Arc::clone(q))?
                    .forward(&input)?
                    .to_dtype(dtype)?
            }
        };
        self.add_bias(y)
    }

    /// The packed layers' outputs side by side in the last dimension, in one kernel call;
    /// `None` unless every layer is packed and none has a bias.
    pub(crate) fn forward_joint(layers: &[&Linear], x: &Tensor) -> Result<Option<Tensor>> {
        let packed: Option<Vec<Arc<PackedMatrix>>> = layers
            .iter()
            .map(|l| match (&l.weight, &l.bias) {
                (Matrix::Packed(p), None) => Some(Arc::clone(p)),
                _ => None,
            })
            .collect();
        match packed {
            Some(packed) => Ok(Some(packed_forward(&packed, x)?)),
            None => Ok(None),
        }
    }

    /// The outputs of several layers over the same input: one kernel call when all of them
    /// are packed, one call each otherwise.
    pub(crate) fn forward_many(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let packed: Option<Vec<Arc<PackedMatrix>>> = layers
            .iter()
            .map(|l| match &l.weight {
                Matrix::Packed(p) => Some(Arc::clone(p)),
                _ => None,
            })
            .collect();
        let Some(packed) = packed.filter(|p| p.len() > 1) else {
            return layers.iter().map(|l| l.forward(x)).collect();
        };
        let joint = packed_forward(&packed, x)?;
        let last = joint.rank() - 1;
        let mut offset = 0;
        let mut outputs = Vec::with_capacity(layers.len());
        for (layer, matrix) in layers.iter().zip(&packed) {
            let part = joint.narrow(last, offset, matrix.rows())?;
            offset += matrix.rows();
            outputs.push(layer.add_bias(part)?);
        }
        Ok(outputs)
    }
}

/// Runs the packed kernels on `x` (any float dtype, converted to f32 and back).
pub(crate) fn packed_forward(matrices: &[Arc<PackedMatrix>], x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let input = x.to_dtype(DType::F32)?.contiguous()?;
    let op = PackedMatmul {
        matrices: matrices.to_vec(),
    };
    let y = input.apply_op1(op)?;
    Ok(y.to_dtype(dtype)?)
}

/// The embedding table: rows are looked up by token id, and only those rows are dequantized.
#[derive(Clone)]
pub(crate) struct Embedding {
    table: Matrix,
    dtype: DType,
}

impl Embedding {
    pub(crate) fn new(table: Matrix, dtype: DType) -> Self {
        Self { table, dtype }
    }

    pub(crate) fn table(&self) -> &Matrix {
        &self.table
    }

    /// `(batch, tokens, hidden)` for `ids` given row-major as `batch x tokens`.
    pub(crate) fn forward(&self, ids: &[u32], batch: usize, tokens: usize) -> Result<Tensor> {
        match &self.table {
            Matrix::Float(table) => {
                let device = table.device();
                let index = Tensor::from_slice(ids, ids.len(), device)?;
                let rows = table.index_select(&index, 0)?;
                let hidden = rows.dim(1)?;
                Ok(rows.reshape((batch, tokens, hidden))?)
            }
            Matrix::Packed(p) => {
                let hidden = p.cols();
                let mut values = vec![0f32; ids.len() * hidden];
                for (&id, row) in ids.iter().zip(values.chunks_exact_mut(hidden)) {
                    p.dequantize_row(id as usize, row)?;
                }
                let rows = Tensor::from_vec(values, (batch, tokens, hidden), &Device::Cpu)?;
                Ok(rows.to_dtype(self.dtype)?)
            }
            Matrix::Quantized(q) => {
                let device = q.device();
                let index = Tensor::from_slice(ids, (batch, tokens), &device)?;
                Ok(q.embedding(&index)?.to_dtype(self.dtype)?)
            }
        }
    }
}
