//! The GPU twins of six CPU ops, as NVRTC kernels (compiled once per process, loaded per device like
//! [`super::batch_norm_cuda`]'s): the residual add + ReLU ([`super::add_relu`]), the stem's 3×3/2 max-pool
//! ([`super::pool`]), the per-pixel softmax cross-entropy (`train::loss`), the in-place SGD update
//! (`train::fused_sgd`), BatchNorm's running statistics ([`super::running_stats`]) and dropout
//! ([`super::dropout`]).
//!
//! Composed from Candle's ops these cost, per op of a DeepLabV3-ResNet-50 step at batch 8, crop 512, on an H200
//! (2026-11-28, `device-check --timing`): cross-entropy 10.2 ms forward (a log-softmax over the class axis, which
//! is not the last one, through strided reductions) and 6.6 ms backward; the max-pool about 10 ms backward (two
//! `maximum`s over strided views); the add + ReLU five full-size passes backward. Each kernel here is one pass.
//!
//! - add + ReLU: `y = max(a + b, 0)` (the sum in f32, rounded once, as Candle's bf16 add); backward `dx = dy` where
//!   `y > 0`, the gradient of both inputs;
//! - max-pool 3×3, stride 2, padding 1: one thread per output (the first maximum of its window, as PyTorch);
//!   backward one thread per input, summing the gradients of the (at most four) windows whose first maximum it
//!   is, so no atomics and a deterministic sum;
//! - cross-entropy: one thread per pixel reads its C logits (stride H·W, coalesced across the warp) once for the
//!   max and once for the sum of exponentials; the loss per pixel is `w·(log Σ exp(x − m) + m − x_target)`, summed
//!   by Candle; backward writes `g·w·(softmax − one-hot)` for every class of the pixel;
//! - SGD: the momentum buffer, then the parameter, each updated in place in one pass. Composed from Candle's ops the
//!   update is about seven kernels and six parameter-sized allocations per parameter, some 1,270 launches a step
//!   for DeepLabV3-ResNet-50's 182 parameter tensors; here it is two launches per parameter and no allocation;
//! - running statistics: one in-place pass per statistic, rounded as the CPU's (`_rn` intrinsics, as SGD's);
//! - dropout: one pass, each element's keep decided by the hash of (key, index) that the CPU op computes, so the
//!   masks are the CPU's bit for bit; the same kernel with the same key is its backward.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::{CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};

use super::cuda_kernels::{contiguous_view, kernel_prelude, KernelModule};

const THREADS: u32 = 256;
/// Blocks of a grid-stride launch: enough to fill any current GPU many times over.
const MAX_BLOCKS: u64 = 1 << 16;

