//! Quantized matrix multiplication on the CPU for a few activation rows: `y = x W^T` with `W`
//! in a GGML type as stored and `x` of 1 to 64 rows (one decoded token, a verification window,
//! a hypothesis-tree pass).
//!
//! The design follows llama.cpp's CPU path (ggml `vec_dot_*` and its repacked "x8/x16" weights):
//!
//! - Activations are quantized once per call to int8 with one f32 scale per 32 weights (for the
//!   32-weight block types) or per 256 (the k-quants), with the sums of every 16 and 32 values.
//! - Weights are repacked at load into groups of 16 interleaved output rows, so that one
//!   64-byte load holds 4 consecutive quants of 16 rows: an AVX-512 VNNI `vpdpbusd` multiplies
//!   them by 4 broadcast activation bytes and accumulates 16 outputs at once, with no horizontal
//!   sums. Each weight block is decoded once per tile of rows while it sits in registers.
//! - Threads split the output columns (groups), never the reduction, so every output is one
//!   sequential sum.
//!
//! **Batch invariance by design.** Integer dot products are exact. The float part of every
//! output is the same sequence of f32 operations (one multiply-add pair per block, no fused
//! multiply-add) whatever the number of rows, the row tile, the thread split or the code path.
//! A row's result is therefore bit-identical whether it is computed alone or among 64 others,
//! and the AVX-512, AVX2 and portable paths agree bit for bit (tested).

mod formats;
mod portable;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;
#[cfg(target_arch = "x86_64")]
mod x86_avx512;

use std::ops::Range;
use std::sync::OnceLock;

use candle_core::quantized::GgmlDType;
use rayon::prelude::*;

use crate::error::{Error, Result};
use formats::{DecodedBlock, GroupLayout, GROUP};

/// The GGML weight types the kernels read natively.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightType {
    /// 4-bit, blocks of 32, `d * (q - 8)`.
    Q4_0,
    /// 4-bit, blocks of 32, `d * q + m`.
    Q4_1,
    /// 5-bit, blocks of 32, `d * (q - 16)`.
    Q5_0,
    /// 5-bit, blocks of 32, `d * q + m`.
    Q5_1,
    /// 8-bit, blocks of 32, `d * q`.
    Q8_0,
    /// 4-bit k-quant: super-blocks of 256 with 8 six-bit scales and mins.
    Q4K,
    /// 5-bit k-quant: like Q4_K with a fifth bit.
    Q5K,
    /// 6-bit k-quant: super-blocks of 256 with 16 signed 8-bit scales.
    Q6K,
}

impl WeightType {
    /// All supported types.
    pub const ALL: [WeightType; 8] = [
        WeightType::Q4_0,
        WeightType::Q4_1,
        WeightType::Q5_0,
        WeightType::Q5_1,
        WeightType::Q8_0,
        WeightType::Q4K,
        WeightType::Q5K,
        WeightType::Q6K,
    ];

    /// The kernel type for a GGML type, if the kernels read it.
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q5_1 => Self::Q5_1,
            GgmlDType::Q8_0 => Self::Q8_0,
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q5K => Self::Q5K,
            GgmlDType::Q6K => Self::Q6K,
            _ => return None,
        })
    }

    /// The GGML type.
    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    /// Weights per block.
    pub fn block_len(self) -> usize {
        match self {
            Self::Q4K | Self::Q5K | Self::Q6K => 256,
            _ => 32,
        }
    }

    /// Bytes of one GGML block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// Bits above the low nibble, stored apart from it.
    pub(crate) fn high_bits(self) -> usize {
        match self {
            Self::Q5_0 | Self::Q5_1 | Self::Q5K => 1,
            Self::Q6K => 2,
            _ => 0,
        }
    }

    /// The activation block: one int8 scale per this many values.
    fn activation_block(self) -> usize {
        self.block_len()
    }
}

