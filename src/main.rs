//! The `semseg` command line: one binary for SageMaker's `train` and `serve` and for local use.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use semseg::sagemaker::failure::{describe, write_failure};
use semseg::sagemaker::MlRoot;
use semseg::storage::model::FetchedModel;
use semseg::storage::stage::{stage_channels, ChannelSource};
use semseg::storage::{artifacts, CheckpointMirror, S3Store, S3Uri, StorageError, TransferOptions};
use semseg::synth::{self, SynthOptions};
use semseg::{demo, predict, serve, train};

#[derive(Debug, Parser)]
#[command(
    name = "semseg",
    version,
    about = "Train and serve semantic-segmentation networks (FCN, PSPNet, DeepLabV3) \
    following Amazon SageMaker's container contract."
)]
struct Cli {
    /// Root of the SageMaker directory layout (input/, model/, output/, checkpoints/). Point it at any directory to
    /// run the container contract outside a container.
    #[arg(long, global = true, env = "SEMSEG_ML_ROOT", default_value = semseg::sagemaker::paths::DEFAULT_ML_ROOT)]
    ml_root: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a SageMaker training job: read <ml-root>/input (config and channels), train, validate every epoch, keep the
    /// best model in <ml-root>/model, checkpoint to <ml-root>/checkpoints (and resume from there). On failure it writes
    /// the reason to <ml-root>/output/failure and exits non-zero. SIGTERM stops after checkpointing. Outside SageMaker,
    /// --channel, --output and --checkpoints do the platform's S3 transfers (see the README).
    Train(TrainArgs),
    /// Check a training job's inputs without training: config files, hyperparameters, channels, and every
    /// image/annotation pair (pairing, sizes, label values after the label map); then logs the least memory a
    /// training step will need. On failure it writes the reason to <ml-root>/output/failure and exits non-zero,
    /// exactly as `train` would.
    Check,
    /// Turn a torchvision-named state dict (a PyTorch `.pth` or safetensors, e.g. a model trained in PyTorch) into a semseg model
    /// artifact that `serve`, `predict` and incremental training load. Every tensor is checked; missing or mis-shaped
    /// ones are named.
    Import(ImportArgs),
    /// Write a trained model as an ONNX file (opset 17) for ONNX Runtime, TensorRT, OpenVINO and the like. Input
    /// `image`: float32 [N, 3, H, W], RGB values 0..255, any H and W (the model's normalisation is in the graph).
    /// Outputs at the input's size: `logits` float32 [N, C, H, W] and `mask` uint8 [N, H, W] (each pixel's class);
    /// with --probabilities also `probabilities` float32 [N, C, H, W].
    /// BatchNorm is folded into the convolutions; the auxiliary head is left out.
    Export(ExportArgs),
    /// Generate a seeded synthetic dataset in the SageMaker channel layout (train, validation, train_annotation,
    /// validation_annotation, label_map). `--out <ml-root>/input/data` makes a ready training job.
    Synth(SynthOptions),
    /// Serve a trained model with SageMaker's inference-container contract: GET /ping, POST /invocations,
    /// GET /execution-parameters on port 8080 (or SAGEMAKER_BIND_TO_PORT). Loads <ml-root>/model.
    Serve(serve::ServeArgs),
    /// Segment image files with a trained model: OUT/<stem>.png masks (as the endpoint returns them) and, with
    /// --probabilities, OUT/<stem>.npy float32 [C, H, W] softmax probabilities.
    Predict(predict::PredictArgs),
    /// The whole journey on an embedded default: generate a small synthetic dataset in a fresh ml-root (./demo-ml,
    /// deleted and recreated), train a ResNet-18 FCN on it (about 3 minutes on 2 CPU cores), then serve the model on
    /// port 8080 and print a curl command that segments one of its images. Ctrl-C stops it.
    Demo(demo::DemoArgs),
    /// Check the compute device's kernels against the CPU: convolution and BatchNorm forward and backward on small
    /// seeded tensors in each precision. Prints a JSON report and exits non-zero when a case is out of tolerance
    /// (the first thing to run on a new GPU machine).
    DeviceCheck(DeviceCheckArgs),
}

