//! The GPU convolution on cuDNN: forward, input gradient (backward-data) and weight gradient (backward-filter),
//! as one Candle custom op whose backward runs two more no-backward custom ops.
//!
//! Candle 0.11 without its `cudnn` feature convolves on the GPU by im2col + one gemm, and its backward computes the
//! input gradient with a naive one-thread-per-output `conv_transpose2d` kernel (even for the image, which needs no
//! gradient) and the weight gradient with another im2col convolution. Here all three passes are cuDNN calls:
//!
//! - data NCHW contiguous, filter `[Cout, Cin, k, k]`, cross-correlation, padding/stride/dilation equal on both axes;
//! - dtypes: f32 (compute f32; math `CUDNN_FMA_MATH` — no TF32 — unless [`precision::tf32_allowed`], then
//!   cuDNN's default math, TF32 tensor cores on sm80+) and bf16 (bf16 data, f32 accumulation, tensor-op math);
//! - one cuDNN handle per (thread, Candle device), created on Candle's own stream, so every call is ordered with
//!   Candle's kernels without synchronising;
//! - the algorithm of each (pass, shape, dtype, math) is chosen once per thread and cached: by timing every
//!   algorithm on the call's own buffers (`cudnnFind*AlgorithmEx`, as PyTorch does with `cudnn.benchmark = True`),
//!   or by cuDNN's heuristics (`cudnnGet*Algorithm_v7`, as PyTorch's default); the fastest (or best-ranked) whose
//!   workspace fits in [`WORKSPACE_LIMIT`]. Timing pays where a shape repeats (training at a fixed crop), not where
//!   shapes follow the images (serving: each new size would pay for timing every algorithm of every layer), so the
//!   command chooses ([`set_algorithm_timing`]; `SEMSEG_CUDNN_BENCHMARK=1|0` overrides it). Strict f32 runs with
//!   `CUDNN_FMA_MATH` only and without the FFT and Winograd algorithms, whose transforms round differently;
//! - the workspace is allocated per call from Candle's stream-ordered pool and freed on the same stream.
//!
//! The input gradient is skipped when the input needs none (the image), decided when the op is built.
//!
//! [`precision::tf32_allowed`]: crate::model::precision::tf32_allowed

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, DeviceId};
use candle_core::{CustomOp2, DType, Layout, Result, Shape, Tensor};
use cudarc::cudnn::{result as dnn, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};

use super::cuda_kernels::contiguous_view;
use crate::model::precision;

/// Largest workspace one convolution may use; algorithms that need more are passed over.
pub const WORKSPACE_LIMIT: usize = 256 << 20;

/// `x` `[B, Cin, H, W]` ⊛ `weight` `[Cout, Cin, k, k]` on cuDNN; x must be f32 or bf16 on a CUDA device. A weight
/// of another dtype (f32 master weights under bf16 activations) is cast to x's dtype first, differentiably.
pub fn conv2d(x: &Tensor, weight: &Tensor, padding: usize, stride: usize, dilation: usize) -> Result<Tensor> {
    if !matches!(x.dtype(), DType::F32 | DType::BF16) {
        candle_core::bail!("conv2d (cuDNN): input dtype {:?}, expected f32 or bf16", x.dtype())
    }
    let x = x.contiguous()?;
    let weight = weight.to_dtype(x.dtype())?.contiguous()?; // a no-op when the dtypes agree
    let geometry = Geometry::new(x.dims(), weight.dims(), padding, stride, dilation)?;
    x.apply_op2(
        &weight,
        CudnnConv2d {
            geometry,
            input_grad: x.track_op(),
        },
    )
}

