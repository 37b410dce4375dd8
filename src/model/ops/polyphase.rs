//! A dilated "same" convolution computed as an undilated one over its polyphase sub-images (space-to-batch, as
//! TensorFlow's atrous convolution does).
//!
//! With stride 1 and padding `d·(k−1)/2`, output pixel (i, j) only reads inputs whose coordinates are congruent to
//! (i, j) modulo the dilation d. So the input, zero-padded up to multiples of d, splits into d² sub-images
//! `X_rs[p, q] = x[d·p + r, d·q + s]`, each convolved with the same kernel at dilation 1 and padding (k−1)/2, and
//! the outputs interleave back. The padding appended at the bottom and right stands exactly for the convolution's
//! own zero padding there, so the result is the same sum of the same products.
//!
//! In training only `x`, the weight and the output are kept for backward: the sub-images (with the two padded
//! copies that build them, about 1.3× x each) are made again from `x` in backward. Kept, they were three copies of
//! ASPP's 2048-channel input per dilation, about 2.9 GB at crop 512, batch 8, for the whole step.
//!
//! Why: cuDNN's legacy algorithms run ASPP's large dilations (12, 24, 36 on a 64×64 map, 2048 channels) in f32 far
//! off the tensor cores: measured on an H200 (2026-11-28, batch 8) 12.5 ms forward and 41 ms forward + backward
//! for one d=12 conv in TF32, against 0.8 / 4.1 ms for the same conv in bf16 and 0.5 / 4.2 ms for layer4's
//! (larger) d=4 conv in TF32. The sub-images turn it into a dilation-1 conv with a batch of B·d².

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// Smallest dilation sent through the sub-images on the GPU: ASPP's rates (6 and up); the backbone's 2 and 4 run
/// well as they are.
pub const MIN_DILATION: usize = 6;

/// Whether `conv2d_polyphase` computes this convolution: stride 1, odd kernel, "same" padding, dilation > 1.
pub fn applies(kernel: usize, padding: usize, stride: usize, dilation: usize) -> bool {
    stride == 1 && dilation > 1 && kernel % 2 == 1 && padding == dilation * (kernel - 1) / 2
}

/// The gradients of an undilated convolution: `(x, weight, dy, padding, input_grad)` → (∂x when `input_grad`, ∂w).
pub type ConvGradients =
    dyn Fn(&Tensor, &Tensor, &Tensor, usize, bool) -> Result<(Option<Tensor>, Tensor)> + Send + Sync;

/// `x` `[B, Cin, H, W]` ⊛ `weight` `[Cout, Cin, k, k]` at dilation `d` with "same" padding (see [`applies`]), through
/// `conv` (an undilated convolution `(x, weight, padding)`, called on tensors outside the graph) and, when `x` or
/// the weight needs a gradient, `grads` (that convolution's gradients, called in backward on the sub-images made
/// again from `x`).
pub fn conv2d_polyphase(
    x: &Tensor,
    weight: &Tensor,
    d: usize,
    conv: impl Fn(&Tensor, &Tensor, usize) -> Result<Tensor>,
    grads: impl Fn(&Tensor, &Tensor, &Tensor, usize, bool) -> Result<(Option<Tensor>, Tensor)> + Send + Sync + 'static,
) -> Result<Tensor> {
    let (b, _, h, w) = x.dims4()?;
    let k = weight.dim(3)?;
    let y = conv(&to_subimages(&x.detach(), d)?, &weight.detach(), (k - 1) / 2)?; // [B·d², Cout, P, Q]
    let y = from_subimages(&y, d, (b, h, w))?; // [B, Cout, H, W], a view
    if !(x.track_op() || weight.track_op()) {
        return Ok(y);
    }
    x.apply_op3(
        weight,
        &y,
        PolyphaseGradients {
            d,
            padding: (k - 1) / 2,
            input_grad: x.track_op(),
            grads: Box::new(grads),
        },
    )
}

