//! Bilinear resize with PyTorch's exact sampling (`align_corners=False`, output size given, no antialias).
//!
//! Where a gradient may be needed, or off the CPU, it is two matmuls with interpolation matrices (differentiable,
//! every device). For inference on the CPU in f32 it is evaluated directly, two taps along each axis: the matmuls
//! multiply by the matrices' zeros too, which for the logits' 64² → 512² is 30 times the arithmetic.

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

use super::{contiguous_slice, matrix, separable_apply};

/// PyTorch's two source taps for output `o` of `out` along an axis of `inp`: `src = max((o + 0.5) · inp/out − 0.5,
/// 0)`, `i0 = min(floor(src), inp − 1)`, `i1 = i0 + (i0 < inp − 1)`, weights `1 − λ` and `λ = src − i0`.
fn taps(o: usize, out: usize, inp: usize) -> (usize, usize, f64) {
    let src = ((o as f64 + 0.5) * (inp as f64 / out as f64) - 0.5).max(0.0);
    let i0 = (src.floor() as usize).min(inp - 1);
    let i1 = if i0 + 1 < inp { i0 + 1 } else { i0 };
    (i0, i1, (src - i0 as f64).clamp(0.0, 1.0))
}

/// Interpolation weights for one axis, row-major `[out, inp]` ([`taps`]). The same formula serves up- and
/// down-sampling (PyTorch does not antialias), so the matrix has at most two non-zeros a row and each row sums to
/// one.
pub fn bilinear_weights(out: usize, inp: usize) -> Vec<f64> {
    let mut m = vec![0.0; out * inp];
    for o in 0..out {
        let (i0, i1, l1) = taps(o, out, inp);
        m[o * inp + i0] += 1.0 - l1;
        m[o * inp + i1] += l1;
    }
    m
}

fn transpose(m: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0.0; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = m[r * cols + c];
        }
    }
    t
}

