//! Scoring the network on the validation channel after each epoch.
//!
//! Validation feeds the inference network (the training network's BatchNorms folded into its convolutions, the
//! auxiliary head dropped, as `serve` and `predict` run it) with the validation loader's batches:
//! centre crops of `crop_size` after resizing the short side to it (GluonCV's validation transform), or whole images
//! at their own size when `validation_mini_batch_size` is 1. It does not go through [`crate::infer`] (which serves one
//! image at a time, resized to a pixel budget); the model `semseg predict` and `serve` load is checked against the
//! best epoch's score by the end-to-end tests instead.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::metrics::{ConfusionMatrix, Scores};
use crate::compute::ImageSizedShapes;
use crate::data::epoch_source::EpochSource;
use crate::data::loader::LoaderConfig;
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
    // Whole images keep their own sizes: a GPU takes cuDNN's heuristics for them rather than timing each new size.
    let _shapes = (hp.validation_mini_batch_size == 1).then(ImageSizedShapes::enter);
    let loader = validation.batches(u64::from(epoch), config)?;
    let mut confusion = ConfusionMatrix::new(hp.num_classes as usize);
    for batch in loader {
        if stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let batch = batch?;
        let (h, w) = (batch.height as usize, batch.width as usize);
        let x = Tensor::from_vec(batch.images, (batch.n, 3, h, w), device)?;
        let prediction = model.forward_t(&x, false)?.out.argmax(1)?.to_dtype(DType::U8)?; // [N, H, W]
        confusion.update(&batch.labels, &prediction.flatten_all()?.to_vec1::<u8>()?);
    }
    Ok(Some(confusion.scores()))
}
