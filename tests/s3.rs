//! S3 outside SageMaker, end to end: the real binary against a signature-checking S3 server on loopback (s3s with
//! SimpleAuth over s3s-fs, served in this test process). The server's files are read directly to check what the
//! binary uploaded, and written directly to give it something to download.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{text, BIN};

const ACCESS_KEY: &str = "semsegtestkey";
const SECRET_KEY: &str = "semseg-test-secret-0123456789";

/// One training at a time: each uses every core.
static CORES: Mutex<()> = Mutex::new(());

/// An S3 server on 127.0.0.1 that checks every request's signature against one access key, storing objects as
/// files under `root/<bucket>/<key>`. It runs on its own thread until the test process ends.
struct S3Server {
    port: u16,
    root: tempfile::TempDir,
}

/// Refuses every request to the bucket `private`, as a bucket policy would.
struct DenyPrivateBucket;

#[async_trait::async_trait]
impl s3s::access::S3Access for DenyPrivateBucket {
    async fn check(&self, cx: &mut s3s::access::S3AccessContext<'_>) -> s3s::S3Result<()> {
        if cx.credentials().is_none() {
            return Err(s3s::s3_error!(AccessDenied, "Signature is required"));
        }
        match cx.s3_path().get_bucket_name() {
            Some("private") => Err(s3s::s3_error!(AccessDenied, "Access Denied")),
            _ => Ok(()),
        }
    }
}

