//! The kernels' data types: the GGML weight types they read and their code paths.

use std::sync::OnceLock;

use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};

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
    pub(crate) fn activation_block(self) -> usize {
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

/// Whether environment variable `var` turns a default-on behaviour off: `off`, `0` or `false`
/// (surrounding blanks ignored). The one reading of mirror-sd's on/off switches
/// ([`HUGE_PAGES_ENV`](super::HUGE_PAGES_ENV), `threads::POLL_ENV`).
pub(crate) fn switched_off(var: &str) -> bool {
    matches!(
        std::env::var(var).as_deref().map(str::trim),
        Ok("off" | "0" | "false")
    )
}
