//! The whole network, as torchvision's `_SimpleSegmentationModel`: backbone → head → bilinear resize to the input.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::{Algorithm, ModelConfig};
use super::heads::{DeepLabHead, FcnHead, Head, PspHead};
use super::ops::resize::resize_bilinear;
use super::resnet::ResNet;

/// Logits at the input's size.
#[derive(Clone, Debug)]
pub struct SegOutput {
    /// `[B, num_classes, H, W]`, before softmax.
    pub out: Tensor,
    /// The auxiliary head's `[B, num_classes, H, W]` when the model has one (for the auxiliary loss).
    pub aux: Option<Tensor>,
}

#[derive(Clone, Debug)]
pub struct SegmentationModel {
    config: ModelConfig,
    backbone: ResNet,
    head: Head,
    aux: Option<FcnHead>,
    folded: bool,
    /// dtype of the activations (bf16 in mixed precision); weights stay as built and each op casts them.
    compute_dtype: DType,
}

impl SegmentationModel {
    /// Builds the network with parameters named as torchvision's state dict (`backbone.*`, `classifier.*`,
    /// `aux_classifier.*`) relative to `vb`. With a `VarMap`-backed builder the parameters are created (torchvision's
    /// initialisation) and trainable; with a tensor-backed one they are loaded.
    pub fn new(config: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let bb = config.backbone;
        let backbone = ResNet::new(bb, config.output_stride, vb.pp("backbone"))?;
        let vbc = vb.pp("classifier");
        let (c4, n) = (bb.layer4_channels(), config.num_classes);
        let head = match config.algorithm {
            Algorithm::Fcn => Head::Fcn(FcnHead::new(c4, n, vbc)?),
            Algorithm::Deeplab => {
                let rates = config.output_stride.aspp_rates();
                Head::Deeplab(Box::new(DeepLabHead::new(c4, n, rates, vbc)?))
            }
            Algorithm::Psp => Head::Psp(PspHead::new(c4, n, vbc)?),
        };
        let aux = if config.aux {
            Some(FcnHead::new(bb.layer3_channels(), n, vb.pp("aux_classifier"))?)
        } else {
            None
        };
        Ok(Self {
            config: *config,
            backbone,
            head,
            aux,
            folded: false,
            compute_dtype: DType::F32,
        })
    }