/// The sizes of one convolution, checked to fit cuDNN's `int` dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Geometry {
    b: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    k: usize,
    padding: usize,
    stride: usize,
    dilation: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    fn new(x: &[usize], weight: &[usize], padding: usize, stride: usize, dilation: usize) -> Result<Self> {
        let (&[b, cin, h, w], &[cout, wcin, k, k2]) = (x, weight) else {
            candle_core::bail!("conv2d (cuDNN): input {x:?} and weight {weight:?} must both be 4-D")
        };
        if wcin != cin || k != k2 || k == 0 {
            candle_core::bail!("conv2d (cuDNN): input {x:?} and weight {weight:?} do not fit (square kernels only)")
        }
        if stride == 0 || dilation == 0 {
            candle_core::bail!("conv2d (cuDNN): stride {stride} and dilation {dilation} must be positive")
        }
        let span = dilation * (k - 1) + 1;
        if h + 2 * padding < span || w + 2 * padding < span {
            candle_core::bail!(
                "conv2d (cuDNN): input {x:?} with padding {padding} is smaller than the kernel span {span}"
            )
        }
        let oh = (h + 2 * padding - span) / stride + 1;
        let ow = (w + 2 * padding - span) / stride + 1;
        let g = Self {
            b,
            cin,
            h,
            w,
            cout,
            k,
            padding,
            stride,
            dilation,
            oh,
            ow,
        };
        // cuDNN's legacy API takes int dimensions and fails on tensors of 2^31 elements or more.
        for (what, n) in [
            ("input", b * cin * h * w),
            ("output", b * cout * oh * ow),
            ("weight", cout * cin * k * k),
        ] {
            if n > i32::MAX as usize {
                candle_core::bail!("conv2d (cuDNN): the {what} of {g:?} has {n} elements, more than cuDNN's 2^31 - 1")
            }
        }
        Ok(g)
    }

    fn x_dims(&self) -> [i32; 4] {
        [self.b, self.cin, self.h, self.w].map(|d| d as i32)
    }

    fn w_dims(&self) -> [i32; 4] {
        [self.cout, self.cin, self.k, self.k].map(|d| d as i32)
    }

    fn y_dims(&self) -> [i32; 4] {
        [self.b, self.cout, self.oh, self.ow].map(|d| d as i32)
    }

    fn x_len(&self) -> usize {
        self.b * self.cin * self.h * self.w
    }

    fn w_len(&self) -> usize {
        self.cout * self.cin * self.k * self.k
    }

    fn y_len(&self) -> usize {
        self.b * self.cout * self.oh * self.ow
    }
}

/// The forward op: `(x, weight) → y`; backward through two [`Backward`] ops.
struct CudnnConv2d {
    geometry: Geometry,
    /// Whether x needs a gradient (false for the image): recorded when the op is built.
    input_grad: bool,
}

impl CustomOp2 for CudnnConv2d {
    fn name(&self) -> &'static str {
        "semseg-cudnn-conv2d"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("semseg-cudnn-conv2d runs on CUDA devices only")
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout, ws: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, Shape)> {
        let g = &self.geometry;
        check_layout(xl, g.x_len(), "input")?;
        check_layout(wl, g.w_len(), "weight")?;
        let out = run_pass(Pass::Forward, g, (xs, xl), (ws, wl), g.y_len())?;
        Ok((out, Shape::from_dims(&[g.b, g.cout, g.oh, g.ow])))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        gradients(&self.geometry, x, w, grad, (self.input_grad, w.track_op()))
    }
}

/// The gradients of `x ⊛ w` (undilated, stride 1, `padding`) for the output gradient `dy`, outside the graph: (∂x
/// when `input_grad`, ∂w), in x's dtype. For convolutions whose forward ran elsewhere (`polyphase`).
pub fn conv2d_grads(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    padding: usize,
    input_grad: bool,
) -> Result<(Option<Tensor>, Tensor)> {
    let w = w.to_dtype(x.dtype())?;
    let geometry = Geometry::new(x.dims(), w.dims(), padding, 1, 1)?;
    match gradients(&geometry, x, &w, dy, (input_grad, true))? {
        (dx, Some(dw)) => Ok((dx, dw)),
        (_, None) => candle_core::bail!("conv2d (cuDNN): the weight gradient was asked for but not computed"),
    }
}

/// Backward-data (when `wanted.0`) and backward-filter (when `wanted.1`) for `geometry`.
fn gradients(
    geometry: &Geometry,
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    wanted: (bool, bool),
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let grad = grad.to_dtype(x.dtype())?.contiguous()?;
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let pass = |pass, (a, b): (&Tensor, &Tensor)| {
        a.apply_op2_no_bwd(
            b,
            &Backward {
                pass,
                geometry: *geometry,
            },
        )
    };
    let dx = wanted.0.then(|| pass(Pass::BackwardData, (&grad, &w))).transpose()?;
    let dw = wanted.1.then(|| pass(Pass::BackwardFilter, (&x, &grad))).transpose()?;
    Ok((dx, dw))
}

/// One gradient pass as a no-backward op: backward-data `(dy, weight) → dx`, backward-filter `(x, dy) → dweight`.
struct Backward {
    pass: Pass,
    geometry: Geometry,
}

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        match self.pass {
            Pass::BackwardFilter => "semseg-cudnn-conv2d-backward-filter",
            _ => "semseg-cudnn-conv2d-backward-data",
        }
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("{} runs on CUDA devices only", self.name())
    }

    fn cuda_fwd(&self, a: &CudaStorage, al: &Layout, b: &CudaStorage, bl: &Layout) -> Result<(CudaStorage, Shape)> {
        let g = &self.geometry;
        let (a_len, b_len, out_dims, names) = match self.pass {
            Pass::BackwardFilter => (
                g.x_len(),
                g.y_len(),
                [g.cout, g.cin, g.k, g.k],
                ("input", "output gradient"),
            ),
            _ => (
                g.y_len(),
                g.w_len(),
                [g.b, g.cin, g.h, g.w],
                ("output gradient", "weight"),
            ),
        };
        check_layout(al, a_len, names.0)?;
        check_layout(bl, b_len, names.1)?;
        let out = run_pass(self.pass, g, (a, al), (b, bl), out_dims.iter().product())?;
        Ok((out, Shape::from_dims(&out_dims)))
    }
}

