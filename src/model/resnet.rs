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
    /// torchvision's `Bottleneck` (output `planes·4`) or `BasicBlock` (output `planes`) as `plan` places it, `vb`
    /// scoped to the block (`layer3.0`).
    pub fn new(plan: &BlockPlan, vb: VarBuilder) -> Result<Self> {
        let init = ConvInit::KaimingFanOut;
        let convs = plan
            .convs()
            .into_iter()
            .enumerate()
            .map(|(i, s)| ConvBn::new(s, init, vb.pp(format!("conv{}", i + 1)), vb.pp(format!("bn{}", i + 1))))
            .collect::<Result<Vec<_>>>()?;
        let downsample = match plan.downsample() {
            Some(spec) => {
                let ds = vb.pp("downsample");
                Some(ConvBn::new(spec, init, ds.pp(0), ds.pp(1))?)
            }
            None => None,
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

/// One residual block's place and shape, as torchvision's `_make_layer` lays the blocks out: the network builds its
/// blocks from these, and the ONNX export writes the same convolutions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockPlan {
    /// 1..=4 (`layer1` .. `layer4`).
    pub layer: usize,
    /// The block's index within its layer.
    pub index: usize,
    pub bottleneck: bool,
    pub in_ch: usize,
    pub planes: usize,
    pub stride: usize,
    pub dilation: usize,
    /// Whether the shortcut is a strided 1×1 conv + BN (`downsample.0` / `downsample.1`).
    pub has_downsample: bool,
}

impl BlockPlan {
    /// The block's name prefix under the backbone: `layer3.0`.
    pub fn name(&self) -> String {
        format!("layer{}.{}", self.layer, self.index)
    }

    pub fn out_ch(&self) -> usize {
        if self.bottleneck {
            self.planes * 4
        } else {
            self.planes
        }
    }

    /// `conv1`, `conv2` [, `conv3`]: the stride rides on the 3×3 conv (v1.5), the dilation on every 3×3.
    pub fn convs(&self) -> Vec<ConvSpec> {
        let (planes, dilation) = (self.planes, self.dilation);
        if self.bottleneck {
            vec![
                ConvSpec::same(self.in_ch, planes, 1, 1),
                ConvSpec::same(planes, planes, 3, dilation).stride(self.stride),
                ConvSpec::same(planes, self.out_ch(), 1, 1),
            ]
        } else {
            vec![
                ConvSpec::same(self.in_ch, planes, 3, dilation).stride(self.stride),
                ConvSpec::same(planes, planes, 3, dilation),
            ]
        }
    }

    /// The shortcut's 1×1 conv, when it has one.
    pub fn downsample(&self) -> Option<ConvSpec> {
        self.has_downsample
            .then(|| ConvSpec::same(self.in_ch, self.out_ch(), 1, 1).stride(self.stride))
    }
}

/// Every block of `kind` at `output_stride`, layer by layer. A dilated stage keeps stride 1 and multiplies the
/// running dilation by the stride it replaced; its first block uses the previous dilation, the others the new one.
pub fn block_plan(kind: Backbone, output_stride: OutputStride) -> Vec<BlockPlan> {
    let bottleneck = kind.bottleneck();
    let expansion = if bottleneck { 4 } else { 1 };
    let dilate = output_stride.replace_stride_with_dilation();
    let mut in_ch = 64;
    let mut dilation = 1;
    let mut plan = Vec::new();
    for (i, (&blocks, planes)) in kind.depths().iter().zip([64, 128, 256, 512]).enumerate() {
        let mut stride = if i == 0 { 1 } else { 2 };
        let previous_dilation = dilation;
        if i > 0 && dilate[i - 1] {
            dilation *= stride;
            stride = 1;
        }
        let out_ch = planes * expansion;
        for index in 0..blocks {
            let first = index == 0;
            plan.push(BlockPlan {
                layer: i + 1,
                index,
                bottleneck,
                in_ch: if first { in_ch } else { out_ch },
                planes,
                stride: if first { stride } else { 1 },
                dilation: if first { previous_dilation } else { dilation },
                has_downsample: first && (stride != 1 || in_ch != out_ch),
            });
        }
        in_ch = out_ch;
    }
    plan
}

/// The stem's 7×7/2 convolution (`conv1`, then `bn1`, ReLU and the 3×3/2 max-pool).
pub const STEM: ConvSpec = ConvSpec {
    in_ch: 3,
    out_ch: 64,
    kernel: 7,
    stride: 2,
    padding: 3,
    dilation: 1,
};

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
        let stem = ConvBn::new(STEM, ConvInit::KaimingFanOut, vb.pp("conv1"), vb.pp("bn1"))?;
        let mut layers: [Vec<Block>; 4] = Default::default();
        for plan in block_plan(kind, output_stride) {
            layers[plan.layer - 1].push(Block::new(&plan, vb.pp(plan.name()))?);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(plan: &[BlockPlan], layer: usize, index: usize) -> (usize, usize, bool, usize) {
        let b = plan
            .iter()
            .find(|p| p.layer == layer && p.index == index)
            .expect("block");
        (b.stride, b.dilation, b.has_downsample, b.out_ch())
    }

    /// torchvision's `_make_layer` with `replace_stride_with_dilation` [F, T, T] (OS8) and [F, F, T] (OS16): a
    /// dilated layer's first block keeps the previous dilation.
    #[test]
    fn the_block_plan_is_torchvisions() {
        let os8 = block_plan(Backbone::Resnet50, OutputStride::Eight);
        assert_eq!(os8.len(), 3 + 4 + 6 + 3);
        assert_eq!(at(&os8, 1, 0), (1, 1, true, 256));
        assert_eq!(at(&os8, 1, 1), (1, 1, false, 256));
        assert_eq!(at(&os8, 2, 0), (2, 1, true, 512));
        assert_eq!(at(&os8, 3, 0), (1, 1, true, 1024));
        assert_eq!(at(&os8, 3, 5), (1, 2, false, 1024));
        assert_eq!(at(&os8, 4, 0), (1, 2, true, 2048));
        assert_eq!(at(&os8, 4, 2), (1, 4, false, 2048));
        assert_eq!(os8[4].name(), "layer2.1");
        assert_eq!(os8[4].in_ch, 512);

        let os16 = block_plan(Backbone::Resnet101, OutputStride::Sixteen);
        assert_eq!(os16.len(), 3 + 4 + 23 + 3);
        assert_eq!(at(&os16, 3, 0), (2, 1, true, 1024));
        assert_eq!(at(&os16, 3, 22), (1, 1, false, 1024));
        assert_eq!(at(&os16, 4, 0), (1, 1, true, 2048));
        assert_eq!(at(&os16, 4, 1), (1, 2, false, 2048));

        // Basic blocks: layer1 keeps 64 channels, so no shortcut conv; both 3×3 convs carry the dilation.
        let basic = block_plan(Backbone::Resnet18, OutputStride::Eight);
        assert_eq!(at(&basic, 1, 0), (1, 1, false, 64));
        assert_eq!(at(&basic, 4, 1), (1, 4, false, 512));
        let convs = basic.last().expect("blocks").convs();
        assert_eq!(convs.len(), 2);
        assert!(convs.iter().all(|c| c.kernel == 3 && c.dilation == 4 && c.padding == 4));
    }
}
