//! The training-job contract end to end: the real binary against temporary ml-roots. A valid job passes `check`;
//! every kind of bad input writes `output/failure` naming the problem and exits non-zero.

mod common;

use common::{files, semseg, text, write_gray_png, Job};

#[test]
fn a_synthetic_job_is_valid() {
    let job = Job::with_synth(&[]);
    assert_eq!(files(&job.channel("train")).len(), 6);
    job.check_passes();
}

#[test]
fn missing_hyperparameters_file_fails() {
    let job = Job::with_synth(&[]);
    std::fs::remove_file(job.root().join("input/config/hyperparameters.json")).unwrap();
    let failure = job.check_fails();
    assert!(failure.contains("hyperparameters.json does not exist"), "{failure}");
    assert!(failure.contains("num_classes and num_training_samples"), "{failure}");
}

#[test]
fn bad_and_unknown_hyperparameters_fail_with_the_name_value_and_fix() {
    let job = Job::with_synth(&[]);
    job.write_hyperparameters(r#"{"num_classes": "1", "num_training_samples": "6"}"#);
    let failure = job.check_fails();
    assert!(
        failure.starts_with("hyperparameter 'num_classes' has the value '1'"),
        "{failure}"
    );
    assert!(failure.contains("from 2 to 254"), "{failure}");

    job.write_hyperparameters(r#"{"num_classes": "4", "num_training_samples": "6", "optimiser": "adam"}"#);
    let failure = job.check_fails();
    assert!(
        failure.contains("unknown hyperparameter 'optimiser' (did you mean 'optimizer'?)"),
        "{failure}"
    );

    job.write_hyperparameters(r#"{"num_classes": "4", "num_training_samples": "6", "sagemaker_program": "x"}"#);
    job.check_passes();
}

/// PSPNet and DeepLabV3 pool each image to 1×1 before a BatchNorm, which needs two images a batch in training: a job
/// with batches of one fails in `check`, not at its first step.
#[test]
fn pooling_heads_need_batches_of_two() {
    let job = Job::with_synth(&[]);
    for algorithm in ["psp", "deeplab"] {
        job.write_hyperparameters(&format!(
            r#"{{"num_classes": "4", "num_training_samples": "6", "algorithm": "{algorithm}", "mini_batch_size": "1"}}"#
        ));
        let failure = job.check_fails();
        assert!(
            failure.contains(&format!(
                "algorithm={algorithm} cannot train on batches of one image (mini_batch_size 1"
            )),
            "{failure}"
        );
        assert!(failure.contains("set mini_batch_size to 2 or more"), "{failure}");
    }
    job.write_hyperparameters(
        r#"{"num_classes": "4", "num_training_samples": "6", "algorithm": "fcn", "mini_batch_size": "1"}"#,
    );
    job.check_passes();
}

/// `check` opens no device, so it compares nothing, but it says what a training step will need, so an instance can be
/// chosen before the job runs: the activations grow with the crop's pixels, and bf16 keeps them in half the bytes.
#[test]
fn check_reports_the_memory_a_training_step_needs() {
    let job = Job::with_synth(&[]);
    let activations_gib = |crop: u32, precision: &str| -> f64 {
        job.write_hyperparameters(&format!(
            r#"{{"num_classes": "4", "num_training_samples": "6", "mini_batch_size": "4", "crop_size": "{crop}",
                "precision": "{precision}"}}"#
        ));
        let out = job.run(&["check"]);
        let log = text(&out);
        assert!(out.status.success(), "{log}");
        let pattern = format!(
            "memory: a training step at crop_size {crop} with batches of 4 needs at least [0-9.]+ GiB \\(([0-9.]+) \
             GiB of activations kept for backward, 0\\.39 GiB of weights, gradients and optimizer state\\)"
        );
        let captures = regex::Regex::new(&pattern)
            .unwrap()
            .captures(&log)
            .unwrap_or_else(|| panic!("no memory line like {pattern} in {log}"));
        captures[1].parse().unwrap()
    };
    let (at_240, at_480) = (activations_gib(240, "auto"), activations_gib(480, "auto"));
    assert!(
        (3.6..4.4).contains(&(at_480 / at_240)),
        "crop 240: {at_240} GiB, crop 480: {at_480} GiB"
    );
    let bf16 = activations_gib(480, "bf16");
    assert!(
        (0.45..0.6).contains(&(bf16 / at_480)),
        "fp32 {at_480} GiB, bf16 {bf16} GiB"
    );
}

#[test]
fn a_missing_channel_fails_naming_it() {
    let job = Job::with_synth(&[]);
    std::fs::remove_dir_all(job.channel("validation_annotation")).unwrap();
    let failure = job.check_fails();
    assert!(
        failure.contains("required channel 'validation_annotation' is missing"),
        "{failure}"
    );
}

#[test]
fn an_empty_channel_fails_naming_it() {
    let job = Job::with_synth(&[]);
    for name in files(&job.channel("train")) {
        std::fs::remove_file(job.channel("train").join(name)).unwrap();
    }
    let failure = job.check_fails();
    assert!(failure.contains("channel 'train' has no image files"), "{failure}");
}

#[test]
fn images_without_annotations_are_named_with_a_count() {
    let job = Job::with_synth(&[]);
    let annotations = files(&job.channel("train_annotation"));
    for name in &annotations[..3] {
        std::fs::remove_file(job.channel("train_annotation").join(name)).unwrap();
    }
    let failure = job.check_fails();
    assert!(
        failure.contains("3 of 6 images in channel 'train' have no annotation"),
        "{failure}"
    );
    let first = annotations[0].replace(".png", ".jpg");
    assert!(failure.contains(&first), "{failure}");
}

#[test]
fn size_mismatches_are_named() {
    let job = Job::with_synth(&[]);
    let name = files(&job.channel("validation_annotation"))[1].clone();
    write_gray_png(&job.channel("validation_annotation").join(&name), 10, 10, &[0; 100]);
    let failure = job.check_fails();
    assert!(failure.contains("differ in size"), "{failure}");
    assert!(failure.contains(&format!("is 64x48 but {name} is 10x10")), "{failure}");
}

#[test]
fn labels_beyond_num_classes_are_named() {
    let job = Job::with_synth(&[]);
    job.write_hyperparameters(r#"{"num_classes": "3", "num_training_samples": "6"}"#);
    let failure = job.check_fails();
    assert!(
        failure.contains("hold labels >= num_classes (3) that are not 255"),
        "{failure}"
    );
    assert!(failure.contains("labels 3 in"), "{failure}");
}

#[test]
fn corrupt_images_and_annotations_are_named() {
    let job = Job::with_synth(&[]);
    let image = files(&job.channel("train"))[0].clone();
    std::fs::write(job.channel("train").join(&image), b"\xff\xd8\xff garbage").unwrap();
    let annotation = files(&job.channel("validation_annotation"))[0].clone();
    std::fs::write(job.channel("validation_annotation").join(&annotation), b"not a png").unwrap();
    let failure = job.check_fails();
    assert!(
        failure.contains("cannot be read") && failure.contains(&image),
        "{failure}"
    );
    assert!(failure.contains(&annotation), "{failure}");
}

#[test]
fn a_truncated_jpeg_is_named() {
    let job = Job::with_synth(&[]);
    let image = files(&job.channel("validation"))[1].clone();
    let path = job.channel("validation").join(&image);
    let jpeg = std::fs::read(&path).unwrap();
    // Cut in the middle of the compressed data (after SOS, FF DA): the headers are whole, so only the missing end
    // gives it away.
    let scan = jpeg.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
    std::fs::write(&path, &jpeg[..(scan + jpeg.len()) / 2]).unwrap();
    let failure = job.check_fails();
    assert!(
        failure.contains("cannot be read") && failure.contains(&image) && failure.contains("end-of-image marker"),
        "{failure}"
    );
}

#[test]
fn rgb_colour_masks_are_rejected_with_advice() {
    let job = Job::with_synth(&[]);
    let name = files(&job.channel("train_annotation"))[0].clone();
    image::RgbImage::from_pixel(64, 48, image::Rgb([128, 0, 0]))
        .save(job.channel("train_annotation").join(&name))
        .unwrap();
    let failure = job.check_fails();
    assert!(failure.contains(&name), "{failure}");
    assert!(failure.to_lowercase().contains("palette"), "{failure}");
}

#[test]
fn scale_label_maps_are_applied() {
    let job = Job::with_synth(&["--label-map", "scale", "--label-scale", "10"]);
    job.check_passes();
    // Without the label map the raw values (0, 10, 20, 30) are not labels of 4 classes.
    std::fs::remove_dir_all(job.channel("label_map")).unwrap();
    let failure = job.check_fails();
    assert!(failure.contains("labels 10, 20, 30 in"), "{failure}");
}

#[test]
fn map_label_maps_are_applied_and_unmapped_values_fail() {
    let job = Job::with_synth(&["--label-map", "map"]);
    job.check_passes();
    let path = job.channel("label_map").join("train_label_map.json");
    let map: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut entries = map["map"].as_object().unwrap().clone();
    entries.remove("3");
    std::fs::write(&path, serde_json::json!({ "map": entries }).to_string()).unwrap();
    let failure = job.check_fails();
    assert!(failure.contains("the label map does not map"), "{failure}");
}

#[test]
fn malformed_label_maps_fail() {
    let job = Job::with_synth(&[]);
    std::fs::write(
        job.channel("label_map").join("train_label_map.json"),
        r#"{"scale": "zero"}"#,
    )
    .unwrap();
    let failure = job.check_fails();
    assert!(failure.starts_with("the label_map channel is invalid"), "{failure}");
    assert!(failure.contains("zero"), "{failure}");
}

#[test]
fn several_hosts_and_bad_input_modes_fail() {
    let job = Job::with_synth(&[]);
    job.write_config(
        "resourceconfig.json",
        r#"{"current_host": "algo-1", "hosts": ["algo-1", "algo-2"]}"#,
    );
    let failure = job.check_fails();
    assert!(failure.contains("set InstanceCount to 1"), "{failure}");

    let job = Job::with_synth(&[]);
    job.write_config("inputdataconfig.json", r#"{"train": {"TrainingInputMode": "Stream"}}"#);
    let failure = job.check_fails();
    assert!(failure.contains("TrainingInputMode 'Stream'"), "{failure}");
}

#[test]
fn sagemaker_local_mode_configs_are_accepted() {
    // What the SageMaker Python SDK's local mode writes: only TrainingInputMode, and a resourceconfig.
    let job = Job::with_synth(&[]);
    job.write_config(
        "inputdataconfig.json",
        r#"{"train": {"TrainingInputMode": "File"}, "validation": {"TrainingInputMode": "File"},
            "train_annotation": {"TrainingInputMode": "File"}, "validation_annotation": {"TrainingInputMode": "File"},
            "label_map": {"TrainingInputMode": "File"}}"#,
    );
    job.write_config(
        "resourceconfig.json",
        r#"{"current_host": "algo-1", "hosts": ["algo-1"]}"#,
    );
    job.check_passes();
}

#[test]
fn ml_root_comes_from_the_environment_too() {
    let job = Job::with_synth(&[]);
    let out = std::process::Command::new(common::BIN)
        .arg("check")
        .env("SEMSEG_ML_ROOT", job.root())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn help_documents_every_command_and_option() {
    let out = semseg(&["--help"]);
    let help = text(&out);
    for word in ["check", "synth", "--ml-root", "SEMSEG_ML_ROOT"] {
        assert!(help.contains(word), "--help lacks {word}: {help}");
    }
    let help = text(&semseg(&["synth", "--help"]));
    for option in [
        "--out",
        "--seed",
        "--train-count",
        "--validation-count",
        "--width",
        "--height",
        "--num-classes",
        "--label-map",
        "--label-scale",
        "--border",
        "--jpeg-quality",
        "--force",
    ] {
        assert!(help.contains(option), "synth --help lacks {option}: {help}");
    }
}

#[test]
fn readme_documents_every_hyperparameter() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for spec in semseg::sagemaker::hyperparameters::SPECS {
        let row = format!("| {}{} |", spec.name, if spec.extension { " +" } else { "" });
        assert!(
            readme.contains(&row),
            "README's hyperparameter table lacks {}",
            spec.name
        );
    }
}

#[test]
fn train_runs_the_same_checks_before_its_first_step() {
    let job = Job::with_synth(&[]);
    let name = files(&job.channel("train_annotation"))[0].clone();
    std::fs::remove_file(job.channel("train_annotation").join(&name)).unwrap();
    let out = job.run(&["train"]);
    assert!(!out.status.success(), "{}", text(&out));
    let failure = job.failure().expect("train writes output/failure");
    assert!(
        failure.contains("1 of 6 images in channel 'train' have no annotation"),
        "{failure}"
    );
    assert!(!job.root().join("model/model.safetensors").exists());
}
