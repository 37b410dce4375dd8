//! ResNet-18/34/50/101 backbones in torchvision's v1.5 layout (stride on the 3×3 conv), returning the layer3 and
//! layer4 feature maps the heads need.
//!
//! `replace_stride_with_dilation` works as in torchvision's `_make_layer`: a dilated stage keeps stride 1 and
//! multiplies the running dilation by the stride it replaced; its first block uses the previous dilation, the others
//! the new one. torchvision refuses dilation in basic blocks; here a basic block applies its dilation to both 3×3
//! convs, the same rule as the bottleneck's single 3×3 conv, so ResNet-18/34 also reach output stride 8 or 16.
//! Names match torchvision's `resnet*` state dict without `fc.*` (the caller scopes the `VarBuilder`, e.g. to
//! `backbone`).

use candle_core::{ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::{Backbone, OutputStride};
use super::layers::{ConvBn, ConvInit, ConvSpec};
use super::ops::pool::max_pool_3x3_s2;

/// One residual block: 2 convs (basic) or 3 (bottleneck), each with BN, ReLU between, and the shortcut.
#[derive(Clone, Debug)]
pub struct Block {
    /// conv1/bn1, conv2/bn2 [, conv3/bn3]
    convs: Vec<ConvBn>,
    /// downsample.0 / downsample.1: a strided 1×1 conv when the shape changes.
    downsample: Option<ConvBn>,
}

impl Block {
    /// torchvision's `Bottleneck(in_ch, planes, stride, downsample, dilation=dilation)` (output `planes·4`) or
    /// `BasicBlock` (output `planes`), `vb` scoped to the block (`layer3.0`).
    pub fn new(
        bottleneck: bool,
        in_ch: usize,
        planes: usize,
        stride: usize,
        dilation: usize,
        downsample: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let init = ConvInit::KaimingFanOut;
        let specs = if bottleneck {
            let out = planes * 4;
            vec![
                ConvSpec::same(in_ch, planes, 1, 1),
                ConvSpec::same(planes, planes, 3, dilation).stride(stride),
                ConvSpec::same(planes, out, 1, 1),
            ]
        } else {
            vec![
                ConvSpec::same(in_ch, planes, 3, dilation).stride(stride),
                ConvSpec::same(planes, planes, 3, dilation),
            ]
        };
        let out_ch = specs[specs.len() - 1].out_ch;
        let convs = specs
            .into_iter()
            .enumerate()
            .map(|(i, s)| ConvBn::new(s, init, vb.pp(format!("conv{}", i + 1)), vb.pp(format!("bn{}", i + 1))))
            .collect::<Result<Vec<_>>>()?;
        let downsample = if downsample {
            let ds = vb.pp("downsample");
            Some(ConvBn::new(
                ConvSpec::same(in_ch, out_ch, 1, 1).stride(stride),
                init,
                ds.pp(0),
                ds.pp(1),
            )?)
        } else {
            None
        };
        Ok(Self { convs, downsample })
    }

    pub fn fold(&self) -> Result<Self> {
        Ok(Self {
            convs: self.convs.iter().map(ConvBn::fold).collect::<Result<_>>()?,
            downsample: self.downsample.as_ref().map(ConvBn::fold).transpose()?,
        })
    }
}

impl ModuleT for Block {
    /// `[B, Cin, H, W]` → `[B, Cout, H/stride, W/stride]` (rounded up).
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let identity = match &self.downsample {
            Some(ds) => ds.forward_t(x, train)?,
            None => x.clone(),
        };
        let (last, inner) = self.convs.split_last().expect("a block has convolutions");
        let mut y = x.clone();
        for unit in inner {
            y = unit.forward_with(&y, None, true, train)?;
        }
        // The residual add and the final ReLU ride on the last convolution.
        last.forward_with(&y, Some(&identity), true, train)
    }
}

