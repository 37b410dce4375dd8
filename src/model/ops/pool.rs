//! Pooling with backward: the ResNet stem's 3×3/2 max-pool and PyTorch's adaptive average pooling.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::{contiguous_slice, matrix, separable_apply};

/// One axis of a kernel-3, stride-2, padding-1 max-pool, done with reshapes so Candle's `maximum` gives the backward.
///
/// Padding the axis with −∞ to `2·out + 2` (one before, the rest after) and splitting it into `out + 1` pairs,
/// output `o` covers padded positions `2o, 2o+1, 2o+2`: both elements of pair `o` and the first of pair `o + 1`.
fn max3_stride2_axis(x: &Tensor, dim: usize) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let n = dims[dim];
    let out = n.div_ceil(2); // = floor((n + 2 − 3) / 2) + 1
    let mut pad_shape = dims.clone();
    pad_shape[dim] = 1;
    let before = Tensor::full(f64::NEG_INFINITY, pad_shape.as_slice(), x.device())?.to_dtype(x.dtype())?;
    pad_shape[dim] = 2 * out + 1 - n;
    let after = Tensor::full(f64::NEG_INFINITY, pad_shape.as_slice(), x.device())?.to_dtype(x.dtype())?;
    let padded = Tensor::cat(&[&before, x, &after], dim)?;
    let mut pair_shape = dims.clone();
    pair_shape[dim] = out + 1;
    pair_shape.insert(dim + 1, 2);
    let pairs = padded.reshape(pair_shape)?;
    let a = pairs.narrow(dim, 0, out)?.narrow(dim + 1, 0, 1)?;
    let b = pairs.narrow(dim, 0, out)?.narrow(dim + 1, 1, 1)?;
    let c = pairs.narrow(dim, 1, out)?.narrow(dim + 1, 0, 1)?;
    a.maximum(&b)?.maximum(&c)?.squeeze(dim + 1)
}

/// `nn.MaxPool2d(kernel_size=3, stride=2, padding=1)` on `[B, C, H, W]` → `[B, C, ⌈H/2⌉, ⌈W/2⌉]`, any H and W.
///
/// The 3×3 window max is separable (rows, then columns). Where values tie, the gradient is shared between them
/// (Candle's `maximum`) rather than sent to the first one as PyTorch does; both are valid subgradients and ties
/// only occur among ReLU zeros, whose own gradient is zero.
///
/// On the CPU (f32, f64) and on CUDA (f32, bf16: `elementwise_cuda`) it is one op, forward and backward, each one pass over the planes in parallel; its
/// gradient goes to the first maximum of each window, as PyTorch's. Composed, the backward of the two `maximum`s
/// over strided views took 413 ms for one 64×256×256 map (2026-11-28, 2 cores), against 12 ms forward.
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h == 0 || w == 0 {
        candle_core::bail!("max_pool_3x3_s2: empty input {:?}", x.dims())
    }
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        return x.contiguous()?.apply_op1(MaxPool3x3S2);
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16) {
        return super::elementwise_cuda::max_pool_3x3_s2(x);
    }
    max3_stride2_axis(&max3_stride2_axis(x, 3)?, 2)
}

/// Output side of the 3×3/2, padding-1 pool over `n` positions.
fn pooled(n: usize) -> usize {
    n.div_ceil(2)
}

/// Input index of the first maximum in output (oy, ox)'s window of one `h × w` plane; windows always hold at
/// least one input (padding 1, kernel 3).
fn window_argmax<T: WithDType>(x: &[T], (h, w): (usize, usize), (oy, ox): (usize, usize)) -> usize {
    let (y0, x0) = ((2 * oy).saturating_sub(1), (2 * ox).saturating_sub(1));
    let (y1, x1) = ((2 * oy + 2).min(h), (2 * ox + 2).min(w));
    let mut best = y0 * w + x0;
    for iy in y0..y1 {
        for ix in x0..x1 {
            let i = iy * w + ix;
            // `>` keeps the first maximum; a NaN never wins unless it came first (then it propagates).
            if x[i] > x[best] {
                best = i;
            }
        }
    }
    best
}

struct MaxPool3x3S2;

/// The larger of two values, NaN-propagating from `a` as `window_argmax` is (a NaN in front stays).
fn larger<T: WithDType>(a: T, b: T) -> T {
    if b > a {
        b
    } else {
        a
    }
}

