//! Building blocks shared by the backbone and the heads: convolution, BatchNorm with a train flag, and the
//! conv → BN pair that folds into one biased convolution for inference.
//!
//! Each constructor takes a `VarBuilder` already scoped to the torchvision module path, so parameter names come
//! from the structure (`vb.pp("layer1").pp(0).pp("conv1")` → `layer1.0.conv1.weight`).

use std::sync::Arc;

use candle_core::{DType, Module, ModuleT, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use super::ops;
use super::ops::conv::{conv2d_fused, KeptWeights};

/// How a convolution's weights start when the `VarBuilder` creates them (training from scratch).
#[derive(Clone, Copy, Debug)]
pub enum ConvInit {
    /// torchvision ResNet: `kaiming_normal_(mode="fan_out", nonlinearity="relu")`, std = √(2 / (Cout·k²)).
    KaimingFanOut,
    /// PyTorch's `nn.Conv2d` default (used by the segmentation heads): weight and bias uniform in ±1/√(Cin·k²).
    TorchDefault,
}

/// Geometry of a square-kernel convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvSpec {
    pub in_ch: usize,
    pub out_ch: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
}

impl ConvSpec {
    /// A k×k convolution with stride 1 and "same" padding for the given dilation.
    pub fn same(in_ch: usize, out_ch: usize, kernel: usize, dilation: usize) -> Self {
        Self {
            in_ch,
            out_ch,
            kernel,
            stride: 1,
            padding: dilation * (kernel / 2),
            dilation,
        }
    }

    pub fn stride(mut self, stride: usize) -> Self {
        self.stride = stride;
        self
    }
}

/// `nn.Conv2d` (groups = 1). Parameters: `weight` `[Cout, Cin, k, k]`, optional `bias` `[Cout]`.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    spec: ConvSpec,
    /// What the CPU kernel keeps from the weight across calls; only for a weight that never changes (made by
    /// [`ConvBn::fold`]), shared by clones.
    kept: Option<Arc<KeptWeights>>,
}

impl Conv2d {
    pub fn new(spec: ConvSpec, bias: bool, init: ConvInit, vb: VarBuilder) -> Result<Self> {
        let k2 = spec.kernel * spec.kernel;
        let (w_init, bound) = match init {
            ConvInit::KaimingFanOut => {
                let std = (2.0 / (spec.out_ch * k2) as f64).sqrt();
                (Init::Randn { mean: 0.0, stdev: std }, 0.0)
            }
            ConvInit::TorchDefault => {
                let b = 1.0 / ((spec.in_ch * k2) as f64).sqrt();
                (Init::Uniform { lo: -b, up: b }, b)
            }
        };
        let weight = vb.get_with_hints((spec.out_ch, spec.in_ch, spec.kernel, spec.kernel), "weight", w_init)?;
        let bias = if bias {
            let b_init = if bound > 0.0 {
                Init::Uniform { lo: -bound, up: bound }
            } else {
                Init::Const(0.0)
            };
            Some(vb.get_with_hints(spec.out_ch, "bias", b_init)?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            spec,
            kept: None,
        })
    }

    /// A convolution for inference whose weight and bias never change (made from a folded one): the CPU kernel
    /// keeps what it derives from the weight across calls.
    pub fn frozen(weight: Tensor, bias: Option<Tensor>, spec: ConvSpec) -> Self {
        Self {
            weight,
            bias,
            spec,
            kept: Some(Arc::new(KeptWeights::default())),
        }
    }

    pub fn spec(&self) -> ConvSpec {
        self.spec
    }

