//! Pipe mode end to end: the real binary reads augmented-manifest RecordIO streams from FIFOs that a feeder thread
//! creates and fills epoch after epoch, as the SageMaker platform does: `<channel>_<n>` appears only once
//! `<channel>_<n-1>` has been drained and closed by the job.

mod common;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{text, Job, BIN};
use semseg::data::recordio::RecordWriter;

/// One training at a time: they each use every core.
static CORES: Mutex<()> = Mutex::new(());

const PIPE_CONFIG: &str = r#"{
    "train": {"TrainingInputMode": "Pipe", "ContentType": "application/x-recordio", "RecordWrapperType": "RecordIO",
              "AttributeNames": ["source-ref", "city-streets-ref"]},
    "validation": {"TrainingInputMode": "Pipe", "ContentType": "application/x-recordio",
                   "RecordWrapperType": "RecordIO", "AttributeNames": ["source-ref", "city-streets-ref"]}
}"#;

/// A synthetic dataset (`semseg synth`) outside the ml-root, framed as the platform would stream it.
struct Streams {
    _dir: tempfile::TempDir,
    train: Vec<u8>,
    validation: Vec<u8>,
    /// Byte offset of every record in `train`.
    train_offsets: Vec<usize>,
}

fn streams(synth: &[&str]) -> Streams {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["synth", "--out", dir.path().to_str().unwrap()];
    args.extend(synth);
    let out = common::semseg(&args);
    assert!(out.status.success(), "synth failed: {}", text(&out));
    let (train, train_offsets) = frame(&dir.path().join("train"), &dir.path().join("train_annotation"));
    let (validation, _) = frame(
        &dir.path().join("validation"),
        &dir.path().join("validation_annotation"),
    );
    Streams {
        _dir: dir,
        train,
        validation,
        train_offsets,
    }
}

/// Per image (sorted by name), its bytes then its annotation's, as RecordIO records (dmlc's splitting writer, so
/// records that contain the magic number arrive in parts); with the offset of every record.
fn frame(images: &Path, annotations: &Path) -> (Vec<u8>, Vec<usize>) {
    let (mut stream, mut offsets) = (Vec::new(), Vec::new());
    for name in common::files(images) {
        let stem = name.rsplit_once('.').unwrap().0;
        for path in [images.join(&name), annotations.join(format!("{stem}.png"))] {
            offsets.push(stream.len());
            let mut writer = RecordWriter::dmlc_splitting(Vec::new());
            writer.write_record(&std::fs::read(path).unwrap()).unwrap();
            stream.extend(writer.into_inner());
        }
    }
    (stream, offsets)
}

/// The platform's side of Pipe mode for one channel, on a thread: for n = 0, 1, ... while `stream(n)` gives bytes,
/// create the FIFO `<channel>_<n>`, write the bytes once the job opens it, close it, wait until the job has closed its
/// end too, remove it, go on.
struct Feeder {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<usize>>,
}

