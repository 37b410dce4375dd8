//! `semseg demo` end to end: the real binary generates its dataset, trains one epoch, segments its sample image
//! (mask.png and the side-by-side picture in output/data), serves the model on a free port, answers the curl line it
//! prints with the same mask, and stops on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::BIN;

/// Kills the demo if the test fails before it sent SIGTERM.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn demo(dir: &std::path::Path, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .arg("demo")
        .args(args)
        .current_dir(dir)
        .env_remove("SEMSEG_ML_ROOT")
        .env_remove("SAGEMAKER_BIND_TO_PORT")
        .env("RUST_LOG", "info");
    command
}

/// The port and the image path of the printed curl line, once it appears (the whole log so far on failure).
fn curl_line(lines: &mpsc::Receiver<String>, log: &mut String, timeout: Duration) -> (u16, PathBuf) {
    let deadline = Instant::now() + timeout;
    let mut image = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match lines.recv_timeout(left) {
            Ok(line) => line,
            Err(e) => panic!("no curl line after {timeout:?} ({e}); log:\n{log}"),
        };
        log.push_str(&line);
        log.push('\n');
        if let Some((_, path)) = line.split_once("--data-binary @") {
            image = Some(PathBuf::from(path.trim_end_matches('\\').trim()));
        }
        if let Some((_, rest)) = line.split_once("http://localhost:") {
            let port = rest.split('/').next().and_then(|p| p.parse().ok()).expect("a port");
            return (
                port,
                image.unwrap_or_else(|| panic!("the curl line names no image; log:\n{log}")),
            );
        }
    }
}

#[test]
fn demo_trains_serves_the_printed_curl_line_and_stops_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let child = demo(tmp.path(), &["--epochs", "1", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut running = Running(child);
    let stdout = running.0.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut log = String::new();
    let (port, image_path) = curl_line(&lines, &mut log, Duration::from_secs(240));
    assert!(log.contains("#metrics epoch=1 validation:mIOU="), "{log}");
    assert!(
        image_path.starts_with(tmp.path().join("demo-ml/input/data/validation")),
        "{image_path:?}"
    );
    assert!(tmp.path().join("demo-ml/model/model.safetensors").is_file());

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ping = std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| common::http(port, b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").0);
        if ping == Some(200) {
            break;
        }
        assert!(Instant::now() < deadline, "/ping never became healthy (last: {ping:?})");
        std::thread::sleep(Duration::from_millis(100));
    }

    // What the printed curl command sends: the JPEG as image/jpeg, no Accept.
    let image = std::fs::read(&image_path).unwrap();
    let (width, height) = image::load_from_memory(&image).unwrap().to_rgb8().dimensions();
    let (status, content_type, body) = common::post_invocation(port, "image/jpeg", None, &image);
    assert_eq!((status, content_type.as_str()), (200, "image/png"));
    let mask = semseg::data::annotation::decode_annotation(&body).expect("a palette PNG of class indices");
    assert_eq!(mask.dimensions(), (width, height));
    assert!(mask.as_raw().iter().all(|&l| l < 4));

    // The demo's own prediction on that image: the served mask again, and the image beside it in colour.
    let output = tmp.path().join("demo-ml/output/data");
    let own = std::fs::read(output.join("mask.png")).unwrap();
    let own = semseg::data::annotation::decode_annotation(&own).expect("output/data/mask.png is a palette PNG");
    assert_eq!(own.dimensions(), (width, height));
    let same = own.as_raw().iter().zip(mask.as_raw()).filter(|(a, b)| a == b).count();
    assert!(
        same as f64 >= 0.99 * (width * height) as f64,
        "the demo's mask.png agrees with the server's on only {same} of {} pixels",
        width * height
    );
    let picture = image::open(output.join("mask-side-by-side.png")).unwrap().to_rgb8();
    assert_eq!(picture.dimensions(), (2 * width, height), "image | mask");
    let palette = semseg::infer::encode::voc_palette();
    for (x, y, pixel) in own.enumerate_pixels() {
        assert_eq!(
            picture.get_pixel(width + x, y).0,
            palette[usize::from(pixel.0[0])],
            "right half at ({x}, {y})"
        );
    }
    assert!(
        log.contains(&format!("{} (beside the image in", output.join("mask.png").display())),
        "{log}"
    );

    let stopped = Instant::now();
    Command::new("kill")
        .args(["-TERM", &running.0.id().to_string()])
        .status()
        .unwrap();
    let status = running.0.wait().unwrap();
    assert!(
        stopped.elapsed() < Duration::from_secs(30),
        "took {:?} to stop",
        stopped.elapsed()
    );
    assert!(status.success(), "{status:?}");
}

#[test]
fn demo_refuses_to_delete_a_directory_that_is_not_a_demos() {
    let tmp = tempfile::tempdir().unwrap();
    let mine = tmp.path().join("mine");
    std::fs::create_dir_all(mine.join("input/data")).unwrap();
    std::fs::write(mine.join("notes.txt"), "keep me").unwrap();
    // Through --dir and through a typed --ml-root alike; nothing is trained or deleted.
    for args in [
        vec!["--dir", mine.to_str().unwrap(), "--no-serve"],
        vec!["--ml-root", mine.to_str().unwrap(), "--no-serve"],
    ] {
        let out = demo(tmp.path(), &args).output().unwrap();
        let log = common::text(&out);
        assert!(!out.status.success(), "{log}");
        assert!(log.contains("not an earlier demo's"), "{log}");
        assert!(mine.join("notes.txt").is_file() && mine.join("input/data").is_dir());
    }
    let out = demo(tmp.path(), &["--dir", "a", "--ml-root", "b"]).output().unwrap();
    assert!(common::text(&out).contains("disagree"), "{}", common::text(&out));
}
