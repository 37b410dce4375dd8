//! Training-mode BatchNorm2d on CUDA as one fused op, with its own kernels (compiled once per process by NVRTC,
//! loaded per device through Candle's `get_or_load_custom_func`), the GPU twin of [`super::batch_norm`].
//!
//! The composed path (ten autograd nodes) keeps about ten full-size tensors per layer for backward; this op keeps
//! only its input x and its output y (which the next layer keeps anyway), plus three `[C]` f32 vectors: the batch
//! mean, the biased variance and 1/√(σ² + ε). ReLU (`relu`) is applied in the same pass and its backward reads the
//! output's sign, so it costs no tensor of its own.
//!
//! - x `[B, C, H, W]` f32 or bf16 (contiguous after `.contiguous()`), γ and β `[C]` f32; y has x's dtype;
//! - statistics: per channel, sums of (x − K) and (x − K)² in f64 (K: the channel's first element, which removes
//!   the cancellation of E[x²] − E[x]²), over a grid of (split, channel) blocks, then one thread per channel;
//! - forward `y = (x − μ)·(γ·s) + β` (then max(·, 0)), s = 1/√(σ² + ε), σ² biased, arithmetic in f32;
//! - backward, N = B·H·W, g = dy masked by y > 0 under ReLU: `∂β = Σ g`, `∂γ = s·Σ g·(x − μ)` (f64 sums),
//!   `∂x = k·g − k·s·∂γ/N·(x − μ) − k·∂β/N` with k = γ·s;
//! - the batch mean and biased variance come back as `[C]` f32 tensors on the device: no host synchronisation.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::op::BackpropOp;
use candle_core::{CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};

use super::cuda_kernels::{kernel_prelude, sized_view, KernelModule};

/// Threads per block of every kernel below (the block reduction assumes exactly this many).
const THREADS: u32 = 256;
/// Target number of (split, channel) blocks of the reductions: enough to fill an H100's 132 SMs several times.
const TARGET_BLOCKS: u32 = 2048;
/// CUDA's limit on gridDim.y.
const MAX_GRID_Y: u32 = 65535;