/// `[B, C, H, W]` → `[B·d², C, P, Q]` (P = ⌈H/d⌉, Q = ⌈W/d⌉): sub-image (r, s) of image b is batch entry
/// `(b·d + r)·d + s`, zero where `d·p + r ≥ H` or `d·q + s ≥ W`.
fn to_subimages(t: &Tensor, d: usize) -> Result<Tensor> {
    let (b, c, h, w) = t.dims4()?;
    let (p, q) = (h.div_ceil(d), w.div_ceil(d));
    // [B, C, P·d, Q·d] → [B, C, P, d(r), Q, d(s)] → [B, r, s, C, P, Q] → [B·d², C, P, Q]
    t.pad_with_zeros(2, 0, p * d - h)?
        .pad_with_zeros(3, 0, q * d - w)?
        .reshape((b, c, p, d, q, d))?
        .permute((0, 3, 5, 1, 2, 4))?
        .contiguous()?
        .reshape((b * d * d, c, p, q))
}

/// The inverse of [`to_subimages`]: `[B·d², C, P, Q]` → `[B, C, H, W]` (`b, h, w` = B, H, W), the padding cropped.
fn from_subimages(t: &Tensor, d: usize, (b, h, w): (usize, usize, usize)) -> Result<Tensor> {
    let (_, c, p, q) = t.dims4()?;
    // [B, r, s, C, P, Q] → [B, C, P, r, Q, s] → [B, C, P·d, Q·d], cropped to H × W
    t.reshape((b, d, d, c, p, q))?
        .permute((0, 3, 4, 1, 5, 2))?
        .contiguous()?
        .reshape((b, c, p * d, q * d))?
        .narrow(2, 0, h)?
        .narrow(3, 0, w)
}

/// `(x, weight, y) → y` (copied), where `y` was computed from `x` and the weight outside the graph: its backward
/// gives ∂x and ∂weight through the sub-images, made again from `x`, and nothing to `y`.
struct PolyphaseGradients {
    d: usize,
    padding: usize,
    /// Whether x needs a gradient (false for an input image), recorded when the op is built.
    input_grad: bool,
    grads: Box<ConvGradients>,
}

