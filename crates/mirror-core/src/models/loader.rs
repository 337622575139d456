//! Builds a model's layers from a [`WeightSource`] by Hugging Face tensor names, in the form
//! [`WeightFormat`] asks for, checking every shape against the config and recording what it
//! did in a [`WeightReport`].

use std::cell::RefCell;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::RmsNorm;

use super::linear::{Embedding, Linear, Matrix};
use crate::error::{Error, Result};
use crate::kernels::{KernelPath, PackedMatrix, WeightType};
use crate::weights::{ggml_type_name, TensorReport, WeightFormat, WeightReport, WeightSource};

/// Reads weights for one model.
pub(crate) struct WeightLoader<'a> {
    source: &'a dyn WeightSource,
    format: WeightFormat,
    dtype: DType,
    device: &'a Device,
    report: RefCell<WeightReport>,
}

fn float_name(dtype: DType) -> String {
    format!("{dtype:?}").to_uppercase()
}

impl<'a> WeightLoader<'a> {
    pub(crate) fn new(
        source: &'a dyn WeightSource,
        format: WeightFormat,
        dtype: DType,
        device: &'a Device,
    ) -> Result<Self> {
        if let WeightFormat::Quantize(target) = format {
            if WeightType::from_ggml(target).is_none() {
                return Err(Error::invalid(format!(
                    "cannot quantize weights to {} (supported: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)",
                    ggml_type_name(target)
                )));
            }
        }
        if format != WeightFormat::Float && device.is_cpu() && dtype != DType::F32 {
            // The CPU kernels take f32 activations; anything else would only add conversions.
            return Err(Error::invalid(format!(
                "quantized weights on the CPU run with f32 activations, not {dtype:?} (use WeightFormat::Float for {dtype:?} weights)"
            )));
        }
        let compute = if device.is_cpu() {
            KernelPath::selected().name().to_string()
        } else {
            format!("{:?}", device.location())
        };
        Ok(Self {
            source,
            format,
            dtype,
            device,
            report: RefCell::new(WeightReport {
                compute,
                tensors: Vec::new(),
            }),
        })
    }

    /// A float tensor (norm weights, biases) in the model's dtype.
    pub(crate) fn float(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.source.load(name, shape, self.dtype, self.device)
    }

