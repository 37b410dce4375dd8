//! A 2-D convolution whose backward works for every input size.
//!
//! Candle 0.11 computes a strided convolution's input gradient with `conv_transpose2d` and one `output_padding`
//! derived from the height alone, so the gradient has the wrong width (and backward fails) when
//! `(H + 2p − d(k−1) − 1) mod s` differs between height and width, e.g. a stride-2 conv on a 5×6 input. Padding the
//! bottom or right edge with zeros until both remainders are equal leaves the output unchanged (the extra rows or
//! columns are never reached by a window) and makes Candle's single `output_padding` right for both axes.

use std::cell::RefCell;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};

use super::contiguous_slice;
pub use super::conv_cpu::KeptWeights;
use super::conv_cpu::{self, ConvGeometry, Epilogue, Scratch};
use super::conv_cpu_backward;
use super::profile;
use super::small_maps;

/// Remainder of the last window's reach along one axis: rows past the last window that the output never uses.
fn slack(size: usize, k: usize, padding: usize, stride: usize, dilation: usize) -> Option<usize> {
    (size + 2 * padding)
        .checked_sub(dilation * (k - 1) + 1)
        .map(|reach| reach % stride)
}

/// `x` `[B, Cin, H, W]` ⊛ `weight` `[Cout, Cin, k, k]` (no groups), with the padding fix above when needed.
///
/// With the `cuda` feature, an f32 or bf16 `x` on a CUDA device goes to cuDNN (`conv_cuda`): forward,
/// input gradient (skipped for an input that needs none) and weight gradient; a weight of another dtype is cast to
/// x's first (f32 master weights under bf16 activations). f32 convolutions dilated by 6 or more (ASPP) run
/// undilated over their polyphase sub-images (`polyphase`). A bf16/f16 `x` on the CPU is convolved in f32 and the
/// result cast back to x's dtype.
pub fn conv2d(x: &Tensor, weight: &Tensor, padding: usize, stride: usize, dilation: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16) {
        let k = weight.dim(3)?;
        if x.dtype() == DType::F32
            && dilation >= super::polyphase::MIN_DILATION
            && super::polyphase::applies(k, padding, stride, dilation)
        {
            // ASPP's large dilations: cuDNN runs them in f32 far off the tensor cores; undilated over the
            // polyphase sub-images they run at the speed of any 3×3 (see `polyphase`).
            return super::polyphase::conv2d_polyphase(
                x,
                weight,
                dilation,
                |x, w, p| super::conv_cuda::conv2d(x, w, p, 1, 1),
                super::conv_cuda::conv2d_grads,
            );
        }
        // cuDNN forward and backward (any size, no parity fix); a weight of another dtype is cast to x's.
        return super::conv_cuda::conv2d(x, weight, padding, stride, dilation);
    }
    if x.device().is_cpu() && matches!(x.dtype(), DType::BF16 | DType::F16) {
        // No half-precision CPU kernels: convolve in f32 (the weight as it is, f32 master or not) and hand back x's
        // dtype; both casts are differentiable, so the f32 paths below serve training too.
        let y = conv2d(
            &x.to_dtype(DType::F32)?,
            &weight.to_dtype(DType::F32)?,
            padding,
            stride,
            dilation,
        )?;
        return y.to_dtype(x.dtype());
    }
    let trains = x.track_op() || weight.track_op();
    if trains && x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32 {
        // Our own kernels forward and backward: any size works, no parity fix needed.
        return x.contiguous()?.apply_op2(
            &weight.contiguous()?,
            CpuConv2d {
                padding,
                stride,
                dilation,
            },
        );
    }
    let (_, _, h, w) = x.dims4()?;
    let (_, _, kh, kw) = weight.dims4()?;
    let x = match (
        slack(h, kh, padding, stride, dilation),
        slack(w, kw, padding, stride, dilation),
    ) {
        (Some(sh), Some(sw)) if stride > 1 && sh != sw => {
            let target = sh.max(sw);
            x.pad_with_zeros(2, 0, target - sh)?.pad_with_zeros(3, 0, target - sw)?
        }
        _ => x.clone(),
    };
    if x.device().is_cpu() && (x.track_op() || weight.track_op()) {
        return conv2d_im2col(&x, weight, padding, stride, dilation);
    }
    x.conv2d(weight, padding, stride, dilation, 1)
}