/// A code path of the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelPath {
    /// AVX-512 (F, BW, VL) with VNNI and F16C: 16 outputs per instruction.
    Avx512Vnni,
    /// AVX2 with F16C: two 8-lane halves per group.
    Avx2,
    /// Plain Rust, any CPU.
    Portable,
}

/// Environment variable that forces a code path: `avx512`, `avx2` or `portable`.
pub const KERNEL_PATH_ENV: &str = "MIRROR_SD_KERNEL";

impl KernelPath {
    /// The best path this CPU supports.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if Self::Avx512Vnni.is_supported() {
                return Self::Avx512Vnni;
            }
            if Self::Avx2.is_supported() {
                return Self::Avx2;
            }
        }
        Self::Portable
    }

    /// Whether this CPU can run the path.
    pub fn is_supported(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Vnni => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Parses `avx512`, `avx2` or `portable`.
    pub fn parse(name: &str) -> Result<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "avx512" | "avx512vnni" | "avx512-vnni" => Ok(Self::Avx512Vnni),
            "avx2" => Ok(Self::Avx2),
            "portable" | "scalar" => Ok(Self::Portable),
            other => Err(Error::invalid(format!(
                "unknown kernel path `{other}` (expected avx512, avx2 or portable)"
            ))),
        }
    }

    /// The path every matmul uses: [`KERNEL_PATH_ENV`] when set (and supported), else
    /// [`KernelPath::detect`]. Read once per process.
    pub fn selected() -> Self {
        static SELECTED: OnceLock<KernelPath> = OnceLock::new();
        *SELECTED.get_or_init(|| match std::env::var(KERNEL_PATH_ENV) {
            Ok(name) if !name.trim().is_empty() => match Self::parse(&name) {
                Ok(path) if path.is_supported() => path,
                Ok(path) => {
                    eprintln!(
                        "[mirror-sd] {KERNEL_PATH_ENV}={name}: {path:?} is not supported by this CPU; using {:?}",
                        Self::detect()
                    );
                    Self::detect()
                }
                Err(e) => {
                    eprintln!("[mirror-sd] {e}; using {:?}", Self::detect());
                    Self::detect()
                }
            },
            _ => Self::detect(),
        })
    }

    /// A short name (`avx512`, `avx2`, `portable`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Avx512Vnni => "avx512",
            Self::Avx2 => "avx2",
            Self::Portable => "portable",
        }
    }
}

/// 64-byte aligned bytes.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

#[derive(Clone)]
struct AlignedBytes {
    lines: Vec<Line>,
}

impl AlignedBytes {
    fn zeroed(len: usize) -> Self {
        Self {
            lines: vec![Line([0; 64]); len.div_ceil(64)],
        }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `Line` is 64 plain bytes with no padding, so the lines are contiguous bytes.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.lines.len() * 64) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and the borrow is unique.
        unsafe {
            std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.lines.len() * 64)
        }
    }
}

/// A weight matrix `(rows, cols)` (output features by input features) in a GGML type,
/// repacked for the kernels. Immutable and shareable across threads.
#[derive(Clone)]
pub struct PackedMatrix {
    ty: WeightType,
    rows: usize,
    cols: usize,
    layout: GroupLayout,
    groups: usize,
    data: AlignedBytes,
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
        let mut data = AlignedBytes::zeroed(groups * layout.stride);
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
        self.data.lines.len() * 64
    }

    fn group(&self, g: usize) -> &[u8] {
        &self.data.as_slice()[g * self.layout.stride..(g + 1) * self.layout.stride]
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

    /// `x (m, cols) -> x W^T (m, rows)`, `x` row-major; see [`matmul`].
    pub fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; m * self.rows];
        matmul(KernelPath::selected(), &[self], x, m, &mut out)?;
        Ok(out)
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