static KERNELS: KernelModule = KernelModule::new(
    "semseg_batch_norm",
    "batch norm",
    concat!(
        kernel_prelude!(),
        r#"
#define THREADS 256

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

// Sums a and b over the block (blockDim.x == THREADS); the totals are valid in thread 0 only.
__device__ __forceinline__ void block_sum2(double& a, double& b) {
    __shared__ double sa[THREADS / 32];
    __shared__ double sb[THREADS / 32];
    a = warp_sum(a);
    b = warp_sum(b);
    const unsigned int lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    if (lane == 0) { sa[warp] = a; sb[warp] = b; }
    __syncthreads();
    if (warp == 0) {
        a = lane < THREADS / 32 ? sa[lane] : 0.0;
        b = lane < THREADS / 32 ? sb[lane] : 0.0;
        a = warp_sum(a);
        b = warp_sum(b);
    }
}

// x [B, C, HW]; grid (S, C). part [C][2S + 1]: block s's sums of (x - K) and (x - K)^2 at 2s and 2s + 1, and
// K (the channel's first element) at 2S.
#define BN_STATS(NAME, T)                                                                                      \
extern "C" __global__ void NAME(const T* __restrict__ x, double* __restrict__ part, unsigned int B,           \
                                unsigned int C, unsigned int HW) {                                             \
    const unsigned int c = blockIdx.y, s = blockIdx.x, S = gridDim.x;                                          \
    const double K = (double)ld(x, (u64)c * HW);                                                               \
    double s1 = 0.0, s2 = 0.0;                                                                                 \
    for (unsigned int b = 0; b < B; ++b) {                                                                     \
        const u64 base = ((u64)b * C + c) * HW;                                                                \
        for (unsigned int p = s * THREADS + threadIdx.x; p < HW; p += S * THREADS) {                          \
            const double d = (double)ld(x, base + p) - K;                                                      \
            s1 += d;                                                                                           \
            s2 += d * d;                                                                                       \
        }                                                                                                      \
    }                                                                                                          \
    block_sum2(s1, s2);                                                                                        \
    if (threadIdx.x == 0) {                                                                                    \
        double* q = part + (u64)c * (2 * S + 1);                                                               \
        q[2 * s] = s1;                                                                                         \
        q[2 * s + 1] = s2;                                                                                     \
        if (s == 0) q[2 * S] = K;                                                                              \
    }                                                                                                          \
}

// One thread per channel: mean, biased variance, 1/sqrt(var + eps).
extern "C" __global__ void bn_stats_finalize(const double* __restrict__ part, unsigned int C, unsigned int S,
                                             double count, double eps, float* __restrict__ mean,
                                             float* __restrict__ var, float* __restrict__ invstd) {
    const unsigned int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const double* q = part + (u64)c * (2 * S + 1);
    double s1 = 0.0, s2 = 0.0;
    for (unsigned int s = 0; s < S; ++s) {
        s1 += q[2 * s];
        s2 += q[2 * s + 1];
    }
    const double d = s1 / count;
    double v = s2 / count - d * d;
    if (v < 0.0) v = 0.0;
    mean[c] = (float)(q[2 * S] + d);
    var[c] = (float)v;
    invstd[c] = (float)(1.0 / sqrt(v + eps));
}

// y = (x - mean)·(gamma·invstd) + beta (+ r when has_r), then max(y, 0) when relu. grid (X, min(planes, 65535)),
// planes = B·C.
#define BN_NORMALIZE(NAME, T)                                                                                  \
extern "C" __global__ void NAME(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ mean,     \
                                const float* __restrict__ invstd, const float* __restrict__ gamma,             \
                                const float* __restrict__ beta, unsigned int planes, unsigned int C,           \
                                unsigned int HW, int relu, const T* __restrict__ r, int has_r) {               \
    for (unsigned int plane = blockIdx.y; plane < planes; plane += gridDim.y) {                               \
        const unsigned int c = plane % C;                                                                      \
        const float m = mean[c], k = gamma[c] * invstd[c], sh = beta[c];                                       \
        const u64 base = (u64)plane * HW;                                                                      \
        for (unsigned int p = blockIdx.x * THREADS + threadIdx.x; p < HW; p += gridDim.x * THREADS) {         \
            float v = (ld(x, base + p) - m) * k + sh;                                                          \
            if (has_r) v += ld(r, base + p);                                                                   \
            if (relu) v = fmaxf(v, 0.0f);                                                                      \
            st(y, base + p, v);                                                                                \
        }                                                                                                      \
    }                                                                                                          \
}

// g = dy, zero where y <= 0 under relu. grid (S, C). part [C][S][2]: sums of g and g·(x - mean).
#define BN_BACKWARD_SUMS(NAME, T)                                                                              \
extern "C" __global__ void NAME(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y,    \
                                const float* __restrict__ mean, double* __restrict__ part, unsigned int B,    \
                                unsigned int C, unsigned int HW, int relu) {                                   \
    const unsigned int c = blockIdx.y, s = blockIdx.x, S = gridDim.x;                                          \
    const double m = (double)mean[c];                                                                          \
    double s1 = 0.0, s2 = 0.0;                                                                                 \
    for (unsigned int b = 0; b < B; ++b) {                                                                     \
        const u64 base = ((u64)b * C + c) * HW;                                                                \
        for (unsigned int p = s * THREADS + threadIdx.x; p < HW; p += S * THREADS) {                          \
            const u64 i = base + p;                                                                            \
            float g = ld(dy, i);                                                                               \
            if (relu && !(ld(y, i) > 0.0f)) g = 0.0f;                                                          \
            s1 += (double)g;                                                                                   \
            s2 += (double)g * ((double)ld(x, i) - m);                                                          \
        }                                                                                                      \
    }                                                                                                          \
    block_sum2(s1, s2);                                                                                        \
    if (threadIdx.x == 0) {                                                                                    \
        part[((u64)c * S + s) * 2] = s1;                                                                       \
        part[((u64)c * S + s) * 2 + 1] = s2;                                                                   \
    }                                                                                                          \
}

// One thread per channel: dgamma, dbeta, and dx = a·g + b·(x - mean) + c0 as coef[3c .. 3c + 3] = (a, b, c0).
extern "C" __global__ void bn_backward_finalize(const double* __restrict__ part, unsigned int C, unsigned int S,
                                                double count, const float* __restrict__ gamma,
                                                const float* __restrict__ invstd, float* __restrict__ dgamma,
                                                float* __restrict__ dbeta, float* __restrict__ coef) {
    const unsigned int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double sg = 0.0, sgx = 0.0;
    for (unsigned int s = 0; s < S; ++s) {
        sg += part[((u64)c * S + s) * 2];
        sgx += part[((u64)c * S + s) * 2 + 1];
    }
    const double is = (double)invstd[c];
    const double dg = is * sgx;
    const double k = (double)gamma[c] * is;
    dgamma[c] = (float)dg;
    dbeta[c] = (float)sg;
    coef[3 * c] = (float)k;
    coef[3 * c + 1] = (float)(-k * is * dg / count);
    coef[3 * c + 2] = (float)(-k * sg / count);
}

#define BN_BACKWARD_INPUT(NAME, T)                                                                             \
extern "C" __global__ void NAME(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y,    \
                                const float* __restrict__ mean, const float* __restrict__ coef,                \
                                T* __restrict__ dx, unsigned int planes, unsigned int C, unsigned int HW,      \
                                int relu) {                                                                    \
    for (unsigned int plane = blockIdx.y; plane < planes; plane += gridDim.y) {                               \
        const unsigned int c = plane % C;                                                                      \
        const float a = coef[3 * c], b = coef[3 * c + 1], c0 = coef[3 * c + 2], m = mean[c];                  \
        const u64 base = (u64)plane * HW;                                                                      \
        for (unsigned int p = blockIdx.x * THREADS + threadIdx.x; p < HW; p += gridDim.x * THREADS) {         \
            const u64 i = base + p;                                                                            \
            float g = ld(dy, i);                                                                               \
            if (relu && !(ld(y, i) > 0.0f)) g = 0.0f;                                                          \
            st(dx, i, a * g + b * (ld(x, i) - m) + c0);                                                        \
        }                                                                                                      \
    }                                                                                                          \
}

BN_STATS(bn_stats_f32, float)
BN_STATS(bn_stats_bf16, bf16_t)
BN_NORMALIZE(bn_normalize_f32, float)
BN_NORMALIZE(bn_normalize_bf16, bf16_t)
BN_BACKWARD_SUMS(bn_backward_sums_f32, float)
BN_BACKWARD_SUMS(bn_backward_sums_bf16, bf16_t)
BN_BACKWARD_INPUT(bn_backward_input_f32, float)
BN_BACKWARD_INPUT(bn_backward_input_bf16, bf16_t)
"#
    ),
);

