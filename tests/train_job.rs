//! `semseg train` end to end: the real binary on a synthetic dataset in a temporary ml-root, on the CPU.
//!
//! Trainings are serialised (one at a time) so each gets the machine's cores; sizes are small enough for CI.

mod common;

use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{text, Job, BIN};

/// One training at a time: they each use every core.
static CORES: Mutex<()> = Mutex::new(());

const SYNTH: &[&str] = &[
    "--train-count",
    "24",
    "--validation-count",
    "8",
    "--width",
    "64",
    "--height",
    "48",
];

/// The issue's target for the three heads' validation mIOU.
const MIN_MIOU: f64 = 0.80;
/// The recipe that reaches it on the CPU in two to three minutes per head (2 cores): 96×72 images, so the shapes span
/// several output-stride-8 cells (on 64×48 images even a perfect stride-8 map, bilinearly upsampled, scores only
/// about 0.83 on this data; on 96×72, 0.95), crops of 64, learning rate 0.05, 30 epochs (PSPNet, slower to start,
/// 40: with 30 it ended at 0.82–0.86 over three seeds, with 40 at 0.86).
const QUALITY_SYNTH: &[&str] = &[
    "--seed",
    "5",
    "--train-count",
    "24",
    "--validation-count",
    "8",
    "--width",
    "96",
    "--height",
    "72",
];
const QUALITY_EPOCHS: u32 = 30;
const PSP_QUALITY_EPOCHS: u32 = 40;

/// A job on the larger dataset with the recipe above.
fn quality_job(algorithm: &str, epochs: u32) -> Job {
    let job = Job::empty();
    job.synth(QUALITY_SYNTH);
    job.write_hyperparameters(&format!(
        r#"{{"num_classes": "4", "num_training_samples": "24", "backbone": "resnet-18", "algorithm": "{algorithm}",
            "use_pretrained_model": "False", "crop_size": "64", "base_size": "96", "epochs": "{epochs}",
            "mini_batch_size": "4", "validation_mini_batch_size": "1", "learning_rate": "0.05",
            "output_stride": "8", "seed": "1"}}"#
    ));
    job
}

/// A small, quick job (64×48 images, crop 48) for the tests of the job's mechanics.
fn small_job(algorithm: &str, epochs: u32, extra: &str) -> Job {
    let job = Job::empty();
    let mut args = vec!["--seed", "5"];
    args.extend(SYNTH);
    job.synth(&args);
    job.write_hyperparameters(&format!(
        r#"{{"num_classes": "4", "num_training_samples": "24", "backbone": "resnet-18", "algorithm": "{algorithm}",
            "use_pretrained_model": "False", "crop_size": "48", "base_size": "64", "epochs": "{epochs}",
            "mini_batch_size": "4", "validation_mini_batch_size": "1", "learning_rate": "0.02",
            "output_stride": "8", "seed": "1"{extra}}}"#
    ));
    job
}

fn train(job: &Job) -> String {
    let _cores = CORES.lock().unwrap_or_else(|p| p.into_inner());
    let out = job.run(&["train"]);
    let log = text(&out);
    assert!(
        out.status.success(),
        "train failed: {log}\nfailure: {:?}",
        job.failure()
    );
    assert!(job.failure().is_none());
    log
}

/// The README's MetricDefinitions, applied to a real log: (name, values matched).
fn scrape(log: &str) -> Vec<(String, Vec<f64>)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("<!-- metric-definitions -->")
        .expect("README has metric definitions");
    let block = &readme[start..];
    let json = &block[block.find("```json").unwrap() + 7..];
    let json = &json[..json.find("```").unwrap()];
    let definitions: serde_json::Value = serde_json::from_str(json).unwrap();
    definitions
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let re = regex::Regex::new(d["Regex"].as_str().unwrap()).unwrap();
            let values = re.captures_iter(log).map(|c| c[1].parse::<f64>().unwrap()).collect();
            (d["Name"].as_str().unwrap().to_string(), values)
        })
        .collect()
}

fn best_miou(log: &str) -> f64 {
    let scraped = scrape(log);
    let (_, values) = scraped.iter().find(|(name, _)| name == "validation:mIOU").unwrap();
    values.iter().copied().fold(0.0, f64::max)
}