#[derive(Debug, clap::Args)]
struct DeviceCheckArgs {
    /// The device to check: auto, cpu, cuda or cuda:N.
    #[arg(long, env = "SEMSEG_DEVICE", default_value = "auto")]
    device: semseg::compute::DeviceChoice,
    /// Also write the JSON report to this file (stdout carries the log lines too).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Instead of checking, time each op of a training step alone at DeepLabV3-ResNet-50's shapes (crop 512, output
    /// stride 8) for this batch size, forward and forward + backward, in TF32 and bf16.
    #[arg(long, value_name = "BATCH")]
    timing: Option<usize>,
}

fn device_check(args: &DeviceCheckArgs) -> anyhow::Result<()> {
    let compute = semseg::compute::Compute::open(
        args.device,
        semseg::model::precision::Precision::Fp32,
        semseg::compute::Workload::Training,
    )?;
    if let Some(batch) = args.timing {
        anyhow::ensure!(batch > 0, "--timing needs a batch size of at least 1");
        let report = semseg::model::ops::op_timing::time_ops(&compute.device, batch)?;
        let text = serde_json::to_string_pretty(&report)?;
        println!("{text}");
        if let Some(path) = &args.out {
            std::fs::write(path, &text).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        }
        return Ok(());
    }
    let report = semseg::model::ops::device_check::compare_with_cpu(&compute.device)?;
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = &args.out {
        std::fs::write(path, &text).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    let failed: Vec<String> = report["cases"]
        .as_array()
        .map(|cases| {
            cases
                .iter()
                .filter(|case| case["pass"] != true)
                .map(|case| format!("{} {} {}", case["mode"], case["op"], case["case"]).replace('"', ""))
                .collect()
        })
        .unwrap_or_default();
    anyhow::ensure!(
        failed.is_empty() && report["pass"] == true,
        "out of tolerance: {}",
        failed.join("; ")
    );
    Ok(())
}

/// `semseg train` options: S3 transfers for runs outside SageMaker (AWS credentials, region and endpoint come from the
/// standard AWS environment: AWS_REGION, AWS_PROFILE, AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, ...).
#[derive(Debug, clap::Args)]
struct TrainArgs {
    /// Stage a channel from S3 before training: NAME=s3://bucket/prefix/ copies the prefix into
    /// <ml-root>/input/data/NAME (objects already there unchanged are skipped) and declares it in File mode.
    /// Repeatable.
    #[arg(long = "channel", value_name = "NAME=S3_URI")]
    channels: Vec<ChannelSource>,
    /// Upload model.tar.gz and output.tar.gz (output/data and the failure file) under this S3 prefix when the job
    /// ends, also when it fails.
    #[arg(long, value_name = "S3_URI")]
    output: Option<S3Uri>,
    /// Mirror <ml-root>/checkpoints to this S3 prefix after every save, and restore from it when the local
    /// directory is empty (resume after a lost spot instance).
    #[arg(long, value_name = "S3_URI")]
    checkpoints: Option<S3Uri>,
    /// Where to train: auto (the GPU when this build has CUDA and one is present, else the CPU), cpu, cuda or
    /// cuda:N. The precision is the `precision` hyperparameter.
    #[arg(long, env = "SEMSEG_DEVICE", default_value = "auto")]
    device: semseg::compute::DeviceChoice,
    #[command(flatten)]
    s3: S3Args,
}

impl TrainArgs {
    fn uses_s3(&self) -> bool {
        !self.channels.is_empty() || self.output.is_some() || self.checkpoints.is_some()
    }
}

/// How S3 transfers run.
#[derive(Debug, Clone, clap::Args)]
struct S3Args {
    /// Uploads larger than this many MiB go in parts of this size (S3's minimum part is 5 MiB).
    #[arg(long, env = "SEMSEG_S3_PART_SIZE_MIB", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(5..=5120))]
    s3_part_size_mib: u64,
    /// Objects (or parts) transferred at the same time.
    #[arg(long, env = "SEMSEG_S3_CONCURRENCY", default_value_t = 8,
          value_parser = clap::value_parser!(u64).range(1..=64))]
    s3_concurrency: u64,
}

