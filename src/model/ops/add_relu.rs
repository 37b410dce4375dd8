//! `relu(a + b)` as one op: a residual block's shortcut add and final ReLU in training.
//!
//! Composed from Candle's ops that is two full-size outputs forward (the sum, then the ReLU) and five backward (the
//! ReLU's zeros, compare, cast and multiply, then the add's gradient); fused, it is one pass forward and one mask
//! pass backward, whose result is both inputs' gradient. CPU f32/f64, CUDA f32/bf16 (`elementwise_cuda`); other
//! devices and dtypes take the composed ops.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::batch_norm::ReluMask;
use super::contiguous_slice;

/// `max(a + b, 0)`, both `[..]` of one shape, differentiable with respect to both.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if a.device().is_cuda()
        && matches!(a.dtype(), DType::F32 | DType::BF16)
        && a.dtype() == b.dtype()
        && a.shape() == b.shape()
    {
        return super::elementwise_cuda::add_relu(a, b);
    }
    let fused = a.device().is_cpu() && matches!(a.dtype(), DType::F32 | DType::F64) && a.dtype() == b.dtype();
    if !fused || a.shape() != b.shape() {
        return (a + b)?.relu();
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
}

struct AddRelu;

/// Elements per parallel task.
const STRIPE: usize = 1 << 14;

fn add_relu_slices<T: WithDType>(a: &[T], b: &[T]) -> Vec<T> {
    // Every output element is written from one pair: the caller applies the op only to tensors of one shape.
    assert_eq!(a.len(), b.len(), "add-relu: operand lengths");
    let mut out = super::output_buffer(a.len());
    out.par_chunks_mut(STRIPE)
        .zip(a.par_chunks(STRIPE).zip(b.par_chunks(STRIPE)))
        .for_each(|(o, (a, b))| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                let s = a + b;
                *o = if s > T::zero() { s } else { T::zero() };
            }
        });
    out
}

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "semseg-add-relu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => CpuStorage::F32(add_relu_slices(
                contiguous_slice(a, l1, "add-relu")?,
                contiguous_slice(b, l2, "add-relu")?,
            )),
            (CpuStorage::F64(a), CpuStorage::F64(b)) => CpuStorage::F64(add_relu_slices(
                contiguous_slice(a, l1, "add-relu")?,
                contiguous_slice(b, l2, "add-relu")?,
            )),
            _ => candle_core::bail!("add-relu: both inputs must be f32 or both f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, _a: &Tensor, _b: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // d/da = d/db = grad where the output is positive.
        let masked = grad.contiguous()?.apply_op2_no_bwd(&res.contiguous()?, &ReluMask)?;
        Ok((Some(masked.clone()), Some(masked)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::gradcheck::{check_gradients, seeded};
    use candle_core::{Device, Var};

    #[test]
    fn matches_the_composed_ops_forward_and_backward() -> Result<()> {
        for dtype in [DType::F32, DType::F64] {
            let a = Var::from_tensor(&seeded(&[2, 3, 5, 4], 1)?.to_dtype(dtype)?)?;
            let b = Var::from_tensor(&seeded(&[2, 3, 5, 4], 2)?.to_dtype(dtype)?)?;
            let weights = seeded(&[2, 3, 5, 4], 3)?.to_dtype(dtype)?;
            let fused = add_relu(a.as_tensor(), b.as_tensor())?;
            let composed = (a.as_tensor() + b.as_tensor())?.relu()?;
            let diff = (&fused - &composed)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_dtype(DType::F64)?;
            assert_eq!(diff.to_scalar::<f64>()?, 0.0, "{dtype:?} forward");
            let gf = (fused * &weights)?.sum_all()?.backward()?;
            let gc = (composed * &weights)?.sum_all()?.backward()?;
            for v in [&a, &b] {
                let (f, c) = (gf.get(v).unwrap(), gc.get(v).unwrap());
                let diff = (f - c)?.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?;
                assert_eq!(diff.to_scalar::<f64>()?, 0.0, "{dtype:?} gradient");
            }
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        check_gradients(&[&[2, 3, 4, 5], &[2, 3, 4, 5]], |v| add_relu(&v[0], &v[1]))
    }

    #[test]
    fn other_devices_and_mismatched_shapes_take_the_composed_ops() -> Result<()> {
        let a = Tensor::ones((2, 3), DType::F32, &Device::Cpu)?;
        let b = Tensor::ones(3, DType::F32, &Device::Cpu)?;
        // A broadcast the fused op does not handle: the composed ops' error, not a wrong answer.
        assert!(add_relu(&a, &b).is_err());
        let h = Tensor::ones((2, 3), DType::F16, &Device::Cpu)?;
        assert_eq!(
            add_relu(&h, &h)?.to_dtype(DType::F32)?.to_vec2::<f32>()?,
            vec![vec![2.0; 3]; 2]
        );
        Ok(())
    }
}
