//! Test helper: compares Candle's backward with central finite differences, in f64 on the CPU.

use candle_core::{DType, Device, Result, Tensor, Var};

/// Deterministic, tie-free pseudo-random values in (−1, 1), f64 on the CPU.
pub fn seeded(shape: &[usize], seed: u64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let data: Vec<f64> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// Checks d(sum(f(x) · r))/dx against central differences for one input of `shape`.
pub fn check_gradient(shape: &[usize], f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
    check_gradients(&[shape], |xs| f(&xs[0]))
}

/// Checks the gradient of `sum(f(xs) · r)` with respect to every input against central differences, where `r` is a
/// fixed random tensor (so every output element's gradient path is exercised with a different weight).
pub fn check_gradients(shapes: &[&[usize]], f: impl Fn(&[Tensor]) -> Result<Tensor>) -> Result<()> {
    let inputs: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| seeded(s, 11 + i as u64))
        .collect::<Result<_>>()?;
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&xs)?;
    let r = seeded(out.dims(), 99)?;
    let loss = (out * &r)?.sum_all()?;
    let grads = loss.backward()?;
    let eps = 1e-6;
    let loss_at = |xs: &[Tensor]| -> Result<f64> { (f(xs)? * &r)?.sum_all()?.to_scalar::<f64>() };
    let mut any_nonzero = false;
    for (k, x) in inputs.iter().enumerate() {
        let analytic = match grads.get(&xs[k]) {
            Some(g) => g.flatten_all()?.to_vec1::<f64>()?,
            None => candle_core::bail!("input {k}: no gradient reached it"),
        };
        let base = x.flatten_all()?.to_vec1::<f64>()?;
        for i in 0..base.len() {
            let probe = |delta: f64| -> Result<f64> {
                let mut v = base.clone();
                v[i] += delta;
                let mut moved = inputs.clone();
                moved[k] = Tensor::from_vec(v, x.dims(), &Device::Cpu)?;
                loss_at(&moved)
            };
            let numeric = (probe(eps)? - probe(-eps)?) / (2.0 * eps);
            any_nonzero |= numeric.abs() > 1e-9;
            let tol = 1e-6 * numeric.abs().max(1.0);
            if (analytic[i] - numeric).abs() > tol {
                candle_core::bail!(
                    "input {k} {:?} element {i}: backward {} vs finite difference {numeric}",
                    x.dims(),
                    analytic[i]
                )
            }
        }
    }
    if !any_nonzero {
        candle_core::bail!("all finite-difference gradients are zero: the check proves nothing")
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catches_a_wrong_gradient() -> Result<()> {
        // detach() hides the dependency on x from backward: the check must fail.
        let err = check_gradient(&[2, 3], |x| x.detach() * x);
        assert!(err.is_err());
        check_gradient(&[2, 3], |x| x.sqr())?;
        assert_eq!(seeded(&[4], 1)?.dtype(), DType::F64);
        Ok(())
    }
}