/// The op's inputs are made contiguous before it runs; a start offset is allowed (taken off in [`contiguous_view`]).
fn check_layout(l: &Layout, len: usize, what: &str) -> Result<()> {
    match l.contiguous_offsets() {
        Some((start, end)) if end - start == len => Ok(()),
        Some((start, end)) => candle_core::bail!(
            "conv2d (cuDNN): the {what} has {} elements, expected {len}",
            end - start
        ),
        None => candle_core::bail!(
            "conv2d (cuDNN): the {what} must be contiguous, got strides {:?}",
            l.stride()
        ),
    }
}

/// Runs one cuDNN pass on its two operands (in [`launch`]'s order: forward x, w; backward-data dy, w;
/// backward-filter x, dy), both f32 or both bf16, into a fresh output of `out_len` elements.
fn run_pass(
    pass: Pass,
    g: &Geometry,
    (a, al): (&CudaStorage, &Layout),
    (b, bl): (&CudaStorage, &Layout),
    out_len: usize,
) -> Result<CudaStorage> {
    let dev = a.device();
    match (&a.slice, &b.slice) {
        (CudaStorageSlice::F32(a), CudaStorageSlice::F32(b)) => {
            let out = run_typed(dev, pass, g, DType::F32, (a, al), (b, bl), out_len)?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(b)) => {
            let out = run_typed(dev, pass, g, DType::BF16, (a, al), (b, bl), out_len)?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        _ => candle_core::bail!(
            "conv2d {pass:?} (cuDNN): operands {:?} and {:?} must both be f32 or both bf16",
            a.dtype(),
            b.dtype()
        ),
    }
}

fn run_typed<T: DeviceRepr>(
    dev: &CudaDevice,
    pass: Pass,
    g: &Geometry,
    dtype: DType,
    (a, al): (&CudaSlice<T>, &Layout),
    (b, bl): (&CudaSlice<T>, &Layout),
    out_len: usize,
) -> Result<CudaSlice<T>> {
    let stream = dev.cuda_stream();
    let (a, b) = (
        contiguous_view(a, al, "conv2d (cuDNN)", "first operand")?,
        contiguous_view(b, bl, "conv2d (cuDNN)", "second operand")?,
    );
    // SAFETY: cuDNN writes every element of the output (beta = 0) before anything reads it.
    let mut out = unsafe { dev.alloc::<T>(out_len) }?;
    {
        let (ap, _a_read) = a.device_ptr(&stream);
        let (bp, _b_read) = b.device_ptr(&stream);
        let (op, _out_write) = out.device_ptr_mut(&stream);
        launch(dev, &stream, pass, g, dtype, [ap, bp, op])?;
    }
    Ok(out)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Pass {
    Forward,
    BackwardData,
    BackwardFilter,
}

/// What the heuristics chose for one (pass, geometry, dtype, math), cached per thread and device.
#[derive(Clone, Copy, Debug)]
struct Choice {
    /// The algorithm as its raw enum value (the three passes have different enums).
    algo: u32,
    math: sys::cudnnMathType_t,
    workspace: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    device: DeviceId,
    pass: Pass,
    geometry: Geometry,
    dtype: DType,
    tf32: bool,
}

/// A cuDNN handle bound to one Candle device's stream.
struct Handle {
    raw: sys::cudnnHandle_t,
    stream: Arc<CudaStream>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // At thread exit the context may already be gone: nothing useful to do with an error here.
        let _ = self.stream.context().bind_to_thread();
        let _ = unsafe { dnn::destroy_handle(self.raw) };
    }
}

thread_local! {
    /// cuDNN handles are not thread-safe: one per thread and Candle device (as Candle's own `cudnn.rs` does).
    static HANDLES: RefCell<HashMap<DeviceId, Rc<Handle>>> = RefCell::new(HashMap::new());
    /// Each shape's algorithm, with the descriptors it runs with (made once: a call then makes no cuDNN objects).
    static CHOICES: RefCell<HashMap<Key, (Rc<Descriptors>, Choice)>> = RefCell::new(HashMap::new());
}

/// This thread's cuDNN handle for `dev`, created on Candle's stream the first time.
fn handle(dev: &CudaDevice) -> Result<Rc<Handle>> {
    let id = dev.id();
    if let Some(h) = HANDLES.with_borrow(|m| m.get(&id).cloned()) {
        return Ok(h);
    }
    let stream = dev.cuda_stream();
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| cuda_err("binding the CUDA context", e))?;
    let raw = dnn::create_handle().map_err(|e| {
        cuda_err(
            "cudnnCreate (is libcudnn.so.9 on LD_LIBRARY_PATH, and its version at least the 9.x the binary was \
             built with?)",
            e,
        )
    })?;
    let h = Rc::new(Handle { raw, stream });
    // SAFETY: the handle was just created; the stream outlives it (the handle holds an Arc to it).
    unsafe { dnn::set_stream(h.raw, h.stream.cu_stream() as sys::cudaStream_t) }
        .map_err(|e| cuda_err("cudnnSetStream", e))?;
    HANDLES.with_borrow_mut(|m| m.insert(id, h.clone()));
    Ok(h)
}

