//! torchvision's `DeepLabHead`: `Sequential(ASPP, conv3×3 256→256, BN, ReLU, conv1×1 → classes)`.
//!
//! ASPP (`classifier.0`): five 256-channel branches on the same input, concatenated and projected back to 256:
//! `convs.0` 1×1 conv; `convs.1..3` 3×3 atrous convs at the three rates; `convs.4` image pooling (global average,
//! 1×1 conv, BN, ReLU, back to h×w); `project` 1×1 conv 1280→256, BN, ReLU, Dropout(0.5).
//!
//! Folded for inference, the pooled branch is not broadcast over the map and concatenated: it is the same vector at
//! every pixel, so its share of the projection is one more bias per image ([`SplitProjection`]).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::layers::{conv_bn_relu, dropout, Conv2d, ConvBn, ConvInit, ConvSpec};
use crate::model::ops::pool::adaptive_avg_pool2d;
use crate::model::ops::resize::resize_bilinear;

const ASPP_CH: usize = 256;

#[derive(Clone, Debug)]
pub struct Aspp {
    /// `convs.0..3`: `.0` conv, `.1` BN.
    branches: Vec<ConvBn>,
    /// `convs.4`: `.1` conv, `.2` BN (`.0` is the pooling, without parameters).
    pooling: ConvBn,
    /// `project.0` conv, `project.1` BN.
    project: ConvBn,
    /// The folded `project`, split by branch (inference only).
    split: Option<SplitProjection>,
}

/// A folded projection `relu(W · cat(b0, b1, b2, b3, pooled) + bias)` as `relu(W[:, ..1024] · cat(b0..b3) +
/// (W[:, 1024..] · pooled + bias))`: the pooled branch (`[B, 256, 1, 1]`) is constant over the map, so its share is
/// a bias per image, computed once, rather than 256 of the 1280 channels multiplied at every pixel. That is a fifth of
/// the projection's multiplications, and neither the pooled branch's broadcast to `h × w` nor its part of the
/// concatenation is made.
#[derive(Clone, Debug)]
struct SplitProjection {
    /// The projection's weight on the four spatial branches, `[256, 1024, 1, 1]`, with the folded bias.
    spatial: Conv2d,
    /// Its weight on the pooled branch, transposed: `[256 in, 256 out]`.
    pooled_t: Tensor,
}

impl SplitProjection {
    fn new(project: &ConvBn) -> Result<Self> {
        let conv = project.conv();
        let (cout, cin, _, _) = conv.weight().dims4()?;
        let spatial_in = cin - cout; // the pooled branch is the last `cout` channels
        let spec = ConvSpec::same(spatial_in, cout, 1, 1);
        let spatial = conv.weight().narrow(1, 0, spatial_in)?.contiguous()?;
        let pooled_t = conv
            .weight()
            .narrow(1, spatial_in, cout)?
            .reshape((cout, cout))?
            .t()?
            .contiguous()?;
        Ok(Self {
            spatial: Conv2d::frozen(spatial, conv.bias().cloned(), spec),
            pooled_t,
        })
    }

    /// `spatial` `[B, 1024, h, w]` (the four branches), `pooled` `[B, 256, 1, 1]` → `[B, 256, h, w]`.
    fn forward(&self, spatial: &Tensor, pooled: &Tensor) -> Result<Tensor> {
        let b = pooled.dim(0)?;
        // [B, 256] · [256, 256] (+ bias) → [B, 256], in f32 (the weights' dtype) under mixed precision too.
        let mut biases = pooled.to_dtype(DType::F32)?.reshape((b, ()))?.matmul(&self.pooled_t)?;
        if let Some(bias) = self.spatial.bias() {
            biases = biases.broadcast_add(bias)?;
        }
        let images = (0..b)
            .map(|i| {
                let bias = biases.get(i)?;
                self.spatial
                    .forward_with_bias(&spatial.narrow(0, i, 1)?, Some(&bias), None, true)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&images, 0)
    }
}

impl Aspp {
    /// torchvision's `ASPP(in_ch, rates, out_channels=out_ch)` (DeepLabHead uses 256), `vb` scoped to it.
    pub fn new(in_ch: usize, out_ch: usize, rates: [usize; 3], vb: VarBuilder) -> Result<Self> {
        let init = ConvInit::TorchDefault;
        let convs = vb.pp("convs");
        let mut branches = vec![ConvBn::new(
            ConvSpec::same(in_ch, out_ch, 1, 1),
            init,
            convs.pp("0.0"),
            convs.pp("0.1"),
        )?];
        for (i, rate) in rates.into_iter().enumerate() {
            let b = convs.pp(i + 1);
            branches.push(ConvBn::new(
                ConvSpec::same(in_ch, out_ch, 3, rate),
                init,
                b.pp(0),
                b.pp(1),
            )?);
        }
        let pooling = ConvBn::new(
            ConvSpec::same(in_ch, out_ch, 1, 1),
            init,
            convs.pp("4.1"),
            convs.pp("4.2"),
        )?;
        let project = ConvBn::new(
            ConvSpec::same(5 * out_ch, out_ch, 1, 1),
            init,
            vb.pp("project.0"),
            vb.pp("project.1"),
        )?;
        Ok(Self {
            branches,
            pooling,
            project,
            split: None,
        })
    }

