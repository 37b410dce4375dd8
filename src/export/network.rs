//! A model artifact's network as an ONNX graph, written from its state dict by torchvision's names: the same
//! modules in the same order as [`crate::model::SegmentationModel`] runs them, each BatchNorm folded into the
//! convolution before it (eval statistics), the auxiliary head left out, dropout gone (inference).
//!
//! Input sizes stay free: the final resize and the pooling branches take their sizes from the input's `Shape`, and
//! PSPNet's adaptive pooling, which ONNX lacks, is two matmuls with averaging matrices built from the map's size
//! (bin `i` of `b` averages `[⌊i·L/b⌋, ⌈(i+1)·L/b⌉)`, PyTorch's bins).

use std::collections::{BTreeSet, HashMap};

use anyhow::{bail, Context};
use candle_core::{DType, Tensor};

use super::graph::{int, ints, string, Graph};
use super::onnx_proto::data_type;
use crate::model::config::{Algorithm, ModelConfig};
use crate::model::heads::psp::BINS;
use crate::model::layers::{ConvSpec, BN_EPS};
use crate::model::resnet::{block_plan, STEM};

/// The graph's nodes (up to the logits at the input's size) and which tensors of the state dict they used.
pub struct NetworkGraph {
    pub graph: Graph,
    /// `[N, classes, H, W]`, before softmax.
    pub logits: String,
    pub used: BTreeSet<String>,
}

/// Appends the network to a graph whose input `image` is `[N, 3, H, W]`, already normalised.
pub fn build(
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    graph: Graph,
    image: &str,
) -> anyhow::Result<NetworkGraph> {
    let mut exporter = Exporter {
        g: graph,
        tensors,
        used: BTreeSet::new(),
    };
    let features = exporter.backbone(config, image)?;
    let small = match config.algorithm {
        Algorithm::Fcn => exporter.fcn_head(&features)?,
        Algorithm::Deeplab => exporter.deeplab_head(config, &features)?,
        Algorithm::Psp => exporter.psp_head(&features)?,
    };
    let logits = exporter.resize_like(&small, image);
    Ok(NetworkGraph {
        graph: exporter.g,
        logits,
        used: exporter.used,
    })
}

struct Exporter<'a> {
    g: Graph,
    tensors: &'a HashMap<String, Tensor>,
    used: BTreeSet<String>,
}