impl Feeder {
    fn start(data_dir: &Path, channel: &str, stream: impl Fn(usize) -> Option<Vec<u8>> + Send + 'static) -> Self {
        std::fs::create_dir_all(data_dir).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, data_dir, channel) = (stop.clone(), data_dir.to_path_buf(), channel.to_string());
        let handle = std::thread::spawn(move || {
            let mut drained = 0;
            for n in 0.. {
                let Some(bytes) = stream(n) else { break };
                let fifo = data_dir.join(format!("{channel}_{n}"));
                make_fifo(&fifo);
                let Some(mut file) = open_writer(&fifo, &flag) else {
                    break;
                };
                // EPIPE when the job stops reading early (SIGTERM, an error): the next reading starts anew.
                if file.write_all(&bytes).is_ok() {
                    drained += 1;
                }
                drop(file);
                wait_until_closed(&fifo, &flag);
                let _ = std::fs::remove_file(&fifo);
            }
            drained
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }

    /// Stop feeding; the number of streams written whole.
    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().unwrap().join().unwrap()
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

fn make_fifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {}: {}", path.display(), std::io::Error::last_os_error());
}

/// The FIFO's write end once a reader has opened it (ENXIO until then), in blocking mode; `None` when stopped.
fn open_writer(fifo: &Path, stop: &AtomicBool) -> Option<std::fs::File> {
    loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo)
        {
            Ok(file) => {
                use std::os::fd::AsRawFd;
                // SAFETY: fcntl on an open descriptor.
                unsafe {
                    let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
                    libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
                }
                return Some(file);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {}
            Err(e) => panic!("opening {}: {e}", fifo.display()),
        }
        if stop.load(Ordering::SeqCst) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Wait until no reader has the FIFO open (the job drained and closed it).
fn wait_until_closed(fifo: &Path, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo)
        {
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return,
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Feed `epochs` copies of each split's stream.
fn feed_both(job: &Job, streams: &Streams, epochs: usize) -> (Feeder, Feeder) {
    let (train, validation) = (streams.train.clone(), streams.validation.clone());
    (
        Feeder::start(&job.data_dir(), "train", move |n| (n < epochs).then(|| train.clone())),
        Feeder::start(&job.data_dir(), "validation", move |n| {
            (n < epochs).then(|| validation.clone())
        }),
    )
}

fn pipe_job(hyperparameters: &str) -> Job {
    let job = Job::empty();
    std::fs::create_dir_all(job.data_dir()).unwrap();
    job.write_config("inputdataconfig.json", PIPE_CONFIG);
    job.write_hyperparameters(hyperparameters);
    job
}

fn run_with_wait(job: &Job, wait_secs: &str) -> Output {
    Command::new(BIN)
        .args(["--ml-root", job.root().to_str().unwrap(), "train"])
        .env("SEMSEG_PIPE_WAIT_SECS", wait_secs)
        .env_remove("SEMSEG_ML_ROOT")
        .output()
        .unwrap()
}

fn best_miou(log: &str) -> f64 {
    let re = regex::Regex::new(r"validation:mIOU=([0-9.]+)").unwrap();
    re.captures_iter(log)
        .map(|c| c[1].parse::<f64>().unwrap())
        .fold(0.0, f64::max)
}

/// The CI quality recipe of tests/train_job.rs (96×72 synth, 24 + 8 images, crop 64, batch 4, SGD, lr 0.05, poly,
/// 30 epochs, FCN ResNet-18), streamed instead of read from files: the same bar, validation mIOU >= 0.80.
#[test]
fn pipe_mode_trains_to_the_file_mode_quality() {
    let data = streams(&[
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
    ]);
    const EPOCHS: usize = 30;
    let job = pipe_job(&format!(
        r#"{{"num_classes": "4", "num_training_samples": "24", "backbone": "resnet-18", "algorithm": "fcn",
            "use_pretrained_model": "False", "crop_size": "64", "base_size": "96", "epochs": "{EPOCHS}",
            "mini_batch_size": "4", "validation_mini_batch_size": "1", "learning_rate": "0.05",
            "output_stride": "8", "seed": "1"}}"#
    ));
    let _cores = CORES.lock().unwrap_or_else(|p| p.into_inner());
    let (train, validation) = feed_both(&job, &data, EPOCHS);
    let started = Instant::now();
    let out = run_with_wait(&job, "60");
    let log = text(&out);
    assert!(out.status.success(), "{log}\nfailure: {:?}", job.failure());
    let miou = best_miou(&log);
    eprintln!(
        "Pipe-mode FCN: best validation mIOU {miou:.4} in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    assert!(miou >= 0.80, "Pipe mode reached validation mIOU {miou}:\n{log}");
    assert_eq!(
        log.matches("validation:mIOU=").count(),
        EPOCHS,
        "one validation per epoch"
    );
    assert_eq!(train.finish(), EPOCHS, "one train FIFO per epoch, each drained");
    assert_eq!(
        validation.finish(),
        EPOCHS,
        "one validation FIFO per epoch, each drained"
    );
    assert!(job.root().join("model/model.json").is_file());
}

const SMALL: &[&str] = &[
    "--seed",
    "5",
    "--train-count",
    "12",
    "--validation-count",
    "4",
    "--width",
    "64",
    "--height",
    "48",
];

fn small_hyperparameters(epochs: u32) -> String {
    format!(
        r#"{{"num_classes": "4", "num_training_samples": "12", "backbone": "resnet-18", "algorithm": "fcn",
            "use_pretrained_model": "False", "crop_size": "48", "base_size": "64", "epochs": "{epochs}",
            "mini_batch_size": "4", "validation_mini_batch_size": "1", "learning_rate": "0.02",
            "output_stride": "8", "seed": "1"}}"#
    )
}