    /// The same network running its activations in `dtype` (`BF16` for mixed precision); logits come back as f32.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = dtype;
        self
    }

    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn is_folded(&self) -> bool {
        self.folded
    }

    /// The inference network: every BatchNorm folded into its convolution (eval statistics), the auxiliary head
    /// dropped, all tensors detached from any `VarMap`. `forward_t(x, true)` on it is an error.
    pub fn fold_batchnorm(&self) -> Result<Self> {
        let mut config = self.config;
        config.aux = false;
        Ok(Self {
            config,
            backbone: self.backbone.fold()?,
            head: self.head.fold()?,
            aux: None,
            folded: true,
            compute_dtype: self.compute_dtype,
        })
    }

    /// `x` `[B, 3, H, W]` (normalised image, any H and W) → logits `[B, classes, H, W]` (and the auxiliary ones).
    /// `train` selects batch statistics (and updates the running ones) and enables dropout.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<SegOutput> {
        let (_, c, h, w) = x.dims4()?;
        if c != 3 {
            candle_core::bail!("the network takes 3-channel images, got input {:?}", x.dims())
        }
        let x = x.to_dtype(self.compute_dtype)?; // a no-op in fp32
        let feats = self.backbone.forward_t(&x, train)?;
        let out = resize_bilinear(&self.head.forward_t(&feats.layer4, train)?, h, w)?.to_dtype(DType::F32)?;
        let aux = match &self.aux {
            Some(head) => Some(resize_bilinear(&head.forward_t(&feats.layer3, train)?, h, w)?.to_dtype(DType::F32)?),
            None => None,
        };
        Ok(SegOutput { out, aux })
    }

    /// Inference logits `[B, classes, H, W]` (eval mode, main head only).
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_t(x, false)?.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{Backbone, OutputStride};
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn build(algorithm: Algorithm, os: OutputStride, aux: bool) -> Result<(VarMap, SegmentationModel)> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let cfg = ModelConfig::new(algorithm, Backbone::Resnet18, 3, os, aux).map_err(candle_core::Error::wrap)?;
        let net = SegmentationModel::new(&cfg, vb)?;
        Ok((vm, net))
    }

    #[test]
    fn logits_at_input_size_for_odd_sizes_and_batches() -> Result<()> {
        for (alg, os) in [
            (Algorithm::Fcn, OutputStride::Eight),
            (Algorithm::Deeplab, OutputStride::Sixteen),
            (Algorithm::Psp, OutputStride::Eight),
        ] {
            let (_vm, net) = build(alg, os, true)?;
            let x = Tensor::randn(0f32, 1.0, (2, 3, 37, 50), &Device::Cpu)?;
            let y = net.forward_t(&x, true)?;
            assert_eq!(y.out.dims(), &[2, 3, 37, 50]);
            assert_eq!(y.aux.as_ref().map(|a| a.dims().to_vec()), Some(vec![2, 3, 37, 50]));
            assert_eq!(net.logits(&x)?.dims(), &[2, 3, 37, 50]);
        }
        Ok(())
    }

    #[test]
    fn folded_matches_unfolded_in_eval() -> Result<()> {
        for alg in Algorithm::ALL {
            let (vm, net) = build(alg, OutputStride::Eight, true)?;
            // Make eval BN non-trivial: a few training passes move the running statistics.
            for s in 0..2 {
                let x = (Tensor::randn(0f32, 1.0, (2, 3, 33, 40), &Device::Cpu)? + s as f64)?;
                net.forward_t(&x, true)?;
            }
            assert!(vm.all_vars().len() > 10);
            let x = Tensor::randn(0f32, 1.0, (3, 3, 29, 41), &Device::Cpu)?;
            let want = net.logits(&x)?;
            let folded = net.fold_batchnorm()?;
            assert!(folded.is_folded() && !folded.config().aux);
            let got = folded.logits(&x)?;
            let rel =
                ((&want - &got)?.sqr()?.sum_all()?.sqrt()? / want.sqr()?.sum_all()?.sqrt()?)?.to_scalar::<f32>()?;
            assert!(rel < 1e-5, "{alg}: relative L2 {rel}");
            assert!(folded.forward_t(&x, true).is_err());
        }
        Ok(())
    }

    #[test]
    fn backward_reaches_every_trainable_parameter() -> Result<()> {
        let (vm, net) = build(Algorithm::Psp, OutputStride::Sixteen, true)?;
        // Odd height, even width: exercises the stride-2 conv backward fix.
        let x = Tensor::randn(0f32, 1.0, (2, 3, 33, 48), &Device::Cpu)?;
        let y = net.forward_t(&x, true)?;
        let loss = (y.out.sqr()?.mean_all()? + y.aux.expect("aux").sqr()?.mean_all()?)?;
        let grads = loss.backward()?;
        let data = vm.data().lock().expect("varmap lock");
        for (name, var) in data.iter() {
            let has = grads.get(var.as_tensor()).is_some();
            assert_eq!(has, crate::model::weights::is_trainable(name), "{name}");
        }
        Ok(())
    }

    /// bf16 mixed precision through the whole network on the CPU's generic kernels: f32 master weights get f32
    /// gradients, the logits come back f32 and close to the f32 network's, and the folded inference model runs too.
    /// (The GPU runs the same graph on its own kernels; `semseg device-check` compares those.)
    #[test]
    fn bf16_activations_train_and_infer_with_f32_weights() -> Result<()> {
        for alg in Algorithm::ALL {
            let (vm, net) = build(alg, OutputStride::Eight, true)?;
            let half = net.clone().with_compute_dtype(DType::BF16);
            let x = Tensor::randn(0f32, 1.0, (2, 3, 33, 40), &Device::Cpu)?;
            let y = half.forward_t(&x, true)?;
            assert_eq!((y.out.dtype(), y.out.dims()), (DType::F32, &[2, 3, 33, 40][..]));
            let aux = y.aux.expect("aux");
            assert_eq!(aux.dtype(), DType::F32);
            let loss = (y.out.sqr()?.mean_all()? + aux.sqr()?.mean_all()?)?;
            let grads = loss.backward()?;
            let data = vm.data().lock().expect("varmap lock");
            for (name, var) in data.iter() {
                if crate::model::weights::is_trainable(name) {
                    let g = grads
                        .get(var.as_tensor())
                        .unwrap_or_else(|| panic!("{alg}: no gradient for {name}"));
                    assert_eq!(g.dtype(), DType::F32, "{name}");
                }
            }
            drop(data);
            let want = net.logits(&x)?;
            let got = half.logits(&x)?;
            let rel =
                ((&want - &got)?.sqr()?.sum_all()?.sqrt()? / want.sqr()?.sum_all()?.sqrt()?)?.to_scalar::<f32>()?;
            assert!(rel < 5e-2, "{alg}: bf16 vs f32 relative L2 {rel}");
            let folded = half.fold_batchnorm()?;
            assert_eq!(folded.compute_dtype(), DType::BF16);
            let folded_logits = folded.logits(&x)?;
            assert_eq!(folded_logits.dtype(), DType::F32);
            let rel = ((&want - &folded_logits)?.sqr()?.sum_all()?.sqrt()? / want.sqr()?.sum_all()?.sqrt()?)?
                .to_scalar::<f32>()?;
            assert!(rel < 5e-2, "{alg}: folded bf16 vs f32 relative L2 {rel}");
        }
        Ok(())
    }
}