impl Exporter<'_> {
    /// A state-dict tensor's shape and values (f32, row-major).
    fn take(&mut self, name: &str) -> anyhow::Result<(Vec<usize>, Vec<f32>)> {
        let tensor = self
            .tensors
            .get(name)
            .with_context(|| format!("the model has no tensor {name}"))?;
        let values = tensor
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .with_context(|| format!("cannot read tensor {name}"))?;
        self.used.insert(name.to_string());
        Ok((tensor.dims().to_vec(), values))
    }

    /// `conv` (`{conv}.weight`, and `{conv}.bias` when the conv has one) on `x`, with the BatchNorm `bn` folded
    /// in, then ReLU when asked. `[N, Cin, H, W]` → `[N, Cout, H', W']`.
    fn conv(&mut self, x: &str, conv: &str, bn: Option<&str>, spec: ConvSpec, relu: bool) -> anyhow::Result<String> {
        let (dims, mut weight) = self.take(&format!("{conv}.weight"))?;
        let expected = [spec.out_ch, spec.in_ch, spec.kernel, spec.kernel];
        if dims != expected {
            bail!("{conv}.weight has shape {dims:?}, the network needs {expected:?}");
        }
        let out = spec.out_ch;
        let mut bias = if self.tensors.contains_key(&format!("{conv}.bias")) {
            Some(self.take(&format!("{conv}.bias"))?.1)
        } else {
            None
        };
        if let Some(bn) = bn {
            let [gamma, beta, mean, var] =
                ["weight", "bias", "running_mean", "running_var"].map(|p| self.take(&format!("{bn}.{p}")).map(|t| t.1));
            let (gamma, beta, mean, var) = (gamma?, beta?, mean?, var?);
            if [&gamma, &beta, &mean, &var].iter().any(|v| v.len() != out) {
                bail!("{bn} does not have {out} channels");
            }
            let per_out = weight.len() / out;
            let mut folded = vec![0f32; out];
            for o in 0..out {
                // Eval BatchNorm: γ·(y − μ)/√(σ² + ε) + β = s·y + (β − s·μ), with s folded into the weight.
                let scale = f64::from(gamma[o]) / (f64::from(var[o]) + BN_EPS).sqrt();
                for w in &mut weight[o * per_out..(o + 1) * per_out] {
                    *w = (f64::from(*w) * scale) as f32;
                }
                let conv_bias = bias.as_ref().map_or(0.0, |b| f64::from(b[o]));
                folded[o] = (f64::from(beta[o]) + scale * (conv_bias - f64::from(mean[o]))) as f32;
            }
            bias = Some(folded);
        }
        let weight_name = self.g.floats_named(&format!("{conv}.weight"), &dims, &weight);
        let bias_name = bias.map(|b| self.g.floats_named(&format!("{conv}.bias"), &[out], &b));
        let mut inputs = vec![x, weight_name.as_str()];
        if let Some(b) = &bias_name {
            inputs.push(b);
        }
        let (k, s, p, d) = (
            spec.kernel as i64,
            spec.stride as i64,
            spec.padding as i64,
            spec.dilation as i64,
        );
        let y = self.g.op(
            "Conv",
            &inputs,
            vec![
                ints("kernel_shape", &[k, k]),
                ints("strides", &[s, s]),
                ints("pads", &[p, p, p, p]),
                ints("dilations", &[d, d]),
                int("group", 1),
            ],
        );
        Ok(if relu { self.g.op("Relu", &[&y], vec![]) } else { y })
    }

    /// ResNet stem and layer1..layer4 (`backbone.*`): `[N, 3, H, W]` → layer4 `[N, C4, H/os, W/os]`.
    fn backbone(&mut self, config: &ModelConfig, x: &str) -> anyhow::Result<String> {
        let y = self.conv(x, "backbone.conv1", Some("backbone.bn1"), STEM, true)?; // [N, 64, H/2, W/2]
        let mut y = self.g.op(
            "MaxPool",
            &[&y],
            vec![
                ints("kernel_shape", &[3, 3]),
                ints("strides", &[2, 2]),
                ints("pads", &[1, 1, 1, 1]),
            ],
        ); // [N, 64, H/4, W/4]
        for plan in block_plan(config.backbone, config.output_stride) {
            let block = format!("backbone.{}", plan.name());
            let identity = match plan.downsample() {
                Some(spec) => self.conv(
                    &y,
                    &format!("{block}.downsample.0"),
                    Some(&format!("{block}.downsample.1")),
                    spec,
                    false,
                )?,
                None => y.clone(),
            };
            let specs = plan.convs();
            let last = specs.len() - 1;
            let mut z = y;
            for (i, spec) in specs.into_iter().enumerate() {
                let (conv, bn) = (format!("{block}.conv{}", i + 1), format!("{block}.bn{}", i + 1));
                z = self.conv(&z, &conv, Some(&bn), spec, i < last)?;
            }
            let sum = self.g.op("Add", &[&z, &identity], vec![]);
            y = self.g.op("Relu", &[&sum], vec![]);
        }
        Ok(y)
    }

    /// torchvision's `FCNHead` (`classifier.0/1` 3×3 conv + BN + ReLU, `classifier.4` 1×1 conv with bias).
    fn fcn_head(&mut self, x: &str) -> anyhow::Result<String> {
        let c4 = self.channels("classifier.0.weight", 1)?;
        let classes = self.channels("classifier.4.weight", 0)?;
        let y = self.conv(
            x,
            "classifier.0",
            Some("classifier.1"),
            ConvSpec::same(c4, c4 / 4, 3, 1),
            true,
        )?;
        self.conv(&y, "classifier.4", None, ConvSpec::same(c4 / 4, classes, 1, 1), false)
    }

    /// torchvision's `DeepLabHead`: ASPP (1×1, three dilated 3×3, image pooling; projected to 256) then a 3×3 conv
    /// and the 1×1 classifier.
    fn deeplab_head(&mut self, config: &ModelConfig, x: &str) -> anyhow::Result<String> {
        let c4 = self.channels("classifier.0.convs.0.0.weight", 1)?;
        let width = self.channels("classifier.0.convs.0.0.weight", 0)?;
        let classes = self.channels("classifier.4.weight", 0)?;
        let aspp = "classifier.0";
        let mut branches = vec![self.conv(
            x,
            &format!("{aspp}.convs.0.0"),
            Some(&format!("{aspp}.convs.0.1")),
            ConvSpec::same(c4, width, 1, 1),
            true,
        )?];
        for (i, rate) in config.output_stride.aspp_rates().into_iter().enumerate() {
            let b = format!("{aspp}.convs.{}", i + 1);
            branches.push(self.conv(
                x,
                &format!("{b}.0"),
                Some(&format!("{b}.1")),
                ConvSpec::same(c4, width, 3, rate),
                true,
            )?);
        }
        let pooled = self.g.op("GlobalAveragePool", &[x], vec![]); // [N, C4, 1, 1]
        let pooled = self.conv(
            &pooled,
            &format!("{aspp}.convs.4.1"),
            Some(&format!("{aspp}.convs.4.2")),
            ConvSpec::same(c4, width, 1, 1),
            true,
        )?;
        // Bilinear from 1×1 is a broadcast: [N, 256, 1, 1] → [N, 256, h, w].
        let like = self.g.op("Shape", &[&branches[0]], vec![]);
        branches.push(self.g.op("Expand", &[&pooled, &like], vec![]));
        let refs: Vec<&str> = branches.iter().map(String::as_str).collect();
        let cat = self.g.op("Concat", &refs, vec![int("axis", 1)]); // [N, 5·256, h, w]
        let y = self.conv(
            &cat,
            &format!("{aspp}.project.0"),
            Some(&format!("{aspp}.project.1")),
            ConvSpec::same(5 * width, width, 1, 1),
            true,
        )?;
        let y = self.conv(
            &y,
            "classifier.1",
            Some("classifier.2"),
            ConvSpec::same(width, width, 3, 1),
            true,
        )?;
        self.conv(&y, "classifier.4", None, ConvSpec::same(width, classes, 1, 1), false)
    }

    /// The PSP head: pyramid pooling over bins 1, 2, 3, 6 (adaptive average pool, 1×1 conv + BN + ReLU, bilinear
    /// back to the map's size), concatenated after the input, then a 3×3 conv + BN + ReLU and the classifier.
    fn psp_head(&mut self, x: &str) -> anyhow::Result<String> {
        let c4 = self.channels("classifier.stages.0.1.0.weight", 1)?;
        let ch = c4 / 4;
        let classes = self.channels("classifier.cls.1.weight", 0)?;
        let height = self.g.op("Shape", &[x], vec![int("start", 2), int("end", 3)]); // [1]: h
        let width = self.g.op("Shape", &[x], vec![int("start", 3), int("end", 4)]); // [1]: w
        let mut feats = vec![x.to_string()];
        for (i, &bin) in BINS.iter().enumerate() {
            let pooled = if bin == 1 {
                self.g.op("GlobalAveragePool", &[x], vec![])
            } else {
                let rows = self.averaging_matrix(&height, bin); // [b, h]
                let cols = self.averaging_matrix(&width, bin); // [b, w]
                let cols_t = self.g.op("Transpose", &[&cols], vec![ints("perm", &[1, 0])]); // [w, b]
                let across = self.g.op("MatMul", &[x, &cols_t], vec![]); // [N, C4, h, b]
                self.g.op("MatMul", &[&rows, &across], vec![]) // [N, C4, b, b]
            };
            let stage = format!("classifier.stages.{i}.1");
            let y = self.conv(
                &pooled,
                &format!("{stage}.0"),
                Some(&format!("{stage}.1")),
                ConvSpec::same(c4, ch, 1, 1),
                true,
            )?;
            feats.push(self.resize_like(&y, x)); // [N, ch, h, w]
        }
        let refs: Vec<&str> = feats.iter().map(String::as_str).collect();
        let cat = self.g.op("Concat", &refs, vec![int("axis", 1)]); // [N, C4 + 4·ch, h, w]
        let y = self.conv(
            &cat,
            "classifier.bottleneck.0",
            Some("classifier.bottleneck.1"),
            ConvSpec::same(c4 + BINS.len() * ch, ch, 3, 1),
            true,
        )?;
        self.conv(&y, "classifier.cls.1", None, ConvSpec::same(ch, classes, 1, 1), false)
    }

    /// `[bins, L]` float: row `i` holds `1/len` over `[⌊i·L/bins⌋, ⌈(i+1)·L/bins⌉)`, zeros elsewhere (PyTorch's
    /// adaptive average pooling along one axis of length `L`, given as a `[1]` int64).
    fn averaging_matrix(&mut self, length: &str, bins: usize) -> String {
        let b = bins as i64;
        let axis0 = self.g.int64s(&[1], &[0]);
        let limit = self.g.op("Squeeze", &[length, &axis0], vec![]); // scalar L
        let (zero, one) = (self.g.int64s(&[], &[0]), self.g.int64s(&[], &[1]));
        let index = self.g.op("Range", &[&zero, &limit, &one], vec![]); // [L]: 0..L
        let lower = self.g.int64s(&[bins, 1], &(0..b).collect::<Vec<_>>());
        let upper = self.g.int64s(&[bins, 1], &(1..=b).collect::<Vec<_>>());
        let (divisor, round_up) = (self.g.int64s(&[1], &[b]), self.g.int64s(&[1], &[b - 1]));
        let scaled = self.g.op("Mul", &[&lower, length], vec![]);
        let start = self.g.op("Div", &[&scaled, &divisor], vec![]); // [b, 1]: ⌊i·L/b⌋
        let scaled = self.g.op("Mul", &[&upper, length], vec![]);
        let scaled = self.g.op("Add", &[&scaled, &round_up], vec![]);
        let end = self.g.op("Div", &[&scaled, &divisor], vec![]); // [b, 1]: ⌈(i+1)·L/b⌉
        let after_start = self.g.op("GreaterOrEqual", &[&index, &start], vec![]); // [b, L]
        let before_end = self.g.op("Less", &[&index, &end], vec![]);
        let inside = self.g.op("And", &[&after_start, &before_end], vec![]);
        let inside = self.g.op("Cast", &[&inside], vec![int("to", data_type::FLOAT as i64)]);
        let count = self.g.op("Sub", &[&end, &start], vec![]);
        let count = self.g.op("Cast", &[&count], vec![int("to", data_type::FLOAT as i64)]);
        self.g.op("Div", &[&inside, &count], vec![])
    }

    /// `y` `[N, C, h, w]` bilinearly resized to `like`'s height and width, with PyTorch's sampling
    /// (`align_corners=False`, no antialias): ONNX's `half_pixel` with the sample positions clamped to the map.
    fn resize_like(&mut self, y: &str, like: &str) -> String {
        let leading = self.g.op("Shape", &[y], vec![int("end", 2)]); // [N, C]
        let size = self.g.op("Shape", &[like], vec![int("start", 2)]); // [H, W]
        let sizes = self.g.op("Concat", &[&leading, &size], vec![int("axis", 0)]);
        self.g.op(
            "Resize",
            &[y, "", "", &sizes],
            vec![
                string("mode", "linear"),
                string("coordinate_transformation_mode", "half_pixel"),
            ],
        )
    }

    /// Dimension `axis` of a state-dict tensor (without marking it used).
    fn channels(&self, name: &str, axis: usize) -> anyhow::Result<usize> {
        let tensor = self
            .tensors
            .get(name)
            .with_context(|| format!("the model has no tensor {name}"))?;
        tensor
            .dims()
            .get(axis)
            .copied()
            .with_context(|| format!("{name} has shape {:?}", tensor.dims()))
    }
}
