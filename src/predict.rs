//! `semseg predict`: the endpoint's inference on local files. For each image it writes `OUT/<stem>.png`, the same
//! palette mask `POST /invocations` returns, and with `--probabilities` `OUT/<stem>.npy`, the softmax probabilities as
//! float32 `[C, H, W]` (readable by `numpy.load`).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::compute::{Compute, ComputeArgs, Workload};
use crate::data::image_io;
use crate::infer::model_adapter;
use crate::infer::{encode, Inference, InferenceLimits, DEFAULT_MAX_MODEL_PIXELS};

#[derive(Clone, Debug, clap::Args)]
pub struct PredictArgs {
    /// Model directory: a trained artifact (a model.tar.gz in it is extracted first).
    #[arg(long)]
    pub model: PathBuf,
    /// JPEG or PNG images to segment.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Output directory (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Also write `<stem>.npy`: float32 softmax probabilities, shape [C, H, W].
    #[arg(long)]
    pub probabilities: bool,
    /// Images with more pixels are downscaled to this many before the network runs (outputs stay full size).
    #[arg(long, env = "SEMSEG_MAX_MODEL_PIXELS", default_value_t = DEFAULT_MAX_MODEL_PIXELS)]
    pub max_model_pixels: u64,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// What one image produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Predicted {
    pub image: PathBuf,
    pub mask: PathBuf,
    pub probabilities: Option<PathBuf>,
}

/// `semseg predict`.
pub fn run(args: &PredictArgs) -> anyhow::Result<Vec<Predicted>> {
    let stems = output_stems(&args.images)?;
    let compute = Compute::open(args.compute.device, args.compute.precision, Workload::Inference)?;
    let segmenter = model_adapter::load(&args.model, &compute)
        .with_context(|| format!("cannot load the model in {}", args.model.display()))?;
    let inference = Inference::new(
        segmenter,
        InferenceLimits {
            max_model_pixels: args.max_model_pixels.max(1),
            ..InferenceLimits::default()
        },
    );
    predict_files(&inference, &args.images, &stems, &args.out, args.probabilities)
}

/// Segment `images` (named `stems` in `out`) with `inference`.
pub fn predict_files(
    inference: &Inference,
    images: &[PathBuf],
    stems: &[String],
    out: &Path,
    probabilities: bool,
) -> anyhow::Result<Vec<Predicted>> {
    fs::create_dir_all(out).with_context(|| format!("cannot create the output directory {}", out.display()))?;
    let mut done = Vec::with_capacity(images.len());
    for (path, stem) in images.iter().zip(stems) {
        let started = std::time::Instant::now();
        let image = image_io::read_rgb_with_budget(path, image_io::DEFAULT_MAX_PIXELS)?;
        let mask_path = out.join(format!("{stem}.png"));
        let npy_path = out.join(format!("{stem}.npy"));
        let mask = if probabilities {
            let p = inference
                .probabilities(&image)
                .with_context(|| format!("inference failed on {}", path.display()))?;
            let mut file = BufWriter::new(
                File::create(&npy_path).with_context(|| format!("cannot create {}", npy_path.display()))?,
            );
            encode::write_npy(&mut file, &p).with_context(|| format!("cannot write {}", npy_path.display()))?;
            p.argmax()
        } else {
            inference
                .mask(&image)
                .with_context(|| format!("inference failed on {}", path.display()))?
        };
        let png = encode::mask_png(&mask).with_context(|| format!("cannot encode the mask of {}", path.display()))?;
        fs::write(&mask_path, png).with_context(|| format!("cannot write {}", mask_path.display()))?;
        tracing::info!(
            image = %path.display(),
            width = image.width(),
            height = image.height(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            mask = %mask_path.display(),
            "segmented"
        );
        done.push(Predicted {
            image: path.clone(),
            mask: mask_path,
            probabilities: probabilities.then_some(npy_path),
        });
    }
    Ok(done)
}

/// The output name of each image: its file stem, which must be unique among the inputs.
pub fn output_stems(images: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let mut seen: HashMap<String, &Path> = HashMap::new();
    let mut stems = Vec::with_capacity(images.len());
    for path in images {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| !s.is_empty())
            .with_context(|| format!("{} has no file name", path.display()))?;
        if let Some(first) = seen.insert(stem.clone(), path) {
            anyhow::bail!(
                "{} and {} would both be written as {stem}.png; rename one or run them separately",
                first.display(),
                path.display()
            );
        }
        stems.push(stem);
    }
    Ok(stems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::NearestColour;
    use std::sync::Arc;

    #[test]
    fn writes_masks_and_npy() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let img = image::RgbImage::from_fn(8, 4, |x, _| {
            if x < 4 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 0])
            }
        });
        let input = dir.path().join("a.png");
        img.save(&input)?;
        let inference = Inference::new(
            Arc::new(NearestColour::new(vec![[0, 0, 0], [255, 0, 0]])),
            InferenceLimits::default(),
        );
        let out = dir.path().join("out");
        let images = vec![input];
        let done = predict_files(&inference, &images, &output_stems(&images)?, &out, true)?;
        assert_eq!(done[0].mask, out.join("a.png"));
        let mask = image::open(&done[0].mask)?;
        assert_eq!((mask.width(), mask.height()), (8, 4));
        let npy = fs::read(out.join("a.npy"))?;
        assert_eq!(
            npy.len() - usize::from(u16::from_le_bytes([npy[8], npy[9]])) - 10,
            2 * 8 * 4 * 4
        );
        Ok(())
    }

    #[test]
    fn duplicate_stems_are_refused() {
        let err = output_stems(&[PathBuf::from("a/x.jpg"), PathBuf::from("b/x.png")])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("x.png"), "{err}");
    }
}