fn cuda_err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Cuda(format!("{what}: {e:?}").into())
}

fn data_type(dtype: DType) -> Result<sys::cudnnDataType_t> {
    match dtype {
        DType::F32 => Ok(sys::cudnnDataType_t::CUDNN_DATA_FLOAT),
        DType::BF16 => Ok(sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16),
        other => candle_core::bail!("conv2d (cuDNN): unsupported dtype {other:?}"),
    }
}

struct TensorDesc(sys::cudnnTensorDescriptor_t);

impl TensorDesc {
    fn new(dtype: sys::cudnnDataType_t, dims: [i32; 4]) -> Result<Self> {
        let d = Self(dnn::create_tensor_descriptor().map_err(|e| cuda_err("cudnnCreateTensorDescriptor", e))?);
        // SAFETY: the descriptor was just created.
        unsafe { dnn::set_tensor4d_descriptor(d.0, sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW, dtype, dims) }
            .map_err(|e| cuda_err(&format!("cudnnSetTensor4dDescriptor {dims:?}"), e))?;
        Ok(d)
    }
}

impl Drop for TensorDesc {
    fn drop(&mut self) {
        let _ = unsafe { dnn::destroy_tensor_descriptor(self.0) };
    }
}

struct FilterDesc(sys::cudnnFilterDescriptor_t);

impl FilterDesc {
    fn new(dtype: sys::cudnnDataType_t, dims: [i32; 4]) -> Result<Self> {
        let d = Self(dnn::create_filter_descriptor().map_err(|e| cuda_err("cudnnCreateFilterDescriptor", e))?);
        // SAFETY: the descriptor was just created.
        unsafe { dnn::set_filter4d_descriptor(d.0, dtype, sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW, dims) }
            .map_err(|e| cuda_err(&format!("cudnnSetFilter4dDescriptor {dims:?}"), e))?;
        Ok(d)
    }
}

impl Drop for FilterDesc {
    fn drop(&mut self) {
        let _ = unsafe { dnn::destroy_filter_descriptor(self.0) };
    }
}

struct ConvDesc(sys::cudnnConvolutionDescriptor_t);

impl ConvDesc {
    /// Cross-correlation with f32 accumulation (for f32 and bf16 data alike) and the given math type.
    fn new(g: &Geometry, math: sys::cudnnMathType_t) -> Result<Self> {
        let d =
            Self(dnn::create_convolution_descriptor().map_err(|e| cuda_err("cudnnCreateConvolutionDescriptor", e))?);
        let (p, s, dl) = (g.padding as i32, g.stride as i32, g.dilation as i32);
        // SAFETY: the descriptor was just created.
        unsafe {
            dnn::set_convolution2d_descriptor(
                d.0,
                p,
                p,
                s,
                s,
                dl,
                dl,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
        }
        .map_err(|e| cuda_err(&format!("cudnnSetConvolution2dDescriptor {g:?}"), e))?;
        d.set_math(math)?;
        Ok(d)
    }

    fn set_math(&self, math: sys::cudnnMathType_t) -> Result<()> {
        // SAFETY: the descriptor is alive.
        unsafe { dnn::set_convolution_math_type(self.0, math) }
            .map_err(|e| cuda_err(&format!("cudnnSetConvolutionMathType {math:?}"), e))
    }
}

impl Drop for ConvDesc {
    fn drop(&mut self) {
        let _ = unsafe { dnn::destroy_convolution_descriptor(self.0) };
    }
}

/// The math type asked of the heuristics: strict f32 is FMA only (no TF32); f32 with TF32 allowed takes cuDNN's
/// default (TF32 tensor cores on sm80+), bf16 tensor-op math. (PyTorch's choices for the same three cases.)
fn requested_math(dtype: DType, tf32: bool) -> sys::cudnnMathType_t {
    match (dtype, tf32) {
        (DType::F32, false) => sys::cudnnMathType_t::CUDNN_FMA_MATH,
        (DType::F32, true) => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
        _ => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    }
}

/// One heuristic result, whichever pass it is for.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    algo: u32,
    status: sys::cudnnStatus_t,
    math: sys::cudnnMathType_t,
    memory: usize,
}

