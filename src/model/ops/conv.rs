//! A 2-D convolution whose backward works for every input size.
//!
//! Candle 0.11 computes a strided convolution's input gradient with `conv_transpose2d` and one `output_padding`
//! derived from the height alone, so the gradient has the wrong width (and backward fails) when
//! `(H + 2p − d(k−1) − 1) mod s` differs between height and width, e.g. a stride-2 conv on a 5×6 input. Padding the
//! bottom or right edge with zeros until both remainders are equal leaves the output unchanged (the extra rows or
//! columns are never reached by a window) and makes Candle's single `output_padding` right for both axes.

use candle_core::{Result, Tensor};

/// Remainder of the last window's reach along one axis: rows past the last window that the output never uses.
fn slack(size: usize, k: usize, padding: usize, stride: usize, dilation: usize) -> Option<usize> {
    (size + 2 * padding)
        .checked_sub(dilation * (k - 1) + 1)
        .map(|reach| reach % stride)
}

/// `x` `[B, Cin, H, W]` ⊛ `weight` `[Cout, Cin, k, k]` (no groups), with the padding fix above when needed.
pub fn conv2d(x: &Tensor, weight: &Tensor, padding: usize, stride: usize, dilation: usize) -> Result<Tensor> {
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
    x.conv2d(weight, padding, stride, dilation, 1)
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