/// Activations quantized to int8 with one f32 scale per `block` values (Q8_0 / Q8_K style).
pub(crate) struct Activations {
    pub rows: usize,
    pub k: usize,
    pub block: usize,
    /// `rows * k` quants.
    pub q: Vec<i8>,
    /// `rows * k / block` scales.
    pub scales: Vec<f32>,
    /// Sums of every 16 quants, `rows * k / 16`.
    pub sums16: Vec<i32>,
    /// Sums of every 32 quants, `rows * k / 32`.
    pub sums32: Vec<i32>,
    /// Pairs of `sums16` packed as two i16 in one i32 (low half first), `rows * k / 32`: one
    /// broadcast operand of `vpdpwssd`. The sums fit: at most 16 * 127.
    pub pairs16: Vec<i32>,
    /// Pairs of `sums32` packed the same way, `rows * k / 64` (at most 32 * 127 each).
    pub pairs32: Vec<i32>,
}

/// Two i16 in one i32, `low` in the low half.
fn pack_pair(low: i32, high: i32) -> i32 {
    (low as i16 as u16 as u32 | (high as i16 as u16 as u32) << 16) as i32
}

/// Round to nearest, ties to even, for |v| < 2^22 (llama.cpp's `nearest_int`): plain f32
/// additions, so every path and every compiler target rounds alike.
#[inline(always)]
fn nearest_int(v: f32) -> i32 {
    let t = v + 12_582_912.0;
    (t.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

impl Activations {
    /// Quantizes `rows` rows of `k` values. The arithmetic is the same on every path (exact
    /// maxima, one IEEE multiply and the rounding trick per value); only the vector width of
    /// the compiled loop differs.
    pub(crate) fn quantize(
        path: KernelPath,
        x: &[f32],
        rows: usize,
        k: usize,
        block: usize,
    ) -> Self {
        debug_assert_eq!(x.len(), rows * k);
        debug_assert_eq!(k % block, 0);
        let mut acts = Self {
            rows,
            k,
            block,
            q: vec![0i8; rows * k],
            scales: vec![0f32; rows * k / block],
            sums16: vec![0i32; rows * k / 16],
            sums32: vec![0i32; rows * k / 32],
            pairs16: vec![0i32; rows * k / 32],
            pairs32: vec![0i32; rows * k / 64],
        };
        match path {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `matmul` checked that the CPU supports the path.
            KernelPath::Avx512Vnni => unsafe { quantize_avx512(x, &mut acts) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            KernelPath::Avx2 => unsafe { quantize_avx2(x, &mut acts) },
            _ => quantize_rows(x, &mut acts),
        }
        acts
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_avx512(x: &[f32], acts: &mut Activations) {
    quantize_rows(x, acts)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_avx2(x: &[f32], acts: &mut Activations) {
    quantize_rows(x, acts)
}

/// The body of [`Activations::quantize`], written in 16-lane chunks so that it vectorizes at
/// whatever width the caller is compiled for.
#[inline(always)]
fn quantize_rows(x: &[f32], acts: &mut Activations) {
    let block = acts.block;
    for ((src, dst), scale) in x
        .chunks_exact(block)
        .zip(acts.q.chunks_exact_mut(block))
        .zip(acts.scales.iter_mut())
    {
        let mut lanes = [0f32; 16];
        let mut non_finite = [false; 16];
        for chunk in src.chunks_exact(16) {
            for i in 0..16 {
                let magnitude = chunk[i].abs();
                non_finite[i] |= magnitude.is_nan() || magnitude == f32::INFINITY;
                lanes[i] = if magnitude > lanes[i] {
                    magnitude
                } else {
                    lanes[i]
                };
            }
        }
        if non_finite.iter().any(|&b| b) {
            // Poison the block's outputs instead of hiding a non-finite activation.
            *scale = f32::NAN;
            dst.fill(0);
            continue;
        }
        let amax = lanes.iter().fold(0f32, |m, &v| if v > m { v } else { m });
        *scale = amax / 127.0;
        let inverse = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = nearest_int(v * inverse).clamp(-127, 127) as i8;
        }
    }
    for (q, sum) in acts.q.chunks_exact(16).zip(acts.sums16.iter_mut()) {
        let mut total = 0i32;
        for &v in q {
            total += v as i32;
        }
        *sum = total;
    }
    for (pair, sum) in acts.sums16.chunks_exact(2).zip(acts.sums32.iter_mut()) {
        *sum = pair[0] + pair[1];
    }
    // The pairs serve the k-quants (rows of whole 256-blocks, so pairs never straddle rows).
    if acts.block == 256 {
        for (pair, packed) in acts.sums16.chunks_exact(2).zip(acts.pairs16.iter_mut()) {
            *packed = pack_pair(pair[0], pair[1]);
        }
        for (pair, packed) in acts.sums32.chunks_exact(2).zip(acts.pairs32.iter_mut()) {
            *packed = pack_pair(pair[0], pair[1]);
        }
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
    fn at(self, offset: usize) -> Self {
        Self { offset, ..self }
    }
}

// SAFETY: work items write disjoint column ranges of the output, see `matmul`.
unsafe impl Send for Output {}
unsafe impl Sync for Output {}

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
    let k = first.cols;
    if matrices.iter().any(|w| w.cols != k) {
        return Err(Error::invalid(
            "matrices of one matmul call must share their input width",
        ));
    }
    let width: usize = matrices.iter().map(|w| w.rows).sum();
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
    let needs = |block: usize| matrices.iter().any(|w| w.ty.activation_block() == block);
    let acts32 = needs(32).then(|| Activations::quantize(path, x, m, k, 32));
    let acts256 = needs(256).then(|| Activations::quantize(path, x, m, k, 256));

    // Work items: ranges of column groups of one matrix. About four per thread balances the
    // load without paying much per item.
    let threads = rayon::current_num_threads().max(1);
    let total_groups: usize = matrices.iter().map(|w| w.groups).sum();
    let per_item = total_groups.div_ceil(threads * 4).max(1);
    let mut items = Vec::new();
    let mut offset = 0;
    for (index, w) in matrices.iter().enumerate() {
        let mut g = 0;
        while g < w.groups {
            let end = (g + per_item).min(w.groups);
            items.push((index, g..end, offset));
            g = end;
        }
        offset += w.rows;
    }
    let base = Output {
        ptr: out.as_mut_ptr(),
        ld: width,
        offset: 0,
    };
    let run = |&(index, ref groups, offset): &(usize, Range<usize>, usize)| {
        let w = matrices[index];
        let acts = match w.ty.activation_block() {
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
        items.par_iter().for_each(run);
    }
    Ok(())
}

/// # Safety
/// `path` must be supported by the CPU and `out` must be valid for the item's writes.
unsafe fn run_groups(
    path: KernelPath,
    w: &PackedMatrix,
    acts: &Activations,
    groups: Range<usize>,
    out: Output,
) {
    let weights = Weights {
        ty: w.ty,
        rows: w.rows,
        layout: w.layout,
        data: w.data.as_slice(),
    };
    match path {
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx512Vnni => x86_avx512::matmul_groups(&weights, acts, groups, out),
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 => x86_avx2::matmul_groups(&weights, acts, groups, out),
        _ => portable::matmul_groups(&weights, acts, groups, out),
    }
}

/// What a kernel reads of a packed matrix.
pub(crate) struct Weights<'a> {
    pub ty: WeightType,
    pub rows: usize,
    pub layout: GroupLayout,
    pub data: &'a [u8],
}

impl Weights<'_> {
    pub(crate) fn group(&self, g: usize) -> &[u8] {
        &self.data[g * self.layout.stride..(g + 1) * self.layout.stride]
    }

    /// Valid output columns of group `g` (16 except in a tail group).
    pub(crate) fn lanes(&self, g: usize) -> usize {
        (self.rows - g * GROUP).min(GROUP)
    }
}

/// Largest number of activation rows one call takes.
pub const MAX_ROWS: usize = 64;

#[cfg(test)]
mod tests;
