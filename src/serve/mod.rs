//! `semseg serve`: SageMaker's inference-container contract on axum + tokio.
//!
//! - `GET /ping`: 200 once the model is loaded, 503 before. It never waits for inference (which runs on its own
//!   threads), so it answers at once under any load.
//! - `POST /invocations`: an image in (`image/jpeg`, `image/png`, `application/x-image`), the mask or the
//!   probabilities out (see [`codec`]). `X-Amzn-SageMaker-Custom-Attributes` is echoed on every response.
//! - `GET /execution-parameters`: what Batch Transform should send (see [`ExecutionParameters`]).
//!
//! The server listens at once and loads the model in the background. Inference runs on a bounded pool of worker
//! threads ([`workers`]) behind a bounded queue: when it is full, requests get 503 with `Retry-After`. Each invocation
//! has a timeout under SageMaker's 60 s (504 when exceeded). SIGTERM (or Ctrl-C) stops accepting connections and lets
//! in-flight requests finish for up to the drain timeout (default 25 s, within SageMaker's 30 s before SIGKILL).
//! Errors are JSON bodies ([`error`]); client errors are 4xx, never 500; a panic becomes a 500, never a dropped
//! connection. Every request is logged (method, path, status, latency; `/ping` at debug level).

pub mod codec;
pub mod error;
pub mod media;
pub mod protobuf;
mod routes;
pub mod workers;

use std::future::{Future, IntoFuture};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::infer::{Inference, InferenceLimits, Segmenter, DEFAULT_MAX_MODEL_PIXELS};
use crate::sagemaker::MlRoot;
use codec::DecodeLimits;
use workers::WorkerPool;

/// Default largest decoded request image: 64 Mpx (e.g. 8192 × 8192).
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = crate::data::image_io::DEFAULT_MAX_PIXELS;
/// Default largest probabilities answer: 64 Mi values (256 MiB of f32).
pub const DEFAULT_MAX_PROBABILITY_VALUES: u64 = 64 * 1024 * 1024;
/// SageMaker's real-time payload limit, the default body limit.
pub const DEFAULT_MAX_PAYLOAD_MB: u64 = 6;

/// Batch Transform's batch strategy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum BatchStrategy {
    #[serde(rename = "SINGLE_RECORD")]
    #[value(name = "SINGLE_RECORD", alias = "single_record")]
    SingleRecord,
    #[serde(rename = "MULTI_RECORD")]
    #[value(name = "MULTI_RECORD", alias = "multi_record")]
    MultiRecord,
}

/// The answer of `GET /execution-parameters`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ExecutionParameters {
    pub max_concurrent_transforms: usize,
    pub batch_strategy: BatchStrategy,
    #[serde(rename = "MaxPayloadInMB")]
    pub max_payload_in_mb: u64,
}

/// `semseg serve` options. SageMaker's variables are read from the environment; the rest have `SEMSEG_*` variables.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Port to listen on.
    #[arg(long, env = "SAGEMAKER_BIND_TO_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, env = "SEMSEG_HOST", default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub host: IpAddr,
    /// Model directory (default: <ml-root>/model). A model.tar.gz in it is extracted first.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Inference worker threads (default: half the cores, 1 to 8).
    #[arg(long, env = "SEMSEG_WORKERS")]
    pub workers: Option<usize>,
    /// Requests that may wait for a worker before new ones get 503 (default: 16, or more to cover
    /// SAGEMAKER_MAX_CONCURRENT_TRANSFORMS).
    #[arg(long, env = "SEMSEG_QUEUE")]
    pub queue: Option<usize>,
    /// Largest request body in MiB (Batch Transform sets SAGEMAKER_MAX_PAYLOAD_IN_MB, up to 100).
    #[arg(long, env = "SAGEMAKER_MAX_PAYLOAD_IN_MB", default_value_t = DEFAULT_MAX_PAYLOAD_MB,
          value_parser = clap::value_parser!(u64).range(1..=100))]
    pub max_payload_mb: u64,
    /// MaxConcurrentTransforms to advertise (default: the number of workers).
    #[arg(long, env = "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS")]
    pub max_concurrent_transforms: Option<usize>,
    /// BatchStrategy to advertise. One image per request, so SINGLE_RECORD unless the platform says otherwise.
    #[arg(long, env = "SAGEMAKER_BATCH_STRATEGY", value_enum, default_value_t = BatchStrategy::SingleRecord)]
    pub batch_strategy: BatchStrategy,
    /// Largest image accepted, in pixels (width × height, checked before decoding): larger ones get 413.
    #[arg(long, env = "SEMSEG_MAX_IMAGE_PIXELS", default_value_t = DEFAULT_MAX_IMAGE_PIXELS)]
    pub max_image_pixels: u64,
    /// Images with more pixels are downscaled to this many before the network runs (answers stay full size).
    #[arg(long, env = "SEMSEG_MAX_MODEL_PIXELS", default_value_t = DEFAULT_MAX_MODEL_PIXELS)]
    pub max_model_pixels: u64,
    /// Largest probabilities answer in values (classes × width × height): larger ones get 413.
    #[arg(long, env = "SEMSEG_MAX_PROBABILITY_VALUES", default_value_t = DEFAULT_MAX_PROBABILITY_VALUES)]
    pub max_probability_values: u64,
    /// Seconds an invocation may take, queueing included (SageMaker gives up at 60).
    #[arg(long, env = "SEMSEG_REQUEST_TIMEOUT", default_value_t = 55.0)]
    pub request_timeout: f64,
    /// Seconds in-flight requests get to finish after SIGTERM (SageMaker sends SIGKILL 30 s after SIGTERM).
    #[arg(long, env = "SEMSEG_DRAIN_TIMEOUT", default_value_t = 25.0)]
    pub drain_timeout: f64,
    #[command(flatten)]
    pub compute: crate::compute::ComputeArgs,
}

