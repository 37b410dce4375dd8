//! `semseg export`: ONNX Runtime, running the exported file, answers as `semseg predict` does, for each head, at
//! image sizes the file was not told about, in a batch, and with the BatchNorm statistics a trained model has.

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::{semseg, text};
use semseg::model::artifact::{save_varmap, ModelMeta};
use semseg::model::config::{Algorithm, Backbone, ModelConfig, OutputStride};
use semseg::model::seeded_init::seeded_var_builder;
use semseg::model::SegmentationModel;

/// A fixed sequence of values in [-1, 1) (a 64-bit LCG), so the test's data is the same on every run.
fn seeded(count: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A ResNet-18 network of `algorithm` with its auxiliary head, whose BatchNorm running statistics a few training
/// passes on shifted inputs have moved away from 0 and 1, saved as an artifact in `dir`. Its classifier is scaled
/// up so that its answers are decisive (initial weights give near-uniform probabilities, which would hide
/// differences).
fn write_model(dir: &Path, algorithm: Algorithm, output_stride: OutputStride) {
    let config = ModelConfig::new(algorithm, Backbone::Resnet18, 4, output_stride, true).unwrap();
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 7, DType::F32, &Device::Cpu);
    let net = SegmentationModel::new(&config, vb).unwrap();
    for pass in 0..3u64 {
        let (b, h, w) = (2, 40, 48);
        let values: Vec<f32> = seeded(b * 3 * h * w, pass)
            .iter()
            .map(|v| v * 1.5 + pass as f32 * 0.4)
            .collect();
        let x = Tensor::from_vec(values, (b, 3, h, w), &Device::Cpu).unwrap();
        net.forward_t(&x, true).unwrap();
    }
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if name.starts_with("classifier.4.") || name.starts_with("classifier.cls.1.") {
            var.set(&(var.as_tensor() * 60.0).unwrap()).unwrap();
        }
    }
    save_varmap(dir, &ModelMeta::new(&config), &varmap).unwrap();
}

/// Writes `name.png` (for `semseg predict`) and `name.rgb` (the same pixels, raw, for the Python side).
fn write_image(dir: &Path, name: &str, width: u32, height: u32, seed: u64) -> (String, String) {
    let noise = seeded((width * height) as usize, seed);
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        let n = noise[(y * width + x) as usize];
        let r = (x * 255 / width) as f32 + 40.0 * n;
        let g = (y * 255 / height) as f32 - 30.0 * n;
        let b = if (x / 8 + y / 8) % 2 == 0 { 200.0 } else { 30.0 } + 20.0 * n;
        image::Rgb([r, g, b].map(|v| v.clamp(0.0, 255.0) as u8))
    });
    let png = dir.join(format!("{name}.png"));
    image.save(&png).unwrap();
    let rgb = dir.join(format!("{name}.rgb"));
    std::fs::write(&rgb, image.as_raw()).unwrap();
    (png.to_str().unwrap().to_string(), rgb.to_str().unwrap().to_string())
}

