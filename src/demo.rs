//! `semseg demo`: the README's first command, in one process. It generates a small synthetic dataset in a fresh
//! ml-root (`./demo-ml` by default), trains a ResNet-18 FCN on the CPU for a couple of minutes with the usual
//! per-epoch `#metrics` lines, segments one validation image with the trained model (`output/data/mask.png`, and
//! `mask-side-by-side.png`: the image beside its coloured mask, for a person to look at), then serves the model on
//! port 8080 and prints a curl command that turns the same JPEG into `mask.png`.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use image::{Rgb, RgbImage};

use crate::compute::{Compute, ComputeArgs, Workload};
use crate::data::image_io::read_rgb;
use crate::infer::encode::{mask_png, voc_palette};
use crate::infer::{model_adapter, Inference, Mask};
use crate::sagemaker::MlRoot;
use crate::serve::{self, ServeConfig};
use crate::synth::{self, SynthOptions};
use crate::train;

/// Default demo directory, relative to the working directory.
pub const DEFAULT_DIR: &str = "demo-ml";
/// Default epochs: the CI recipe's (tests/train_job.rs): validation mIOU 0.87 for about 210 s of CPU time (16 epochs
/// stop near 0.78).
pub const DEFAULT_EPOCHS: u32 = 30;
/// The demo's own prediction on its sample image, in output/data: the mask as the server returns it...
const MASK_FILE: &str = "mask.png";
/// ... and the image beside that mask in the palette's colours.
const SIDE_BY_SIDE_FILE: &str = "mask-side-by-side.png";
/// Written into the demo directory so a later run knows it may delete it.
const MARKER: &str = ".semseg-demo";
/// What a demo ml-root holds at its top level; anything else means the directory is someone else's.
const DEMO_ENTRIES: [&str; 6] = ["input", "model", "output", "checkpoints", "tmp", MARKER];

/// `semseg demo` options.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// The demo's ml-root (default ./demo-ml; `--ml-root` given on the command line works too). It is deleted and
    /// recreated, so it must be empty, absent, or an earlier demo's.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Training epochs.
    #[arg(long, default_value_t = DEFAULT_EPOCHS, value_parser = clap::value_parser!(u32).range(1..))]
    pub epochs: u32,
    /// Port to serve the trained model on (0: any free port, shown in the curl line).
    #[arg(long, env = "SAGEMAKER_BIND_TO_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Train and exit without serving.
    #[arg(long)]
    pub no_serve: bool,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// Run the demo. `ml_root` is the global `--ml-root` when it was given on the command line (never the default or
/// `SEMSEG_ML_ROOT`, because the demo deletes its directory).
pub fn run(args: &DemoArgs, ml_root: Option<&Path>) -> Result<()> {
    // Registered first, so Ctrl-C during training stops after the current step instead of killing the process.
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;

    let dir = demo_dir(args.dir.as_deref(), ml_root)?;
    reset_dir(&dir)?;
    let ml = MlRoot::new(&dir);
    let summary = synth::generate(&synth_options(&ml))?;
    tracing::info!("{summary}");
    write_hyperparameters(&ml, args.epochs, summary.train_count)?;

    tracing::info!(
        epochs = args.epochs,
        "training a ResNet-18 FCN from scratch; each epoch logs its #metrics lines"
    );
    match train::job::run(&ml, &stop, args.compute.device).context("the demo's training job failed")? {
        train::job::Outcome::Interrupted { epochs } => {
            tracing::warn!(epochs, "training interrupted; not serving");
            return Ok(());
        }
        outcome => tracing::info!(?outcome, "training finished"),
    }
    if stop.load(Ordering::SeqCst) {
        return Ok(());
    }

    let image = first_validation_image(&ml)?;
    let model_dir = ml.model_dir();
    // Loaded before listening, so the curl line works as soon as it is printed. Served as `serve` serves: a curl
    // call's image may have any size, so new shapes take cuDNN's heuristics rather than timing every layer.
    let compute = Compute::open(args.compute.device, args.compute.precision, Workload::Inference)?;
    let segmenter = model_adapter::load(&model_dir, &compute)
        .with_context(|| format!("cannot load the model in {}", model_dir.display()))?;
    let config = ServeConfig {
        addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), args.port),
        ..ServeConfig::default()
    };
    // The same inference and limits as the server's, so mask.png is what the curl line gets back.
    let inference = Inference::new(Arc::clone(&segmenter), config.inference);
    let side_by_side = write_sample_prediction(&inference, &image, &ml.output_data_dir())?;
    tracing::info!(image = %image.display(), picture = %side_by_side.display(), "sample image segmented");

    if args.no_serve {
        println!(
            "\nTrained: {}\nIts mask of {}: {} (beside the image in {}).\nServe it with: semseg --ml-root {} serve\n",
            ml.model_dir().display(),
            image.display(),
            ml.output_data_dir().join(MASK_FILE).display(),
            side_by_side.display(),
            shell_quote(&dir.display().to_string())
        );
        return Ok(());
    }

    serve::run_until_signal(
        config,
        move || Ok(segmenter),
        |addr| {
            println!("{}", serving_message(&ml, &image, addr.port()));
        },
    )
}