/// A heuristic or timed result of any of the three passes.
trait AlgoPerf {
    fn candidate(&self) -> Candidate;
}

macro_rules! algo_perf {
    ($($perf:ty),*) => {$(
        impl AlgoPerf for $perf {
            fn candidate(&self) -> Candidate {
                Candidate {
                    algo: self.algo as u32,
                    status: self.status,
                    math: self.mathType,
                    memory: self.memory,
                }
            }
        }
    )*};
}

algo_perf!(
    sys::cudnnConvolutionFwdAlgoPerf_t,
    sys::cudnnConvolutionBwdDataAlgoPerf_t,
    sys::cudnnConvolutionBwdFilterAlgoPerf_t
);

/// The first `n` entries cuDNN filled in (`n` as it returned it, clamped to the array).
fn returned<P: AlgoPerf>(perf: &[P], n: std::ffi::c_int) -> Vec<Candidate> {
    perf[..(n.max(0) as usize).min(perf.len())]
        .iter()
        .map(AlgoPerf::candidate)
        .collect()
}

/// The descriptors of one shape, built from the geometry and dtype (and kept with its algorithm in `CHOICES`).
struct Descriptors {
    x: TensorDesc,
    w: FilterDesc,
    y: TensorDesc,
    conv: ConvDesc,
}

impl Descriptors {
    fn new(g: &Geometry, dtype: DType, math: sys::cudnnMathType_t) -> Result<Self> {
        let dt = data_type(dtype)?;
        Ok(Self {
            x: TensorDesc::new(dt, g.x_dims())?,
            w: FilterDesc::new(dt, g.w_dims())?,
            y: TensorDesc::new(dt, g.y_dims())?,
            conv: ConvDesc::new(g, math)?,
        })
    }

    /// cuDNN's heuristic ranking for `pass`, best first.
    fn candidates(&self, h: &Handle, pass: Pass) -> Result<Vec<Candidate>> {
        let mut n: std::ffi::c_int = 0;
        // SAFETY (all three): the handle and descriptors are alive; the perf array has `requested` entries and
        // cuDNN writes at most that many; zeroed entries are valid values of every field (all enums have a 0).
        let out = match pass {
            Pass::Forward => {
                const COUNT: usize = sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_COUNT as usize;
                let mut perf = [unsafe { std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>() }; COUNT];
                unsafe {
                    dnn::get_convolution_forward_algorithm(
                        h.raw,
                        self.x.0,
                        self.w.0,
                        self.conv.0,
                        self.y.0,
                        COUNT as i32,
                        &mut n,
                        perf.as_mut_ptr(),
                    )
                }
                .map_err(|e| cuda_err("cudnnGetConvolutionForwardAlgorithm_v7", e))?;
                returned(&perf, n)
            }
            Pass::BackwardData => {
                const COUNT: usize = sys::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT as usize;
                let mut perf = [unsafe { std::mem::zeroed::<sys::cudnnConvolutionBwdDataAlgoPerf_t>() }; COUNT];
                unsafe {
                    dnn::get_convolution_backward_data_algorithm(
                        h.raw,
                        self.w.0,
                        self.y.0,
                        self.conv.0,
                        self.x.0,
                        COUNT as i32,
                        &mut n,
                        perf.as_mut_ptr(),
                    )
                }
                .map_err(|e| cuda_err("cudnnGetConvolutionBackwardDataAlgorithm_v7", e))?;
                returned(&perf, n)
            }
            Pass::BackwardFilter => {
                const COUNT: usize =
                    sys::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT as usize;
                let mut perf = [unsafe { std::mem::zeroed::<sys::cudnnConvolutionBwdFilterAlgoPerf_t>() }; COUNT];
                unsafe {
                    dnn::get_convolution_backward_filter_algorithm(
                        h.raw,
                        self.x.0,
                        self.y.0,
                        self.conv.0,
                        self.w.0,
                        COUNT as i32,
                        &mut n,
                        perf.as_mut_ptr(),
                    )
                }
                .map_err(|e| cuda_err("cudnnGetConvolutionBackwardFilterAlgorithm_v7", e))?;
                returned(&perf, n)
            }
        };
        Ok(out)
    }

