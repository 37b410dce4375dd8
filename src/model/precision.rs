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
    resolve_with(precision, device.is_cuda(), || gpu_bf16_kernels(device))
}

/// [`resolve`], with the check of the GPU's bf16 kernels passed in (asked only for `precision=bf16` on a GPU).
fn resolve_with(
    precision: Precision,
    is_cuda: bool,
    gpu_bf16_kernels: impl FnOnce() -> Result<(), String>,
) -> (MathMode, Option<String>) {
    match (precision, is_cuda) {
        (Precision::Auto, true) => (MathMode::TF32, None),
        (Precision::Auto | Precision::Fp32, _) => (MathMode::STRICT_F32, None),
        (Precision::Bf16, true) => match gpu_bf16_kernels() {
            Ok(()) => (
                MathMode {
                    compute_dtype: DType::BF16,
                    tf32: false,
                    bf16_products: false,
                },
                None,
            ),
            Err(why) => (
                MathMode::TF32,
                Some(format!("precision=bf16 cannot run here: {why}; running TF32 instead")),
            ),
        },
        // On the CPU only the convolutions' products change precision: they are nearly all of the time, and the
        // f32 activations keep every other op exact.
        (Precision::Bf16, false) if crate::model::ops::gemm_bf16::available() => (MathMode::CPU_BF16, None),
        (Precision::Bf16, false) => (
            MathMode::STRICT_F32,
            Some("precision=bf16 needs AVX512-BF16 on the CPU, which this one lacks: running in fp32".into()),
        ),
    }
}

/// What this binary's Candle kernels were compiled for, as `build.rs` recorded it: `CUDA_COMPUTE_CAP` (their PTX)
/// and `CUDA_SASS_ARCHS` (their machine code; unset means the compute capability alone).
#[cfg(feature = "cuda")]
fn kernels_built_for() -> String {
    let cap = option_env!("SEMSEG_CUDA_COMPUTE_CAP")
        .filter(|c| !c.is_empty())
        .unwrap_or("?");
    let sass = option_env!("SEMSEG_CUDA_SASS_ARCHS")
        .filter(|s| !s.is_empty())
        .unwrap_or(cap);
    format!("CUDA_COMPUTE_CAP={cap}, machine code for {sass}")
}

/// Kernels of each Candle module a bf16 step uses, which exist only in code compiled for compute capability 8.0
/// or later (`#if __CUDA_ARCH__ >= 800` in candle-kernels).
#[cfg(feature = "cuda")]
const BF16_PROBES: [(&str, &candle_core::cuda_backend::kernels::Module, &str); 6] = {
    use candle_core::cuda_backend::kernels;
    [
        ("cast", &kernels::CAST, "cast_bf16_bf16"),
        ("binary", &kernels::BINARY, "bmul_bf16"),
        ("affine", &kernels::AFFINE, "affine_bf16"),
        ("fill", &kernels::FILL, "fill_bf16"),
        ("reduce", &kernels::REDUCE, "fast_sum_small_bf16"),
        ("unary", &kernels::UNARY, "ucopy_bf16"),
    ]
};

