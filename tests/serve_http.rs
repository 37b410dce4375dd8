//! HTTP tests against the real server on an ephemeral port, with a simple but exact network (nearest colour).

use std::io::Cursor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::{ImageFormat, RgbImage};
use reqwest::header::{HeaderValue, ACCEPT, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use semseg::infer::{NearestColour, Probabilities, Segmenter};
use semseg::serve::codec::ClassCounts;
use semseg::serve::error::ErrorBody;
use semseg::serve::{self, ExecutionParameters, RunningServer, ServeConfig};

type TestResult = anyhow::Result<()>;

const CUSTOM: &str = "x-amzn-sagemaker-custom-attributes";

/// Classes: 0 black, 1 red, 2 blue.
fn colours() -> NearestColour {
    NearestColour::new(vec![[0, 0, 0], [255, 0, 0], [0, 0, 255]])
}

/// Left third red, middle third blue, right third black.
fn test_image(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, _| match 3 * x / width {
        0 => image::Rgb([250, 5, 5]),
        1 => image::Rgb([5, 5, 250]),
        _ => image::Rgb([5, 5, 5]),
    })
}

fn encode(image: &RgbImage, format: ImageFormat) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    image.write_to(&mut Cursor::new(&mut out), format)?;
    Ok(out)
}

struct Server {
    base: String,
    client: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    running: Option<RunningServer>,
}

impl Server {
    async fn start(config: ServeConfig, segmenter: impl Segmenter + 'static) -> anyhow::Result<Self> {
        let segmenter: Arc<dyn Segmenter> = Arc::new(segmenter);
        Self::start_with(config, move || Ok(segmenter)).await
    }

    async fn start_with(
        config: ServeConfig,
        load: impl FnOnce() -> anyhow::Result<Arc<dyn Segmenter>> + Send + 'static,
    ) -> anyhow::Result<Self> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = serve::start(config, load, async move {
            let _ = stopped.await;
        })
        .await?;
        let server = Self {
            base: format!("http://{}", running.addr()),
            client: reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?,
            stop: Some(stop),
            running: Some(running),
        };
        Ok(server)
    }

    fn addr(&self) -> Option<SocketAddr> {
        self.running.as_ref().map(RunningServer::addr)
    }

    async fn ready(self) -> anyhow::Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.get("/ping").await?.status() != StatusCode::OK {
            anyhow::ensure!(Instant::now() < deadline, "the server did not become healthy");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(self)
    }

    async fn get(&self, path: &str) -> reqwest::Result<reqwest::Response> {
        self.client.get(format!("{}{path}", self.base)).send().await
    }

    async fn invoke(
        &self,
        content_type: Option<&str>,
        accept: Option<&str>,
        body: Vec<u8>,
    ) -> reqwest::Result<reqwest::Response> {
        let mut request = self.client.post(format!("{}/invocations", self.base)).body(body);
        if let Some(ct) = content_type {
            request = request.header(CONTENT_TYPE, ct);
        }
        if let Some(accept) = accept {
            request = request.header(ACCEPT, accept);
        }
        request.send().await
    }

    /// Ask the server to stop and wait for the drain to end.
    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.running.take() {
            Some(running) => running.wait().await,
            None => Ok(()),
        }
    }
}

fn config() -> ServeConfig {
    ServeConfig {
        workers: 2,
        ..ServeConfig::default()
    }
}

async fn expect_error(response: reqwest::Response, status: StatusCode, code: &str) -> anyhow::Result<ErrorBody> {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let body: ErrorBody = response.json().await?;
    assert_eq!(body.status, status.as_u16());
    assert_eq!(body.error, code, "{}", body.message);
    assert!(!body.message.is_empty());
    Ok(body)
}

/// The palette indices of a mask PNG.
fn mask_indices(png_bytes: &[u8]) -> anyhow::Result<(u32, u32, Vec<u8>)> {
    let mut decoder = png::Decoder::new(Cursor::new(png_bytes));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder.read_info()?;
    anyhow::ensure!(reader.info().color_type == png::ColorType::Indexed, "not a palette PNG");
    anyhow::ensure!(reader.info().palette.is_some(), "no palette");
    let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
    let frame = reader.next_frame(&mut buf)?;
    buf.truncate(frame.buffer_size());
    Ok((frame.width, frame.height, buf))
}

