//! The real containers: `Dockerfile.serve` and a CPU build of `Dockerfile.train`, built offline and run the way
//! SageMaker runs them (`docker run -v ML:/opt/ml IMAGE train`, `docker run -p PORT:8080 IMAGE serve`), and driven by
//! the SageMaker Python SDK's local mode.
//!
//! This machine's Docker engine cannot pull, so the public base images are replaced by local stand-ins that
//! `scripts/make-offline-bases.sh` makes (a debootstrapped Debian with this machine's Rust toolchain and crates; a
//! distroless/cc-like root) and passed as build arguments; everything else is the Dockerfiles as users build them.
//! `scripts/build-test-images.sh` builds them, which compiles semseg inside Docker and takes minutes (`.ci/run`
//! starts it beside cargo's compile).
//!
//! Mandatory when built with `CI=true` or `SEMSEG_EXTERNAL_TESTS=1` (see `build.rs`); otherwise cargo lists them as
//! ignored, with what they need, and `--ignored` runs them. When they run, a missing prerequisite fails them saying
//! which: they never pass without having run.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{text, Job, BIN};

const TRAIN_IMAGE: &str = "semseg-train:ci-cpu";
const SERVE_IMAGE: &str = "semseg-serve:ci";
/// Dockerfile.serve's build stage (compiled crates included), the train image's build base in the tests.
/// The three tags are the ones `scripts/build-test-images.sh` builds.
const BUILD_STAGE_IMAGE: &str = "semseg-build:ci";
const SERVE_IMAGE_MAX_BYTES: u64 = 100_000_000;