/// SIGTERM once epoch 1 is validated and checkpointed; the restarted job (a new container: FIFOs numbered from 0
/// again) resumes at epoch 2, reads one stream per remaining epoch, ends with every epoch in its history and with the
/// weights of a job that was never interrupted.
#[test]
fn sigterm_then_restart_resumes_from_the_checkpoint_in_pipe_mode() {
    let data = streams(SMALL);
    let job = pipe_job(&small_hyperparameters(3));
    let _cores = CORES.lock().unwrap_or_else(|p| p.into_inner());
    let (train, validation) = feed_both(&job, &data, 3);
    let child = Command::new(BIN)
        .args(["--ml-root", job.root().to_str().unwrap(), "train"])
        .env("SEMSEG_PIPE_WAIT_SECS", "60")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (status, first_log) = common::sigterm_after_first_validation(child);
    assert!(
        status.success(),
        "a SIGTERM'd job exits cleanly: {status:?}\n{first_log}"
    );
    assert!(!first_log.contains("#metrics epoch=3"), "{first_log}");
    train.finish();
    validation.finish();
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(job.root().join("checkpoints/checkpoint.json")).unwrap())
            .unwrap();
    let done = state["epochs_done"].as_u64().unwrap() as usize;
    assert!((1..3).contains(&done), "epochs_done={done}");

    // A new container: no FIFOs left over, the platform starts again at _0.
    for entry in std::fs::read_dir(job.data_dir()).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let (train, validation) = feed_both(&job, &data, 3 - done);
    let out = run_with_wait(&job, "60");
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("resuming from the checkpoint"), "{log}");
    assert!(!log.contains("#metrics epoch=1 "), "epoch 1 ran again:\n{log}");
    assert!(log.contains("#metrics epoch=3 validation:mIOU"), "{log}");
    assert_eq!(train.finish(), 3 - done, "the restart read train_0..: {log}");
    assert_eq!(validation.finish(), 3 - done);
    let history: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(job.root().join("output/data/history.json")).unwrap()).unwrap();
    let epochs: Vec<u64> = history["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, [1, 2, 3]);

    // The same streams without the interruption: the same weights, bit for bit (the shuffle and the transforms are
    // seeded by (seed, epoch), whichever FIFO an epoch came from).
    let uninterrupted = pipe_job(&small_hyperparameters(3));
    let (train, validation) = feed_both(&uninterrupted, &data, 3);
    let out = run_with_wait(&uninterrupted, "60");
    assert!(out.status.success(), "{}", text(&out));
    train.finish();
    validation.finish();
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

/// Run a one-epoch job whose train channel streams `train` (validation streams its whole data) and return the failure
/// file; the job must fail quickly.
fn failure_with_train_stream(data: &Streams, train: Vec<u8>) -> String {
    let job = pipe_job(&small_hyperparameters(1));
    let validation = data.validation.clone();
    let _feeders = (
        Feeder::start(&job.data_dir(), "train", move |n| (n == 0).then(|| train.clone())),
        Feeder::start(&job.data_dir(), "validation", move |n| {
            (n == 0).then(|| validation.clone())
        }),
    );
    let started = Instant::now();
    let out = run_with_wait(&job, "20");
    assert!(!out.status.success(), "the job should fail: {}", text(&out));
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "took {:?}",
        started.elapsed()
    );
    job.failure()
        .unwrap_or_else(|| panic!("no failure file: {}", text(&out)))
}

