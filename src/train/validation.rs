//! Scoring the network on the validation channel after each epoch.
//!
//! Validation runs the inference network (the training network's BatchNorms folded into its convolutions, the
//! auxiliary head dropped, as `serve` and `predict` run it) on the validation loader's batches, in one of two ways:
//!
//! - **Crops** (`validation_mini_batch_size` > 1): batches of centre crops of `crop_size` after resizing the short
//!   side to it (GluonCV's validation transform), scored as one tensor.
//! - **Whole images** (`validation_mini_batch_size` = 1): each image through [`crate::infer::Inference`], the path
//!   `serve` and `predict` answer with, at its default limits: an image over 1 Mpx is downscaled for the network
//!   and its probabilities upsampled back, so the score is the one the endpoint's masks would get, scored against
//!   the full-size annotation. It also bounds the memory: at its own size a 64 Mpx image (the decoder's limit) would
//!   need tens of GB for a ResNet-50 network's features.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use super::metrics::{ConfusionMatrix, Scores};
use crate::compute::ImageSizedShapes;
use crate::data::augment::denormalised_rgb;
use crate::data::epoch_source::EpochSource;
use crate::data::loader::{Batch, LoaderConfig, Mode};
use crate::infer::model_adapter::ModelSegmenter;
use crate::infer::{Inference, InferenceLimits};
use crate::model::artifact::{InferenceModel, ModelMeta};
use crate::model::SegmentationModel;
use crate::sagemaker::Hyperparameters;

/// Score `model` on every validation example after `epoch` (from 0; a Pipe-mode channel reads its next FIFO);
/// `None` when SIGTERM arrived meanwhile.
///
/// The folded network's tensors are detached from the job's variables. Run on the training network itself, every
/// op of a forward recorded its inputs for a backward that never comes (Candle records ops on any input that
/// tracks gradients), so a batch held its whole graph until its logits were dropped: FCN-ResNet-50 validating 3
/// crops of 512² peaked at 7.8 GB against the training step's 3.3 GB at batch 2; and it ran the auxiliary head
/// and the training path's kernels for nothing.
pub fn validate(
    model: &SegmentationModel,
    validation: &EpochSource,
    epoch: u32,
    hp: &Hyperparameters,
    device: &Device,
    stop: &AtomicBool,
) -> Result<Option<Scores>> {
    let model = model.fold_batchnorm()?;
    let config = LoaderConfig::validation(hp.validation_mini_batch_size as usize, hp.crop_size);
    let scorer = if config.mode == Mode::WholeImage {
        let meta = ModelMeta::new(model.config());
        let segmenter = ModelSegmenter::new(InferenceModel::from_folded(meta, model)?, device.clone());
        Scorer::WholeImages(Inference::new(Arc::new(segmenter), InferenceLimits::default()))
    } else {
        Scorer::Crops(Box::new(model))
    };
    // Whole images keep their own sizes: a GPU takes cuDNN's heuristics for them rather than timing each new size.
    let _shapes = matches!(scorer, Scorer::WholeImages(_)).then(ImageSizedShapes::enter);
    let loader = validation.batches(u64::from(epoch), config)?;
    let mut confusion = ConfusionMatrix::new(hp.num_classes as usize);
    for batch in loader {
        if stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        scorer.score(batch?, device, &mut confusion)?;
    }
    Ok(Some(confusion.scores()))
}

/// How validation runs the folded network on a batch.
enum Scorer {
    Crops(Box<SegmentationModel>),
    WholeImages(Inference),
}

impl Scorer {
    /// Adds `batch`'s predictions against its labels to `confusion`.
    fn score(&self, batch: Batch, device: &Device, confusion: &mut ConfusionMatrix) -> Result<()> {
        let (h, w) = (batch.height as usize, batch.width as usize);
        match self {
            Scorer::Crops(model) => {
                let x = Tensor::from_vec(batch.images, (batch.n, 3, h, w), device)?;
                let prediction = model.forward_t(&x, false)?.out.argmax(1)?.to_dtype(DType::U8)?; // [N, H, W]
                confusion.update(&batch.labels, &prediction.flatten_all()?.to_vec1::<u8>()?);
            }
            Scorer::WholeImages(inference) => {
                // One image a batch (batches of several whole images are padded to the largest: 255 labels).
                let images = batch.images.chunks_exact(3 * h * w);
                for ((image, labels), stem) in images.zip(batch.labels.chunks_exact(h * w)).zip(&batch.stems) {
                    let image = denormalised_rgb(image, batch.width, batch.height)
                        .context("a validation batch does not hold its images' pixels")?;
                    let mask = inference
                        .mask(&image)
                        .with_context(|| format!("validating image {stem}"))?;
                    confusion.update(labels, mask.labels());
                }
            }
        }
        Ok(())
    }
}