    pub fn fold(&self) -> Result<Self> {
        let project = self.project.fold()?;
        Ok(Self {
            branches: self.branches.iter().map(ConvBn::fold).collect::<Result<_>>()?,
            pooling: self.pooling.fold()?,
            split: Some(SplitProjection::new(&project)?),
            project,
        })
    }

    /// `[B, Cin, h, w]` → `[B, out_ch, h, w]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let mut outs = Vec::with_capacity(5);
        for b in &self.branches {
            outs.push(conv_bn_relu(b, x, train)?); // [B, 256, h, w]
        }
        let pooled = conv_bn_relu(&self.pooling, &adaptive_avg_pool2d(x, 1, 1)?, train)?; // [B, 256, 1, 1]
        if let Some(split) = &self.split {
            // Folded (inference only; the folded branches above refuse `train`). Dropout is the identity here.
            return split.forward(&Tensor::cat(&outs, 1)?, &pooled); // [B, 1024, h, w] → [B, 256, h, w]
        }
        outs.push(resize_bilinear(&pooled, h, w)?.contiguous()?);
        let cat = Tensor::cat(&outs, 1)?; // [B, 1280, h, w]
        dropout(&conv_bn_relu(&self.project, &cat, train)?, 0.5, train)
    }
}

#[derive(Clone, Debug)]
pub struct DeepLabHead {
    aspp: Aspp,
    /// `1` conv, `2` BN.
    conv: ConvBn,
    /// `4`: 1×1 conv with bias.
    cls: Conv2d,
}

impl DeepLabHead {
    /// `vb` scoped to `classifier`.
    pub fn new(in_ch: usize, num_classes: usize, rates: [usize; 3], vb: VarBuilder) -> Result<Self> {
        let init = ConvInit::TorchDefault;
        Ok(Self {
            aspp: Aspp::new(in_ch, ASPP_CH, rates, vb.pp(0))?,
            conv: ConvBn::new(ConvSpec::same(ASPP_CH, ASPP_CH, 3, 1), init, vb.pp(1), vb.pp(2))?,
            cls: Conv2d::new(ConvSpec::same(ASPP_CH, num_classes, 1, 1), true, init, vb.pp(4))?,
        })
    }

    pub fn fold(&self) -> Result<Self> {
        Ok(Self {
            aspp: self.aspp.fold()?,
            conv: self.conv.fold()?,
            cls: self.cls.detached(),
        })
    }

    /// `[B, Cin, h, w]` → `[B, classes, h, w]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.aspp.forward_t(x, train)?;
        let y = conv_bn_relu(&self.conv, &y, train)?;
        self.cls.forward(&y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn relative_l2(want: &Tensor, got: &Tensor) -> Result<f32> {
        ((want - got)?.sqr()?.sum_all()?.sqrt()? / want.sqr()?.sum_all()?.sqrt()?)?.to_scalar::<f32>()
    }

    /// The folded ASPP, whose pooled branch is a bias per image, against the eval-mode ASPP that broadcasts and
    /// concatenates it: two images whose pooled branches differ (one shifted by a constant), each checked alone so
    /// that one image's bias used for the other would show.
    #[test]
    fn the_folded_projection_adds_each_images_pooled_branch() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let aspp = Aspp::new(16, 8, [1, 2, 3], VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
        // Move the BatchNorms' running statistics off their defaults.
        aspp.forward_t(&Tensor::randn(0.5f32, 2.0, (2, 16, 9, 7), &dev)?, true)?;
        let folded = aspp.fold()?;
        assert!(folded.split.is_some(), "folded: the projection is split");
        let x0 = Tensor::randn(0f32, 1.0, (1, 16, 9, 7), &dev)?;
        let x1 = (Tensor::randn(0f32, 1.0, (1, 16, 9, 7), &dev)? + 3.0)?;
        let batch = Tensor::cat(&[&x0, &x1], 0)?;
        let want = aspp.forward_t(&batch, false)?;
        let got = folded.forward_t(&batch, false)?;
        assert_eq!(got.dims(), &[2, 8, 9, 7]);
        for i in 0..2 {
            let rel = relative_l2(&want.get(i)?, &got.get(i)?)?;
            assert!(rel < 1e-5, "image {i}: relative L2 {rel}");
        }
        assert!(folded.forward_t(&batch, true).is_err(), "a folded ASPP cannot train");
        Ok(())
    }
}