/// Forward: per output row, the rows' elementwise maximum (a loop the compiler vectorises), then the maximum of
/// each column triple; the same values `window_argmax` picks.
fn max_pool_planes<T: WithDType>(x: &[T], (h, w): (usize, usize)) -> Vec<T> {
    let (oh, ow) = (pooled(h), pooled(w));
    let mut y = vec![T::zero(); x.len() / (h * w) * oh * ow];
    y.par_chunks_mut(oh * ow).zip(x.par_chunks(h * w)).for_each(|(y, x)| {
        let mut rows = vec![T::zero(); w];
        for oy in 0..oh {
            let (y0, y1) = ((2 * oy).saturating_sub(1), (2 * oy + 2).min(h));
            rows.copy_from_slice(&x[y0 * w..(y0 + 1) * w]);
            for iy in y0 + 1..y1 {
                for (m, &v) in rows.iter_mut().zip(&x[iy * w..(iy + 1) * w]) {
                    *m = larger(*m, v);
                }
            }
            for (ox, out) in y[oy * ow..(oy + 1) * ow].iter_mut().enumerate() {
                let (x0, x1) = ((2 * ox).saturating_sub(1), (2 * ox + 2).min(w));
                *out = rows[x0 + 1..x1].iter().fold(rows[x0], |m, &v| larger(m, v));
            }
        }
    });
    y
}

impl CustomOp1 for MaxPool3x3S2 {
    fn name(&self) -> &'static str {
        "semseg-max-pool-3x3-s2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(max_pool_planes(contiguous_slice(x, l, "max-pool")?, (h, w))),
            CpuStorage::F64(x) => CpuStorage::F64(max_pool_planes(contiguous_slice(x, l, "max-pool")?, (h, w))),
            _ => candle_core::bail!("max-pool: f32 or f64 input expected"),
        };
        Ok((out, Shape::from_dims(&[b, c, pooled(h), pooled(w)])))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &grad.to_dtype(x.dtype())?.contiguous()?,
            &MaxPoolBackward,
        )?))
    }
}

/// `(x, dy) → dx`: each output's gradient added at its window's first maximum.
struct MaxPoolBackward;

fn max_pool_backward_planes<T: WithDType>(x: &[T], dy: &[T], (h, w): (usize, usize)) -> Vec<T> {
    let (oh, ow) = (pooled(h), pooled(w));
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(h * w)
        .zip(x.par_chunks(h * w).zip(dy.par_chunks(oh * ow)))
        .for_each(|(dx, (x, dy))| {
            for oy in 0..oh {
                for ox in 0..ow {
                    dx[window_argmax(x, (h, w), (oy, ox))] += dy[oy * ow + ox];
                }
            }
        });
    dx
}