impl S3Server {
    fn start(buckets: &[&str]) -> S3Server {
        let root = tempfile::tempdir().expect("tempdir");
        for bucket in buckets {
            std::fs::create_dir_all(root.path().join(bucket)).expect("bucket dir");
        }
        let (ready, port) = std::sync::mpsc::channel();
        let fs_root = root.path().to_path_buf();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let mut builder = s3s::service::S3ServiceBuilder::new(s3s_fs::FileSystem::new(&fs_root).expect("fs"));
                builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
                builder.set_access(DenyPrivateBucket);
                let service = builder.build();
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
                ready
                    .send(listener.local_addr().expect("addr").port())
                    .expect("send port");
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let service = service.clone();
                    tokio::spawn(async move {
                        let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        let port = port.recv_timeout(Duration::from_secs(10)).expect("server started");
        S3Server { port, root }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The file holding `s3://bucket/key`.
    fn object(&self, bucket: &str, key: &str) -> PathBuf {
        self.root.path().join(bucket).join(key)
    }

    /// Put a local directory's files under `s3://bucket/prefix/` (written straight into the server's store).
    fn put_dir(&self, local: &Path, bucket: &str, prefix: &str) {
        let dest = self.object(bucket, prefix);
        std::fs::create_dir_all(&dest).expect("prefix dir");
        for entry in std::fs::read_dir(local).expect("read dir") {
            let entry = entry.expect("entry");
            if entry.file_type().expect("type").is_dir() {
                self.put_dir(
                    &entry.path(),
                    bucket,
                    &format!("{prefix}/{}", entry.file_name().to_string_lossy()),
                );
            } else {
                std::fs::copy(entry.path(), dest.join(entry.file_name())).expect("copy");
            }
        }
    }
}

/// `semseg <args>` with the AWS environment pointing at `endpoint` with these credentials, and nothing from the
/// machine's own AWS configuration.
fn semseg_s3(endpoint: &str, secret: &str, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_remove("SEMSEG_ML_ROOT")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_ENDPOINT_URL_S3")
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
    command
}

fn run(command: &mut Command) -> Output {
    command.output().expect("run semseg")
}

const CHANNELS: [&str; 5] = [
    "train",
    "validation",
    "train_annotation",
    "validation_annotation",
    "label_map",
];

/// A synthetic dataset on the server under `s3://data/<prefix>/<channel>/`, and an ml-root with only the
/// hyperparameters (2 epochs of a small ResNet-18 FCN).
fn dataset_on_s3(server: &S3Server, prefix: &str) -> common::Job {
    let source = common::Job::empty();
    source.synth(&[
        "--seed",
        "5",
        "--train-count",
        "6",
        "--validation-count",
        "3",
        "--width",
        "64",
        "--height",
        "48",
    ]);
    for channel in CHANNELS {
        if source.channel(channel).is_dir() {
            server.put_dir(&source.channel(channel), "data", &format!("{prefix}/{channel}"));
        }
    }
    let job = common::Job::empty();
    job.write_hyperparameters(
        r#"{"num_classes": "4", "num_training_samples": "6", "backbone": "resnet-18", "algorithm": "fcn",
            "use_pretrained_model": "False", "crop_size": "48", "base_size": "64", "epochs": "2",
            "mini_batch_size": "2", "validation_mini_batch_size": "1", "learning_rate": "0.02",
            "output_stride": "8", "seed": "1"}"#,
    );
    job
}

fn channel_args(prefix: &str) -> Vec<String> {
    CHANNELS
        .iter()
        .flat_map(|c| ["--channel".to_string(), format!("{c}=s3://data/{prefix}/{c}/")])
        .collect()
}

/// The sorted entry names of a .tar.gz.
fn tar_names(path: &Path) -> Vec<String> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut names: Vec<String> = archive
        .entries()
        .expect("entries")
        .map(|e| e.expect("entry").path().expect("path").to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// One entry's contents from a .tar.gz.
fn tar_entry(path: &Path, name: &str) -> String {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(std::fs::File::open(path).expect("open")));
    for entry in archive.entries().expect("entries") {
        let mut entry = entry.expect("entry");
        if entry.path().expect("path").to_string_lossy() == name {
            let mut text = String::new();
            entry.read_to_string(&mut text).expect("read");
            return text;
        }
    }
    panic!("no {name} in {}", path.display())
}

/// Staging, artifact upload (multipart with 5 MiB parts), checkpoint mirroring, and spot-style resume: a first run is
/// stopped by SIGTERM after epoch 1; its local checkpoints are wiped; the rerun transfers no channel object again,
/// restores the checkpoint from S3 and trains epoch 2 only.
#[test]
fn train_stages_channels_uploads_artifacts_and_resumes_from_s3_checkpoints() {
    let server = S3Server::start(&["data", "out", "ckpt"]);
    let job = dataset_on_s3(&server, "job1");
    let root = job.root().to_str().unwrap().to_string();
    let mut args: Vec<String> = vec!["--ml-root".into(), root.clone(), "train".into()];
    args.extend(channel_args("job1"));
    args.extend(
        [
            "--output",
            "s3://out/run1/",
            "--checkpoints",
            "s3://ckpt/run1/",
            "--s3-part-size-mib",
            "5",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let _cores = CORES.lock().unwrap_or_else(|p| p.into_inner());
    let child = semseg_s3(&server.endpoint(), SECRET_KEY, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let (status, first_log) = common::sigterm_after_first_validation(child);
    assert!(status.success(), "{first_log}");
    for channel in CHANNELS {
        let staged = job.channel(channel);
        assert!(staged.is_dir(), "{channel} was not staged:\n{first_log}");
        let source = server.object("data", &format!("job1/{channel}"));
        assert_eq!(common::files(&staged), common::files(&source), "{channel}");
    }
    assert!(!first_log.contains(" 0 objects transferred"), "{first_log}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(job.root().join("input/config/inputdataconfig.json")).unwrap()).unwrap();
    assert_eq!(config["train"]["TrainingInputMode"], "File", "{config}");

    // The checkpoint on S3 is byte for byte the local one, the 95 MB tensor file uploaded in 5 MiB parts.
    let local_state = std::fs::read(job.root().join("checkpoints/checkpoint.json")).unwrap();
    let state: serde_json::Value = serde_json::from_slice(&local_state).unwrap();
    assert_eq!(state["epochs_done"], 1, "{first_log}");
    let tensors = state["tensors_file"].as_str().unwrap();
    assert_eq!(
        std::fs::read(server.object("ckpt", "run1/checkpoint.json")).unwrap(),
        local_state
    );
    let local_tensors = std::fs::read(job.root().join("checkpoints").join(tensors)).unwrap();
    assert!(
        local_tensors.len() > 3 * 5 * 1024 * 1024,
        "{} bytes",
        local_tensors.len()
    );
    assert!(std::fs::read(server.object("ckpt", &format!("run1/{tensors}"))).unwrap() == local_tensors);
    // The artifacts as SageMaker packs them.
    let model_archive = server.object("out", "run1/model.tar.gz");
    assert_eq!(
        tar_names(&model_archive),
        ["model.json", "model.safetensors"],
        "{first_log}"
    );
    assert!(std::fs::metadata(&model_archive).unwrap().len() > 5 * 1024 * 1024);
    assert!(tar_names(&server.object("out", "run1/output.tar.gz")).contains(&"history.json".to_string()));

    // Spot-style restart on a fresh disk: no local checkpoint, the channels still staged.
    std::fs::remove_dir_all(job.root().join("checkpoints")).unwrap();
    let out = run(&mut semseg_s3(&server.endpoint(), SECRET_KEY, &args));
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert_eq!(log.matches(": 0 objects transferred").count(), CHANNELS.len(), "{log}");
    assert!(log.contains("restored the checkpoint from s3://ckpt/run1/"), "{log}");
    assert!(log.contains("resuming from the checkpoint"), "{log}");
    assert!(!log.contains("#metrics epoch=1 "), "{log}");
    assert!(log.contains("#metrics epoch=2 "), "{log}");
    let remote_state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(server.object("ckpt", "run1/checkpoint.json")).unwrap()).unwrap();
    assert_eq!(remote_state["epochs_done"], 2);
    let new_tensors = remote_state["tensors_file"].as_str().unwrap();
    assert!(server.object("ckpt", &format!("run1/{new_tensors}")).is_file());
    assert!(
        !server.object("ckpt", &format!("run1/{tensors}")).exists(),
        "the superseded checkpoint stays on S3"
    );
    let history = tar_entry(&server.object("out", "run1/output.tar.gz"), "history.json");
    assert!(history.contains("\"epoch\": 2"), "{history}");
}

/// A job whose channel cannot be staged fails naming the bucket and prefix, and its failure file still reaches S3
/// inside output.tar.gz.
#[test]
fn a_failed_job_still_uploads_its_failure() {
    let server = S3Server::start(&["data", "out"]);
    let job = dataset_on_s3(&server, "present");
    let root = job.root().to_str().unwrap();
    let out = run(&mut semseg_s3(
        &server.endpoint(),
        SECRET_KEY,
        &[
            "--ml-root",
            root,
            "train",
            "--channel",
            "train=s3://data/absent/",
            "--output",
            "s3://out/failed/",
        ],
    ));
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    let failure = job.failure().expect("output/failure");
    assert!(failure.contains("no objects under s3://data/absent/"), "{failure}");
    let archive = server.object("out", "failed/output.tar.gz");
    assert_eq!(tar_names(&archive), ["failure"], "{log}");
    assert!(tar_entry(&archive, "failure").contains("s3://data/absent/"));
    assert!(!server.object("out", "failed/model.tar.gz").exists());
}

/// A small untrained model artifact, packed as training uploads it, at `s3://models/<key>`.
fn model_on_s3(server: &S3Server, key: &str) {
    use semseg::model::artifact::{save_varmap, ModelMeta};
    use semseg::model::config::{Algorithm, Backbone, ModelConfig, OutputStride};
    let config = ModelConfig::new(Algorithm::Fcn, Backbone::Resnet18, 3, OutputStride::Eight, false).unwrap();
    let varmap = candle_nn::VarMap::new();
    semseg::model::SegmentationModel::new(
        &config,
        candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &candle_core::Device::Cpu),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_varmap(dir.path(), &ModelMeta::new(&config), &varmap).unwrap();
    let entries = semseg::storage::artifacts::files_under(dir.path()).unwrap();
    let dest = server.object("models", key);
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    semseg::storage::artifacts::pack(&entries, &dest).unwrap();
}

/// GET /ping's status, or `None` while nothing listens.
fn ping(port: u16) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET /ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn serve_predict_and_export_fetch_their_model_from_s3() {
    let server = S3Server::start(&["models"]);
    model_on_s3(&server, "run1/model.tar.gz");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = semseg_s3(
        &server.endpoint(),
        SECRET_KEY,
        &[
            "serve",
            "--model",
            "s3://models/run1/model.tar.gz",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--workers",
            "1",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn serve");
    let started = Instant::now();
    let mut status = None;
    while started.elapsed() < Duration::from_secs(120) && status != Some(200) {
        if let Ok(Some(exit)) = child.try_wait() {
            panic!("serve exited early: {exit:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
        status = ping(port);
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, Some(200), "serve never answered /ping with 200");

    // predict takes the same address, here a prefix holding the tarball.
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("scene.png");
    image::RgbImage::from_fn(40, 30, |x, _| image::Rgb([(x * 6) as u8, 90, 30]))
        .save(&image)
        .unwrap();
    let out_dir = work.path().join("masks");
    let out = run(&mut semseg_s3(
        &server.endpoint(),
        SECRET_KEY,
        &[
            "predict",
            "--model",
            "s3://models/run1/",
            "--out",
            out_dir.to_str().unwrap(),
            image.to_str().unwrap(),
        ],
    ));
    assert!(out.status.success(), "{}", text(&out));
    let mask = image::open(out_dir.join("scene.png")).unwrap();
    assert_eq!((mask.width(), mask.height()), (40, 30));

    // export reads the same address (a tarball, extracted in the fetched copy) and writes a whole ONNX file.
    let onnx = work.path().join("model.onnx");
    let out = run(&mut semseg_s3(
        &server.endpoint(),
        SECRET_KEY,
        &[
            "export",
            "--model",
            "s3://models/run1/model.tar.gz",
            "--out",
            onnx.to_str().unwrap(),
        ],
    ));
    assert!(out.status.success(), "{}", text(&out));
    let bytes = std::fs::read(&onnx).unwrap();
    assert!(
        bytes.len() > 1_000_000,
        "an ONNX file holding the ResNet's weights: {} bytes",
        bytes.len()
    );
}

/// `predict --model s3://...` fails before loading anything: the quickest way to see each error's message.
fn predict_error(endpoint: &str, secret: &str, model: &str) -> (String, Duration) {
    let started = Instant::now();
    let out = run(&mut semseg_s3(
        endpoint,
        secret,
        &["predict", "--model", model, "--out", "/nonexistent", "x.png"],
    ));
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    (log, started.elapsed())
}

#[test]
fn errors_name_the_bucket_and_key() {
    let server = S3Server::start(&["models", "private"]);
    model_on_s3(&server, "ok/model.tar.gz");
    std::fs::write(server.object("private", "model.tar.gz"), b"secret").unwrap();
    let endpoint = server.endpoint();

    let (log, _) = predict_error(&endpoint, SECRET_KEY, "s3://nobucket/run/model.tar.gz");
    assert!(log.contains("the bucket 'nobucket' does not exist"), "{log}");

    let (log, _) = predict_error(&endpoint, SECRET_KEY, "s3://models/run/missing.tar.gz");
    assert!(
        log.contains("no object s3://models/run/missing.tar.gz (NoSuchKey"),
        "{log}"
    );

    let (log, _) = predict_error(&endpoint, SECRET_KEY, "s3://private/model.tar.gz");
    assert!(log.contains("access denied to s3://private/model.tar.gz"), "{log}");

    // The server checks signatures: the right key id with a wrong secret is refused, naming the object.
    let (log, _) = predict_error(&endpoint, "not-the-secret", "s3://models/ok/model.tar.gz");
    assert!(
        log.contains("the S3 credentials were rejected (SignatureDoesNotMatch")
            && log.contains("s3://models/ok/model.tar.gz"),
        "{log}"
    );

    // Nothing listens on port 1: bounded retries, then a message naming the endpoint and the object.
    let (log, elapsed) = predict_error("http://127.0.0.1:1", SECRET_KEY, "s3://models/ok/model.tar.gz");
    assert!(
        log.contains("cannot reach the S3 endpoint http://127.0.0.1:1 for s3://models/ok/model.tar.gz"),
        "{log}"
    );
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");

    let (log, _) = predict_error(&endpoint, SECRET_KEY, "s3://Not_A_Bucket/x");
    assert!(
        log.contains("'s3://Not_A_Bucket/x' is not a usable S3 address"),
        "{log}"
    );
}

/// A File-mode manifest whose lines reference S3 objects: `semseg check` downloads each object once under
/// `input/s3-refs/<bucket>/<key>` and checks it like any local file; a rerun fetches nothing (the server's copy is
/// deleted and the check still passes); a reference to a missing object fails naming the manifest line and the key.
#[test]
fn manifest_references_on_s3_are_fetched_and_checked() {
    let server = S3Server::start(&["data"]);
    let job = dataset_on_s3(&server, "m");
    let root = job.root().to_str().unwrap();
    let objects = |channel: &str| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(server.object("data", &format!("m/{channel}")))
            .expect("objects")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    for (split, annotations) in [("train", "train_annotation"), ("validation", "validation_annotation")] {
        let annotation_names = objects(annotations);
        let lines: Vec<String> = objects(split)
            .iter()
            .map(|image| {
                let stem = image.rsplit_once('.').map_or(image.as_str(), |(s, _)| s);
                let annotation = annotation_names
                    .iter()
                    .find(|a| a.starts_with(&format!("{stem}.")))
                    .expect("annotation of the same stem");
                format!(
                    r#"{{"source-ref": "s3://data/m/{split}/{image}", "mask-ref": "s3://data/m/{annotations}/{annotation}", "mask-ref-metadata": {{"job-name": "labeling"}}}}"#
                )
            })
            .collect();
        std::fs::create_dir_all(job.channel(split)).expect("channel dir");
        std::fs::write(
            job.channel(split).join(format!("{split}.manifest")),
            lines.join("\n") + "\n",
        )
        .expect("manifest");
    }
    let check = || {
        run(&mut semseg_s3(
            &server.endpoint(),
            SECRET_KEY,
            &["--ml-root", root, "check"],
        ))
    };

    let out = check();
    assert!(out.status.success(), "{}", text(&out));
    let staged = job.root().join("input/s3-refs/data/m/train");
    assert_eq!(
        std::fs::read_dir(&staged).expect("staged objects").count(),
        objects("train").len()
    );

    // Everything is local now: the same check passes with the bucket's copies gone.
    let first_image = objects("train")[0].clone();
    std::fs::remove_file(server.object("data", &format!("m/train/{first_image}"))).expect("remove object");
    let out = check();
    assert!(out.status.success(), "{}", text(&out));

    // A reference to an object that is not there names the manifest line and the key.
    let manifest = job.channel("validation").join("validation.manifest");
    let mut text_lines = std::fs::read_to_string(&manifest).expect("manifest");
    text_lines.push_str(r#"{"source-ref": "s3://data/m/validation/absent.jpg", "mask-ref": "s3://data/m/validation_annotation/absent.png"}"#);
    text_lines.push('\n');
    std::fs::write(&manifest, text_lines).expect("manifest");
    let out = check();
    assert!(!out.status.success(), "{}", text(&out));
    let failure = job.failure().expect("output/failure");
    assert!(failure.contains("validation.manifest"), "{failure}");
    assert!(failure.contains("s3://data/m/validation/absent.jpg"), "{failure}");
}