    /// `[Cout, Cin, k, k]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The same convolution cut from any autograd graph (its parameters may be `Var`s): for the inference network,
    /// whose convolutions then take the fused path.
    pub fn detached(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            bias: self.bias.as_ref().map(Tensor::detach),
            spec: self.spec,
            // A trainable weight has none; a folded one never changes.
            kept: self.kept.clone(),
        }
    }

    /// `relu?(conv(x) + bias + residual)`, fused into the convolution where the device allows ([`conv2d_fused`]).
    pub fn forward_with(&self, x: &Tensor, residual: Option<&Tensor>, relu: bool) -> Result<Tensor> {
        self.forward_with_bias(x, self.bias.as_ref(), residual, relu)
    }

    /// [`Self::forward_with`] with another bias (`[Cout]`) in place of this convolution's own.
    pub fn forward_with_bias(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        residual: Option<&Tensor>,
        relu: bool,
    ) -> Result<Tensor> {
        let s = &self.spec;
        conv2d_fused(
            x,
            (&self.weight, self.kept.as_deref()),
            bias,
            residual,
            relu,
            (s.padding, s.stride, s.dilation),
        )
    }
}

impl Module for Conv2d {
    /// `[B, Cin, H, W]` → `[B, Cout, H', W']`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None, false)
    }
}

/// PyTorch's `nn.BatchNorm2d` defaults: eps 1e-5, momentum 0.1.
pub const BN_EPS: f64 = 1e-5;
pub const BN_MOMENTUM: f64 = 0.1;

/// `nn.BatchNorm2d` with PyTorch's semantics, written here rather than taken from candle-nn because candle-nn 0.11
/// transposes and copies the whole activation in training and has no hook to fold it into a convolution.
///
/// Training normalises with the batch's biased variance and updates the running statistics in place
/// (`running = (1 − m)·running + m·batch`, the variance unbiased by n/(n−1)), as PyTorch does; the normalisation is
/// differentiable with respect to the input, weight and bias. Evaluation uses the running statistics (detached).
/// Parameters: `weight`, `bias`, `running_mean`, `running_var`, all `[C]`. With a `VarMap`, the running statistics
/// are `Var`s too: [`crate::model::weights::is_trainable`] tells the optimizer to leave them alone.
#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