/// `--dir`, else a command-line `--ml-root`, else ./demo-ml; as an absolute path, for the curl line.
fn demo_dir(dir: Option<&Path>, ml_root: Option<&Path>) -> Result<PathBuf> {
    let chosen = match (dir, ml_root) {
        (Some(d), Some(m)) if d != m => bail!(
            "--dir {} and --ml-root {} disagree; give one of them",
            d.display(),
            m.display()
        ),
        (Some(d), _) | (None, Some(d)) => d.to_path_buf(),
        (None, None) => PathBuf::from(DEFAULT_DIR),
    };
    std::path::absolute(&chosen).with_context(|| format!("cannot resolve {}", chosen.display()))
}

/// Delete and recreate `dir`, refusing a directory that is neither empty nor an earlier demo's.
fn reset_dir(dir: &Path) -> Result<()> {
    match fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
        Ok(entries) => {
            let names: Vec<String> = entries
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<std::io::Result<_>>()
                .with_context(|| format!("cannot read {}", dir.display()))?;
            // scripts/demo.sh wrote no marker; its directory was always called demo-ml.
            let earlier_demo = dir.join(MARKER).is_file() || dir.file_name() == Some(std::ffi::OsStr::new(DEFAULT_DIR));
            let foreign: Vec<&String> = names.iter().filter(|n| !DEMO_ENTRIES.contains(&n.as_str())).collect();
            if !names.is_empty() && (!earlier_demo || !foreign.is_empty()) {
                bail!(
                    "{} is not empty and not an earlier demo's (it holds {}); the demo deletes its directory, so \
                     choose another --dir or remove it yourself",
                    dir.display(),
                    names.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
                );
            }
            fs::remove_dir_all(dir).with_context(|| format!("cannot delete {}", dir.display()))?;
        }
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    fs::write(
        dir.join(MARKER),
        "made by `semseg demo`, which deletes this directory when it runs again\n",
    )
    .with_context(|| format!("cannot write {}", dir.join(MARKER).display()))
}

/// The CI recipe's dataset (tests/train_job.rs): 24 + 8 images of 96 × 72 px, 4 classes. At 64 × 48 the shapes
/// span too few output-stride-8 cells for a clean mask (even a perfect stride-8 map scores only about 0.83 there).
fn synth_options(ml: &MlRoot) -> SynthOptions {
    SynthOptions {
        out: ml.data_dir(),
        seed: 5,
        train_count: 24,
        validation_count: 8,
        width: 96,
        height: 72,
        ..SynthOptions::default()
    }
}