/// model/ holds the best epoch, loadable, with its hyperparameters and figures in model.json, and scoring the
/// validation channel with it through `semseg predict` gives that epoch's mIOU again; output/data has the reports.
fn assert_artifacts(job: &Job, epochs: u32, best_miou: f64) {
    let model_dir = job.root().join("model");
    let model = semseg::model::artifact::InferenceModel::load(&model_dir, &candle_core::Device::Cpu)
        .expect("the trained artifact loads for inference");
    let meta = model.meta();
    assert_eq!(meta.num_classes, 4);
    assert_eq!(meta.crop_size, Some(64));
    assert_eq!(
        meta.hyperparameters.as_ref().unwrap()["algorithm"],
        meta.algorithm.to_string()
    );
    let metrics = meta.metrics.as_ref().expect("model.json has the saved epoch's metrics");
    assert!(
        (metrics.validation_miou - best_miou).abs() < 1e-5,
        "{metrics:?} vs best {best_miou}"
    );
    assert_eq!(metrics.class_iou.len(), 4);

    // The default precision: strict fp32 on the CPU. Whole-image validation scores through `predict`'s path.
    let rescored = predicted_miou(job, "auto");
    assert!(
        (rescored - metrics.validation_miou).abs() < 1e-9,
        "the saved model scores {rescored}, the best epoch {}",
        metrics.validation_miou
    );

    let history: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(job.root().join("output/data/history.json")).unwrap()).unwrap();
    assert_eq!(history["epochs"].as_array().unwrap().len(), epochs as usize);
    assert!(job.root().join("output/data/class_iou.json").is_file());
    let plot = image::open(job.root().join("output/data/training.png")).expect("training.png is a picture");
    assert_eq!((plot.width(), plot.height()), (640, 400));
    assert!(job.root().join("checkpoints/checkpoint.json").is_file());
}

#[test]
fn fcn_trains_to_a_good_miou_and_logs_scrapable_metrics() {
    let job = quality_job("fcn", QUALITY_EPOCHS);
    let log = train(&job);
    for (name, values) in scrape(&log) {
        assert_eq!(
            values.len(),
            QUALITY_EPOCHS as usize,
            "{name} matched {values:?} in:\n{log}"
        );
        assert!(values.iter().all(|v| v.is_finite() && *v >= 0.0), "{name}: {values:?}");
    }
    let miou = best_miou(&log);
    assert!(miou >= MIN_MIOU, "FCN reached validation mIOU {miou}:\n{log}");
    assert_artifacts(&job, QUALITY_EPOCHS, miou);
}

/// `semseg predict` with the job's saved model over its validation channel, with `--precision PRECISION`: the
/// masks' mIOU.
fn predicted_miou(job: &Job, precision: &str) -> f64 {
    let validation = job.channel("validation");
    let mut images: Vec<String> = common::files(&validation);
    images.retain(|name| name.ends_with(".jpg"));
    let out = job.root().join(format!("predicted-{precision}"));
    let model = job.root().join("model");
    let mut args = vec![
        "predict".to_string(),
        "--precision".into(),
        precision.into(),
        "--model".into(),
        model.display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    args.extend(images.iter().map(|name| validation.join(name).display().to_string()));
    let predicted = common::semseg(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(predicted.status.success(), "{}", text(&predicted));
    let mut confusion = semseg::train::metrics::ConfusionMatrix::new(4);
    for name in &images {
        let stem = name.trim_end_matches(".jpg");
        let truth = semseg::data::annotation::read_annotation(
            &job.channel("validation_annotation").join(format!("{stem}.png")),
        )
        .unwrap();
        let mask = semseg::data::annotation::read_annotation(&out.join(format!("{stem}.png"))).unwrap();
        confusion.update(truth.as_raw(), mask.as_raw());
    }
    confusion.scores().miou
}

/// precision=bf16 on the CPU: with AVX512-BF16 the products run in bf16 and the recipe still reaches the target,
/// and bf16 inference scores the validation set within a point of fp32's; without it, one warning and fp32.
#[test]
fn fcn_trains_and_predicts_in_bf16_on_the_cpu() {
    let job = quality_job("fcn", QUALITY_EPOCHS);
    let hyperparameters = job.root().join("input/config/hyperparameters.json");
    let mut hp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&hyperparameters).unwrap()).unwrap();
    hp["precision"] = "bf16".into();
    std::fs::write(&hyperparameters, hp.to_string()).unwrap();
    let log = train(&job);
    let bf16_here = semseg::model::ops::gemm_bf16::available();
    assert_eq!(log.contains("bf16_products=true"), bf16_here, "{log}");
    assert_eq!(log.contains("needs AVX512-BF16"), !bf16_here, "{log}");
    let miou = best_miou(&log);
    assert!(miou >= MIN_MIOU, "FCN in bf16 reached validation mIOU {miou}:\n{log}");

    let (fp32, bf16) = (predicted_miou(&job, "fp32"), predicted_miou(&job, "bf16"));
    eprintln!("validation mIOU of the bf16-trained model: predicted in fp32 {fp32:.4}, in bf16 {bf16:.4}");
    assert!((fp32 - bf16).abs() < 0.01, "fp32 {fp32} vs bf16 {bf16}");
    if !bf16_here {
        assert_eq!(fp32, bf16, "without AVX512-BF16, bf16 is fp32");
    }
}