/// `relu?(conv2d(x, weight) + bias + residual)`: the convolution with its epilogue, for every device and both modes.
///
/// `bias` is `[Cout]`, `residual` has the output's shape. When nothing needs a gradient and the tensors are f32 on
/// the CPU, this runs [`conv_cpu`]'s fused kernel (bias and residual folded into the product, one ReLU pass);
/// otherwise it is [`conv2d`] followed by Candle's own ops, so training and other devices are unchanged. `kept`,
/// given only with a weight that never changes (an inference model's), lets the kernel keep what it derives from
/// the weight across calls.
pub fn conv2d_fused(
    x: &Tensor,
    (weight, kept): (&Tensor, Option<&KeptWeights>),
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    relu: bool,
    (padding, stride, dilation): (usize, usize, usize),
) -> Result<Tensor> {
    let dims = |t: &Tensor| -> [usize; 4] { t.dims().try_into().unwrap_or([0; 4]) };
    profile::conv(
        "forward",
        dims(x),
        dims(weight),
        (stride, dilation),
        || conv2d_fused_unprofiled(x, (weight, kept), bias, residual, relu, (padding, stride, dilation)),
        |y| dims(y),
    )
}

fn conv2d_fused_unprofiled(
    x: &Tensor,
    (weight, kept): (&Tensor, Option<&KeptWeights>),
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    relu: bool,
    (padding, stride, dilation): (usize, usize, usize),
) -> Result<Tensor> {
    let inputs = [Some(x), Some(weight), bias, residual];
    let fast = x.device().is_cpu()
        && !COMPOSED_ONLY.load(std::sync::atomic::Ordering::Relaxed)
        && inputs
            .iter()
            .flatten()
            .all(|t| t.dtype() == DType::F32 && !t.track_op() && t.device().is_cpu());
    if fast {
        return conv2d_cpu_inference(x, (weight, kept), bias, residual, relu, (padding, stride, dilation));
    }
    let mut y = conv2d(x, weight, padding, stride, dilation)?;
    // Under mixed precision the bias (f32 master) or a residual may differ from the activations' dtype
    // (`to_dtype` is a no-op when they agree).
    if let Some(b) = bias {
        y = y.broadcast_add(&b.to_dtype(y.dtype())?.reshape((1, (), 1, 1))?)?;
    }
    if let Some(r) = residual {
        let r = r.to_dtype(y.dtype())?;
        y = (y + r)?;
    }
    if relu {
        y = y.relu()?;
    }
    Ok(y)
}

/// When set, [`conv2d_fused`] takes the composed path (Candle's convolution, then bias, residual and ReLU as
/// separate ops) even where the fused CPU kernel applies: the benchmarks' before/after comparison in one process.
static COMPOSED_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// See [`COMPOSED_ONLY`]; for benchmarks.
pub fn use_composed_path_only(on: bool) {
    COMPOSED_ONLY.store(on, std::sync::atomic::Ordering::Relaxed);
}

thread_local! {
    /// Column and product buffers reused by every convolution this thread runs.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    /// The same for the gradients.
    static BACKWARD_SCRATCH: RefCell<conv_cpu_backward::Buffers> = RefCell::new(Default::default());
}