fn check_mask(width: u32, height: u32, labels: &[u8]) {
    let at = |x: u32, y: u32| labels[(y * width + x) as usize];
    assert_eq!(at(width / 6, height / 2), 1, "red third");
    assert_eq!(at(width / 2, height / 2), 2, "blue third");
    assert_eq!(at(5 * width / 6, height / 2), 0, "black third");
}

fn check_probabilities(shape: &[usize], values: &[f32], classes: usize, width: usize, height: usize) {
    assert_eq!(shape, &[1, classes, height, width]);
    let plane = width * height;
    for i in 0..plane {
        let sum: f32 = (0..classes).map(|c| values[c * plane + i]).sum();
        assert!((sum - 1.0).abs() < 1e-4, "pixel {i} sums to {sum}");
    }
    let p = Probabilities::new(classes, height, width, values.to_vec()).map(|p| p.argmax());
    let mask = p.expect("shape checked above");
    check_mask(width as u32, height as u32, mask.labels());
}

#[tokio::test]
async fn every_content_type_pair() -> TestResult {
    let server = Server::start(config(), colours()).await?.ready().await?;
    let (w, h) = (60u32, 20u32);
    let img = test_image(w, h);
    let jpeg = encode(&img, ImageFormat::Jpeg)?;
    let png = encode(&img, ImageFormat::Png)?;
    let inputs = [
        ("image/jpeg", &jpeg),
        ("image/png", &png),
        ("application/x-image", &jpeg),
        ("application/x-image", &png),
        ("image/jpeg; charset=binary", &jpeg),
    ];
    let accepts: [(Option<&str>, &str); 7] = [
        (None, "image/png"),
        (Some("*/*"), "image/png"),
        (Some("image/png"), "image/png"),
        (
            Some("application/x-recordio-protobuf"),
            "application/x-recordio-protobuf",
        ),
        (Some("application/x-protobuf"), "application/x-protobuf"),
        (Some("application/json"), "application/json"),
        (Some("text/html, application/json;q=0.5"), "application/json"),
    ];
    for (content_type, body) in inputs {
        for (accept, expected_type) in accepts {
            let response = server.invoke(Some(content_type), accept, body.clone()).await?;
            assert_eq!(response.status(), StatusCode::OK, "{content_type} → {accept:?}");
            let got_type = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            assert_eq!(got_type.as_deref(), Some(expected_type));
            let bytes = response.bytes().await?;
            match expected_type {
                "image/png" => {
                    let (mw, mh, labels) = mask_indices(&bytes)?;
                    assert_eq!((mw, mh), (w, h));
                    check_mask(w, h, &labels);
                }
                "application/json" => {
                    let counts: ClassCounts = serde_json::from_slice(&bytes)?;
                    assert_eq!(counts.shape, [h as usize, w as usize]);
                    assert_eq!(counts.num_classes, 3);
                    assert_eq!(counts.class_pixel_counts, vec![400, 400, 400]);
                }
                _ => {
                    let (shape, values) = serve::protobuf::decode_probabilities(&bytes)?;
                    check_probabilities(&shape, &values, 3, w as usize, h as usize);
                }
            }
        }
    }
    server.stop().await
}