/// Resizes `x` (`[B, C, H, W]`) to `[B, C, out_h, out_w]` as `F.interpolate(x, (out_h, out_w), mode="bilinear",
/// align_corners=False)` does. Differentiable (two matmuls); axes whose size does not change are copied exactly,
/// and a 1×1 input is broadcast (its interpolation weights are all one).
pub fn resize_bilinear(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if out_h == 0 || out_w == 0 || h == 0 || w == 0 {
        candle_core::bail!("resize_bilinear: empty size {h}×{w} → {out_h}×{out_w}")
    }
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    if (h, w) == (1, 1) {
        return x.broadcast_as((b, c, out_h, out_w));
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 && !x.track_op() {
        return resize_cpu_f32(x, out_h, out_w);
    }
    let (dtype, dev) = (x.dtype(), x.device());
    let rows = if h != out_h {
        Some(matrix(bilinear_weights(out_h, h), out_h, h, dtype, dev)?)
    } else {
        None
    };
    let cols_t = if w != out_w {
        Some(matrix(
            transpose(&bilinear_weights(out_w, w), out_w, w),
            w,
            out_w,
            dtype,
            dev,
        )?)
    } else {
        None
    };
    separable_apply(x, rows.as_ref(), cols_t.as_ref())
}

/// One axis's taps as f32 weights, the matrices' values: `(i0, i1, 1 − λ, λ)` per output.
fn axis_taps(out: usize, inp: usize) -> Vec<(usize, usize, f32, f32)> {
    (0..out)
        .map(|o| {
            let (i0, i1, l1) = taps(o, out, inp);
            (i0, i1, (1.0 - l1) as f32, l1 as f32)
        })
        .collect()
}

/// [`resize_bilinear`] for f32 on the CPU without a gradient: per plane, each input row interpolated along W once,
/// then each output row blended from its two (the matmul path's order: columns, then rows).
fn resize_cpu_f32(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let src = plane_values(&storage, layout)?;
    let (rows, cols) = (axis_taps(out_h, h), axis_taps(out_w, w));
    let mut out = super::output_buffer::<f32>(b * c * out_h * out_w);
    out.par_chunks_mut(out_h * out_w)
        .zip(src.par_chunks(h * w))
        .for_each_init(Vec::new, |across, (o, plane)| {
            // `across` [h, out_w]: every input row interpolated along W.
            across.resize(h * out_w, 0f32);
            for (row, a) in plane.chunks(w).zip(across.chunks_mut(out_w)) {
                for (v, &(j0, j1, w0, w1)) in a.iter_mut().zip(&cols) {
                    *v = w0 * row[j0] + w1 * row[j1];
                }
            }
            for (orow, &(i0, i1, w0, w1)) in o.chunks_mut(out_w).zip(&rows) {
                let (r0, r1) = (&across[i0 * out_w..][..out_w], &across[i1 * out_w..][..out_w]);
                for ((v, &a0), &a1) in orow.iter_mut().zip(r0).zip(r1) {
                    *v = w0 * a0 + w1 * a1;
                }
            }
        });
    Tensor::from_vec(out, (b, c, out_h, out_w), &candle_core::Device::Cpu)
}

fn plane_values<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) => contiguous_slice(v, layout, "resize_bilinear"),
        _ => candle_core::bail!("resize_bilinear: expected f32 on the CPU"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::gradcheck::{check_gradient, seeded};
    use candle_core::{DType, Device};

    /// Direct per-pixel evaluation of PyTorch's formula, independent of the matrix code path.
    fn reference(x: &[f64], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f64> {
        let idx = |o: usize, inp: usize, out: usize| {
            let src = ((o as f64 + 0.5) * inp as f64 / out as f64 - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(inp - 1);
            let i1 = (i0 + 1).min(inp - 1);
            (i0, i1, src - i0 as f64)
        };
        let mut y = vec![0.0; oh * ow];
        for oy in 0..oh {
            let (y0, y1, ly) = idx(oy, h, oh);
            for ox in 0..ow {
                let (x0, x1, lx) = idx(ox, w, ow);
                let v = |yy: usize, xx: usize| x[yy * w + xx];
                y[oy * ow + ox] = (1.0 - ly) * ((1.0 - lx) * v(y0, x0) + lx * v(y0, x1))
                    + ly * ((1.0 - lx) * v(y1, x0) + lx * v(y1, x1));
            }
        }
        y
    }

    #[test]
    fn matches_pytorch_formula_up_and_down_odd_sizes() -> Result<()> {
        for &(h, w, oh, ow) in &[
            (3, 5, 7, 11),
            (7, 5, 3, 2),
            (4, 4, 9, 4),
            (5, 1, 2, 6),
            (1, 1, 3, 4),
            (6, 9, 6, 4),
        ] {
            let x = seeded(&[1, 1, h, w], 7)?;
            let y = resize_bilinear(&x, oh, ow)?;
            assert_eq!(y.dims(), &[1, 1, oh, ow]);
            let got = y.flatten_all()?.to_vec1::<f64>()?;
            let want = reference(&x.flatten_all()?.to_vec1::<f64>()?, h, w, oh, ow);
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() < 1e-12, "{h}x{w}->{oh}x{ow}: {g} vs {e}");
            }
        }
        Ok(())
    }

    /// The direct f32 path (inference on the CPU) against the matmul path (taken for a `Var`, which may need a
    /// gradient) and the formula: up and down, one axis unchanged, single rows and columns, several planes, and a
    /// non-contiguous input.
    #[test]
    fn the_direct_f32_path_matches_the_matrices_and_the_formula() -> Result<()> {
        for &(h, w, oh, ow) in &[
            (3, 5, 7, 11),
            (7, 5, 3, 2),
            (4, 4, 9, 4),
            (5, 1, 2, 6),
            (1, 6, 4, 3),
            (64, 64, 512, 512),
        ] {
            let x = seeded(&[2, 3, h, w], 11)?.to_dtype(DType::F32)?;
            let direct = resize_bilinear(&x, oh, ow)?;
            let var = candle_core::Var::from_tensor(&x)?;
            let matmul = resize_bilinear(var.as_tensor(), oh, ow)?;
            assert_eq!(direct.dims(), &[2, 3, oh, ow]);
            let diff = (&direct - &matmul)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "{h}x{w}->{oh}x{ow}: direct and matmul differ by {diff}");
            let plane = x
                .get(1)?
                .get(2)?
                .flatten_all()?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            let want = reference(&plane, h, w, oh, ow);
            let got = direct
                .get(1)?
                .get(2)?
                .flatten_all()?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() < 1e-5, "{h}x{w}->{oh}x{ow}: {g} vs {e}");
            }
        }
        let x = seeded(&[1, 2, 6, 5], 5)?.to_dtype(DType::F32)?;
        let transposed = x.transpose(2, 3)?; // [1, 2, 5, 6], not contiguous
        let want = resize_bilinear(&transposed.contiguous()?, 9, 4)?;
        let got = resize_bilinear(&transposed, 9, 4)?;
        assert_eq!((got - want)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn rows_sum_to_one_and_known_values() {
        // 2 → 4: PyTorch gives sources 0, 0.25, 0.75, 1 (clamped) → weights [1,0],[.75,.25],[.25,.75],[0,1].
        let m = bilinear_weights(4, 2);
        assert_eq!(m, vec![1.0, 0.0, 0.75, 0.25, 0.25, 0.75, 0.0, 1.0]);
        for (out, inp) in [(7, 3), (3, 7), (1, 5), (5, 1)] {
            let m = bilinear_weights(out, inp);
            for r in m.chunks(inp) {
                assert!((r.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        for &(h, w, oh, ow) in &[(3, 4, 5, 7), (5, 7, 2, 3), (1, 1, 2, 3), (3, 3, 3, 5)] {
            check_gradient(&[2, 2, h, w], |x| resize_bilinear(x, oh, ow))?;
        }
        Ok(())
    }

    #[test]
    fn keeps_batch_and_channels_apart_and_dtype() -> Result<()> {
        let x = seeded(&[2, 3, 4, 5], 3)?.to_dtype(DType::F32)?;
        let y = resize_bilinear(&x, 7, 9)?;
        assert_eq!(y.dtype(), DType::F32);
        for b in 0..2 {
            for c in 0..3 {
                let one = resize_bilinear(&x.narrow(0, b, 1)?.narrow(1, c, 1)?, 7, 9)?;
                let part = y.narrow(0, b, 1)?.narrow(1, c, 1)?;
                let d = (one - part)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d < 1e-6);
            }
        }
        assert!(resize_bilinear(&Tensor::zeros((1, 1, 0, 3), DType::F32, &Device::Cpu)?, 2, 2).is_err());
        Ok(())
    }
}