fn conv2d_cpu_inference(
    x: &Tensor,
    (weight, kept): (&Tensor, Option<&KeptWeights>),
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    relu: bool,
    (padding, stride, dilation): (usize, usize, usize),
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (cout, cin, k, k2) = weight.dims4()?;
    if cin != c || k != k2 {
        candle_core::bail!("conv2d: input {:?} and weight {:?} do not fit", x.dims(), weight.dims())
    }
    let Some(g) = ConvGeometry::new((c, h, w), (cout, k), stride, padding, dilation) else {
        candle_core::bail!(
            "conv2d: input {:?} smaller than the kernel span of {:?}",
            x.dims(),
            weight.dims()
        )
    };
    let out_shape = (b, cout, g.oh, g.ow);
    if let Some(r) = residual {
        if r.dims() != [b, cout, g.oh, g.ow] {
            candle_core::bail!(
                "conv2d: residual {:?} does not match the output {:?}",
                r.dims(),
                out_shape
            )
        }
    }
    if let Some(bias) = bias {
        if bias.dims() != [cout] {
            candle_core::bail!("conv2d: bias {:?} does not match {cout} output channels", bias.dims())
        }
    }
    // Borrow every input's elements (made contiguous first), then run the kernel image by image.
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    let bias = bias.map(Tensor::contiguous).transpose()?;
    let residual = residual.map(Tensor::contiguous).transpose()?;
    let (xg, wg) = (x.storage_and_layout(), weight.storage_and_layout());
    let bg = bias.as_ref().map(Tensor::storage_and_layout);
    let rg = residual.as_ref().map(Tensor::storage_and_layout);
    let xs = cpu_f32(&xg.0, xg.1)?;
    let ws = cpu_f32(&wg.0, wg.1)?;
    let bs = bg.as_ref().map(|(s, l)| cpu_f32(s, l)).transpose()?;
    let rs = rg.as_ref().map(|(s, l)| cpu_f32(s, l)).transpose()?;
    let (n_in, n_out) = (g.input_len(), g.output_len());
    let mut out = super::output_buffer(b * n_out);
    SCRATCH.with_borrow_mut(|scratch| {
        if small_maps::applies(&g) {
            let epilogue = Epilogue {
                bias: bs,
                residual: rs,
                relu,
            };
            return small_maps::forward(&g, xs, ws, epilogue, &mut out, &mut scratch.small_maps);
        }
        for (i, o) in out.chunks_mut(n_out).enumerate() {
            let epilogue = Epilogue {
                bias: bs,
                residual: rs.map(|r| &r[i * n_out..(i + 1) * n_out]),
                relu,
            };
            conv_cpu::conv2d_image(&g, &xs[i * n_in..(i + 1) * n_in], (ws, kept), epilogue, o, scratch);
        }
    });
    Tensor::from_vec(out, out_shape, &candle_core::Device::Cpu)
}

fn cpu_f32<'a>(s: &'a Storage, l: &Layout) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(CpuStorage::F32(v)) => contiguous_slice(v, l, "conv2d"),
        _ => candle_core::bail!("conv2d: expected f32 on the CPU"),
    }
}

/// The training convolution on the CPU in f32: forward by [`conv_cpu`]'s kernel (Winograd and padded-tap skipping
/// included), backward by [`conv_cpu_backward`], which rebuilds the input's columns in chunks instead of keeping
/// them in the graph. The input gradient is skipped when the input needs none (the image).
struct CpuConv2d {
    padding: usize,
    stride: usize,
    dilation: usize,
}

impl CpuConv2d {
    fn geometry(&self, x: &Shape, w: &Shape) -> Result<(usize, ConvGeometry)> {
        let (b, c, h, wd) = x.dims4()?;
        let (cout, cin, k, k2) = w.dims4()?;
        if cin != c || k != k2 {
            candle_core::bail!("conv2d: input {:?} and weight {:?} do not fit", x.dims(), w.dims())
        }
        match ConvGeometry::new((c, h, wd), (cout, k), self.stride, self.padding, self.dilation) {
            Some(g) => Ok((b, g)),
            None => candle_core::bail!(
                "conv2d: input {:?} smaller than the kernel span of {:?}",
                x.dims(),
                w.dims()
            ),
        }
    }
}