/// One container job at a time: each uses every core, and the timings they check stay meaningful.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
static IMAGES: OnceLock<Result<(), String>> = OnceLock::new();

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Fails the test, naming each tool that is missing, unless Docker, root, debootstrap and curl are all here.
fn require_prerequisites() {
    let works = |script: &str| {
        Command::new("sh")
            .args(["-c", script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let missing: Vec<&str> = [
        ("docker info", "a running Docker engine (docker info fails)"),
        ("[ \"$(id -u)\" = 0 ]", "root (to debootstrap the offline base images)"),
        ("command -v debootstrap", "debootstrap (apt-get install debootstrap)"),
        ("command -v curl", "curl"),
    ]
    .into_iter()
    .filter(|(check, _)| !works(check))
    .map(|(_, what)| what)
    .collect();
    assert!(
        missing.is_empty(),
        "the container tests need {}; .ci/run installs what it can",
        missing.join(", ")
    );
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn tail(s: &str, chars: usize) -> &str {
    let start = s.len().saturating_sub(chars);
    let start = (start..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(s.len());
    &s[start..]
}

/// `scripts/build-test-images.sh` makes the three images (it says how); under `.ci/run` it has been building them in
/// the background since the start, and this run waits for it and finds them in Docker's build cache.
fn build_images() -> Result<(), String> {
    let started = Instant::now();
    let out = run(Command::new("bash")
        .arg(repo().join("scripts/build-test-images.sh"))
        .current_dir(repo()));
    if !out.status.success() {
        return Err(format!(
            "scripts/build-test-images.sh failed:\n{}",
            tail(&text(&out), 6000)
        ));
    }
    for tag in [SERVE_IMAGE, BUILD_STAGE_IMAGE, TRAIN_IMAGE] {
        eprintln!("{tag}: {} MB", image_size(tag) / 1_000_000);
    }
    eprintln!("images ready in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Builds the images once per test run, and holds the one-container-job-at-a-time lock.
fn images() -> std::sync::MutexGuard<'static, ()> {
    require_prerequisites();
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = IMAGES.get_or_init(build_images) {
        panic!("{e}");
    }
    guard
}

fn image_size(tag: &str) -> u64 {
    let out = run(Command::new("docker").args(["image", "inspect", "-f", "{{.Size}}", tag]));
    text(&out)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no size for {tag}: {}", text(&out)))
}

/// A small job: a synthetic dataset and a ResNet-18 FCN recipe that trains in seconds.
fn small_job(epochs: u32) -> Job {
    let job = Job::empty();
    job.synth(&[
        "--seed",
        "9",
        "--train-count",
        "8",
        "--validation-count",
        "2",
        "--width",
        "64",
        "--height",
        "48",
    ]);
    job.write_hyperparameters(&format!(
        r#"{{"num_classes": "4", "num_training_samples": "8", "backbone": "resnet-18", "algorithm": "fcn",
            "use_pretrained_model": "False", "crop_size": "48", "base_size": "64", "epochs": "{epochs}",
            "mini_batch_size": "4", "validation_mini_batch_size": "1", "learning_rate": "0.02", "seed": "1"}}"#
    ));
    job
}

fn docker_run_train(ml: &Path) -> Output {
    run(Command::new("docker").args([
        "run",
        "--rm",
        "-v",
        &format!("{}:/opt/ml", ml.display()),
        TRAIN_IMAGE,
        "train",
    ]))
}

fn first_validation_jpeg(job: &Job) -> PathBuf {
    let mut jpegs: Vec<PathBuf> = std::fs::read_dir(job.channel("validation"))
        .expect("validation channel")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    jpegs.sort();
    jpegs.into_iter().next().expect("a validation JPEG")
}

fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    (png.len() >= 24 && png.starts_with(b"\x89PNG\r\n\x1a\n") && &png[12..16] == b"IHDR").then(|| {
        let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        (be(&png[16..20]), be(&png[20..24]))
    })
}

#[test]
#[cfg_attr(
    not(semseg_external_tests),
    ignore = "needs Docker, root and debootstrap; runs under CI=true or SEMSEG_EXTERNAL_TESTS=1, or with --ignored"
)]
fn train_image_trains_on_a_synth_dataset_and_fails_with_the_reason_on_a_bad_hyperparameter() {
    let _images = images();

    let job = small_job(2);
    let out = docker_run_train(job.root());
    let log = text(&out);
    assert!(out.status.success(), "docker run train failed:\n{}", tail(&log, 6000));
    assert!(job.failure().is_none(), "failure file left: {:?}", job.failure());
    let model = job.root().join("model");
    for file in ["model.json", "model.safetensors"] {
        assert!(
            model.join(file).is_file(),
            "model/{file} missing after training:\n{}",
            tail(&log, 3000)
        );
    }
    assert!(
        log.contains("#metrics epoch=2 validation:mIOU="),
        "no epoch-2 metrics line:\n{}",
        tail(&log, 3000)
    );
    // The artifact loads and predicts outside the container.
    let predictions = tempfile::tempdir().expect("tempdir");
    let jpeg = first_validation_jpeg(&job);
    let predicted = run(Command::new(BIN).args([
        "predict",
        "--model",
        model.to_str().expect("utf-8"),
        jpeg.to_str().expect("utf-8"),
        "--out",
        predictions.path().to_str().expect("utf-8"),
    ]));
    assert!(
        predicted.status.success(),
        "predict on the container's model failed: {}",
        text(&predicted)
    );

    let bad = small_job(1);
    bad.write_hyperparameters(r#"{"num_classes": "4", "num_training_samples": "8", "algorithm": "unet"}"#);
    let out = docker_run_train(bad.root());
    assert!(
        !out.status.success(),
        "a bad hyperparameter must fail the job:\n{}",
        text(&out)
    );
    let failure = bad.failure().expect("output/failure written by the container");
    assert!(
        failure.contains("algorithm"),
        "the failure names the hyperparameter: {failure}"
    );
    assert!(!bad.root().join("model/model.safetensors").exists());
}

/// Stops and removes the named container even when the test fails half-way.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn curl(args: &[&str]) -> Output {
    run(Command::new("curl").args(["-s", "--max-time", "60"]).args(args))
}

#[test]
#[cfg_attr(
    not(semseg_external_tests),
    ignore = "needs Docker, root and debootstrap; runs under CI=true or SEMSEG_EXTERNAL_TESTS=1, or with --ignored"
)]
fn serve_image_answers_ping_turns_a_jpeg_into_a_png_mask_and_stops_quickly() {
    let _images = images();

    let size = image_size(SERVE_IMAGE);
    eprintln!("{SERVE_IMAGE}: {} MB", size / 1_000_000);
    assert!(
        size <= SERVE_IMAGE_MAX_BYTES,
        "the serve image is {size} bytes, over the 100 MB target"
    );

    // A model trained by the host binary (the container's own training is tested above).
    let job = small_job(1);
    let trained = job.run(&["train"]);
    assert!(trained.status.success(), "host training failed: {}", text(&trained));

    let name = format!("semseg-ci-serve-{}", std::process::id());
    let container = Container(name.clone());
    let started = Instant::now();
    let out = run(Command::new("docker").args([
        "run",
        "-d",
        "--name",
        &name,
        "-p",
        "127.0.0.1::8080",
        "-v",
        &format!("{}:/opt/ml/model:ro", job.root().join("model").display()),
        SERVE_IMAGE,
        "serve",
    ]));
    assert!(out.status.success(), "docker run serve failed: {}", text(&out));
    let port = text(&run(Command::new("docker").args(["port", &name, "8080/tcp"])));
    let address = port.lines().next().expect("a published port").trim().to_string();

    let ping = format!("http://{address}/ping");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = curl(&["-o", "/dev/null", "-w", "%{http_code}", &ping]);
        if text(&out).trim() == "200" {
            break;
        }
        let logs = text(&run(Command::new("docker").args(["logs", &name])));
        assert!(Instant::now() < deadline, "no 200 on /ping within 60 s; logs:\n{logs}");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "{SERVE_IMAGE}: container start to first 200 on /ping: {:.2} s",
        started.elapsed().as_secs_f64()
    );

    let jpeg = first_validation_jpeg(&job);
    let answer = tempfile::NamedTempFile::new().expect("tempfile");
    let out = curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: image/jpeg",
        "-H",
        "Accept: image/png",
        "--data-binary",
        &format!("@{}", jpeg.display()),
        "-o",
        answer.path().to_str().expect("utf-8"),
        "-w",
        "%{http_code} %{content_type}",
        &format!("http://{address}/invocations"),
    ]);
    assert_eq!(text(&out).trim(), "200 image/png", "POST /invocations");
    let png = std::fs::read(answer.path()).expect("answer");
    let (width, height) = image::image_dimensions(&jpeg).expect("jpeg size");
    assert_eq!(png_size(&png), Some((width, height)), "a PNG mask at the image's size");

    // An undecodable body is a 400 and the container keeps serving.
    let out = curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: image/jpeg",
        "--data-binary",
        "not a jpeg",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{address}/invocations"),
    ]);
    assert_eq!(text(&out).trim(), "400");
    assert_eq!(
        text(&curl(&["-o", "/dev/null", "-w", "%{http_code}", &ping])).trim(),
        "200"
    );

    let stopping = Instant::now();
    let out = run(Command::new("docker").args(["stop", "-t", "30", &name]));
    let took = stopping.elapsed();
    assert!(out.status.success(), "docker stop: {}", text(&out));
    eprintln!("{SERVE_IMAGE}: docker stop took {:.2} s", took.as_secs_f64());
    assert!(
        took < Duration::from_secs(30),
        "docker stop took {took:?}: SIGTERM was not handled"
    );
    let exit = text(&run(Command::new("docker").args([
        "inspect",
        "-f",
        "{{.State.ExitCode}}",
        &name,
    ])));
    assert_eq!(exit.trim(), "0", "serve exits 0 on SIGTERM");
    drop(container);
}