static KERNELS: KernelModule = KernelModule::new(
    "semseg_elementwise",
    "elementwise",
    concat!(
        kernel_prelude!(),
        r#"
#define GRID_STRIDE(i, n) for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (u64)gridDim.x * blockDim.x)

#define ADD_RELU(NAME, T)                                                                                      \
extern "C" __global__ void NAME(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y, u64 n) {  \
    GRID_STRIDE(i, n) { const float s = ld(a, i) + ld(b, i); st(y, i, s > 0.0f ? s : 0.0f); }                  \
}

#define RELU_MASK(NAME, T)                                                                                     \
extern "C" __global__ void NAME(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx, u64 n) { \
    GRID_STRIDE(i, n) { st(dx, i, ld(y, i) > 0.0f ? ld(dy, i) : 0.0f); }                                       \
}

// Offset in one h x w plane of the first maximum of output (oy, ox)'s 3x3 window (stride 2, padding 1).
template <typename T>
__device__ __forceinline__ unsigned int window_argmax(const T* p, unsigned int h, unsigned int w, unsigned int oy,
                                                      unsigned int ox) {
    const unsigned int y0 = oy > 0 ? 2 * oy - 1 : 0, x0 = ox > 0 ? 2 * ox - 1 : 0;
    const unsigned int y1 = min(2 * oy + 2, h), x1 = min(2 * ox + 2, w);
    unsigned int best = y0 * w + x0;
    float bv = ld(p, best);
    for (unsigned int iy = y0; iy < y1; ++iy)
        for (unsigned int ix = x0; ix < x1; ++ix) {
            const float v = ld(p, iy * w + ix);
            if (v > bv) { bv = v; best = iy * w + ix; }
        }
    return best;
}

#define MAX_POOL(NAME, T)                                                                                      \
extern "C" __global__ void NAME(const T* __restrict__ x, T* __restrict__ y, u64 n, unsigned int h,             \
                                unsigned int w, unsigned int oh, unsigned int ow) {                            \
    GRID_STRIDE(i, n) {                                                                                        \
        const u64 plane = i / ((u64)oh * ow);                                                                  \
        const unsigned int r = (unsigned int)(i - plane * oh * ow);                                            \
        const T* p = x + plane * h * w;                                                                        \
        st(y, i, ld(p, window_argmax(p, h, w, r / ow, r % ow)));                                               \
    }                                                                                                          \
}

// One thread per input: the sum of dy over the windows (rows (iy-1)/2..(iy+1)/2, likewise columns) whose first
// maximum it is.
#define MAX_POOL_BACKWARD(NAME, T)                                                                             \
extern "C" __global__ void NAME(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, u64 n,   \
                                unsigned int h, unsigned int w, unsigned int oh, unsigned int ow) {            \
    GRID_STRIDE(i, n) {                                                                                        \
        const u64 plane = i / ((u64)h * w);                                                                    \
        const unsigned int at = (unsigned int)(i - plane * h * w), iy = at / w, ix = at % w;                   \
        const T* p = x + plane * h * w;                                                                        \
        const T* g = dy + plane * oh * ow;                                                                     \
        float sum = 0.0f;                                                                                      \
        for (unsigned int oy = iy / 2; oy <= min((iy + 1) / 2, oh - 1); ++oy)                                  \
            for (unsigned int ox = ix / 2; ox <= min((ix + 1) / 2, ow - 1); ++ox)                              \
                if (window_argmax(p, h, w, oy, ox) == at) sum += ld(g, (u64)oy * ow + ox);                     \
        st(dx, i, sum);                                                                                        \
    }                                                                                                          \
}

ADD_RELU(add_relu_f32, float)
ADD_RELU(add_relu_bf16, bf16_t)
RELU_MASK(relu_mask_f32, float)
RELU_MASK(relu_mask_bf16, bf16_t)
MAX_POOL(max_pool_f32, float)
MAX_POOL(max_pool_bf16, bf16_t)
MAX_POOL_BACKWARD(max_pool_backward_f32, float)
MAX_POOL_BACKWARD(max_pool_backward_bf16, bf16_t)

// SplitMix64's output function; model::ops::dropout::mix.
__device__ __forceinline__ u64 splitmix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// y = x * scale where the element's uniform (24 bits of the hash of key and index) is >= p, else 0.
#define DROPOUT(NAME, T)                                                                                       \
extern "C" __global__ void NAME(const T* __restrict__ x, T* __restrict__ y, u64 n, u64 key, float p,          \
                                float scale) {                                                                 \
    GRID_STRIDE(i, n) {                                                                                        \
        const float u = (float)(splitmix64(key + (i + 1) * 0x9E3779B97F4A7C15ull) >> 40) * 5.9604644775390625e-8f; \
        st(y, i, u >= p ? __fmul_rn(ld(x, i), scale) : 0.0f);                                                  \
    }                                                                                                          \
}

DROPOUT(dropout_f32, float)
DROPOUT(dropout_bf16, bf16_t)

// logits [N, C, HW] f32, target [N, HW] u32 (< C), weight [N, HW] f32 -> loss [N, HW] = w * (lse - x_target).
extern "C" __global__ void cross_entropy(const float* __restrict__ x, const unsigned int* __restrict__ target,
                                         const float* __restrict__ weight, float* __restrict__ loss, u64 n,
                                         unsigned int c, unsigned int hw) {
    GRID_STRIDE(i, n) {
        const u64 image = i / hw, base = image * c * hw + (i - image * hw);
        float m = x[base];
        for (unsigned int k = 1; k < c; ++k) m = fmaxf(m, x[base + (u64)k * hw]);
        float s = 0.0f;
        for (unsigned int k = 0; k < c; ++k) s += expf(x[base + (u64)k * hw] - m);
        const float w = weight[i];
        loss[i] = w != 0.0f ? w * (logf(s) + m - x[base + (u64)target[i] * hw]) : 0.0f;
    }
}

// g [N, HW] f32 (the loss gradient times the weight) -> dx [N, C, HW] = g * (softmax - one-hot).
extern "C" __global__ void cross_entropy_backward(const float* __restrict__ x, const unsigned int* __restrict__ target,
                                                  const float* __restrict__ g, float* __restrict__ dx, u64 n,
                                                  unsigned int c, unsigned int hw) {
    GRID_STRIDE(i, n) {
        const u64 image = i / hw, base = image * c * hw + (i - image * hw);
        const float gi = g[i];
        if (gi == 0.0f) {
            for (unsigned int k = 0; k < c; ++k) dx[base + (u64)k * hw] = 0.0f;
            continue;
        }
        float m = x[base];
        for (unsigned int k = 1; k < c; ++k) m = fmaxf(m, x[base + (u64)k * hw]);
        float s = 0.0f;
        for (unsigned int k = 0; k < c; ++k) s += expf(x[base + (u64)k * hw] - m);
        const float inv = 1.0f / s;
        const unsigned int t = target[i];
        for (unsigned int k = 0; k < c; ++k) {
            const float p = expf(x[base + (u64)k * hw] - m) * inv;
            dx[base + (u64)k * hw] = gi * (p - (k == t ? 1.0f : 0.0f));
        }
    }
}

// SGD in place (train::fused_sgd), one pass each, with the CPU's f32 operations in its order: `_rn` intrinsics so
// NVRTC does not contract a multiply and an add into an FMA, which would round differently from the CPU.
// buf <- g' at the first step, else momentum * buf + g', where g' = g + w * weight_decay.
// (Both kernels take (lr, momentum, weight_decay, flag) after n; this one has no use for lr.)
extern "C" __global__ void sgd_momentum(float* __restrict__ buf, const float* __restrict__ g,
                                        const float* __restrict__ w, u64 n, float lr, float momentum,
                                        float weight_decay, int first) {
    GRID_STRIDE(i, n) {
        const float gi = __fadd_rn(g[i], __fmul_rn(w[i], weight_decay));
        buf[i] = first ? gi : __fadd_rn(__fmul_rn(buf[i], momentum), gi);
    }
}

// w <- w - lr * d, d = buf (rule 0: sgd with momentum), g' + momentum * buf (1: nag), g' (2: no momentum).
extern "C" __global__ void sgd_apply(float* __restrict__ w, const float* __restrict__ g,
                                     const float* __restrict__ buf, u64 n, float lr, float momentum,
                                     float weight_decay, int rule) {
    GRID_STRIDE(i, n) {
        float d;
        if (rule == 0) {
            d = buf[i];
        } else {
            d = __fadd_rn(g[i], __fmul_rn(w[i], weight_decay));
            if (rule == 1) d = __fadd_rn(d, __fmul_rn(buf[i], momentum));
        }
        w[i] = __fsub_rn(w[i], __fmul_rn(d, lr));
    }
}

// BatchNorm's running statistic in place (model::ops::running_stats), rounded as the CPU's:
// r <- r * keep + (b * scale) * momentum.
extern "C" __global__ void running_update(float* __restrict__ r, const float* __restrict__ b, u64 n, float keep,
                                          float scale, float momentum) {
    GRID_STRIDE(i, n) { r[i] = __fadd_rn(__fmul_rn(r[i], keep), __fmul_rn(__fmul_rn(b[i], scale), momentum)); }
}
"#
    ),
);

