//! `semseg predict` on image files with a (untrained) model artifact: what it refuses.

mod common;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use common::{semseg, text};
use semseg::model::artifact::{save_varmap, ModelMeta};
use semseg::model::config::{Algorithm, Backbone, ModelConfig, OutputStride};

/// A ResNet-18 FCN with its initial weights: what it predicts does not matter here, only that it loads.
fn write_model(dir: &std::path::Path) {
    let config = ModelConfig::new(Algorithm::Fcn, Backbone::Resnet18, 3, OutputStride::Eight, false).unwrap();
    let varmap = VarMap::new();
    semseg::model::SegmentationModel::new(&config, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
    save_varmap(dir, &ModelMeta::new(&config), &varmap).unwrap();
}

#[test]
fn a_truncated_jpeg_fails_naming_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_model(&model);
    let image = image::RgbImage::from_fn(48, 32, |x, y| image::Rgb([(x * 5) as u8, (y * 7) as u8, 90]));
    let whole = dir.path().join("whole.jpg");
    image.save(&whole).unwrap();
    let jpeg = std::fs::read(&whole).unwrap();
    let scan = jpeg.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
    let cut = dir.path().join("cut.jpg");
    std::fs::write(&cut, &jpeg[..(scan + jpeg.len()) / 2]).unwrap();
    let out = dir.path().join("masks");
    let predict = |images: &[&std::path::Path]| {
        let mut args = vec![
            "predict",
            "--model",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(images.iter().map(|p| p.to_str().unwrap()));
        semseg(&args)
    };

    let failed = predict(&[&whole, &cut]);
    let log = text(&failed);
    assert!(!failed.status.success(), "a truncated JPEG must fail predict: {log}");
    assert!(
        log.contains("cut.jpg") && log.contains("truncated JPEG") && log.contains("end-of-image marker"),
        "{log}"
    );
    assert!(!out.join("cut.png").exists(), "no mask for the truncated image");

    let predicted = predict(&[&whole]);
    assert!(predicted.status.success(), "{}", text(&predicted));
    let mask = image::open(out.join("whole.png")).unwrap();
    assert_eq!((mask.width(), mask.height()), (48, 32));
}

#[test]
fn the_device_and_precision_choices_are_honoured_or_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_model(&model);
    let image = dir.path().join("a.png");
    image::RgbImage::from_fn(40, 24, |x, y| image::Rgb([(x * 6) as u8, (y * 9) as u8, 40]))
        .save(&image)
        .unwrap();
    let out = dir.path().join("masks");
    let predict = |extra: &[&str]| {
        let mut args = vec![
            "predict",
            "--model",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            image.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        semseg(&args)
    };

    // The CPU in each precision: auto is fp32; bf16 runs bf16 products where the CPU has AVX512-BF16 and falls back
    // to fp32 with a warning where it does not.
    let bf16_here = semseg::model::ops::gemm_bf16::available();
    let mut masks = Vec::new();
    for precision in ["auto", "fp32", "bf16"] {
        let run = predict(&["--device", "cpu", "--precision", precision]);
        let log = text(&run);
        assert!(run.status.success(), "{precision}: {log}");
        assert!(
            log.contains("compute device chosen") && log.contains("device=cpu"),
            "{log}"
        );
        assert_eq!(
            log.contains("bf16_products=true"),
            precision == "bf16" && bf16_here,
            "{precision}: {log}"
        );
        assert_eq!(
            log.contains("needs AVX512-BF16"),
            precision == "bf16" && !bf16_here,
            "{precision}: {log}"
        );
        masks.push(image::open(out.join("a.png")).unwrap().to_luma8());
    }
    assert_eq!(masks[0], masks[1], "auto is fp32 on the CPU");
    // bf16 products may flip a few of the untrained model's near-tied pixels, not more.
    let same = masks[1].pixels().zip(masks[2].pixels()).filter(|(a, b)| a == b).count();
    assert!(
        same as f64 >= 0.95 * (40 * 24) as f64,
        "bf16 and fp32 masks agree on {same} of {} pixels",
        40 * 24
    );
    if !bf16_here {
        assert_eq!(masks[1], masks[2], "without AVX512-BF16, bf16 is fp32");
    }

    for (extra, says) in [
        (["--device", "tpu"], "expected auto, cpu, cuda or cuda:N"),
        (["--precision", "fp16"], "expected one of auto, fp32, bf16"),
    ] {
        let run = predict(&extra);
        let log = text(&run);
        assert!(!run.status.success() && log.contains(says), "{extra:?}: {log}");
    }
    if !cfg!(feature = "cuda") {
        let run = predict(&["--device", "cuda:1"]);
        let log = text(&run);
        assert!(!run.status.success(), "{log}");
        assert!(
            log.contains("cuda:1") && log.contains("built without CUDA support"),
            "{log}"
        );
    }
}

#[test]
fn device_check_passes_on_the_cpu_and_writes_its_report() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let run = semseg(&["device-check", "--device", "cpu", "--out", report.to_str().unwrap()]);
    assert!(run.status.success(), "{}", text(&run));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(report["pass"], true, "{report}");
    let cases = report["cases"].as_array().unwrap();
    assert!(cases.len() >= 10, "{report}");
    assert!(cases.iter().all(|c| c["pass"] == true), "{report}");
}
