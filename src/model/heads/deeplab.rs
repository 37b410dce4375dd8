//! torchvision's `DeepLabHead`: `Sequential(ASPP, conv3×3 256→256, BN, ReLU, conv1×1 → classes)`.
//!
//! ASPP (`classifier.0`): five 256-channel branches on the same input, concatenated and projected back to 256:
//! `convs.0` 1×1 conv; `convs.1..3` 3×3 atrous convs at the three rates; `convs.4` image pooling (global average,
//! 1×1 conv, BN, ReLU, back to h×w); `project` 1×1 conv 1280→256, BN, ReLU, Dropout(0.5).

use candle_core::{Module, Result, Tensor};
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
        })
    }

    pub fn fold(&self) -> Result<Self> {
        Ok(Self {
            branches: self.branches.iter().map(ConvBn::fold).collect::<Result<_>>()?,
            pooling: self.pooling.fold()?,
            project: self.project.fold()?,
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