/// Compiles and loads the kernels on `dev` (start-up calls it, off the critical path).
pub fn preload(dev: &CudaDevice) -> Result<()> {
    KERNELS.func(dev, "add_relu_f32").map(drop)
}

fn grid(n: u64) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(u64::from(THREADS)).clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The elements of a contiguous operand of `op`.
fn view<'a, T>(s: &'a CudaSlice<T>, l: &Layout, op: &str) -> Result<CudaView<'a, T>> {
    contiguous_view(s, l, op, "operand")
}

fn u32_dim(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what}: dimension {v} exceeds 32 bits")))
}

/// Runs a two-input elementwise kernel `name_{f32,bf16}(a, b, out, n)` over same-dtype contiguous operands.
fn binary(name: &str, (a, al): (&CudaStorage, &Layout), (b, bl): (&CudaStorage, &Layout)) -> Result<CudaStorage> {
    fn run<T: DeviceRepr>(
        dev: &CudaDevice,
        kernel: &str,
        (a, al): (&CudaSlice<T>, &Layout),
        (b, bl): (&CudaSlice<T>, &Layout),
    ) -> Result<CudaSlice<T>> {
        let n = al.shape().elem_count();
        if bl.shape().elem_count() != n {
            candle_core::bail!("{kernel}: operands of {:?} and {:?}", al.shape(), bl.shape())
        }
        let (a, b) = (view(a, al, kernel)?, view(b, bl, kernel)?);
        // SAFETY: the kernel writes all n elements.
        let mut out = unsafe { dev.alloc::<T>(n) }?;
        let f = KERNELS.func(dev, kernel)?;
        let stream = dev.cuda_stream();
        let n64 = n as u64;
        let mut args = stream.launch_builder(&f);
        args.arg(&a).arg(&b).arg(&mut out).arg(&n64);
        // SAFETY: (const T*, const T*, T*, u64) as every binary kernel above; all buffers hold n elements.
        unsafe { args.launch(grid(n64)) }.map_err(|e| KERNELS.launch_err(kernel, e))?;
        Ok(out)
    }
    let dev = a.device();
    Ok(match (&a.slice, &b.slice) {
        (CudaStorageSlice::F32(x), CudaStorageSlice::F32(y)) => {
            CudaStorage::wrap_cuda_slice(run(dev, &format!("{name}_f32"), (x, al), (y, bl))?, dev.clone())
        }
        (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(y)) => {
            CudaStorage::wrap_cuda_slice(run(dev, &format!("{name}_bf16"), (x, al), (y, bl))?, dev.clone())
        }
        _ => candle_core::bail!("{name}: operands must both be f32 or both bf16"),
    })
}

