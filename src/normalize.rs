//! The pixel statistics images are normalised by, `(x / 255 − mean) / std` per RGB channel: defined once, because
//! training ([`crate::data::augment`]) and serving (a model artifact's default [`crate::model::Normalization`]) must
//! agree or a trained model sees different inputs when served.

/// ImageNet channel means (RGB, 0..1 scale), as torchvision and GluonCV normalise.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (RGB, 0..1 scale).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// `(x / 255 − mean) / std` as `x · scale − shift` per channel: (scale, shift). Training, serving and the ONNX
/// export all normalise through these two numbers, so they round alike.
pub fn scale_shift(mean: [f32; 3], std: [f32; 3]) -> ([f32; 3], [f32; 3]) {
    (
        std::array::from_fn(|c| 1.0 / (255.0 * std[c])),
        std::array::from_fn(|c| mean[c] / std[c]),
    )
}
