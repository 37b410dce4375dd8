//! BatchNorm's running statistics, updated in place after each training forward:
//! `running ← (1 − m)·running + m·(s·batch)`, with `s` = n/(n − 1) for the variance (PyTorch keeps the unbiased
//! one) and 1 for the mean.
//!
//! One pass over the `[C]` values, on the CPU or CUDA, where the composed update took five ops (two scalings, an
//! add, the unbiasing and `Var::set`'s copy), each a kernel launch and an allocation on a GPU: some 540 of each per
//! DeepLabV3-ResNet-50 step, for its 60 BatchNorms' two statistics. The arithmetic is the composed update's, in f32,
//! each multiplication and addition rounded on its own: `running·(1 − m) + (batch·s)·m`.

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Tensor};

use super::{contiguous_slice, contiguous_slice_mut};

/// Whether [`update_in_place`] takes these tensors: f32, contiguous, one shape, on the CPU (or CUDA in a `cuda`
/// build).
pub fn supports(running: &Tensor, batch: &Tensor) -> bool {
    let device_ok = running.device().is_cpu() || (cfg!(feature = "cuda") && running.device().is_cuda());
    device_ok
        && running.device().same_device(batch.device())
        && running.dtype() == DType::F32
        && batch.dtype() == DType::F32
        && running.is_contiguous()
        && running.dims() == batch.dims()
}

/// `running ← (1 − momentum)·running + momentum·(scale·batch)`, in place (see the module's docs); both f32 `[C]`
/// on one device ([`supports`]).
pub fn update_in_place(running: &Tensor, batch: &Tensor, momentum: f64, scale: f64) -> Result<()> {
    running.inplace_op2(
        &batch.contiguous()?,
        &RunningUpdate {
            keep: (1.0 - momentum) as f32,
            momentum: momentum as f32,
            scale: scale as f32,
        },
    )
}

/// The update's constants, as the composed ops rounded them to f32.
struct RunningUpdate {
    keep: f32,
    momentum: f32,
    scale: f32,
}

impl InplaceOp2 for RunningUpdate {
    fn name(&self) -> &'static str {
        "semseg-batch-norm-running-update"
    }

    fn cpu_fwd(&self, running: &mut CpuStorage, rl: &Layout, batch: &CpuStorage, bl: &Layout) -> Result<()> {
        let (CpuStorage::F32(r), CpuStorage::F32(b)) = (running, batch) else {
            candle_core::bail!("{}: f32 statistics only", self.name())
        };
        let r = contiguous_slice_mut(r, rl, self.name())?;
        let b = contiguous_slice(b, bl, self.name())?;
        if r.len() != b.len() {
            candle_core::bail!("{}: {} running values, {} batch values", self.name(), r.len(), b.len())
        }
        for (r, &b) in r.iter_mut().zip(b) {
            *r = *r * self.keep + b * self.scale * self.momentum;
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        running: &mut candle_core::CudaStorage,
        rl: &Layout,
        batch: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<()> {
        super::elementwise_cuda::running_update_in_place(
            (running, rl),
            (batch, bl),
            (self.keep, self.scale, self.momentum),
        )
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// The composed update this op replaces (`BatchNorm2d`'s before it), op for op.
    fn composed(running: &Tensor, batch: &Tensor, momentum: f64, scale: f64) -> Result<Tensor> {
        let batch = (batch * scale)?.affine(momentum, 0.0)?;
        running.affine(1.0 - momentum, 0.0)? + batch
    }

    #[test]
    fn matches_the_composed_update_to_the_bit() -> Result<()> {
        let running = Tensor::new(&[0.5f32, -1.25, 3.0e-3, 7.0, 0.0, 1.0e6], &Device::Cpu)?;
        let batch = Tensor::new(&[0.1f32, 2.5, -4.0e-3, 7.5, 3.0, 1.5e6], &Device::Cpu)?;
        for (momentum, scale) in [(0.1, 1.0), (0.1, 4096.0 / 4095.0), (0.01, 2.0), (0.9, 1.0)] {
            let want = composed(&running, &batch, momentum, scale)?.to_vec1::<f32>()?;
            let target = running.copy()?;
            update_in_place(&target, &batch, momentum, scale)?;
            let got = target.to_vec1::<f32>()?;
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "momentum {momentum}, scale {scale}");
        }
        Ok(())
    }

    #[test]
    fn refuses_mismatched_statistics() -> Result<()> {
        let running = Tensor::zeros(4, DType::F32, &Device::Cpu)?;
        let short = Tensor::zeros(3, DType::F32, &Device::Cpu)?;
        assert!(!supports(&running, &short));
        assert!(!supports(&running, &running.to_dtype(DType::F64)?));
        assert!(supports(&running, &running));
        assert!(update_in_place(&running, &short, 0.1, 1.0).is_err());
        Ok(())
    }
}
