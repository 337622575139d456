//! Element-wise CPU kernels in f32 for the decoder's hot path: dot products, `exp`, the
//! SwiGLU gate. Loops are written over 16-lane chunks so that they vectorize at whatever width
//! the CPU has (AVX-512, AVX2, or SSE2/NEON) and give the same bits at every width: there are
//! no fused multiply-adds and every reduction runs in a fixed order. They also keep the decode
//! path off candle's process-wide element-wise thread pool, so two models running side by side
//! (Mirror's target and draft) never wait on each other there.

use candle_core::{CpuStorage, Layout, Shape, Storage, Tensor};

use crate::error::Result;

/// Checks that a tensor is f32 on the CPU and returns its storage guard and layout, for
/// kernels that read tensors in place.
pub(crate) fn cpu_f32(tensor: &Tensor) -> Option<(candle_core::StorageRef<'_>, &Layout)> {
    let (storage, layout) = tensor.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(_)) => Some((storage, layout)),
        _ => None,
    }
}

/// The f32 values of a CPU storage.
pub(crate) fn slice(storage: &Storage) -> Option<&[f32]> {
    match storage {
        Storage::Cpu(cpu) => cpu.as_slice::<f32>().ok(),
        _ => None,
    }
}

/// `sum a[i] * b[i]`: 16 partial sums, then added in lane order. Inline it into a caller
/// compiled for wide vectors (see `attention.rs`).
#[inline(always)]
pub(crate) fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut lanes = [0f32; 16];
    let whole = n / 16 * 16;
    for (x, y) in a[..whole].chunks_exact(16).zip(b[..whole].chunks_exact(16)) {
        for i in 0..16 {
            lanes[i] += x[i] * y[i];
        }
    }
    let mut sum = 0f32;
    for lane in lanes {
        sum += lane;
    }
    for i in whole..n {
        sum += a[i] * b[i];
    }
    sum
}

/// `e^x` for `x <= 88` within about 2 ulp: `x = n ln2 + r` with `|r| <= ln2 / 2`, a degree-6
/// Taylor polynomial for `e^r`, and `2^n` built in the exponent bits. Plain f32 operations,
/// so it vectorizes and gives the same bits at every width.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = if x < -87.0 { -87.0 } else { x };
    // Round to nearest with the 1.5 * 2^23 trick (no float-to-int conversion).
    let shifted = x * LOG2E + 12_582_912.0;
    let n = shifted - 12_582_912.0;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    let exponent = (shifted.to_bits() as i32 - 0x4b40_0000 + 127) as u32;
    p * f32::from_bits(exponent << 23)
}

/// `silu(gate) * up` where `joint (..., 2 * width)` holds gate then up in its last dimension
/// (the packed gate/up projection's output). `None` when `joint` is not f32 on the CPU.
pub(crate) fn swiglu(joint: &Tensor, width: usize) -> Result<Option<Tensor>> {
    let joint = joint.contiguous()?;
    let Some((storage, layout)) = cpu_f32(&joint) else {
        return Ok(None);
    };
    let Some(data) = slice(&storage) else {
        return Ok(None);
    };
    let dims = layout.dims();
    let rows = layout.shape().elem_count() / (2 * width);
    let data = &data[layout.start_offset()..layout.start_offset() + rows * 2 * width];
    let mut out = vec![0f32; rows * width];
    for (src, dst) in data
        .chunks_exact(2 * width)
        .zip(out.chunks_exact_mut(width))
    {
        let (gate, up) = src.split_at(width);
        silu_mul(gate, up, dst);
    }
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = width;
    }
    Ok(Some(Tensor::from_vec(
        out,
        Shape::from(out_dims),
        &candle_core::Device::Cpu,
    )?))
}

/// `out[i] = gate[i] / (1 + e^-gate[i]) * up[i]`.
fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected.
            return unsafe { silu_mul_avx512(gate, up, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the feature was detected.
            return unsafe { silu_mul_avx2(gate, up, out) };
        }
    }
    silu_mul_body(gate, up, out)
}

/// [`silu_mul_body`] compiled for AVX-512.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn silu_mul_avx512(gate: &[f32], up: &[f32], out: &mut [f32]) {
    silu_mul_body(gate, up, out)
}

/// [`silu_mul_body`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn silu_mul_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    silu_mul_body(gate, up, out)
}

#[inline(always)]
fn silu_mul_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        let negated = -g;
        let clamped = if negated > 88.0 { 88.0 } else { negated };
        *o = g / (1.0 + exp(clamped)) * u;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_is_within_a_few_ulp_of_the_standard_library() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let ours = super::exp(x) as f64;
            let exact = (x as f64).exp();
            worst = worst.max(((ours - exact) / exact).abs());
            x += 0.0137;
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert_eq!(super::exp(0.0), 1.0);
        assert_eq!(super::exp(-200.0), super::exp(-87.0));
    }

    #[test]
    fn silu_gate_matches_an_f64_reference() {
        let gate: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) * 0.37).collect();
        let up: Vec<f32> = (0..100).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut out = vec![0f32; 100];
        super::silu_mul(&gate, &up, &mut out);
        for i in 0..100 {
            let g = gate[i] as f64;
            let exact = g / (1.0 + (-g).exp()) * up[i] as f64;
            assert!(
                (out[i] as f64 - exact).abs() <= 1e-6 * exact.abs().max(1.0),
                "{i}"
            );
        }
        // Far out on both sides: finite, and the limits of silu.
        let mut out = [0f32; 2];
        super::silu_mul(&[-1000.0, 1000.0], &[1.0, 1.0], &mut out);
        assert!(
            out[0] <= 0.0 && out[0] > -1e-30 && out[1] == 1000.0,
            "{out:?}"
        );
    }

    #[test]
    fn dot_matches_an_f64_sum() {
        for n in [1usize, 15, 16, 17, 64, 100, 128] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!(
                (super::dot_lanes(&a, &b) as f64 - exact).abs() < 1e-5,
                "n = {n}"
            );
        }
    }
}