#[test]
fn truncated_corrupt_and_odd_streams_fail_naming_channel_epoch_record_and_offset() {
    let data = streams(SMALL);
    let offsets = &data.train_offsets;
    let _cores = CORES.lock().unwrap_or_else(|p| p.into_inner());

    // Truncated in the middle of record 5 (the annotation of manifest line 3).
    let cut = offsets[5] + 20;
    let failure = failure_with_train_stream(&data, data.train[..cut].to_vec());
    for want in [
        "channel 'train', epoch 1",
        "train_0",
        &format!(
            "record 5 (counting from 0; manifest line 3) starting at byte {}",
            offsets[5]
        ),
        "truncated RecordIO stream",
    ] {
        assert!(failure.contains(want), "{want:?} not in: {failure}");
    }

    // Record 4 (the image of manifest line 3) is not an image: the framing is intact, its bytes are not a picture.
    let mut corrupt = data.train[..offsets[4]].to_vec();
    let mut writer = RecordWriter::new(Vec::new());
    writer.write_record(b"this is not an image, it is text").unwrap();
    corrupt.extend(writer.into_inner());
    corrupt.extend(&data.train[offsets[5]..]);
    let failure = failure_with_train_stream(&data, corrupt);
    for want in [
        "channel 'train', epoch 1",
        "train_0",
        &format!("record 4 (counting from 0) at byte {}", offsets[4]),
        "source-ref of manifest line 3",
        "not a JPEG or PNG image",
    ] {
        assert!(failure.contains(want), "{want:?} not in: {failure}");
    }

    // A damaged header: the magic number of record 2 overwritten.
    let mut damaged = data.train.clone();
    damaged[offsets[2]..offsets[2] + 4].copy_from_slice(b"JUNK");
    let failure = failure_with_train_stream(&data, damaged);
    assert!(
        failure.contains("channel 'train', epoch 1")
            && failure.contains(&format!(
                "record 2 (counting from 0; manifest line 2) starting at byte {}",
                offsets[2]
            ))
            && failure.contains("expected the magic number"),
        "{failure}"
    );

    // An odd number of records: the last annotation is missing.
    let last = *offsets.last().unwrap();
    let failure = failure_with_train_stream(&data, data.train[..last].to_vec());
    let records = offsets.len() - 1;
    for want in [
        "channel 'train', epoch 1",
        "train_0",
        &format!(
            "the stream ended after {records} records, an odd number: record {}",
            records - 1
        ),
        &format!("at byte {}", offsets[records - 1]),
        "source-ref, then city-streets-ref",
    ] {
        assert!(failure.contains(want), "{want:?} not in: {failure}");
    }
}

/// The train channel is fed, the validation channel's FIFO never appears: after epoch 1's training the job waits the
/// configured time for `validation_0`, then fails naming it.
#[test]
fn a_fifo_that_never_appears_fails_after_the_configured_wait() {
    let data = streams(SMALL);
    let job = pipe_job(&small_hyperparameters(1));
    let _cores = CORES.lock().unwrap_or_else(|p| p.into_inner());
    let train_stream = data.train.clone();
    let train = Feeder::start(&job.data_dir(), "train", move |n| {
        (n == 0).then(|| train_stream.clone())
    });
    let started = Instant::now();
    let out = run_with_wait(&job, "2");
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "took {:?}",
        started.elapsed()
    );
    assert!(log.contains("waiting up to 2 s for the Pipe-mode FIFO"), "{log}");
    let failure = job.failure().expect("failure file");
    assert!(
        failure.contains("channel 'validation', epoch 1")
            && failure.contains(&format!("{}", job.data_dir().join("validation_0").display()))
            && failure.contains("did not appear within 2.0 s")
            && failure.contains("SEMSEG_PIPE_WAIT_SECS"),
        "{failure}"
    );
    assert_eq!(train.finish(), 1, "the train stream was read before the wait");
}

/// `semseg check` cannot drain a FIFO (it would consume an epoch): it validates the configuration, says it skipped
/// the Pipe channels' contents, and does not ask for annotation channels.
#[test]
fn check_validates_pipe_channels_without_reading_them() {
    let job = pipe_job(r#"{"num_classes": "4", "num_training_samples": "12"}"#);
    let out = job.run(&["check"]);
    let log = text(&out);
    assert!(out.status.success(), "{log}\nfailure: {:?}", job.failure());
    assert!(
        log.contains("channel 'train' is in Pipe mode: skipping its content checks")
            && log.contains("channel 'validation' is in Pipe mode: skipping its content checks"),
        "{log}"
    );
    assert!(!job.data_dir().join("train_0").exists());

    job.write_config(
        "inputdataconfig.json",
        &PIPE_CONFIG.replacen(
            r#""RecordWrapperType": "RecordIO""#,
            r#""RecordWrapperType": "None""#,
            1,
        ),
    );
    let failure = job.check_fails();
    assert!(
        failure.contains("channel 'train' is in Pipe mode with RecordWrapperType 'None'")
            && failure.contains("RecordWrapperType RecordIO"),
        "{failure}"
    );
    job.write_config(
        "inputdataconfig.json",
        &PIPE_CONFIG.replacen(r#"["source-ref", "city-streets-ref"]"#, r#"["source-ref"]"#, 1),
    );
    let failure = job.check_fails();
    assert!(failure.contains("AttributeNames [\"source-ref\"]"), "{failure}");
}