impl CustomOp2 for MaxPoolBackward {
    fn name(&self) -> &'static str {
        "semseg-max-pool-3x3-s2-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, _, h, w) = l1.shape().dims4()?;
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(dy)) => CpuStorage::F32(max_pool_backward_planes(
                contiguous_slice(x, l1, "max-pool backward")?,
                contiguous_slice(dy, l2, "max-pool backward")?,
                (h, w),
            )),
            (CpuStorage::F64(x), CpuStorage::F64(dy)) => CpuStorage::F64(max_pool_backward_planes(
                contiguous_slice(x, l1, "max-pool backward")?,
                contiguous_slice(dy, l2, "max-pool backward")?,
                (h, w),
            )),
            _ => candle_core::bail!("max-pool backward: input and gradient must both be f32 or both f64"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Averaging weights for one axis, row-major `[out, inp]`: bin `i` averages `[⌊i·inp/out⌋, ⌈(i+1)·inp/out⌉)` as
/// PyTorch's `adaptive_avg_pool2d`, so bins may overlap when `out` does not divide `inp`.
pub fn adaptive_avg_weights(out: usize, inp: usize) -> Vec<f64> {
    let mut m = vec![0.0; out * inp];
    for i in 0..out {
        let start = (i * inp) / out;
        let end = ((i + 1) * inp).div_ceil(out);
        let k = (end - start) as f64;
        for j in start..end {
            m[i * inp + j] = 1.0 / k;
        }
    }
    m
}

/// `F.adaptive_avg_pool2d(x, (out_h, out_w))` on `[B, C, H, W]`, differentiable (two matmuls; a mean for 1×1).
pub fn adaptive_avg_pool2d(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h == 0 || w == 0 || out_h == 0 || out_w == 0 {
        candle_core::bail!("adaptive_avg_pool2d: empty size {h}×{w} → {out_h}×{out_w}")
    }
    if (out_h, out_w) == (1, 1) {
        return x.mean_keepdim(3)?.mean_keepdim(2);
    }
    let (dtype, dev) = (x.dtype(), x.device());
    let rows = (h != out_h)
        .then(|| matrix(adaptive_avg_weights(out_h, h), out_h, h, dtype, dev))
        .transpose()?;
    let cols_t = (w != out_w)
        .then(|| matrix(adaptive_avg_weights(out_w, w), out_w, w, dtype, dev).and_then(|m| m.t()?.contiguous()))
        .transpose()?;
    separable_apply(x, rows.as_ref(), cols_t.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::gradcheck::{check_gradient, seeded};

    fn max_pool_reference(x: &[f64], h: usize, w: usize) -> Vec<f64> {
        let (oh, ow) = (h.div_ceil(2), w.div_ceil(2));
        let mut y = vec![f64::NEG_INFINITY; oh * ow];
        for oy in 0..oh {
            for ox in 0..ow {
                for ky in 0..3 {
                    for kx in 0..3 {
                        let (iy, ix) = ((2 * oy + ky) as isize - 1, (2 * ox + kx) as isize - 1);
                        if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                            let v = x[iy as usize * w + ix as usize];
                            y[oy * ow + ox] = y[oy * ow + ox].max(v);
                        }
                    }
                }
            }
        }
        y
    }

    #[test]
    fn max_pool_matches_direct_loop() -> Result<()> {
        for &(h, w) in &[(1, 1), (2, 3), (5, 4), (7, 7), (8, 6), (9, 2)] {
            let x = seeded(&[1, 1, h, w], 5)?;
            let y = max_pool_3x3_s2(&x)?;
            assert_eq!(y.dims(), &[1, 1, h.div_ceil(2), w.div_ceil(2)]);
            assert_eq!(
                y.flatten_all()?.to_vec1::<f64>()?,
                max_pool_reference(&x.flatten_all()?.to_vec1::<f64>()?, h, w)
            );
        }
        Ok(())
    }

    /// The CPU op and the composed ops (the other devices' path) agree forward and, without ties, backward.
    #[test]
    fn fused_max_pool_matches_the_composed_ops() -> Result<()> {
        for &(h, w) in &[(1, 1), (2, 3), (7, 8), (16, 15)] {
            let x = candle_core::Var::from_tensor(&seeded(&[2, 3, h, w], 9)?)?;
            let r = seeded(&[2, 3, h.div_ceil(2), w.div_ceil(2)], 4)?;
            let fused = max_pool_3x3_s2(x.as_tensor())?;
            let composed = max3_stride2_axis(&max3_stride2_axis(x.as_tensor(), 3)?, 2)?;
            let diff = (&fused - &composed)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
            assert_eq!(diff, 0.0, "{h}x{w} forward");
            let gf = (&fused * &r)?.sum_all()?.backward()?;
            let gc = (&composed * &r)?.sum_all()?.backward()?;
            let (a, b) = (gf.get(&x).unwrap(), gc.get(&x).unwrap());
            let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "{h}x{w} backward: {diff}");
        }
        Ok(())
    }

    #[test]
    fn max_pool_gradient() -> Result<()> {
        for &(h, w) in &[(5, 4), (4, 7), (1, 3)] {
            check_gradient(&[2, 2, h, w], max_pool_3x3_s2)?;
        }
        Ok(())
    }

    #[test]
    fn adaptive_bins_follow_pytorch() {
        // 5 → 3: PyTorch bins [0,2), [1,4), [3,5).
        let m = adaptive_avg_weights(3, 5);
        let h = 0.5;
        let t = 1.0 / 3.0;
        assert_eq!(m, vec![h, h, 0.0, 0.0, 0.0, 0.0, t, t, t, 0.0, 0.0, 0.0, 0.0, h, h]);
        // 2 → 6 (more bins than inputs): every bin holds exactly one input.
        let m = adaptive_avg_weights(6, 2);
        assert_eq!(m, vec![1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
    }

    #[test]
    fn adaptive_pool_matches_direct_mean() -> Result<()> {
        let (h, w) = (7, 5);
        let x = seeded(&[1, 1, h, w], 2)?;
        let v = x.flatten_all()?.to_vec1::<f64>()?;
        for &(oh, ow) in &[(3, 2), (6, 6), (1, 1), (2, 3), (7, 5)] {
            let y = adaptive_avg_pool2d(&x, oh, ow)?.flatten_all()?.to_vec1::<f64>()?;
            for i in 0..oh {
                for j in 0..ow {
                    let (ys, ye) = (i * h / oh, ((i + 1) * h).div_ceil(oh));
                    let (xs, xe) = (j * w / ow, ((j + 1) * w).div_ceil(ow));
                    let mut s = 0.0;
                    for yy in ys..ye {
                        for xx in xs..xe {
                            s += v[yy * w + xx];
                        }
                    }
                    let want = s / ((ye - ys) * (xe - xs)) as f64;
                    assert!((y[i * ow + j] - want).abs() < 1e-12, "{oh}x{ow} at {i},{j}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn adaptive_pool_gradient() -> Result<()> {
        for &(oh, ow) in &[(3, 2), (1, 1), (6, 6)] {
            check_gradient(&[2, 2, 5, 4], |x| adaptive_avg_pool2d(x, oh, ow))?;
        }
        Ok(())
    }
}