    /// Every algorithm of `pass` run and timed by cuDNN on the call's own buffers (`ptrs` as in [`launch`]; the
    /// output is overwritten), fastest first.
    fn measured(
        &self,
        h: &Handle,
        pass: Pass,
        ptrs: [*mut std::ffi::c_void; 3],
        workspace: (*mut std::ffi::c_void, usize),
    ) -> Result<Vec<Candidate>> {
        let [a, b, c] = ptrs;
        let (ws, ws_len) = workspace;
        let mut n: std::ffi::c_int = 0;
        // SAFETY (all three): handle, descriptors and buffers are alive and match (see `launch`); the perf array
        // has `COUNT` entries and cuDNN writes at most that many; zeroed entries are valid values of every field.
        let out = match pass {
            Pass::Forward => {
                const COUNT: usize = sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_COUNT as usize;
                let mut perf = [unsafe { std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>() }; COUNT];
                unsafe {
                    sys::cudnnFindConvolutionForwardAlgorithmEx(
                        h.raw,
                        self.x.0,
                        a,
                        self.w.0,
                        b,
                        self.conv.0,
                        self.y.0,
                        c,
                        COUNT as i32,
                        &mut n,
                        perf.as_mut_ptr(),
                        ws,
                        ws_len,
                    )
                }
                .result()
                .map_err(|e| cuda_err("cudnnFindConvolutionForwardAlgorithmEx", e))?;
                returned(&perf, n)
            }
            Pass::BackwardData => {
                const COUNT: usize = sys::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT as usize;
                let mut perf = [unsafe { std::mem::zeroed::<sys::cudnnConvolutionBwdDataAlgoPerf_t>() }; COUNT];
                unsafe {
                    sys::cudnnFindConvolutionBackwardDataAlgorithmEx(
                        h.raw,
                        self.w.0,
                        b,
                        self.y.0,
                        a,
                        self.conv.0,
                        self.x.0,
                        c,
                        COUNT as i32,
                        &mut n,
                        perf.as_mut_ptr(),
                        ws,
                        ws_len,
                    )
                }
                .result()
                .map_err(|e| cuda_err("cudnnFindConvolutionBackwardDataAlgorithmEx", e))?;
                returned(&perf, n)
            }
            Pass::BackwardFilter => {
                const COUNT: usize =
                    sys::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT as usize;
                let mut perf = [unsafe { std::mem::zeroed::<sys::cudnnConvolutionBwdFilterAlgoPerf_t>() }; COUNT];
                unsafe {
                    sys::cudnnFindConvolutionBackwardFilterAlgorithmEx(
                        h.raw,
                        self.x.0,
                        a,
                        self.y.0,
                        b,
                        self.conv.0,
                        self.w.0,
                        c,
                        COUNT as i32,
                        &mut n,
                        perf.as_mut_ptr(),
                        ws,
                        ws_len,
                    )
                }
                .result()
                .map_err(|e| cuda_err("cudnnFindConvolutionBackwardFilterAlgorithmEx", e))?;
                returned(&perf, n)
            }
        };
        Ok(out)
    }

    /// Workspace bytes `algo` needs for `pass` with the descriptors as they are (math type included).
    fn workspace(&self, h: &Handle, pass: Pass, algo: u32) -> std::result::Result<usize, dnn::CudnnError> {
        // SAFETY: handle and descriptors alive; `algo` came from cuDNN's own ranking for this pass, so it is a
        // valid value of that pass's enum.
        unsafe {
            match pass {
                Pass::Forward => dnn::get_convolution_forward_workspace_size(
                    h.raw,
                    self.x.0,
                    self.w.0,
                    self.conv.0,
                    self.y.0,
                    fwd_algo(algo),
                ),
                Pass::BackwardData => dnn::get_convolution_backward_data_workspace_size(
                    h.raw,
                    self.w.0,
                    self.y.0,
                    self.conv.0,
                    self.x.0,
                    data_algo(algo),
                ),
                Pass::BackwardFilter => dnn::get_convolution_backward_filter_workspace_size(
                    h.raw,
                    self.x.0,
                    self.y.0,
                    self.conv.0,
                    self.w.0,
                    filter_algo(algo),
                ),
            }
        }
    }
}

// The algorithm enums are `#[repr(u32)]` with every value below their `*_COUNT` defined (checked in `choose`).
fn fwd_algo(a: u32) -> sys::cudnnConvolutionFwdAlgo_t {
    // SAFETY: `a` < CUDNN_CONVOLUTION_FWD_ALGO_COUNT, and the enum is contiguous from 0 to its count.
    unsafe { std::mem::transmute::<u32, sys::cudnnConvolutionFwdAlgo_t>(a) }
}

fn data_algo(a: u32) -> sys::cudnnConvolutionBwdDataAlgo_t {
    // SAFETY: as in `fwd_algo`.
    unsafe { std::mem::transmute::<u32, sys::cudnnConvolutionBwdDataAlgo_t>(a) }
}

fn filter_algo(a: u32) -> sys::cudnnConvolutionBwdFilterAlgo_t {
    // SAFETY: as in `fwd_algo`.
    unsafe { std::mem::transmute::<u32, sys::cudnnConvolutionBwdFilterAlgo_t>(a) }
}