#[tokio::test]
async fn client_errors_are_json_and_the_server_keeps_serving() -> TestResult {
    let cfg = ServeConfig {
        max_payload_bytes: 100_000,
        decode: serve::codec::DecodeLimits {
            max_image_pixels: 250_000,
            max_probability_values: 3 * 100 * 100,
        },
        ..config()
    };
    let server = Server::start(cfg, colours()).await?.ready().await?;
    let png = encode(&test_image(60, 20), ImageFormat::Png)?;
    let jpeg = encode(&test_image(60, 20), ImageFormat::Jpeg)?;

    let r = server.invoke(Some("image/jpeg"), None, Vec::new()).await?;
    expect_error(r, StatusCode::BAD_REQUEST, "empty_body").await?;
    let r = server
        .invoke(Some("image/jpeg"), None, b"definitely not an image".to_vec())
        .await?;
    expect_error(r, StatusCode::BAD_REQUEST, "bad_image").await?;
    let r = server
        .invoke(Some("image/jpeg"), None, jpeg[..jpeg.len() / 2].to_vec())
        .await?;
    expect_error(r, StatusCode::BAD_REQUEST, "bad_image").await?;
    let r = server
        .invoke(Some("image/png"), None, png[..png.len() - 20].to_vec())
        .await?;
    expect_error(r, StatusCode::BAD_REQUEST, "bad_image").await?;
    let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec();
    let r = server.invoke(Some("image/jpeg"), None, gif).await?;
    expect_error(r, StatusCode::BAD_REQUEST, "bad_image").await?;

    let r = server.invoke(Some("text/csv"), None, png.clone()).await?;
    expect_error(r, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type").await?;
    let r = server.invoke(None, None, png.clone()).await?;
    expect_error(r, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type").await?;
    let r = server.invoke(Some("image/png"), Some("text/csv"), png.clone()).await?;
    expect_error(r, StatusCode::NOT_ACCEPTABLE, "not_acceptable").await?;
    let r = server
        .invoke(Some("image/png"), Some("image/png;q=0"), png.clone())
        .await?;
    expect_error(r, StatusCode::NOT_ACCEPTABLE, "not_acceptable").await?;

    let r = server.invoke(Some("image/png"), None, vec![0u8; 100_001]).await?;
    expect_error(r, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await?;
    let r = server.invoke(Some("image/png"), None, vec![0u8; 3_000_000]).await?;
    expect_error(r, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await?;
    // A PNG bomb: tiny file, 1000 x 1000 pixels declared, over the 250 000 pixel budget.
    let bomb = encode(&RgbImage::new(1000, 1000), ImageFormat::Png)?;
    assert!(bomb.len() < 100_000);
    let r = server.invoke(Some("image/png"), None, bomb).await?;
    expect_error(r, StatusCode::PAYLOAD_TOO_LARGE, "image_too_large").await?;
    let big = encode(&test_image(200, 100), ImageFormat::Png)?;
    let r = server
        .invoke(Some("image/png"), Some("application/x-recordio-protobuf"), big.clone())
        .await?;
    expect_error(r, StatusCode::PAYLOAD_TOO_LARGE, "probabilities_too_large").await?;
    let r = server.invoke(Some("image/png"), Some("image/png"), big).await?;
    assert_eq!(r.status(), StatusCode::OK, "the mask of the same image is fine");

    let r = server.get("/invocations").await?;
    expect_error(r, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await?;
    let r = server.get("/nope").await?;
    expect_error(r, StatusCode::NOT_FOUND, "not_found").await?;

    assert_eq!(server.get("/ping").await?.status(), StatusCode::OK);
    let r = server.invoke(Some("image/png"), None, png).await?;
    assert_eq!(r.status(), StatusCode::OK);
    server.stop().await
}

/// A JPEG cut short after its headers: the JPEG decoder alone would fill in the missing scan and answer 200.
#[tokio::test]
async fn a_truncated_jpeg_is_a_400_naming_the_problem_and_the_server_keeps_serving() -> TestResult {
    let server = Server::start(config(), colours()).await?.ready().await?;
    let jpeg = encode(&test_image(60, 20), ImageFormat::Jpeg)?;
    let scan = jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xDA])
        .ok_or_else(|| anyhow::anyhow!("no scan in the JPEG"))?;
    for cut in [scan + 16, (scan + jpeg.len()) / 2, jpeg.len() - 2] {
        let r = server.invoke(Some("image/jpeg"), None, jpeg[..cut].to_vec()).await?;
        let body = expect_error(r, StatusCode::BAD_REQUEST, "bad_image").await?;
        assert!(
            body.message.contains("truncated JPEG") && body.message.contains("end-of-image marker"),
            "cut at {cut}: {}",
            body.message
        );
        let r = server.invoke(Some("image/jpeg"), None, jpeg.clone()).await?;
        assert_eq!(r.status(), StatusCode::OK, "the whole JPEG after one cut at {cut}");
        let (w, h, labels) = mask_indices(&r.bytes().await?)?;
        check_mask(w, h, &labels);
    }
    server.stop().await
}

#[tokio::test]
async fn custom_attributes_are_echoed() -> TestResult {
    let server = Server::start(config(), colours()).await?.ready().await?;
    let png = encode(&test_image(30, 10), ImageFormat::Png)?;
    let url = format!("{}/invocations", server.base);
    let attrs = "trace_id=abc-123,c000b4f9-df62-4c85-a0bf-7c525f9104a4; v=1";
    let r = server
        .client
        .post(&url)
        .header(CONTENT_TYPE, "image/png")
        .header(CUSTOM, attrs)
        .body(png.clone())
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers().get(CUSTOM), Some(&HeaderValue::from_static(attrs)));
    // On errors too.
    let r = server
        .client
        .post(&url)
        .header(CONTENT_TYPE, "text/csv")
        .header(CUSTOM, "x=1")
        .body(png.clone())
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(r.headers().get(CUSTOM), Some(&HeaderValue::from_static("x=1")));
    // Over 1024 characters: not echoed (SageMaker would not pass it either).
    let long = "a".repeat(1025);
    let r = server
        .client
        .post(&url)
        .header(CONTENT_TYPE, "image/png")
        .header(CUSTOM, long)
        .body(png.clone())
        .send()
        .await?;
    assert!(r.headers().get(CUSTOM).is_none());
    let r = server.invoke(Some("image/png"), None, png).await?;
    assert!(r.headers().get(CUSTOM).is_none());
    server.stop().await
}

#[tokio::test]
async fn execution_parameters_reflect_the_config() -> TestResult {
    let cfg = ServeConfig {
        execution: ExecutionParameters {
            max_concurrent_transforms: 3,
            batch_strategy: serve::BatchStrategy::SingleRecord,
            max_payload_in_mb: 20,
        },
        ..config()
    };
    let server = Server::start(cfg, colours()).await?.ready().await?;
    let r = server.get("/execution-parameters").await?;
    assert_eq!(r.status(), StatusCode::OK);
    let body: serde_json::Value = r.json().await?;
    assert_eq!(
        body,
        serde_json::json!({"MaxConcurrentTransforms": 3, "BatchStrategy": "SINGLE_RECORD", "MaxPayloadInMB": 20})
    );
    server.stop().await
}

#[tokio::test]
async fn ping_is_503_while_loading_then_200() -> TestResult {
    let server = Server::start_with(config(), || {
        std::thread::sleep(Duration::from_millis(700));
        Ok(Arc::new(colours()) as Arc<dyn Segmenter>)
    })
    .await?;
    let started = Instant::now();
    let r = server.get("/ping").await?;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "accepts and answers at once"
    );
    assert!(r.headers().contains_key(RETRY_AFTER));
    expect_error(r, StatusCode::SERVICE_UNAVAILABLE, "model_loading").await?;
    let png = encode(&test_image(30, 10), ImageFormat::Png)?;
    let r = server.invoke(Some("image/png"), None, png.clone()).await?;
    expect_error(r, StatusCode::SERVICE_UNAVAILABLE, "model_loading").await?;
    let server = server.ready().await?;
    assert_eq!(
        server.invoke(Some("image/png"), None, png).await?.status(),
        StatusCode::OK
    );
    server.stop().await
}

#[tokio::test]
async fn a_failed_load_stops_the_server_with_the_reason() -> TestResult {
    let server = Server::start_with(config(), || anyhow::bail!("weights are corrupt")).await?;
    let mut server = server;
    let running = server.running.take().ok_or_else(|| anyhow::anyhow!("not started"))?;
    let result = tokio::time::timeout(Duration::from_secs(10), running.wait()).await?;
    let message = format!(
        "{:#}",
        result.err().ok_or_else(|| anyhow::anyhow!("expected an error"))?
    );
    assert!(message.contains("weights are corrupt"), "{message}");
    Ok(())
}

#[tokio::test]
async fn full_queue_gets_503_and_ping_stays_fast() -> TestResult {
    let mut slow = colours();
    slow.delay = Duration::from_millis(1200);
    let cfg = ServeConfig {
        workers: 1,
        queue: 1,
        ..config()
    };
    let server = Arc::new(Server::start(cfg, slow).await?.ready().await?);
    let png = encode(&test_image(30, 10), ImageFormat::Png)?;
    let mut requests = Vec::new();
    for _ in 0..5 {
        let server = Arc::clone(&server);
        let png = png.clone();
        requests.push(tokio::spawn(async move {
            server.invoke(Some("image/png"), None, png).await
        }));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // While the worker is busy and the queue full: /ping answers at once.
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(server.get("/ping").await?.status(), StatusCode::OK);
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "ping took {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut ok, mut busy) = (0, 0);
    for request in requests {
        let r = request.await??;
        match r.status() {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert!(r.headers().contains_key(RETRY_AFTER));
                expect_error(r, StatusCode::SERVICE_UNAVAILABLE, "overloaded").await?;
                busy += 1;
            }
            other => anyhow::bail!("unexpected status {other}"),
        }
    }
    assert_eq!(
        (ok, busy),
        (2, 3),
        "one running + one queued succeed, the rest are refused"
    );
    match Arc::try_unwrap(server) {
        Ok(server) => server.stop().await,
        Err(_) => anyhow::bail!("server still shared"),
    }
}

#[tokio::test]
async fn slow_inference_times_out_with_504() -> TestResult {
    let mut slow = colours();
    slow.delay = Duration::from_millis(1500);
    let cfg = ServeConfig {
        request_timeout: Duration::from_millis(300),
        ..config()
    };
    let server = Server::start(cfg, slow).await?.ready().await?;
    let png = encode(&test_image(30, 10), ImageFormat::Png)?;
    let started = Instant::now();
    let r = server.invoke(Some("image/png"), None, png).await?;
    assert!(started.elapsed() < Duration::from_millis(1200));
    expect_error(r, StatusCode::GATEWAY_TIMEOUT, "timeout").await?;
    server.stop().await
}

struct Panics;

impl Segmenter for Panics {
    fn num_classes(&self) -> usize {
        2
    }
    fn probabilities(&self, _: &RgbImage) -> anyhow::Result<Probabilities> {
        panic!("the network exploded")
    }
}

#[tokio::test]
async fn a_panic_is_a_500_and_the_server_survives() -> TestResult {
    let cfg = ServeConfig { workers: 1, ..config() };
    let server = Server::start(cfg, Panics).await?.ready().await?;
    let png = encode(&test_image(30, 10), ImageFormat::Png)?;
    for _ in 0..2 {
        let r = server.invoke(Some("image/png"), None, png.clone()).await?;
        let body = expect_error(r, StatusCode::INTERNAL_SERVER_ERROR, "internal_error").await?;
        assert!(body.message.contains("exploded"), "{}", body.message);
    }
    // Client errors are still client errors.
    let r = server.invoke(Some("image/png"), None, b"junk".to_vec()).await?;
    expect_error(r, StatusCode::BAD_REQUEST, "bad_image").await?;
    assert_eq!(server.get("/ping").await?.status(), StatusCode::OK);
    server.stop().await
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() -> TestResult {
    let mut slow = colours();
    slow.delay = Duration::from_millis(800);
    let server = Server::start(config(), slow).await?.ready().await?;
    let addr = server.addr().ok_or_else(|| anyhow::anyhow!("no address"))?;
    let png = encode(&test_image(30, 10), ImageFormat::Png)?;
    let client = server.client.clone();
    let url = format!("{}/invocations", server.base);
    let in_flight = tokio::spawn(async move {
        client
            .post(url)
            .header(CONTENT_TYPE, "image/png")
            .body(png)
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    server.stop().await?;
    let r = in_flight.await??;
    assert_eq!(r.status(), StatusCode::OK, "the in-flight request finished");
    assert!(!r.bytes().await?.is_empty());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no new connections after shutdown"
    );
    Ok(())
}

#[tokio::test]
async fn drain_gives_up_after_the_drain_timeout() -> TestResult {
    let mut slow = colours();
    slow.delay = Duration::from_millis(3000);
    let cfg = ServeConfig {
        drain_timeout: Duration::from_millis(300),
        ..config()
    };
    let server = Server::start(cfg, slow).await?.ready().await?;
    let png = encode(&test_image(30, 10), ImageFormat::Png)?;
    let client = server.client.clone();
    let url = format!("{}/invocations", server.base);
    let in_flight = tokio::spawn(async move {
        client
            .post(url)
            .header(CONTENT_TYPE, "image/png")
            .body(png)
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    server.stop().await?;
    assert!(
        started.elapsed() < Duration::from_millis(2800),
        "stopped after {:?}",
        started.elapsed()
    );
    in_flight.abort();
    Ok(())
}

#[tokio::test]
async fn large_images_are_answered_at_full_size() -> TestResult {
    let server = Server::start(config(), colours()).await?.ready().await?;
    for (w, h, format, content_type) in [
        (960u32, 540u32, ImageFormat::Jpeg, "image/jpeg"),
        (4000, 3000, ImageFormat::Png, "image/png"),
    ] {
        let body = encode(&test_image(w, h), format)?;
        assert!(body.len() < 6 << 20, "{} bytes", body.len());
        let started = Instant::now();
        let r = server
            .invoke(Some(content_type), Some("image/png"), body.clone())
            .await?;
        assert_eq!(r.status(), StatusCode::OK);
        let (mw, mh, labels) = mask_indices(&r.bytes().await?)?;
        assert_eq!((mw, mh), (w, h));
        check_mask(w, h, &labels);
        let r = server
            .invoke(Some(content_type), Some("application/json"), body)
            .await?;
        let counts: ClassCounts = r.json().await?;
        assert_eq!(counts.class_pixel_counts.iter().sum::<u64>(), u64::from(w * h));
        eprintln!("{w}x{h}: mask + counts in {:?}", started.elapsed());
    }
    server.stop().await
}

/// The recordio-protobuf answer, decoded by an independent Python decoder (`protobuf` package with the schema built in
/// the script, and a pure-Python wire-format decoder). Needs python3 with protobuf: ignored unless built with CI=true
/// or SEMSEG_EXTERNAL_TESTS=1 (see build.rs); when it runs, a missing prerequisite fails it.
#[tokio::test]
#[cfg_attr(
    not(semseg_external_tests),
    ignore = "needs python3 with the protobuf package; runs under CI=true or SEMSEG_EXTERNAL_TESTS=1, or with --ignored"
)]
async fn python_decodes_the_recordio_protobuf_answer() -> TestResult {
    let has_protobuf = std::process::Command::new("python3")
        .args(["-c", "import google.protobuf"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        has_protobuf,
        "this test needs python3 with the protobuf package: pip install protobuf (.ci/run does)"
    );
    let server = Server::start(config(), colours()).await?.ready().await?;
    let (w, h) = (48u32, 16u32);
    let body = encode(&test_image(w, h), ImageFormat::Jpeg)?;
    let dir = tempfile::tempdir()?;
    for accept in ["application/x-recordio-protobuf", "application/x-protobuf"] {
        let r = server.invoke(Some("image/jpeg"), Some(accept), body.clone()).await?;
        assert_eq!(r.status(), StatusCode::OK);
        let path = dir.path().join("response.rec");
        std::fs::write(&path, r.bytes().await?)?;
        for decoder in ["pure", "protobuf"] {
            let out = std::process::Command::new("python3")
                .arg(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/scripts/decode_recordio_protobuf.py"
                ))
                .arg(&path)
                .args(["--classes", "3", "--height", &h.to_string(), "--width", &w.to_string()])
                .args(["--decoder", decoder])
                .output()?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{decoder}: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(stdout.contains(&format!("\"decoder\": \"{decoder}\"")), "{stdout}");
        }
    }
    server.stop().await
}