impl BatchNorm2d {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        // A tensor that is already a Var (VarMap) is shared, so updates land in the VarMap and get saved.
        let running_mean = Var::from_tensor(&vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?)?;
        let running_var = Var::from_tensor(&vb.get_with_hints(channels, "running_var", Init::Const(1.0))?)?;
        Ok(Self {
            weight,
            bias,
            running_mean,
            running_var,
            eps: BN_EPS,
            momentum: BN_MOMENTUM,
        })
    }

    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    /// Eval-mode per-channel affine map `y = x·scale + shift`, each `[C]`, from the running statistics.
    pub fn eval_scale_shift(&self) -> Result<(Tensor, Tensor)> {
        let rm = self.running_mean.as_detached_tensor().to_dtype(self.weight.dtype())?;
        let rv = self.running_var.as_detached_tensor().to_dtype(self.weight.dtype())?;
        let scale = self.weight.div(&(rv + self.eps)?.sqrt()?)?;
        let shift = self.bias.sub(&rm.mul(&scale)?)?;
        Ok((scale, shift))
    }

    /// Training mode, then ReLU when `relu`: fused into the normalisation where the fused op runs.
    pub fn forward_train(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = b * h * w;
        if n < 2 {
            // PyTorch refuses this too: the variance of one value is undefined.
            candle_core::bail!(
                "BatchNorm in training needs more than one value per channel, got input {:?}; use a batch of at \
                 least 2",
                x.dims()
            )
        }
        if ops::batch_norm::supports(x, &self.weight) {
            // The fused op (CPU, or CUDA with the `cuda` feature); its statistics stay on x's device.
            let fused = ops::batch_norm::batch_norm_train(x, &self.weight, &self.bias, self.eps, relu)?;
            return self.fused_result(fused, n);
        }
        let dtype = x.dtype();
        // Statistics in f32 at least, so half-precision activations do not lose the mean.
        let xs = if matches!(dtype, DType::F16 | DType::BF16) {
            x.to_dtype(DType::F32)?
        } else {
            x.clone()
        };
        let mean = xs
            .sum_keepdim(3)?
            .sum_keepdim(2)?
            .sum_keepdim(0)?
            .affine(1.0 / n as f64, 0.0)?; // [1, C, 1, 1]
        let centred = xs.broadcast_sub(&mean)?;
        let sq_sum = centred.sqr()?.sum_keepdim(3)?.sum_keepdim(2)?.sum_keepdim(0)?; // [1, C, 1, 1]
        let var = sq_sum.affine(1.0 / n as f64, 0.0)?; // biased, for normalising (as PyTorch)
        let inv_std = (var + self.eps)?.sqrt()?.recip()?; // differentiable: var depends on x
        let scale = self.weight.to_dtype(xs.dtype())?.reshape((1, c, 1, 1))?;
        let shift = self.bias.to_dtype(xs.dtype())?.reshape((1, c, 1, 1))?;
        let y = centred
            .broadcast_mul(&inv_std.broadcast_mul(&scale)?)?
            .broadcast_add(&shift)?
            .to_dtype(dtype)?;

        // Running statistics, outside the graph.
        let rm_dtype = self.running_mean.dtype();
        let batch_mean = mean.detach().flatten_all()?.to_dtype(rm_dtype)?;
        // PyTorch stores the unbiased variance.
        let batch_var = sq_sum
            .detach()
            .flatten_all()?
            .affine(1.0 / (n - 1) as f64, 0.0)?
            .to_dtype(rm_dtype)?;
        self.update_running(&batch_mean, &batch_var, 1.0)?;
        if relu {
            y.relu()
        } else {
            Ok(y)
        }
    }

    /// Training mode, `relu(bn(x) + residual)`: one fused op where it runs, so the BatchNorm's own output is not
    /// kept until backward (a full-size tensor per residual block).
    pub fn forward_train_add_relu(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if c != self.weight.dim(0)? {
            candle_core::bail!(
                "BatchNorm over {} channels got input {:?}",
                self.weight.dim(0)?,
                x.dims()
            )
        }
        if ops::batch_norm::supports(x, &self.weight) && b * h * w >= 2 {
            let fused = ops::batch_norm::batch_norm_add_relu_train(x, &self.weight, &self.bias, self.eps, residual)?;
            return self.fused_result(fused, b * h * w);
        }
        ops::add_relu::add_relu(&self.forward_train(x, false)?, residual)
    }

    /// A fused op's output, after its batch statistics (over `n` values a channel) update the running ones.
    fn fused_result(&self, (y, batch_mean, batch_var): (Tensor, Tensor, Tensor), n: usize) -> Result<Tensor> {
        let unbiased = n as f64 / (n - 1) as f64; // PyTorch stores the unbiased variance
        self.update_running(&batch_mean, &batch_var, unbiased)?;
        Ok(y)
    }

    /// `running = (1 − m)·running + m·batch`, outside the graph; the batch statistics are `[C]`, the variance
    /// multiplied by `var_scale` first (n/(n − 1) turns a biased one into PyTorch's unbiased). In place, one pass a
    /// statistic, where [`ops::running_stats`] runs.
    fn update_running(&self, batch_mean: &Tensor, batch_var: &Tensor, var_scale: f64) -> Result<()> {
        let m = self.momentum;
        for (running, batch, scale) in [
            (&self.running_mean, batch_mean, 1.0),
            (&self.running_var, batch_var, var_scale),
        ] {
            if ops::running_stats::supports(running.as_tensor(), batch) {
                ops::running_stats::update_in_place(running.as_tensor(), batch, m, scale)?;
            } else {
                let batch = (batch.to_dtype(running.dtype())? * scale)?.affine(m, 0.0)?;
                running.set(&(running.as_detached_tensor().affine(1.0 - m, 0.0)? + batch)?)?;
            }
        }
        Ok(())
    }

    fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        let (scale, shift) = self.eval_scale_shift()?;
        let c = scale.dim(0)?;
        x.broadcast_mul(&scale.to_dtype(x.dtype())?.reshape((1, c, 1, 1))?)?
            .broadcast_add(&shift.to_dtype(x.dtype())?.reshape((1, c, 1, 1))?)
    }
}

