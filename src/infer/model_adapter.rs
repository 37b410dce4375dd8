//! The trained networks behind [`Segmenter`]: [`crate::model::artifact::InferenceModel`] (BatchNorm folded, eval
//! mode) fed with normalised `[1, 3, H, W]` tensors; its logits become probabilities with the same softmax as every
//! other segmenter ([`Probabilities::from_logits`]).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use candle_core::{Device, Tensor};
use image::RgbImage;

use super::{normalised_chw, Mask, Probabilities, Segmenter};
use crate::compute::Compute;
use crate::model::artifact::InferenceModel;

/// An artifact loaded for inference on one device.
pub struct ModelSegmenter {
    model: InferenceModel,
    device: Device,
}

impl ModelSegmenter {
    pub fn new(model: InferenceModel, device: Device) -> Self {
        Self { model, device }
    }

    /// Load the artifact in `dir` onto `device`.
    pub fn load(dir: &Path, device: Device) -> anyhow::Result<Self> {
        let model = InferenceModel::load(dir, &device)
            .with_context(|| format!("cannot load the model artifact in {}", dir.display()))?;
        Ok(Self { model, device })
    }

    pub fn model(&self) -> &InferenceModel {
        &self.model
    }
}

impl Segmenter for ModelSegmenter {
    fn num_classes(&self) -> usize {
        self.model.meta().num_classes
    }

    fn probabilities(&self, image: &RgbImage) -> anyhow::Result<Probabilities> {
        if !self.device.is_cpu() {
            // Softmax on the GPU; only the probabilities come back.
            let logits = self.device_logits(image)?;
            let (classes, height, width) = (logits.dim(1)?, logits.dim(2)?, logits.dim(3)?);
            let probabilities = candle_nn::ops::softmax(&logits, 1)?;
            let values = probabilities.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
            return Ok(Probabilities::new(classes, height, width, values)?);
        }
        let (classes, height, width, logits) = self.logits(image)?;
        Ok(Probabilities::from_logits(classes, height, width, logits)?)
    }

    fn mask(&self, image: &RgbImage) -> anyhow::Result<Mask> {
        if self.device.is_cpu() {
            // The host's parallel argmax over the logits (no softmax).
            return Ok(self.mask_scores(image)?.argmax());
        }
        // Argmax on the GPU; only the H·W class indices come back.
        let logits = self.device_logits(image)?;
        let (height, width) = (logits.dim(2)?, logits.dim(3)?);
        let labels = logits
            .argmax(1)?
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1::<u32>()?;
        let labels = labels.into_iter().map(|l| l.min(255) as u8).collect();
        Ok(Mask::new(width, height, labels)?)
    }

    /// The logits: the argmax is the same as the probabilities', without the softmax.
    fn mask_scores(&self, image: &RgbImage) -> anyhow::Result<Probabilities> {
        let (classes, height, width, logits) = self.logits(image)?;
        Ok(Probabilities::new(classes, height, width, logits)?)
    }
}

impl ModelSegmenter {
    /// The network's logits `[C, H, W]` for `image`, on the CPU: (classes, height, width, values).
    fn logits(&self, image: &RgbImage) -> anyhow::Result<(usize, usize, usize, Vec<f32>)> {
        let logits = self.device_logits(image)?;
        let (classes, height, width) = (logits.dim(1)?, logits.dim(2)?, logits.dim(3)?);
        let logits = logits.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
        Ok((classes, height, width, logits))
    }

    /// The network's logits `[1, C, H, W]` f32 for `image`, left on the model's device.
    fn device_logits(&self, image: &RgbImage) -> anyhow::Result<Tensor> {
        let (width, height) = (image.width() as usize, image.height() as usize);
        let norm = &self.model.meta().normalization;
        let input = normalised_chw(image, norm.mean, norm.std);
        let x = Tensor::from_vec(input, (1, 3, height, width), &self.device).context("cannot build the input")?;
        let logits = self.model.logits(&x).context("the network failed")?;
        let classes = self.num_classes();
        anyhow::ensure!(
            logits.dims() == [1, classes, height, width],
            "the network returned logits of shape {:?} for a {width}x{height} image and {classes} classes",
            logits.dims()
        );
        Ok(logits)
    }
}

/// The model behind `serve`, `predict` and `demo`: the artifact in `dir` (a `model.tar.gz` there is unpacked first),
/// on `compute`'s device, its activations in `compute`'s dtype.
pub fn load(dir: &Path, compute: &Compute) -> anyhow::Result<Arc<dyn Segmenter>> {
    let dir = crate::model::package::unpack_in_place(dir)?;
    tracing::info!(dir = %dir.display(), device = %crate::compute::describe(&compute.device), "loading the model");
    let mut segmenter = ModelSegmenter::load(&dir, compute.device.clone())?;
    segmenter.model = segmenter.model.with_compute_dtype(compute.mode.compute_dtype);
    Ok(Arc::new(segmenter))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::{Inference, InferenceLimits};
    use crate::model::artifact::{save_varmap, ModelMeta};
    use crate::model::config::{Algorithm, Backbone, ModelConfig, OutputStride};
    use candle_core::DType;
    use candle_nn::{VarBuilder, VarMap};

    #[test]
    fn a_saved_artifact_serves_probabilities_at_the_image_size() -> anyhow::Result<()> {
        let config = ModelConfig::new(Algorithm::Fcn, Backbone::Resnet18, 3, OutputStride::Eight, false)?;
        let varmap = VarMap::new();
        crate::model::segmentation_model::SegmentationModel::new(
            &config,
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        )?;
        let dir = tempfile::tempdir()?;
        save_varmap(dir.path(), &ModelMeta::new(&config), &varmap)?;
        let segmenter = load(dir.path(), &Compute::cpu())?;
        assert_eq!(segmenter.num_classes(), 3);
        let inference = Inference::new(
            segmenter,
            InferenceLimits {
                max_model_pixels: 2000,
                min_model_side: 32,
            },
        );
        for (w, h) in [(61, 47), (5, 3), (120, 90), (40, 36)] {
            let image = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, 77]));
            let p = inference.probabilities(&image)?;
            assert_eq!(p.shape(), [3, h as usize, w as usize]);
            let plane = (w * h) as usize;
            for i in 0..plane {
                let sum: f32 = (0..3).map(|c| p.as_slice()[c * plane + i]).sum();
                assert!((sum - 1.0).abs() < 1e-4, "{sum}");
            }
            let mask = inference.mask(&image)?;
            assert_eq!(mask.labels().len(), plane);
            if (w, h) == (40, 36) {
                // At the model's own size the mask comes from the logits (no softmax): the same classes.
                assert_eq!(mask, p.argmax(), "{w}x{h}");
            }
        }
        Ok(())
    }
}
