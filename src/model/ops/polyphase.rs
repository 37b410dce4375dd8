//! A dilated "same" convolution computed as an undilated one over its polyphase sub-images (space-to-batch, as
//! TensorFlow's atrous convolution does).
//!
//! With stride 1 and padding `d·(k−1)/2`, output pixel (i, j) only reads inputs whose coordinates are congruent to
//! (i, j) modulo the dilation d. So the input, zero-padded up to multiples of d, splits into d² sub-images
//! `X_rs[p, q] = x[d·p + r, d·q + s]`, each convolved with the same kernel at dilation 1 and padding (k−1)/2, and
//! the outputs interleave back. The padding appended at the bottom and right stands exactly for the convolution's
//! own zero padding there, so the result is the same sum of the same products.
//!
//! Why: cuDNN's legacy algorithms run ASPP's large dilations (12, 24, 36 on a 64×64 map, 2048 channels) in f32 far
//! off the tensor cores: measured on an H200 (2026-11-28, batch 8) 12.5 ms forward and 41 ms forward + backward
//! for one d=12 conv in TF32, against 0.8 / 4.1 ms for the same conv in bf16 and 0.5 / 4.2 ms for layer4's
//! (larger) d=4 conv in TF32. The sub-images turn it into a dilation-1 conv with a batch of B·d².

use candle_core::{Result, Tensor};

/// Smallest dilation sent through the sub-images on the GPU: ASPP's rates (6 and up); the backbone's 2 and 4 run
/// well as they are.
pub const MIN_DILATION: usize = 6;

/// Whether `conv2d_polyphase` computes this convolution: stride 1, odd kernel, "same" padding, dilation > 1.
pub fn applies(kernel: usize, padding: usize, stride: usize, dilation: usize) -> bool {
    stride == 1 && dilation > 1 && kernel % 2 == 1 && padding == dilation * (kernel - 1) / 2
}

/// `x` `[B, Cin, H, W]` ⊛ `weight` `[Cout, Cin, k, k]` at dilation `d` with "same" padding (see [`applies`]),
/// through `conv` (an undilated convolution: `(x, weight, padding)`); differentiable whenever `conv` is.
pub fn conv2d_polyphase(
    x: &Tensor,
    weight: &Tensor,
    d: usize,
    conv: impl Fn(&Tensor, &Tensor, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let k = weight.dim(3)?;
    let (p, q) = (h.div_ceil(d), w.div_ceil(d));
    // [B, C, P·d, Q·d] → [B, C, P, d(r), Q, d(s)] → [B, r, s, C, P, Q] → [B·d², C, P, Q]
    let padded = x.pad_with_zeros(2, 0, p * d - h)?.pad_with_zeros(3, 0, q * d - w)?;
    let subimages = padded
        .reshape((b, c, p, d, q, d))?
        .permute((0, 3, 5, 1, 2, 4))?
        .contiguous()?
        .reshape((b * d * d, c, p, q))?;
    let y = conv(&subimages, weight, (k - 1) / 2)?; // [B·d², Cout, P, Q]
    let cout = y.dim(1)?;
    // [B, r, s, Cout, P, Q] → [B, Cout, P, r, Q, s] → [B, Cout, P·d, Q·d], cropped to H × W
    y.reshape((b, d, d, cout, p, q))?
        .permute((0, 3, 4, 1, 5, 2))?
        .contiguous()?
        .reshape((b, cout, p * d, q * d))?
        .narrow(2, 0, h)?
        .narrow(3, 0, w)
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
            let poly = conv2d_polyphase(x.as_tensor(), wt.as_tensor(), d, |x, w, p| x.conv2d(w, p, 1, 1, 1)).unwrap();
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

    #[test]
    fn applies_only_to_stride_one_same_padding_odd_kernels() {
        assert!(applies(3, 12, 1, 12));
        assert!(!applies(3, 12, 2, 12));
        assert!(!applies(3, 11, 1, 12));
        assert!(!applies(2, 6, 1, 12));
        assert!(!applies(3, 1, 1, 1));
    }
}
