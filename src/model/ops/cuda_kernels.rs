//! What the NVRTC kernel modules (`batch_norm_cuda`, `elementwise_cuda`) share: the source prelude, PTX compiled
//! once per process, functions loaded per device, launch errors and contiguous operand views.

use std::sync::OnceLock;

use candle_core::cuda_backend::CudaDevice;
use candle_core::{Layout, Result};
use cudarc::driver::{CudaFunction, CudaSlice, CudaView};

/// The definitions every module's source starts with: 64-bit indices, bf16 as its raw bits, and `ld` / `st` that
/// read and write f32 or bf16 elements as f32 (to bf16 rounding to nearest even; a NaN stays a quiet NaN). A macro,
/// so that `concat!` joins it to a module's source literal at compile time.
macro_rules! kernel_prelude {
    () => {
        r#"
typedef unsigned long long u64;
typedef unsigned short bf16_t;

__device__ __forceinline__ float ld(const float* p, u64 i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16_t* p, u64 i) { return __uint_as_float(((unsigned int)p[i]) << 16); }
__device__ __forceinline__ void st(float* p, u64 i, float v) { p[i] = v; }
// f32 -> bf16, round to nearest even; NaN stays a (quiet) NaN.
__device__ __forceinline__ void st(bf16_t* p, u64 i, float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) { p[i] = (bf16_t)((u >> 16) | 0x40u); return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    p[i] = (bf16_t)(u >> 16);
}
"#
    };
}
pub(crate) use kernel_prelude;

/// One module of NVRTC kernels. NVRTC needs no GPU: the PTX is compiled once per process, and the driver compiles
/// it for the device when the module loads on it (Candle caches the loaded module per device, by `name`).
pub(crate) struct KernelModule {
    /// The module's name in Candle's per-device cache.
    name: &'static str,
    /// What the errors call it.
    what: &'static str,
    source: &'static str,
    ptx: OnceLock<std::result::Result<String, String>>,
}

impl KernelModule {
    pub(crate) const fn new(name: &'static str, what: &'static str, source: &'static str) -> Self {
        Self {
            name,
            what,
            source,
            ptx: OnceLock::new(),
        }
    }

    /// The module's PTX, compiled on the first call.
    pub(crate) fn ptx(&self) -> Result<&str> {
        self.ptx
            .get_or_init(|| {
                cudarc::nvrtc::compile_ptx(self.source)
                    .map(|p| p.to_src())
                    .map_err(|e| format!("{e:?}"))
            })
            .as_ref()
            .map(String::as_str)
            .map_err(|e| {
                candle_core::Error::Cuda(
                    format!(
                        "{}: NVRTC could not compile the kernels (is libnvrtc on LD_LIBRARY_PATH?): {e}",
                        self.what
                    )
                    .into(),
                )
            })
    }

    /// Kernel `kernel` of the module, the module loaded on `dev` the first time.
    pub(crate) fn func(&self, dev: &CudaDevice, kernel: &str) -> Result<CudaFunction> {
        Ok(dev
            .get_or_load_custom_func(kernel, self.name, self.ptx()?)?
            .into_cuda_function())
    }

    pub(crate) fn launch_err(&self, kernel: &str, e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Cuda(format!("{}: launching {kernel}: {e:?}", self.what).into())
    }
}

/// The elements of `s` that the contiguous layout `l` covers (its start offset taken off); `op` and `what` name
/// the operand in the error.
pub(crate) fn contiguous_view<'a, T>(s: &'a CudaSlice<T>, l: &Layout, op: &str, what: &str) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(s.slice(start..end)),
        None => candle_core::bail!(
            "{op}: the {what} must be contiguous, got {:?} with strides {:?}",
            l.shape(),
            l.stride()
        ),
    }
}

/// [`contiguous_view`] of exactly `len` elements.
pub(crate) fn sized_view<'a, T>(
    s: &'a CudaSlice<T>,
    l: &Layout,
    len: usize,
    op: &str,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let view = contiguous_view(s, l, op, what)?;
    if view.len() != len {
        candle_core::bail!("{op}: the {what} has {} elements, expected {len}", view.len())
    }
    Ok(view)
}