/// Picks the best-ranked algorithm that succeeds and fits [`WORKSPACE_LIMIT`]; sets the descriptor's math type to
/// the chosen one.
///
/// Strict f32 never runs with anything but `CUDNN_FMA_MATH` on the descriptor (that, not the ranking, is what keeps
/// TF32 out). PyTorch relies on the heuristics ranking only FMA entries for an FMA descriptor; should some come back
/// with another math type, the FMA-ranked ones are tried first and the others only with FMA forced (an algorithm
/// that has no FMA variant then fails its workspace query and is passed over).
fn choose(h: &Handle, d: &Descriptors, pass: Pass, key: &Key, mut candidates: Vec<Candidate>) -> Result<Choice> {
    let requested = requested_math(key.dtype, key.tf32);
    let strict = key.dtype == DType::F32 && !key.tf32;
    let count = match pass {
        Pass::Forward => sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_COUNT as u32,
        Pass::BackwardData => sys::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT as u32,
        Pass::BackwardFilter => sys::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT as u32,
    };
    if strict {
        candidates.retain(|c| !transforms_operands(pass, c.algo));
        // Stable: the heuristics' order is kept within each group.
        candidates.sort_by_key(|c| c.math != sys::cudnnMathType_t::CUDNN_FMA_MATH);
    }
    let mut tried = Vec::new();
    for c in &candidates {
        let usable =
            c.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS && c.algo < count && c.memory <= WORKSPACE_LIMIT;
        if !usable {
            tried.push(format!("{}:{:?}/{:?}/{}B", c.algo, c.status, c.math, c.memory));
            continue;
        }
        // As PyTorch: the algorithm runs with the math type it was ranked with; strict f32 always with FMA.
        let math = if strict { requested } else { c.math };
        d.conv.set_math(math)?;
        match d.workspace(h, pass, c.algo) {
            Ok(ws) if ws <= WORKSPACE_LIMIT => {
                return Ok(Choice {
                    algo: c.algo,
                    math,
                    workspace: ws,
                })
            }
            Ok(ws) => tried.push(format!("{}:workspace {ws}B", c.algo)),
            Err(e) => tried.push(format!("{}:workspace query {e:?}", c.algo)),
        }
    }
    candidate_error(pass, key, requested, &tried)
}

/// Whether `algo` of `pass` computes in a transformed domain (FFT, Winograd), which rounds differently from a
/// direct sum of products: left out of strict f32.
fn transforms_operands(pass: Pass, algo: u32) -> bool {
    use sys::cudnnConvolutionBwdDataAlgo_t as D;
    use sys::cudnnConvolutionBwdFilterAlgo_t as F;
    use sys::cudnnConvolutionFwdAlgo_t as Fw;
    let transformed: &[u32] = match pass {
        Pass::Forward => &[
            Fw::CUDNN_CONVOLUTION_FWD_ALGO_FFT as u32,
            Fw::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING as u32,
            Fw::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD as u32,
            Fw::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED as u32,
        ],
        Pass::BackwardData => &[
            D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT as u32,
            D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING as u32,
            D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD as u32,
            D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED as u32,
        ],
        Pass::BackwardFilter => &[
            F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT as u32,
            F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING as u32,
            F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD as u32,
            F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED as u32,
        ],
    };
    transformed.contains(&algo)
}

/// Whether a new convolution shape has its algorithms timed; set once per process by [`set_algorithm_timing`].
static TIME_ALGORITHMS: AtomicBool = AtomicBool::new(true);

/// Whether a new convolution shape has its algorithms timed (`true`: the shapes repeat, as in training) or takes
/// cuDNN's heuristics (`false`: the shapes follow the images, as in serving); `compute::Compute::open` decides.
pub fn set_algorithm_timing(timed: bool) {
    TIME_ALGORITHMS.store(timed, Ordering::Relaxed);
}

fn benchmark() -> bool {
    TIME_ALGORITHMS.load(Ordering::Relaxed)
}

fn candidate_error(pass: Pass, key: &Key, math: sys::cudnnMathType_t, tried: &[String]) -> Result<Choice> {
    candle_core::bail!(
        "conv2d (cuDNN): no usable {pass:?} algorithm for {:?} {:?} with math {math:?} and a workspace of at most \
         {} MiB; candidates (algo:status/math/memory): [{}]",
        key.geometry,
        key.dtype,
        WORKSPACE_LIMIT >> 20,
        tried.join(", ")
    )
}

