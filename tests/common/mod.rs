//! Helpers shared by the end-to-end tests: a temporary ml-root with a synthetic dataset, and the real binary.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_semseg");

/// A temporary SageMaker ml-root.
pub struct Job {
    pub dir: tempfile::TempDir,
}

impl Job {
    /// An ml-root holding a small synthetic dataset (`synth_args` added to the generator's) and hyperparameters
    /// matching it.
    pub fn with_synth(synth_args: &[&str]) -> Job {
        let job = Job::empty();
        let mut args = vec![
            "--train-count",
            "6",
            "--validation-count",
            "3",
            "--width",
            "64",
            "--height",
            "48",
        ];
        args.extend(["--seed", "3"]);
        args.extend(synth_args);
        job.synth(&args);
        job.write_hyperparameters(r#"{"num_classes": "4", "num_training_samples": "6"}"#);
        job
    }

    /// An ml-root with nothing in it.
    pub fn empty() -> Job {
        Job {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// `semseg synth --out <ml-root>/input/data <args>`.
    pub fn synth(&self, args: &[&str]) {
        let data = self.data_dir();
        let mut all = vec!["synth", "--out", data.to_str().expect("utf-8 path")];
        all.extend(args);
        let out = semseg(&all);
        assert!(out.status.success(), "synth failed: {}", text(&out));
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root().join("input/data")
    }

    pub fn channel(&self, name: &str) -> PathBuf {
        self.data_dir().join(name)
    }

    pub fn write_config(&self, file: &str, contents: &str) {
        let dir = self.root().join("input/config");
        std::fs::create_dir_all(&dir).expect("config dir");
        std::fs::write(dir.join(file), contents).expect("write config");
    }

    pub fn write_hyperparameters(&self, json: &str) {
        self.write_config("hyperparameters.json", json);
    }

    /// Run `semseg --ml-root ROOT <args>`.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut all = vec!["--ml-root", self.root().to_str().expect("utf-8 path")];
        all.extend(args);
        semseg(&all)
    }

    pub fn failure(&self) -> Option<String> {
        std::fs::read_to_string(self.root().join("output/failure")).ok()
    }

    /// Run `check`, assert it fails, and return the failure file (which must exist).
    pub fn check_fails(&self) -> String {
        let out = self.run(&["check"]);
        assert!(!out.status.success(), "check should fail but passed: {}", text(&out));
        let failure = self
            .failure()
            .unwrap_or_else(|| panic!("no output/failure written; log: {}", text(&out)));
        assert!(!failure.trim().is_empty());
        // The reason must also be in the log, where CloudWatch keeps it.
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("check failed"),
            "{}",
            text(&out)
        );
        failure
    }

    pub fn check_passes(&self) {
        let out = self.run(&["check"]);
        assert!(
            out.status.success(),
            "check failed: {}\nfailure: {:?}",
            text(&out),
            self.failure()
        );
        assert!(self.failure().is_none(), "a passing job left output/failure");
    }
}

pub fn semseg(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("SEMSEG_ML_ROOT")
        .output()
        .expect("run semseg")
}

/// Reads a spawned `train`'s stdout (piped) to its end, sending SIGTERM once epoch 1 is validated (the job
/// checkpoints right after, before epoch 2's first step), then waits for it: the exit status and what it printed.
pub fn sigterm_after_first_validation(mut child: Child) -> (ExitStatus, String) {
    let stdout = child.stdout.take().expect("train's stdout must be piped");
    let mut log = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read train's stdout");
        log.push_str(&line);
        log.push('\n');
        if line.contains("#metrics epoch=1 validation:mIOU") {
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .expect("run kill");
        }
    }
    (child.wait().expect("wait for train"), log)
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The sorted file names in a directory.
pub fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Write an 8-bit grayscale PNG.
pub fn write_gray_png(path: &Path, width: u32, height: u32, pixels: &[u8]) {
    image::GrayImage::from_raw(width, height, pixels.to_vec())
        .expect("size")
        .save(path)
        .expect("save png");
}

/// One HTTP/1.1 request over a plain socket: (status, content type, body).
pub fn http(port: u16, request: &[u8]) -> (u16, String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.write_all(request).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, content_type, response[split + 4..].to_vec())
}

/// `POST /invocations` with `body` as `content_type` (and an `Accept` header when given): (status, content type, body).
pub fn post_invocation(port: u16, content_type: &str, accept: Option<&str>, body: &[u8]) -> (u16, String, Vec<u8>) {
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    let mut request = format!(
        "POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n{accept}Content-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    http(port, &request)
}