/// Feature maps the heads use.
#[derive(Clone, Debug)]
pub struct Features {
    /// `[B, 256·e, H/s3, W/s3]` (e = 4 for bottleneck nets, 1 otherwise): the auxiliary head's input.
    pub layer3: Tensor,
    /// `[B, 512·e, H/os, W/os]`: the main head's input.
    pub layer4: Tensor,
}

/// The backbone: stem (conv1, bn1, ReLU, 3×3/2 max-pool) then layer1..layer4.
#[derive(Clone, Debug)]
pub struct ResNet {
    kind: Backbone,
    stem: ConvBn,
    layers: [Vec<Block>; 4],
}

impl ResNet {
    /// Builds the backbone with `vb` scoped to where torchvision's `resnet*` names start (`backbone` inside a
    /// segmentation model, the root for an ImageNet checkpoint).
    pub fn new(kind: Backbone, output_stride: OutputStride, vb: VarBuilder) -> Result<Self> {
        let stem = ConvBn::new(
            ConvSpec {
                in_ch: 3,
                out_ch: 64,
                kernel: 7,
                stride: 2,
                padding: 3,
                dilation: 1,
            },
            ConvInit::KaimingFanOut,
            vb.pp("conv1"),
            vb.pp("bn1"),
        )?;
        let bottleneck = kind.bottleneck();
        let expansion = if bottleneck { 4 } else { 1 };
        let dilate = output_stride.replace_stride_with_dilation();
        let mut in_ch = 64;
        let mut dilation = 1;
        let mut layers: [Vec<Block>; 4] = Default::default();
        for (i, (&blocks, planes)) in kind.depths().iter().zip([64, 128, 256, 512]).enumerate() {
            let vb_layer = vb.pp(format!("layer{}", i + 1));
            let mut stride = if i == 0 { 1 } else { 2 };
            let previous_dilation = dilation;
            if i > 0 && dilate[i - 1] {
                dilation *= stride;
                stride = 1;
            }
            let out_ch = planes * expansion;
            let needs_ds = stride != 1 || in_ch != out_ch;
            let mut stage = Vec::with_capacity(blocks);
            stage.push(Block::new(
                bottleneck,
                in_ch,
                planes,
                stride,
                previous_dilation,
                needs_ds,
                vb_layer.pp(0),
            )?);
            in_ch = out_ch;
            for b in 1..blocks {
                stage.push(Block::new(
                    bottleneck,
                    in_ch,
                    planes,
                    1,
                    dilation,
                    false,
                    vb_layer.pp(b),
                )?);
            }
            layers[i] = stage;
        }
        Ok(Self { kind, stem, layers })
    }

    pub fn kind(&self) -> Backbone {
        self.kind
    }

    /// The same network with every BatchNorm folded into its convolution, for inference.
    pub fn fold(&self) -> Result<Self> {
        let fold_stage = |s: &Vec<Block>| s.iter().map(Block::fold).collect::<Result<Vec<_>>>();
        Ok(Self {
            kind: self.kind,
            stem: self.stem.fold()?,
            layers: [
                fold_stage(&self.layers[0])?,
                fold_stage(&self.layers[1])?,
                fold_stage(&self.layers[2])?,
                fold_stage(&self.layers[3])?,
            ],
        })
    }

    /// `x` `[B, 3, H, W]` (normalised image) → layer3 and layer4 features.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Features> {
        let mut y = self.stem.forward_with(x, None, true, train)?; // [B, 64, H/2, W/2]
        y = max_pool_3x3_s2(&y)?; // [B, 64, H/4, W/4]
        for block in self.layers[0].iter().chain(&self.layers[1]).chain(&self.layers[2]) {
            y = block.forward_t(&y, train)?;
        }
        let layer3 = y.clone();
        for block in &self.layers[3] {
            y = block.forward_t(&y, train)?;
        }
        Ok(Features { layer3, layer4: y })
    }
}
