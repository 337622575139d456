//! Quantized matrix multiplication on the CPU for a few activation rows: `y = x W^T` with `W`
//! in a GGML type as stored and `x` of 1 to 64 rows (one decoded token, a verification window,
//! a hypothesis-tree pass). Bottom up: `types` (weight types, code paths), `formats` (GGML
//! blocks and the packed layout), `operands` (what a kernel reads and writes), `memory` (the
//! memory a matrix lives in: huge pages where the system has them), `packing`
//! ([`PackedMatrix`]), `activations` (input quantization), the code paths `portable`, `x86_avx2`
//! and `x86_avx512`, and `dispatch` ([`matmul`]) on top; each imports only modules
//! below it, and nothing here imports the rest of the crate but its error type.
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

mod activations;
mod dispatch;
mod formats;
mod memory;
mod operands;
mod packing;
mod portable;
mod types;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;
#[cfg(target_arch = "x86_64")]
mod x86_avx512;

pub use dispatch::{matmul, MAX_ROWS};
pub use memory::{WeightBytes, HUGE_PAGES_ENV};
pub use packing::PackedMatrix;
pub(crate) use types::switched_off;
pub use types::{KernelPath, WeightType, KERNEL_PATH_ENV};

#[cfg(test)]
mod tests;