/// Compiles the kernels (once per process) and loads them on `dev`: start-up calls it off the critical path, so
/// the first training step or request finds them ready.
pub fn preload(dev: &CudaDevice) -> Result<()> {
    KERNELS.func(dev, "bn_normalize_f32").map(drop)
}

/// `x` `[B, C, H, W]` (f32 or bf16, CUDA), `weight`/`bias` `[C]` f32 → (y with x's dtype, differentiable with
/// respect to all three; the batch mean `[C]` f32; the biased batch variance `[C]` f32), all on x's device.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    if !matches!(x.dtype(), DType::F32 | DType::BF16) || weight.dtype() != DType::F32 || bias.dtype() != DType::F32 {
        candle_core::bail!(
            "batch norm (CUDA): input {:?} must be f32 or bf16 and weight {:?} / bias {:?} f32",
            x.dtype(),
            weight.dtype(),
            bias.dtype()
        )
    }
    apply(x, (weight, bias), eps, (relu, false))
}

/// The op on (x, weight, bias), or with `residual` on (x, residual, [γ; β]) → (y, mean, biased variance).
fn apply(
    x: &Tensor,
    (second, third): (&Tensor, &Tensor),
    eps: f64,
    (relu, residual): (bool, bool),
) -> Result<(Tensor, Tensor, Tensor)> {
    let saved = Arc::new(Mutex::new(None));
    let op = BatchNormTrain {
        eps,
        relu,
        residual,
        saved: Arc::clone(&saved),
    };
    let y = x
        .contiguous()?
        .apply_op3(&second.contiguous()?, &third.contiguous()?, op)?;
    let stats = lock(&saved)
        .clone()
        .ok_or_else(|| candle_core::Error::Msg("batch norm (CUDA): the forward pass left no statistics".into()))?;
    Ok((y, stats.mean, stats.var))
}

