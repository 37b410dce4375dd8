//! Pyramid pooling head, as the peer's `PSPHead` (and mmseg's): for each bin b in 1/2/3/6, adaptive average
//! pooling to b×b, 1×1 conv to `ch`, BN, ReLU, bilinear back to h×w; concatenated with the input, 3×3 conv to `ch`,
//! BN, ReLU, Dropout(0.1), 1×1 conv to classes. `ch` is Cin/4: 512 for ResNet-50/101 (the peer's and mmseg's),
//! 128 for ResNet-18/34 (mmseg's pspnet_r18 setting).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::layers::{conv_bn_relu, dropout, Conv2d, ConvBn, ConvInit, ConvSpec};
use crate::model::ops::pool::adaptive_avg_pool2d;
use crate::model::ops::resize::resize_bilinear;

pub const BINS: [usize; 4] = [1, 2, 3, 6];

#[derive(Clone, Debug)]
pub struct PspHead {
    /// `stages.i.1.0` conv, `stages.i.1.1` BN (`stages.i.0` is the pooling).
    stages: Vec<(usize, ConvBn)>,
    /// `bottleneck.0` conv, `bottleneck.1` BN.
    bottleneck: ConvBn,
    /// `cls.1` (`cls.0` is the dropout).
    cls: Conv2d,
}

impl PspHead {
    /// `vb` scoped to `classifier`.
    pub fn new(in_ch: usize, num_classes: usize, vb: VarBuilder) -> Result<Self> {
        let init = ConvInit::TorchDefault;
        let ch = in_ch / 4;
        let stages = BINS
            .iter()
            .enumerate()
            .map(|(i, &bin)| {
                let s = vb.pp("stages").pp(i).pp(1);
                Ok((
                    bin,
                    ConvBn::new(ConvSpec::same(in_ch, ch, 1, 1), init, s.pp(0), s.pp(1))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let cat_ch = in_ch + BINS.len() * ch;
        let bottleneck = ConvBn::new(
            ConvSpec::same(cat_ch, ch, 3, 1),
            init,
            vb.pp("bottleneck.0"),
            vb.pp("bottleneck.1"),
        )?;
        let cls = Conv2d::new(ConvSpec::same(ch, num_classes, 1, 1), true, init, vb.pp("cls.1"))?;
        Ok(Self {
            stages,
            bottleneck,
            cls,
        })
    }

    pub fn fold(&self) -> Result<Self> {
        Ok(Self {
            stages: self
                .stages
                .iter()
                .map(|(b, u)| Ok((*b, u.fold()?)))
                .collect::<Result<_>>()?,
            bottleneck: self.bottleneck.fold()?,
            cls: self.cls.detached(),
        })
    }

    /// `[B, Cin, h, w]` → `[B, classes, h, w]`; h and w need not be multiples of the bins.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let mut feats = vec![x.clone()];
        for (bin, unit) in &self.stages {
            let pooled = adaptive_avg_pool2d(x, *bin, *bin)?; // [B, Cin, b, b]
            let y = conv_bn_relu(unit, &pooled, train)?; // [B, ch, b, b]
            feats.push(resize_bilinear(&y, h, w)?.contiguous()?); // [B, ch, h, w]
        }
        let cat = Tensor::cat(&feats, 1)?; // [B, Cin + 4·ch, h, w]
        let y = conv_bn_relu(&self.bottleneck, &cat, train)?;
        self.cls.forward(&dropout(&y, 0.1, train)?)
    }
}
