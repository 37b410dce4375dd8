//! The `serve` and `predict` subcommands of the real binary, up to where a trained model is needed.

use std::process::Command;
use std::time::Duration;

fn semseg() -> Command {
    Command::new(env!("CARGO_BIN_EXE_semseg"))
}

#[test]
fn serve_without_a_model_exits_with_the_reason() -> anyhow::Result<()> {
    let ml = tempfile::tempdir()?;
    let mut child = semseg()
        .args(["--ml-root"])
        .arg(ml.path())
        .args(["serve", "--port", "0"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait()?.is_none() {
        if std::time::Instant::now() > deadline {
            child.kill()?;
            anyhow::bail!("serve kept running without a model");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(log.contains("listening"), "{log}");
    assert!(
        log.contains("model directory") && log.contains("does not exist"),
        "{log}"
    );
    Ok(())
}

#[test]
fn predict_refuses_clashing_output_names_before_loading() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = semseg()
        .args(["predict", "--model"])
        .arg(dir.path())
        .args(["a/x.jpg", "b/x.png", "--out"])
        .arg(dir.path().join("out"))
        .output()?;
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(log.contains("would both be written as x.png"), "{log}");
    Ok(())
}