impl CustomOp3 for PolyphaseGradients {
    fn name(&self) -> &'static str {
        "semseg-polyphase-conv2d"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // SAFETY: every element is written by the copy below.
        let mut out = unsafe { candle_core::cpu_backend::CpuDevice.alloc_uninit(yl.shape(), y.dtype()) }?;
        y.copy_strided_src(&mut out, 0, yl)?;
        Ok((out, yl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        y: &candle_core::CudaStorage,
        yl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        // SAFETY: every element is written by the copy below.
        let mut out = unsafe { y.device().alloc_uninit(yl.shape(), y.dtype()) }?;
        y.copy_strided_src(&mut out, 0, yl)?;
        Ok((out, yl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, _, h, w) = x.dims4()?;
        let sub = to_subimages(&x.detach(), self.d)?; // [B·d², Cin, P, Q]
        let grad_sub = to_subimages(&grad.detach(), self.d)?; // [B·d², Cout, P, Q]
        let (dsub, dw) = (self.grads)(&sub, &weight.detach(), &grad_sub, self.padding, self.input_grad)?;
        let dx = dsub.map(|dsub| from_subimages(&dsub, self.d, (b, h, w))).transpose()?;
        Ok((dx, Some(dw), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Var};

    fn seeded(shape: &[usize], seed: u64) -> Tensor {
        crate::model::ops::gradcheck::seeded(shape, seed).unwrap()
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Forward and both gradients equal the dilated convolution's (f64 on the CPU, Candle's own conv), for sizes
    /// that are and are not multiples of the dilation, dilations past the map (ASPP's 36 on small maps) and 1×1.
    #[test]
    fn matches_the_dilated_convolution_forward_and_backward() {
        for (i, &(h, w, d, k)) in [
            (10, 11, 3, 3),
            (16, 16, 4, 3),
            (9, 7, 12, 3),
            (13, 6, 2, 5),
            (5, 5, 3, 1),
        ]
        .iter()
        .enumerate()
        {
            let x = Var::from_tensor(&seeded(&[2, 3, h, w], 10 + i as u64)).unwrap();
            let wt = Var::from_tensor(&seeded(&[4, 3, k, k], 20 + i as u64)).unwrap();
            let pad = d * (k - 1) / 2;
            assert!(applies(k, pad, 1, d));
            let direct = x.as_tensor().conv2d(wt.as_tensor(), pad, 1, d, 1).unwrap();
            let poly = conv2d_polyphase(x.as_tensor(), wt.as_tensor(), d, undilated, undilated_grads).unwrap();
            assert_eq!(poly.dims(), direct.dims());
            assert!(max_abs(&poly, &direct) < 1e-12, "case {i}: forward");
            // A fixed random weighting of the output, so every gradient entry is exercised.
            let r = seeded(direct.dims(), 30 + i as u64);
            let g_direct = (&direct * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g_poly = (&poly * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (what, var) in [("dx", &x), ("dw", &wt)] {
                let (a, b) = (g_direct.get(var).unwrap(), g_poly.get(var).unwrap());
                assert!(max_abs(a, b) < 1e-12, "case {i}: {what}");
            }
            assert_eq!(poly.dtype(), DType::F64);
        }
    }

    fn undilated(x: &Tensor, w: &Tensor, p: usize) -> Result<Tensor> {
        x.conv2d(w, p, 1, 1, 1)
    }

    /// Candle's own gradients of [`undilated`], through a graph of its own.
    fn undilated_grads(
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        p: usize,
        input_grad: bool,
    ) -> Result<(Option<Tensor>, Tensor)> {
        let (xv, wv) = (Var::from_tensor(x)?, Var::from_tensor(w)?);
        let grads = (undilated(xv.as_tensor(), wv.as_tensor(), p)? * dy)?
            .sum_all()?
            .backward()?;
        let dx = if input_grad { grads.get(&xv).cloned() } else { None };
        Ok((dx, grads.get(&wv).cloned().expect("a weight gradient")))
    }

    /// In training the output's graph holds x, the weight and the op's output: no sub-image, padded copy or
    /// permutation of x (three copies of x each, before).
    #[test]
    fn training_keeps_no_sub_images_for_backward() {
        let x = Var::from_tensor(&seeded(&[2, 8, 13, 13], 1)).unwrap();
        let wt = Var::from_tensor(&seeded(&[4, 8, 3, 3], 2)).unwrap();
        // Downstream of another op, as in a network.
        let input = x.as_tensor().affine(1.0, 0.0).unwrap();
        let y = conv2d_polyphase(&input, wt.as_tensor(), 6, undilated, undilated_grads).unwrap();
        let held: usize = y
            .sorted_nodes()
            .iter()
            .filter(|t| !t.is_variable())
            .map(|t| t.elem_count())
            .sum();
        // The output, and the input made by `affine`.
        assert_eq!(held, y.elem_count() + input.elem_count());
    }

    /// An input that needs no gradient (an image) gets none, and the weight's is still right.
    #[test]
    fn an_input_without_gradient_gets_none() {
        let x = seeded(&[1, 3, 9, 10], 3);
        let wt = Var::from_tensor(&seeded(&[2, 3, 3, 3], 4)).unwrap();
        let poly = conv2d_polyphase(&x, wt.as_tensor(), 6, undilated, |x, w, dy, p, input_grad| {
            assert!(!input_grad, "the image needs no gradient");
            undilated_grads(x, w, dy, p, input_grad)
        })
        .unwrap();
        let direct = x.conv2d(wt.as_tensor(), 6, 1, 6, 1).unwrap();
        let r = seeded(direct.dims(), 5);
        let g_direct = (&direct * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_poly = (&poly * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g_poly.get(&x).is_none());
        assert!(max_abs(g_direct.get(&wt).unwrap(), g_poly.get(&wt).unwrap()) < 1e-12);
    }

    #[test]
    fn applies_only_to_stride_one_same_padding_odd_kernels() {
        assert!(applies(3, 12, 1, 12));
        assert!(!applies(3, 12, 2, 12));
        assert!(!applies(3, 11, 1, 12));
        assert!(!applies(2, 6, 1, 12));
        assert!(!applies(3, 1, 1, 1));
    }
}