/// The SageMaker Python SDK's local mode drives both images: trains, deploys and predicts, then runs a Batch
/// Transform job (`Transformer`, SingleRecord, `accept="image/png"`) over three JPEGs.
#[test]
#[cfg_attr(
    not(semseg_external_tests),
    ignore = "needs Docker, root, debootstrap and python3 with the SageMaker SDK; runs under CI=true or \
              SEMSEG_EXTERNAL_TESTS=1, or with --ignored"
)]
fn sagemaker_sdk_local_mode_trains_deploys_predicts_and_batch_transforms() {
    let has_sdk = Command::new("python3")
        .args(["-c", "import sagemaker"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_sdk,
        "this test needs python3 with the SageMaker Python SDK: pip install 'sagemaker>=2,<3' (.ci/run does)"
    );
    let _images = images();
    let work = tempfile::tempdir().expect("tempdir");
    let out = run(Command::new("python3")
        .arg(repo().join("scripts/sagemaker-local-mode.py"))
        .args([
            "--train-image",
            TRAIN_IMAGE,
            "--serve-image",
            SERVE_IMAGE,
            "--semseg",
            BIN,
            "--work",
        ])
        .arg(work.path()));
    let log = text(&out);
    assert!(out.status.success(), "local mode failed:\n{}", tail(&log, 8000));
    for line in [
        "trained, deployed and predicted a PNG mask",
        "batch transform wrote a PNG mask of each image",
    ] {
        assert!(log.contains(line), "no '{line}' in the log:\n{}", tail(&log, 3000));
    }

    // Batch Transform's output, checked here too: one `<input>.out` PNG mask per input JPEG, at its size.
    let inputs = work.path().join("transform-input");
    let outputs = work.path().join("transform-output");
    let jpegs = common::files(&inputs);
    assert_eq!(jpegs.len(), 3, "{jpegs:?}");
    let expected: Vec<String> = jpegs.iter().map(|name| format!("{name}.out")).collect();
    assert_eq!(common::files(&outputs), expected);
    for name in &jpegs {
        let out = outputs.join(format!("{name}.out"));
        let mask = image::load_from_memory_with_format(
            &std::fs::read(&out).expect("transform output"),
            image::ImageFormat::Png,
        )
        .unwrap_or_else(|e| panic!("{} is not a PNG: {e}", out.display()));
        let size = image::image_dimensions(inputs.join(name)).expect("jpeg size");
        assert_eq!(
            (mask.width(), mask.height()),
            size,
            "{name}: the mask has the image's size"
        );
    }
}
