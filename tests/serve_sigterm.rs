//! A real SIGTERM (sent to this test process, which is why this test has a file, hence a process, of its own): the
//! server stops accepting, lets the in-flight request finish, and returns.

#![cfg(unix)]

use std::io::Cursor;
use std::sync::Arc;
use std::time::{Duration, Instant};

use semseg::infer::{NearestColour, Segmenter};
use semseg::serve::{self, ServeConfig};

#[tokio::test]
async fn sigterm_drains_in_flight_requests() -> anyhow::Result<()> {
    // Register for SIGTERM before anything can send it, so the default action (exit) is replaced.
    let _guard = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut slow = NearestColour::new(vec![[0, 0, 0], [255, 0, 0]]);
    slow.delay = Duration::from_millis(1000);
    let segmenter: Arc<dyn Segmenter> = Arc::new(slow);
    let running = serve::start(ServeConfig::default(), move || Ok(segmenter), serve::shutdown_signal()).await?;
    let base = format!("http://{}", running.addr());
    let client = reqwest::Client::new();
    while client.get(format!("{base}/ping")).send().await?.status() != reqwest::StatusCode::OK {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut png = Vec::new();
    image::RgbImage::new(16, 8).write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)?;
    let request = client
        .post(format!("{base}/invocations"))
        .header("content-type", "image/png")
        .body(png)
        .send();
    let in_flight = tokio::spawn(request);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &std::process::id().to_string()])
        .status()?;
    assert!(status.success());
    tokio::time::timeout(Duration::from_secs(10), running.wait()).await??;
    let response = in_flight.await??;
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .is_err());
    Ok(())
}
