//! Numeric precision of training and inference: one setting (`precision` hyperparameter, `--precision` /
//! `SEMSEG_PRECISION` for `serve` and `predict`) that the ops read, so callers never branch on it.
//!
//! - `auto` (default): TF32 for convolutions and matmuls on GPUs that have it (as PyTorch's cuDNN does by default),
//!   strict fp32 everywhere else;
//! - `fp32`: strict IEEE fp32 everywhere (no TF32);
//! - `bf16`: mixed precision. On the GPU: weights, BatchNorm statistics and the loss stay f32; activations and the
//!   inputs of convolutions and matmuls are bf16 (accumulated in f32). On a CPU with AVX512-BF16: the
//!   convolutions' products take bf16-rounded inputs (f32 sums), everything else stays f32; on other CPUs, fp32.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device};

/// The user's choice, before it meets a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Auto,
    Fp32,
    Bf16,
}

impl Precision {
    pub const CHOICES: &'static str = "auto, fp32, bf16";

    pub fn is_auto(&self) -> bool {
        *self == Self::Auto
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "fp32" | "float32" | "f32" => Ok(Self::Fp32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(format!(
                "unknown precision {other:?}; expected one of {}",
                Self::CHOICES
            )),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Fp32 => "fp32",
            Self::Bf16 => "bf16",
        })
    }
}

/// What a [`Precision`] means on one device: the activation dtype and whether f32 products may use TF32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MathMode {
    /// dtype of activations and of the inputs to convolutions and matmuls (weights are cast to it per op).
    pub compute_dtype: DType,
    /// f32 convolutions and matmuls may round their inputs to TF32 (GPU only).
    pub tf32: bool,
    /// The CPU convolutions' products round their inputs to bf16 and sum in f32 (AVX512-BF16); activations,
    /// weights and everything outside the products stay f32.
    pub bf16_products: bool,
}

impl MathMode {
    pub const STRICT_F32: Self = Self {
        compute_dtype: DType::F32,
        tf32: false,
        bf16_products: false,
    };
    /// f32 on the GPU with TF32 products.
    pub const TF32: Self = Self {
        compute_dtype: DType::F32,
        tf32: true,
        bf16_products: false,
    };
    /// `precision=bf16` on a CPU with AVX512-BF16.
    pub const CPU_BF16: Self = Self {
        compute_dtype: DType::F32,
        tf32: false,
        bf16_products: true,
    };
}

/// Resolves `precision` on `device`; the second value is a line for the log when the choice falls back.
pub fn resolve(precision: Precision, device: &Device) -> (MathMode, Option<String>) {
    match (precision, device.is_cuda()) {
        (Precision::Auto, true) => (MathMode::TF32, None),
        (Precision::Auto | Precision::Fp32, _) => (MathMode::STRICT_F32, None),
        (Precision::Bf16, true) if !bf16_kernels_built() => (
            MathMode::TF32,
            Some(format!(
                "precision=bf16 needs CUDA kernels built for compute capability 80 or more; this binary was built for \
                 {} (CUDA_COMPUTE_CAP): running TF32 instead",
                BUILT_COMPUTE_CAP.unwrap_or("?")
            )),
        ),
        (Precision::Bf16, true) => (
            MathMode {
                compute_dtype: DType::BF16,
                tf32: false,
                bf16_products: false,
            },
            None,
        ),
        // On the CPU only the convolutions' products change precision: they are nearly all of the time, and the
        // f32 activations keep every other op exact.
        (Precision::Bf16, false) if crate::model::ops::gemm_bf16::available() => (MathMode::CPU_BF16, None),
        (Precision::Bf16, false) => (
            MathMode::STRICT_F32,
            Some("precision=bf16 needs AVX512-BF16 on the CPU, which this one lacks: running in fp32".into()),
        ),
    }
}

/// The `CUDA_COMPUTE_CAP` this binary was built with, as `build.rs` recorded it (absent from a build without it).
const BUILT_COMPUTE_CAP: Option<&str> = option_env!("SEMSEG_CUDA_COMPUTE_CAP");

/// Whether Candle's bf16 CUDA kernels exist in this binary (they are compiled only for compute capability ≥ 80). An
/// unknown capability (a build that did not record it) is taken as new enough.
fn bf16_kernels_built() -> bool {
    BUILT_COMPUTE_CAP
        .and_then(|cap| cap.parse::<u32>().ok())
        .is_none_or(|cap| cap >= 80)
}

static ALLOW_TF32: AtomicBool = AtomicBool::new(false);
static BF16_PRODUCTS: AtomicBool = AtomicBool::new(false);

/// Installs `mode` for this process: the flag the GPU convolution reads and Candle's cuBLAS f32 setting.
/// Called once at start-up by `train`, `serve`, `predict` and `demo`, after the device is chosen.
pub fn install(mode: MathMode) {
    ALLOW_TF32.store(mode.tf32, Ordering::Relaxed);
    BF16_PRODUCTS.store(mode.bf16_products, Ordering::Relaxed);
    #[cfg(feature = "cuda")]
    candle_core::cuda_backend::set_gemm_reduced_precision_f32(mode.tf32);
}

/// Whether f32 convolutions and matmuls on the GPU may use TF32 (see [`install`]).
pub fn tf32_allowed() -> bool {
    ALLOW_TF32.load(Ordering::Relaxed)
}

/// Whether the CPU convolutions' products run in bf16 (see [`install`]).
pub fn bf16_products() -> bool {
    BF16_PRODUCTS.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling_and_names_the_choices_on_error() {
        assert_eq!("AUTO".parse::<Precision>(), Ok(Precision::Auto));
        assert_eq!(" fp32".parse::<Precision>(), Ok(Precision::Fp32));
        assert_eq!("bfloat16".parse::<Precision>(), Ok(Precision::Bf16));
        let err = "fp16".parse::<Precision>().unwrap_err();
        assert!(err.contains("fp16") && err.contains("auto, fp32, bf16"), "{err}");
    }

    #[test]
    fn the_cpu_is_strict_fp32_unless_bf16_is_asked_for_and_the_cpu_has_it() {
        assert_eq!(resolve(Precision::Auto, &Device::Cpu), (MathMode::STRICT_F32, None));
        assert_eq!(resolve(Precision::Fp32, &Device::Cpu), (MathMode::STRICT_F32, None));
        let (mode, note) = resolve(Precision::Bf16, &Device::Cpu);
        if crate::model::ops::gemm_bf16::available() {
            assert_eq!((mode, note), (MathMode::CPU_BF16, None));
        } else {
            assert_eq!(mode, MathMode::STRICT_F32);
            let note = note.expect("a fallback is logged");
            assert!(note.contains("AVX512-BF16") && note.contains("fp32"), "{note}");
        }
    }
}
