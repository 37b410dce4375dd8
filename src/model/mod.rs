//! The segmentation networks, mirroring torchvision so checkpoints load by name.
//!
//! A model is `backbone → head → one bilinear resize` ([`segmentation_model::SegmentationModel`]):
//! - [`resnet`]: ResNet-18/34/50/101 (v1.5), with dilation replacing stride for output stride 8 or 16;
//! - [`heads`]: FCN, DeepLabV3 (ASPP) and PSPNet (pyramid pooling) heads, plus the auxiliary FCN head on layer3;
//! - [`ops`]: the differentiable operations Candle 0.11 lacks for training (bilinear resize, 3×3 max-pool,
//!   adaptive average pooling, a stride-2 convolution whose backward works for any input size);
//! - [`seeded_init`]: reproducible random initialisation (the same seed gives the same weights);
//! - [`weights`]: name/shape checking for state dicts, loading into a `VarMap`;
//! - [`artifact`]: the on-disk model (`model.safetensors` + `model.json`) and the BatchNorm-folded inference model.
//!
//! Nothing here knows about SageMaker; the configuration is plain data.

pub mod artifact;
pub mod config;
pub mod heads;
pub mod layers;
pub mod ops;
pub mod package;
pub mod precision;
pub mod resnet;
pub mod seeded_init;
pub mod segmentation_model;
pub mod weights;

pub use artifact::{InferenceModel, ModelMeta, Normalization};
pub use config::{Algorithm, Backbone, ModelConfig, OutputStride};
pub use segmentation_model::{SegOutput, SegmentationModel};

#[cfg(test)]
mod parity_tests;
#[cfg(test)]
mod structure_tests;
