//! Differentiable operations that Candle 0.11 lacks (or gets wrong) for training.
//!
//! Two kinds. Compositions of Candle's own differentiable ops run on every device and get their backward for free:
//! - [`resize::resize_bilinear`]: PyTorch's `interpolate(mode="bilinear", align_corners=False)` as two matmuls
//!   with interpolation matrices (Candle's `upsample_bilinear2d` has no backward); for inference on the CPU in
//!   f32, two taps along each axis directly;
//! - [`pool::max_pool_3x3_s2`]: the ResNet stem's max-pool (Candle's backward needs kernel == stride); one op of
//!   its own on the CPU (f32/f64) and on CUDA (f32/bf16, `elementwise_cuda`), the composition elsewhere;
//! - [`pool::adaptive_avg_pool2d`]: PyTorch's adaptive average pooling, bins that do not divide the input included;
//! - [`polyphase::conv2d_polyphase`]: a dilated "same" convolution as an undilated one over the polyphase
//!   sub-images, which [`conv::conv2d`] uses for ASPP's f32 convolutions on CUDA.
//!
//! Custom ops with kernels of their own; each dispatches on the device inside the op, so callers never branch:
//! - [`batch_norm::batch_norm_train`]: training-mode BatchNorm2d fused into one op (forward and backward two passes
//!   each, instead of ten composed nodes with full-size intermediates), ReLU optionally fused. CPU f32/f64, and with
//!   the `cuda` feature CUDA f32/bf16 with f32 parameters (`batch_norm_cuda`: NVRTC kernels, statistics left on
//!   the GPU). Other devices and dtypes take the composed path in [`crate::model::layers`] (see
//!   [`batch_norm::supports`]);
//! - [`add_relu::add_relu`]: a residual block's shortcut add and ReLU in one op (CPU f32/f64, CUDA f32/bf16), one
//!   mask pass backward instead of five;
//! - the training loss (`crate::train::loss::cross_entropy`) is one op on the CPU and two kernels on CUDA
//!   (`elementwise_cuda`);
//! - [`conv::conv2d`]: a convolution whose backward works when height and width have different parity (Candle's
//!   uses one `output_padding` for both axes). On the CPU, when a gradient is needed, it runs as im2col + matmul
//!   custom ops (Candle's CPU conv backward is about six forward passes; this one is about two); with the `cuda`
//!   feature, f32/bf16 on CUDA runs on cuDNN forward, backward-data and backward-filter (`conv_cuda`; TF32 only
//!   when [`crate::model::precision::tf32_allowed`]); elsewhere it is Candle's own `conv2d`. CPU inference goes
//!   through [`conv::conv2d_fused`] to [`conv_cpu`]'s kernels (1×1 products on `gemm_f32` where the CPU has AVX2
//!   and no AVX-512, on `pointwise_avx512` with their epilogue in registers where it has AVX-512, Winograd, tap-wise products for dilated convolutions, im2col otherwise: a tile of output rows
//!   per task for the stem and the strided convolutions, [`row_tiles`]), the bias, residual and ReLU fused in. On
//!   small feature maps (up to 16×16, strided ones up to 32×32) the forward pass and both
//!   gradients run for the whole batch at once ([`small_maps`]), in training and inference.
//!
//! Every gradient is checked against central finite differences in f64 ([`gradcheck`]); [`device_check`] compares
//! a device's ops with the f64 CPU reference in each precision mode (`semseg device-check` on a GPU), and
//! [`op_timing`] times each op of a training step alone (`semseg device-check --timing`).

pub mod add_relu;
pub mod batch_norm;
#[cfg(feature = "cuda")]
pub mod batch_norm_cuda;
pub mod conv;
pub mod conv_cpu;
pub mod conv_cpu_backward;
#[cfg(feature = "cuda")]
pub mod conv_cuda;
#[cfg(feature = "cuda")]
mod cuda_kernels;
pub mod device_check;
pub mod dropout;
#[cfg(feature = "cuda")]
pub mod elementwise_cuda;
mod epilogue;
pub mod gemm_bf16;
mod gemm_blocks;
mod gemm_f32;
pub mod op_timing;
mod pointwise_avx512;
pub mod polyphase;
pub mod pool;
pub mod profile;
pub mod resize;
mod row_tiles;
pub mod running_stats;
mod small_maps;
mod tapwise;
mod winograd;

#[cfg(test)]
pub(crate) mod gradcheck;

use candle_core::{DType, Device, Layout, Result, Tensor};

/// A buffer for a kernel's output, left as the allocator gives it: for kernels that write every element before
/// they read any (the convolutions' outputs and input gradients, tested with NaN-filled outputs; BatchNorm's and
/// the fused add + ReLU's element maps, which zip the output with inputs of its length). Zeroing it first would be
/// one more pass over the whole output, from memory for the large ones (`vec![0.0; n]` reuses freed memory with a
/// `memset`: 1.5% of DeepLabV3-ResNet-50's inference at 512² on Zen 4, 3% of its training step on an Intel Xeon).
#[allow(clippy::uninit_vec)] // as Candle's own `CpuDevice::alloc_uninit`, for kernels that write every element
pub(crate) fn output_buffer<T: candle_core::WithDType>(len: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(len);
    // SAFETY: the capacity is `len`; the buffer goes only to kernels that write each element before they read
    // it, so no uninitialised value is ever read (the element types are plain numbers, valid for any bits).
    unsafe { out.set_len(len) };
    out
}

/// The part of a custom op's input storage that `l` covers, which must be contiguous.
pub(crate) fn contiguous_slice<'a, T>(v: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// [`contiguous_slice`] of the operand an in-place op updates.
pub(crate) fn contiguous_slice_mut<'a, T>(v: &'a mut [T], l: &Layout, what: &str) -> Result<&'a mut [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&mut v[start..end]),
        None => candle_core::bail!("{what}: the updated operand must be contiguous"),
    }
}

/// Applies `rows` (`[oh, h]`) along H and `cols_t` (`[w, ow]`) along W of `x` (`[B, C, h, w]`):
/// `y[b, c] = rows · x[b, c] · cols_t`, giving `[B, C, oh, ow]`. Either matrix may be `None` (identity).
/// Matmuls are differentiable in Candle, so any separable linear resampling gets its backward from here.
pub(crate) fn separable_apply(x: &Tensor, rows: Option<&Tensor>, cols_t: Option<&Tensor>) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let mut y = x.clone();
    let mut ow = w;
    if let Some(m) = cols_t {
        ow = m.dim(1)?;
        // [B·C·h, w] · [w, ow] → [B·C·h, ow]
        y = y.contiguous()?.reshape((b * c * h, w))?.matmul(m)?;
    }
    let mut oh = h;
    if let Some(m) = rows {
        oh = m.dim(0)?;
        // [oh, h] · [B·C, h, ow] (the matrix broadcast over the batch, not copied) → [B·C, oh, ow]
        let y3 = y.reshape((b * c, h, ow))?.contiguous()?;
        y = m.broadcast_left(b * c)?.matmul(&y3)?;
    }
    y.reshape((b, c, oh, ow))
}

/// A row-major `[rows, cols]` matrix of f64 weights as a tensor of the given dtype and device.
pub(crate) fn matrix(data: Vec<f64>, rows: usize, cols: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::from_vec(data, (rows, cols), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}