impl candle_core::CustomOp2 for CpuConv2d {
    fn name(&self) -> &'static str {
        "semseg-conv2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, g) = self.geometry(l1.shape(), l2.shape())?;
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (s1, s2) else {
            candle_core::bail!("conv2d: the CPU kernel takes f32")
        };
        let (x, w) = (contiguous_slice(x, l1, "conv2d")?, contiguous_slice(w, l2, "conv2d")?);
        let (n_in, n_out) = (g.input_len(), g.output_len());
        let mut out = super::output_buffer(b * n_out);
        // The images share the weight: Winograd's transform of it is made once for the batch.
        let kept = (b > 1).then(KeptWeights::for_one_batch);
        SCRATCH.with_borrow_mut(|scratch| {
            if small_maps::applies(&g) {
                return small_maps::forward(&g, x, w, Epilogue::default(), &mut out, &mut scratch.small_maps);
            }
            for (i, o) in out.chunks_mut(n_out).enumerate() {
                conv_cpu::conv2d_image(
                    &g,
                    &x[i * n_in..(i + 1) * n_in],
                    (w, kept.as_ref()),
                    Epilogue::default(),
                    o,
                    scratch,
                );
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, g.cout, g.oh, g.ow))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, g) = self.geometry(x.shape(), w.shape())?;
        let (x, w, grad) = (
            x.contiguous()?,
            w.contiguous()?,
            grad.contiguous()?.to_dtype(DType::F32)?,
        );
        let (xg, wg, gg) = (
            x.storage_and_layout(),
            w.storage_and_layout(),
            grad.storage_and_layout(),
        );
        let (xs, ws, gs) = (cpu_f32(&xg.0, xg.1)?, cpu_f32(&wg.0, wg.1)?, cpu_f32(&gg.0, gg.1)?);
        let n_in = g.input_len();
        let mut grad_w = vec![0f32; g.weight_len()];
        // `input_grad` writes every element of the batch's gradient, as the forward kernel does its output.
        let mut grad_x = x.track_op().then(|| super::output_buffer(b * n_in));
        let (in_dims, w_dims) = ([b, g.cin, g.h, g.w], [g.cout, g.cin, g.k, g.k]);
        let out_dims = |_: &()| [b, g.cout, g.oh, g.ow];
        let sd = (self.stride, self.dilation);
        BACKWARD_SCRATCH.with_borrow_mut(|buffers| {
            profile::conv(
                "weight-grad",
                in_dims,
                w_dims,
                sd,
                || {
                    conv_cpu_backward::weight_grad(&g, xs, gs, &mut grad_w, buffers);
                    Ok(())
                },
                out_dims,
            )?;
            if let Some(gx) = grad_x.as_mut() {
                profile::conv(
                    "input-grad",
                    in_dims,
                    w_dims,
                    sd,
                    || {
                        // The forward kernel's buffers serve the stride-1 input gradient: one set per thread.
                        SCRATCH.with_borrow_mut(|forward| {
                            conv_cpu_backward::input_grad(&g, ws, gs, gx, buffers, forward);
                        });
                        Ok(())
                    },
                    out_dims,
                )?;
            }
            Ok::<_, candle_core::Error>(())
        })?;
        let grad_w = Tensor::from_vec(grad_w, w.shape(), w.device())?;
        let grad_x = grad_x.map(|v| Tensor::from_vec(v, x.shape(), x.device())).transpose()?;
        Ok((grad_x, Some(grad_w)))
    }
}