impl ModuleT for BatchNorm2d {
    /// `[B, C, H, W]` → `[B, C, H, W]`; `train` uses batch statistics and updates the running ones.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if x.dim(1)? != self.weight.dim(0)? {
            candle_core::bail!(
                "BatchNorm over {} channels got input {:?}",
                self.weight.dim(0)?,
                x.dims()
            )
        }
        if train {
            self.forward_train(x, false)
        } else {
            self.forward_eval(x)
        }
    }
}

/// A convolution followed by BatchNorm, possibly folded into one biased convolution (inference only).
///
/// torchvision names the two separately (`conv1`/`bn1` in a block, `0`/`1` in a `Sequential`), so the
/// constructor takes two `VarBuilder`s.
#[derive(Clone, Debug)]
pub struct ConvBn {
    conv: Conv2d,
    bn: Option<BatchNorm2d>,
}

impl ConvBn {
    pub fn new(spec: ConvSpec, init: ConvInit, vb_conv: VarBuilder, vb_bn: VarBuilder) -> Result<Self> {
        let conv = Conv2d::new(spec, false, init, vb_conv)?;
        let bn = BatchNorm2d::new(spec.out_ch, vb_bn)?;
        Ok(Self { conv, bn: Some(bn) })
    }

    pub fn is_folded(&self) -> bool {
        self.bn.is_none()
    }

    pub fn bn(&self) -> Option<&BatchNorm2d> {
        self.bn.as_ref()
    }

    /// The convolution (folded: the whole unit, its BatchNorm in the bias).
    pub fn conv(&self) -> &Conv2d {
        &self.conv
    }

    /// The eval-mode equivalent as one convolution: `W' = W·scale[o]`, `b' = b·scale + shift`.
    /// Detached from any `VarMap`, so it is for inference only.
    pub fn fold(&self) -> Result<ConvBn> {
        let Some(bn) = &self.bn else {
            return Ok(self.clone());
        };
        let (scale, shift) = bn.eval_scale_shift()?;
        let scale = scale.to_dtype(self.conv.weight.dtype())?;
        let weight = self
            .conv
            .weight
            .detach()
            .broadcast_mul(&scale.reshape(((), 1, 1, 1))?)?
            .detach(); // `scale` comes from the BatchNorm's parameters, which may be Vars: keep no graph
        let bias = match &self.conv.bias {
            Some(b) => (b.detach().mul(&scale)? + shift)?,
            None => shift,
        };
        Ok(ConvBn {
            // A new tensor, never changed: the CPU kernel may keep what it derives from it.
            conv: Conv2d::frozen(weight, Some(bias.detach()), self.conv.spec),
            bn: None,
        })
    }
}

impl ConvBn {
    /// `relu?(bn(conv(x)) + residual)`: `[B, Cin, H, W]` → `[B, Cout, H', W']`. Folded, the BatchNorm is the
    /// convolution's bias and the whole unit is one fused convolution.
    pub fn forward_with(&self, x: &Tensor, residual: Option<&Tensor>, relu: bool, train: bool) -> Result<Tensor> {
        let Some(bn) = &self.bn else {
            if train {
                candle_core::bail!("a BatchNorm-folded model is for inference only; it cannot train")
            }
            return self.conv.forward_with(x, residual, relu);
        };
        let z = self.conv.forward(x)?;
        if train {
            return match residual {
                None => bn.forward_train(&z, relu), // the ReLU rides on the BatchNorm op
                Some(r) if relu => bn.forward_train_add_relu(&z, r),
                Some(r) => bn.forward_t(&z, true)? + r,
            };
        }
        let mut y = bn.forward_t(&z, train)?;
        if let Some(r) = residual {
            y = (y + r)?;
        }
        if relu {
            y = y.relu()?;
        }
        Ok(y)
    }
}