fn cpu_only(name: &str) -> Result<(candle_core::CpuStorage, Shape)> {
    candle_core::bail!("{name} runs on CUDA devices only")
}

/// `max(a + b, 0)` for two same-shaped f32 or bf16 CUDA tensors; differentiable with respect to both.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
}

struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "semseg-add-relu-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        cpu_only(self.name())
    }

    fn cuda_fwd(&self, a: &CudaStorage, al: &Layout, b: &CudaStorage, bl: &Layout) -> Result<(CudaStorage, Shape)> {
        Ok((binary("add_relu", (a, al), (b, bl))?, al.shape().clone()))
    }

    fn bwd(&self, _a: &Tensor, _b: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let masked = relu_mask(&grad.to_dtype(res.dtype())?, res)?;
        Ok((Some(masked.clone()), Some(masked)))
    }
}

/// `dy` where `y > 0`, else 0 (a ReLU's backward), outside the graph; both of one shape and dtype (f32 or bf16).
pub fn relu_mask(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    dy.contiguous()?.apply_op2_no_bwd(&y.contiguous()?, &ReluMask)
}

/// `(dy, y) → dy where y > 0, else 0`.
struct ReluMask;

impl CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "semseg-relu-mask-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        cpu_only(self.name())
    }

    fn cuda_fwd(&self, a: &CudaStorage, al: &Layout, b: &CudaStorage, bl: &Layout) -> Result<(CudaStorage, Shape)> {
        Ok((binary("relu_mask", (a, al), (b, bl))?, al.shape().clone()))
    }
}