/// The CI recipe (tests/train_job.rs): a ResNet-18 FCN from scratch, crop 64, batch 4, SGD momentum with a high
/// learning rate on the poly schedule; seeded, so every demo trains the same network.
fn write_hyperparameters(ml: &MlRoot, epochs: u32, train_count: usize) -> Result<()> {
    let hp = serde_json::json!({
        "num_classes": "4",
        "num_training_samples": train_count.to_string(),
        "backbone": "resnet-18",
        "algorithm": "fcn",
        "use_pretrained_model": "False",
        "crop_size": "64",
        "base_size": "96",
        "epochs": epochs.to_string(),
        "mini_batch_size": "4",
        "validation_mini_batch_size": "1",
        "learning_rate": "0.05",
        "output_stride": "8",
        "seed": "1",
    });
    let path = ml.hyperparameters_file();
    fs::create_dir_all(ml.config_dir()).with_context(|| format!("cannot create {}", ml.config_dir().display()))?;
    fs::write(&path, serde_json::to_vec_pretty(&hp)?).with_context(|| format!("cannot write {}", path.display()))
}

fn first_validation_image(ml: &MlRoot) -> Result<PathBuf> {
    let dir = ml.channel_dir("validation");
    let mut images: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
        .collect();
    images.sort();
    images
        .into_iter()
        .next()
        .with_context(|| format!("no JPEG in {}", dir.display()))
}