/// Geometry shared by [`Im2Col`] and [`Col2Im`]: input `[B, C, H, W]` ↔ columns `[B, C·k·k, oh·ow]`, row
/// `c·k² + ky·k + kx` (the order of a `[Cout, C, k, k]` weight flattened to `[Cout, C·k²]`).
#[derive(Clone, Copy, Debug)]
struct Geometry {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    /// Calls `f(image_index, column_index)` for every (channel, tap, output pixel) whose input pixel is inside.
    fn for_each(&self, mut f: impl FnMut(usize, usize)) {
        let (k, l) = (self.k, self.oh * self.ow);
        for b in 0..self.b {
            for c in 0..self.c {
                let img = (b * self.c + c) * self.h * self.w;
                for ky in 0..k {
                    for kx in 0..k {
                        let row = ((b * self.c + c) * k * k + ky * k + kx) * l;
                        for oy in 0..self.oh {
                            let iy = (oy * self.stride + ky * self.dilation) as isize - self.padding as isize;
                            if iy < 0 || iy >= self.h as isize {
                                continue;
                            }
                            for ox in 0..self.ow {
                                let ix = (ox * self.stride + kx * self.dilation) as isize - self.padding as isize;
                                if ix >= 0 && ix < self.w as isize {
                                    f(img + iy as usize * self.w + ix as usize, row + oy * self.ow + ox);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn col_shape(&self) -> Shape {
        Shape::from((self.b, self.c * self.k * self.k, self.oh * self.ow))
    }
}

/// `[B, C, H, W]` → columns `[B, C·k², oh·ow]`; backward is [`Col2Im`].
struct Im2Col(Geometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "semseg-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let n = g.col_shape().elem_count();
        let out = match s {
            CpuStorage::F32(v) => {
                let v = contiguous_slice(v, l, "im2col")?;
                let mut o = vec![0f32; n];
                g.for_each(|i, j| o[j] = v[i]);
                CpuStorage::F32(o)
            }
            CpuStorage::F64(v) => {
                let v = contiguous_slice(v, l, "im2col")?;
                let mut o = vec![0f64; n];
                g.for_each(|i, j| o[j] = v[i]);
                CpuStorage::F64(o)
            }
            other => candle_core::bail!("im2col: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, g.col_shape()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Col2Im(self.0))?))
    }
}

/// Columns `[B, C·k², oh·ow]` → `[B, C, H, W]`, summing where windows overlap; backward is [`Im2Col`].
struct Col2Im(Geometry);

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "semseg-col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let n = g.b * g.c * g.h * g.w;
        let out = match s {
            CpuStorage::F32(v) => {
                let v = contiguous_slice(v, l, "col2im")?;
                let mut o = vec![0f32; n];
                g.for_each(|i, j| o[i] += v[j]);
                CpuStorage::F32(o)
            }
            CpuStorage::F64(v) => {
                let v = contiguous_slice(v, l, "col2im")?;
                let mut o = vec![0f64; n];
                g.for_each(|i, j| o[i] += v[j]);
                CpuStorage::F64(o)
            }
            other => candle_core::bail!("col2im: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from((g.b, g.c, g.h, g.w))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Im2Col(self.0))?))
    }
}

/// The convolution as `W[Cout, C·k²] · im2col(x)[B, C·k², L]`, differentiable through the matmul and
/// im2col/col2im. 1×1 stride-1 convolutions skip im2col (the input already is the column matrix).
fn conv2d_im2col(x: &Tensor, weight: &Tensor, padding: usize, stride: usize, dilation: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (cout, cin, k, k2) = weight.dims4()?;
    if cin != c || k != k2 {
        candle_core::bail!("conv2d: input {:?} and weight {:?} do not fit", x.dims(), weight.dims())
    }
    let span = dilation * (k - 1) + 1;
    if h + 2 * padding < span || w + 2 * padding < span {
        candle_core::bail!("conv2d: input {:?} smaller than the kernel span {span}", x.dims())
    }
    let oh = (h + 2 * padding - span) / stride + 1;
    let ow = (w + 2 * padding - span) / stride + 1;
    let cols = if k == 1 && stride == 1 && padding == 0 {
        x.reshape((b, c, h * w))?
    } else {
        let g = Geometry {
            b,
            c,
            h,
            w,
            k,
            stride,
            padding,
            dilation,
            oh,
            ow,
        };
        x.contiguous()?.apply_op1(Im2Col(g))?
    };
    let wm = weight.reshape((cout, c * k * k))?;
    wm.broadcast_left(b)?.matmul(&cols)?.reshape((b, cout, oh, ow))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::gradcheck::{check_gradients, seeded};

    #[test]
    fn candle_backward_fails_without_the_fix() -> Result<()> {
        // Documents why this module exists; if Candle fixes it, this test tells us to drop the workaround.
        let x = candle_core::Var::from_tensor(&seeded(&[1, 2, 5, 6], 1)?)?;
        let k = seeded(&[3, 2, 3, 3], 2)?;
        let y = x.as_tensor().conv2d(&k, 1, 2, 1, 1)?;
        let broken = y.sum_all()?.backward().and_then(|g| {
            let gx = g.get(x.as_tensor()).cloned();
            match gx {
                Some(gx) if gx.dims() == x.dims() => Ok(()),
                _ => candle_core::bail!("wrong gradient shape"),
            }
        });
        assert!(broken.is_err(), "Candle's conv2d backward now handles mixed parity");
        Ok(())
    }

    #[test]
    fn im2col_path_matches_candle_and_has_correct_gradients() -> Result<()> {
        for &(h, w, k, p, s, d) in &[
            (5, 6, 3, 1, 2, 1),
            (7, 7, 3, 2, 1, 2),
            (6, 5, 1, 0, 1, 1),
            (9, 8, 7, 3, 2, 1),
            (4, 5, 1, 0, 2, 1),
        ] {
            let x = seeded(&[2, 3, h, w], 3)?;
            let wt = seeded(&[4, 3, k, k], 4)?;
            let want = x.conv2d(&wt, p, s, d, 1)?;
            let got = conv2d_im2col(&x, &wt, p, s, d)?;
            assert_eq!(want.dims(), got.dims());
            assert!((want - got)?.abs()?.max_all()?.to_scalar::<f64>()? < 1e-12);
            check_gradients(&[&[2, 3, h, w], &[4, 3, k, k]], |t| {
                conv2d_im2col(&t[0], &t[1], p, s, d)
            })?;
        }
        Ok(())
    }

    /// ‖a − b‖ / ‖b‖ over all elements.
    fn relative_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
        let a = a.to_dtype(candle_core::DType::F64)?;
        let b = b.to_dtype(candle_core::DType::F64)?;
        let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
        let den = b.sqr()?.sum_all()?.to_scalar::<f64>()?;
        Ok((num / den).sqrt())
    }

    #[test]
    fn f32_training_kernel_matches_the_f64_reference_forward_and_backward() -> Result<()> {
        use candle_core::{DType, Var};
        // (cin, h, w, cout, k, padding, stride, dilation): mixed parity, the stem, strided and plain 1×1, dilated
        // 3×3 (Winograd on sub-grids forward), and a dilation wider than the map (most taps in the padding).
        for &(cin, h, w, cout, k, p, s, d) in &[
            (3, 5, 6, 4, 3, 1, 2, 1),
            (3, 19, 18, 5, 7, 3, 2, 1),
            (6, 7, 9, 5, 1, 0, 1, 1),
            (6, 7, 9, 5, 1, 0, 2, 1),
            (20, 13, 11, 6, 3, 2, 1, 2),
            (20, 9, 10, 3, 3, 12, 1, 12),
            (16, 16, 14, 5, 3, 6, 1, 6), // ASPP-like: padded taps skipped tap by tap, forward and both gradients
            (8, 12, 11, 4, 3, 3, 1, 2),  // stride 1, not "same": the input gradient takes col2im
        ] {
            let x64 = seeded(&[2, cin, h, w], 5)?;
            let w64 = seeded(&[cout, cin, k, k], 6)?;
            let (x32, w32) = (
                Var::from_tensor(&x64.to_dtype(DType::F32)?)?,
                Var::from_tensor(&w64.to_dtype(DType::F32)?)?,
            );
            let y32 = conv2d(x32.as_tensor(), w32.as_tensor(), p, s, d)?;
            let (xr, wr) = (Var::from_tensor(&x64)?, Var::from_tensor(&w64)?);
            let y64 = conv2d_im2col(xr.as_tensor(), wr.as_tensor(), p, s, d)?;
            assert_eq!(y32.dims(), y64.dims());
            let r = seeded(y64.dims(), 7)?;
            let g32 = (&y32 * r.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
            let g64 = (&y64 * &r)?.sum_all()?.backward()?;
            let case = format!("{:?}", (cin, h, w, cout, k, p, s, d));
            assert!(relative_l2(&y32, &y64)? < 1e-5, "{case}: output");
            let (gx32, gx64) = (g32.get(x32.as_tensor()).unwrap(), g64.get(xr.as_tensor()).unwrap());
            assert!(relative_l2(gx32, gx64)? < 1e-5, "{case}: input gradient");
            let (gw32, gw64) = (g32.get(w32.as_tensor()).unwrap(), g64.get(wr.as_tensor()).unwrap());
            assert!(relative_l2(gw32, gw64)? < 1e-5, "{case}: weight gradient");
        }
        Ok(())
    }

    #[test]
    fn no_input_gradient_for_an_input_that_needs_none() -> Result<()> {
        use candle_core::{DType, Var};
        let image = seeded(&[1, 3, 8, 8], 1)?.to_dtype(DType::F32)?;
        let w = Var::from_tensor(&seeded(&[4, 3, 3, 3], 2)?.to_dtype(DType::F32)?)?;
        let grads = conv2d(&image, w.as_tensor(), 1, 1, 1)?.sum_all()?.backward()?;
        assert!(grads.get(&image).is_none());
        assert_eq!(
            grads.get(w.as_tensor()).map(|g| g.dims().to_vec()),
            Some(vec![4, 3, 3, 3])
        );
        Ok(())
    }

    #[test]
    fn output_unchanged_and_gradients_correct_for_mixed_parity() -> Result<()> {
        for &(h, w, k, p, s, d) in &[
            (5, 6, 3, 1, 2, 1),
            (6, 5, 3, 1, 2, 1),
            (7, 4, 1, 0, 2, 1),
            (8, 5, 7, 3, 2, 1),
            (5, 5, 3, 2, 1, 2),
            (6, 7, 3, 1, 1, 1),
        ] {
            let x = seeded(&[1, 2, h, w], 3)?;
            let wt = seeded(&[3, 2, k, k], 4)?;
            let plain = x.conv2d(&wt, p, s, d, 1)?;
            let ours = conv2d(&x, &wt, p, s, d)?;
            assert_eq!(plain.dims(), ours.dims());
            let diff = (plain - &ours)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12);
            check_gradients(&[&[1, 2, h, w], &[3, 2, k, k]], |t| conv2d(&t[0], &t[1], p, s, d))?;
        }
        Ok(())
    }
}
