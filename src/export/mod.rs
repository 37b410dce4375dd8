//! `semseg export`: a trained model as an ONNX file, so that it runs outside semseg (ONNX Runtime, TensorRT,
//! OpenVINO, SageMaker Neo, a browser) — the built-in algorithm's MXNet models could not.
//!
//! The graph is self-contained: input `image` is `[N, 3, H, W]` float RGB in 0..255 at any size (the model's
//! normalisation is its first two nodes), outputs are `logits` `[N, classes, H, W]` and `mask` `[N, H, W]` uint8,
//! each pixel's class, as `serve` answers, and on request `probabilities` (a softmax over the classes, which ONNX
//! Runtime computes whichever outputs are asked for: a tenth of DeepLabV3's time at 512², so not by default). BatchNorm is folded into the convolutions; the
//! auxiliary head is left out. What `serve` does around the network (decoding, downscaling images over its pixel
//! budget) stays with the caller.

pub mod graph;
mod network;
pub mod onnx_proto;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::Tensor;
use prost::Message;

use crate::model::artifact::{self, ModelMeta};
use crate::model::weights;
use graph::{int, tensor_info, Dim, Graph};
use onnx_proto::{data_type, ModelProto, OperatorSetIdProto, StringStringEntryProto};

/// The ONNX operator set the graph is written against (Resize, Softmax, Squeeze and Shape in their opset-13..15
/// forms). ONNX Runtime has run it since 1.12.
pub const OPSET: i64 = 17;
/// The IR version that goes with opset 17.
pub const IR_VERSION: i64 = 8;
/// `metadata_props` key holding the artifact's `model.json` (classes, normalisation, training figures).
pub const META_KEY: &str = "semseg.model_json";

/// What goes into the file beyond the network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportOptions {
    /// Add the `probabilities` output (softmax over the classes).
    pub probabilities: bool,
}

/// What an export wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSummary {
    pub path: PathBuf,
    pub bytes: usize,
    pub nodes: usize,
    /// Values in the graph's weights and biases.
    pub parameters: usize,
}

/// The network of an artifact (`meta` + its state dict) as an ONNX model.
pub fn to_onnx(
    meta: &ModelMeta,
    tensors: &HashMap<String, Tensor>,
    options: ExportOptions,
) -> anyhow::Result<ModelProto> {
    let config = meta.config()?;
    let expected = weights::check_state_dict(&config, tensors, true)?;

    let mut g = Graph::default();
    // (x / 255 − mean) / std as the server computes it.
    let (scale, shift) = crate::normalize::scale_shift(meta.normalization.mean, meta.normalization.std);
    let scale = g.floats(&[1, 3, 1, 1], &scale);
    let shift = g.floats(&[1, 3, 1, 1], &shift);
    let scaled = g.op("Mul", &["image", &scale], vec![]);
    let normalised = g.op("Sub", &[&scaled, &shift], vec![]);

    let network = network::build(&config, tensors, g, &normalised)?;
    let inference: BTreeSet<String> = expected
        .iter()
        .map(|s| s.name.clone())
        .filter(|n| !n.starts_with("aux_classifier."))
        .collect();
    if network.used != inference {
        let unused: Vec<_> = inference.difference(&network.used).collect();
        anyhow::bail!("the exported graph left out tensors of the network: {unused:?}");
    }
    let mut g = network.graph;
    g.op_into("Identity", &[&network.logits], vec![], "logits");
    let classes = g.op(
        "ArgMax",
        &[&network.logits],
        vec![int("axis", 1), int("keepdims", 0), int("select_last_index", 0)],
    ); // [N, H, W] int64
    g.op_into("Cast", &[&classes], vec![int("to", data_type::UINT8 as i64)], "mask");
    if options.probabilities {
        g.op_into("Softmax", &[&network.logits], vec![int("axis", 1)], "probabilities");
    }

    let (n, h, w) = (Dim::Named("batch"), Dim::Named("height"), Dim::Named("width"));
    let c = Dim::Fixed(config.num_classes);
    let mut outputs = vec![
        tensor_info("logits", data_type::FLOAT, &[n, c, h, w]),
        tensor_info("mask", data_type::UINT8, &[n, h, w]),
    ];
    if options.probabilities {
        outputs.push(tensor_info("probabilities", data_type::FLOAT, &[n, c, h, w]));
    }
    let graph = g.finish(
        &format!("semseg {config}"),
        vec![tensor_info("image", data_type::FLOAT, &[n, Dim::Fixed(3), h, w])],
        outputs,
    );
    Ok(ModelProto {
        ir_version: IR_VERSION,
        producer_name: "semseg".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: format!(
            "{config}. Input image: float32 [N, 3, H, W], RGB values 0..255, any H and W (normalised inside). \
             Outputs at the input's size: logits float32 [N, {classes}, H, W], mask uint8 [N, H, W] (each pixel's \
             class){probabilities}.",
            classes = config.num_classes,
            probabilities = if options.probabilities {
                ", probabilities float32 [N, C, H, W] (softmax over the classes)"
            } else {
                ""
            }
        ),
        graph: Some(graph),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        metadata_props: vec![StringStringEntryProto {
            key: META_KEY.into(),
            value: serde_json::to_string(meta)?,
        }],
    })
}