/// Dropout (`super::dropout`) of a contiguous f32 or bf16 CUDA operand with `op`'s key and probability: the
/// CPU op's mask, bit for bit.
pub fn dropout(s: &CudaStorage, l: &Layout, op: super::dropout::Dropout) -> Result<CudaStorage> {
    fn run<T: DeviceRepr>(
        dev: &CudaDevice,
        kernel: &str,
        x: &CudaSlice<T>,
        l: &Layout,
        op: super::dropout::Dropout,
    ) -> Result<CudaSlice<T>> {
        let n = l.shape().elem_count();
        let x = view(x, l, kernel)?;
        // SAFETY: the kernel writes all n elements.
        let mut y = unsafe { dev.alloc::<T>(n) }?;
        let f = KERNELS.func(dev, kernel)?;
        let stream = dev.cuda_stream();
        let (n64, key, p, scale) = (n as u64, op.key, op.p, op.scale());
        let mut args = stream.launch_builder(&f);
        args.arg(&x).arg(&mut y).arg(&n64).arg(&key).arg(&p).arg(&scale);
        // SAFETY: matches `dropout_*`'s signature (const T*, T*, u64, u64, float, float); x and y hold n elements.
        unsafe { args.launch(grid(n64)) }.map_err(|e| KERNELS.launch_err(kernel, e))?;
        Ok(y)
    }
    let dev = s.device();
    Ok(match &s.slice {
        CudaStorageSlice::F32(x) => CudaStorage::wrap_cuda_slice(run(dev, "dropout_f32", x, l, op)?, dev.clone()),
        CudaStorageSlice::BF16(x) => CudaStorage::wrap_cuda_slice(run(dev, "dropout_bf16", x, l, op)?, dev.clone()),
        _ => candle_core::bail!("dropout (CUDA): f32 or bf16 input expected, got {:?}", s.dtype()),
    })
}

/// `nn.MaxPool2d(3, 2, 1)` on an f32 or bf16 CUDA tensor `[B, C, H, W]`; its gradient goes to each window's first
/// maximum.
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(MaxPool)
}

/// (planes, h, w, oh, ow) of a pooled `[B, C, H, W]`.
fn pool_dims(shape: &Shape) -> Result<(u64, u32, u32, u32, u32)> {
    let (b, c, h, w) = shape.dims4()?;
    let (h, w) = (u32_dim(h, "max-pool")?, u32_dim(w, "max-pool")?);
    Ok(((b * c) as u64, h, w, h.div_ceil(2), w.div_ceil(2)))
}

struct MaxPool;

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "semseg-max-pool-cuda"
    }

    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        cpu_only(self.name())
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        fn run<T: DeviceRepr>(dev: &CudaDevice, kernel: &str, x: &CudaSlice<T>, l: &Layout) -> Result<CudaSlice<T>> {
            let (planes, h, w, oh, ow) = pool_dims(l.shape())?;
            let x = view(x, l, kernel)?;
            let n = planes * u64::from(oh) * u64::from(ow);
            // SAFETY: the kernel writes all n outputs.
            let mut y = unsafe { dev.alloc::<T>(n as usize) }?;
            let f = KERNELS.func(dev, kernel)?;
            let stream = dev.cuda_stream();
            let mut args = stream.launch_builder(&f);
            args.arg(&x).arg(&mut y).arg(&n).arg(&h).arg(&w).arg(&oh).arg(&ow);
            // SAFETY: matches `max_pool_*`'s signature; x holds planes·h·w elements, y n.
            unsafe { args.launch(grid(n)) }.map_err(|e| KERNELS.launch_err(kernel, e))?;
            Ok(y)
        }
        let dev = s.device();
        let (b, c, h, w) = l.shape().dims4()?;
        let out = match &s.slice {
            CudaStorageSlice::F32(x) => CudaStorage::wrap_cuda_slice(run(dev, "max_pool_f32", x, l)?, dev.clone()),
            CudaStorageSlice::BF16(x) => CudaStorage::wrap_cuda_slice(run(dev, "max_pool_bf16", x, l)?, dev.clone()),
            _ => candle_core::bail!("max-pool (CUDA): f32 or bf16 input expected, got {:?}", s.dtype()),
        };
        Ok((out, Shape::from_dims(&[b, c, h.div_ceil(2), w.div_ceil(2)])))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &grad.to_dtype(x.dtype())?.contiguous()?,
            &MaxPoolBackward,
        )?))
    }
}