/// cuDNN's timings of every algorithm for this call, with a workspace of [`WORKSPACE_LIMIT`] to try them in.
fn time_algorithms(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    h: &Handle,
    d: &Descriptors,
    pass: Pass,
    ptrs: [cudarc::driver::sys::CUdeviceptr; 3],
) -> Result<Vec<Candidate>> {
    // SAFETY: cuDNN writes the workspace only during the call below, ordered on `stream`.
    let mut workspace = unsafe { dev.alloc::<u8>(WORKSPACE_LIMIT) }?;
    let (ws_ptr, _guard) = workspace.device_ptr_mut(stream);
    d.measured(
        h,
        pass,
        ptrs.map(|p| p as *mut std::ffi::c_void),
        (ws_ptr as *mut std::ffi::c_void, WORKSPACE_LIMIT),
    )
}

/// Runs one pass. `ptrs` are device pointers: forward `[x, w, y]`, backward-data `[dy, w, dx]`, backward-filter
/// `[x, dy, dw]`; the caller holds their stream guards across this call.
fn launch(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    pass: Pass,
    g: &Geometry,
    dtype: DType,
    ptrs: [cudarc::driver::sys::CUdeviceptr; 3],
) -> Result<()> {
    let tf32 = dtype == DType::F32 && precision::tf32_allowed();
    let key = Key {
        device: dev.id(),
        pass,
        geometry: *g,
        dtype,
        tf32,
    };
    let h = handle(dev)?;
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| cuda_err("binding the CUDA context", e))?;
    let cached = CHOICES.with_borrow(|m| m.get(&key).cloned());
    let (d, choice) = match cached {
        Some(hit) => hit,
        None => {
            let d = Descriptors::new(g, dtype, requested_math(dtype, tf32))?;
            let measured = if benchmark() {
                match time_algorithms(dev, stream, &h, &d, pass, ptrs) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        tracing::warn!(?pass, geometry = ?g, error = %e, "cuDNN could not time the algorithms; using its heuristics");
                        None
                    }
                }
            } else {
                None
            };
            let timed = measured.is_some();
            let candidates = match measured {
                Some(m) => m,
                None => d.candidates(&h, pass)?,
            };
            let c = choose(&h, &d, pass, &key, candidates)?;
            tracing::debug!(?pass, geometry = ?g, ?dtype, tf32, timed, algo = c.algo, math = ?c.math, workspace = c.workspace, "cuDNN algorithm chosen");
            // `choose` left the convolution descriptor with the chosen math.
            let d = Rc::new(d);
            CHOICES.with_borrow_mut(|m| m.insert(key, (d.clone(), c)));
            (d, c)
        }
    };
    // SAFETY: cuDNN writes into the workspace only during this call, which is ordered on `stream`; the slice is
    // freed (stream-ordered) after the call has been enqueued.
    let mut workspace = match choice.workspace {
        0 => None,
        n => Some(unsafe { dev.alloc::<u8>(n) }?),
    };
    let (alpha, beta) = (1f32, 0f32);
    let (alpha, beta) = (
        &alpha as *const f32 as *const std::ffi::c_void,
        &beta as *const f32 as *const std::ffi::c_void,
    );
    let ws_guard = workspace.as_mut().map(|w| w.device_ptr_mut(stream));
    let ws_ptr = ws_guard
        .as_ref()
        .map(|(p, _)| *p as *mut std::ffi::c_void)
        .unwrap_or(std::ptr::null_mut());
    let [a, b, c] = ptrs.map(|p| p as *mut std::ffi::c_void);
    // SAFETY: descriptors describe exactly the buffers behind `ptrs` (dims from the same geometry, dtype matched
    // by the callers, contiguous NCHW); alpha/beta are f32 as cuDNN requires for f32 and bf16 data; the workspace
    // has the size the chosen algorithm asked for.
    let status = unsafe {
        match pass {
            Pass::Forward => dnn::convolution_forward(
                h.raw,
                alpha,
                d.x.0,
                a,
                d.w.0,
                b,
                d.conv.0,
                fwd_algo(choice.algo),
                ws_ptr,
                choice.workspace,
                beta,
                d.y.0,
                c,
            ),
            Pass::BackwardData => dnn::convolution_backward_data(
                h.raw,
                alpha,
                d.w.0,
                b,
                d.y.0,
                a,
                d.conv.0,
                data_algo(choice.algo),
                ws_ptr,
                choice.workspace,
                beta,
                d.x.0,
                c,
            ),
            Pass::BackwardFilter => dnn::convolution_backward_filter(
                h.raw,
                alpha,
                d.x.0,
                a,
                d.y.0,
                b,
                d.conv.0,
                filter_algo(choice.algo),
                ws_ptr,
                choice.workspace,
                beta,
                d.w.0,
                c,
            ),
        }
    };
    drop(ws_guard);
    status.map_err(|e| {
        cuda_err(
            &format!(
                "cuDNN {pass:?} for {g:?} {dtype:?} (algo {}, math {:?}, workspace {} B)",
                choice.algo, choice.math, choice.workspace
            ),
            e,
        )
    })
}
