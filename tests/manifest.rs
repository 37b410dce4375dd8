//! File-mode augmented manifests end to end: a channel holding one `*.manifest` (JSON lines of image and annotation
//! references) instead of image/annotation channel pairs, checked and trained on by the real binary.

mod common;

use std::path::Path;

use common::{text, Job};

const HYPERPARAMETERS: &str = r#"{"num_classes": "4", "num_training_samples": "6", "backbone": "resnet-18",
    "algorithm": "fcn", "use_pretrained_model": "False", "crop_size": "48", "base_size": "64", "epochs": "1",
    "mini_batch_size": "2", "validation_mini_batch_size": "1", "output_stride": "8"}"#;

/// Move a synth split into one channel: images under `images/`, annotations under `masks/`; the annotation channel
/// goes away. Returns the stems.
fn gather(job: &Job, images: &str, annotations: &str) -> Vec<String> {
    let channel = job.channel(images);
    let (image_dir, mask_dir) = (channel.join("images"), channel.join("masks"));
    std::fs::create_dir_all(&image_dir).unwrap();
    std::fs::create_dir_all(&mask_dir).unwrap();
    let mut stems = Vec::new();
    for name in common::files(&channel) {
        if let Some(stem) = name.strip_suffix(".jpg") {
            std::fs::rename(channel.join(&name), image_dir.join(&name)).unwrap();
            let mask = format!("{stem}.png");
            std::fs::rename(job.channel(annotations).join(&mask), mask_dir.join(&mask)).unwrap();
            stems.push(stem.to_string());
        }
    }
    std::fs::remove_dir_all(job.channel(annotations)).unwrap();
    stems
}

fn write_manifest(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// Train: relative references under Ground Truth's attribute names. Validation: `file://` URIs (absolute), and
/// AttributeNames in inputdataconfig.json choosing between two annotation references.
fn manifest_job() -> Job {
    let job = Job::with_synth(&[]);
    job.write_hyperparameters(HYPERPARAMETERS);
    let train: Vec<String> = gather(&job, "train", "train_annotation")
        .iter()
        .map(|s| {
            format!(
                r#"{{"source-ref": "images/{s}.jpg", "city-streets-ref": "masks/{s}.png", "city-streets-ref-metadata": {{"class-map": {{"0": "road"}}}}}}"#
            )
        })
        .collect();
    write_manifest(&job.channel("train").join("train.manifest"), &train);
    let validation_dir = job.channel("validation");
    let validation: Vec<String> = gather(&job, "validation", "validation_annotation")
        .iter()
        .map(|s| {
            format!(
                r#"{{"image": "file://{dir}/images/{s}.jpg", "mask": "file://{dir}/masks/{s}.png", "old-ref": "nowhere.png"}}"#,
                dir = validation_dir.display()
            )
        })
        .collect();
    write_manifest(&validation_dir.join("validation.manifest"), &validation);
    job.write_config(
        "inputdataconfig.json",
        r#"{"train": {"TrainingInputMode": "File"},
            "validation": {"TrainingInputMode": "File", "AttributeNames": ["image", "mask"]}}"#,
    );
    job
}

#[test]
fn manifest_channels_need_no_annotation_channels_and_train() {
    let job = manifest_job();
    job.check_passes();
    let out = job.run(&["train"]);
    let log = text(&out);
    assert!(out.status.success(), "{log}\nfailure: {:?}", job.failure());
    assert!(log.contains("reading the augmented manifest"), "{log}");
    assert!(log.contains("train=6 validation=3"), "{log}");
    assert!(log.contains("#metrics epoch=1 validation:mIOU"), "{log}");
    assert!(job.root().join("model/model.json").is_file());
}

#[test]
fn bad_manifest_lines_fail_check_naming_the_manifest_and_the_line() {
    let job = manifest_job();
    let manifest = job.channel("train").join("train.manifest");
    let mut lines: Vec<String> = std::fs::read_to_string(&manifest)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    lines[1] = "{not json".into();
    lines[2] = r#"{"source-ref": "images/missing.jpg", "city-streets-ref": "masks/missing.png"}"#.into();
    lines[3] = r#"{"source-ref": "images/x.jpg", "a-ref": "masks/x.png", "b-ref": "masks/y.png"}"#.into();
    lines[4] = r#"{"source-ref": "s3://bucket/train/x.jpg", "city-streets-ref": "s3://bucket/train/x.png"}"#.into();
    write_manifest(&manifest, &lines);
    let failure = job.check_fails();
    for want in [
        format!("manifest {} has 4 bad lines", manifest.display()),
        "line 2: not JSON".into(),
        "line 3: source-ref 'images/missing.jpg'".into(),
        "missing.jpg does not exist".into(),
        "line 4: 2 candidate annotation references ('a-ref', 'b-ref')".into(),
        // s3:// references go to S3 (here without credentials): the line and the object are named.
        "line 5: source-ref: ".into(),
        "s3://bucket/train/x.jpg".into(),
    ] {
        assert!(failure.contains(&want), "{want:?} not in: {failure}");
    }

    // Two manifests in one channel are ambiguous.
    std::fs::write(job.channel("train").join("other.manifest"), "").unwrap();
    let failure = job.check_fails();
    assert!(
        failure.contains("channel 'train' holds 2 manifest files (other.manifest, train.manifest)"),
        "{failure}"
    );
}

#[test]
fn manifest_examples_get_the_file_mode_content_checks() {
    let job = manifest_job();
    // An annotation with label 9 of 4 classes, reached through the validation manifest.
    let masks = job.channel("validation").join("masks");
    let first = common::files(&masks).remove(0);
    common::write_gray_png(&masks.join(&first), 64, 48, &[9; 64 * 48]);
    let failure = job.check_fails();
    assert!(
        failure.contains("annotations in 'validation.manifest' hold labels >= num_classes (4)")
            && failure.contains(&first),
        "{failure}"
    );
}