/// `(x, dy) → dx`.
struct MaxPoolBackward;

impl CustomOp2 for MaxPoolBackward {
    fn name(&self) -> &'static str {
        "semseg-max-pool-backward-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        cpu_only(self.name())
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout, gs: &CudaStorage, gl: &Layout) -> Result<(CudaStorage, Shape)> {
        fn run<T: DeviceRepr>(
            dev: &CudaDevice,
            kernel: &str,
            (x, xl): (&CudaSlice<T>, &Layout),
            (g, gl): (&CudaSlice<T>, &Layout),
        ) -> Result<CudaSlice<T>> {
            let (planes, h, w, oh, ow) = pool_dims(xl.shape())?;
            if gl.shape().elem_count() as u64 != planes * u64::from(oh) * u64::from(ow) {
                candle_core::bail!("{kernel}: gradient {:?} for input {:?}", gl.shape(), xl.shape())
            }
            let (x, g) = (view(x, xl, kernel)?, view(g, gl, kernel)?);
            let n = planes * u64::from(h) * u64::from(w);
            // SAFETY: the kernel writes all n input gradients.
            let mut dx = unsafe { dev.alloc::<T>(n as usize) }?;
            let f = KERNELS.func(dev, kernel)?;
            let stream = dev.cuda_stream();
            let mut args = stream.launch_builder(&f);
            args.arg(&x)
                .arg(&g)
                .arg(&mut dx)
                .arg(&n)
                .arg(&h)
                .arg(&w)
                .arg(&oh)
                .arg(&ow);
            // SAFETY: matches `max_pool_backward_*`'s signature and buffer sizes.
            unsafe { args.launch(grid(n)) }.map_err(|e| KERNELS.launch_err(kernel, e))?;
            Ok(dx)
        }
        let dev = xs.device();
        let out = match (&xs.slice, &gs.slice) {
            (CudaStorageSlice::F32(x), CudaStorageSlice::F32(g)) => {
                CudaStorage::wrap_cuda_slice(run(dev, "max_pool_backward_f32", (x, xl), (g, gl))?, dev.clone())
            }
            (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(g)) => {
                CudaStorage::wrap_cuda_slice(run(dev, "max_pool_backward_bf16", (x, xl), (g, gl))?, dev.clone())
            }
            _ => candle_core::bail!("max-pool backward (CUDA): input and gradient must share f32 or bf16"),
        };
        Ok((out, xl.shape().clone()))
    }
}

/// Per-pixel loss `w·(log Σ_c exp(x_c) − x_target)` of f32 logits `[N, C, H, W]` with u32 targets and f32 weights
/// `[N, 1, H, W]` (targets below C: the caller checks) → `[N, 1, H, W]` f32, differentiable in the logits.
pub fn pixel_cross_entropy(logits: &Tensor, target: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if logits.dtype() != DType::F32 || target.dtype() != DType::U32 || weight.dtype() != DType::F32 {
        candle_core::bail!(
            "cross-entropy (CUDA): f32 logits, u32 targets and f32 weights expected, got {:?} / {:?} / {:?}",
            logits.dtype(),
            target.dtype(),
            weight.dtype()
        )
    }
    logits.contiguous()?.apply_op3(
        &target.contiguous()?,
        &weight.contiguous()?,
        CrossEntropy { backward: false },
    )
}

/// Forward `(logits, target, weight) → loss`; with `backward`, `(logits, target, g·w) → dlogits`.
struct CrossEntropy {
    backward: bool,
}