impl S3Args {
    fn connect(&self) -> Result<S3Store, StorageError> {
        S3Store::from_env(TransferOptions {
            part_size: self.s3_part_size_mib * 1024 * 1024,
            concurrency: self.s3_concurrency as usize,
            ..TransferOptions::default()
        })
    }
}

#[derive(Debug, clap::Args)]
struct ImportArgs {
    /// The state dict with torchvision's names (`backbone.layer1.0.conv1.weight`, `classifier.4.weight`): a file saved
    /// by `torch.save` (`.pth`, `.pt`, `.bin`) or safetensors.
    #[arg(long, value_name = "FILE")]
    torchvision: PathBuf,
    /// Segmentation head: fcn, psp or deeplab.
    #[arg(long)]
    algorithm: semseg::model::config::Algorithm,
    /// Backbone: resnet-18, resnet-34, resnet-50 or resnet-101.
    #[arg(long)]
    backbone: semseg::model::config::Backbone,
    /// Number of classes of the classifier.
    #[arg(long)]
    num_classes: usize,
    /// Backbone output stride the model was trained with (torchvision's segmentation models use 8).
    #[arg(long, default_value_t = 8)]
    output_stride: u32,
    /// Output directory for model.safetensors + model.json.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

#[derive(Debug, clap::Args)]
struct ExportArgs {
    /// The model: a trained artifact's directory (a model.tar.gz in it is extracted first) or an s3:// URI of a
    /// model.tar.gz or its prefix.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// The ONNX file to write.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Also output `probabilities`, the softmax over the classes (ONNX Runtime then computes it on every run,
    /// whichever outputs are asked for).
    #[arg(long)]
    probabilities: bool,
}

fn export(args: &ExportArgs) -> anyhow::Result<()> {
    let fetched = fetch_s3_model(Some(&args.model))?;
    let model = fetched.as_ref().map_or(args.model.as_path(), |f| f.dir());
    let options = semseg::export::ExportOptions {
        probabilities: args.probabilities,
    };
    let summary = semseg::export::export_model_dir(model, &args.out, options)?;
    tracing::info!(
        nodes = summary.nodes,
        parameters = summary.parameters,
        mib = format!("{:.1}", summary.bytes as f64 / (1 << 20) as f64),
        "exported {} to {}",
        args.model.display(),
        summary.path.display()
    );
    Ok(())
}

fn import(args: &ImportArgs) -> anyhow::Result<()> {
    use semseg::model::config::{ModelConfig, OutputStride};
    let config = ModelConfig::new(
        args.algorithm,
        args.backbone,
        args.num_classes,
        OutputStride::try_from(args.output_stride)?,
        false,
    )?;
    let meta = semseg::model::artifact::import_torchvision(
        &args.torchvision,
        semseg::model::artifact::ModelMeta::new(&config),
        &args.out,
    )?;
    tracing::info!(model = %config, aux = meta.aux, "imported {} into {}", args.torchvision.display(), args.out.display());
    Ok(())
}

fn main() -> ExitCode {
    semseg::process::tune();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The demo deletes its directory: only an --ml-root typed on the command line may point it elsewhere.
    let ml_root_typed = matches.value_source("ml_root") == Some(ValueSource::CommandLine);
    init_logging();
    let ml = MlRoot::new(&cli.ml_root);
    match cli.command {
        Command::Train(args) => train_job(&ml, &args),
        Command::Check => run_job(&ml, "check", || train::job::check(&ml)),
        Command::Import(args) => report("import", import(&args)),
        Command::Export(args) => report("export", export(&args)),
        Command::Synth(options) => match synth::generate(&options) {
            Ok(summary) => {
                tracing::info!(?summary, out = %options.out.display(), "synthetic dataset written");
                ExitCode::SUCCESS
            }
            Err(error) => {
                tracing::error!("synth failed: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Serve(mut args) => report(
            "serve",
            (|| {
                // An s3:// model is fetched into a temporary directory, which then serves as --model.
                let fetched = fetch_s3_model(args.model.as_deref())?;
                if let Some(fetched) = &fetched {
                    args.model = Some(fetched.dir().to_path_buf());
                }
                serve::run(&args, &ml)
            })(),
        ),
        Command::Predict(mut args) => report(
            "predict",
            (|| {
                let fetched = fetch_s3_model(Some(&args.model))?;
                if let Some(fetched) = &fetched {
                    args.model = fetched.dir().to_path_buf();
                }
                predict::run(&args).map(|_| ())
            })(),
        ),
        Command::Demo(args) => report("demo", demo::run(&args, ml_root_typed.then_some(cli.ml_root.as_path()))),
        Command::DeviceCheck(args) => report("device-check", device_check(&args)),
    }
}

/// `semseg train`: stage S3 channels and restore S3 checkpoints if asked, run the job (mirroring checkpoints), then
/// upload the artifacts if asked, also after a failure, so the failure file reaches S3.
fn train_job(ml: &MlRoot, args: &TrainArgs) -> ExitCode {
    // Kept past the job for the artifact upload.
    let mut connected: Option<Arc<S3Store>> = None;
    let code = run_job(ml, "train", || {
        let store = if args.uses_s3() {
            Some(Arc::new(args.s3.connect()?))
        } else {
            None
        };
        connected = store.clone();
        let mut mirror = None;
        if let Some(store) = &store {
            if !args.channels.is_empty() {
                stage_channels(store, ml, &args.channels)?;
            }
            if let Some(uri) = &args.checkpoints {
                let checkpoints = CheckpointMirror::new(Arc::clone(store), uri);
                checkpoints.restore_if_empty(&ml.checkpoints_dir())?;
                mirror = Some(checkpoints);
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))?;
        signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;
        let outcome = train::job::run_mirrored(ml, &stop, args.device, mirror.as_ref())?;
        tracing::info!(?outcome, "training finished");
        Ok(())
    });
    let Some(output) = &args.output else { return code };
    let uploaded = match connected {
        Some(store) => artifacts::upload_job_artifacts(&store, ml, output),
        // The client could not be built inside the job: that failure is already in output/failure.
        None => args
            .s3
            .connect()
            .and_then(|store| artifacts::upload_job_artifacts(&store, ml, output)),
    };
    match uploaded {
        Ok(objects) => {
            tracing::info!(
                "artifacts uploaded: {}",
                objects.iter().map(|o| o.to_string()).collect::<Vec<_>>().join(", ")
            );
            code
        }
        Err(error) => {
            let reason = format!("cannot upload the job's artifacts to {output}: {error}");
            tracing::error!("train failed: {reason}");
            if let Err(io) = write_failure(&ml.failure_file(), &reason) {
                tracing::error!("cannot write the failure file {}: {io}", ml.failure_file().display());
            }
            ExitCode::FAILURE
        }
    }
}

/// For a `--model s3://...`: the model fetched into a temporary directory (removed when dropped).
fn fetch_s3_model(model: Option<&Path>) -> anyhow::Result<Option<FetchedModel>> {
    let Some(uri) = model.and_then(S3Uri::from_path) else {
        return Ok(None);
    };
    let uri = uri?;
    let store = S3Store::from_env(TransferOptions::default())?;
    Ok(Some(FetchedModel::fetch(&store, &uri)?))
}

/// Log a command's error and map it to the exit code.
fn report(command: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{command} failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Run one step of a training job: on error, log it and write SageMaker's failure file, then exit non-zero.
fn run_job(ml: &MlRoot, step: &str, job: impl FnOnce() -> anyhow::Result<()>) -> ExitCode {
    // A failure file left by an earlier run in the same ml-root would describe a failure that is not this one.
    if let Err(e) = std::fs::remove_file(ml.failure_file()) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(
                "cannot remove the stale failure file {}: {e}",
                ml.failure_file().display()
            );
        }
    }
    match job() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let reason = describe(&error);
            tracing::error!("{step} failed: {reason}");
            if let Err(io) = write_failure(&ml.failure_file(), &reason) {
                tracing::error!("cannot write the failure file {}: {io}", ml.failure_file().display());
            }
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stdout (CloudWatch captures it), `RUST_LOG` filters (default `info`).
fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_ansi(std::io::stdout().is_terminal())
        .with_target(false)
        .init();
}