/// Whether the GPU behind `device` can run a bf16 step: compute capability 8.0 or later (bf16 tensor cores, which
/// cuDNN's bf16 convolutions need), and Candle's bf16 kernels in the modules the driver loaded for it. Those come
/// from machine code or PTX built for 8.0 or later: a binary whose `CUDA_COMPUTE_CAP` is older (70 in
/// Dockerfile.train, for the V100) has them for the capabilities of 8.0 or later in its `CUDA_SASS_ARCHS`, and for
/// other GPUs of 8.0 or later through a PTX for 8.0 (vendor/candle-kernels/PATCHED.md). Asking the loaded modules,
/// rather than trusting the build's settings, also catches a driver that fell back to the older PTX.
#[cfg(feature = "cuda")]
fn gpu_bf16_kernels(device: &Device) -> Result<(), String> {
    let Device::Cuda(cuda) = device else {
        return Err("the device is not a GPU".into());
    };
    let (major, minor) = cuda
        .cuda_stream()
        .context()
        .compute_capability()
        .map_err(|e| format!("the GPU's compute capability cannot be read ({e})"))?;
    if major < 8 {
        return Err(format!(
            "the GPU's compute capability is {major}.{minor}, and bf16 needs 8.0 or later (A100, A10G, L4, H100)"
        ));
    }
    for (module_name, module, function) in BF16_PROBES {
        let found = cuda
            .load_kernel_module(module)
            .map_err(|e| e.to_string())
            .and_then(|loaded| loaded.load_function(function).map(drop).map_err(|e| e.to_string()));
        if let Err(e) = found {
            return Err(format!(
                "Candle's bf16 kernels are missing for this GPU (compute capability {major}.{minor}; {function} in its \
                 {module_name} module: {e}); this binary's kernels were built with {}: rebuild with \
                 CUDA_COMPUTE_CAP={major}{minor} or list {major}{minor} in CUDA_SASS_ARCHS",
                kernels_built_for()
            ));
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn gpu_bf16_kernels(_device: &Device) -> Result<(), String> {
    Err("this binary was built without CUDA".into())
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
    fn bf16_on_a_gpu_runs_bf16_only_when_its_kernels_are_there_and_otherwise_tf32_saying_why() {
        let bf16 = MathMode {
            compute_dtype: DType::BF16,
            tf32: false,
            bf16_products: false,
        };
        assert_eq!(resolve_with(Precision::Bf16, true, || Ok(())), (bf16, None));
        let (mode, note) = resolve_with(Precision::Bf16, true, || {
            Err("the GPU's compute capability is 7.0, and bf16 needs 8.0 or later".into())
        });
        assert_eq!(mode, MathMode::TF32);
        let note = note.expect("the fallback is logged");
        assert!(
            note.contains("precision=bf16") && note.contains("compute capability is 7.0") && note.contains("TF32"),
            "{note}"
        );
    }

    #[test]
    fn only_bf16_on_a_gpu_asks_for_the_gpus_bf16_kernels() {
        for (precision, is_cuda) in [
            (Precision::Auto, true),
            (Precision::Fp32, true),
            (Precision::Auto, false),
            (Precision::Fp32, false),
            (Precision::Bf16, false),
        ] {
            let mut asked = false;
            let (mode, _) = resolve_with(precision, is_cuda, || {
                asked = true;
                Err("not asked".into())
            });
            assert!(!asked, "{precision:?} on cuda={is_cuda} asked for bf16 kernels");
            assert_ne!(mode.compute_dtype, DType::BF16);
        }
        assert_eq!(resolve_with(Precision::Auto, true, || Ok(())).0, MathMode::TF32);
    }

    /// The images of a CUDA fat binary as (kind: 1 PTX / 2 machine code, compute capability, bytes). Layout: a
    /// 16-byte header (magic 0xBA55ED50, u16 version, u16 header size, u64 size of what follows), then per image a
    /// header (u16 kind, u16, u32 header size, u64 size, ..., u32 capability at 28) and its bytes. PTX is
    /// compressed; machine code is the ELF file itself.
    #[cfg(feature = "cuda")]
    fn fat_binary_images(fatbin: &[u8]) -> Vec<(u16, u32, &[u8])> {
        let u16_at = |at: usize| u16::from_le_bytes([fatbin[at], fatbin[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes(fatbin[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(fatbin[at..at + 8].try_into().unwrap()) as usize;
        assert_eq!(u32_at(0), 0xBA55_ED50, "not a fat binary");
        let start = u16_at(6) as usize;
        let end = start + u64_at(8);
        let mut images = Vec::new();
        let mut at = start;
        while at < end {
            let (header, size) = (u32_at(at + 4) as usize, u64_at(at + 8));
            images.push((u16_at(at), u32_at(at + 28), &fatbin[at + header..at + header + size]));
            at += header + size;
        }
        images
    }

    /// What [`gpu_bf16_kernels`] relies on, read off the binary's own fat binaries, on a machine without a GPU:
    /// machine code for each capability of `CUDA_SASS_ARCHS` the build could assemble, with the bf16 kernels from
    /// 8.0 on and without them below, and, where `CUDA_COMPUTE_CAP` is below 8.0, a PTX for 8.0 beside the older PTX.
    #[cfg(feature = "cuda")]
    #[test]
    fn candle_kernels_have_bf16_machine_code_for_each_capability_from_80_the_build_names() {
        let number = |arch: &str| -> u32 {
            let digits: String = arch
                .trim_start_matches("sm_")
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits
                .parse()
                .unwrap_or_else(|_| panic!("{arch:?} is not a compute capability"))
        };
        // build.rs records both, empty where unset (CUDA_COMPUTE_CAP is then nvidia-smi's, unknown here).
        let cap = number(env!("SEMSEG_CUDA_COMPUTE_CAP"));
        let sass = Some(env!("SEMSEG_CUDA_SASS_ARCHS")).filter(|s| !s.trim().is_empty());
        let wanted: Vec<u32> = match sass {
            Some(list) if list.trim() == "none" => Vec::new(),
            Some(list) => list.split([' ', ',']).filter(|a| !a.is_empty()).map(number).collect(),
            None => vec![cap],
        };
        // Capabilities below CUDA_COMPUTE_CAP are left out (its PTX cannot be assembled for them).
        let assembled: Vec<u32> = wanted.iter().copied().filter(|&n| n >= cap).collect();
        for (module_name, module, function) in BF16_PROBES {
            let Some(fatbin) = module.fatbin() else {
                assert!(
                    assembled.is_empty(),
                    "{module_name}: no fat binary, though {assembled:?} were asked for"
                );
                continue;
            };
            let images = fat_binary_images(fatbin);
            let listed: Vec<(u16, u32)> = images.iter().map(|&(kind, arch, _)| (kind, arch)).collect();
            for &arch in &assembled {
                let (_, _, elf) = images
                    .iter()
                    .find(|&&(kind, a, _)| kind == 2 && a == arch)
                    .unwrap_or_else(|| panic!("{module_name}: no machine code for {arch} in {listed:?}"));
                assert!(elf.starts_with(b"\x7fELF"), "{module_name} {arch}: not an ELF image");
                let has_bf16 = elf.windows(function.len()).any(|w| w == function.as_bytes());
                assert_eq!(
                    has_bf16,
                    arch >= 80,
                    "{module_name} machine code for {arch}: {function} present = {has_bf16}"
                );
            }
            let ptx: Vec<u32> = listed.iter().filter(|&&(kind, _)| kind == 1).map(|&(_, a)| a).collect();
            assert!(ptx.contains(&cap), "{module_name}: no PTX for {cap} in {listed:?}");
            if cap < 80 && assembled.iter().any(|&n| n >= 80) {
                assert!(
                    ptx.contains(&80),
                    "{module_name}: no PTX for 80 beside the one for {cap} in {listed:?}"
                );
            }
        }
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