/// `relu(bn(x) + residual)` as one op: `x` and `residual` `[B, C, H, W]` (f32 or bf16, one dtype, CUDA), `params`
/// `[2C]` f32 (γ then β) → (y, batch mean `[C]`, biased batch variance `[C]`), differentiable with respect to x, the
/// residual and the parameters. Only x and y are needed for backward; the BatchNorm's own output never exists.
pub fn batch_norm_add_relu_train(
    x: &Tensor,
    residual: &Tensor,
    params: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    if !matches!(x.dtype(), DType::F32 | DType::BF16) || residual.dtype() != x.dtype() || params.dtype() != DType::F32 {
        candle_core::bail!(
            "batch norm + add + relu (CUDA): input {:?} and residual {:?} must be one of f32 or bf16, parameters {:?} \
             f32",
            x.dtype(),
            residual.dtype(),
            params.dtype()
        )
    }
    apply(x, (residual, params), eps, (true, true))
}

/// What the forward pass leaves for the caller and for backward: `[C]` f32 tensors on the device.
#[derive(Clone)]
struct Saved {
    mean: Tensor,
    /// Biased.
    var: Tensor,
    invstd: Tensor,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `(x, weight, bias) → relu?(bn(x))`, or with `residual`, `(x, residual, [γ; β]) → relu(bn(x) + residual)`.
struct BatchNormTrain {
    eps: f64,
    relu: bool,
    residual: bool,
    saved: Arc<Mutex<Option<Saved>>>,
}

/// `[B, C, H, W]` as (B, C, H·W), each checked to fit the kernels' 32-bit indices.
fn dims(shape: &Shape) -> Result<(u32, u32, u32)> {
    let (b, c, h, w) = shape.dims4()?;
    let fits = |v: usize| u32::try_from(v).ok();
    match (fits(b), fits(c), fits(h * w), fits(b * c)) {
        (Some(b), Some(c), Some(hw), Some(_)) if c <= MAX_GRID_Y && c > 0 && hw > 0 && b > 0 => Ok((b, c, hw)),
        _ => candle_core::bail!("batch norm (CUDA): unsupported shape {shape:?}"),
    }
}

/// Splits per channel of the reduction kernels: about [`TARGET_BLOCKS`] blocks, each thread several elements.
fn splits(c: u32, hw: u32) -> u32 {
    hw.div_ceil(THREADS).clamp(1, (TARGET_BLOCKS / c).max(1))
}

/// Grid of the elementwise kernels: y over the B·C planes (the kernels loop past 65535), x over H·W with about four
/// elements per thread.
fn elementwise_grid(planes: u32, hw: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (hw.div_ceil(THREADS * 4).max(1), planes.min(MAX_GRID_Y), 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn per_channel_grid(c: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c.div_ceil(THREADS), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The `expected` elements of a contiguous operand.
fn contiguous_view<'a, T>(s: &'a CudaSlice<T>, l: &Layout, expected: usize, what: &str) -> Result<CudaView<'a, T>> {
    sized_view(s, l, expected, "batch norm (CUDA)", what)
}

fn f32_view<'a>(s: &'a CudaStorage, l: &Layout, c: u32, what: &str) -> Result<CudaView<'a, f32>> {
    contiguous_view(s.as_cuda_slice::<f32>()?, l, c as usize, what)
}

/// `[C]` f32 values on `dev` as a tensor outside the graph.
fn vector(s: CudaSlice<f32>, dev: &CudaDevice) -> Tensor {
    let n = s.len();
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())),
        n,
        BackpropOp::none(),
        false,
    )
}