#[test]
fn deeplab_trains_to_a_good_miou() {
    let job = quality_job("deeplab", QUALITY_EPOCHS);
    let log = train(&job);
    let miou = best_miou(&log);
    assert!(miou >= MIN_MIOU, "DeepLabV3 reached validation mIOU {miou}:\n{log}");
    assert_artifacts(&job, QUALITY_EPOCHS, miou);
}

#[test]
fn psp_trains_to_a_good_miou() {
    let job = quality_job("psp", PSP_QUALITY_EPOCHS);
    let log = train(&job);
    let miou = best_miou(&log);
    assert!(miou >= MIN_MIOU, "PSPNet reached validation mIOU {miou}:\n{log}");
    assert_artifacts(&job, PSP_QUALITY_EPOCHS, miou);
}

#[test]
fn sigterm_after_epoch_one_then_restart_resumes_at_epoch_two_with_the_same_result() {
    let job = small_job("fcn", 3, "");
    let _cores = CORES.lock().unwrap_or_else(|p| p.into_inner());
    let child = Command::new(BIN)
        .args(["--ml-root", job.root().to_str().unwrap(), "train"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (status, first_log) = common::sigterm_after_first_validation(child);
    assert!(
        status.success(),
        "a SIGTERM'd job exits cleanly: {status:?}\n{first_log}"
    );
    assert!(
        !first_log.contains("#metrics epoch=3"),
        "the job ran on after SIGTERM:\n{first_log}"
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(job.root().join("checkpoints/checkpoint.json")).unwrap())
            .unwrap();
    let done = state["epochs_done"].as_u64().unwrap();
    assert!(
        (1..3).contains(&done),
        "checkpoint after SIGTERM has epochs_done={done}"
    );

    let out = job.run(&["train"]);
    let second_log = text(&out);
    assert!(out.status.success(), "{second_log}");
    assert!(second_log.contains("resuming from the checkpoint"), "{second_log}");
    assert!(
        !second_log.contains("#metrics epoch=1 "),
        "epoch 1 ran again:\n{second_log}"
    );
    assert!(second_log.contains("#metrics epoch=3 validation:mIOU"), "{second_log}");
    let history: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(job.root().join("output/data/history.json")).unwrap()).unwrap();
    let epochs: Vec<u64> = history["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, [1, 2, 3]);

    // Same seed, no interruption: the same weights, bit for bit (data order, augmentation, initial weights and
    // dropout masks are all fixed by the seed, and the checkpoint carries the rest).
    let uninterrupted = small_job("fcn", 3, "");
    let out = uninterrupted.run(&["train"]); // this test already holds CORES
    assert!(out.status.success(), "{}", text(&out));
    let final_tensors = |job: &Job| {
        candle_core::safetensors::load(
            job.root().join("checkpoints/checkpoint-3.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (resumed, straight) = (final_tensors(&job), final_tensors(&uninterrupted));
    assert_eq!(resumed.len(), straight.len());
    for (name, tensor) in &resumed {
        let a: Vec<f32> = tensor.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = straight[name].flatten_all().unwrap().to_vec1().unwrap();
        assert!(a == b, "{name} differs between the resumed and the uninterrupted job");
    }
}

/// SIGKILL while epoch 2's checkpoint is being written (its temporary tensor file exists, not yet synced and
/// renamed): the directory still holds epoch 1's checkpoint, whole; the restarted job
/// resumes from it, ends with every epoch, and its next save removes the half-written file.
#[test]
fn a_kill_during_the_checkpoint_write_leaves_the_previous_checkpoint_whole() {
    let job = small_job("fcn", 3, "");
    let _cores = CORES.lock().unwrap_or_else(|p| p.into_inner());
    let checkpoints = job.root().join("checkpoints");
    let (first, partial) = (
        checkpoints.join("checkpoint-1.safetensors"),
        checkpoints.join("checkpoint-2.safetensors.tmp"),
    );
    let mut child = Command::new(BIN)
        .args(["--ml-root", job.root().to_str().unwrap(), "train"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        // The temporary file appears when the write starts; kill as soon as it has any content.
        if std::fs::metadata(&partial).is_ok_and(|m| m.len() > 0) {
            child.kill().unwrap();
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the job ended ({status}) before epoch 2's checkpoint write was seen");
        }
        assert!(Instant::now() < deadline, "no checkpoint write within 10 minutes");
        std::thread::sleep(Duration::from_micros(200));
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "SIGKILL'd: {status:?}");
    // Still there after the kill: the kill landed while the file was written or synced, before its rename.
    let written = std::fs::metadata(&partial).map(|m| m.len());
    assert!(written.is_ok(), "the kill should land before the write is committed");
    let full_size = std::fs::metadata(&first)
        .expect("epoch 1's tensors are still there")
        .len();
    eprintln!(
        "killed with {} of {full_size} bytes of epoch 2's tensors written",
        written.unwrap()
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(checkpoints.join("checkpoint.json")).unwrap()).unwrap();
    assert_eq!(state["epochs_done"], 1, "checkpoint.json still describes epoch 1");
    assert_eq!(state["tensors_file"], "checkpoint-1.safetensors");
    assert!(!checkpoints.join("checkpoint.json.tmp").exists());

    let out = job.run(&["train"]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("resuming from the checkpoint"), "{log}");
    assert!(!log.contains("#metrics epoch=1 "), "epoch 1 ran again:\n{log}");
    assert!(log.contains("#metrics epoch=3 validation:mIOU"), "{log}");
    assert_eq!(
        common::files(&checkpoints),
        ["checkpoint-3.safetensors", "checkpoint.json"]
    );
}

/// Pack a trained model/ directory as the model channel's model.tar.gz.
fn model_channel_from(trained: &Job, job: &Job) {
    let channel = job.channel("model");
    std::fs::create_dir_all(&channel).unwrap();
    let file = std::fs::File::create(channel.join("model.tar.gz")).unwrap();
    let mut archive = tar::Builder::new(flate2::write::GzEncoder::new(file, flate2::Compression::fast()));
    archive.append_dir_all(".", trained.root().join("model")).unwrap();
    archive.into_inner().unwrap().finish().unwrap();
}

#[test]
fn incremental_training_starts_from_the_model_channel_and_names_mismatches() {
    let trained = small_job("fcn", 1, "");
    train(&trained);

    let job = small_job("fcn", 1, "");
    model_channel_from(&trained, &job);
    let log = train(&job);
    assert!(log.contains("incremental training: weights loaded"), "{log}");

    for (extra, field) in [
        (
            r#", "algorithm": "psp""#,
            "algorithm: the model has fcn, the job has psp",
        ),
        (
            r#", "backbone": "resnet-34""#,
            "backbone: the model has resnet-18, the job has resnet-34",
        ),
        (r#", "crop_size": "56""#, "crop_size: the model has 48, the job has 56"),
    ] {
        let job = small_job("fcn", 1, extra);
        // small_job sets algorithm/backbone/crop_size first; a later duplicate key wins in serde_json.
        model_channel_from(&trained, &job);
        let out = job.run(&["train"]);
        assert!(!out.status.success(), "{extra}: {}", text(&out));
        let failure = job.failure().expect("failure file");
        assert!(failure.contains(field), "{extra}: {failure}");
    }
    let job = small_job("fcn", 1, "");
    job.write_hyperparameters(
        r#"{"num_classes": "5", "num_training_samples": "24", "backbone": "resnet-18", "algorithm": "fcn",
            "use_pretrained_model": "False", "crop_size": "48", "base_size": "64", "epochs": "1",
            "output_stride": "8"}"#,
    );
    model_channel_from(&trained, &job);
    let out = job.run(&["train"]);
    assert!(!out.status.success());
    assert!(
        job.failure()
            .unwrap()
            .contains("num_classes: the model has 4, the job has 5"),
        "{:?}",
        job.failure()
    );
}

#[test]
fn pretrained_weights_load_from_a_channel_or_the_job_says_how_to_provide_them() {
    let job = small_job("fcn", 1, r#", "use_pretrained_model": "True""#);
    let out = Command::new(BIN)
        .args(["--ml-root", job.root().to_str().unwrap(), "train"])
        .env("SEMSEG_PRETRAINED_DIR", job.root().join("nowhere"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let failure = job.failure().expect("failure file");
    assert!(
        failure.contains("use_pretrained_model=True needs ImageNet weights for resnet-18"),
        "{failure}"
    );
    assert!(failure.contains("set use_pretrained_model=False"), "{failure}");

    // torchvision-named ResNet-18 weights (random here: no downloads in tests) in a `pretrained` channel.
    let specs = semseg::model::weights::expected_backbone_tensors(semseg::model::config::Backbone::Resnet18).unwrap();
    let mut tensors = std::collections::HashMap::new();
    for spec in specs {
        let tensor = if spec.name.ends_with("running_var") {
            candle_core::Tensor::ones(spec.shape, candle_core::DType::F32, &candle_core::Device::Cpu)
        } else {
            candle_core::Tensor::randn(0f32, 0.05, spec.shape, &candle_core::Device::Cpu)
        };
        tensors.insert(spec.name, tensor.unwrap());
    }
    let channel = job.channel("pretrained");
    std::fs::create_dir_all(&channel).unwrap();
    candle_core::safetensors::save(&tensors, channel.join("resnet-18.safetensors")).unwrap();
    let log = train(&job);
    assert!(log.contains("ImageNet backbone weights loaded"), "{log}");
}

/// Whole-image validation scores each image as the endpoint answers it: validation images over the inference limit
/// (1 Mpx) run downscaled, their answers upsampled to the annotation's size, so the saved model rescored through
/// `semseg predict` gives the job's validation mIOU exactly. (At its own size, a validation image ran the network on
/// every pixel: tens of GB for a ResNet-50 network at the decoder's 64 Mpx limit.)
#[test]
fn whole_image_validation_of_images_over_a_megapixel_scores_what_predict_answers() {
    let job = Job::empty();
    job.synth(&[
        "--seed",
        "5",
        "--train-count",
        "8",
        "--validation-count",
        "2",
        "--width",
        "1280",
        "--height",
        "960",
    ]);
    job.write_hyperparameters(
        r#"{"num_classes": "4", "num_training_samples": "8", "backbone": "resnet-18", "algorithm": "fcn",
            "use_pretrained_model": "False", "crop_size": "64", "base_size": "96", "epochs": "10",
            "mini_batch_size": "4", "validation_mini_batch_size": "1", "learning_rate": "0.05",
            "output_stride": "8", "seed": "1"}"#,
    );
    let log = train(&job);
    let model = semseg::model::artifact::InferenceModel::load(&job.root().join("model"), &candle_core::Device::Cpu)
        .expect("the trained artifact loads");
    let validated = model.meta().metrics.as_ref().expect("metrics").validation_miou;
    let rescored = predicted_miou(&job, "auto");
    eprintln!("validation mIOU {validated}, rescored through predict {rescored}");
    assert!(
        (rescored - validated).abs() < 1e-9,
        "predict scores {rescored}, validation {validated}:\n{log}"
    );
}

/// A step too large for any machine (ResNet-18 FCN at crop 16384, batch 4: terabytes of activations) fails before
/// training, with the figures and what to lower in output/failure, where the kernel's OOM killer would otherwise end
/// the process with no word. A job that fits logs the bound beside the memory available.
#[test]
fn a_step_that_cannot_fit_in_memory_fails_before_training_and_says_what_to_lower() {
    let job = small_job("fcn", 1, r#", "crop_size": "16384", "base_size": "16384""#);
    let out = job.run(&["train"]);
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    let failure = job.failure().expect("failure file");
    assert!(failure.contains("not enough memory for training"), "{failure}");
    assert!(
        failure.contains("a training step at crop_size 16384 with batches of 4 needs at least"),
        "{failure}"
    );
    assert!(failure.contains("lower crop_size"), "{failure}");
    assert!(!log.contains("#metrics epoch=1 "), "no step ran: {log}");

    let fits = small_job("fcn", 1, "");
    let log = train(&fits);
    assert!(log.contains("memory of a training step"), "{log}");
    assert!(!log.contains("memory is tight"), "{log}");
}

#[test]
fn import_turns_a_torchvision_state_dict_into_a_servable_artifact_and_names_bad_tensors() {
    let trained = small_job("fcn", 1, "");
    train(&trained);
    // A torchvision-named state dict: the trained weights plus PyTorch's num_batches_tracked counters.
    let (_, mut tensors) = semseg::model::artifact::read(&trained.root().join("model")).unwrap();
    tensors.insert(
        "backbone.bn1.num_batches_tracked".into(),
        candle_core::Tensor::zeros((), candle_core::DType::I64, &candle_core::Device::Cpu).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let state_dict = dir.path().join("fcn.safetensors");
    candle_core::safetensors::save(&tensors, &state_dict).unwrap();
    let out = dir.path().join("imported");
    let args = [
        "import",
        "--torchvision",
        state_dict.to_str().unwrap(),
        "--algorithm",
        "fcn",
        "--backbone",
    ];
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["resnet-18", "--num-classes", "4", "--out", out.to_str().unwrap()]);
    let result = common::semseg(&all);
    assert!(result.status.success(), "{}", text(&result));
    semseg::model::artifact::InferenceModel::load(&out, &candle_core::Device::Cpu).expect("imported artifact loads");

    tensors.remove("classifier.4.weight");
    candle_core::safetensors::save(&tensors, &state_dict).unwrap();
    let result = common::semseg(&all);
    assert!(!result.status.success());
    assert!(text(&result).contains("classifier.4.weight"), "{}", text(&result));
}

#[test]
fn the_real_server_serves_a_trained_model_tar_gz_and_stops_on_sigterm() {
    let trained = small_job("fcn", 1, "");
    train(&trained);
    // What SageMaker hosting gives the container: model.tar.gz extracted... or not; serve extracts it itself.
    let serving = Job::empty();
    let model_dir = serving.root().join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    let file = std::fs::File::create(model_dir.join("model.tar.gz")).unwrap();
    let mut archive = tar::Builder::new(flate2::write::GzEncoder::new(file, flate2::Compression::fast()));
    archive.append_dir_all(".", trained.root().join("model")).unwrap();
    archive.into_inner().unwrap().finish().unwrap();

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new(BIN)
        .args(["--ml-root", serving.root().to_str().unwrap(), "serve"])
        .env("SAGEMAKER_BIND_TO_PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let ping = std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| common::http(port, b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").0);
        if ping == Some(200) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/ping never became healthy (last: {ping:?})"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let image = std::fs::read(
        common::files(&trained.channel("validation"))
            .first()
            .map(|n| trained.channel("validation").join(n))
            .unwrap(),
    )
    .unwrap();
    let (status, content_type, body) = common::post_invocation(port, "image/jpeg", Some("image/png"), &image);
    assert_eq!((status, content_type.as_str()), (200, "image/png"));
    let mask = semseg::data::annotation::decode_annotation(&body).expect("a palette PNG of class indices");
    assert_eq!(mask.dimensions(), (64, 48));
    assert!(mask.as_raw().iter().all(|&l| l < 4));

    Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    let stopped = std::time::Instant::now();
    let status = server.wait().unwrap();
    assert!(
        stopped.elapsed() < std::time::Duration::from_secs(30),
        "took {:?} to stop",
        stopped.elapsed()
    );
    assert!(status.success(), "{status:?}");
}