/// `semseg export`: the artifact in `model_dir` (a `model.tar.gz` there is extracted first) written to `out`
/// (through a temporary file beside it, so a failed export leaves no partial file).
pub fn export_model_dir(model_dir: &Path, out: &Path, options: ExportOptions) -> anyhow::Result<ExportSummary> {
    let dir = crate::model::package::unpack_in_place(model_dir)?;
    let (meta, tensors) =
        artifact::read(&dir).with_context(|| format!("cannot read the model in {}", dir.display()))?;
    let model =
        to_onnx(&meta, &tensors, options).with_context(|| format!("cannot export the model in {}", dir.display()))?;
    let graph = model.graph.as_ref().context("the exported model has no graph")?;
    let nodes = graph.node.len();
    // The graph's weights and biases (BatchNorm folded in), not its small constants.
    let parameters = graph
        .initializer
        .iter()
        .filter(|t| !t.name.starts_with(graph::CONSTANT_PREFIX))
        .map(|t| t.dims.iter().product::<i64>() as usize)
        .sum();
    let bytes = model.encode_to_vec();
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let partial = out.with_file_name(format!(
        ".{}.partial",
        out.file_name().unwrap_or_default().to_string_lossy()
    ));
    let written = std::fs::write(&partial, &bytes)
        .with_context(|| format!("cannot write {}", partial.display()))
        .and_then(|()| {
            std::fs::rename(&partial, out)
                .with_context(|| format!("cannot move {} to {}", partial.display(), out.display()))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&partial); // best effort: the error below says what went wrong
    }
    written?;
    Ok(ExportSummary {
        path: out.to_path_buf(),
        bytes: bytes.len(),
        nodes,
        parameters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{Algorithm, Backbone, ModelConfig, OutputStride};
    use crate::model::seeded_init::seeded_var_builder;
    use crate::model::SegmentationModel;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;
    use onnx_proto::DimensionValue;

    fn model(algorithm: Algorithm, output_stride: OutputStride, aux: bool) -> (ModelMeta, HashMap<String, Tensor>) {
        let config = ModelConfig::new(algorithm, Backbone::Resnet18, 5, output_stride, aux).unwrap();
        let varmap = VarMap::new();
        SegmentationModel::new(&config, seeded_var_builder(&varmap, 3, DType::F32, &Device::Cpu)).unwrap();
        let tensors = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        (ModelMeta::new(&config), tensors)
    }

    fn dims(info: &onnx_proto::ValueInfoProto) -> Vec<String> {
        let shape = info
            .r#type
            .as_ref()
            .unwrap()
            .tensor_type
            .as_ref()
            .unwrap()
            .shape
            .as_ref()
            .unwrap();
        shape
            .dim
            .iter()
            .map(|d| match d.value.as_ref().unwrap() {
                DimensionValue::DimValue(v) => v.to_string(),
                DimensionValue::DimParam(p) => p.clone(),
            })
            .collect()
    }

    #[test]
    fn the_file_is_a_topologically_ordered_graph_holding_each_folded_convolution_once() -> anyhow::Result<()> {
        for algorithm in Algorithm::ALL {
            for output_stride in [OutputStride::Eight, OutputStride::Sixteen] {
                let (meta, tensors) = model(algorithm, output_stride, true);
                let probabilities = output_stride == OutputStride::Sixteen;
                let bytes = to_onnx(&meta, &tensors, ExportOptions { probabilities })?.encode_to_vec();
                let decoded = ModelProto::decode(bytes.as_slice())?;
                let what = format!("{algorithm} OS{}", output_stride.value());
                assert_eq!(
                    (decoded.ir_version, decoded.opset_import[0].version),
                    (IR_VERSION, OPSET)
                );
                let graph = decoded.graph.as_ref().unwrap();
                assert_eq!(graph.input.len(), 1);
                assert_eq!(dims(&graph.input[0]), ["batch", "3", "height", "width"], "{what}");
                let outputs: Vec<_> = graph.output.iter().map(|o| (o.name.as_str(), dims(o))).collect();
                assert_eq!(
                    outputs[0],
                    (
                        "logits",
                        vec!["batch".into(), "5".into(), "height".into(), "width".into()]
                    )
                );
                assert_eq!(
                    outputs[1],
                    ("mask", vec!["batch".into(), "height".into(), "width".into()])
                );
                assert_eq!(outputs.len(), if probabilities { 3 } else { 2 }, "{what}");
                if probabilities {
                    assert_eq!(outputs[2].0, "probabilities");
                }

                // Every node reads the input, an initializer or an earlier node's output.
                let mut defined: BTreeSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
                assert_eq!(
                    defined.len(),
                    graph.initializer.len(),
                    "{what}: initializer names are unique"
                );
                defined.insert("image");
                for node in &graph.node {
                    for input in node.input.iter().filter(|i| !i.is_empty()) {
                        assert!(
                            defined.contains(input.as_str()),
                            "{what}: {} reads {input} before it exists",
                            node.name
                        );
                    }
                    for output in &node.output {
                        assert!(defined.insert(output), "{what}: {output} written twice");
                    }
                }
                for output in &graph.output {
                    assert!(
                        defined.contains(output.name.as_str()),
                        "{what}: no node writes {}",
                        output.name
                    );
                }

                // One Conv per convolution of the inference network, each with a bias (BatchNorm folded in), and
                // no BatchNorm or auxiliary tensor left.
                let convolutions = tensors
                    .iter()
                    .filter(|(n, t)| n.ends_with(".weight") && t.rank() == 4 && !n.starts_with("aux_classifier."))
                    .count();
                let convs: Vec<_> = graph.node.iter().filter(|n| n.op_type == "Conv").collect();
                assert_eq!(convs.len(), convolutions, "{what}");
                assert!(
                    convs.iter().all(|c| c.input.len() == 3),
                    "{what}: every conv has a bias"
                );
                assert!(
                    graph
                        .initializer
                        .iter()
                        .all(|t| !t.name.contains("running_") && !t.name.starts_with("aux_")),
                    "{what}"
                );
                let parameters: usize = graph
                    .initializer
                    .iter()
                    .filter(|t| t.name.ends_with(".weight"))
                    .map(|t| t.dims.iter().product::<i64>() as usize)
                    .sum();
                let conv_parameters: usize = tensors
                    .iter()
                    .filter(|(n, t)| n.ends_with(".weight") && t.rank() == 4 && !n.starts_with("aux_classifier."))
                    .map(|(_, t)| t.elem_count())
                    .sum();
                assert_eq!(parameters, conv_parameters, "{what}");

                let stored = &decoded.metadata_props[0];
                assert_eq!(stored.key, META_KEY);
                assert_eq!(serde_json::from_str::<ModelMeta>(&stored.value)?, meta);
            }
        }
        Ok(())
    }

    #[test]
    fn a_folded_weight_is_the_convolution_scaled_by_its_batchnorm() -> anyhow::Result<()> {
        let (meta, mut tensors) = model(Algorithm::Fcn, OutputStride::Eight, false);
        let name = "backbone.conv1.weight";
        let channels = 64;
        let gamma: Vec<f32> = (0..channels).map(|c| 0.5 + c as f32 / 64.0).collect();
        let var: Vec<f32> = (0..channels).map(|c| 0.25 + c as f32).collect();
        let mean: Vec<f32> = (0..channels).map(|c| c as f32 - 30.0).collect();
        let beta: Vec<f32> = (0..channels).map(|c| (c as f32).sin()).collect();
        for (suffix, values) in [
            ("weight", &gamma),
            ("running_var", &var),
            ("running_mean", &mean),
            ("bias", &beta),
        ] {
            tensors.insert(
                format!("backbone.bn1.{suffix}"),
                Tensor::new(values.as_slice(), &Device::Cpu)?,
            );
        }
        let graph = to_onnx(&meta, &tensors, ExportOptions::default())?.graph.unwrap();
        let read = |wanted: &str| -> Vec<f32> {
            let t = graph.initializer.iter().find(|t| t.name == wanted).unwrap();
            t.raw_data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        };
        let original = tensors[name].flatten_all()?.to_vec1::<f32>()?;
        let (weight, bias) = (read(name), read("backbone.conv1.bias"));
        let per_out = original.len() / channels;
        for o in 0..channels {
            let scale = gamma[o] / (var[o] + 1e-5).sqrt();
            for i in 0..per_out {
                let want = original[o * per_out + i] * scale;
                assert!(
                    (weight[o * per_out + i] - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "weight {o} {i}"
                );
            }
            let want = beta[o] - mean[o] * scale;
            assert!(
                (bias[o] - want).abs() <= 1e-5 * want.abs().max(1.0),
                "bias {o}: {} vs {want}",
                bias[o]
            );
        }
        Ok(())
    }

    #[test]
    fn weights_that_do_not_fit_the_network_are_named() {
        let (meta, mut tensors) = model(Algorithm::Psp, OutputStride::Eight, false);
        tensors.remove("classifier.bottleneck.1.running_var");
        tensors.insert(
            "classifier.cls.1.bias".into(),
            Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
        );
        let message = format!("{:#}", to_onnx(&meta, &tensors, ExportOptions::default()).unwrap_err());
        assert!(message.contains("classifier.bottleneck.1.running_var"), "{message}");
        assert!(
            message.contains("classifier.cls.1.bias: expected [5], found [7]"),
            "{message}"
        );
    }

    #[test]
    fn export_writes_the_file_whole_or_not_at_all() -> anyhow::Result<()> {
        let (meta, tensors) = model(Algorithm::Deeplab, OutputStride::Sixteen, true);
        let dir = tempfile::tempdir()?;
        let model_dir = dir.path().join("model");
        artifact::save(&model_dir, &meta, &tensors)?;
        let out = dir.path().join("onnx/deeplab.onnx");
        let summary = export_model_dir(&model_dir, &out, ExportOptions::default())?;
        let written = std::fs::read(&out)?;
        assert_eq!(summary.bytes, written.len());
        assert!(ModelProto::decode(written.as_slice())?.graph.is_some());
        // Each convolution's weight, and a bias per output channel (BatchNorm folded in, or its own).
        let stored: usize = tensors
            .iter()
            .filter(|(n, t)| n.ends_with(".weight") && t.rank() == 4 && !n.starts_with("aux_classifier."))
            .map(|(_, t)| t.elem_count() + t.dim(0).unwrap())
            .sum();
        assert_eq!(summary.parameters, stored);
        let left: Vec<_> = std::fs::read_dir(out.parent().unwrap())?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        assert_eq!(left, ["deeplab.onnx"], "no partial file left beside it");

        // A directory that holds no model: an error naming it, and no file.
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty)?;
        let out = dir.path().join("none.onnx");
        let message = format!(
            "{:#}",
            export_model_dir(&empty, &out, ExportOptions::default()).unwrap_err()
        );
        assert!(message.contains(&empty.display().to_string()), "{message}");
        assert!(!out.exists());
        Ok(())
    }
}