impl BatchNormTrain {
    #[allow(clippy::too_many_arguments)]
    fn forward<T: DeviceRepr>(
        &self,
        dev: &CudaDevice,
        suffix: &str,
        (x, xl): (&CudaSlice<T>, &Layout),
        residual: Option<(&CudaSlice<T>, &Layout)>,
        gamma: CudaView<'_, f32>,
        beta: CudaView<'_, f32>,
    ) -> Result<CudaSlice<T>> {
        let (b, c, hw) = dims(xl.shape())?;
        let n = xl.shape().elem_count();
        // Without a residual the kernel reads none: x stands in for the pointer.
        let (r, has_r) = match residual {
            Some((r, rl)) => (contiguous_view(r, rl, n, "residual")?, 1i32),
            None => (contiguous_view(x, xl, n, "input")?, 0i32),
        };
        let x = contiguous_view(x, xl, n, "input")?;
        let s = splits(c, hw);
        let stream = dev.cuda_stream();
        // SAFETY (allocations): every element is written by the kernels below before it is read.
        let mut part = unsafe { dev.alloc::<f64>(c as usize * (2 * s as usize + 1)) }?;
        let mut mean = unsafe { dev.alloc::<f32>(c as usize) }?;
        let mut var = unsafe { dev.alloc::<f32>(c as usize) }?;
        let mut invstd = unsafe { dev.alloc::<f32>(c as usize) }?;
        let mut y = unsafe { dev.alloc::<T>(n) }?;
        let stats = KERNELS.func(dev, &format!("bn_stats_{suffix}"))?;
        let cfg = LaunchConfig {
            grid_dim: (s, c, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = stream.launch_builder(&stats);
        args.arg(&x).arg(&mut part).arg(&b).arg(&c).arg(&hw);
        // SAFETY: arguments match the kernel's signature (x: T*, part: double*, three unsigned ints); part has
        // C·(2S + 1) doubles for grid (S, C).
        unsafe { args.launch(cfg) }.map_err(|e| KERNELS.launch_err("bn_stats", e))?;

        let finalize = KERNELS.func(dev, "bn_stats_finalize")?;
        let count = (b as f64) * (hw as f64);
        let mut args = stream.launch_builder(&finalize);
        args.arg(&part)
            .arg(&c)
            .arg(&s)
            .arg(&count)
            .arg(&self.eps)
            .arg(&mut mean)
            .arg(&mut var)
            .arg(&mut invstd);
        // SAFETY: matches `bn_stats_finalize`'s signature; one thread per channel.
        unsafe { args.launch(per_channel_grid(c)) }.map_err(|e| KERNELS.launch_err("bn_stats_finalize", e))?;

        let normalize = KERNELS.func(dev, &format!("bn_normalize_{suffix}"))?;
        let planes = b * c;
        let relu = self.relu as i32;
        let mut args = stream.launch_builder(&normalize);
        args.arg(&x)
            .arg(&mut y)
            .arg(&mean)
            .arg(&invstd)
            .arg(&gamma)
            .arg(&beta)
            .arg(&planes)
            .arg(&c)
            .arg(&hw)
            .arg(&relu)
            .arg(&r)
            .arg(&has_r);
        // SAFETY: matches `bn_normalize_*`'s signature; y has B·C·HW elements, as has r when has_r.
        unsafe { args.launch(elementwise_grid(planes, hw)) }.map_err(|e| KERNELS.launch_err("bn_normalize", e))?;
        *lock(&self.saved) = Some(Saved {
            mean: vector(mean, dev),
            var: vector(var, dev),
            invstd: vector(invstd, dev),
        });
        Ok(y)
    }
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "semseg-batch-norm-train-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("semseg-batch-norm-train-cuda runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (_, c, _) = dims(xl.shape())?;
        // (weight, bias), or with a residual (residual, [γ; β]).
        let (residual, gamma, beta) = if self.residual {
            let (gamma, beta) = f32_view(s3, l3, 2 * c, "parameters")?.split_at(c as usize);
            (Some((s2, l2)), gamma, beta)
        } else {
            (None, f32_view(s2, l2, c, "weight")?, f32_view(s3, l3, c, "bias")?)
        };
        let dev = xs.device();
        let y = match (&xs.slice, residual.map(|(s, l)| (&s.slice, l))) {
            (CudaStorageSlice::F32(x), None) => {
                CudaStorage::wrap_cuda_slice(self.forward(dev, "f32", (x, xl), None, gamma, beta)?, dev.clone())
            }
            (CudaStorageSlice::F32(x), Some((CudaStorageSlice::F32(r), rl))) => CudaStorage::wrap_cuda_slice(
                self.forward(dev, "f32", (x, xl), Some((r, rl)), gamma, beta)?,
                dev.clone(),
            ),
            (CudaStorageSlice::BF16(x), None) => {
                CudaStorage::wrap_cuda_slice(self.forward(dev, "bf16", (x, xl), None, gamma, beta)?, dev.clone())
            }
            (CudaStorageSlice::BF16(x), Some((CudaStorageSlice::BF16(r), rl))) => CudaStorage::wrap_cuda_slice(
                self.forward(dev, "bf16", (x, xl), Some((r, rl)), gamma, beta)?,
                dev.clone(),
            ),
            _ => candle_core::bail!(
                "batch norm (CUDA): input dtype {:?}{}, expected f32 or bf16",
                xs.dtype(),
                residual
                    .map(|(r, _)| format!(" and residual {:?}", r.dtype()))
                    .unwrap_or_default()
            ),
        };
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        second: &Tensor,
        third: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = lock(&self.saved)
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("batch norm (CUDA): backward before forward".into()))?;
        let mut grad = grad.to_dtype(x.dtype())?.contiguous()?;
        let x = x.contiguous()?;
        if self.residual {
            // Through the ReLU: the residual's gradient, and the normalisation's output gradient.
            grad = super::elementwise_cuda::relu_mask(&grad, &res.contiguous()?)?;
            let gamma = third.narrow(0, 0, saved.mean.dim(0)?)?.contiguous()?;
            let (dx, dgamma, dbeta) = normalisation_grads(saved, gamma, &grad, &x, None)?;
            return Ok((Some(dx), Some(grad), Some(Tensor::cat(&[dgamma, dbeta], 0)?)));
        }
        // Without ReLU the kernels never read y: x stands in for it rather than keep anything else alive.
        let y = self.relu.then(|| res.contiguous()).transpose()?;
        let (dx, dgamma, dbeta) = normalisation_grads(saved, second.contiguous()?, &grad, &x, y.as_ref())?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// Backward of `relu?((x − μ)·s·γ + β)` for its output gradient `grad` (the ReLU's mask read from `y` when given):
/// (∂x, ∂γ, ∂β).
fn normalisation_grads(
    saved: Saved,
    gamma: Tensor,
    grad: &Tensor,
    x: &Tensor,
    y: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let out = Arc::new(Mutex::new(None));
    let op = BatchNormBackward {
        relu: y.is_some(),
        gamma,
        mean: saved.mean,
        invstd: saved.invstd,
        out: Arc::clone(&out),
    };
    let dx = grad.apply_op3_no_bwd(x, y.unwrap_or(x), &op)?;
    let (dgamma, dbeta) = lock(&out)
        .take()
        .ok_or_else(|| candle_core::Error::Msg("batch norm (CUDA): backward left no parameter gradients".into()))?;
    Ok((dx, dgamma, dbeta))
}

/// `(dy, x, y) → dx`; ∂γ and ∂β land in `out`. γ, μ and 1/σ are read from the tensors the op holds.
struct BatchNormBackward {
    relu: bool,
    gamma: Tensor,
    mean: Tensor,
    invstd: Tensor,
    out: Arc<Mutex<Option<(Tensor, Tensor)>>>,
}

impl BatchNormBackward {
    #[allow(clippy::too_many_arguments)]
    fn run<T: DeviceRepr>(
        &self,
        dev: &CudaDevice,
        suffix: &str,
        (dy, dyl): (&CudaSlice<T>, &Layout),
        (x, xl): (&CudaSlice<T>, &Layout),
        (y, yl): (&CudaSlice<T>, &Layout),
        [gamma, mean, invstd]: [CudaView<'_, f32>; 3],
    ) -> Result<CudaSlice<T>> {
        let (b, c, hw) = dims(xl.shape())?;
        let n = xl.shape().elem_count();
        let dy = contiguous_view(dy, dyl, n, "output gradient")?;
        let x = contiguous_view(x, xl, n, "input")?;
        let y = contiguous_view(y, yl, n, "output")?;
        let s = splits(c, hw);
        let stream = dev.cuda_stream();
        // SAFETY (allocations): written by the kernels below before being read.
        let mut part = unsafe { dev.alloc::<f64>(c as usize * s as usize * 2) }?;
        let mut dgamma = unsafe { dev.alloc::<f32>(c as usize) }?;
        let mut dbeta = unsafe { dev.alloc::<f32>(c as usize) }?;
        let mut coef = unsafe { dev.alloc::<f32>(3 * c as usize) }?;
        let mut dx = unsafe { dev.alloc::<T>(n) }?;
        let relu = self.relu as i32;

        let sums = KERNELS.func(dev, &format!("bn_backward_sums_{suffix}"))?;
        let cfg = LaunchConfig {
            grid_dim: (s, c, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = stream.launch_builder(&sums);
        args.arg(&dy)
            .arg(&x)
            .arg(&y)
            .arg(&mean)
            .arg(&mut part)
            .arg(&b)
            .arg(&c)
            .arg(&hw)
            .arg(&relu);
        // SAFETY: matches `bn_backward_sums_*`'s signature; part has C·S·2 doubles for grid (S, C).
        unsafe { args.launch(cfg) }.map_err(|e| KERNELS.launch_err("bn_backward_sums", e))?;

        let finalize = KERNELS.func(dev, "bn_backward_finalize")?;
        let count = (b as f64) * (hw as f64);
        let mut args = stream.launch_builder(&finalize);
        args.arg(&part)
            .arg(&c)
            .arg(&s)
            .arg(&count)
            .arg(&gamma)
            .arg(&invstd)
            .arg(&mut dgamma)
            .arg(&mut dbeta)
            .arg(&mut coef);
        // SAFETY: matches `bn_backward_finalize`'s signature; one thread per channel.
        unsafe { args.launch(per_channel_grid(c)) }.map_err(|e| KERNELS.launch_err("bn_backward_finalize", e))?;

        let input = KERNELS.func(dev, &format!("bn_backward_input_{suffix}"))?;
        let planes = b * c;
        let mut args = stream.launch_builder(&input);
        args.arg(&dy)
            .arg(&x)
            .arg(&y)
            .arg(&mean)
            .arg(&coef)
            .arg(&mut dx)
            .arg(&planes)
            .arg(&c)
            .arg(&hw)
            .arg(&relu);
        // SAFETY: matches `bn_backward_input_*`'s signature; dx has B·C·HW elements.
        unsafe { args.launch(elementwise_grid(planes, hw)) }.map_err(|e| KERNELS.launch_err("bn_backward_input", e))?;
        *lock(&self.out) = Some((vector(dgamma, dev), vector(dbeta, dev)));
        Ok(dx)
    }
}

impl CustomOp3 for BatchNormBackward {
    fn name(&self) -> &'static str {
        "semseg-batch-norm-backward-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("semseg-batch-norm-backward-cuda runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        xs: &CudaStorage,
        xl: &Layout,
        ys: &CudaStorage,
        yl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (_, c, _) = dims(xl.shape())?;
        // The [C] vectors are separate tensors from the three operands, so reading their storage here cannot
        // contend with the operands' locks.
        let (gamma_s, gamma_l) = self.gamma.storage_and_layout();
        let (mean_s, mean_l) = self.mean.storage_and_layout();
        let (invstd_s, invstd_l) = self.invstd.storage_and_layout();
        let (Storage::Cuda(gamma), Storage::Cuda(mean), Storage::Cuda(invstd)) = (&*gamma_s, &*mean_s, &*invstd_s)
        else {
            candle_core::bail!("batch norm (CUDA): parameters and statistics must be on the GPU")
        };
        let vectors = [
            f32_view(gamma, gamma_l, c, "weight")?,
            f32_view(mean, mean_l, c, "saved mean")?,
            f32_view(invstd, invstd_l, c, "saved inverse std")?,
        ];
        let dev = xs.device();
        let dx = match (&gs.slice, &xs.slice, &ys.slice) {
            (CudaStorageSlice::F32(dy), CudaStorageSlice::F32(x), CudaStorageSlice::F32(y)) => {
                let dx = self.run(dev, "f32", (dy, gl), (x, xl), (y, yl), vectors)?;
                CudaStorage::wrap_cuda_slice(dx, dev.clone())
            }
            (CudaStorageSlice::BF16(dy), CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(y)) => {
                let dx = self.run(dev, "bf16", (dy, gl), (x, xl), (y, yl), vectors)?;
                CudaStorage::wrap_cuda_slice(dx, dev.clone())
            }
            _ => candle_core::bail!(
                "batch norm backward (CUDA): gradient {:?}, input {:?} and output {:?} must share one dtype, f32 or \
                 bf16",
                gs.dtype(),
                xs.dtype(),
                ys.dtype()
            ),
        };
        Ok((dx, xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    /// NVRTC needs no GPU and no driver: this runs wherever the toolkit's libnvrtc is on the library path.
    #[test]
    fn the_kernels_compile_with_nvrtc() {
        let ptx = super::KERNELS.ptx().expect("NVRTC compiles the batch-norm kernels");
        for name in [
            "bn_stats_f32",
            "bn_stats_bf16",
            "bn_stats_finalize",
            "bn_normalize_f32",
            "bn_normalize_bf16",
            "bn_backward_sums_f32",
            "bn_backward_sums_bf16",
            "bn_backward_finalize",
            "bn_backward_input_f32",
            "bn_backward_input_bf16",
        ] {
            assert!(ptx.contains(&format!(".entry {name}(")), "{name} missing from the PTX");
        }
    }
}
