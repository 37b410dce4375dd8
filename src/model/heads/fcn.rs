//! torchvision's `FCNHead`: `Sequential(conv3×3 Cin→Cin/4, BN, ReLU, Dropout(0.1), conv1×1 → classes)`.
//! Also the auxiliary head on layer3 (`aux_classifier`).

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::layers::{conv_bn_relu, dropout, Conv2d, ConvBn, ConvInit, ConvSpec};

#[derive(Clone, Debug)]
pub struct FcnHead {
    /// `0` (conv) and `1` (BN).
    conv: ConvBn,
    /// `4`: 1×1 conv with bias.
    cls: Conv2d,
}

impl FcnHead {
    /// `vb` scoped to the `Sequential` (`classifier` or `aux_classifier`).
    pub fn new(in_ch: usize, num_classes: usize, vb: VarBuilder) -> Result<Self> {
        let inter = in_ch / 4;
        let conv = ConvBn::new(
            ConvSpec::same(in_ch, inter, 3, 1),
            ConvInit::TorchDefault,
            vb.pp(0),
            vb.pp(1),
        )?;
        let cls = Conv2d::new(
            ConvSpec::same(inter, num_classes, 1, 1),
            true,
            ConvInit::TorchDefault,
            vb.pp(4),
        )?;
        Ok(Self { conv, cls })
    }

    pub fn fold(&self) -> Result<Self> {
        Ok(Self {
            conv: self.conv.fold()?,
            cls: self.cls.detached(),
        })
    }

    /// `[B, Cin, h, w]` → `[B, classes, h, w]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = conv_bn_relu(&self.conv, x, train)?; // [B, Cin/4, h, w]
        self.cls.forward(&dropout(&y, 0.1, train)?)
    }
}

impl ModuleT for FcnHead {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        FcnHead::forward_t(self, x, train)
    }
}
