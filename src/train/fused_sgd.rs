//! sgd / nag in place, on the CPU and on CUDA: two passes over each parameter and no allocation, where the composed
//! tensor version makes about seven full-size temporaries per parameter per step (for ResNet-18 about 45 MB each,
//! which on small crops costs as much as the network; on a GPU, some 1,270 kernel launches and 1,090 allocations
//! a step for DeepLabV3-ResNet-50). Same f32 arithmetic in the same order as [`super::optim`]'s composed update, so all
//! give the same numbers (the CUDA kernels round each operation as the CPU does:
//! `model::ops::elementwise_cuda`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp3, Layout, Result, Tensor};

use super::optim::OptimizerConfig;
use crate::model::ops::{contiguous_slice, contiguous_slice_mut};
use crate::sagemaker::hyperparameters::OptimizerKind;

/// Whether [`step`] handles this parameter and its gradient.
pub fn applies(config: &OptimizerConfig, weight: &Tensor, grad: &Tensor) -> bool {
    matches!(config.kind, OptimizerKind::Sgd | OptimizerKind::Nag)
        && (weight.device().is_cpu() || weight.device().is_cuda())
        && weight.dtype() == DType::F32
        && grad.dtype() == DType::F32
        && weight.is_contiguous()
}

/// One update of `weight` in place; `state` holds the momentum buffer (created at the first step, as PyTorch).
pub fn step(config: &OptimizerConfig, weight: &Tensor, grad: &Tensor, state: &mut Vec<Tensor>, lr: f64) -> Result<()> {
    let grad = grad.contiguous()?;
    let momentum = config.momentum as f32;
    let weight_decay = config.weight_decay as f32;
    if config.momentum > 0.0 {
        let first = state.is_empty();
        if first {
            state.push(weight.zeros_like()?);
        }
        state[0].inplace_op3(
            &grad,
            weight,
            &MomentumBuffer {
                momentum,
                weight_decay,
                first,
            },
        )?;
    }
    let buffer = state.first().cloned().unwrap_or_else(|| grad.clone());
    weight.inplace_op3(
        &grad,
        &buffer,
        &ApplyUpdate {
            lr: lr as f32,
            momentum,
            weight_decay,
            nesterov: config.kind == OptimizerKind::Nag,
        },
    )
}

fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    match s {
        CpuStorage::F32(v) => contiguous_slice_mut(v, l, what),
        other => candle_core::bail!("{what}: f32 only, got {:?}", other.dtype()),
    }
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => contiguous_slice(v, l, what),
        other => candle_core::bail!("{what}: f32 only, got {:?}", other.dtype()),
    }
}

/// buf ← g' at the first step, else μ·buf + g', where g' = grad + wd·w. Operands: (buf; grad, weight).
struct MomentumBuffer {
    momentum: f32,
    weight_decay: f32,
    first: bool,
}

impl InplaceOp3 for MomentumBuffer {
    fn name(&self) -> &'static str {
        "semseg-sgd-momentum"
    }

    fn cpu_fwd(
        &self,
        buf: &mut CpuStorage,
        bl: &Layout,
        grad: &CpuStorage,
        gl: &Layout,
        weight: &CpuStorage,
        wl: &Layout,
    ) -> Result<()> {
        let buf = f32_slice_mut(buf, bl, "sgd")?;
        let grad = f32_slice(grad, gl, "sgd")?;
        let weight = f32_slice(weight, wl, "sgd")?;
        if buf.len() != grad.len() || buf.len() != weight.len() {
            candle_core::bail!("sgd: buffer, gradient and parameter sizes differ")
        }
        for ((b, &g), &w) in buf.iter_mut().zip(grad).zip(weight) {
            let g = g + w * self.weight_decay;
            *b = if self.first { g } else { *b * self.momentum + g };
        }
        Ok(())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        buf: &mut candle_core::CudaStorage,
        bl: &Layout,
        grad: &candle_core::CudaStorage,
        gl: &Layout,
        weight: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<()> {
        crate::model::ops::elementwise_cuda::sgd_momentum_in_place(
            (buf, bl),
            (grad, gl),
            (weight, wl),
            self.momentum,
            self.weight_decay,
            self.first,
        )
    }
}

/// w ← w − lr·d with d = buf (sgd), g' + μ·buf (nag) or g' (no momentum). Operands: (weight; grad, buf).
struct ApplyUpdate {
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    nesterov: bool,
}

impl InplaceOp3 for ApplyUpdate {
    fn name(&self) -> &'static str {
        "semseg-sgd-apply"
    }

    fn cpu_fwd(
        &self,
        weight: &mut CpuStorage,
        wl: &Layout,
        grad: &CpuStorage,
        gl: &Layout,
        buf: &CpuStorage,
        bl: &Layout,
    ) -> Result<()> {
        let weight = f32_slice_mut(weight, wl, "sgd")?;
        let grad = f32_slice(grad, gl, "sgd")?;
        let buf = f32_slice(buf, bl, "sgd")?;
        if weight.len() != grad.len() || weight.len() != buf.len() {
            candle_core::bail!("sgd: buffer, gradient and parameter sizes differ")
        }
        for ((w, &g), &b) in weight.iter_mut().zip(grad).zip(buf) {
            let direction = if self.momentum == 0.0 {
                g + *w * self.weight_decay
            } else if self.nesterov {
                (g + *w * self.weight_decay) + b * self.momentum
            } else {
                b
            };
            *w -= direction * self.lr;
        }
        Ok(())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        weight: &mut candle_core::CudaStorage,
        wl: &Layout,
        grad: &candle_core::CudaStorage,
        gl: &Layout,
        buf: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<()> {
        use crate::model::ops::elementwise_cuda::{sgd_apply_in_place, SgdRule};
        let rule = if self.momentum == 0.0 {
            SgdRule::Plain
        } else if self.nesterov {
            SgdRule::Nesterov
        } else {
            SgdRule::Momentum
        };
        sgd_apply_in_place(
            (weight, wl),
            (grad, gl),
            (buf, bl),
            (self.lr, self.momentum, self.weight_decay),
            rule,
        )
    }
}