impl CustomOp3 for CrossEntropy {
    fn name(&self) -> &'static str {
        if self.backward {
            "semseg-cross-entropy-backward-cuda"
        } else {
            "semseg-cross-entropy-cuda"
        }
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
        cpu_only(self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ts: &CudaStorage,
        tl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (CudaStorageSlice::F32(x), CudaStorageSlice::U32(t), CudaStorageSlice::F32(w)) =
            (&xs.slice, &ts.slice, &ws.slice)
        else {
            candle_core::bail!("{}: f32 logits, u32 targets and f32 weights expected", self.name())
        };
        let (b, c, h, wd) = xl.shape().dims4()?;
        let pixels = b * h * wd;
        if tl.shape().elem_count() != pixels || wl.shape().elem_count() != pixels {
            candle_core::bail!(
                "{}: targets {:?} and weights {:?} for logits {:?}",
                self.name(),
                tl.shape(),
                wl.shape(),
                xl.shape()
            )
        }
        let dev = xs.device();
        let (x, t, w) = (
            view(x, xl, self.name())?,
            view(t, tl, self.name())?,
            view(w, wl, self.name())?,
        );
        let (c32, hw) = (u32_dim(c, self.name())?, u32_dim(h * wd, self.name())?);
        let n = pixels as u64;
        let (kernel, out_len) = if self.backward {
            ("cross_entropy_backward", xl.shape().elem_count())
        } else {
            ("cross_entropy", pixels)
        };
        // SAFETY: the kernel writes every element (the loss per pixel, or every logit's gradient).
        let mut out = unsafe { dev.alloc::<f32>(out_len) }?;
        let f = KERNELS.func(dev, kernel)?;
        let stream = dev.cuda_stream();
        let mut args = stream.launch_builder(&f);
        args.arg(&x).arg(&t).arg(&w).arg(&mut out).arg(&n).arg(&c32).arg(&hw);
        // SAFETY: matches `cross_entropy` / `cross_entropy_backward`: (const float*, const unsigned*, const
        // float*, float*, u64, unsigned, unsigned); sizes checked above; targets are below C (the caller's check).
        unsafe { args.launch(grid(n)) }.map_err(|e| KERNELS.launch_err(kernel, e))?;
        let shape = if self.backward {
            xl.shape().clone()
        } else {
            Shape::from_dims(&[b, 1, h, wd])
        };
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        target: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = (grad.to_dtype(DType::F32)? * weight)?.contiguous()?;
        let dx = logits.apply_op3_no_bwd(target, &g, &CrossEntropy { backward: true })?;
        Ok((Some(dx), None, None))
    }
}

/// Which direction [`sgd_apply_in_place`] subtracts (times the learning rate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SgdRule {
    /// The momentum buffer (sgd with momentum).
    Momentum = 0,
    /// `g' + momentum·buf` (nag).
    Nesterov = 1,
    /// `g'` (no momentum; the buffer is not read).
    Plain = 2,
}

/// The f32 elements of a contiguous operand of an in-place SGD kernel.
fn f32_view<'a>(s: &'a CudaStorage, l: &Layout, n: usize, what: &str) -> Result<CudaView<'a, f32>> {
    match &s.slice {
        CudaStorageSlice::F32(x) if l.shape().elem_count() == n => view(x, l, what),
        CudaStorageSlice::F32(_) => candle_core::bail!("{what}: {n} elements expected, got {:?}", l.shape()),
        _ => candle_core::bail!("{what}: f32 operands only, got {:?}", s.dtype()),
    }
}

/// The f32 elements of the contiguous operand an in-place kernel updates.
fn f32_view_mut<'a>(s: &'a mut CudaStorage, l: &Layout, what: &str) -> Result<CudaViewMut<'a, f32>> {
    let dtype = s.dtype();
    let CudaStorageSlice::F32(v) = &mut s.slice else {
        candle_core::bail!("{what}: f32 operands only, got {dtype:?}")
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!(
            "{what}: the updated operand must be contiguous, got strides {:?}",
            l.stride()
        )
    };
    Ok(v.slice_mut(start..end))
}