    pub(crate) fn norm(&self, name: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm::new(self.float(name, &[dim])?, eps))
    }

    pub(crate) fn linear(
        &self,
        prefix: &str,
        out_dim: usize,
        in_dim: usize,
        bias: bool,
    ) -> Result<Linear> {
        let weight = self.matrix(&format!("{prefix}.weight"), out_dim, in_dim)?;
        let bias = if bias {
            Some(self.float(&format!("{prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        Ok(Linear::new(weight, bias))
    }

    pub(crate) fn embedding(&self, name: &str, vocab: usize, hidden: usize) -> Result<Embedding> {
        Ok(Embedding::new(
            self.matrix(name, vocab, hidden)?,
            self.dtype,
        ))
    }

    /// This loader under the name prefix `prefix` (`model.layers.3`).
    pub(crate) fn scope(&self, prefix: &str) -> Scope<'_, 'a> {
        Scope {
            loader: self,
            prefix: prefix.to_string(),
        }
    }

    pub(crate) fn into_report(self) -> WeightReport {
        self.report.into_inner()
    }

    fn record(&self, name: &str, stored: &str, used: String, bytes: usize) {
        self.report.borrow_mut().tensors.push(TensorReport {
            name: name.to_string(),
            stored: stored.to_string(),
            used,
            bytes,
        });
    }

    fn float_matrix(&self, name: &str, shape: &[usize], stored: &str) -> Result<Matrix> {
        let tensor = self.float(name, shape)?;
        self.record(
            name,
            stored,
            float_name(self.dtype),
            tensor.elem_count() * self.dtype.size_in_bytes(),
        );
        Ok(Matrix::Float(tensor))
    }

    /// A weight matrix `(rows, cols)` in the requested format.
    pub(crate) fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let shape = [rows, cols];
        let stored_q = match self.format {
            WeightFormat::Float => None,
            _ => self.source.load_quantized(name, &shape)?,
        };
        let stored = match &stored_q {
            Some(q) => ggml_type_name(q.dtype()),
            None => self
                .source
                .stored_type(name)
                .unwrap_or_else(|| float_name(self.dtype)),
        };
        match self.format {
            WeightFormat::Float => self.float_matrix(name, &shape, &stored),
            WeightFormat::AsStored => match stored_q {
                None => self.float_matrix(name, &shape, &stored),
                Some(q) => self.quantized(name, &stored, q, cols),
            },
            WeightFormat::Quantize(target) => {
                let Some(target) = fitting_type(target, cols) else {
                    return self.float_matrix(name, &shape, &stored);
                };
                let q = match stored_q {
                    Some(q) if q.dtype() == target => q,
                    Some(q) => QTensor::quantize(&q.dequantize(&Device::Cpu)?, target)?,
                    None => {
                        let weights = self.source.load(name, &shape, DType::F32, &Device::Cpu)?;
                        QTensor::quantize(&weights, target)?
                    }
                };
                self.quantized(name, &stored, q, cols)
            }
        }
    }

    /// A quantized matrix (on the CPU) placed for the model: packed for the CPU kernels,
    /// requantized to Q8_0 first if the kernels do not read its type, or moved to the device.
    fn quantized(&self, name: &str, stored: &str, q: QTensor, cols: usize) -> Result<Matrix> {
        let (rows, _) = q.shape().dims2()?;
        let q = match WeightType::from_ggml(q.dtype()) {
            Some(_) => q,
            None => match fitting_type(GgmlDType::Q8_0, cols) {
                Some(target) => QTensor::quantize(&q.dequantize(&Device::Cpu)?, target)?,
                None => return self.float_matrix(name, &[rows, cols], stored),
            },
        };
        let used = ggml_type_name(q.dtype());
        if self.device.is_cpu() {
            let ty = WeightType::from_ggml(q.dtype())
                .ok_or_else(|| Error::invalid(format!("no kernel for {used}")))?;
            let packed = PackedMatrix::from_ggml_bytes(ty, &q.data()?, rows, cols)?;
            self.record(name, stored, used, packed.storage_bytes());
            Ok(Matrix::Packed(Arc::new(packed)))
        } else {
            // The same bytes, on the device.
            let storage = QStorage::from_data(q.data()?, self.device, q.dtype())?;
            let q = QTensor::new(storage, (rows, cols))?;
            self.record(name, stored, used, q.storage_size_in_bytes());
            Ok(Matrix::Quantized(Arc::new(q)))
        }
    }
}

/// A [`WeightLoader`] under a Hugging Face name prefix: in scope `model.layers.3.self_attn`,
/// `linear("q_proj", ..)` reads `model.layers.3.self_attn.q_proj.weight` (and `.bias`).
pub(crate) struct Scope<'l, 'a> {
    loader: &'l WeightLoader<'a>,
    prefix: String,
}

impl Scope<'_, '_> {
    fn name(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }

    /// The scope one level down.
    pub(crate) fn push(&self, name: &str) -> Self {
        Self {
            loader: self.loader,
            prefix: self.name(name),
        }
    }

    pub(crate) fn linear(
        &self,
        name: &str,
        out_dim: usize,
        in_dim: usize,
        bias: bool,
    ) -> Result<Linear> {
        self.loader.linear(&self.name(name), out_dim, in_dim, bias)
    }

    /// The RMSNorm `name` (its `.weight`).
    pub(crate) fn norm(&self, name: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        self.loader
            .norm(&format!("{}.weight", self.name(name)), dim, eps)
    }
}

/// `target` if a row of `cols` weights is whole blocks of it, else Q8_0 if that fits, else
/// nothing (the matrix stays float).
fn fitting_type(target: GgmlDType, cols: usize) -> Option<GgmlDType> {
    [target, GgmlDType::Q8_0]
        .into_iter()
        .find(|t| cols.is_multiple_of(t.block_size()))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::weights::WeightSource;

    /// One Q3_K matrix (a type the kernels do not read), as a GGUF file would hold it.
    struct OneQ3K {
        tensor: QTensor,
    }

    impl WeightSource for OneQ3K {
        fn load(&self, _: &str, _: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
            Ok(self.tensor.dequantize(device)?.to_dtype(dtype)?)
        }
        fn load_quantized(&self, _: &str, _: &[usize]) -> Result<Option<QTensor>> {
            let bytes = self.tensor.data()?;
            let storage = QStorage::from_data(bytes, &Device::Cpu, GgmlDType::Q3K)?;
            Ok(Some(QTensor::new(storage, self.tensor.shape().clone())?))
        }
        fn contains(&self, _: &str) -> bool {
            true
        }
        fn path(&self) -> &Path {
            Path::new("one-q3k.gguf")
        }
    }

    #[test]
    fn a_type_without_kernels_is_requantized_to_q8_0_within_its_rounding() {
        let (rows, cols) = (20, 512);
        let weights: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 13) as f32))
            .collect();
        let tensor = Tensor::from_vec(weights, (rows, cols), &Device::Cpu).unwrap();
        let source = OneQ3K {
            tensor: QTensor::quantize(&tensor, GgmlDType::Q3K).unwrap(),
        };
        let stored = source
            .load("w", &[rows, cols], DType::F32, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let loader =
            WeightLoader::new(&source, WeightFormat::AsStored, DType::F32, &Device::Cpu).unwrap();
        let Matrix::Packed(packed) = loader.matrix("w", rows, cols).unwrap() else {
            panic!("expected a packed matrix");
        };
        assert_eq!(packed.weight_type(), WeightType::Q8_0);
        let report = loader.into_report();
        assert_eq!(report.converted(), vec![("w", "Q3_K", "Q8_0")]);
        // Q8_0: 127 steps of max|w|/127 on each side; rounding moves a weight by half a step,
        // the f16 scale by at most 127 * 2^-11 of a step.
        let mut row = vec![0f32; cols];
        for (r, stored_row) in stored.iter().enumerate() {
            packed.dequantize_row(r, &mut row).unwrap();
            for (block, stored_block) in row.chunks(32).zip(stored_row.chunks(32)) {
                let amax = stored_block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let step = amax / 127.0;
                let bound = step / 2.0 + 127.0 * step * 2f32.powi(-11) + 1e-7;
                for (a, b) in block.iter().zip(stored_block) {
                    assert!((a - b).abs() <= bound, "{a} vs {b}, bound {bound}");
                }
            }
        }
    }
}