/// Segment `image` and write, into `dir`, its mask (the PNG the server answers with) and the image beside the mask
/// in colour; returns the side-by-side picture's path.
fn write_sample_prediction(inference: &Inference, image: &Path, dir: &Path) -> Result<PathBuf> {
    let rgb = read_rgb(image).with_context(|| format!("cannot read the sample image {}", image.display()))?;
    let mask = inference
        .mask(&rgb)
        .with_context(|| format!("cannot segment {}", image.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mask_path = dir.join(MASK_FILE);
    let png = mask_png(&mask).with_context(|| format!("cannot encode {}", mask_path.display()))?;
    fs::write(&mask_path, png).with_context(|| format!("cannot write {}", mask_path.display()))?;
    let picture_path = dir.join(SIDE_BY_SIDE_FILE);
    side_by_side(&rgb, &mask)?
        .save(&picture_path)
        .with_context(|| format!("cannot write {}", picture_path.display()))?;
    Ok(picture_path)
}

/// `image` on the left, `mask` on the right in the mask PNG's palette colours (0 black, 1 dark red, 2 dark green,
/// 3 olive, ...): twice the image's width, its height.
fn side_by_side(image: &RgbImage, mask: &Mask) -> Result<RgbImage> {
    let (width, height) = image.dimensions();
    ensure!(
        (mask.width(), mask.height()) == (width as usize, height as usize),
        "the mask is {}x{} but the image {width}x{height}",
        mask.width(),
        mask.height()
    );
    let palette = voc_palette();
    let mut picture = RgbImage::new(2 * width, height);
    image::imageops::replace(&mut picture, image, 0, 0);
    for (index, &label) in mask.labels().iter().enumerate() {
        let (x, y) = (index % mask.width(), index / mask.width());
        picture.put_pixel(width + x as u32, y as u32, Rgb(palette[usize::from(label)]));
    }
    Ok(picture)
}

/// What to do next, once the server listens.
fn serving_message(ml: &MlRoot, image: &Path, port: u16) -> String {
    format!(
        "\nTrained: {model} (metrics per epoch in {history}, curves in training.png beside it).\n\
         Its mask of that image: {mask} (beside the image in {picture}).\n\
         Serving it on port {port}. In another terminal:\n\n  \
         curl -s -X POST -H 'Content-Type: image/jpeg' --data-binary @{image} \\\n       \
         http://localhost:{port}/invocations -o mask.png\n\n\
         mask.png is a palette PNG whose pixel values are class indices. Ctrl-C stops the server.\n",
        model = ml.model_dir().display(),
        history = ml.output_data_dir().join("history.json").display(),
        mask = ml.output_data_dir().join(MASK_FILE).display(),
        picture = ml.output_data_dir().join(SIDE_BY_SIDE_FILE).display(),
        image = shell_quote(&image.display().to_string()),
    )
}

/// `s` as one shell word: unchanged when it holds only safe characters, else single-quoted.
fn shell_quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dir_comes_from_dir_or_ml_root_and_they_must_agree() -> Result<()> {
        assert!(demo_dir(None, None)?.ends_with(DEFAULT_DIR));
        assert!(demo_dir(None, None)?.is_absolute());
        assert_eq!(demo_dir(Some(Path::new("/a")), None)?, PathBuf::from("/a"));
        assert_eq!(demo_dir(None, Some(Path::new("/b")))?, PathBuf::from("/b"));
        assert_eq!(
            demo_dir(Some(Path::new("/a")), Some(Path::new("/a")))?,
            PathBuf::from("/a")
        );
        assert!(demo_dir(Some(Path::new("/a")), Some(Path::new("/b"))).is_err());
        Ok(())
    }

    #[test]
    fn only_empty_or_earlier_demo_directories_are_deleted() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let fresh = tmp.path().join("fresh");
        reset_dir(&fresh)?;
        assert!(fresh.join(MARKER).is_file());
        fs::create_dir_all(fresh.join("input/data"))?;
        reset_dir(&fresh)?; // an earlier demo's: deleted and recreated
        assert!(!fresh.join("input").exists());

        let foreign = tmp.path().join("mine");
        fs::create_dir_all(foreign.join("input/data"))?;
        let error = reset_dir(&foreign).unwrap_err().to_string();
        assert!(error.contains("not an earlier demo's"), "{error}");
        assert!(foreign.join("input/data").is_dir());

        fs::write(fresh.join("notes.txt"), "keep")?;
        assert!(
            reset_dir(&fresh).is_err(),
            "a demo directory with foreign files is kept"
        );

        let legacy = tmp.path().join(DEFAULT_DIR);
        fs::create_dir_all(legacy.join("input/config"))?;
        fs::create_dir_all(legacy.join("model"))?;
        reset_dir(&legacy)?; // what scripts/demo.sh left behind
        assert!(!legacy.join("model").exists());
        Ok(())
    }

    #[test]
    fn shell_words_are_quoted_when_needed() {
        assert_eq!(shell_quote("/tmp/demo-ml/a_1.jpg"), "/tmp/demo-ml/a_1.jpg");
        assert_eq!(shell_quote("/tmp/my demo/a.jpg"), "'/tmp/my demo/a.jpg'");
        assert_eq!(shell_quote("/tmp/it's"), r"'/tmp/it'\''s'");
    }

    #[test]
    fn the_message_names_the_image_and_the_real_port() {
        let ml = MlRoot::new("/tmp/d");
        let message = serving_message(&ml, Path::new("/tmp/d/input/data/validation/img_00024.jpg"), 41234);
        assert!(
            message.contains("--data-binary @/tmp/d/input/data/validation/img_00024.jpg"),
            "{message}"
        );
        assert!(
            message.contains("http://localhost:41234/invocations -o mask.png"),
            "{message}"
        );
        assert!(
            message
                .contains("/tmp/d/output/data/mask.png (beside the image in /tmp/d/output/data/mask-side-by-side.png)"),
            "{message}"
        );
    }

    #[test]
    fn the_side_by_side_picture_is_the_image_then_the_mask_in_palette_colours() -> Result<()> {
        let image = RgbImage::from_fn(3, 2, |x, y| Rgb([10 * x as u8, 20 * y as u8, 7]));
        let mask = Mask::new(3, 2, vec![0, 1, 2, 3, 255, 1])?;
        let picture = side_by_side(&image, &mask)?;
        assert_eq!(picture.dimensions(), (6, 2));
        for (x, y, pixel) in image.enumerate_pixels() {
            assert_eq!(picture.get_pixel(x, y), pixel, "left half at ({x}, {y})");
        }
        let right: Vec<[u8; 3]> = (0..2)
            .flat_map(|y| (3..6).map(move |x| (x, y)))
            .map(|(x, y)| picture.get_pixel(x, y).0)
            .collect();
        let expected = [
            [0, 0, 0],
            [128, 0, 0],
            [0, 128, 0],
            [128, 128, 0],
            [224, 224, 192],
            [128, 0, 0],
        ];
        assert_eq!(right, expected);

        let wrong = Mask::new(2, 2, vec![0; 4])?;
        let error = side_by_side(&image, &wrong).unwrap_err().to_string();
        assert!(error.contains("2x2") && error.contains("3x2"), "{error}");
        Ok(())
    }
}