#[test]
#[cfg_attr(
    not(semseg_external_tests),
    ignore = "needs python3 with numpy and onnxruntime; runs under CI=true or SEMSEG_EXTERNAL_TESTS=1, or with --ignored"
)]
fn onnx_runtime_answers_as_semseg_predict_does() {
    let has_runtime = Command::new("python3")
        .args(["-c", "import numpy, onnxruntime"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        has_runtime,
        "this test needs python3 with numpy and onnxruntime: pip install onnxruntime (.ci/run does)"
    );
    let dir = tempfile::tempdir().unwrap();
    // Odd sizes; 40×33 leaves PSPNet a 5×5 map, smaller than its 6×6 bins (overlapping windows).
    let sizes = [(61u32, 47u32), (96, 64), (40, 33)];
    let images: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, &(w, h))| write_image(dir.path(), &format!("image{i}"), w, h, 100 + i as u64))
        .collect();
    for (algorithm, output_stride) in [
        (Algorithm::Fcn, OutputStride::Eight),
        (Algorithm::Deeplab, OutputStride::Sixteen),
        (Algorithm::Deeplab, OutputStride::Eight),
        (Algorithm::Psp, OutputStride::Eight),
    ] {
        let what = format!("{algorithm} OS{}", output_stride.value());
        let case = dir.path().join(format!("{algorithm}-{}", output_stride.value()));
        let model = case.join("model");
        write_model(&model, algorithm, output_stride);
        let predicted = case.join("predicted");
        let mut args = vec![
            "predict",
            "--probabilities",
            "--model",
            model.to_str().unwrap(),
            "--out",
            predicted.to_str().unwrap(),
        ];
        args.extend(images.iter().map(|(png, _)| png.as_str()));
        let out = semseg(&args);
        assert!(out.status.success(), "{what}: predict failed: {}", text(&out));

        let onnx = case.join("model.onnx");
        // Half of the files with the probabilities output, half without.
        let probabilities = algorithm != Algorithm::Psp && output_stride == OutputStride::Eight;
        let mut args = vec![
            "export",
            "--model",
            model.to_str().unwrap(),
            "--out",
            onnx.to_str().unwrap(),
        ];
        if probabilities {
            args.push("--probabilities");
        }
        let out = semseg(&args);
        assert!(out.status.success(), "{what}: export failed: {}", text(&out));
        assert!(text(&out).contains("exported"), "{}", text(&out));

        let cases: Vec<String> = images
            .iter()
            .zip(sizes)
            .enumerate()
            .map(|(i, ((_, rgb), (w, h)))| {
                format!("{rgb}:{h}:{w}:{}", predicted.join(format!("image{i}.npy")).display())
            })
            .collect();
        let out = Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check-onnx-export.py"))
            .arg(&onnx)
            .args(&cases)
            .output()
            .unwrap();
        let report = text(&out);
        assert!(out.status.success(), "{what}: {report}");
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), sizes.len(), "{what}: {report}");
        for line in &lines {
            let figure = |k: &str| line[k].as_f64().unwrap();
            eprintln!("{what}: {line}");
            assert!(figure("max_abs_diff") < 1e-4, "{what}: {line}");
            assert!(figure("relative_l2") < 1e-4, "{what}: {line}");
            assert!(figure("logits_relative_l2") < 1e-4, "{what}: {line}");
            assert!(figure("mask_agreement") >= 0.999, "{what}: {line}");
            assert_eq!(line["mask_is_logits_argmax"], true, "{what}: {line}");
            assert!(figure("batch_max_abs_diff") < 1e-4, "{what}: {line}");
            assert_eq!(line["has_probabilities"], probabilities, "{what}: {line}");
            assert!(figure("probabilities_vs_softmax") < 1e-6, "{what}: {line}");
        }
        let decisive = lines
            .iter()
            .any(|l| l["classes_in_mask"].as_u64().unwrap() >= 2 && l["mean_top_probability"].as_f64().unwrap() > 0.4);
        assert!(
            decisive,
            "{what}: the model's answers are too uniform to compare: {lines:?}"
        );
    }
}

#[test]
fn export_refuses_what_is_not_a_model_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("model.onnx");
    let missing = dir.path().join("no-such-model");
    let out = semseg(&[
        "export",
        "--model",
        missing.to_str().unwrap(),
        "--out",
        out_file.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no-such-model"), "{}", text(&out));

    // Weights for 4 classes under a model.json saying 6.
    let model = dir.path().join("model");
    write_model(&model, Algorithm::Fcn, OutputStride::Eight);
    let meta_path = model.join("model.json");
    let meta = std::fs::read_to_string(&meta_path).unwrap();
    std::fs::write(&meta_path, meta.replace("\"num_classes\": 4", "\"num_classes\": 6")).unwrap();
    let out = semseg(&[
        "export",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out_file.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("classifier.4.weight: expected [6, 128, 1, 1], found [4, 128, 1, 1]"),
        "{}",
        text(&out)
    );
    assert!(!out_file.exists());
    assert_eq!(common::files(dir.path()), ["model"], "no partial file left");
}