/// Everything the server needs to run, resolved from [`ServeArgs`] (or built directly in tests).
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    pub workers: usize,
    pub queue: usize,
    pub max_payload_bytes: usize,
    pub decode: DecodeLimits,
    pub inference: InferenceLimits,
    pub request_timeout: Duration,
    pub drain_timeout: Duration,
    pub execution: ExecutionParameters,
}

fn default_workers() -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (cores / 2).clamp(1, 8)
}

fn seconds(value: f64, name: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| anyhow::anyhow!("{name} must be a non-negative number of seconds"))
}

impl ServeConfig {
    pub fn from_args(args: &ServeArgs) -> anyhow::Result<Self> {
        let workers = args.workers.unwrap_or_else(default_workers).max(1);
        let max_concurrent = args.max_concurrent_transforms.unwrap_or(workers).max(1);
        let queue = args.queue.unwrap_or(16.max(max_concurrent)).max(1);
        let request_timeout = seconds(args.request_timeout, "--request-timeout")?;
        anyhow::ensure!(
            request_timeout > Duration::ZERO && request_timeout < Duration::from_secs(60),
            "--request-timeout must be between 0 and 60 seconds (SageMaker gives up at 60), got {}",
            args.request_timeout
        );
        Ok(Self {
            addr: SocketAddr::new(args.host, args.port),
            workers,
            queue,
            max_payload_bytes: usize::try_from(args.max_payload_mb << 20).unwrap_or(usize::MAX),
            decode: DecodeLimits {
                max_image_pixels: args.max_image_pixels,
                max_probability_values: args.max_probability_values,
            },
            inference: InferenceLimits {
                max_model_pixels: args.max_model_pixels.max(1),
                ..InferenceLimits::default()
            },
            request_timeout,
            drain_timeout: seconds(args.drain_timeout, "--drain-timeout")?,
            execution: ExecutionParameters {
                max_concurrent_transforms: max_concurrent,
                batch_strategy: args.batch_strategy,
                max_payload_in_mb: args.max_payload_mb,
            },
        })
    }
}

impl Default for ServeConfig {
    /// The defaults of `semseg serve` with no flags and no environment, on 127.0.0.1 and an ephemeral port.
    fn default() -> Self {
        let workers = default_workers();
        Self {
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            workers,
            queue: 16,
            max_payload_bytes: (DEFAULT_MAX_PAYLOAD_MB << 20) as usize,
            decode: DecodeLimits {
                max_image_pixels: DEFAULT_MAX_IMAGE_PIXELS,
                max_probability_values: DEFAULT_MAX_PROBABILITY_VALUES,
            },
            inference: InferenceLimits::default(),
            request_timeout: Duration::from_secs(55),
            drain_timeout: Duration::from_secs(25),
            execution: ExecutionParameters {
                max_concurrent_transforms: workers,
                batch_strategy: BatchStrategy::SingleRecord,
                max_payload_in_mb: DEFAULT_MAX_PAYLOAD_MB,
            },
        }
    }
}

/// The loaded model and its workers.
struct Engine {
    inference: Arc<Inference>,
    pool: WorkerPool,
}

/// State shared by the handlers.
struct AppState {
    config: ServeConfig,
    engine: OnceLock<Engine>,
}

/// A server started by [`start`].
pub struct RunningServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningServer {
    /// The address it listens on (with the real port when the configured one was 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Wait until it has shut down (after the shutdown future resolved and the drain ended), or failed to load.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("the server task failed")?
    }
}