impl ModuleT for ConvBn {
    /// `[B, Cin, H, W]` → `[B, Cout, H', W']` (no activation).
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_with(x, None, false, train)
    }
}

/// `ConvBn` then ReLU, the most common unit in every head.
pub fn conv_bn_relu(unit: &ConvBn, x: &Tensor, train: bool) -> Result<Tensor> {
    unit.forward_with(x, None, true, train)
}

/// Draw the dropout masks of training `step` from a stream fixed by the job's `seed`, so a job, and a job resumed
/// from a checkpoint, drops the same units as an uninterrupted run with the same seed. The masks are a hash of the
/// call's key and each element's index (`ops::dropout`), the same bits on the CPU and a GPU; without a call, keys
/// are random.
pub fn seed_dropout(seed: u64, step: u64) {
    crate::model::ops::dropout::seed_step(seed, step);
}

/// `nn.Dropout(p)`: active only in training; zeroes each element with probability `p`, scales the rest by 1/(1 − p).
/// One op that keeps no mask for backward (`ops::dropout`) where the device and dtype allow, Candle's otherwise.
pub fn dropout(x: &Tensor, p: f32, train: bool) -> Result<Tensor> {
    if !train || p <= 0.0 {
        return Ok(x.clone());
    }
    if p >= 1.0 {
        return x.zeros_like();
    }
    if crate::model::ops::dropout::supports(x) {
        return crate::model::ops::dropout::dropout(x, p);
    }
    candle_nn::ops::dropout(x, p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_dropout_repeats_per_step_and_keeps_the_expectation() -> Result<()> {
        let x = Tensor::ones((4, 64, 8, 8), DType::F32, &Device::Cpu)?;
        let masks = |seed, step| -> Result<Vec<f32>> {
            seed_dropout(seed, step);
            dropout(&x, 0.25, true)?.flatten_all()?.to_vec1()
        };
        let a = masks(3, 10)?;
        assert_eq!(a, masks(3, 10)?);
        assert_ne!(a, masks(3, 11)?);
        assert_ne!(a, masks(4, 10)?);
        assert!(a.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f64 / a.len() as f64;
        assert!((dropped - 0.25).abs() < 0.02, "dropped {dropped}");
        // Evaluation passes through.
        assert_eq!(
            dropout(&x, 0.25, false)?.flatten_all()?.to_vec1::<f32>()?,
            vec![1.0; a.len()]
        );
        Ok(())
    }
    use crate::model::ops::gradcheck::{check_gradients, seeded};
    use candle_core::Device;
    use candle_nn::VarMap;

    fn bn_with_stats(c: usize, dtype: DType) -> Result<(VarMap, BatchNorm2d)> {
        let mut vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, dtype, &Device::Cpu);
        let bn = BatchNorm2d::new(c, vb.pp("bn"))?;
        vm.set_one("bn.running_mean", seeded(&[c], 3)?.to_dtype(dtype)?)?;
        vm.set_one("bn.running_var", (seeded(&[c], 4)?.abs()? + 0.5)?.to_dtype(dtype)?)?;
        vm.set_one("bn.weight", (seeded(&[c], 5)? + 1.5)?.to_dtype(dtype)?)?;
        vm.set_one("bn.bias", seeded(&[c], 6)?.to_dtype(dtype)?)?;
        Ok((vm, bn))
    }

    #[test]
    fn train_mode_normalises_and_updates_running_stats() -> Result<()> {
        let (_vm, bn) = bn_with_stats(3, DType::F64)?;
        let rm0 = bn.running_mean().to_vec1::<f64>()?;
        let rv0 = bn.running_var().to_vec1::<f64>()?;
        let x = seeded(&[2, 3, 4, 5], 9)?;
        let y = bn.forward_t(&x, true)?;
        // Per channel: (x − mean)/√(var + eps)·γ + β, batch mean and biased variance over B·H·W.
        let w = (seeded(&[3], 5)? + 1.5)?.to_vec1::<f64>()?;
        let b = seeded(&[3], 6)?.to_vec1::<f64>()?;
        for c in 0..3 {
            let xc = x.narrow(1, c, 1)?.flatten_all()?.to_vec1::<f64>()?;
            let yc = y.narrow(1, c, 1)?.flatten_all()?.to_vec1::<f64>()?;
            let n = xc.len() as f64;
            let mean = xc.iter().sum::<f64>() / n;
            let var = xc.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            for (xi, yi) in xc.iter().zip(&yc) {
                let want = (xi - mean) / (var + BN_EPS).sqrt() * w[c] + b[c];
                assert!((want - yi).abs() < 1e-12);
            }
            let rm = bn.running_mean().to_vec1::<f64>()?[c];
            let rv = bn.running_var().to_vec1::<f64>()?[c];
            assert!((rm - (0.9 * rm0[c] + 0.1 * mean)).abs() < 1e-12);
            assert!((rv - (0.9 * rv0[c] + 0.1 * var * n / (n - 1.0))).abs() < 1e-12);
        }
        Ok(())
    }

    #[test]
    fn running_stats_update_reaches_the_varmap() -> Result<()> {
        let (vm, bn) = bn_with_stats(2, DType::F32)?;
        let before = vm.data().lock().unwrap()["bn.running_mean"].to_vec1::<f32>()?;
        bn.forward_t(&(seeded(&[2, 2, 3, 3], 1)?.to_dtype(DType::F32)? + 5.0)?, true)?;
        let after = vm.data().lock().unwrap()["bn.running_mean"].to_vec1::<f32>()?;
        assert_ne!(before, after);
        Ok(())
    }

    #[test]
    fn train_mode_gradient() -> Result<()> {
        check_gradients(&[&[2, 3, 2, 3], &[3], &[3]], |t| {
            let vb = VarBuilder::from_tensors(
                [("weight".to_string(), t[1].clone()), ("bias".to_string(), t[2].clone())]
                    .into_iter()
                    .chain([
                        ("running_mean".to_string(), Tensor::zeros(3, DType::F64, &Device::Cpu)?),
                        ("running_var".to_string(), Tensor::ones(3, DType::F64, &Device::Cpu)?),
                    ])
                    .collect(),
                DType::F64,
                &Device::Cpu,
            );
            BatchNorm2d::new(3, vb)?.forward_t(&t[0], true)
        })
    }

    #[test]
    fn eval_mode_gradient_and_single_value_refused_in_training() -> Result<()> {
        let (_vm, bn) = bn_with_stats(3, DType::F64)?;
        check_gradients(&[&[2, 3, 2, 2]], |t| bn.forward_t(&t[0], false))?;
        assert!(bn.forward_t(&seeded(&[1, 3, 1, 1], 1)?, true).is_err());
        assert!(bn.forward_t(&seeded(&[1, 3, 1, 1], 1)?, false).is_ok());
        Ok(())
    }

    #[test]
    fn folded_conv_bn_matches_unfolded_eval() -> Result<()> {
        let mut vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
        let spec = ConvSpec::same(3, 4, 3, 2).stride(2);
        let unit = ConvBn::new(spec, ConvInit::KaimingFanOut, vb.pp("conv"), vb.pp("bn"))?;
        vm.set_one("bn.running_mean", seeded(&[4], 3)?)?;
        vm.set_one("bn.running_var", (seeded(&[4], 4)?.abs()? + 0.5)?)?;
        vm.set_one("bn.weight", seeded(&[4], 5)?)?;
        vm.set_one("bn.bias", seeded(&[4], 6)?)?;
        let x = seeded(&[2, 3, 7, 6], 8)?;
        let want = unit.forward_t(&x, false)?;
        let folded = unit.fold()?;
        assert!(folded.is_folded());
        let got = folded.forward_t(&x, false)?;
        let d = (want - got)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(d < 1e-12, "{d}");
        assert!(folded.forward_t(&x, true).is_err());
        Ok(())
    }
}