/// Runs `sgd_momentum` or `sgd_apply` on `target` (updated in place) with the read-only `a` and `b`.
fn sgd_in_place(
    kernel: &str,
    (target, tl): (&mut CudaStorage, &Layout),
    (a, al): (&CudaStorage, &Layout),
    (b, bl): (&CudaStorage, &Layout),
    (lr, momentum, weight_decay): (f32, f32, f32),
    flag: i32,
) -> Result<()> {
    let n = tl.shape().elem_count();
    let dev = target.device().clone();
    let (a, b) = (f32_view(a, al, n, kernel)?, f32_view(b, bl, n, kernel)?);
    let mut t = f32_view_mut(target, tl, kernel)?;
    let f = KERNELS.func(&dev, kernel)?;
    let stream = dev.cuda_stream();
    let n64 = n as u64;
    let mut args = stream.launch_builder(&f);
    args.arg(&mut t)
        .arg(&a)
        .arg(&b)
        .arg(&n64)
        .arg(&lr)
        .arg(&momentum)
        .arg(&weight_decay)
        .arg(&flag);
    // SAFETY: (float*, const float*, const float*, u64, float, float, float, int) as both SGD kernels take them; all
    // three buffers hold n elements.
    unsafe { args.launch(grid(n64)) }.map_err(|e| KERNELS.launch_err(kernel, e))?;
    Ok(())
}

/// `buf ← g'` (`first`) or `momentum·buf + g'`, with `g' = grad + weight_decay·weight`, in place; f32 CUDA operands
/// of one size.
pub fn sgd_momentum_in_place(
    buf: (&mut CudaStorage, &Layout),
    grad: (&CudaStorage, &Layout),
    weight: (&CudaStorage, &Layout),
    momentum: f32,
    weight_decay: f32,
    first: bool,
) -> Result<()> {
    sgd_in_place(
        "sgd_momentum",
        buf,
        grad,
        weight,
        (0.0, momentum, weight_decay),
        i32::from(first),
    )
}

/// `weight ← weight − lr·d` in place, `d` as [`SgdRule`] says; f32 CUDA operands of one size.
pub fn sgd_apply_in_place(
    weight: (&mut CudaStorage, &Layout),
    grad: (&CudaStorage, &Layout),
    buf: (&CudaStorage, &Layout),
    (lr, momentum, weight_decay): (f32, f32, f32),
    rule: SgdRule,
) -> Result<()> {
    sgd_in_place(
        "sgd_apply",
        weight,
        grad,
        buf,
        (lr, momentum, weight_decay),
        rule as i32,
    )
}

/// `running ← running·keep + (batch·scale)·momentum` in place (`model::ops::running_stats`); f32 CUDA operands of
/// one size.
pub fn running_update_in_place(
    (running, rl): (&mut CudaStorage, &Layout),
    (batch, bl): (&CudaStorage, &Layout),
    (keep, scale, momentum): (f32, f32, f32),
) -> Result<()> {
    const KERNEL: &str = "running_update";
    let n = rl.shape().elem_count();
    let dev = running.device().clone();
    let b = f32_view(batch, bl, n, KERNEL)?;
    let mut r = f32_view_mut(running, rl, KERNEL)?;
    let f = KERNELS.func(&dev, KERNEL)?;
    let stream = dev.cuda_stream();
    let n64 = n as u64;
    let mut args = stream.launch_builder(&f);
    args.arg(&mut r).arg(&b).arg(&n64).arg(&keep).arg(&scale).arg(&momentum);
    // SAFETY: (float*, const float*, u64, float, float, float) as `running_update` takes them; both buffers hold n
    // elements.
    unsafe { args.launch(grid(n64)) }.map_err(|e| KERNELS.launch_err(KERNEL, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    /// NVRTC needs no GPU and no driver: this runs wherever the toolkit's libnvrtc is on the library path.
    #[test]
    fn the_kernels_compile_with_nvrtc() {
        let ptx = super::KERNELS.ptx().expect("NVRTC compiles the elementwise kernels");
        for name in [
            "add_relu_f32",
            "add_relu_bf16",
            "relu_mask_f32",
            "relu_mask_bf16",
            "max_pool_f32",
            "max_pool_bf16",
            "max_pool_backward_f32",
            "max_pool_backward_bf16",
            "cross_entropy",
            "cross_entropy_backward",
            "sgd_momentum",
            "sgd_apply",
            "running_update",
            "dropout_f32",
            "dropout_bf16",
        ] {
            assert!(ptx.contains(&format!(".entry {name}(")), "{name} missing from the PTX");
        }
    }
}