/// Bind, start serving at once, and load the model in the background (`/ping` answers 503 until `load` returns).
/// When `shutdown` resolves, the server stops accepting and drains in-flight requests for up to the drain timeout.
/// If loading fails the server stops and [`RunningServer::wait`] returns the error.
pub async fn start<L, S>(config: ServeConfig, load: L, shutdown: S) -> anyhow::Result<RunningServer>
where
    L: FnOnce() -> anyhow::Result<Arc<dyn Segmenter>> + Send + 'static,
    S: Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.addr))?;
    let addr = listener.local_addr().context("cannot read the listening address")?;
    let state = Arc::new(AppState {
        config,
        engine: OnceLock::new(),
    });
    let app = routes::router(Arc::clone(&state));
    tracing::info!(%addr, workers = state.config.workers, queue = state.config.queue, "listening");

    let (load_failed_tx, load_failed_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
    let loader_state = Arc::clone(&state);
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let loaded = load().and_then(|segmenter| {
            let inference = Arc::new(Inference::new(segmenter, loader_state.config.inference));
            let pool = WorkerPool::new(loader_state.config.workers, loader_state.config.queue)
                .context("cannot start the inference workers")?;
            Ok(Engine { inference, pool })
        });
        match loaded {
            Ok(engine) => {
                let classes = engine.inference.num_classes();
                if loader_state.engine.set(engine).is_err() {
                    tracing::error!("the model was loaded twice");
                }
                tracing::info!(
                    classes,
                    seconds = started.elapsed().as_secs_f64(),
                    "model loaded; /ping is healthy"
                );
            }
            Err(error) => {
                let _ = load_failed_tx.send(error);
            }
        }
    });

    let task = tokio::spawn(async move {
        let drain_started = Arc::new(tokio::sync::Notify::new());
        let (load_error_tx, mut load_error_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
        let signal_state = Arc::clone(&state);
        let notify = Arc::clone(&drain_started);
        let stop = async move {
            tokio::select! {
                () = shutdown => {
                    tracing::info!(
                        drain_timeout_s = signal_state.config.drain_timeout.as_secs_f64(),
                        "shutting down: no new connections, finishing in-flight requests"
                    );
                }
                Ok(error) = load_failed_rx => {
                    tracing::error!("cannot load the model: {error:#}");
                    let _ = load_error_tx.send(error);
                }
            }
            notify.notify_one();
        };
        let server = axum::serve(listener, app).with_graceful_shutdown(stop).into_future();
        let drain_limit = state.config.drain_timeout;
        let served = tokio::select! {
            result = server => result.context("the HTTP server failed"),
            () = async { drain_started.notified().await; tokio::time::sleep(drain_limit).await } => {
                tracing::warn!("the drain timeout passed with requests still in flight; stopping anyway");
                Ok(())
            }
        };
        if let Some(engine) = state.engine.get() {
            tracing::info!(
                busy = engine.pool.busy(),
                queued = engine.pool.queued(),
                "stopping the inference workers"
            );
        }
        let pool_state = Arc::clone(&state);
        let stopping = tokio::task::spawn_blocking(move || {
            if let Some(engine) = pool_state.engine.get() {
                engine.pool.shutdown();
            }
        });
        if tokio::time::timeout(Duration::from_secs(1), stopping).await.is_err() {
            tracing::warn!("inference workers still busy at exit");
        }
        if let Ok(error) = load_error_rx.try_recv() {
            return Err(error.context("the server stopped because the model could not be loaded"));
        }
        tracing::info!("server stopped");
        served
    });
    Ok(RunningServer { addr, task })
}

/// Resolves on SIGTERM (what SageMaker and `docker stop` send) or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C received"),
                }
            }
            Err(error) => {
                tracing::warn!("cannot listen for SIGTERM ({error}); only Ctrl-C stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `semseg serve`: serve the artifact in `<ml-root>/model` (or `--model`) until SIGTERM.
pub fn run(args: &ServeArgs, ml: &MlRoot) -> anyhow::Result<()> {
    let config = ServeConfig::from_args(args)?;
    let model_dir = args.model.clone().unwrap_or_else(|| ml.model_dir());
    let compute_args = args.compute;
    let load = move || {
        let compute = crate::compute::Compute::open(
            compute_args.device,
            compute_args.precision,
            crate::compute::Workload::Inference,
        )?;
        let segmenter = crate::infer::model_adapter::load(&model_dir, &compute)
            .with_context(|| format!("cannot load the model in {}", model_dir.display()))?;
        // Before /ping turns healthy: the first request should not pay for kernel loading and algorithm choice.
        let started = std::time::Instant::now();
        segmenter.warm_up().context("the model failed its warm-up run")?;
        tracing::info!(seconds = started.elapsed().as_secs_f64(), "model warmed up");
        Ok(segmenter)
    };
    run_until_signal(config, load, |_| {})
}

/// Serve on a runtime of its own until SIGTERM or Ctrl-C (blocking). `on_listening` gets the bound address (the real
/// port when 0 was asked for) before the model has necessarily loaded; `semseg demo` prints its curl line there.
pub fn run_until_signal<L>(config: ServeConfig, load: L, on_listening: impl FnOnce(SocketAddr)) -> anyhow::Result<()>
where
    L: FnOnce() -> anyhow::Result<Arc<dyn Segmenter>> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("http")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let server = start(config, load, shutdown_signal()).await?;
        on_listening(server.addr());
        server.wait().await
    })
}
